//! [`SectorCipher`]: a LUKS volume's cipher, mode and IV generator over
//! 512-byte sectors, as QEMU's `crypto/block.c` applies them: AES-128,
//! -192 or -256 in XTS or CBC mode, with the `plain` (32-bit), `plain64`
//! or `essiv:HASH` IV of each sector's number. RustCrypto does the
//! cryptography; this module only chooses and sequences it.

use aes::cipher::block_padding::NoPadding;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecryptMut, BlockEncrypt, BlockEncryptMut, KeyInit, KeyIvInit};
use aes::{Aes128, Aes192, Aes256};
use sha2::Digest;
use xts_mode::Xts128;
use zeroize::Zeroizing;

use crate::{ImageError, Result};

/// Bytes of an encryption sector.
pub(crate) const SECTOR: usize = 512;

/// How a sector's IV follows from its number.
#[derive(Clone)]
enum IvGen {
    /// The low 32 bits, little-endian.
    Plain,
    /// The 64 bits, little-endian.
    Plain64,
    /// The number encrypted with AES keyed by a hash of the volume key.
    Essiv(Box<Aes256>),
}

impl IvGen {
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self {
            Self::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            Self::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            Self::Essiv(cipher) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                let mut block = GenericArray::from(iv);
                cipher.encrypt_block(&mut block);
                iv.copy_from_slice(&block);
            }
        }
        iv
    }
}

/// The mode.
enum Mode {
    Xts128(Box<Xts128<Aes128>>),
    Xts256(Box<Xts128<Aes256>>),
    /// CBC with the AES key (16, 24 or 32 bytes).
    Cbc(Zeroizing<Vec<u8>>),
}

/// A volume's sector cipher, keyed (the key is zeroed when dropped).
pub(crate) struct SectorCipher {
    mode: Mode,
    ivgen: IvGen,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher { .. }")
    }
}

fn unsupported(what: String) -> ImageError {
    ImageError::Unsupported(format!("LUKS {what}"))
}

impl SectorCipher {
    /// The cipher `cipher_name` in `cipher_mode` (`xts-plain64`,
    /// `cbc-essiv:sha256`...) keyed with `key`, as a LUKS header names
    /// them.
    pub(crate) fn new(cipher_name: &str, cipher_mode: &str, key: &[u8]) -> Result<Self> {
        if cipher_name != "aes" {
            return Err(unsupported(format!("cipher '{cipher_name}'")));
        }
        let (mode, ivgen) = cipher_mode
            .split_once('-')
            .ok_or_else(|| unsupported(format!("cipher mode '{cipher_mode}'")))?;
        // A hash after plain or plain64 (QEMU writes `plain64:sha256` when
        // asked for one) changes nothing.
        let ivgen = match ivgen {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            g if g.starts_with("plain:") => IvGen::Plain,
            g if g.starts_with("plain64:") => IvGen::Plain64,
            "essiv:sha256" => {
                let salt = sha2::Sha256::digest(key);
                IvGen::Essiv(Box::new(Aes256::new(&salt)))
            }
            other => return Err(unsupported(format!("IV generator '{other}'"))),
        };
        let wrong_size = || unsupported(format!("{cipher_mode} key of {} bytes", key.len()));
        let mode = match (mode, key.len()) {
            ("xts", 32) => {
                let (a, b) = key.split_at(16);
                Mode::Xts128(Box::new(Xts128::new(
                    Aes128::new(GenericArray::from_slice(a)),
                    Aes128::new(GenericArray::from_slice(b)),
                )))
            }
            ("xts", 64) => {
                let (a, b) = key.split_at(32);
                Mode::Xts256(Box::new(Xts128::new(
                    Aes256::new(GenericArray::from_slice(a)),
                    Aes256::new(GenericArray::from_slice(b)),
                )))
            }
            ("cbc", 16 | 24 | 32) => Mode::Cbc(Zeroizing::new(key.to_vec())),
            ("xts" | "cbc", _) => return Err(wrong_size()),
            _ => return Err(unsupported(format!("cipher mode '{cipher_mode}'"))),
        };
        Ok(Self { mode, ivgen })
    }

    /// Encrypts whole sectors in place, the first being sector `first`.
    pub(crate) fn encrypt(&self, buf: &mut [u8], first: u64) {
        self.apply(buf, first, true);
    }

    /// Decrypts whole sectors in place, the first being sector `first`.
    pub(crate) fn decrypt(&self, buf: &mut [u8], first: u64) {
        self.apply(buf, first, false);
    }

    fn apply(&self, buf: &mut [u8], first: u64, encrypt: bool) {
        debug_assert!(buf.len().is_multiple_of(SECTOR));
        for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let number = first.wrapping_add(i as u64);
            let iv = self.ivgen.iv(number);
            match &self.mode {
                Mode::Xts128(x) if encrypt => x.encrypt_sector(sector, iv),
                Mode::Xts128(x) => x.decrypt_sector(sector, iv),
                Mode::Xts256(x) if encrypt => x.encrypt_sector(sector, iv),
                Mode::Xts256(x) => x.decrypt_sector(sector, iv),
                Mode::Cbc(key) => cbc_sector(key, &iv, sector, encrypt),
            }
        }
    }
}

/// CBC over one sector (32 blocks, no padding).
fn cbc_sector(key: &[u8], iv: &[u8; 16], sector: &mut [u8], encrypt: bool) {
    macro_rules! run {
        ($cipher:ty) => {
            if encrypt {
                let e = cbc::Encryptor::<$cipher>::new_from_slices(key, iv).expect("key size");
                e.encrypt_padded_mut::<NoPadding>(sector, SECTOR)
                    .expect("whole blocks");
            } else {
                let d = cbc::Decryptor::<$cipher>::new_from_slices(key, iv).expect("key size");
                d.decrypt_padded_mut::<NoPadding>(sector)
                    .expect("whole blocks");
            }
        };
    }
    match key.len() {
        16 => run!(Aes128),
        24 => run!(Aes192),
        _ => run!(Aes256),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_round_trips_and_depends_on_the_sector() {
        for (mode, len) in [
            ("xts-plain64", 64),
            ("xts-plain64", 32),
            ("xts-plain", 64),
            ("cbc-plain64", 16),
            ("cbc-essiv:sha256", 24),
            ("cbc-essiv:sha256", 32),
        ] {
            let key: Vec<u8> = (0..len as u8).collect();
            let c = SectorCipher::new("aes", mode, &key).unwrap();
            let plain: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
            let mut a = plain.clone();
            c.encrypt(&mut a, 7);
            assert_ne!(a, plain, "{mode}");
            let mut b = plain.clone();
            c.encrypt(&mut b, 8);
            assert_ne!(
                a[..SECTOR],
                b[..SECTOR],
                "{mode}: the IV follows the sector"
            );
            assert_eq!(
                a[SECTOR..2 * SECTOR],
                b[..SECTOR],
                "{mode}: sector 8 is sector 8"
            );
            c.decrypt(&mut a, 7);
            assert_eq!(a, plain, "{mode}");
        }
        assert!(SectorCipher::new("serpent", "xts-plain64", &[0; 64]).is_err());
        assert!(SectorCipher::new("aes", "xts-plain64", &[0; 24]).is_err());
        assert!(SectorCipher::new("aes", "ecb", &[0; 32]).is_err());
    }
}
