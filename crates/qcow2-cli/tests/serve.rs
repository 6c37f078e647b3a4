//! `qcow2 serve` with real NBD clients: qemu-io, qemu-img, nbdinfo,
//! nbdcopy and fio, plus a hand-written client for malformed input.

mod common;

use common::server::Server;
use common::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// qemu-io writes patterns, zeroes and discards into a served image while
/// a shadow file gets the same; the export and, after a clean stop, the
/// image itself compare identical to the shadow, and both checks agree.
#[test]
fn qemu_io_through_the_server_matches_a_shadow_file() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    for dedup in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.qcow2");
        let shadow = dir.path().join("shadow.raw");
        let options = if dedup {
            "dedup=on,cluster_size=4k"
        } else {
            "cluster_size=4k"
        };
        ok(bin(), &["create", "-q", "-o", options, p(&img), "32M"]);
        std::fs::write(&shadow, vec![0u8; 32 << 20]).unwrap();
        let server = Server::start(&img, &dir.path().join("s"), &["-t", "--discard=unmap"]);
        let mut commands = Vec::new();
        let mut state = 7u64;
        let mut next = |m: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 33) % m
        };
        for _ in 0..150 {
            let offset = next(32 << 20) & !511;
            let len = (next(256 << 10) + 512).min((32 << 20) - offset) & !511;
            let len = len.max(512);
            if offset + len > 32 << 20 {
                continue;
            }
            match next(10) {
                0..=5 => commands.push(format!("write -P {} {offset} {len}", next(4) + 1)),
                6..=7 => commands.push(format!("write -z {offset} {len}")),
                // A discard leaves partial clusters as they are (their
                // content is unspecified after a trim), so the shadow can
                // only follow discards of whole 4 KiB clusters.
                _ => {
                    let (start, end) = ((offset + 4095) & !4095, (offset + len) & !4095);
                    if end > start {
                        commands.push(format!("discard {start} {}", end - start));
                    }
                }
            }
        }
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for c in &commands {
            args.push("-c".into());
            args.push(c.clone());
        }
        let mut export_args = args.clone();
        export_args.push(server.uri());
        let a: Vec<&str> = export_args.iter().map(String::as_str).collect();
        ok("qemu-io", &a);
        let mut shadow_args = args.clone();
        shadow_args.push(p(&shadow).to_string());
        let a: Vec<&str> = shadow_args.iter().map(String::as_str).collect();
        ok("qemu-io", &a);
        let out = ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &server.uri(),
                p(&shadow),
            ],
        );
        assert!(out.contains("identical"), "dedup {dedup}: {out}");
        assert!(server.stop().success());
        let out = ok("qemu-img", &["compare", "-F", "raw", p(&img), p(&shadow)]);
        assert!(out.contains("identical"), "{out}");
        let ours = run(bin(), &["check", p(&img)]);
        assert_eq!(
            ours.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&ours.stdout)
        );
        let info: serde_json::Value =
            serde_json::from_str(&ok(bin(), &["info", "--output=json", p(&img)])).unwrap();
        assert_eq!(info["dirty-flag"], false, "closed cleanly");
        let theirs = run("qemu-img", &["check", p(&img)]);
        let text = String::from_utf8_lossy(&theirs.stdout).into_owned()
            + &String::from_utf8_lossy(&theirs.stderr);
        assert!(!text.contains("ERROR"), "{text}");
        if !dedup {
            assert_eq!(theirs.status.code(), Some(0), "{text}");
        }
    }
}

