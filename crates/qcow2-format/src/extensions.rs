//! Header extensions: the typed ones this implementation understands and
//! unknown ones, which are kept verbatim and written back unchanged.

use crate::dedup::DedupExtension;
use crate::{FormatError, Result};

/// End of the header extension area.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_ENCRYPTION: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Deduplication table location (this project's extension, from the seed);
/// defined beside the extension's layout.
pub use crate::dedup::EXT_DEDUP;

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number 0..=63 within that bitmap.
    pub bit: u8,
    /// Human-readable name (at most 46 bytes on disk).
    pub name: String,
}

/// A parsed header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtension {
    /// Format of the backing file (`raw`, `qcow2`, ...).
    BackingFormat(String),
    /// Names of feature bits.
    FeatureNames(Vec<FeatureName>),
    /// Persistent dirty bitmaps directory.
    Bitmaps {
        /// Number of bitmaps (≥ 1).
        nb_bitmaps: u32,
        /// Size of the bitmap directory in bytes.
        directory_size: u64,
        /// Cluster-aligned offset of the bitmap directory.
        directory_offset: u64,
    },
    /// Where the full disk encryption header is.
    Encryption {
        /// Cluster-aligned offset of the encryption header.
        offset: u64,
        /// Its length in bytes.
        length: u64,
    },
    /// Name of the external data file.
    DataFile(String),
    /// Location of the dedup table.
    Dedup(DedupExtension),
    /// An extension this implementation does not know, kept verbatim.
    Unknown {
        /// Its magic.
        magic: u32,
        /// Its data, without padding.
        data: Vec<u8>,
    },
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn string(magic: u32, data: &[u8]) -> Result<String> {
    String::from_utf8(data.to_vec()).map_err(|_| FormatError::InvalidExtension {
        magic,
        reason: "string is not UTF-8",
    })
}

impl HeaderExtension {
    /// The magic this extension is stored under.
    pub fn magic(&self) -> u32 {
        match self {
            Self::BackingFormat(_) => EXT_BACKING_FORMAT,
            Self::FeatureNames(_) => EXT_FEATURE_NAMES,
            Self::Bitmaps { .. } => EXT_BITMAPS,
            Self::Encryption { .. } => EXT_ENCRYPTION,
            Self::DataFile(_) => EXT_DATA_FILE,
            Self::Dedup(_) => EXT_DEDUP,
            Self::Unknown { magic, .. } => *magic,
        }
    }

    fn parse(magic: u32, data: &[u8]) -> Result<Self> {
        let invalid = |reason| FormatError::InvalidExtension { magic, reason };
        Ok(match magic {
            EXT_BACKING_FORMAT => Self::BackingFormat(string(magic, data)?),
            EXT_DATA_FILE => Self::DataFile(string(magic, data)?),
            EXT_FEATURE_NAMES => {
                if !data.len().is_multiple_of(48) {
                    return Err(invalid("length is not a multiple of 48"));
                }
                Self::FeatureNames(
                    data.chunks_exact(48)
                        .map(|e| {
                            let name = &e[2..];
                            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                            FeatureName {
                                kind: e[0],
                                bit: e[1],
                                name: String::from_utf8_lossy(&name[..end]).into_owned(),
                            }
                        })
                        .collect(),
                )
            }
            EXT_BITMAPS => {
                if data.len() != 24 {
                    return Err(invalid("length is not 24"));
                }
                Self::Bitmaps {
                    nb_bitmaps: be32(data),
                    directory_size: be64(&data[8..]),
                    directory_offset: be64(&data[16..]),
                }
            }
            EXT_ENCRYPTION => {
                if data.len() != 16 {
                    return Err(invalid("length is not 16"));
                }
                Self::Encryption {
                    offset: be64(data),
                    length: be64(&data[8..]),
                }
            }
            EXT_DEDUP => Self::Dedup(DedupExtension::parse(data)?),
            _ => Self::Unknown {
                magic,
                data: data.to_vec(),
            },
        })
    }

