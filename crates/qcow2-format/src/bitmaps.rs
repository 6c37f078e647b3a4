//! The bitmap directory of the bitmaps header extension (persistent dirty
//! bitmaps): where each bitmap's table is, so that a consistency check can
//! count the clusters bitmaps own.

use crate::{FormatError, Result};

/// Bytes of the fixed part of a directory entry.
const ENTRY_FIXED_LEN: usize = 24;

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
}

/// Decodes `count` entries from the directory bytes `dir`. Each entry is
/// 24 fixed bytes, its extra data, its name, padded to a multiple of 8.
pub fn parse_bitmap_directory(dir: &[u8], count: u32) -> Result<Vec<BitmapDirectoryEntry>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..count {
        let truncated = |needed: usize| FormatError::Truncated {
            what: "bitmap directory",
            needed: needed as u64,
            available: dir.len() as u64,
        };
        let fixed = dir
            .get(pos..pos + ENTRY_FIXED_LEN)
            .ok_or_else(|| truncated(pos + ENTRY_FIXED_LEN))?;
        let be32 = |at: usize| {
            u32::from_be_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]])
        };
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&fixed[..8]);
        let name_size = usize::from(u16::from_be_bytes([fixed[18], fixed[19]]));
        let extra = be32(20) as usize;
        let name_start = pos + ENTRY_FIXED_LEN + extra;
        let name = dir
            .get(name_start..name_start + name_size)
            .ok_or_else(|| truncated(name_start + name_size))?;
        out.push(BitmapDirectoryEntry {
            table_offset: u64::from_be_bytes(offset),
            table_size: be32(8),
            flags: be32(12),
            granularity_bits: fixed[17],
            name: String::from_utf8_lossy(name).into_owned(),
        });
        pos = (name_start + name_size).next_multiple_of(8);
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
        e.extend_from_slice(&1u32.to_be_bytes());
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
}