/// Two clients write the same 16 MiB at once, to two ranges of a served
/// dedup image: it is stored once.
#[test]
fn two_clients_writing_the_same_content_store_it_once() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    ok(bin(), &["create", "-q", "-o", "dedup=on", p(&img), "64M"]);
    let data = dir.path().join("data.raw");
    std::fs::write(&data, pattern(16 << 20, 3)).unwrap();
    let server = Server::start(&img, &dir.path().join("s"), &["-e", "2"]);
    let clients: Vec<_> = [0u64, 32 << 20]
        .into_iter()
        .map(|at| {
            let (uri, data) = (server.uri(), data.clone());
            std::thread::spawn(move || {
                let write = format!("write -s {} {at} 16M", p(&data));
                ok("qemu-io", &["-f", "raw", "-c", &write, &uri]);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert!(server.stop().success());
    let map: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["map", "--output=json", p(&img)])).unwrap();
    let mut hosts = std::collections::BTreeSet::new();
    let mut mapped = 0;
    for e in map.as_array().unwrap() {
        if e["data"] == true {
            let (len, offset) = (e["length"].as_u64().unwrap(), e["offset"].as_u64().unwrap());
            mapped += len;
            for i in 0..len / 65536 {
                hosts.insert(offset + i * 65536);
            }
        }
    }
    assert_eq!(mapped, 32 << 20, "both ranges hold data");
    assert_eq!(hosts.len(), 256, "16 MiB of 64 KiB clusters, stored once");
}

/// Holes and zero clusters are holes to qemu-img map and nbdinfo --map,
/// exactly where `qcow2 map` shows them; nbdinfo shows the export; nbdcopy
/// copies the export out and back unchanged.
#[test]
fn block_status_and_libnbd_clients_agree_with_qcow2_map() {
    if !tools(&["qemu-img", "qemu-io", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    ok(bin(), &["create", "-q", p(&img), "16M"]);
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 5 0 1M",
            "-c",
            "write -z 2M 1M",
            "-c",
            "write -P 6 5M 64k",
            p(&img),
        ],
    );
    let ours: serde_json::Value =
        serde_json::from_str(&ok(bin(), &["map", "--output=json", p(&img)])).unwrap();
    let data_ranges = |v: &serde_json::Value| -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in v.as_array().unwrap() {
            if e["data"] == true {
                let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                match out.last_mut() {
                    Some(last) if last.1 == s => last.1 = s + l,
                    _ => out.push((s, s + l)),
                }
            }
        }
        out
    };
    let expected = data_ranges(&ours);
    assert_eq!(expected, [(0, 1 << 20), (5 << 20, (5 << 20) + 65536)]);
    let server = Server::start(
        &img,
        &dir.path().join("s"),
        &["-t", "-e", "4", "-D", "a test export"],
    );
    let theirs: serde_json::Value = serde_json::from_str(&ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &server.uri()],
    ))
    .unwrap();
    assert_eq!(data_ranges(&theirs), expected, "qemu-img map over NBD");
    let nbdmap = ok("nbdinfo", &["--map", &server.uri()]);
    let mut nbd_data = Vec::new();
    for line in nbdmap.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 && f[2] == "0" {
            let (s, l): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
            nbd_data.push((s, s + l));
        }
    }
    assert_eq!(
        nbd_data, expected,
        "nbdinfo --map:
{nbdmap}"
    );
    let info = ok("nbdinfo", &[&server.uri()]);
    for needle in [
        "export-size: 16777216",
        "block_size_minimum: 1",
        "block_size_preferred: 65536",
        "block_size_maximum: 33554432",
        "can_multi_conn: true",
        "can_trim: true",
        "is_read_only: false",
        "base:allocation",
        "a test export",
    ] {
        assert!(
            info.contains(needle),
            "{needle} missing:
{info}"
        );
    }
    let out = dir.path().join("out.raw");
    ok("nbdcopy", &[&server.uri(), p(&out)]);
    let copy = std::fs::read(&out).unwrap();
    assert_eq!(copy.len(), 16 << 20);
    assert!(copy[..1 << 20].iter().all(|&b| b == 5));
    ok("nbdcopy", &[p(&out), &server.uri()]);
    let back = dir.path().join("back.raw");
    ok("nbdcopy", &[&server.uri(), p(&back)]);
    assert!(
        std::fs::read(&back).unwrap() == copy,
        "out and back unchanged"
    );
    assert!(server.stop().success());
    assert_eq!(run(bin(), &["check", p(&img)]).status.code(), Some(0));
}

