//! Persistent dirty bitmaps (the bitmaps header extension): the bitmap
//! directory, its entries' constraints, the bitmap table entries and the
//! size of a bitmap's table, as QEMU reads and writes them.

use crate::{FormatError, Result};

/// Bytes of the fixed part of a directory entry.
const ENTRY_FIXED_LEN: usize = 24;
/// Offset of the flags within an entry.
const FLAGS_AT: usize = 12;

/// Flag: the bitmap may be inconsistent (it was not saved correctly, or a
/// program that does not update it has written the image).
pub const BITMAP_IN_USE: u32 = 1 << 0;
/// Flag: the bitmap tracks writes (it is enabled).
pub const BITMAP_AUTO: u32 = 1 << 1;
/// Flags no version of the format defines.
pub const BITMAP_RESERVED_FLAGS: u32 = !(BITMAP_IN_USE | BITMAP_AUTO);
/// The one bitmap type: dirty tracking.
pub const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;
/// Smallest granularity: 512 bytes.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity: 2 GiB.
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name in bytes.
pub const MAX_NAME_SIZE: usize = 1023;
/// Most bitmaps in one image.
pub const MAX_BITMAPS: usize = 65535;
/// Largest bitmap directory in bytes.
pub const MAX_DIRECTORY_SIZE: u64 = 64 << 20;
/// Most entries in one bitmap table (QEMU's limit).
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Most bytes of bitmap data of one bitmap (QEMU's limit on its memory).
pub const MAX_BITMAP_BYTES: u64 = 0x2000_0000;

/// Reserved bits of a bitmap table entry: 1..=8 and 56..=63.
const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// The data cluster offset within a table entry.
const TABLE_ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of an entry without offset: the cluster's bits are all ones.
const TABLE_ENTRY_ALL_ONES: u64 = 1;

/// One entry of the bitmap directory, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirectoryEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries (u64) in the bitmap table.
    pub table_size: u32,
    /// Flags (bit 0 in use, bit 1 auto, bit 2 extra data compatible).
    pub flags: u32,
    /// The bitmap type (1: dirty tracking, the only one defined).
    pub bitmap_type: u8,
    /// log2 of the bytes of guest data one bit covers.
    pub granularity_bits: u8,
    /// Bytes of extra data (none is defined; QEMU refuses any).
    pub extra_data_size: u32,
    /// The bitmap's name (UTF-8 as written; invalid bytes replaced).
    pub name: String,
    /// Byte offset of the entry within the directory.
    pub position: usize,
}

impl BitmapDirectoryEntry {
    /// Whether the in-use flag is set.
    pub fn in_use(&self) -> bool {
        self.flags & BITMAP_IN_USE != 0
    }

    /// Whether the auto (enabled) flag is set.
    pub fn auto(&self) -> bool {
        self.flags & BITMAP_AUTO != 0
    }

    /// Checks the entry against the constraints QEMU enforces for an image
    /// of `virtual_size` bytes and `cluster_size`-byte clusters; a bitmap
    /// in use may have a table too small for the size (it was not saved
    /// after a resize), one not in use may not.
    pub fn validate(&self, cluster_size: u64, virtual_size: u64) -> Result<()> {
        let invalid = |why: &'static str| {
            Err(FormatError::InvalidBitmap {
                name: self.name.clone(),
                why,
            })
        };
        if self.table_size == 0 || self.table_offset == 0 {
            return invalid("it has no bitmap table");
        }
        if !self.table_offset.is_multiple_of(cluster_size.max(1)) {
            return invalid("its bitmap table is not cluster aligned");
        }
        if u64::from(self.table_size) > MAX_TABLE_SIZE
            || u64::from(self.table_size).saturating_mul(cluster_size) > MAX_BITMAP_BYTES
        {
            return invalid("its bitmap table is too large");
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return invalid("its granularity is out of range");
        }
        if self.flags & BITMAP_RESERVED_FLAGS != 0 {
            return invalid("it has reserved flags set");
        }
        if self.bitmap_type != BITMAP_TYPE_DIRTY_TRACKING {
            return invalid("its type is not dirty tracking");
        }
        if self.extra_data_size != 0 {
            return invalid("it has extra data");
        }
        let needed = bitmap_table_size(virtual_size, self.granularity_bits, cluster_size);
        if !self.in_use() && u64::from(self.table_size) < needed {
            return invalid("its bitmap table is too small for the disk");
        }
        Ok(())
    }
}

