//! [`EncryptedStorage`]: the data path of a LUKS image. Guest data moves
//! through it (metadata does not): reads are decrypted and writes
//! encrypted, sector by sector, each sector's IV being its number in the
//! image file (QEMU's rule for LUKS inside qcow2: the host offset, so a
//! cluster that moves is re-encrypted, and clusters shared by
//! deduplication encrypt alike). Writes that do not cover whole sectors
//! read, decrypt and patch the sectors they touch; the caller holds the
//! cluster's exclusive range lock, so no other writer is in the sector.

use std::io;
use std::sync::Arc;

use qcow2_alloc::{LockAccess, LockError, Storage};

use super::cipher::{SectorCipher, SECTOR};

/// Encrypting storage over the image file. See the module documentation.
pub(crate) struct EncryptedStorage {
    inner: Arc<dyn Storage>,
    cipher: SectorCipher,
}

impl std::fmt::Debug for EncryptedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncryptedStorage { .. }")
    }
}

impl EncryptedStorage {
    pub(crate) fn new(inner: Arc<dyn Storage>, cipher: SectorCipher) -> Self {
        Self { inner, cipher }
    }
}

/// The whole sectors covering `[offset, offset + len)`: (first byte, bytes).
fn sectors(offset: u64, len: usize) -> (u64, usize) {
    let start = offset - offset % SECTOR as u64;
    let end = (offset + len as u64).next_multiple_of(SECTOR as u64);
    (start, (end - start) as usize)
}

impl Storage for EncryptedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (start, len) = sectors(offset, buf.len());
        if start == offset && len == buf.len() {
            self.inner.read_at(buf, offset)?;
            self.cipher.decrypt(buf, offset / SECTOR as u64);
            return Ok(());
        }
        let mut whole = vec![0u8; len];
        self.inner.read_at(&mut whole, start)?;
        self.cipher.decrypt(&mut whole, start / SECTOR as u64);
        let at = (offset - start) as usize;
        buf.copy_from_slice(&whole[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, len) = sectors(offset, buf.len());
        let mut whole = if start == offset && len == buf.len() {
            buf.to_vec()
        } else {
            let mut whole = vec![0u8; len];
            self.inner.read_at(&mut whole, start)?;
            self.cipher.decrypt(&mut whole, start / SECTOR as u64);
            let at = (offset - start) as usize;
            whole[at..at + buf.len()].copy_from_slice(buf);
            whole
        };
        self.cipher.encrypt(&mut whole, start / SECTOR as u64);
        self.inner.write_at(&whole, start)
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

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(offset, len)
    }

    /// New clusters must decrypt to zeros, so their zeros are written
    /// encrypted (the file's own zeros would decrypt to noise).
    fn extend_zeroed(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len as usize];
        self.write_at(&zeros, offset)
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

/// The data path of an encrypted image opened without its passphrase:
/// every guest read and write fails (what is on disk is ciphertext), the
/// rest passes through.
pub(crate) struct LockedStorage {
    inner: Arc<dyn Storage>,
}

impl LockedStorage {
    pub(crate) fn new(inner: Arc<dyn Storage>) -> Self {
        Self { inner }
    }
}

impl std::fmt::Debug for LockedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockedStorage { .. }")
    }
}

fn locked() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the image is encrypted and was opened without its passphrase",
    )
}

impl Storage for LockedStorage {
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(locked())
    }

    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(locked())
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

    fn extend_zeroed(&self, _: u64, _: u64) -> io::Result<()> {
        Err(locked())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
}
