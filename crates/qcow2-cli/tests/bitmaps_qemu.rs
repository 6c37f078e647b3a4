//! Persistent dirty bitmaps against QEMU, through the CLI and `qcow2
//! serve`: `qcow2 info` lists them as qemu-img does; `qcow2 bitmap` and
//! `qemu-img bitmap` give the same results on twin images, step by step
//! (errors included); `convert --bitmaps` copies what qemu-img copies;
//! bitmaps stay true through the server, and a backup tool's incremental
//! round trip over `qcow2 serve -B` restores the disk exactly; several
//! metadata contexts answer in one request as qemu-nbd answers them; a
//! killed server leaves the bitmap inconsistent, and both tools agree on
//! what repairs and what removes it.

mod common;

use common::server::Server;
use common::*;

use std::path::Path;

/// The bitmaps as `qemu-img info --output=json` lists them (`null` when
/// there are none).
fn bitmaps_json(path: &Path) -> serde_json::Value {
    let json = ok("qemu-img", &["info", "-U", "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["format-specific"]["data"]["bitmaps"].clone()
}

fn names(path: &Path) -> Vec<String> {
    bitmaps_json(path)
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

/// `nbdinfo --map=CONTEXT` of `server`.
fn map(server: &Server, context: &str) -> String {
    ok("nbdinfo", &[&format!("--map={context}"), &server.uri()])
}

/// What QEMU reads in bitmap `name` of the closed image at `path`.
fn qemu_map(path: &Path, name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::qemu_nbd(path, &dir.path().join("q.sock"), &["-r", "-t", "-B", name]);
    let out = map(&server, &format!("qemu:dirty-bitmap:{name}"));
    server.kill();
    out
}

/// Every bitmap's dirty map, by name.
fn all_maps(path: &Path) -> Vec<(String, String)> {
    names(path)
        .into_iter()
        .map(|n| {
            let m = qemu_map(path, &n);
            (n, m)
        })
        .collect()
}

/// Debian's python3, which has libnbd's bindings (a python3 earlier on
/// the PATH, such as a pyenv one, may not: `nbdsh` itself would run that).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// `nbdsh ARGS`, run with the system python.
fn nbdsh(args: &[&str]) -> String {
    let mut full = vec!["-m", "nbd"];
    full.extend_from_slice(args);
    ok(SYSTEM_PYTHON, &full)
}

fn nbd_tools() -> bool {
    if !tools(&["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"]) {
        return false;
    }
    let bindings = run(SYSTEM_PYTHON, &["-c", "import nbd"]).status.success();
    if !bindings && std::env::var_os("QCOW2_REQUIRE_QEMU").is_some() {
        panic!("nbdsh (python3-libnbd) required (QCOW2_REQUIRE_QEMU is set) but not installed");
    }
    if !bindings {
        eprintln!("\n*** SKIPPED: nbdsh (python3-libnbd) not installed; test did not run ***\n");
    }
    bindings
}

#[test]
fn bitmaps_made_by_qemu_are_listed_and_kept_by_our_writes() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("b.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&image), "64M"],
    );
    ok("qemu-io", &["-c", "write -P 1 0 1M", p(&image)]);
    ok("qemu-img", &["bitmap", "--add", p(&image), "tracked"]);
    ok(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "-g",
            "1M",
            "--disable",
            p(&image),
            "frozen",
        ],
    );
    for args in [&["info"][..], &["info", "--output=json"]] {
        let mut full = args.to_vec();
        full.push(p(&image));
        assert_eq!(ok(bin(), &full), ok("qemu-img", &full), "{args:?}");
    }
    // Reading changes nothing.
    let before = std::fs::read(&image).unwrap();
    let raw = dir.path().join("out.raw");
    ok(bin(), &["convert", "-O", "raw", p(&image), p(&raw)]);
    ok(bin(), &["check", p(&image)]);
    assert!(std::fs::read(&image).unwrap() == before, "a read wrote");
    // A write of the whole disk: the enabled bitmap marks all of it, the
    // disabled one nothing; both consistent once the image is closed.
    let data = dir.path().join("in.raw");
    std::fs::write(&data, vec![7u8; 64 << 20]).unwrap();
    ok(
        bin(),
        &["convert", "-n", "-O", "qcow2", p(&data), p(&image)],
    );
    assert_eq!(
        bitmaps_json(&image),
        serde_json::json!([
            {"flags": ["auto"], "name": "tracked", "granularity": 65536},
            {"flags": [], "name": "frozen", "granularity": 1048576}
        ])
    );
    assert!(qemu_map(&image, "tracked").starts_with("         0    67108864    1  dirty"));
    assert!(qemu_map(&image, "frozen").starts_with("         0    67108864    0  clean"));
    assert_qemu_clean(&image, "after our write");
    // A writer that cleared the bitmaps autoclear bit left the extension
    // invalid: its clusters are leaks, to qemu-img and to us alike.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    f.write_all_at(&0u64.to_be_bytes(), 88).unwrap();
    let codes = [
        run("qemu-img", &["check", p(&image)]).status.code(),
        qcow2(&["check", p(&image)]).status.code(),
    ];
    assert_eq!(codes, [Some(3), Some(3)], "leaks, as qemu-img says");
}

#[test]
fn bitmap_commands_give_qemu_imgs_results_step_by_step() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    let other = dir.path().join("other.qcow2");
    for path in [&ours, &theirs] {
        ok("qemu-img", &["create", "-q", "-f", "qcow2", p(path), "32M"]);
    }
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&other), "32M"],
    );
    ok("qemu-img", &["bitmap", "--add", "-g", "8k", p(&other), "x"]);
    ok("qemu-io", &["-c", "write 30M 4k", p(&other)]);
    let writes = |n: u64| format!("write -P {n} {}M {}k", n % 30, 4 * n + 1);
    let steps: Vec<(Vec<&str>, Option<String>)> = vec![
        (vec!["--add"], None),
        (vec!["--add", "-g", "4k", "--disable"], None),
        (vec!["--add"], None),
        (vec!["--remove"], None),
        (vec!["--clear"], Some(writes(3))),
        (vec!["--enable"], Some(writes(5))),
        (vec!["--disable"], Some(writes(7))),
        (vec!["--merge", "x", "-b", p(&other)], None),
        (vec!["-g", "4k", "--clear"], None),
        (vec!["--add", "-g", "1000"], None),
        (vec!["--clear", "--enable"], Some(writes(11))),
        (vec!["--remove"], None),
        (vec!["--add", "-g", "64k"], Some(writes(13))),
    ];
    let bitmap_of = |step: usize| {
        [
            "a", "b", "a", "zz", "a", "b", "a", "b", "a", "c", "b", "a", "a",
        ][step]
    };
    for (i, (args, write)) in steps.iter().enumerate() {
        let mut codes = Vec::new();
        for (program, path) in [(bin(), &ours), ("qemu-img", &theirs)] {
            let mut full = vec!["bitmap"];
            full.extend(args.iter().copied());
            full.extend([p(path), bitmap_of(i)]);
            codes.push(run(program, &full).status.code());
            if let Some(w) = write {
                ok("qemu-io", &["-c", w, p(path)]);
            }
        }
        assert_eq!(codes[0], codes[1], "step {i} {args:?}: exit codes");
        assert_eq!(
            bitmaps_json(&ours),
            bitmaps_json(&theirs),
            "step {i} {args:?}: bitmaps"
        );
        assert_eq!(
            all_maps(&ours),
            all_maps(&theirs),
            "step {i} {args:?}: bits"
        );
        assert_qemu_clean(&ours, &format!("step {i}"));
    }
    // compat=0.10 cannot hold bitmaps, for either tool.
    let v2 = dir.path().join("v2.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            p(&v2),
            "1M",
        ],
    );
    let codes: Vec<_> = [bin(), "qemu-img"]
        .iter()
        .map(|t| run(t, &["bitmap", "--add", p(&v2), "a"]).status.code())
        .collect();
    assert_eq!(codes, [Some(1), Some(1)]);
}

