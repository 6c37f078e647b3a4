//! [`HeaderFields`]: the refcount table pointer of a qcow2 header, for
//! users of this crate alone.
//!
//! `qcow2-io` never uses it: its `HeaderWriter` is the one writer of its
//! images' headers and keeps the in-memory header in step.

use qcow2_format::HostOffset;

use crate::refcounts::RefcountTableHeader;
use crate::storage::Storage;

/// The [`RefcountTableHeader`] of a qcow2 image whose header lives at the
/// start of the same storage: writes the two refcount table fields (offset
/// and cluster count, bytes 48..60) in place and syncs them. What a user of
/// this crate alone passes to [`Refcounts::flush`](crate::Refcounts::flush); `qcow2-io` passes its
/// own header writer, which keeps its in-memory header in step.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderFields;

impl RefcountTableHeader for HeaderFields {
    fn point_at(
        &mut self,
        storage: &dyn Storage,
        offset: HostOffset,
        clusters: u32,
    ) -> std::io::Result<()> {
        let fields = qcow2_format::header::encode_refcount_table_fields(offset.get(), clusters);
        storage.write_at(&fields, qcow2_format::header::REFCOUNT_TABLE_FIELDS_OFFSET)?;
        storage.flush()
    }
}
