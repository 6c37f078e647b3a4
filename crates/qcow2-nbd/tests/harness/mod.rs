//! The NBD fuzz harness, shared: `fuzz/fuzz_targets/nbd.rs` includes this
//! file, and `tests/fuzz_regressions.rs` replays every saved input through
//! it on the stable toolchain.
//!
//! The input is a client's whole byte stream (after one byte choosing the
//! export: dedup or not, read-only or not, a dirty bitmap, the
//! allocation-depth context). A real server on a Unix socket serves an
//! image in memory; the client sends the bytes, closes its writing half
//! and reads every reply. The server must answer or hang up, never panic
//! or hang, and leave the image consistent.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qcow2_io::{CreateOptions, Image, MemStorage, RepairMode};
use qcow2_nbd::{serve, Export, ExportOptions, Listener, ServerOptions};

/// What one session left behind.
pub struct Outcome {
    /// Bytes the server sent (greeting, option replies, replies).
    pub replied: usize,
    /// The image's 4 KiB at 64 KiB after the session.
    pub at_64k: Vec<u8>,
}

/// One client stream against a fresh server.
pub fn nbd(data: &[u8]) -> Option<Outcome> {
    let (&selector, stream) = data.split_first()?;
    let options = CreateOptions::new(4 << 20)
        .cluster_size(if selector & 1 != 0 { 4096 } else { 65536 })
        .dedup(selector & 1 != 0);
    let image = Arc::new(Image::create_on(Arc::new(MemStorage::new()), &options).unwrap());
    image.write_at(&[0x5a; 65536], 0).unwrap();
    let mut export_options = ExportOptions {
        read_only: selector & 4 != 0,
        allocation_depth: selector & 8 != 0,
        ..ExportOptions::default()
    };
    if selector & 2 != 0 {
        image.bitmaps().add("b0", None, true).unwrap();
        export_options.bitmaps.push("b0".into());
    }
    let export = Export::new(image.clone(), export_options);

    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "qcow2-nbd-fuzz-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let listener = Listener::Unix(UnixListener::bind(&path).unwrap());
    let stop = AtomicBool::new(false);
    let replied = std::thread::scope(|scope| {
        let server = scope.spawn(|| serve(&listener, &export, ServerOptions::default(), &stop));
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reader = client.try_clone().unwrap();
        let drain = scope.spawn(move || {
            let mut sink = vec![0u8; 1 << 16];
            let mut replied = 0;
            while let Ok(n) = reader.read(&mut sink) {
                if n == 0 {
                    break;
                }
                replied += n;
            }
            replied
        });
        // The server may hang up before it has read everything.
        let _ = client.write_all(stream);
        let _ = client.shutdown(Shutdown::Write);
        let replied = drain.join().unwrap();
        drop(client);
        server.join().unwrap().unwrap();
        replied
    });
    let _ = std::fs::remove_file(&path);
    let report = image.check(RepairMode::None).unwrap();
    assert!(
        report.is_clean(),
        "the image is damaged: {:?}",
        report.findings
    );
    let mut at_64k = vec![0u8; 4096];
    image.read_at(&mut at_64k, 65536).unwrap();
    image.close().unwrap();
    Some(Outcome { replied, at_64k })
}
