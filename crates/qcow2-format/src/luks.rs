//! The LUKS1 header that a LUKS-encrypted qcow2 image keeps in its own
//! clusters (where the full-disk-encryption header extension says), as
//! `cryptsetup`'s on-disk format document and QEMU's `crypto/block-luks.c`
//! lay it out: 592 big-endian bytes, the last 384 being eight key slots.
//! Key material offsets count 512-byte sectors from the header's start;
//! the payload offset is unused inside qcow2 (data lives in clusters).

use crate::{FormatError, Result};

/// `LUKS\xba\xbe`.
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of the header proper.
pub const LUKS_HEADER_LEN: usize = 592;
/// Key slots.
pub const LUKS_KEY_SLOTS: usize = 8;
/// Stripes of the anti-forensic split of a key slot's material.
pub const LUKS_STRIPES: u32 = 4000;
/// Bytes of the master key digest.
pub const LUKS_DIGEST_LEN: usize = 20;
/// Bytes of a salt.
pub const LUKS_SALT_LEN: usize = 32;
/// A slot in use.
pub const SLOT_ACTIVE: u32 = 0x00AC_71F3;
/// A slot not in use.
pub const SLOT_INACTIVE: u32 = 0x0000_DEAD;

/// One key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Whether the slot holds a key ([`SLOT_ACTIVE`]).
    pub active: bool,
    /// PBKDF2 iterations that turn the passphrase into the slot's key.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; LUKS_SALT_LEN],
    /// Where the slot's key material starts, in sectors from the header.
    pub key_offset: u32,
    /// Stripes of the anti-forensic split (4000).
    pub stripes: u32,
}

/// The LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher name (`aes`, `serpent`, `twofish`, `cast5`, `sm4`).
    pub cipher_name: String,
    /// Cipher mode with its IV generator (`xts-plain64`, `cbc-essiv:sha256`).
    pub cipher_mode: String,
    /// Hash of PBKDF2 and of the anti-forensic split (`sha256`, `sha1`...).
    pub hash_spec: String,
    /// Unused in qcow2 (sectors from the header to the payload).
    pub payload_offset: u32,
    /// Bytes of the master key (64 for aes-256-xts).
    pub key_bytes: u32,
    /// PBKDF2 of the master key, to check a candidate.
    pub mk_digest: [u8; LUKS_DIGEST_LEN],
    /// Its salt.
    pub mk_digest_salt: [u8; LUKS_SALT_LEN],
    /// Its iterations.
    pub mk_digest_iterations: u32,
    /// The volume's UUID, as text.
    pub uuid: String,
    /// The key slots.
    pub slots: Vec<KeySlot>,
}

/// The `N` bytes of `buf` from `at` (a constant offset inside the header).
#[allow(clippy::arithmetic_side_effects)]
fn bytes<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[at..at + N]);
    out
}

fn text(field: &[u8]) -> Result<String> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end])
        .map(str::to_string)
        .map_err(|_| FormatError::InvalidLuks("a name is not text"))
}

// `len` is one of the header's fixed field sizes (32 or 40).
#[allow(clippy::arithmetic_side_effects)]
fn put_text(out: &mut Vec<u8>, value: &str, len: usize) {
    let bytes = value.as_bytes();
    let n = bytes.len().min(len - 1);
    out.extend_from_slice(&bytes[..n]);
    out.resize(out.len() + len - n, 0);
}

