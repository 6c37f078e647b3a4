//! What [`Snapshots`] does: the internal snapshots of an [`Image`](crate::Image).

use qcow2_format::snapshot::Snapshot;

use crate::image::Snapshots;
use crate::Result;

impl std::fmt::Debug for Snapshots<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots").finish_non_exhaustive()
    }
}

impl Snapshots<'_> {
    /// The internal snapshots, as the snapshot table records them.
    pub fn list(&self) -> Result<Vec<qcow2_format::snapshot::Snapshot>> {
        self.device.snapshots()
    }

    /// Takes an internal snapshot named `name` of the disk as it is now
    /// (no VM state), as `qemu-img snapshot -c` does, and returns its table
    /// entry. A name already in use, too many snapshots or refcounts that
    /// would overflow are refused before anything is written.
    pub fn create(&self, name: &str) -> Result<Snapshot> {
        self.device.snapshot_create(name)
    }

    /// Makes the disk what it was when snapshot `id_or_name` (its ID, or
    /// else its name; `snapshot.id=` and `snapshot.name=` choose) was
    /// taken, as `qemu-img snapshot -a` does; the virtual
    /// size follows the snapshot's. The snapshot itself stays.
    pub fn apply(&self, id_or_name: &str) -> Result<()> {
        self.device.snapshot_apply(id_or_name)
    }

    /// Deletes the snapshot named `name`, as `qemu-img snapshot -d` does
    /// (by name only: `-d 2` deletes the snapshot named "2", never the one
    /// whose ID is 2): clusters only it held are freed (and on a
    /// deduplicated image their dedup entries removed).
    pub fn delete(&self, name: &str) -> Result<()> {
        self.device.snapshot_delete(name)
    }
}
