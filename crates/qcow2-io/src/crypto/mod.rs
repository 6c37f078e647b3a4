//! LUKS encryption inside qcow2, as QEMU makes it: the LUKS1 header in the
//! image's own clusters (`qcow2_format::luks`), its key slots unlocked
//! with a passphrase (`keys`), the volume's sector cipher (`cipher`), and
//! the encrypting data path (`storage`) that every guest read and write
//! goes through. Key material is zeroed when dropped.

pub(crate) mod cipher;
pub(crate) mod keys;
pub(crate) mod keyslots;
pub(crate) mod storage;

use std::sync::Arc;

use qcow2_alloc::Storage;
use qcow2_dedup::ContentHasher;
use qcow2_format::extensions::HeaderExtension;
use qcow2_format::luks::{LuksHeader, LUKS_HEADER_LEN};
use qcow2_format::Header;

use self::cipher::{SectorCipher, SECTOR};
use self::storage::{EncryptedStorage, LockedStorage};
use crate::options::Secret;
use crate::{ImageError, Result};

/// Where the LUKS header of an encrypted image is: `(offset, length)`,
/// checked to lie inside the file.
pub(crate) fn luks_area(storage: &dyn Storage, header: &Header) -> Result<(u64, u64)> {
    let (offset, length) = header
        .extensions
        .iter()
        .find_map(|e| match e {
            HeaderExtension::Encryption { offset, length } => Some((*offset, *length)),
            _ => None,
        })
        .ok_or_else(|| ImageError::Corrupt("an encrypted image without its LUKS header".into()))?;
    let file = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    if length < LUKS_HEADER_LEN as u64 || offset.checked_add(length).is_none_or(|end| end > file) {
        return Err(ImageError::Corrupt(format!(
            "the LUKS header ({length} bytes at {offset:#x}) lies outside the image"
        )));
    }
    Ok((offset, length))
}

/// The data path of an encrypted image: `data` decrypted with the volume
/// key that `secret` unlocks, or, without a secret, storage that refuses
/// every guest read and write (metadata stays readable: `info`, `check`,
/// `map`).
pub(crate) fn data_path(
    storage: &dyn Storage,
    header: &Header,
    data: Arc<dyn Storage>,
    secret: Option<&Secret>,
) -> Result<(Arc<dyn Storage>, Option<Unlocked>)> {
    let (offset, length) = luks_area(storage, header)?;
    let mut bytes = vec![0u8; LUKS_HEADER_LEN];
    storage
        .read_at(&mut bytes, offset)
        .map_err(ImageError::io("reading the LUKS header"))?;
    let luks = LuksHeader::parse(&bytes)?;
    let Some(secret) = secret else {
        return Ok((Arc::new(LockedStorage::new(data)), None));
    };
    let key = keys::unlock(&luks, secret.bytes(), |slot| {
        let start = u64::from(slot.key_offset) * SECTOR as u64;
        let len = keys::material_sectors(&luks, slot) * SECTOR as u64;
        if start.saturating_add(len) > length {
            return Err(ImageError::Corrupt(
                "a LUKS key slot's material lies outside the LUKS header".into(),
            ));
        }
        let mut material = vec![0u8; len as usize];
        storage
            .read_at(&mut material, offset + start)
            .map_err(ImageError::io("reading LUKS key material"))?;
        Ok(material)
    })?;
    let cipher = SectorCipher::new(&luks.cipher_name, &luks.cipher_mode, &key)?;
    let unlocked = Unlocked {
        hasher: dedup_hasher(&key)?,
        key,
    };
    Ok((
        Arc::new(EncryptedStorage::new(data, cipher)),
        Some(unlocked),
    ))
}

/// What unlocking a volume gives besides its data path.
pub(crate) struct Unlocked {
    /// The dedup table's keyed hasher.
    pub(crate) hasher: ContentHasher,
    /// The volume key (zeroed when dropped), for adding key slots.
    pub(crate) key: zeroize::Zeroizing<Vec<u8>>,
}

/// The dedup table's hasher of a volume: HMAC-SHA-256 keyed with
/// HMAC-SHA-256(volume key, a fixed label), so the table's hashes are no
/// plaintext fingerprint and no other volume's.
pub(crate) fn dedup_hasher(volume_key: &[u8]) -> Result<ContentHasher> {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(volume_key)
        .map_err(|_| ImageError::Internal("HMAC refused the volume key"))?;
    mac.update(b"qcow2 dedup content hash key, v1");
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&mac.finalize().into_bytes());
    Ok(ContentHasher::keyed(*key))
}