impl LuksHeader {
    /// Decodes the header from its first [`LUKS_HEADER_LEN`] bytes,
    /// refusing another magic or version, a key size outside 1..=256, and
    /// slots whose material overlaps the header.
    // Every index is a constant offset inside the fixed 592-byte array.
    #[allow(clippy::arithmetic_side_effects)]
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let buf: &[u8; LUKS_HEADER_LEN] = buf
            .get(..LUKS_HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(FormatError::Truncated {
                what: "LUKS header",
                needed: LUKS_HEADER_LEN as u64,
                available: buf.len() as u64,
            })?;
        if buf[..6] != LUKS_MAGIC {
            return Err(FormatError::InvalidLuks("no LUKS magic"));
        }
        if u16::from_be_bytes([buf[6], buf[7]]) != 1 {
            return Err(FormatError::InvalidLuks("not LUKS version 1"));
        }
        let be32 = |at: usize| u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let key_bytes = be32(108);
        if key_bytes == 0 || key_bytes > 256 {
            return Err(FormatError::InvalidLuks("master key size out of range"));
        }
        let mut slots = Vec::with_capacity(LUKS_KEY_SLOTS);
        for i in 0..LUKS_KEY_SLOTS {
            let at = 208 + 48 * i;
            let state = be32(at);
            if state != SLOT_ACTIVE && state != SLOT_INACTIVE {
                return Err(FormatError::InvalidLuks(
                    "a key slot's state is neither on nor off",
                ));
            }
            let slot = KeySlot {
                active: state == SLOT_ACTIVE,
                iterations: be32(at + 4),
                salt: bytes(buf, at + 8),
                key_offset: be32(at + 40),
                stripes: be32(at + 44),
            };
            if slot.active
                && (slot.stripes != LUKS_STRIPES
                    || slot.iterations == 0
                    || u64::from(slot.key_offset) * 512 < LUKS_HEADER_LEN as u64)
            {
                return Err(FormatError::InvalidLuks("an active key slot is malformed"));
            }
            slots.push(slot);
        }
        Ok(Self {
            cipher_name: text(&buf[8..40])?,
            cipher_mode: text(&buf[40..72])?,
            hash_spec: text(&buf[72..104])?,
            payload_offset: be32(104),
            key_bytes,
            mk_digest: bytes(buf, 112),
            mk_digest_salt: bytes(buf, 132),
            mk_digest_iterations: be32(164),
            uuid: text(&buf[168..208])?,
            slots,
        })
    }

    /// Bytes of one slot's key material: the key split into its stripes.
    pub fn material_len(&self, slot: &KeySlot) -> u64 {
        u64::from(self.key_bytes).saturating_mul(u64::from(slot.stripes))
    }

    /// Encodes the header ([`LUKS_HEADER_LEN`] bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LUKS_HEADER_LEN);
        out.extend_from_slice(&LUKS_MAGIC);
        out.extend_from_slice(&1u16.to_be_bytes());
        put_text(&mut out, &self.cipher_name, 32);
        put_text(&mut out, &self.cipher_mode, 32);
        put_text(&mut out, &self.hash_spec, 32);
        out.extend_from_slice(&self.payload_offset.to_be_bytes());
        out.extend_from_slice(&self.key_bytes.to_be_bytes());
        out.extend_from_slice(&self.mk_digest);
        out.extend_from_slice(&self.mk_digest_salt);
        out.extend_from_slice(&self.mk_digest_iterations.to_be_bytes());
        put_text(&mut out, &self.uuid, 40);
        for slot in &self.slots {
            let state = if slot.active {
                SLOT_ACTIVE
            } else {
                SLOT_INACTIVE
            };
            out.extend_from_slice(&state.to_be_bytes());
            out.extend_from_slice(&slot.iterations.to_be_bytes());
            out.extend_from_slice(&slot.salt);
            out.extend_from_slice(&slot.key_offset.to_be_bytes());
            out.extend_from_slice(&slot.stripes.to_be_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LuksHeader {
        LuksHeader {
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash_spec: "sha256".into(),
            payload_offset: 4040,
            key_bytes: 64,
            mk_digest: [7; 20],
            mk_digest_salt: [8; 32],
            mk_digest_iterations: 1000,
            uuid: "b6f1aa15-3219-439c-8201-c20ee841266b".into(),
            slots: (0..8)
                .map(|i| KeySlot {
                    active: i == 0,
                    iterations: 5000,
                    salt: [i as u8; 32],
                    key_offset: 8 + 504 * i,
                    stripes: LUKS_STRIPES,
                })
                .collect(),
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let h = sample();
        let bytes = h.encode();
        assert_eq!(bytes.len(), LUKS_HEADER_LEN);
        assert_eq!(LuksHeader::parse(&bytes).unwrap(), h);
        assert_eq!(h.material_len(&h.slots[0]), 256_000);
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(LuksHeader::parse(&bad).is_err());
        let mut bad = bytes.clone();
        bad[208..212].copy_from_slice(&1u32.to_be_bytes());
        assert!(LuksHeader::parse(&bad).is_err());
        let mut bad = bytes.clone();
        bad[108..112].copy_from_slice(&0u32.to_be_bytes());
        assert!(LuksHeader::parse(&bad).is_err());
        assert!(LuksHeader::parse(&bytes[..500]).is_err());
    }
}