/// `kill -9` of the server in the middle of a fio write job: the next
/// read-write open repairs; data flushed before the job is all there.
#[test]
fn a_killed_server_loses_nothing_flushed() {
    if !tools(&["qemu-img", "qemu-io", "fio"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    ok(
        bin(),
        &[
            "create",
            "-q",
            "-o",
            "dedup=on,cluster_size=4k",
            p(&img),
            "64M",
        ],
    );
    let server = Server::start(&img, &dir.path().join("s"), &["-t", "-e", "4"]);
    // Flushed first: 8 MiB of a known pattern (qemu-io flushes at exit).
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 8M",
            "-c",
            "flush",
            &server.uri(),
        ],
    );
    let mut fio = Command::new("fio")
        .args([
            "--name=crash",
            "--ioengine=nbd",
            &format!("--uri={}", server.uri()),
            "--rw=randwrite",
            "--bs=4k",
            "--offset=16M",
            "--size=48M",
            "--iodepth=16",
            "--time_based",
            "--runtime=30",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio starts");
    std::thread::sleep(Duration::from_millis(1500));
    server.kill();
    let _ = fio.kill();
    let _ = fio.wait();
    let out = run(bin(), &["check", "-r", "all", p(&img)]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(bin(), &["check", p(&img)]);
    assert_eq!(out.status.code(), Some(0), "clean after repair");
    let back = dir.path().join("back.raw");
    ok(bin(), &["convert", "-O", "raw", p(&img), p(&back)]);
    let bytes = std::fs::read(&back).unwrap();
    assert!(
        bytes[..8 << 20].iter().all(|&b| b == 0x5a),
        "flushed data lost"
    );
}

/// A hand-written client: truncated handshakes, unknown options, requests
/// past the end, a 4 GiB length, an unknown command and a write to a
/// read-only export each get the protocol's answer, and the server goes on
/// serving the others.
#[test]
fn malformed_clients_get_errors_and_others_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    ok(bin(), &["create", "-q", p(&img), "1M"]);
    let socket = dir.path().join("s");
    let server = Server::start(&img, &socket, &["-t", "-e", "8", "-r"]);

    // Truncated handshakes: connect, read part of the greeting, vanish.
    for cut in [0usize, 3, 17] {
        let mut c = UnixStream::connect(&socket).unwrap();
        let mut greeting = vec![0u8; cut];
        c.read_exact(&mut greeting).unwrap();
        if cut == 17 {
            c.write_all(&[0, 0]).unwrap();
        }
    }
    let mut c = Client::connect(&socket);
    // An unknown option is refused, negotiation goes on.
    let (kind, _) = c.option(99, b"");
    assert_eq!(kind, (1 << 31) + 1, "NBD_REP_ERR_UNSUP");
    // An oversized option is refused without reading it into memory.
    c.send_option_header(3, 1 << 30);
    c.send_garbage(1 << 30);
    let (kind, _) = c.read_option_reply(3);
    assert_eq!(kind, (1 << 31) + 9, "NBD_REP_ERR_TOO_BIG");
    // GO with a bad layout, then an unknown export, then the real one.
    let (kind, _) = c.option(7, &[0, 0, 0, 9, b'x']);
    assert_eq!(kind, (1 << 31) + 3, "NBD_REP_ERR_INVALID");
    let (kind, _) = c.option(7, &go_data(b"nope"));
    assert_eq!(kind, (1 << 31) + 6, "NBD_REP_ERR_UNKNOWN");
    let size = c.go();
    assert_eq!(size, 1 << 20);
    // Transmission: errors by the book.
    assert_eq!(c.request(0, 0, 512, 4096), 0, "a read inside");
    assert_eq!(
        c.request(0, 0, (1 << 20) - 10, 100),
        22,
        "read past the end: EINVAL"
    );
    assert_eq!(
        c.request(0, 0, 0, u32::MAX),
        22,
        "4 GiB read: EINVAL, nothing allocated"
    );
    assert_eq!(c.request(0, 42, 0, 0), 22, "unknown command: EINVAL");
    assert_eq!(
        c.write(0, &[1; 512]),
        1,
        "write to a read-only export: EPERM"
    );
    assert_eq!(
        c.request(0, 4, 0, 512),
        1,
        "trim of a read-only export: EPERM"
    );
    assert_eq!(c.request(0, 3, 0, 0), 0, "flush");
    // Meanwhile another client is served normally.
    let mut other = Client::connect(&socket);
    assert_eq!(other.go(), 1 << 20);
    assert_eq!(other.request(0, 0, 0, 4096), 0);
    // A bad request magic ends that client only.
    // The server may hang up as soon as it has read the magic, so the rest
    // of the request can meet a closed socket.
    let mut bad_request = vec![0xde, 0xad, 0xbe, 0xef];
    bad_request.extend_from_slice(&[0u8; 24]);
    if let Err(e) = c.stream.write_all(&bad_request) {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "sending the bad request: {e}"
        );
    }
    let mut byte = [0u8; 1];
    match c.stream.read(&mut byte) {
        Ok(n) => assert_eq!(n, 0, "disconnected"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(other.request(0, 0, 4096, 512), 0, "the other goes on");
    drop(other);
    assert!(server.stop().success());
}

fn go_data(name: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Just enough of an NBD client to send what real clients never do.
struct Client {
    stream: UnixStream,
}

impl Client {
    fn connect(socket: &Path) -> Self {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        Self { stream }
    }

    fn send_option_header(&mut self, option: u32, len: u32) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.stream.write_all(&m).unwrap();
    }

    fn send_garbage(&mut self, mut len: u64) {
        let chunk = vec![0x77u8; 1 << 20];
        while len > 0 {
            let n = len.min(chunk.len() as u64) as usize;
            self.stream.write_all(&chunk[..n]).unwrap();
            len -= n as u64;
        }
    }

    fn read_option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9
        );
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), option);
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).unwrap();
        (kind, data)
    }

    fn option(&mut self, option: u32, data: &[u8]) -> (u32, Vec<u8>) {
        self.send_option_header(option, data.len() as u32);
        self.stream.write_all(data).unwrap();
        self.read_option_reply(option)
    }

    /// `NBD_OPT_GO` for the default export; returns its size.
    fn go(&mut self) -> u64 {
        self.send_option_header(7, 6);
        self.stream.write_all(&go_data(b"")).unwrap();
        let mut size = 0;
        loop {
            let (kind, data) = self.read_option_reply(7);
            match kind {
                1 => return size,
                3 if data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                }
                3 => {}
                other => panic!("GO failed: {other:#x}"),
            }
        }
    }

    fn send_request(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8]) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&0x1234u64.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.stream.write_all(&m).unwrap();
    }

    /// Sends a request without payload; returns the error of its simple
    /// reply (reading a read's data).
    fn request(&mut self, _flags: u16, kind: u16, offset: u64, len: u32) -> u32 {
        self.send_request(kind, offset, len, &[]);
        self.reply(if kind == 0 { len } else { 0 })
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.send_request(1, offset, data.len() as u32, data);
        self.reply(0)
    }

    fn reply(&mut self, read_len: u32) -> u32 {
        let mut h = [0u8; 16];
        self.stream.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 0x1234);
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if error == 0 && read_len > 0 {
            let mut data = vec![0u8; read_len as usize];
            self.stream.read_exact(&mut data).unwrap();
        }
        error
    }
}

