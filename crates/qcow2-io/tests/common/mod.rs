//! Helpers shared by the integration tests: running the QEMU tools (the
//! oracle), and a seeded random generator.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

/// Whether qemu-img and qemu-io are installed. When they are not, says so
/// loudly on stderr so that a skipped interop test is never mistaken for a
/// passing one; set `QCOW2_REQUIRE_QEMU=1` (CI does) to fail instead.
pub fn qemu_available() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        if std::env::var_os("QCOW2_REQUIRE_QEMU").is_some() {
            panic!("qemu-img/qemu-io are required (QCOW2_REQUIRE_QEMU is set) but not installed");
        }
        eprintln!("\n*** SKIPPED: qemu-img/qemu-io not installed; interop test did not run ***\n");
    }
    ok
}

/// Runs a command and returns its output, panicking with its stderr if it
/// could not be started.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a command that must succeed.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` must find no error and no leak. It runs with `-U`
/// (force-share), as a user inspects an image that is still open.
pub fn assert_qemu_check_clean(path: &Path) {
    let p = path.to_str().unwrap();
    let out = run("qemu-img", &["check", "-U", "-f", "qcow2", p]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {p}: exit {:?}\n{text}",
        out.status.code()
    );
}

/// The image converted to raw by qemu-img (with `-U`: it may be open).
pub fn qemu_raw(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("qemu.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-f",
            "qcow2",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    data
}

/// `qemu-img compare` of a qcow2 image with a raw file must say identical
/// (with `-U`: the image may be open).
pub fn assert_qemu_identical(image: &Path, raw: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster sizes × refcount widths × compat levels of the interop
/// matrix (compat 0.10 allows only 16-bit refcounts).
pub fn matrix() -> Vec<(u64, u32, &'static str)> {
    let mut out = Vec::new();
    for cluster in [512u64, 4096, 65536, 2 << 20] {
        for bits in [1u32, 16, 64] {
            for compat in ["0.10", "1.1"] {
                if compat == "0.10" && bits != 16 {
                    continue;
                }
                out.push((cluster, bits, compat));
            }
        }
    }
    out
}

/// First index where two buffers differ, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Guest contents as a crash model sees them: as of the last completed
/// flush, now, and which bytes changed (or may have) since that flush.
pub struct Model {
    /// Contents as of the last successful flush.
    pub flushed: Vec<u8>,
    /// Contents now.
    pub current: Vec<u8>,
    /// Bytes changed (or possibly changed) since the last flush.
    pub touched: Vec<bool>,
}

impl Model {
    /// A disk of `size` zero bytes, all flushed.
    pub fn new(size: usize) -> Self {
        Self {
            flushed: vec![0; size],
            current: vec![0; size],
            touched: vec![false; size],
        }
    }

    /// A flush completed: what the guest reads now is what survives.
    pub fn flushed_now(&mut self) {
        self.flushed.clone_from(&self.current);
        self.touched.fill(false);
    }

    /// The guest wrote `data` at `offset`.
    pub fn set(&mut self, offset: u64, data: &[u8]) {
        let r = offset as usize..offset as usize + data.len();
        self.current[r.clone()].copy_from_slice(data);
        self.touched[r].fill(true);
    }

    /// The disk was resized to `size` bytes: every byte may have changed
    /// until the next flush (a shrink drops data, a grow reads zeros).
    pub fn resize(&mut self, size: usize) {
        let keep = size.min(self.current.len());
        self.touched[..keep].fill(true);
        self.current.resize(size, 0);
        self.touched.resize(size, true);
        self.flushed.resize(size, 0);
    }
}

/// Where one content of a deduplicated image is stored.
#[derive(Default)]
pub struct StoredContent {
    /// Host offsets of its copies.
    pub hosts: BTreeSet<u64>,
    /// Guest clusters referring to it (in the active L1).
    pub references: u64,
}

/// Every content of `image`'s mapped guest clusters, by reading them.
pub fn copies_by_content(image: &qcow2_io::Image) -> BTreeMap<Vec<u8>, StoredContent> {
    let cs = image.cluster_size();
    let mut out: BTreeMap<Vec<u8>, StoredContent> = BTreeMap::new();
    let mut buf = vec![0u8; cs as usize];
    for e in image.map().unwrap() {
        if e.kind != qcow2_io::MapKind::Data {
            continue;
        }
        for i in 0..e.length / cs {
            image.read_at(&mut buf, e.start + i * cs).unwrap();
            let stored = out.entry(buf.clone()).or_default();
            stored.hosts.insert(e.host_offset.unwrap() + i * cs);
            stored.references += 1;
        }
    }
    out
}
