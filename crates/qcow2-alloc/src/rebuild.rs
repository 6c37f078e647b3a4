//! The reference tally a consistency check builds and compares with the
//! refcounts on disk.

use qcow2_format::HostCluster;

use crate::{Refcounts, Result, Storage};

/// A host cluster whose refcount on disk differs from its references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountMismatch {
    /// The host cluster.
    pub cluster: HostCluster,
    /// Refcount stored on disk.
    pub on_disk: u64,
    /// References found by walking the metadata.
    pub referenced: u64,
}

impl RefcountMismatch {
    /// More refcount than references: space is lost but no data is at risk.
    pub fn is_leak(&self) -> bool {
        self.on_disk > self.referenced
    }
}

/// How many times each host cluster is referenced by the image's metadata.
///
/// Invariant: sized once from the file length, so a corrupt image cannot make
/// it allocate more than one counter per cluster of the file.
#[derive(Debug)]
pub struct ReferenceCounts {
    counts: Vec<u64>,
}

impl ReferenceCounts {
    /// A tally for an image file of `clusters` clusters.
    pub fn new(clusters: u64) -> Self {
        Self {
            counts: vec![0; clusters as usize],
        }
    }

    /// Counts one reference to `cluster`; `false` if it lies past the file.
    pub fn add(&mut self, cluster: HostCluster) -> bool {
        match usize::try_from(cluster.get())
            .ok()
            .and_then(|i| self.counts.get_mut(i))
        {
            Some(c) => {
                *c += 1;
                true
            }
            None => false,
        }
    }

    /// References counted for `cluster`.
    pub fn get(&self, cluster: HostCluster) -> u64 {
        usize::try_from(cluster.get())
            .ok()
            .and_then(|i| self.counts.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// Number of clusters tallied.
    pub fn len(&self) -> u64 {
        self.counts.len() as u64
    }

    /// Whether no cluster is tallied.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Every cluster whose refcount differs from its references, including
    /// clusters past the file that still have a refcount.
    pub fn compare(
        &self,
        refcounts: &mut Refcounts,
        storage: &dyn Storage,
    ) -> Result<Vec<RefcountMismatch>> {
        let mut out = Vec::new();
        for cluster in (0..self.len()).map(HostCluster::new) {
            let on_disk = refcounts.get(storage, cluster)?;
            let referenced = self.get(cluster);
            if on_disk != referenced {
                out.push(RefcountMismatch {
                    cluster,
                    on_disk,
                    referenced,
                });
            }
        }
        // Past the file nothing is referenced: only nonzero refcounts there
        // are mismatches, and only existing blocks can hold them.
        let beyond = refcounts.nonzero_from(storage, HostCluster::new(self.len()))?;
        out.extend(
            beyond
                .into_iter()
                .map(|(cluster, on_disk)| RefcountMismatch {
                    cluster,
                    on_disk,
                    referenced: 0,
                }),
        );
        Ok(out)
    }
}
