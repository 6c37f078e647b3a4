//! What a consistency check reports: its findings, counted as
//! `qemu-img check` counts them, and what it repaired.

/// What a check may fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Report only.
    None,
    /// Fix refcounts that are too high (leaked clusters).
    Leaks,
    /// Fix leaks, refcounts that are too low and OFLAG_COPIED flags.
    All,
}

/// The kind of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// Space is wasted, no data at risk.
    Leak,
    /// Metadata is wrong in a way that can lose or corrupt data.
    Corruption,
    /// Something could not be checked.
    CheckError,
    /// The dedup table disagrees with the data (a missing, wrong or stale
    /// entry, or a damaged dedup cluster).
    Dedup,
}

/// One problem found by a check, worded like `qemu-img check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Its kind.
    pub kind: FindingKind,
    /// A one-line description.
    pub message: String,
}

/// The result of [`crate::Image::check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions remaining after any repair.
    pub corruptions: u64,
    /// Leaked clusters remaining after any repair.
    pub leaks: u64,
    /// Things that could not be checked.
    pub check_errors: u64,
    /// Dedup table problems remaining after any repair.
    pub dedup_errors: u64,
    /// Dedup table problems the repair fixed (by rebuilding the table).
    pub dedup_fixed: u64,
    /// Corruptions the repair fixed.
    pub corruptions_fixed: u64,
    /// Leaks the repair fixed.
    pub leaks_fixed: u64,
    /// Guest clusters with data (allocated, compressed or preallocated zero).
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// Each problem found (before repair, if one ran).
    pub findings: Vec<Finding>,
    /// Whether the repair replaced the whole refcount structure (it could
    /// not be trusted to allocate from: damaged, or a referenced cluster
    /// had refcount 0), as `qemu-img check -r all` does.
    pub refcounts_rebuilt: bool,
}

impl CheckReport {
    /// Whether nothing at all was found.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 && self.dedup_errors == 0
    }
}
