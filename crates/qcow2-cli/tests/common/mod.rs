//! Helpers shared by the CLI's integration tests: running the `qcow2`
//! binary and the real tools used as the oracle.
#![allow(dead_code)]

pub mod server;

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The `qcow2` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_qcow2")
}

/// Runs `program` with `args`.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"))
}

/// Runs `qcow2 ARGS`.
pub fn qcow2(args: &[&str]) -> Output {
    run(bin(), args)
}

/// Bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A path as `&str`.
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Whether every tool is installed; says so loudly when not, and fails
/// when `QCOW2_REQUIRE_QEMU` is set (as in CI) so nothing skips there.
pub fn tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|t| {
            Command::new(t)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("QCOW2_REQUIRE_QEMU").is_some() {
        panic!("{missing:?} required (QCOW2_REQUIRE_QEMU is set) but not installed");
    }
    eprintln!("\n*** SKIPPED: {missing:?} not installed; interop test did not run ***\n");
    false
}

/// Whether qemu-img is installed (see [`tools`]).
pub fn qemu_available() -> bool {
    tools(&["qemu-img"])
}

/// Runs qemu-io with each of `commands` on `path`; it must succeed.
pub fn qemu_io(path: &Path, commands: &[&str]) {
    let mut args = Vec::new();
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(p(path));
    ok("qemu-io", &args);
}

/// `qemu-img check` finds nothing on `path`.
pub fn assert_qemu_clean(path: &Path, step: &str) {
    let out = run("qemu-img", &["check", p(path)]);
    assert!(
        out.status.success(),
        "{step}: qemu-img check: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `qemu-img compare` finds `a` and `b` identical (formats probed).
pub fn assert_identical(a: &Path, b: &Path, step: &str) {
    let out = run("qemu-img", &["compare", p(a), p(b)]);
    assert!(
        out.status.success(),
        "{step}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}
