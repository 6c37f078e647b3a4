#![no_main]
//! Fuzz target `nbd`: a client's byte stream against a real server; see
//! `crates/qcow2-nbd/tests/harness/mod.rs`.

#[path = "../../crates/qcow2-nbd/tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::nbd(data);
});
