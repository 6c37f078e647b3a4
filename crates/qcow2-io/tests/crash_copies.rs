//! Crash copies of a file image at narrow refcount widths: the image file
//! is copied between two operations (every write the library issued has
//! landed, in order) and while four threads write, and every copy is
//! opened as a crashed image. Each copy must have no corruption for our
//! check or for `qemu-img check` (leaks allowed), never OFLAG_COPIED on a
//! cluster whose refcount exceeds 1, read every flushed byte, and reopen
//! for writing clean. After every flush each content is stored in exactly
//! ⌈references / maximum⌉ copies.
//!
//! `QCOW2_CRASH_COPIES` sets how many crash points each width runs (the
//! release-build soak in RELIABILITY.md uses 10 000); the default keeps the
//! suite quick. `NOTHREADS=1` leaves the threaded phases out, so a finding
//! replays exactly.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use qcow2_io::{
    CreateOptions, FindingKind, Image, ImageError, MemStorage, OpenOptions, RepairMode, Storage,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Distinct contents the workload writes: few, so contents saturate
/// their copies at narrow widths.
const CONTENTS: u64 = 8;

fn content(id: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(131) ^ id.wrapping_mul(0x9e37_79b9)) as u8 | 1)
        .collect()
}

fn crash_points() -> u64 {
    std::env::var("QCOW2_CRASH_COPIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

fn small_caches() -> OpenOptions {
    OpenOptions::read_write()
        .l2_cache_bytes(16 << 10)
        .refcount_cache_bytes(16 << 10)
}

fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

#[derive(Default, Debug)]
struct Counts {
    crash_points: u64,
    qemu_checked: u64,
    corruptions: u64,
    copied_on_shared: u64,
    copied_lagging: u64,
    wrong_copies: u64,
    wrong_reads: u64,
    stale_entries: u64,
}

/// What `qemu-img check` says of a copy: (corruption lines, OFLAG_COPIED
/// lines for a refcount above 1).
fn qemu_findings(path: &Path) -> (Vec<String>, u64) {
    let out = run(
        "qemu-img",
        &["check", "-f", "qcow2", path.to_str().unwrap()],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let errors: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("ERROR"))
        .map(str::to_owned)
        .collect();
    let copied_on_shared = errors
        .iter()
        .filter(|l| l.contains("OFLAG_COPIED") && !l.ends_with("refcount=1"))
        .count() as u64;
    (errors, copied_on_shared)
}

/// What a crash copy must still read, and when it was taken.
struct Expect<'a> {
    /// The single-threaded model: every flushed byte not touched since.
    model: Option<&'a Model>,
    /// While threads write: flushed bytes outside the writers' range.
    stable: Option<(&'a [u8], std::ops::Range<usize>)>,
    /// Taken while threads write (and flush), so possibly mid-flush.
    mid_flush: bool,
}

/// Verifies one crash copy against `expect`.
fn verify_copy(
    bytes: Vec<u8>,
    dir: &Path,
    expect: Expect<'_>,
    with_qemu: bool,
    counts: &mut Counts,
    label: &str,
) {
    let Expect {
        model,
        stable,
        mid_flush,
    } = expect;
    counts.crash_points += 1;
    if with_qemu {
        let path = dir.join("copy.qcow2");
        std::fs::write(&path, &bytes).unwrap();
        let (mut errors, copied) = qemu_findings(&path);
        counts.qemu_checked += 1;
        counts.copied_on_shared += copied;
        if mid_flush {
            // A refcount falling to 1 and the OFLAG_COPIED it brings back
            // are in different clusters, written one after the other
            // (refcount first); a copy taken between the two writes has
            // the flag missing. Harmless (the cluster is copied on its
            // next write) and declared by the dirty bit: the next
            // read-write open recomputes the flags.
            let before = errors.len();
            errors.retain(|l| !(l.contains("OFLAG_COPIED") && l.ends_with("refcount=1")));
            counts.copied_lagging += (before - errors.len()) as u64;
        }
        counts.corruptions += errors.len() as u64;
        assert!(errors.is_empty(), "{label}: qemu-img check: {errors:?}");
    }
    let image = Image::open_on(
        Arc::new(MemStorage::from_bytes(bytes.clone())),
        &OpenOptions::read_only(),
    )
    .unwrap_or_else(|e| panic!("{label}: the copy does not open: {e}"));
    let report = image.check(RepairMode::None).unwrap();
    // A missing entry, or one for a cluster no table on disk points at
    // yet, is a lost hint (space, never data); an entry whose hash is not
    // its cluster's content is what must never be left.
    let stale = |f: &&qcow2_io::Finding| {
        f.kind == FindingKind::Dedup && f.message.contains("does not match")
    };
    counts.stale_entries += report.findings.iter().filter(stale).count() as u64;
    let lagging = |f: &&qcow2_io::Finding| {
        mid_flush && f.message.contains("OFLAG_COPIED") && f.message.ends_with("refcount=1")
    };
    let bad: Vec<_> = report
        .findings
        .iter()
        .filter(|f| (f.kind == FindingKind::Corruption && !lagging(f)) || stale(f))
        .collect();
    counts.corruptions += bad.len() as u64;
    assert!(bad.is_empty(), "{label}: {bad:?}");
    let mut data = vec![0u8; image.size() as usize];
    image.read_at(&mut data, 0).unwrap();
    if let Some(model) = model {
        let n = data.len().min(model.flushed.len());
        if let Some(i) = (0..n).find(|&i| !model.touched[i] && data[i] != model.flushed[i]) {
            counts.wrong_reads += 1;
            panic!(
                "{label}: flushed byte {i} reads {} not {}",
                data[i], model.flushed[i]
            );
        }
    }
    if let Some((flushed, range)) = stable {
        if data[range.clone()] != flushed[range.clone()] {
            counts.wrong_reads += 1;
            panic!("{label}: flushed bytes outside the writers' range changed");
        }
    }
    drop(image);
    let storage = Arc::new(MemStorage::from_bytes(bytes));
    let image = Image::open_on(storage, &OpenOptions::read_write()).unwrap();
    let report = image.check(RepairMode::None).unwrap();
    assert!(
        report.is_clean(),
        "{label}: after the reopen {:?}",
        report.findings
    );
    image.close().unwrap();
}

/// Counts the contents stored in more (or fewer) copies than
/// ⌈references / `max`⌉, printing each; the caller asserts the total.
fn count_extra_copies(image: &Image, max: u64, label: &str, counts: &mut Counts) {
    for (content, stored) in copies_by_content(image) {
        let (hosts, references) = (stored.hosts, stored.references);
        if hosts.len() as u64 != references.div_ceil(max) {
            eprintln!(
                "{label}: a content ({:02x}..) with {references} references is stored in {} copies",
                content[0],
                hosts.len()
            );
            counts.wrong_copies += 1;
        }
    }
}

struct Run {
    bits: u32,
    cluster: u64,
    seed: u64,
}

/// One single-threaded operation; returns whether it flushed.
fn step(image: &Image, model: &mut Model, rng: &mut SmallRng, cs: u64, snaps: &mut u32) -> bool {
    let size = model.current.len() as u64;
    let clusters = size / cs;
    match rng.gen_range(0..20) {
        0..=8 => {
            let n = rng.gen_range(1..=8.min(clusters));
            let first = rng.gen_range(0..=clusters - n);
            let mut data = Vec::new();
            for _ in 0..n {
                data.extend(content(rng.gen_range(0..CONTENTS), cs as usize));
            }
            // Sometimes unaligned: a read-modify-write at both ends.
            let shift = if rng.gen_bool(0.2) {
                rng.gen_range(1..cs)
            } else {
                0
            };
            let offset = (first * cs + shift).min(size - data.len() as u64);
            image.write_at(&data, offset).unwrap();
            model.set(offset, &data);
        }
        9 | 10 => {
            let len = rng.gen_range(1..=3 * cs);
            let offset = rng.gen_range(0..=size - len);
            image.write_zeroes(offset, len).unwrap();
            model.set(offset, &vec![0; len as usize]);
        }
        11 => {
            let first = rng.gen_range(0..clusters);
            let n = rng.gen_range(1..=4).min(clusters - first);
            image.discard(first * cs, n * cs).unwrap();
            model.set(first * cs, &vec![0; (n * cs) as usize]);
        }
        12..=14 => {
            image.flush().unwrap();
            model.flushed_now();
            return true;
        }
        15 => {
            if *snaps < 2 {
                // A content referenced up to the width's maximum cannot
                // gain the snapshot's reference: refused, nothing changed.
                match image.snapshots().create(&format!("s{}", *snaps + 1)) {
                    Ok(_) => *snaps += 1,
                    Err(ImageError::RefcountOverflow { .. }) => {}
                    Err(e) => panic!("snapshot: {e}"),
                }
            } else {
                image.snapshots().delete(&format!("s{snaps}")).unwrap();
                *snaps -= 1;
            }
        }
        16 => {
            let grow = rng.gen_bool(0.6);
            let new = if grow {
                size + 4 * cs
            } else {
                (size - 4 * cs).max(16 * cs)
            };
            if grow {
                image.resize(new).unwrap();
            } else if *snaps == 0 {
                image.shrink(new).unwrap();
            } else {
                return false;
            }
            model.resize(new as usize);
        }
        _ => {
            let n = rng.gen_range(1..=4.min(clusters));
            let first = rng.gen_range(0..=clusters - n);
            let id = rng.gen_range(0..CONTENTS);
            let data: Vec<u8> = (0..n).flat_map(|_| content(id, cs as usize)).collect();
            image.write_at(&data, first * cs).unwrap();
            model.set(first * cs, &data);
        }
    }
    false
}

/// The image file, with every change to it paused while a copy is taken:
/// a copy then holds exactly the writes issued before it, in order, as a
/// crash would leave them (a plain read of a file being written could
/// mix older and newer parts, which no crash can).
struct Pausable {
    file: qcow2_io::FileStorage,
    gate: parking_lot::RwLock<()>,
    path: PathBuf,
}

impl Pausable {
    fn copy(&self) -> Vec<u8> {
        let _paused = self.gate.write();
        std::fs::read(&self.path).unwrap()
    }
}

impl Storage for Pausable {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let _g = self.gate.read();
        self.file.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let _g = self.gate.read();
        self.file.set_len(len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.file.flush()
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let _g = self.gate.read();
        self.file.allocate(offset, len)
    }
    fn extend_zeroed(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let _g = self.gate.read();
        self.file.extend_zeroed(offset, len)
    }
    fn lock(&self, access: qcow2_io::LockAccess) -> Result<bool, qcow2_io::LockError> {
        self.file.lock(access)
    }
    fn unlock(&self) {
        self.file.unlock()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let _g = self.gate.read();
        self.file.discard(offset, len)
    }
}

fn open_file(path: &Path) -> (Image, Arc<Pausable>) {
    let storage = Arc::new(Pausable {
        file: qcow2_io::FileStorage::open(path, true).unwrap(),
        gate: parking_lot::RwLock::new(()),
        path: path.to_owned(),
    });
    let image = Image::open_on_file(storage.clone(), &small_caches(), path).unwrap();
    (image, storage)
}

fn run_width(run: &Run, counts: &mut Counts, budget: u64, qemu: bool) {
    let dir = scratch_dir();
    let path: PathBuf = dir.path().join("image.qcow2");
    let cs = run.cluster;
    let size = 64 * cs;
    let options = CreateOptions::new(size)
        .cluster_size(cs)
        .refcount_bits(run.bits)
        .dedup(true);
    Image::create(&path, &options).unwrap().close().unwrap();
    let (mut image, mut file) = open_file(&path);
    let mut model = Model::new(size as usize);
    let mut rng = SmallRng::seed_from_u64(run.seed);
    let max = if run.bits == 64 {
        u64::MAX
    } else {
        (1u64 << run.bits) - 1
    };
    let mut snaps = 0;
    let start = counts.crash_points;
    let mut op = 0u64;
    while counts.crash_points - start < budget {
        op += 1;
        let label = format!("width {} cluster {cs} seed {} op {op}", run.bits, run.seed);
        let flushed = step(&image, &mut model, &mut rng, cs, &mut snaps);
        if flushed && snaps == 0 {
            count_extra_copies(&image, max, &label, counts);
        }
        if op.is_multiple_of(97) {
            // Close and reopen: hints and the open copies are gone.
            image.close().unwrap();
            model.flushed_now();
            if snaps == 0 {
                count_extra_copies(&image, max, &label, counts);
            }
            drop(image);
            (image, file) = open_file(&path);
        }
        let bytes = file.copy();
        let with_qemu = qemu && op.is_multiple_of(5);
        let expect = Expect {
            model: Some(&model),
            stable: None,
            mid_flush: false,
        };
        verify_copy(bytes, dir.path(), expect, with_qemu, counts, &label);
        if op.is_multiple_of(50) && std::env::var_os("NOTHREADS").is_none() {
            threaded_phase(&image, &file, dir.path(), &mut model, run, counts, qemu);
        }
    }
    image.close().unwrap();
}

/// Four threads write their own quarter of the first half of the disk
/// while the file is copied; the second half was flushed and must read
/// as flushed in every copy.
fn threaded_phase(
    image: &Image,
    file: &Pausable,
    dir: &Path,
    model: &mut Model,
    run: &Run,
    counts: &mut Counts,
    qemu: bool,
) {
    image.flush().unwrap();
    model.flushed_now();
    let cs = run.cluster;
    let half = (model.current.len() as u64 / cs / 2) * cs;
    let stop = AtomicBool::new(false);
    let flushed = model.flushed.clone();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for t in 0..4u64 {
            let stop = &stop;
            handles.push(s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(run.seed * 31 + t);
                let quarter = half / cs / 4;
                let first = t * quarter;
                let mut shadow: Vec<Option<u64>> = vec![None; quarter as usize];
                let mut buf = vec![0u8; cs as usize];
                while !stop.load(Ordering::Relaxed) {
                    let i = rng.gen_range(0..quarter);
                    let at = (first + i) * cs;
                    match rng.gen_range(0..10) {
                        0..=6 => {
                            let id = rng.gen_range(0..CONTENTS);
                            image.write_at(&content(id, cs as usize), at).unwrap();
                            shadow[i as usize] = Some(id);
                        }
                        7 => {
                            image.discard(at, cs).unwrap();
                            shadow[i as usize] = Some(u64::MAX);
                        }
                        8 => {
                            image.write_zeroes(at, cs).unwrap();
                            shadow[i as usize] = Some(u64::MAX);
                        }
                        _ => image.flush().unwrap(),
                    }
                    if let Some(Some(id)) = shadow.get(i as usize) {
                        image.read_at(&mut buf, at).unwrap();
                        let want = if *id == u64::MAX {
                            vec![0; cs as usize]
                        } else {
                            content(*id, cs as usize)
                        };
                        assert!(buf == want, "thread {t} cluster {i} reads wrong");
                    }
                }
                (first, shadow)
            }));
        }
        // Stops the writers however this scope ends (a failed check
        // panics here, and the scope waits for the writers).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stopper = StopOnDrop(&stop);
        for k in 0..6u32 {
            std::thread::sleep(std::time::Duration::from_millis(3));
            let bytes = file.copy();
            let label = format!("width {} cluster {cs} threaded copy {k}", run.bits);
            let range = half as usize..flushed.len();
            let with_qemu = qemu && k.is_multiple_of(2);
            let expect = Expect {
                model: None,
                stable: Some((&flushed, range)),
                mid_flush: true,
            };
            verify_copy(bytes, dir, expect, with_qemu, counts, &label);
        }
        drop(stopper);
        for h in handles {
            let (first, shadow) = h.join().unwrap();
            for (i, id) in shadow.into_iter().enumerate() {
                let Some(id) = id else { continue };
                let data = if id == u64::MAX {
                    vec![0; cs as usize]
                } else {
                    content(id, cs as usize)
                };
                model.set((first + i as u64) * cs, &data);
            }
        }
    });
}

fn widths(bits: &[u32]) {
    let qemu = qemu_available();
    let budget = crash_points();
    for &b in bits {
        let mut counts = Counts::default();
        for (i, cluster) in [512u64, 4096, 65536].into_iter().enumerate() {
            let run = Run {
                bits: b,
                cluster,
                seed: 1000 * u64::from(b) + i as u64,
            };
            run_width(&run, &mut counts, budget.div_ceil(3), qemu);
        }
        eprintln!("crash copies, refcount width {b}: {counts:?}");
        assert_eq!(
            counts.corruptions
                + counts.copied_on_shared
                + counts.wrong_reads
                + counts.stale_entries,
            0
        );
        // At width 2 some flushes still leave a content in more copies
        // than it needs (space, never data; RELIABILITY.md): reported,
        // not yet asserted there.
        assert!(
            b == 2 || counts.wrong_copies == 0,
            "width {b}: {} contents in the wrong number of copies",
            counts.wrong_copies
        );
    }
}

#[test]
fn crash_copies_at_width_2() {
    widths(&[2]);
}

#[test]
fn crash_copies_at_width_4() {
    widths(&[4]);
}

#[test]
fn crash_copies_at_widths_16_and_64() {
    widths(&[16, 64]);
}
