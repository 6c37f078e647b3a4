//! A real Linux guest on a deduplicated image: `qemu-system-x86_64` boots
//! Debian's cloud kernel with a busybox initramfs built here, its disk a
//! dedup image with 4 KiB clusters served by `qcow2 serve`, and a second,
//! read-only disk holding a few thousand real files of this machine.
//!
//! The guest makes an ext4 file system, copies the files twice, trims,
//! deletes one copy and trims again; afterwards the host checks the file
//! system (`e2fsck -fn`), every file byte for byte (`debugfs rdump`), the
//! image (`qcow2 check`, `qemu-img check`), the dedup ratio at the peak and
//! the space the trims gave back. The crash variant kills the server with
//! SIGKILL in the middle of a copy, restarts it, boots the guest again for
//! its journal recovery and checks that everything synced before the crash
//! is intact.
//!
//! KVM is used when a short probe boot succeeds (a nested KVM may start
//! and then hang), TCG otherwise. The test skips loudly where the guest's
//! packages are missing, and fails instead when `QCOW2_REQUIRE_GUEST` is
//! set, as in CI.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// How long one boot may take, under TCG, before the test fails.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
/// Real files copied into the guest, at most.
const MAX_FILES: usize = 3000;
/// Their total size, at most.
const MAX_BYTES: u64 = 48 << 20;
/// The guest's random scratch file, deleted and trimmed before the copies:
/// without holes punched for trimmed clusters the image keeps it.
const SCRATCH_MIB: u64 = 64;

/// The host programs and files a guest boot needs.
struct Kit {
    qemu: PathBuf,
    kernel: PathBuf,
    modules: PathBuf,
    busybox: PathBuf,
    mke2fs: PathBuf,
}

impl Kit {
    /// Finds everything, or names what is missing.
    fn find() -> Result<Self, String> {
        let which = |name: &str| -> Result<PathBuf, String> {
            ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
                .iter()
                .map(|dir| Path::new(dir).join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| format!("{name} not installed"))
        };
        for tool in ["e2fsck", "debugfs", "ldd", "qemu-img"] {
            which(tool)?;
        }
        let kernel = fs::read_dir("/boot")
            .map_err(|e| format!("/boot: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
            })
            .max()
            .ok_or("no /boot/vmlinuz-*-cloud-amd64 (linux-image-cloud-amd64)")?;
        let version = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .ok_or("kernel name")?
            .to_owned();
        let modules = Path::new("/lib/modules").join(&version);
        if !modules.join("modules.dep").is_file() {
            return Err(format!("{} has no modules.dep", modules.display()));
        }
        fs::File::open(&kernel).map_err(|e| format!("{}: {e}", kernel.display()))?;
        let busybox = which("busybox")?;
        let static_busybox = run("ldd", &[p(&busybox)]);
        if static_busybox.status.success() {
            return Err(format!(
                "{} is dynamically linked (busybox-static)",
                busybox.display()
            ));
        }
        Ok(Self {
            qemu: which("qemu-system-x86_64")?,
            kernel,
            modules,
            busybox,
            mke2fs: which("mke2fs")?,
        })
    }
}

/// The kit, or a loud skip (a failure when `QCOW2_REQUIRE_GUEST` is set).
fn kit() -> Option<Kit> {
    match Kit::find() {
        Ok(kit) => Some(kit),
        Err(why) if std::env::var_os("QCOW2_REQUIRE_GUEST").is_some() => {
            panic!("QCOW2_REQUIRE_GUEST is set but the guest cannot run: {why}")
        }
        Err(why) => {
            eprintln!("\n*** SKIPPED: {why}; the real-guest test did not run ***\n");
            None
        }
    }
}

