//! The bitmap directory of the bitmaps header extension (persistent dirty
//! bitmaps): where each bitmap's table is, so that a consistency check can
//! count the clusters bitmaps own.

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

/// One entry of the bitmap directory, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirectoryEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries (u64) in the bitmap table.
    pub table_size: u32,
    /// Flags (bit 0 in use, bit 1 auto, bit 2 extra data compatible).
    pub flags: u32,
    /// log2 of the bytes of guest data one bit covers.
    pub granularity_bits: u8,
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
            granularity_bits: fixed[17],
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
