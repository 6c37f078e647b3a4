//! Adding and erasing LUKS key slots of an open image, as `qemu-img amend
//! -o encrypt.state=active|inactive` does: a new slot's material is
//! written and synced before the header names it; an erased slot is
//! dropped from the header (synced) before its material is overwritten
//! with random bytes. The last active slot is erased only when forced: it
//! would leave the data unreadable for ever.

use qcow2_alloc::Storage;
use qcow2_format::luks::{LuksHeader, LUKS_HEADER_LEN, LUKS_STRIPES};
use qcow2_format::Header;
use zeroize::Zeroizing;

use super::cipher::{SectorCipher, SECTOR};
use super::keys::{self, Hash};
use super::luks_area;
use crate::options::Secret;
use crate::{ImageError, Result};

/// The LUKS header of `header`'s image and where it is.
fn read_luks(storage: &dyn Storage, header: &Header) -> Result<(LuksHeader, u64, u64)> {
    let (offset, length) = luks_area(storage, header)?;
    let mut bytes = vec![0u8; LUKS_HEADER_LEN];
    storage
        .read_at(&mut bytes, offset)
        .map_err(ImageError::io("reading the LUKS header"))?;
    Ok((LuksHeader::parse(&bytes)?, offset, length))
}

fn write_synced(storage: &dyn Storage, bytes: &[u8], at: u64, what: &'static str) -> Result<()> {
    storage.write_at(bytes, at).map_err(ImageError::io(what))?;
    storage.flush().map_err(ImageError::io(what))
}

/// Puts `secret` into key slot `slot` (the first free one when `None`)
/// with PBKDF2 tuned to `iter_time_ms`; returns the slot.
pub(crate) fn add(
    storage: &dyn Storage,
    header: &Header,
    volume_key: &[u8],
    secret: &Secret,
    slot: Option<usize>,
    iter_time_ms: u64,
) -> Result<usize> {
    let (mut luks, offset, length) = read_luks(storage, header)?;
    let index = match slot {
        Some(i) if i >= luks.slots.len() => {
            return Err(ImageError::InvalidOption(format!(
                "key slot {i} does not exist (0..=7)"
            )))
        }
        Some(i) if luks.slots[i].active => {
            return Err(ImageError::InvalidOption(format!("key slot {i} is in use")))
        }
        Some(i) => i,
        None => luks
            .slots
            .iter()
            .position(|s| !s.active)
            .ok_or_else(|| ImageError::InvalidOption("every key slot is in use".into()))?,
    };
    let hash = Hash::named(&luks.hash_spec)?;
    let rate = keys::pbkdf2_rate(hash, luks.key_bytes as usize);
    let iterations = (rate.saturating_mul(iter_time_ms) / 1000).clamp(1000, u64::from(u32::MAX));
    let mut salt = [0u8; 32];
    keys::random(&mut salt)?;
    let mut slot_key = Zeroizing::new(vec![0u8; luks.key_bytes as usize]);
    hash.pbkdf2(secret.bytes(), &salt, iterations as u32, &mut slot_key);
    let mut material = keys::af_split(volume_key, LUKS_STRIPES as usize, hash)?;
    let start = u64::from(luks.slots[index].key_offset) * SECTOR as u64;
    luks.slots[index].stripes = LUKS_STRIPES;
    let sectors = keys::material_sectors(&luks, &luks.slots[index]) as usize;
    if start + (sectors * SECTOR) as u64 > length {
        return Err(ImageError::Corrupt(
            "a LUKS key slot's material lies outside the LUKS header".into(),
        ));
    }
    material.resize(sectors * SECTOR, 0);
    SectorCipher::new(&luks.cipher_name, &luks.cipher_mode, &slot_key)?.encrypt(&mut material, 0);
    write_synced(
        storage,
        &material,
        offset + start,
        "writing LUKS key material",
    )?;
    let slot = &mut luks.slots[index];
    slot.active = true;
    slot.iterations = iterations as u32;
    slot.salt = salt;
    write_synced(storage, &luks.encode(), offset, "writing the LUKS header")?;
    Ok(index)
}

/// Erases key slot `slot`, or every slot `secret` opens; returns them.
pub(crate) fn erase(
    storage: &dyn Storage,
    header: &Header,
    slot: Option<usize>,
    secret: Option<&Secret>,
    force: bool,
) -> Result<Vec<usize>> {
    let (mut luks, offset, _) = read_luks(storage, header)?;
    let chosen: Vec<usize> =
        match (slot, secret) {
            (Some(i), _) if i >= luks.slots.len() || !luks.slots[i].active => {
                return Err(ImageError::InvalidOption(format!(
                    "key slot {i} is not in use"
                )))
            }
            (Some(i), _) => vec![i],
            (None, Some(secret)) => (0..luks.slots.len())
                .filter(|&i| luks.slots[i].active && opens(storage, &luks, offset, i, secret))
                .collect(),
            (None, None) => return Err(ImageError::InvalidOption(
                "name the key slot to erase (encrypt.keyslot) or its secret (encrypt.old-secret)"
                    .into(),
            )),
        };
    if chosen.is_empty() {
        return Err(ImageError::WrongPassphrase);
    }
    let active = luks.slots.iter().filter(|s| s.active).count();
    if active == chosen.len() && !force {
        return Err(ImageError::InvalidOption(
            "erasing every active key slot would leave the data unreadable for ever (use --force)"
                .into(),
        ));
    }
    for &i in &chosen {
        let s = &mut luks.slots[i];
        s.active = false;
        s.iterations = 0;
        s.salt = [0; 32];
    }
    write_synced(storage, &luks.encode(), offset, "writing the LUKS header")?;
    for &i in &chosen {
        let start = u64::from(luks.slots[i].key_offset) * SECTOR as u64;
        let mut noise = vec![0u8; keys::material_sectors(&luks, &luks.slots[i]) as usize * SECTOR];
        keys::random(&mut noise)?;
        write_synced(storage, &noise, offset + start, "erasing LUKS key material")?;
    }
    Ok(chosen)
}

/// Whether `secret` opens key slot `index`.
fn opens(
    storage: &dyn Storage,
    luks: &LuksHeader,
    offset: u64,
    index: usize,
    secret: &Secret,
) -> bool {
    let mut only = luks.clone();
    for (i, s) in only.slots.iter_mut().enumerate() {
        s.active = i == index;
    }
    keys::unlock(&only, secret.bytes(), |slot| {
        let start = u64::from(slot.key_offset) * SECTOR as u64;
        let mut material = vec![0u8; keys::material_sectors(&only, slot) as usize * SECTOR];
        storage
            .read_at(&mut material, offset + start)
            .map_err(ImageError::io("reading LUKS key material"))?;
        Ok(material)
    })
    .is_ok()
}