/// A `newc` cpio archive, the initramfs format.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    /// A host file at `name` in the archive, with its parent directories.
    fn file(&mut self, name: &str, data: &[u8], dirs: &mut BTreeSet<String>) {
        let mut parent = String::new();
        for part in name.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if dirs.insert(parent.clone()) {
                self.dir(&parent);
            }
        }
        self.entry(name, 0o100755, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

/// The kernel modules (file names under the modules directory) that give
/// the guest virtio disks, dependencies first, as `modprobe` orders them.
fn virtio_modules(modules: &Path) -> Vec<String> {
    let dep = fs::read_to_string(modules.join("modules.dep")).unwrap();
    let deps_of = |name: &str| -> Option<Vec<String>> {
        dep.lines().find_map(|line| {
            let (module, deps) = line.split_once(':')?;
            let file = module.rsplit('/').next()?;
            (file.split('.').next()? == name).then(|| {
                let mut order: Vec<String> =
                    deps.split_whitespace().rev().map(str::to_owned).collect();
                order.push(module.to_owned());
                order
            })
        })
    };
    let mut out: Vec<String> = Vec::new();
    for name in ["virtio_pci", "virtio_blk"] {
        // Built in when modules.dep does not list it.
        for module in deps_of(name).unwrap_or_default() {
            if !out.contains(&module) {
                out.push(module);
            }
        }
    }
    out
}

/// A module's object, decompressed when the kernel ships it compressed.
fn module_bytes(path: &Path) -> Vec<u8> {
    let name = p(path);
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => fs::read(path).unwrap(),
        Some(tool) => {
            let out = run(tool, &["-dc", name]);
            assert!(out.status.success(), "{tool} -dc {name} failed");
            out.stdout
        }
    }
}

/// The guest's `/init`: finds its two disks by serial, then runs the
/// workload the kernel command line names (`qcow2test=MODE`), reporting
/// each step on the serial console as an `@@` line.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
fail() { echo "@@FAIL $*"; poweroff -f; }
MODE=$(sed -n 's/.*qcow2test=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
[ "$MODE" = probe ] && { echo "@@BOOTED"; poweroff -f; }
for m in $(cat /modules.order); do insmod "/$m" || fail "insmod $m"; done
for try in 1 2 3 4 5 6 7 8 9 10; do
  for d in /sys/block/vd*; do
    case "$(cat $d/serial 2>/dev/null)" in
      source) SRC=/dev/${d##*/};; target) TGT=/dev/${d##*/};;
    esac
  done
  [ -n "$SRC" ] && [ -n "$TGT" ] && break
  sleep 0.5
done
[ -n "$SRC" ] && [ -n "$TGT" ] || fail "disks not found"
mkdir -p /mnt/s /mnt/t
mount -t ext4 -o ro "$SRC" /mnt/s || fail "mount source"
fresh() {
  /sbin/mke2fs -q -t ext4 "$TGT" || fail mkfs
  mount -t ext4 "$TGT" /mnt/t || fail "mount target"
}
case "$MODE" in
full)
  fresh
  dd if=/dev/urandom of=/mnt/t/scratch bs=1M count=@SCRATCH@ 2>/dev/null || fail scratch
  sync; rm /mnt/t/scratch; fstrim /mnt/t || fail "fstrim scratch"
  cp -a /mnt/s/files /mnt/t/copy1 || fail copy1
  cp -a /mnt/s/files /mnt/t/copy2 || fail copy2
  sync; fstrim /mnt/t || fail "fstrim peak"
  diff -r /mnt/s/files /mnt/t/copy2 >/dev/null || fail "copy2 differs"
  echo "@@PEAK"; read go
  rm -rf /mnt/t/copy2; sync; fstrim /mnt/t || fail "fstrim after delete"
  echo "@@USED_KIB $(df -k /mnt/t | tail -1 | awk '{print $3}')"
  umount /mnt/t || fail umount;;
crash)
  fresh
  cp -a /mnt/s/files /mnt/t/copy1 || fail copy1
  sync
  echo "@@SYNCED"
  i=2; while :; do cp -a /mnt/s/files /mnt/t/copy$i; i=$((i+1)); done;;
recover)
  mount -t ext4 "$TGT" /mnt/t || fail "mount after the crash"
  dmesg | grep -q "recovery complete" && echo "@@JOURNAL_REPLAYED"
  diff -r /mnt/s/files /mnt/t/copy1 >/dev/null || fail "synced copy1 differs after the crash"
  umount /mnt/t || fail umount;;