#[test]
fn convert_copies_bitmaps_as_qemu_img_does() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&src), "16M"]);
    ok("qemu-img", &["bitmap", "--add", "-g", "4k", p(&src), "on"]);
    ok("qemu-io", &["-c", "write -P 1 1M 12k", p(&src)]);
    ok(
        "qemu-img",
        &["bitmap", "--add", "--disable", p(&src), "off"],
    );
    ok("qemu-img", &["bitmap", "--merge", "on", p(&src), "off"]);
    ok("qemu-io", &["-c", "write -P 2 5M 1k", p(&src)]);
    let cases: [&[&str]; 5] = [
        &["--bitmaps"],
        &["--bitmaps", "--skip-broken-bitmaps"],
        &[],
        &["--skip-broken-bitmaps"],
        &["--bitmaps", "-O", "raw"],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let ours = dir.path().join(format!("ours{i}"));
        let theirs = dir.path().join(format!("theirs{i}"));
        let mut codes = Vec::new();
        for (program, target) in [(bin(), &ours), ("qemu-img", &theirs)] {
            let mut args = vec!["convert", "-O", "qcow2"];
            args.extend(extra.iter().copied());
            args.extend([p(&src), p(target)]);
            codes.push(run(program, &args).status.code());
        }
        assert_eq!(codes[0], codes[1], "{extra:?}");
        if codes[0] == Some(0) && !extra.contains(&"raw") {
            assert_eq!(bitmaps_json(&ours), bitmaps_json(&theirs), "{extra:?}");
            assert_eq!(all_maps(&ours), all_maps(&theirs), "{extra:?}");
            assert_identical(&ours, &src, "convert");
        }
    }
    // An inconsistent bitmap refuses the copy, unless skipped.
    // qemu-io kills itself (SIGKILL): its bitmaps stay in use.
    run(
        "qemu-io",
        &["-c", "write 0 512", "-c", "sigraise 9", p(&src)],
    );
    for extra in [&["--bitmaps"][..], &["--bitmaps", "--skip-broken-bitmaps"]] {
        let mut codes = Vec::new();
        for (program, name) in [(bin(), "o"), ("qemu-img", "t")] {
            let target = dir.path().join(format!("broken-{name}-{}", extra.len()));
            let mut args = vec!["convert", "-O", "qcow2"];
            args.extend(extra.iter().copied());
            args.extend([p(&src), p(&target)]);
            codes.push(run(program, &args).status.code());
            if codes.last() == Some(&Some(0)) {
                assert_eq!(bitmaps_json(&target), serde_json::Value::Null);
            }
        }
        assert_eq!(codes[0], codes[1], "{extra:?}");
    }
}

