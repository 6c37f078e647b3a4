//! [`SectorCipher`]: a LUKS volume's cipher, mode and IV generator over
//! 512-byte sectors, as QEMU's `crypto/block.c` applies them: AES,
//! Serpent or Twofish in XTS or CBC mode, CAST5 in CBC, with the `plain`
//! (32-bit), `plain64` or `essiv:sha256` IV of each sector's number.
//! RustCrypto does the cryptography (`aes`, `serpent`, `twofish`, `cast5`,
//! `xts-mode`, `cbc`); this module only chooses and sequences it.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::typenum::U16;
use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, BlockSizeUser,
    InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use cast5::Cast5;
use serpent::Serpent;
use sha2::Digest;
use twofish::Twofish;
use xts_mode::Xts128;

use crate::{ImageError, Result};

/// Bytes of an encryption sector.
pub(crate) const SECTOR: usize = 512;

/// A 16-byte block cipher that encrypts one block (the ESSIV generator).
trait BlockEncrypt16: Send + Sync {
    fn encrypt16(&self, block: &mut [u8; 16]);
}

impl<C: BlockEncrypt + BlockSizeUser<BlockSize = U16> + Send + Sync> BlockEncrypt16 for C {
    fn encrypt16(&self, block: &mut [u8; 16]) {
        let mut b = GenericArray::from(*block);
        self.encrypt_block(&mut b);
        block.copy_from_slice(&b);
    }
}

/// How a sector's IV follows from its number.
enum IvGen {
    /// The low 32 bits, little-endian.
    Plain,
    /// The 64 bits, little-endian.
    Plain64,
    /// The number encrypted by the volume's cipher family keyed with the
    /// SHA-256 of the volume key.
    Essiv(Box<dyn BlockEncrypt16>),
}

impl IvGen {
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self {
            Self::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            Self::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            Self::Essiv(cipher) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                cipher.encrypt16(&mut iv);
            }
        }
        iv
    }
}

/// A mode of one cipher applied to one sector.
trait SectorMode: Send + Sync {
    fn apply(&self, sector: &mut [u8], iv: &[u8; 16], encrypt: bool);
}

/// XTS of a 16-byte block cipher.
struct Xts<C: BlockEncrypt + BlockDecrypt + BlockCipher>(Xts128<C>);

impl<C> SectorMode for Xts<C>
where
    C: BlockEncrypt + BlockDecrypt + BlockCipher + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    fn apply(&self, sector: &mut [u8], iv: &[u8; 16], encrypt: bool) {
        if encrypt {
            self.0.encrypt_sector(sector, *iv);
        } else {
            self.0.decrypt_sector(sector, *iv);
        }
    }
}

/// CBC of a block cipher (its block's bytes of the IV), no padding; the
/// keyed cipher is cloned for each sector's chain.
struct Cbc<C>(C);

impl<C> SectorMode for Cbc<C>
where
    C: BlockEncryptMut + BlockDecryptMut + BlockCipher + Clone + Send + Sync,
{
    fn apply(&self, sector: &mut [u8], iv: &[u8; 16], encrypt: bool) {
        // A sector is a whole number of blocks of every cipher here.
        let iv = GenericArray::from_slice(&iv[..C::block_size()]);
        let blocks = sector.chunks_exact_mut(C::block_size());
        if encrypt {
            let mut e = cbc::Encryptor::<C>::inner_iv_init(self.0.clone(), iv);
            for block in blocks {
                e.encrypt_block_mut(GenericArray::from_mut_slice(block));
            }
        } else {
            let mut d = cbc::Decryptor::<C>::inner_iv_init(self.0.clone(), iv);
            for block in blocks {
                d.decrypt_block_mut(GenericArray::from_mut_slice(block));
            }
        }
    }
}

