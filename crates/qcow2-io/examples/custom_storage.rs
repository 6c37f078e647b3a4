//! A `Storage` of one's own under an `Image`: a wrapper that counts the
//! bytes read and written and forwards everything else, the provided
//! methods (locks, space reservation, hole punching) included.
//!
//! `cargo run -p qcow2-io --example custom_storage`
//!
//! The same seam serves storage that is no local file (a network block
//! device, an object store): implement the five required methods on it,
//! and the provided ones where the storage can do better than the
//! defaults.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qcow2_io::{CreateOptions, Image, LockAccess, LockError, MemStorage, OpenOptions, Storage};

/// Counts the bytes going through to `inner`.
struct Counting<S> {
    inner: S,
    read: AtomicU64,
    written: AtomicU64,
}

impl<S: Storage> Storage for Counting<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    // The provided methods, forwarded: their defaults would do nothing.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(offset, len)
    }
    fn extend_zeroed(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.extend_zeroed(offset, len)
    }
    fn lock(&self, access: LockAccess) -> Result<bool, LockError> {
        self.inner.lock(access)
    }
    fn unlock(&self) {
        self.inner.unlock()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let storage = Arc::new(Counting {
        inner: MemStorage::new(),
        read: AtomicU64::new(0),
        written: AtomicU64::new(0),
    });
    let image = Image::create_on(storage.clone(), &CreateOptions::new(64 << 20).dedup(true))?;
    // Sixteen clusters of the same content: stored once.
    for i in 0..16u64 {
        image.write_at(&[0x42; 65536], i * 65536)?;
    }
    image.close()?;
    println!(
        "wrote 1 MiB of guest data: {} bytes written to the storage, {} read",
        storage.written.load(Ordering::Relaxed),
        storage.read.load(Ordering::Relaxed)
    );

    let image = Image::open_on(storage.clone(), &OpenOptions::read_only())?;
    let stats = image.dedup().stats()?.expect("a dedup image");
    println!(
        "{} unique cluster(s) for {} references",
        stats.unique_clusters, stats.references
    );
    assert_eq!(stats.unique_clusters, 1);
    let mut back = vec![0u8; 65536];
    image.read_at(&mut back, 15 * 65536)?;
    assert!(back.iter().all(|&b| b == 0x42));
    Ok(())
}