/// The extents a backup tool reads: `(offset, length)` of every dirty run.
fn dirty_runs(map: &str) -> Vec<(u64, u64)> {
    map.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(2) == Some(&"1")).then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect()
}

#[test]
fn an_incremental_backup_over_the_server_restores_the_disk() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let backup = dir.path().join("backup.raw");
    let socket = dir.path().join("s.sock");
    ok(
        bin(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096,dedup=on",
            p(&disk),
            "64M",
        ],
    );
    ok(bin(), &["bitmap", "--add", "-g", "16k", p(&disk), "bm0"]);
    // The day's work, then the full backup.
    let server = Server::start(&disk, &socket, &["-t", "-e", "4"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 8M",
            "-c",
            "write -P 2 20M 3M",
            &server.uri(),
        ],
    );
    ok("nbdcopy", &[&server.uri(), p(&backup)]);
    server.stop();
    ok(bin(), &["bitmap", "--clear", p(&disk), "bm0"]);
    // More writes through the server; the backup tool asks what changed.
    let server = Server::start(
        &disk,
        &socket,
        &["-t", "-e", "4", "--discard=unmap", "-B", "bm0"],
    );
    let uri = server.uri();
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 3 1M 5k",
            "-c",
            "write -P 1 40M 64k",
            "-c",
            "write -z 21M 100k",
            "-c",
            "discard 22M 64k",
            "-c",
            "write -P 4 63M 17",
            &uri,
        ],
    );
    let dirty = dirty_runs(&map(&server, "qemu:dirty-bitmap:bm0"));
    let expected_writes: [(u64, u64); 5] = [
        (1 << 20, 5 << 10),
        (40 << 20, 64 << 10),
        (21 << 20, 100 << 10),
        (22 << 20, 64 << 10),
        (63 << 20, 17),
    ];
    let covered = |off: u64, len: u64| dirty.iter().any(|&(s, l)| s <= off && off + len <= s + l);
    for (off, len) in expected_writes {
        assert!(covered(off, len), "write at {off}+{len} not in {dirty:?}");
    }
    let marked: u64 = dirty.iter().map(|(_, l)| l).sum();
    assert!(
        marked <= (5 * 128) << 10,
        "{marked} bytes marked for ~300 KiB written"
    );
    // Copy only those extents onto the backup, as a backup tool does.
    let ranges: Vec<String> = dirty.iter().map(|(o, l)| format!("({o},{l})")).collect();
    let script = format!(
        "import os\nfd = os.open({:?}, os.O_WRONLY)\nfor (o, l) in [{}]:\n    os.pwrite(fd, h.pread(l, o), o)\nos.close(fd)\n",
        p(&backup),
        ranges.join(",")
    );
    nbdsh(&["-u", &uri, "-c", &script]);
    server.stop();
    assert_identical(&backup, &disk, "the incremental backup");
    assert_eq!(
        bitmaps_json(&disk),
        serde_json::json!([{"flags": ["auto"], "name": "bm0", "granularity": 16384}])
    );
}