/// Waits until `path` exists (a server's socket), at most 10 s.
fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", p(path));
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// QEMU's image locks seen both ways: while `qcow2 serve` writes an image,
/// qemu-img (and our own tools) cannot open it without `-U`, and a second
/// server refuses; while qemu-nbd or qemu-io writes it, `qcow2 serve`,
/// `qcow2 resize` and a read-write `Image::open` fail naming the lock.
#[test]
fn image_locks_are_seen_both_ways_with_qemu() {
    if !tools(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("locked.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&image), "4M"],
    );

    let server = Server::start(&image, &dir.path().join("a.sock"), &[]);
    let out = run("qemu-img", &["info", p(&image)]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Failed to get shared \"write\" lock"),
        "{}",
        text(&out.stderr)
    );
    ok("qemu-img", &["info", "-U", p(&image)]);
    let out = qcow2(&["info", p(&image)]);
    assert!(!out.status.success(), "our info also respects the lock");
    assert!(
        text(&out.stderr).contains("\"write\" lock"),
        "{}",
        text(&out.stderr)
    );
    ok(bin(), &["info", "-U", p(&image)]);
    let out = qcow2(&["serve", "-k", p(&dir.path().join("b.sock")), p(&image)]);
    assert!(!out.status.success(), "a second server refuses");
    assert!(
        text(&out.stderr).contains("Failed to get \"write\" lock"),
        "{}",
        text(&out.stderr)
    );
    assert!(server.stop().success());
    ok("qemu-img", &["info", p(&image)]);

    let socket = dir.path().join("q.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-k", p(&socket), "-f", "qcow2", p(&image)])
        .spawn()
        .expect("qemu-nbd starts");
    wait_for(&socket);
    // qemu-nbd may make its socket before it opens (and locks) the image:
    // wait until the lock is seen, or a loaded machine races the checks.
    let deadline = Instant::now() + Duration::from_secs(20);
    while run("qemu-img", &["info", p(&image)]).status.success() {
        assert!(Instant::now() < deadline, "qemu-nbd never locked the image");
        std::thread::sleep(Duration::from_millis(20));
    }
    for args in [
        vec!["serve", "-k", p(&dir.path().join("c.sock")), p(&image)],
        vec!["resize", p(&image), "8M"],
        vec!["check", p(&image)],
    ] {
        let out = qcow2(&args);
        assert!(!out.status.success(), "{args:?} while qemu-nbd writes");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("lock") && stderr.lines().count() == 1,
            "{args:?}: {stderr}"
        );
    }
    let err = qcow2_io::Image::open(&image, &qcow2_io::OpenOptions::read_write()).unwrap_err();
    assert!(matches!(err, qcow2_io::ImageError::Locked(_)), "{err:?}");
    assert!(
        qcow2_io::Image::open(&image, &qcow2_io::OpenOptions::read_only().sharing()).is_ok(),
        "-U opens an image in use"
    );
    nbd.kill().unwrap();
    nbd.wait().unwrap();

    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 3000", p(&image)])
        .spawn()
        .expect("qemu-io starts");
    std::thread::sleep(Duration::from_millis(500));
    let out = qcow2(&["resize", p(&image), "8M"]);
    assert!(
        !out.status.success(),
        "resize while qemu-io holds the image"
    );
    holder.wait().unwrap();
    ok(bin(), &["resize", p(&image), "8M"]);
}

