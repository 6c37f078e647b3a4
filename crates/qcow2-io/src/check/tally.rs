//! The state of one check walk: the references counted per host cluster,
//! the findings, and the OFLAG_COPIED fixes found on the way.

use std::collections::HashMap;

use qcow2_alloc::ReferenceCounts;
use qcow2_format::l2::L2Mapping;
use qcow2_format::{ClusterCount, Geometry, GuestOffset, HostCluster, HostOffset};

use crate::check_report::{CheckReport, Finding, FindingKind};

/// One walk over every structure that references host clusters.
pub(super) struct Walk {
    pub(super) geometry: Geometry,
    pub(super) tally: ReferenceCounts,
    pub(super) report: CheckReport,
    pub(super) copied_fixes: Vec<CopiedFix>,
    /// For dedup images: every data cluster of the active tables and the
    /// first guest offset that maps to it.
    pub(super) data_clusters: Option<HashMap<HostCluster, GuestOffset>>,
}

/// An OFLAG_COPIED fix the walk found (applied by an `-r all` repair).
pub(super) enum CopiedFix {
    L1 {
        index: usize,
        raw: u64,
    },
    L2 {
        guest: GuestOffset,
        mapping: L2Mapping,
    },
}

impl Walk {
    /// Records a finding and counts it by kind.
    pub(super) fn finding(&mut self, kind: FindingKind, message: String) {
        match kind {
            FindingKind::Leak => self.report.leaks += 1,
            FindingKind::Corruption => self.report.corruptions += 1,
            FindingKind::CheckError => self.report.check_errors += 1,
            FindingKind::Dedup => self.report.dedup_errors += 1,
        }
        self.report.findings.push(Finding { kind, message });
    }

    /// Counts one reference to each of `count` clusters from byte `offset`.
    pub(super) fn reference(&mut self, offset: u64, count: ClusterCount, what: &str) {
        let g = self.geometry;
        let first = g.host_cluster(HostOffset::new(offset));
        self.reference_run(first, count, what);
    }

    /// Counts one reference to each of `count` clusters from `first`.
    pub(super) fn reference_run(&mut self, first: HostCluster, count: ClusterCount, what: &str) {
        for c in first.run(count) {
            if !self.tally.add(c) {
                let at = self.geometry.host_offset(c).get();
                self.finding(
                    FindingKind::Corruption,
                    format!("ERROR {what} at {at:#x} lies past the end of the image"),
                );
                return;
            }
        }
    }
}
