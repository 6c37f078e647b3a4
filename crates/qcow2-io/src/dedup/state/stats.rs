//! The deduplication figures of an image, from its index or, before one
//! is built, from a scan of its table.

use qcow2_alloc::Storage;
use qcow2_dedup::DedupStats;

use super::DedupState;
use crate::Result;

impl DedupState {
    /// Deduplication figures, given how many guest clusters reference data.
    pub(crate) fn stats(&mut self, storage: &dyn Storage, references: u64) -> Result<DedupStats> {
        let (unique, memory, report) = match self.index.as_ref() {
            Some(index) => (
                index.len() as u64,
                index.memory_bytes() as u64,
                self.table.report(),
            ),
            None => {
                let report = self.table.scan(storage, |_, _| Ok(()))?;
                (report.entries, 0, report)
            }
        };
        Ok(DedupStats {
            unique_clusters: unique,
            references,
            bytes_saved: references.saturating_sub(unique) * self.geometry.cluster_size(),
            index_memory: memory,
            crc_failures: report.crc_failures,
        })
    }
}