/// A volume's sector cipher, keyed (the key is zeroed when dropped).
pub(crate) struct SectorCipher {
    mode: Box<dyn SectorMode>,
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

/// XTS keyed with the two halves of `key`.
fn xts<C>(key: &[u8]) -> Option<Box<dyn SectorMode>>
where
    C: KeyInit + BlockEncrypt + BlockDecrypt + BlockCipher + BlockSizeUser<BlockSize = U16>,
    C: Send + Sync + 'static,
{
    let (a, b) = key.split_at(key.len() / 2);
    let xts = Xts128::new(C::new_from_slice(a).ok()?, C::new_from_slice(b).ok()?);
    Some(Box::new(Xts(xts)))
}

/// CBC keyed with `key`.
fn cbc<C>(key: &[u8]) -> Option<Box<dyn SectorMode>>
where
    C: KeyInit + BlockEncryptMut + BlockDecryptMut + BlockCipher + Clone + Send + Sync + 'static,
{
    Some(Box::new(Cbc(C::new_from_slice(key).ok()?)))
}

impl SectorCipher {
    /// The cipher `cipher_name` (`aes`, `serpent`, `twofish`, `cast5`) in
    /// `cipher_mode` (`xts-plain64`, `cbc-essiv:sha256`...) keyed with
    /// `key`, as a LUKS header names them.
    pub(crate) fn new(cipher_name: &str, cipher_mode: &str, key: &[u8]) -> Result<Self> {
        let (mode, ivgen) = cipher_mode
            .split_once('-')
            .ok_or_else(|| unsupported(format!("cipher mode '{cipher_mode}'")))?;
        let ivgen = match ivgen {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            // A hash after plain or plain64 (QEMU writes `plain64:sha256`
            // when asked for one) changes nothing.
            g if g.starts_with("plain:") => IvGen::Plain,
            g if g.starts_with("plain64:") => IvGen::Plain64,
            "essiv:sha256" => {
                let salt = sha2::Sha256::digest(key);
                let essiv = || unsupported(format!("ESSIV with cipher '{cipher_name}'"));
                let cipher: Box<dyn BlockEncrypt16> = match cipher_name {
                    "aes" => Box::new(Aes256::new(&salt)),
                    "serpent" => Box::new(Serpent::new_from_slice(&salt).map_err(|_| essiv())?),
                    "twofish" => Box::new(Twofish::new_from_slice(&salt).map_err(|_| essiv())?),
                    _ => return Err(essiv()),
                };
                IvGen::Essiv(cipher)
            }
            other => return Err(unsupported(format!("IV generator '{other}'"))),
        };
        let half = key.len() / 2;
        let chosen = match (cipher_name, mode) {
            ("aes", "xts") if key.len().is_multiple_of(2) => match half {
                16 => xts::<Aes128>(key),
                24 => xts::<Aes192>(key),
                32 => xts::<Aes256>(key),
                _ => None,
            },
            ("aes", "cbc") => match key.len() {
                16 => cbc::<Aes128>(key),
                24 => cbc::<Aes192>(key),
                32 => cbc::<Aes256>(key),
                _ => None,
            },
            ("serpent", "xts") if matches!(half, 16 | 24 | 32) && key.len().is_multiple_of(2) => {
                xts::<Serpent>(key)
            }
            ("serpent", "cbc") if matches!(key.len(), 16 | 24 | 32) => cbc::<Serpent>(key),
            ("twofish", "xts") if matches!(half, 16 | 24 | 32) && key.len().is_multiple_of(2) => {
                xts::<Twofish>(key)
            }
            ("twofish", "cbc") if matches!(key.len(), 16 | 24 | 32) => cbc::<Twofish>(key),
            ("cast5", "cbc") if key.len() == 16 => cbc::<Cast5>(key),
            ("aes" | "serpent" | "twofish" | "cast5", "xts" | "cbc") => None,
            (name, mode) => {
                return Err(unsupported(format!("cipher '{name}' in mode '{mode}'")));
            }
        };
        let mode = chosen.ok_or_else(|| {
            unsupported(format!(
                "{cipher_name}-{cipher_mode} with a {}-byte key",
                key.len()
            ))
        })?;
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
            let iv = self.ivgen.iv(first.wrapping_add(i as u64));
            self.mode.apply(sector, &iv, encrypt);
        }
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
        for (name, mode, len) in [
            ("serpent", "xts-plain64", 64),
            ("twofish", "cbc-essiv:sha256", 16),
            ("cast5", "cbc-plain64", 16),
            ("aes", "xts-plain64", 48),
        ] {
            let c = SectorCipher::new(name, mode, &vec![3u8; len]).unwrap();
            let mut a = vec![9u8; 1024];
            c.encrypt(&mut a, 1);
            assert_ne!(a, vec![9u8; 1024]);
            c.decrypt(&mut a, 1);
            assert_eq!(a, vec![9u8; 1024], "{name}-{mode}");
        }
        assert!(SectorCipher::new("cast5", "xts-plain64", &[0; 32]).is_err());
        assert!(SectorCipher::new("sm4", "xts-plain64", &[0; 32]).is_err());
        assert!(SectorCipher::new("aes", "xts-plain64", &[0; 24]).is_err());
        assert!(SectorCipher::new("aes", "ecb", &[0; 32]).is_err());
    }
}
