#![no_main]
//! Fuzz target `open`: see `crates/qcow2-io/tests/harness/mod.rs`.

#[path = "../../crates/qcow2-io/tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::open(data));