/// Bytes a file occupies on its file system.
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Trims give space back: 256 MiB written through NBD and trimmed leave
/// the file within 5 % of what qemu-nbd leaves for the same sequence (it
/// punches holes for freed clusters too); with `--no-hole-punching` the
/// space stays.
#[test]
fn trimmed_space_goes_back_to_the_host_as_with_qemu_nbd() {
    if !tools(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let commands = ["write -P 7 0 256M", "discard 0 256M", "flush"];
    let guest = |uri: &str| {
        let mut args = vec!["-f", "raw"];
        for c in &commands {
            args.extend(["-c", c]);
        }
        args.push(uri);
        ok("qemu-io", &args);
    };
    let usage_after = |extra: &[&str]| {
        let image = dir.path().join("ours.qcow2");
        let _ = std::fs::remove_file(&image);
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", p(&image), "256M"],
        );
        let mut args = vec!["--discard=unmap"];
        args.extend_from_slice(extra);
        let server = Server::start(&image, &dir.path().join("ours.sock"), &args);
        guest(&server.uri());
        assert!(server.stop().success());
        ok("qemu-img", &["check", p(&image)]);
        disk_usage(&image)
    };
    let ours = usage_after(&[]);
    let kept = usage_after(&["--no-hole-punching"]);

    let theirs_image = dir.path().join("theirs.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&theirs_image), "256M"],
    );
    let socket = dir.path().join("theirs.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args([
            "-k",
            p(&socket),
            "-f",
            "qcow2",
            "--discard=unmap",
            p(&theirs_image),
        ])
        .spawn()
        .expect("qemu-nbd starts");
    wait_for(&socket);
    guest(&format!("nbd+unix:///?socket={}", p(&socket)));
    ok("kill", &["-TERM", &nbd.id().to_string()]);
    nbd.wait().unwrap();
    let theirs = disk_usage(&theirs_image);
    eprintln!(
        "after trimming 256 MiB: ours {ours} B, qemu-nbd {theirs} B, without punching {kept} B"
    );
    assert!(
        ours <= theirs + theirs / 20,
        "ours {ours} B against qemu-nbd's {theirs} B"
    );
    assert!(
        kept > 200 << 20,
        "--no-hole-punching keeps the space: {kept} B"
    );
}

/// A server restarted after a crash says in one line that it repaired the
/// image (refcounts, dropped dedup entries); after a clean stop it says
/// nothing.
#[test]
fn a_restarted_server_says_it_recovered_the_image() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    ok(
        bin(),
        &[
            "create",
            "-q",
            "-o",
            "dedup=on,cluster_size=4k",
            p(&img),
            "16M",
        ],
    );
    let server = Server::start(&img, &dir.path().join("s1"), &["-t"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "flush",
            &server.uri(),
        ],
    );
    server.kill();
    let restart = |socket: &str| {
        let socket = dir.path().join(socket);
        let mut child = Command::new(bin())
            .args(["serve", "-k", p(&socket), p(&img)])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(&socket);
        ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-r",
                "-c",
                "read -P 0x5a 0 1M",
                &format!("nbd+unix:///?socket={}", p(&socket)),
            ],
        );
        child.wait().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        stderr
    };
    let said = restart("s2");
    assert!(
        said.contains("was not closed cleanly") && said.contains("dedup entries dropped"),
        "{said:?}"
    );
    assert_eq!(said.lines().count(), 1, "{said:?}");
    assert_eq!(restart("s3"), "", "a clean close leaves nothing to say");
}