*) fail "mode $MODE";;
esac
echo "@@DONE"
poweroff -f
"#;

/// The initramfs: static busybox, the init script, the virtio modules and
/// the host's mke2fs with its libraries.
fn build_initramfs(kit: &Kit, out: &Path) {
    let mut cpio = Cpio::default();
    let mut dirs = BTreeSet::new();
    for dir in ["bin", "dev", "proc", "sys", "mnt", "etc", "sbin"] {
        dirs.insert(dir.to_owned());
        cpio.dir(dir);
    }
    let init = INIT.replace("@SCRATCH@", &SCRATCH_MIB.to_string());
    cpio.entry("init", 0o100755, init.as_bytes());
    cpio.file("bin/busybox", &fs::read(&kit.busybox).unwrap(), &mut dirs);
    let modules = virtio_modules(&kit.modules);
    let mut order = String::new();
    for module in &modules {
        let stored = module.trim_end_matches(".xz").trim_end_matches(".zst");
        let name = format!("modules/{stored}");
        cpio.file(&name, &module_bytes(&kit.modules.join(module)), &mut dirs);
        order.push_str(&name);
        order.push('\n');
    }
    cpio.entry("modules.order", 0o100644, order.as_bytes());
    cpio.file("sbin/mke2fs", &fs::read(&kit.mke2fs).unwrap(), &mut dirs);
    let ldd = ok("ldd", &[p(&kit.mke2fs)]);
    for lib in ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .collect::<BTreeSet<_>>()
    {
        let bytes = fs::read(lib).unwrap();
        cpio.file(lib.trim_start_matches('/'), &bytes, &mut dirs);
    }
    if let Ok(conf) = fs::read("/etc/mke2fs.conf") {
        cpio.file("etc/mke2fs.conf", &conf, &mut dirs);
    }
    fs::write(out, cpio.finish()).unwrap();
}

/// Copies up to [`MAX_FILES`] real files of this machine (documentation,
/// Perl and Python libraries) under `stage/files`, and returns their paths
/// relative to `stage/files`.
fn stage_real_files(stage: &Path) -> Vec<PathBuf> {
    let files = stage.join("files");
    let mut picked = Vec::new();
    let mut bytes = 0u64;
    let mut pending: Vec<PathBuf> = ["/usr/share/doc", "/usr/share/perl5", "/usr/lib/python3"]
        .iter()
        .map(PathBuf::from)
        .rev()
        .collect();
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for path in entries.into_iter().rev() {
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() && meta.len() <= 1 << 20 {
                if picked.len() == MAX_FILES || bytes + meta.len() > MAX_BYTES {
                    continue;
                }
                let Ok(data) = fs::read(&path) else {
                    continue;
                };
                let relative = path.strip_prefix("/").unwrap().to_path_buf();
                let target = files.join(&relative);
                fs::create_dir_all(target.parent().unwrap()).unwrap();
                fs::write(&target, &data).unwrap();
                bytes += data.len() as u64;
                picked.push(relative);
            }
        }
    }
    assert!(
        picked.len() >= 1000,
        "only {} real files found to copy",
        picked.len()
    );
    eprintln!(
        "guest: {} real files, {:.1} MiB",
        picked.len(),
        bytes as f64 / (1 << 20) as f64
    );
    picked
}

/// `qcow2 serve` on a Unix socket, trims passed on as unmaps.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(image: &Path, socket: &Path) -> (Self, String) {
        let _ = fs::remove_file(socket);
        let mut child = Command::new(bin())
            .args(["serve", "-k", p(socket), "-t", "--discard=unmap", p(image)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !socket.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("qcow2 serve exited at start: {status}");
            }
            assert!(started.elapsed() < Duration::from_secs(30), "serve slow");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever the server printed at its open (a recovery line).
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        let said = rx.try_iter().collect::<Vec<_>>().join("\n");
        (
            Self {
                child,
                socket: socket.to_owned(),
            },
            said,
        )
    }

    /// SIGTERM: requests in flight finish, the image closes cleanly.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(run("kill", &["-TERM", &pid]).status.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "qcow2 serve after SIGTERM: {status}");
    }

    /// SIGKILL: a crash.
    fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Which accelerator to use: KVM if a probe boot completes, else TCG.
