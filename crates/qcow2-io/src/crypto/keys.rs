//! LUKS1 key slots: unlocking the volume key with a passphrase (PBKDF2 of
//! the passphrase decrypts a slot's key material, the anti-forensic
//! merge of its 4000 stripes gives a candidate key, and the header's
//! PBKDF2 digest confirms it), and making a new header with one slot.

use qcow2_format::luks::{KeySlot, LuksHeader, LUKS_DIGEST_LEN, LUKS_KEY_SLOTS, LUKS_STRIPES};
use sha2::Digest;
use zeroize::Zeroizing;

use super::cipher::{SectorCipher, SECTOR};
use crate::{ImageError, Result};

/// The hashes LUKS headers name that this implementation computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hash {
    Sha1,
    Sha256,
    Sha512,
}

impl Hash {
    pub(crate) fn named(name: &str) -> Result<Self> {
        match name {
            "sha1" => Ok(Self::Sha1),
            "sha256" => Ok(Self::Sha256),
            "sha512" => Ok(Self::Sha512),
            other => Err(ImageError::Unsupported(format!("LUKS hash '{other}'"))),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        macro_rules! run {
            ($h:ty) => {{
                let mut h = <$h>::new();
                for p in parts {
                    h.update(p);
                }
                h.finalize().to_vec()
            }};
        }
        match self {
            Self::Sha1 => run!(sha1::Sha1),
            Self::Sha256 => run!(sha2::Sha256),
            Self::Sha512 => run!(sha2::Sha512),
        }
    }

    fn size(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// PBKDF2-HMAC of `password` into `out`.
    pub(crate) fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        match self {
            Self::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, rounds, out),
            Self::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, out),
            Self::Sha512 => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, rounds, out),
        }
    }

    /// The anti-forensic diffusion: each hash-sized block replaced by the
    /// hash of its index (big-endian) and itself.
    fn diffuse(self, buf: &mut [u8]) {
        let size = self.size();
        for (i, block) in buf.chunks_mut(size).enumerate() {
            let h = self.digest(&[&(i as u32).to_be_bytes(), block]);
            let n = block.len();
            block.copy_from_slice(&h[..n]);
        }
    }
}

/// PBKDF2 iterations per second of `hash` on this machine (for
/// `iter-time`, as QEMU measures it before it makes a key slot).
pub(crate) fn pbkdf2_rate(hash: Hash, key_bytes: usize) -> u64 {
    let mut out = vec![0u8; key_bytes];
    let rounds = 20_000u32;
    let start = std::time::Instant::now();
    hash.pbkdf2(b"benchmark", &[0u8; 32], rounds, &mut out);
    let seconds = start.elapsed().as_secs_f64().max(1e-6);
    (f64::from(rounds) / seconds) as u64
}

/// Merges `stripes` stripes of `key_len` bytes back into the key.
fn af_merge(material: &[u8], key_len: usize, stripes: usize, hash: Hash) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    for stripe in material.chunks_exact(key_len).take(stripes - 1) {
        for (a, b) in d.iter_mut().zip(stripe) {
            *a ^= b;
        }
        hash.diffuse(&mut d);
    }
    let last = &material[(stripes - 1) * key_len..stripes * key_len];
    for (a, b) in d.iter_mut().zip(last) {
        *a ^= b;
    }
    d
}

/// Splits `key` into `stripes` stripes, all but the last random.
pub(crate) fn af_split(key: &[u8], stripes: usize, hash: Hash) -> Result<Zeroizing<Vec<u8>>> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    random(&mut out[..n * (stripes - 1)])?;
    let mut d = Zeroizing::new(vec![0u8; n]);
    for stripe in out[..n * (stripes - 1)].chunks_exact(n) {
        for (a, b) in d.iter_mut().zip(stripe) {
            *a ^= b;
        }
        hash.diffuse(&mut d);
    }
    for (i, b) in out[n * (stripes - 1)..].iter_mut().enumerate() {
        *b = d[i] ^ key[i];
    }
    Ok(out)
}

/// Fills `buf` from the operating system's random source.
pub(crate) fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf)
        .map_err(|e| ImageError::Unsupported(format!("no random numbers: {e}")))
}

/// Bytes of one slot's material on disk (whole sectors).
pub(crate) fn material_sectors(header: &LuksHeader, slot: &KeySlot) -> u64 {
    header.material_len(slot).div_ceil(SECTOR as u64)
}

/// Whether `key` is the volume key: its PBKDF2 digest matches.
fn is_volume_key(header: &LuksHeader, hash: Hash, key: &[u8]) -> bool {
    let mut digest = [0u8; LUKS_DIGEST_LEN];
    hash.pbkdf2(
        key,
        &header.mk_digest_salt,
        header.mk_digest_iterations,
        &mut digest,
    );
    digest == header.mk_digest
}