    fn data(&self) -> Vec<u8> {
        match self {
            Self::BackingFormat(s) | Self::DataFile(s) => s.as_bytes().to_vec(),
            Self::FeatureNames(names) => {
                let mut out = Vec::with_capacity(names.len().saturating_mul(48));
                for n in names {
                    let mut entry = [0u8; 48];
                    entry[0] = n.kind;
                    entry[1] = n.bit;
                    let bytes = n.name.as_bytes();
                    let len = bytes.len().min(46);
                    entry[2..][..len].copy_from_slice(&bytes[..len]);
                    out.extend_from_slice(&entry);
                }
                out
            }
            Self::Bitmaps {
                nb_bitmaps,
                directory_size,
                directory_offset,
            } => {
                let mut out = Vec::with_capacity(24);
                out.extend_from_slice(&nb_bitmaps.to_be_bytes());
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&directory_size.to_be_bytes());
                out.extend_from_slice(&directory_offset.to_be_bytes());
                out
            }
            Self::Encryption { offset, length } => {
                let mut out = offset.to_be_bytes().to_vec();
                out.extend_from_slice(&length.to_be_bytes());
                out
            }
            Self::Dedup(d) => d.to_bytes().to_vec(),
            Self::Unknown { data, .. } => data.clone(),
        }
    }
}

/// Parses the header extension area `area` (from `header_length` to the end
/// of the first cluster or the backing file name). Stops at the end marker;
/// an area that ends without one is accepted as QEMU does.
pub fn parse_extensions(area: &[u8]) -> Result<Vec<HeaderExtension>> {
    let mut out = Vec::new();
    let mut rest = area;
    while let Some((head, body)) = rest.split_at_checked(8) {
        let magic = be32(head);
        let len = be32(&head[4..]) as usize;
        if magic == EXT_END {
            break;
        }
        let Some((data, after)) = body.split_at_checked(len) else {
            return Err(FormatError::InvalidExtension {
                magic,
                reason: "length extends past the header area",
            });
        };
        let ext = HeaderExtension::parse(magic, data)?;
        if out.iter().any(|e: &HeaderExtension| e.magic() == magic) {
            return Err(FormatError::InvalidExtension {
                magic,
                reason: "appears more than once",
            });
        }
        out.push(ext);
        // Padding to 8 bytes; an area that ends inside it ends here.
        rest = after.get(len.wrapping_neg() % 8..).unwrap_or_default();
    }
    Ok(out)
}

/// Serialises extensions followed by the end marker, each padded to 8 bytes.
pub fn encode_extensions(extensions: &[HeaderExtension]) -> Vec<u8> {
    let mut out = Vec::new();
    for ext in extensions {
        let data = ext.data();
        out.extend_from_slice(&ext.magic().to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&data);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0u8; 8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_known_and_unknown_extensions() {
        let exts = vec![
            HeaderExtension::BackingFormat("raw".into()),
            HeaderExtension::FeatureNames(crate::features::standard_feature_names()),
            HeaderExtension::Bitmaps {
                nb_bitmaps: 2,
                directory_size: 96,
                directory_offset: 0x30000,
            },
            HeaderExtension::Dedup(DedupExtension {
                l1_offset: 0x40000,
                l1_entries: 3,
            }),
            HeaderExtension::Unknown {
                magic: 0x1234_5678,
                data: vec![1, 2, 3],
            },
        ];
        let bytes = encode_extensions(&exts);
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(parse_extensions(&bytes).unwrap(), exts);
    }

    #[test]
    fn rejects_overlong_and_duplicate_extensions() {
        let mut bytes = encode_extensions(&[HeaderExtension::BackingFormat("qcow2".into())]);
        bytes[7] = 200;
        assert!(matches!(
            parse_extensions(&bytes),
            Err(FormatError::InvalidExtension { .. })
        ));
        let one = encode_extensions(&[HeaderExtension::DataFile("x".into())]);
        let mut two = one[..one.len() - 8].to_vec();
        two.extend_from_slice(&one);
        assert!(parse_extensions(&two).is_err());
    }
}