#[test]
fn several_contexts_answer_in_one_request_as_qemu_nbd_answers() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&base), "16M"],
    );
    ok("qemu-io", &["-c", "write -P 1 0 2M", p(&base)]);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
            "16M",
        ],
    );
    ok("qemu-img", &["bitmap", "--add", "-g", "4k", p(&top), "b1"]);
    ok("qemu-img", &["bitmap", "--add", p(&top), "b2"]);
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 2 1M 8k",
            "-c",
            "write -z 512k 64k",
            "-c",
            "write 9M 1k",
            p(&top),
        ],
    );
    let script = "\
h.add_meta_context('base:allocation')
h.add_meta_context('qemu:allocation-depth')
h.add_meta_context('qemu:dirty-bitmap:b1')
h.add_meta_context('qemu:dirty-bitmap:b2')
h.connect_uri(uri)
seen = {}
def cb(ctx, off, entries, err):
    seen[ctx] = list(entries)
for (o, l) in [(0, 16 << 20), (1 << 20, 4096), (500 << 10, 3 << 20)]:
    seen.clear()
    h.block_status(l, o, cb)
    for k in sorted(seen):
        print(o, l, k, seen[k])
    seen.clear()
    h.block_status(l, o, cb, flags=nbd.CMD_FLAG_REQ_ONE)
    for k in sorted(seen):
        print('one', o, l, k, seen[k])
";
    let mut answers = Vec::new();
    for qemu in [false, true] {
        let socket = dir.path().join(format!("s{qemu}.sock"));
        let args = ["-r", "-t", "-A", "-B", "b1", "-B", "b2"];
        let server = if qemu {
            Server::qemu_nbd(&top, &socket, &args)
        } else {
            Server::start(&top, &socket, &args)
        };
        let full = format!("uri = {:?}\n{script}", server.uri());
        answers.push(nbdsh(&["-c", &full]));
        server.kill();
    }
    assert!(
        answers[0].contains("qemu:dirty-bitmap:b1"),
        "{}",
        answers[0]
    );
    assert_eq!(answers[0], answers[1]);
}

