//! Feature bits of the version 3 header and their names.

use crate::extensions::FeatureName;

/// Incompatible bit 0: refcounts may be inconsistent (lazy refcounts, crash).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: QEMU's "corrupt" bit; with the dedup header extension
/// present it marks a deduplicated image instead.
pub const INCOMPAT_CORRUPT_OR_DEDUP: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
/// Incompatible bit 3: `compression_type` is not deflate.
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
/// Incompatible bit 4: 128-bit L2 entries with subcluster bitmaps.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Every incompatible bit this implementation understands.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT_OR_DEDUP
    | INCOMPAT_EXTERNAL_DATA
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;

/// Compatible bit 0: lazy refcounts may be used.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a consistent raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Which of the three feature bitmaps a bit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// An implementation must refuse an image with an unknown bit set.
    Incompatible = 0,
    /// Unknown bits may be ignored.
    Compatible = 1,
    /// Unknown bits must be cleared before writing.
    Autoclear = 2,
}

impl FeatureKind {
    /// The kind for the type byte of a feature name table entry.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Incompatible),
            1 => Some(Self::Compatible),
            2 => Some(Self::Autoclear),
            _ => None,
        }
    }
}

/// The feature name table this implementation writes into new images,
/// as QEMU does, so that older readers can name what they do not support.
pub fn standard_feature_names() -> Vec<FeatureName> {
    [
        (FeatureKind::Incompatible, 0, "dirty bit"),
        (FeatureKind::Incompatible, 1, "corrupt bit"),
        (FeatureKind::Incompatible, 2, "external data file"),
        (FeatureKind::Incompatible, 3, "compression type"),
        (FeatureKind::Incompatible, 4, "extended L2 entries"),
        (FeatureKind::Compatible, 0, "lazy refcounts"),
        (FeatureKind::Autoclear, 0, "bitmaps"),
        (FeatureKind::Autoclear, 1, "raw external data"),
    ]
    .into_iter()
    .map(|(kind, bit, name)| FeatureName {
        kind: kind as u8,
        bit,
        name: name.to_string(),
    })
    .collect()
}

/// Describes the set bits of `bits` of the given kind, by name where the
/// image's feature name table (or the standard table) knows one.
pub fn describe(bits: u64, kind: FeatureKind, table: &[FeatureName]) -> String {
    let standard = standard_feature_names();
    let mut parts = Vec::new();
    for bit in 0..64u8 {
        if bits & (1u64 << bit) == 0 {
            continue;
        }
        let name = table
            .iter()
            .chain(standard.iter())
            .find(|f| f.kind == kind as u8 && f.bit == bit)
            .map(|f| f.name.clone());
        parts.push(match name {
            Some(name) => format!("{name} (bit {bit})"),
            None => format!("unknown bit {bit}"),
        });
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_bits_from_the_image_table_first() {
        let table = vec![FeatureName {
            kind: 0,
            bit: 9,
            name: "frobnication".into(),
        }];
        let text = describe((1 << 9) | (1 << 12) | 1, FeatureKind::Incompatible, &table);
        assert_eq!(
            text,
            "dirty bit (bit 0), frobnication (bit 9), unknown bit 12"
        );
    }
}