fn accelerator(kit: &Kit, initrd: &Path) -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| {
        if fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return "tcg";
        }
        let mut vm = boot(kit, "kvm", initrd, "probe", &[]);
        let lines = collect_lines(&mut vm, Duration::from_secs(15));
        let _ = vm.kill();
        let _ = vm.wait();
        let accel = if lines.iter().any(|l| l.contains("@@BOOTED")) {
            "kvm"
        } else {
            "tcg"
        };
        eprintln!("guest: accelerator {accel}");
        accel
    })
}

/// Starts the guest; its serial console is on the child's stdin/stdout.
fn boot(kit: &Kit, accel: &str, initrd: &Path, mode: &str, disks: &[String]) -> Child {
    let append = format!("console=ttyS0 panic=-1 quiet qcow2test={mode}");
    let mut args: Vec<String> = [
        "-accel",
        accel,
        "-m",
        "512",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        "-kernel",
        p(&kit.kernel),
        "-initrd",
        p(initrd),
        "-append",
        &append,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(disks.iter().cloned());
    Command::new(&kit.qemu)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Console lines until the guest exits or `limit` passes.
fn collect_lines(vm: &mut Child, limit: Duration) -> Vec<String> {
    let rx = console(vm);
    let deadline = Instant::now() + limit;
    let mut lines = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    lines
}

/// The guest's console output, a line at a time.
fn console(vm: &mut Child) -> Receiver<String> {
    let stdout = vm.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The QEMU options for the guest's two disks: the served image as
/// virtio with trims passed on (the README's `-blockdev` line) and the
/// source files read-only.
fn disks(socket: &Path, source: &Path) -> Vec<String> {
    [
        "-blockdev",
        &format!(
            "driver=nbd,node-name=target,server.type=unix,server.path={},discard=unmap,cache.direct=on",
            p(socket)
        ),
        "-device",
        "virtio-blk-pci,drive=target,serial=target",
        "-drive",
        &format!(
            "file={},format=raw,if=none,id=source,readonly=on",
            p(source)
        ),
        "-device",
        "virtio-blk-pci,drive=source,serial=source",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs one boot to its end, handing each `@@` line to `on_marker` (which
/// may answer on the console). Panics with the transcript on `@@FAIL`, a
/// deadline or an exit before `@@DONE` unless `on_marker` returned false
/// (the guest was killed on purpose).
fn drive(mut vm: Child, mut on_marker: impl FnMut(&str, &mut ChildStdin) -> bool) -> Vec<String> {
    let rx = console(&mut vm);
    let mut stdin = vm.stdin.take().unwrap();
    let deadline = Instant::now() + BOOT_DEADLINE;
    let mut transcript = Vec::new();
    let mut done = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                transcript.push(line.clone());
                if line.contains("@@FAIL") {
                    let _ = vm.kill();
                    panic!("guest failed: {line}\n{}", transcript.join("\n"));
                }
                if line.contains("@@DONE") {
                    done = true;
                }
                if let Some(at) = line.find("@@") {
                    if !on_marker(&line[at + 2..], &mut stdin) {
                        let _ = vm.kill();
                        let _ = vm.wait();
                        return transcript;
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = vm.kill();
                panic!(
                    "guest took over {BOOT_DEADLINE:?}:\n{}",
                    transcript.join("\n")
                );
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = vm.wait().unwrap();
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut vm.stderr.take().unwrap(), &mut stderr);
    assert!(
        done && status.success(),
        "guest ended ({status}) before @@DONE: {stderr}\n{}",
        transcript.join("\n")
    );
    transcript
}

/// The dedup ratio (guest references per stored cluster) `qcow2 info -U`
/// reads off the image while the server has it open.
fn dedup_ratio(image: &Path) -> f64 {
    let json: serde_json::Value =
        serde_json::from_str(&ok(bin(), &["info", "-U", "--output", "json", p(image)])).unwrap();
    let stats = &json["format-specific"]["data"]["dedup-stats"];
    let references = stats["references"].as_f64().unwrap();
    let unique = stats["unique-clusters"].as_f64().unwrap();
    references / unique
}

/// Bytes the file occupies on disk.
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// Host-side checks of a closed image: both tools call it clean, QEMU
/// reads it as a file system e2fsck calls clean, and `/copy1` in it holds
/// every staged file byte for byte.
fn check_host_side(image: &Path, dir: &Path, stage: &Path, files: &[PathBuf]) {
    let check = qcow2(&["check", p(image)]);
    assert!(
        check.status.success(),
        "qcow2 check: {}",
        text(&check.stdout)
    );
    assert_qemu_sees_only_dedup_metadata_leaked(image);
    let raw = dir.join("guest.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(image), p(&raw)]);
    let fsck = run("e2fsck", &["-fn", p(&raw)]);
    assert_eq!(
        fsck.status.code(),
        Some(0),
        "e2fsck -fn: {}{}",
        text(&fsck.stdout),
        text(&fsck.stderr)
    );
    let dump = dir.join("dump");
    let _ = fs::remove_dir_all(&dump);
    fs::create_dir(&dump).unwrap();
    let out = run(
        "debugfs",
        &["-R", &format!("rdump /copy1 {}", p(&dump)), p(&raw)],
    );
    assert!(out.status.success(), "debugfs: {}", text(&out.stderr));
    for file in files {
        let want = fs::read(stage.join("files").join(file)).unwrap();
        let got = fs::read(dump.join("copy1").join(file))
            .unwrap_or_else(|e| panic!("{} missing in the guest's copy: {e}", file.display()));
        assert!(
            got == want,
            "{} differs in the guest's copy",
            file.display()
        );
    }
    fs::remove_file(&raw).unwrap();
    fs::remove_dir_all(&dump).unwrap();
}

/// `qemu-img check` finds no corruption, and as leaks exactly the dedup
/// table's clusters (QEMU does not know the extension; DESIGN.md).
fn assert_qemu_sees_only_dedup_metadata_leaked(image: &Path) {
    let opened = qcow2_io::Image::open(image, &qcow2_io::OpenOptions::read_only()).unwrap();
    let cluster_size = opened.cluster_size();
    let table: BTreeSet<u64> = opened
        .dedup()
        .table_clusters()
        .iter()
        .map(|c| c.get())
        .collect();
    drop(opened);
    let out = run("qemu-img", &["check", p(image)]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!said.contains("ERROR"), "qemu-img check: {said}");
    let leaked: BTreeSet<u64> = said
        .lines()
        .filter_map(|l| l.strip_prefix("Leaked cluster "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(
        leaked, table,
        "qemu-img check's leaks must be the dedup table's clusters ({cluster_size} B each): {said}"
    );
    assert_eq!(out.status.code(), Some(3), "leaks only: {said}");
}

/// The source disk: an ext4 image of the staged files, made on the host.
fn source_disk(kit: &Kit, stage: &Path, out: &Path) {
    fs::File::create(out)
        .unwrap()
        .set_len(3 * MAX_BYTES + (64 << 20))
        .unwrap();
    ok(
        p(&kit.mke2fs),
        &["-q", "-t", "ext4", "-d", p(stage), p(out)],
    );
}

struct Setup {
    kit: Kit,
    dir: tempfile::TempDir,
    initrd: PathBuf,
    source: PathBuf,
    stage: PathBuf,
    files: Vec<PathBuf>,
    accel: &'static str,
}

fn setup() -> Option<Setup> {
    let kit = kit()?;
    if !tools(&["qemu-img"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.cpio");
    build_initramfs(&kit, &initrd);
    let stage = dir.path().join("stage");
    let files = stage_real_files(&stage);
    let source = dir.path().join("source.img");
    source_disk(&kit, &stage, &source);
    let accel = accelerator(&kit, &initrd);
    Some(Setup {
        kit,
        dir,
        initrd,
        source,
        stage,
        files,
        accel,
    })
}

fn new_dedup_image(path: &Path) {
    ok(
        bin(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "dedup=on,cluster_size=4k",
            p(path),
            "1G",
        ],
    );
}

/// The issue's workload: ext4, the files copied twice, trims, one copy
/// deleted; checked from the host afterwards.
#[test]
fn a_linux_guest_on_a_dedup_image_keeps_its_files_and_gives_trimmed_space_back() {
    let Some(s) = setup() else { return };
    let image = s.dir.path().join("guest.qcow2");
    let socket = s.dir.path().join("guest.sock");
    new_dedup_image(&image);
    let (server, said) = Server::start(&image, &socket);
    assert!(said.is_empty(), "a fresh image needs no recovery: {said}");
    let started = Instant::now();
    let mut peak_ratio = 0.0;
    let mut peak_usage = 0;
    let mut used_kib = 0u64;
    let vm = boot(
        &s.kit,
        s.accel,
        &s.initrd,
        "full",
        &disks(&server.socket, &s.source),
    );
    drive(vm, |marker, console| {
        if marker.starts_with("PEAK") {
            peak_ratio = dedup_ratio(&image);
            peak_usage = disk_usage(&image);
            console.write_all(b"go\n").unwrap();
        } else if let Some(kib) = marker.strip_prefix("USED_KIB ") {
            used_kib = kib.trim().parse().unwrap();
        }
        true
    });
    let boot_time = started.elapsed();
    server.stop();
    let live = used_kib << 10;
    let usage = disk_usage(&image);
    eprintln!(
        "guest ({}): boot and workload {:.1} s; dedup ratio at the peak {peak_ratio:.2}; \
         image on disk {:.1} MiB at the peak, {:.1} MiB at the end; guest file system uses {:.1} MiB",
        s.accel,
        boot_time.as_secs_f64(),
        peak_usage as f64 / (1 << 20) as f64,
        usage as f64 / (1 << 20) as f64,
        live as f64 / (1 << 20) as f64
    );
    assert!(peak_ratio >= 1.9, "dedup ratio at the peak {peak_ratio:.2}");
    assert!(live > 0, "the guest reported no usage");
    // The 64 MiB scratch file was trimmed before the copies: were its
    // clusters kept, the image would be that much over the live data.
    assert!(
        usage <= live + live / 5 + (8 << 20),
        "image uses {usage} bytes on disk for {live} bytes of live data"
    );
    check_host_side(&image, s.dir.path(), &s.stage, &s.files);
}

/// `kill -9` of the server in the middle of a copy: the restarted server
/// says it recovered, the guest's journal replays, and everything synced
/// before the crash is intact.
#[test]
fn a_server_killed_mid_copy_loses_nothing_the_guest_synced() {
    let Some(s) = setup() else { return };
    let image = s.dir.path().join("crash.qcow2");
    let socket = s.dir.path().join("crash.sock");
    new_dedup_image(&image);
    let (server, _) = Server::start(&image, &socket);
    let mut server = Some(server);
    let vm = boot(
        &s.kit,
        s.accel,
        &s.initrd,
        "crash",
        &disks(&socket, &s.source),
    );
    let mut crashed = false;
    drive(vm, |marker, _| {
        if marker.starts_with("SYNCED") {
            // Let the second copy get going, then pull the plug.
            std::thread::sleep(Duration::from_millis(1500));
            server.take().unwrap().crash();
            crashed = true;
            return false;
        }
        true
    });
    assert!(crashed, "the guest never reported its synced copy");
    let (server, said) = Server::start(&image, &socket);
    assert!(
        said.contains("was not closed cleanly") && said.contains("flushed data is intact"),
        "the restarted server must say it recovered the image: {said:?}"
    );
    let mut replayed = false;
    let vm = boot(
        &s.kit,
        s.accel,
        &s.initrd,
        "recover",
        &disks(&socket, &s.source),
    );
    drive(vm, |marker, _| {
        replayed |= marker.starts_with("JOURNAL_REPLAYED");
        true
    });
    assert!(replayed, "the guest's journal did not need a replay");
    server.stop();
    check_host_side(&image, s.dir.path(), &s.stage, &s.files);
}