/// The LUKS area of a new encrypted image, laid out by
/// [`crate::create`]: its bytes (header, then slot 0's material at its
/// offset, the other slots' room zero) and the sector cipher of the
/// volume key it holds.
pub(crate) fn new_volume(
    encryption: &crate::options::Encryption,
) -> Result<(Vec<u8>, SectorCipher, Unlocked)> {
    let hash = keys::Hash::named(&encryption.hash)?;
    let cipher = encryption.cipher.as_str();
    let mode = encryption.cipher_mode.split('-').next();
    let key_bytes = match (cipher, mode, encryption.key_bits) {
        ("aes" | "serpent" | "twofish", Some("xts"), 128 | 192 | 256) => {
            encryption.key_bits as usize / 4
        }
        // 192-bit keys in CBC are refused: QEMU cannot open such a volume
        // (a 24-byte key split in 4000 stripes fills no whole sector).
        ("aes" | "serpent" | "twofish", Some("cbc"), 128 | 256) | ("cast5", Some("cbc"), 128) => {
            encryption.key_bits as usize / 8
        }
        _ => {
            return Err(ImageError::InvalidOption(format!(
                "{cipher}-{} in mode {} is not supported",
                encryption.key_bits, encryption.cipher_mode
            )))
        }
    };
    let per_second = keys::pbkdf2_rate(hash, key_bytes);
    let slot_iterations = (per_second.saturating_mul(encryption.iter_time_ms) / 1000)
        .clamp(1000, u64::from(u32::MAX)) as u32;
    let volume = keys::NewVolume {
        cipher_name: cipher.to_string(),
        cipher_mode: encryption.cipher_mode.clone(),
        key_bytes,
        hash,
        slot_iterations,
        digest_iterations: (slot_iterations / 8).max(1000),
    };
    let (luks, material, key) = keys::create(&volume, encryption.secret.bytes())?;
    let area = u64::from(luks.payload_offset) * SECTOR as u64;
    let mut bytes = vec![0u8; area as usize];
    let encoded = luks.encode();
    bytes[..encoded.len()].copy_from_slice(&encoded);
    let at = luks.slots[0].key_offset as usize * SECTOR;
    bytes[at..at + material.len()].copy_from_slice(&material);
    let cipher = SectorCipher::new(&volume.cipher_name, &volume.cipher_mode, &key)?;
    let unlocked = Unlocked {
        hasher: dedup_hasher(&key)?,
        key,
    };
    Ok((bytes, cipher, unlocked))
}

/// The cipher of the legacy AES scheme: AES-128-CBC keyed with the
/// passphrase's first 16 bytes (zero-padded), plain64 IVs, as QEMU's
/// `qcow` cipher.
pub(crate) fn legacy_aes(secret: &Secret) -> Result<Arc<SectorCipher>> {
    let mut key = zeroize::Zeroizing::new([0u8; 16]);
    let n = secret.bytes().len().min(16);
    key[..n].copy_from_slice(&secret.bytes()[..n]);
    Ok(Arc::new(SectorCipher::new("aes", "cbc-plain64", &key[..])?))
}

/// Storage that refuses guest reads and writes (an encrypted image opened
/// without its passphrase).
pub(crate) fn locked(data: Arc<dyn Storage>) -> Arc<dyn Storage> {
    Arc::new(LockedStorage::new(data))
}

/// Reads guest bytes `[guest, guest + dst.len())` stored at `host` of a
/// legacy AES image: the sectors around them are read and decrypted with
/// their guest sector numbers.
pub(crate) fn read_legacy(
    data: &dyn Storage,
    cipher: &SectorCipher,
    dst: &mut [u8],
    host: u64,
    guest: u64,
) -> std::io::Result<()> {
    let head = guest % SECTOR as u64;
    let len = (head + dst.len() as u64).next_multiple_of(SECTOR as u64) as usize;
    let mut sectors = vec![0u8; len];
    data.read_at(&mut sectors, host - head)?;
    cipher.decrypt(&mut sectors, (guest - head) / SECTOR as u64);
    dst.copy_from_slice(&sectors[head as usize..head as usize + dst.len()]);
    Ok(())
}

/// Wraps `data` in the encrypting path of `cipher`.
pub(crate) fn encrypted(data: Arc<dyn Storage>, cipher: SectorCipher) -> Arc<dyn Storage> {
    Arc::new(EncryptedStorage::new(data, cipher))
}

/// The encryption of an image as `qemu-img info` lists it.
pub(crate) fn describe(storage: &dyn Storage, header: &Header) -> Result<crate::info::LuksInfo> {
    let (offset, _) = luks_area(storage, header)?;
    let mut bytes = vec![0u8; LUKS_HEADER_LEN];
    storage
        .read_at(&mut bytes, offset)
        .map_err(ImageError::io("reading the LUKS header"))?;
    let luks = LuksHeader::parse(&bytes)?;
    let (mode, ivgen) = luks
        .cipher_mode
        .split_once('-')
        .unwrap_or((luks.cipher_mode.as_str(), ""));
    let (ivgen, ivgen_hash) = match ivgen.split_once(':') {
        Some((g, h)) => (g, Some(h.to_string())),
        None => (ivgen, None),
    };
    let key_bits = luks.key_bytes * 8 / if mode == "xts" { 2 } else { 1 };
    Ok(crate::info::LuksInfo {
        cipher_alg: format!("{}-{key_bits}", luks.cipher_name),
        cipher_mode: mode.to_string(),
        ivgen_alg: ivgen.to_string(),
        ivgen_hash_alg: ivgen_hash,
        hash_alg: luks.hash_spec.clone(),
        uuid: luks.uuid.clone(),
        payload_offset: u64::from(luks.payload_offset) * SECTOR as u64,
        master_key_iters: luks.mk_digest_iterations,
        slots: luks
            .slots
            .iter()
            .map(|s| crate::info::LuksSlotInfo {
                active: s.active,
                iters: s.active.then_some(s.iterations),
                stripes: s.active.then_some(s.stripes),
                key_offset: u64::from(s.key_offset) * SECTOR as u64,
            })
            .collect(),
    })
}