#[test]
fn a_killed_server_leaves_the_bitmap_inconsistent_as_qemu_would() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let socket = dir.path().join("s.sock");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&disk), "16M"],
    );
    ok("qemu-img", &["bitmap", "--add", p(&disk), "bm0"]);
    let server = Server::start(&disk, &socket, &["-t", "-B", "bm0"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "flush",
            &server.uri(),
        ],
    );
    server.kill();
    assert_eq!(
        bitmaps_json(&disk),
        serde_json::json!([{"flags": ["in-use", "auto"], "name": "bm0", "granularity": 65536}])
    );
    // Neither server exports it now.
    let refused = |program: &str, args: &[&str]| !run(program, args).status.success();
    assert!(refused(
        bin(),
        &["serve", "-k", p(&socket), "-B", "bm0", p(&disk)]
    ));
    assert!(refused(
        "qemu-nbd",
        &["-r", "-f", "qcow2", "-k", p(&socket), "-B", "bm0", p(&disk)]
    ));
    let _ = std::fs::remove_file(&socket);
    // `check -r all` repairs the image and keeps the bitmap in use, in
    // both tools (QEMU leaves removing it to the user).
    let twin = dir.path().join("twin.qcow2");
    std::fs::copy(&disk, &twin).unwrap();
    let ours = qcow2(&["check", "-r", "all", p(&disk)]);
    let theirs = run("qemu-img", &["check", "-r", "all", p(&twin)]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(bitmaps_json(&disk), bitmaps_json(&twin));
    ok(bin(), &["bitmap", "--remove", p(&disk), "bm0"]);
    assert_eq!(bitmaps_json(&disk), serde_json::Value::Null);
    assert_qemu_clean(&disk, "after the removal");
    let cmp = dir.path().join("expected.raw");
    let mut bytes = vec![0u8; 16 << 20];
    bytes[..65536].fill(1);
    std::fs::write(&cmp, bytes).unwrap();
    assert_identical(&disk, &cmp, "the flushed write");
}

#[test]
fn commit_sets_bits_as_qemu_and_snapshot_apply_sets_them_all() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (tool, name) in [(bin(), "ours"), ("qemu-img", "theirs")] {
        let base = dir.path().join(format!("{name}-base.qcow2"));
        let top = dir.path().join(format!("{name}-top.qcow2"));
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", p(&base), "16M"],
        );
        ok("qemu-img", &["bitmap", "--add", "-g", "4k", p(&base), "b"]);
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                p(&base),
                "-F",
                "qcow2",
                p(&top),
            ],
        );
        ok(
            "qemu-io",
            &[
                "-c",
                "write -P 1 1M 12k",
                "-c",
                "write -P 2 9M 64k",
                p(&top),
            ],
        );
        ok(tool, &["commit", "-q", p(&top)]);
        let committed = qemu_map(&base, "b");
        ok(tool, &["snapshot", "-c", "s", p(&base)]);
        ok(tool, &["bitmap", "--clear", p(&base), "b"]);
        let applied = run(tool, &["snapshot", "-a", "s", p(&base)]).status.code();
        assert_qemu_clean(&base, name);
        results.push((committed, applied, qemu_map(&base, "b")));
    }
    assert!(results[0].0.contains("1  dirty"), "{}", results[0].0);
    assert_eq!(results[0].0, results[1].0, "bits set by commit");
    // qemu-img refuses to apply a snapshot under an enabled bitmap (it
    // could not keep it true); we apply it and set every bit, since the
    // whole disk may read differently (README: deliberate differences).
    assert_eq!((results[0].1, results[1].1), (Some(0), Some(1)));
    assert!(
        results[0]
            .2
            .starts_with("         0    16777216    1  dirty"),
        "{}",
        results[0].2
    );
    assert!(results[1]
        .2
        .starts_with("         0    16777216    0  clean"));
}
