//! Internal snapshot table entries.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{FormatError, Geometry, HostOffset, Result};

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RawSnapshotHeader {
    l1_table_offset: U64,
    l1_size: U32,
    id_str_size: U16,
    name_size: U16,
    date_sec: U32,
    date_nsec: U32,
    vm_clock_nsec: U64,
    vm_state_size: U32,
    extra_data_size: U32,
}

const FIXED: usize = 40;
/// QEMU's limit on the extra data of one snapshot entry.
pub const MAX_EXTRA_DATA: u32 = 1024;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Cluster-aligned offset of the snapshot's L1 table.
    pub l1_table_offset: HostOffset,
    /// Entries of that L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Sub-second part of the creation time.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit extra field when present).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken, if recorded.
    pub disk_size: Option<u64>,
    /// Extra data as stored (kept verbatim so unknown fields survive).
    pub extra: Vec<u8>,
}

impl Snapshot {
    /// Bytes this entry occupies in the table, padding included.
    pub fn encoded_len(&self) -> usize {
        [self.extra.len(), self.id.len(), self.name.len()]
            .into_iter()
            .fold(FIXED, usize::saturating_add)
            .next_multiple_of(8)
    }

    /// Serialises the entry, padded to a multiple of 8.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawSnapshotHeader {
            l1_table_offset: self.l1_table_offset.get().into(),
            l1_size: self.l1_size.into(),
            id_str_size: (self.id.len() as u16).into(),
            name_size: (self.name.len() as u16).into(),
            date_sec: self.date_sec.into(),
            date_nsec: self.date_nsec.into(),
            vm_clock_nsec: self.vm_clock_nsec.into(),
            vm_state_size: (self.vm_state_size.min(u64::from(u32::MAX)) as u32).into(),
            extra_data_size: (self.extra.len() as u32).into(),
        };
        let mut out = raw.as_bytes().to_vec();
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(self.encoded_len(), 0);
        out
    }
}

/// Parses `count` snapshot entries from `table` (the bytes at
/// `snapshots_offset`). Every length is checked against the buffer.
pub fn parse_snapshot_table(table: &[u8], count: u32, geometry: Geometry) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..count {
        let rest = &table[pos.min(table.len())..];
        let (raw, _) = RawSnapshotHeader::ref_from_prefix(rest)
            .map_err(|_| FormatError::InvalidSnapshot("entry header past the table end"))?;
        let extra_len = raw.extra_data_size.get();
        if extra_len > MAX_EXTRA_DATA {
            return Err(FormatError::InvalidSnapshot("extra data too large"));
        }
        let id_len = usize::from(raw.id_str_size.get());
        let name_len = usize::from(raw.name_size.get());
        // Each part is at most 1 MiB or 64 KiB: the sum cannot overflow.
        let strings_start = FIXED.saturating_add(extra_len as usize);
        let total = strings_start
            .saturating_add(id_len)
            .saturating_add(name_len);
        if total > rest.len() {
            return Err(FormatError::InvalidSnapshot("entry past the table end"));
        }
        let l1_table_offset = raw.l1_table_offset.get();
        if !geometry.is_aligned(l1_table_offset) {
            return Err(FormatError::Unaligned {
                what: "snapshot L1 table",
                offset: l1_table_offset,
            });
        }
        if u64::from(raw.l1_size.get()) > crate::MAX_L1_BYTES / 8 {
            return Err(FormatError::TooLarge {
                what: "snapshot L1 table",
                value: u64::from(raw.l1_size.get()),
                limit: crate::MAX_L1_BYTES / 8,
            });
        }
        let extra = rest[FIXED..strings_start].to_vec();
        let field = |at: usize| {
            extra
                .get(at..)
                .and_then(|b| b.first_chunk::<8>())
                .map(|b| u64::from_be_bytes(*b))
        };
        let strings = &rest[strings_start..total];
        out.push(Snapshot {
            l1_table_offset: HostOffset::new(l1_table_offset),
            l1_size: raw.l1_size.get(),
            id: String::from_utf8_lossy(&strings[..id_len]).into_owned(),
            name: String::from_utf8_lossy(&strings[id_len..]).into_owned(),
            date_sec: raw.date_sec.get(),
            date_nsec: raw.date_nsec.get(),
            vm_clock_nsec: raw.vm_clock_nsec.get(),
            vm_state_size: field(0).unwrap_or(u64::from(raw.vm_state_size.get())),
            disk_size: field(8),
            extra,
        });
        pos = pos.saturating_add(total.next_multiple_of(8));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut extra = 0u64.to_be_bytes().to_vec();
        extra.extend_from_slice(&(1u64 << 30).to_be_bytes());
        Snapshot {
            l1_table_offset: HostOffset::new(0x50000),
            l1_size: 2,
            id: "1".into(),
            name: "before-upgrade".into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(1 << 30),
            extra,
        }
    }

    #[test]
    fn round_trips_two_entries() {
        let g = Geometry::new(16, false).unwrap();
        let (a, mut b) = (sample(), sample());
        b.id = "2".into();
        b.name = "x".into();
        let mut table = a.encode();
        table.extend_from_slice(&b.encode());
        assert_eq!(parse_snapshot_table(&table, 2, g).unwrap(), vec![a, b]);
    }

    #[test]
    fn rejects_entries_past_the_end() {
        let g = Geometry::new(16, false).unwrap();
        let table = sample().encode();
        assert!(parse_snapshot_table(&table, 2, g).is_err());
        assert!(parse_snapshot_table(&table[..30], 1, g).is_err());
    }
}
