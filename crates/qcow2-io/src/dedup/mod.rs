//! Inline deduplication: the content index beside the block map.
//!
//! [`state`] owns the dedup table, the index and their upkeep as references
//! come and go; [`claims`] the in-flight claims that keep concurrent writers
//! of one content from storing it twice; [`plan`] classifies each cluster of
//! a write without changing anything; [`mod@write`] applies the classes (the
//! write path); [`admin`] holds statistics and turning deduplication on for
//! an existing image. The invariants and where each is kept are listed in
//! `docs/ARCHITECTURE.md`, "Deduplication".

mod admin;
pub(crate) mod claims;
pub(crate) mod content;
mod plan;
mod state;
mod write;

pub(crate) use state::DedupState;