/// A new directory entry, for [`encode_bitmap_directory`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBitmapEntry<'a> {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags ([`BITMAP_IN_USE`], [`BITMAP_AUTO`]).
    pub flags: u32,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// The name (at most [`MAX_NAME_SIZE`] bytes).
    pub name: &'a str,
}

/// Encodes a bitmap directory: each entry 24 fixed bytes, no extra data,
/// its name, padded to a multiple of 8.
pub fn encode_bitmap_directory(entries: &[NewBitmapEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let name = &e.name.as_bytes()[..e.name.len().min(MAX_NAME_SIZE)];
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(BITMAP_TYPE_DIRTY_TRACKING);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(name);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

/// Bytes of a directory entry named `name`.
pub fn directory_entry_size(name: &str) -> u64 {
    (name
        .len()
        .min(MAX_NAME_SIZE)
        .saturating_add(ENTRY_FIXED_LEN))
    .next_multiple_of(8) as u64
}

/// Entries of the bitmap table of a bitmap of `granularity_bits` over
/// `virtual_size` bytes: one per cluster of its data, the data being one
/// bit per granule, stored in 64-bit words (as QEMU serializes it).
pub fn bitmap_table_size(virtual_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    let bits = virtual_size.div_ceil(1u64 << granularity_bits.min(63));
    let bytes = bits.div_ceil(64).saturating_mul(8);
    bytes.div_ceil(cluster_size.max(1))
}

/// One entry of a bitmap table: where one cluster of the bitmap's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapTableEntry {
    /// No cluster: every bit it covers is clear.
    Zeros,
    /// No cluster: every bit it covers is set.
    Ones,
    /// The data is in the cluster at this host offset.
    Data(u64),
}

impl BitmapTableEntry {
    /// Decodes a raw entry, refusing reserved bits, an unaligned offset and
    /// the all-ones flag beside an offset.
    pub fn decode(raw: u64, cluster_size: u64) -> Result<Self> {
        let offset = raw & TABLE_ENTRY_OFFSET;
        let bad = raw & TABLE_ENTRY_RESERVED != 0
            || (offset != 0
                && (raw & TABLE_ENTRY_ALL_ONES != 0
                    || !offset.is_multiple_of(cluster_size.max(1))));
        if bad {
            return Err(FormatError::InvalidBitmapTableEntry(raw));
        }
        Ok(match (offset, raw & TABLE_ENTRY_ALL_ONES) {
            (0, 0) => Self::Zeros,
            (0, _) => Self::Ones,
            (offset, _) => Self::Data(offset),
        })
    }

    /// The raw entry.
    pub fn encode(self) -> u64 {
        match self {
            Self::Zeros => 0,
            Self::Ones => TABLE_ENTRY_ALL_ONES,
            Self::Data(offset) => offset & TABLE_ENTRY_OFFSET,
        }
    }
}

/// Sets the in-use flag of every entry of the directory bytes `dir` (as
/// parsed into `entries`), as the specification requires before a program
/// that does not update the bitmaps writes the image.
pub fn mark_in_use(dir: &mut [u8], entries: &[BitmapDirectoryEntry]) -> Result<()> {
    let available = dir.len() as u64;
    for e in entries {
        let at = e.position.saturating_add(FLAGS_AT);
        let flags: &mut [u8; 4] = dir
            .get_mut(at..at.saturating_add(4))
            .and_then(|f| f.try_into().ok())
            .ok_or(FormatError::Truncated {
                what: "bitmap directory",
                needed: at as u64,
                available,
            })?;
        *flags = (u32::from_be_bytes(*flags) | BITMAP_IN_USE).to_be_bytes();
    }
    Ok(())
}

/// Decodes `count` entries from the directory bytes `dir`. Each entry is
/// 24 fixed bytes, its extra data, its name, padded to a multiple of 8.
pub fn parse_bitmap_directory(dir: &[u8], count: u32) -> Result<Vec<BitmapDirectoryEntry>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let truncated = |needed: Option<usize>| FormatError::Truncated {
        what: "bitmap directory",
        needed: needed.map_or(u64::MAX, |n| n as u64),
        available: dir.len() as u64,
    };
    for _ in 0..count {
        let fixed_end = pos.checked_add(ENTRY_FIXED_LEN);
        let fixed: &[u8; ENTRY_FIXED_LEN] = fixed_end
            .and_then(|end| dir.get(pos..end))
            .and_then(|f| f.try_into().ok())
            .ok_or_else(|| truncated(fixed_end))?;
        let be32 = |at: [usize; 4]| u32::from_be_bytes(at.map(|i| fixed[i]));
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&fixed[..8]);
        let name_size = usize::from(u16::from_be_bytes([fixed[18], fixed[19]]));
        let extra = be32([20, 21, 22, 23]) as usize;
        let name_start = fixed_end.and_then(|end| end.checked_add(extra));
        let name_end = name_start.and_then(|start| start.checked_add(name_size));
        let name = name_start
            .zip(name_end)
            .and_then(|(start, end)| dir.get(start..end))
            .ok_or_else(|| truncated(name_end))?;
        out.push(BitmapDirectoryEntry {
            table_offset: u64::from_be_bytes(offset),
            table_size: be32([8, 9, 10, 11]),
            flags: be32([12, 13, 14, 15]),
            bitmap_type: fixed[16],
            granularity_bits: fixed[17],
            extra_data_size: be32([20, 21, 22, 23]),
            name: String::from_utf8_lossy(name).into_owned(),
            position: pos,
        });
        // name_end <= dir.len(), so rounding up to 8 cannot overflow.
        pos = name_end.map_or(usize::MAX, |end| end.next_multiple_of(8));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(table: u64, size: u32, name: &str) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&table.to_be_bytes());
        e.extend_from_slice(&size.to_be_bytes());
        e.extend_from_slice(&BITMAP_AUTO.to_be_bytes());
        e.extend_from_slice(&[1, 16]);
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes());
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().next_multiple_of(8), 0);
        e
    }

    #[test]
    fn decodes_entries_and_refuses_truncation() {
        let mut dir = entry(0x30000, 2, "b0");
        dir.extend(entry(0x50000, 1, "longer-name"));
        let parsed = parse_bitmap_directory(&dir, 2).unwrap();
        assert_eq!(parsed[0].table_offset, 0x30000);
        assert_eq!(parsed[0].name, "b0");
        assert_eq!(parsed[1].table_size, 1);
        assert_eq!(parsed[1].granularity_bits, 16);
        assert_eq!(parsed[1].name, "longer-name");
        assert!(parse_bitmap_directory(&dir, 3).is_err());
        assert!(parse_bitmap_directory(&dir[..30], 2).is_err());
    }

    #[test]
    fn marks_every_entry_in_use_and_keeps_the_rest() {
        let mut dir = entry(0x30000, 2, "b0");
        dir.extend(entry(0x50000, 1, "longer-name"));
        let before = parse_bitmap_directory(&dir, 2).unwrap();
        assert!(before.iter().all(|e| !e.in_use()));
        mark_in_use(&mut dir, &before).unwrap();
        let after = parse_bitmap_directory(&dir, 2).unwrap();
        for (b, a) in before.iter().zip(&after) {
            assert!(a.in_use());
            assert_eq!(a.flags, b.flags | BITMAP_IN_USE);
            assert_eq!((a.table_offset, &a.name), (b.table_offset, &b.name));
        }
        assert!(mark_in_use(&mut dir[..20], &before).is_err());
    }
}
