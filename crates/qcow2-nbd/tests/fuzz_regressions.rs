//! Replays every input saved under `fuzz/regressions/nbd/` (a seed corpus
//! of real client sessions, and whatever the fuzzer finds) through the
//! shared harness, on the stable toolchain.

#[path = "harness/mod.rs"]
mod harness;

use std::path::PathBuf;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/nbd")
}

#[test]
fn saved_client_streams_replay_and_the_server_survives() {
    let mut replayed = 0;
    let mut entries: Vec<_> = std::fs::read_dir(corpus())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    for path in entries {
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| {
            harness::nbd(&data);
        });
        assert!(result.is_ok(), "{} fails", path.display());
        replayed += 1;
    }
    assert!(replayed >= 4, "the NBD seed corpus is missing ({replayed})");
}

fn option(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(b"IHAVEOPT");
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn request(out: &mut Vec<u8>, kind: u16, flags: u16, offset: u64, length: u32) {
    out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u64::from(kind).to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

fn meta_context(queries: &[&str]) -> Vec<u8> {
    let mut d = 0u32.to_be_bytes().to_vec();
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// A whole session as a client such as qemu-io or nbdinfo sends it.
fn session(selector: u8, structured: bool) -> Vec<u8> {
    let mut s = vec![selector];
    s.extend_from_slice(&3u32.to_be_bytes()); // fixed newstyle, no zeroes
    option(&mut s, 3, b""); // LIST
    if structured {
        option(&mut s, 8, b""); // STRUCTURED_REPLY
        option(
            &mut s,
            9,
            &meta_context(&["base:", "qemu:"]), // LIST_META_CONTEXT
        );
        option(
            &mut s,
            10,
            &meta_context(&[
                "base:allocation",
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:b0",
            ]),
        );
    }
    option(&mut s, 6, &[0, 0, 0, 0, 0, 1, 0, 3]); // INFO (block size)
    option(&mut s, 7, &[0, 0, 0, 0, 0, 0]); // GO ""
    request(&mut s, 0, 0, 0, 4096); // READ
    request(&mut s, 1, 1, 65536, 4096); // WRITE, FUA
    s.extend_from_slice(&[0x77; 4096]);
    request(&mut s, 1, 0, 131072, 4096); // a write of zeros
    s.extend_from_slice(&[0; 4096]);
    request(&mut s, 7, 0, 0, 1 << 20); // BLOCK_STATUS
    request(&mut s, 4, 0, 0, 65536); // TRIM
    request(&mut s, 6, 2, 196_608, 65536); // WRITE_ZEROES, NO_HOLE
    request(&mut s, 5, 0, 0, 65536); // CACHE
    request(&mut s, 3, 0, 0, 0); // FLUSH
    request(&mut s, 0, 0, (4 << 20) - 100, 200); // READ past the end
    request(&mut s, 2, 0, 0, 0); // DISC
    s
}

/// Writes the seed corpus (`cargo test -p qcow2-nbd --test
/// fuzz_regressions -- --ignored`).
#[test]
#[ignore]
fn write_seed_corpus() {
    let dir = corpus();
    std::fs::create_dir_all(&dir).unwrap();
    let mut seeds = vec![
        ("structured-dedup", session(0x0b, true)),
        ("structured-plain", session(0x0a, true)),
        ("simple-read-only", session(0x04, false)),
        ("simple-plain", session(0x00, false)),
    ];
    let mut old_style = vec![0x01];
    old_style.extend_from_slice(&3u32.to_be_bytes());
    option(&mut old_style, 1, b""); // EXPORT_NAME ""
    request(&mut old_style, 0, 0, 0, 512);
    seeds.push(("export-name", old_style));
    let mut abort = vec![0x00];
    abort.extend_from_slice(&1u32.to_be_bytes());
    option(&mut abort, 5, b""); // STARTTLS (refused)
    option(&mut abort, 2, b""); // ABORT
    seeds.push(("starttls-abort", abort));
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}

#[test]
fn a_seed_session_is_served_to_its_end() {
    // A full session reaches transmission: its write lands, and every
    // request gets a reply; read-only, the write is refused.
    for (selector, structured) in [(0x0b, true), (0x00, false)] {
        let out = harness::nbd(&session(selector, structured)).unwrap();
        assert_eq!(out.at_64k, vec![0x77; 4096], "the FUA write landed");
        assert!(out.replied > 4096, "the read's data came back");
    }
    let read_only = harness::nbd(&session(0x04, false)).unwrap();
    assert_eq!(
        read_only.at_64k,
        vec![0; 4096],
        "refused on a read-only export"
    );
}