/// The volume key, from `passphrase` and the active slots' material
/// (`read_material(slot)` reads a slot's encrypted material); a wrong
/// passphrase is [`ImageError::WrongPassphrase`].
pub(crate) fn unlock(
    header: &LuksHeader,
    passphrase: &[u8],
    mut read_material: impl FnMut(&KeySlot) -> Result<Vec<u8>>,
) -> Result<Zeroizing<Vec<u8>>> {
    let hash = Hash::named(&header.hash_spec)?;
    let key_len = header.key_bytes as usize;
    for slot in header.slots.iter().filter(|s| s.active) {
        let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
        hash.pbkdf2(passphrase, &slot.salt, slot.iterations, &mut slot_key);
        let mut material = Zeroizing::new(read_material(slot)?);
        let cipher = SectorCipher::new(&header.cipher_name, &header.cipher_mode, &slot_key)?;
        cipher.decrypt(&mut material, 0);
        let candidate = af_merge(&material, key_len, slot.stripes as usize, hash);
        if is_volume_key(header, hash, &candidate) {
            return Ok(candidate);
        }
    }
    Err(ImageError::WrongPassphrase)
}

/// What a new LUKS volume is made of.
#[derive(Debug, Clone)]
pub(crate) struct NewVolume {
    pub(crate) cipher_name: String,
    pub(crate) cipher_mode: String,
    pub(crate) key_bytes: usize,
    pub(crate) hash: Hash,
    /// PBKDF2 iterations of the slot and of the digest.
    pub(crate) slot_iterations: u32,
    pub(crate) digest_iterations: u32,
}

/// A new header with slot 0 holding a fresh random volume key under
/// `passphrase`: the header, slot 0's encrypted material, and the key.
pub(crate) fn create(
    volume: &NewVolume,
    passphrase: &[u8],
) -> Result<(LuksHeader, Vec<u8>, Zeroizing<Vec<u8>>)> {
    let mut key = Zeroizing::new(vec![0u8; volume.key_bytes]);
    random(&mut key)?;
    let mut digest_salt = [0u8; 32];
    random(&mut digest_salt)?;
    let mut mk_digest = [0u8; LUKS_DIGEST_LEN];
    volume
        .hash
        .pbkdf2(&key, &digest_salt, volume.digest_iterations, &mut mk_digest);
    let mut uuid = [0u8; 16];
    random(&mut uuid)?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    // Slots' material follows the header at 4 KiB boundaries, as QEMU
    // lays it out.
    let material_bytes = (volume.key_bytes as u64 * u64::from(LUKS_STRIPES)).next_multiple_of(4096);
    let mut slots = Vec::with_capacity(LUKS_KEY_SLOTS);
    for i in 0..LUKS_KEY_SLOTS as u64 {
        let mut salt = [0u8; 32];
        if i == 0 {
            random(&mut salt)?;
        }
        slots.push(KeySlot {
            active: i == 0,
            iterations: if i == 0 { volume.slot_iterations } else { 0 },
            salt,
            key_offset: ((4096 + i * material_bytes) / SECTOR as u64) as u32,
            stripes: LUKS_STRIPES,
        });
    }
    let header = LuksHeader {
        cipher_name: volume.cipher_name.clone(),
        cipher_mode: volume.cipher_mode.clone(),
        hash_spec: volume.hash.name().into(),
        payload_offset: ((4096 + LUKS_KEY_SLOTS as u64 * material_bytes) / SECTOR as u64) as u32,
        key_bytes: volume.key_bytes as u32,
        mk_digest,
        mk_digest_salt: digest_salt,
        mk_digest_iterations: volume.digest_iterations,
        uuid,
        slots,
    };
    let mut slot_key = Zeroizing::new(vec![0u8; volume.key_bytes]);
    volume.hash.pbkdf2(
        passphrase,
        &header.slots[0].salt,
        volume.slot_iterations,
        &mut slot_key,
    );
    let mut material = af_split(&key, LUKS_STRIPES as usize, volume.hash)?;
    let sectors = material_sectors(&header, &header.slots[0]) as usize;
    material.resize(sectors * SECTOR, 0);
    SectorCipher::new(&volume.cipher_name, &volume.cipher_mode, &slot_key)?
        .encrypt(&mut material, 0);
    Ok((header, material.to_vec(), key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_slot_unlocks_with_its_passphrase_only() {
        for (mode, bytes, hash) in [
            ("xts-plain64", 64, Hash::Sha256),
            ("cbc-essiv:sha256", 32, Hash::Sha1),
        ] {
            let volume = NewVolume {
                cipher_name: "aes".into(),
                cipher_mode: mode.into(),
                key_bytes: bytes,
                hash,
                slot_iterations: 1000,
                digest_iterations: 1000,
            };
            let (header, material, key) = create(&volume, b"secret").unwrap();
            let parsed = LuksHeader::parse(&header.encode()).unwrap();
            let read = |_: &KeySlot| Ok(material.clone());
            assert_eq!(*unlock(&parsed, b"secret", read).unwrap(), *key);
            assert!(matches!(
                unlock(&parsed, b"wrong", |_: &KeySlot| Ok(material.clone())),
                Err(ImageError::WrongPassphrase)
            ));
        }
    }

    #[test]
    fn the_split_merges_back() {
        let key: Vec<u8> = (0..64).collect();
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            let split = af_split(&key, 4000, hash).unwrap();
            assert_eq!(*af_merge(&split, 64, 4000, hash), key);
        }
    }
}
