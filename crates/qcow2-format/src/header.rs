//! The image header (v2: 72 bytes, v3: `header_length` bytes), its header
//! extensions and the backing file name, all of which live in cluster 0.

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::dedup::DedupExtension;
use crate::extensions::{encode_extensions, parse_extensions, FeatureName, HeaderExtension};
use crate::features::{self, FeatureKind};
use crate::{
    FormatError, Geometry, HostOffset, Result, MAX_BACKING_NAME, MAX_L1_BYTES,
    MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS, QCOW2_MAGIC,
};

/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Length of the v3 header this implementation writes (with compression_type
/// and its padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Byte offset of `refcount_table_offset` (u64), followed by
/// `refcount_table_clusters` (u32), in every qcow2 header: the twelve
/// bytes rewritten alone when the refcount table moves.
pub const REFCOUNT_TABLE_FIELDS_OFFSET: u64 = 48;

/// The twelve bytes at [`REFCOUNT_TABLE_FIELDS_OFFSET`] for a refcount
/// table at `offset` of `clusters` clusters.
pub fn encode_refcount_table_fields(offset: u64, clusters: u32) -> [u8; 12] {
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&offset.to_be_bytes());
    fields[8..].copy_from_slice(&clusters.to_be_bytes());
    fields
}

/// The fields common to versions 2 and 3.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Default)]
pub struct RawHeaderV2 {
    /// `QFI\xfb`.
    pub magic: U32,
    /// 2 or 3.
    pub version: U32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: U64,
    /// Length of the backing file name.
    pub backing_file_size: U32,
    /// log2 of the cluster size.
    pub cluster_bits: U32,
    /// Virtual disk size in bytes.
    pub size: U64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: U32,
    /// Entries of the active L1 table.
    pub l1_size: U32,
    /// Offset of the active L1 table.
    pub l1_table_offset: U64,
    /// Offset of the refcount table.
    pub refcount_table_offset: U64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: U32,
    /// Number of internal snapshots.
    pub nb_snapshots: U32,
    /// Offset of the snapshot table.
    pub snapshots_offset: U64,
}

/// The fields version 3 adds (bytes 72..104).
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Default)]
pub struct RawHeaderV3 {
    /// Incompatible feature bits.
    pub incompatible_features: U64,
    /// Compatible feature bits.
    pub compatible_features: U64,
    /// Autoclear feature bits.
    pub autoclear_features: U64,
    /// refcount_bits = 1 << refcount_order.
    pub refcount_order: U32,
    /// Length of the header structure.
    pub header_length: U32,
}

/// `crypt_method` of an image encrypted with the legacy AES-CBC scheme
/// (read-only here, for migrating old images out).
pub const CRYPT_AES: u32 = 1;
/// `crypt_method` of a LUKS-encrypted image.
pub const CRYPT_LUKS: u32 = 2;

/// A validated header with its extensions and backing file name.
///
/// Invariants after [`Header::parse`]: the geometry is legal, every table
/// offset is cluster aligned and its table lies inside the file, table sizes
/// are within QEMU's limits, the L1 table covers the virtual size, no unknown
/// incompatible feature bit is set, and `crypt_method` is none, the legacy
/// AES scheme, or LUKS with its full-disk-encryption extension present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Cluster size and L2 entry format.
    pub geometry: Geometry,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: HostOffset,
    /// Offset of the refcount table.
    pub refcount_table_offset: HostOffset,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: HostOffset,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// refcount_bits = 1 << refcount_order (4 on v2).
    pub refcount_order: u32,
    /// Length of the header structure (72 on v2).
    pub header_length: u32,
    /// 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// Header bytes past byte 105 up to `header_length`, kept verbatim.
    pub additional_fields: Vec<u8>,
    /// Header extensions in on-disk order.
    pub extensions: Vec<HeaderExtension>,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// 0 none, 1 the legacy AES-CBC, 2 LUKS (the full-disk-encryption
    /// extension says where its header is).
    pub crypt_method: u32,
}

fn past_end(what: &'static str, offset: u64, len: u64, file_size: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > file_size) {
        return Err(FormatError::PastEnd {
            what,
            offset,
            len,
            file_size,
        });
    }
    Ok(())
}

/// The version 2 fields at the start of `buf`, with the magic checked.
fn raw_v2(buf: &[u8]) -> Result<(&RawHeaderV2, &[u8])> {
    let (v2, rest) = RawHeaderV2::ref_from_prefix(buf).map_err(|_| FormatError::Truncated {
        what: "header",
        needed: u64::from(V2_HEADER_LEN),
        available: buf.len() as u64,
    })?;
    if v2.magic.get() != QCOW2_MAGIC {
        return Err(FormatError::BadMagic(v2.magic.get()));
    }
    Ok((v2, rest))
}

fn aligned(geometry: Geometry, what: &'static str, offset: u64) -> Result<()> {
    if !geometry.is_aligned(offset) {
        return Err(FormatError::Unaligned { what, offset });
    }
    Ok(())
}

impl Header {
    /// How many bytes from the start of a file of `file_size` bytes
    /// [`Header::parse`] needs: its first cluster (the header, its
    /// extensions and the backing file name live there), or the whole file
    /// if it is shorter. `prefix` is the first bytes of the file, at least
    /// [`Header::PREFIX_LEN`] (the cluster size is read from them).
    ///
    /// ```
    /// use qcow2_format::Header;
    /// # fn read_at(buf: &mut [u8], offset: u64) {}
    /// # fn run(file_size: u64) -> qcow2_format::Result<Header> {
    /// let mut prefix = [0u8; Header::PREFIX_LEN];
    /// read_at(&mut prefix, 0);
    /// let mut first = vec![0u8; Header::bytes_needed(&prefix, file_size)? as usize];
    /// read_at(&mut first, 0);
    /// Header::parse(&first, file_size)
    /// # }
    /// ```
    pub fn bytes_needed(prefix: &[u8], file_size: u64) -> Result<u64> {
        let (v2, _) = raw_v2(prefix)?;
        let cluster_size = Geometry::new(v2.cluster_bits.get(), false)?.cluster_size();
        Ok(cluster_size.min(file_size))
    }

    /// Bytes [`Header::bytes_needed`] reads the cluster size from: the
    /// version 2 header.
    pub const PREFIX_LEN: usize = V2_HEADER_LEN as usize;

    /// Parses and validates a header from `buf`, the first bytes of the
    /// image, for an image file of `file_size` bytes. `buf` must hold
    /// [`Header::bytes_needed`] bytes (the first cluster, or the whole file
    /// if shorter): a shorter one is refused with
    /// [`FormatError::Truncated`] naming how many bytes are needed, never
    /// parsed with its extensions cut off.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Self> {
        Self::check_whole(buf, file_size)?;
        let header = Self::parse_unchecked_refcount_table(buf, file_size)?;
        header.validate_refcount_table_location(file_size)?;
        Ok(header)
    }

    /// [`Header::parse`] for a consistency check: a refcount table that is
    /// empty, unaligned or outside the file does not stop the parse (a
    /// check rebuilds it, as `qemu-img check` does); it is returned as the
    /// second value. A table larger than the format allows still fails.
    pub fn parse_for_check(buf: &[u8], file_size: u64) -> Result<(Self, Option<FormatError>)> {
        Self::check_whole(buf, file_size)?;
        let header = Self::parse_unchecked_refcount_table(buf, file_size)?;
        let damage = header.validate_refcount_table_location(file_size).err();
        Ok((header, damage))
    }

    /// [`Header::parse`] for what a truncated file (an interrupted copy)
    /// still holds, read as QEMU reads it: the L1 table, refcount table,
    /// snapshot table and dedup table may reach past the end of the file, whose
    /// missing bytes read as zeros. The first structure that does is
    /// returned as the second value. Every limit, alignment and overflow
    /// is still checked, so nothing read is larger than the format allows.
    pub fn parse_truncated(buf: &[u8], file_size: u64) -> Result<(Self, Option<FormatError>)> {
        Self::check_whole(buf, file_size)?;
        // The largest file an entry can point into.
        let largest = crate::OFFSET_MASK + 1;
        let header = Self::parse_unchecked_refcount_table(buf, largest)?;
        header.validate_refcount_table_location(largest)?;
        let truncation = header.first_past_end(file_size).err();
        Ok((header, truncation))
    }

    /// The first of the L1, refcount and snapshot tables that reaches past
    /// `file_size`, as an error.
    fn first_past_end(&self, file_size: u64) -> Result<()> {
        past_end(
            "L1 table",
            self.l1_table_offset.get(),
            u64::from(self.l1_size) * 8,
            file_size,
        )?;
        self.validate_refcount_table_location(file_size)?;
        if self.nb_snapshots > 0 {
            past_end("snapshot table", self.snapshots_offset.get(), 40, file_size)?;
        }
        if let Some(dedup) = self.dedup_extension() {
            dedup.validate(self.geometry, file_size)?;
        }
        Ok(())
    }

    /// Refuses a `buf` shorter than [`Header::bytes_needed`].
    fn check_whole(buf: &[u8], file_size: u64) -> Result<()> {
        let needed = Self::bytes_needed(buf, file_size)?;
        if (buf.len() as u64) < needed {
            return Err(FormatError::Truncated {
                what: "first cluster (header, extensions and backing file name)",
                needed,
                available: buf.len() as u64,
            });
        }
        Ok(())
    }

    fn parse_unchecked_refcount_table(buf: &[u8], file_size: u64) -> Result<Self> {
        let (v2, rest) = raw_v2(buf)?;
        let version = v2.version.get();
        if version != 2 && version != 3 {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let cluster_bits = v2.cluster_bits.get();
        let cluster_size = Geometry::new(cluster_bits, false)?.cluster_size();

        let V3Fields {
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression_type,
            additional_fields,
        } = if version == 3 {
            V3Fields::parse(buf, rest, cluster_size)?
        } else {
            V3Fields::default()
        };
        if refcount_order > 6 {
            return Err(FormatError::InvalidRefcountOrder(refcount_order));
        }
        let geometry = Geometry::new(
            cluster_bits,
            incompatible & features::INCOMPAT_EXTENDED_L2 != 0,
        )?;

        let (backing_file, extensions_end) = backing_name(buf, v2, header_length, cluster_size)?;
        let extensions = parse_extensions(&buf[header_length as usize..extensions_end])?;

        let crypt_method = v2.crypt_method.get();
        let header = Header {
            crypt_method,
            version,
            geometry,
            size: v2.size.get(),
            l1_size: v2.l1_size.get(),
            l1_table_offset: HostOffset::new(v2.l1_table_offset.get()),
            refcount_table_offset: HostOffset::new(v2.refcount_table_offset.get()),
            refcount_table_clusters: v2.refcount_table_clusters.get(),
            nb_snapshots: v2.nb_snapshots.get(),
            snapshots_offset: HostOffset::new(v2.snapshots_offset.get()),
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            refcount_order,
            header_length,
            compression_type,
            additional_fields,
            extensions,
            backing_file,
        };
        let has_fde = header
            .extensions
            .iter()
            .any(|e| matches!(e, HeaderExtension::Encryption { .. }));
        if crypt_method != 0
            && crypt_method != CRYPT_AES
            && !(crypt_method == CRYPT_LUKS && has_fde)
        {
            return Err(FormatError::Encrypted(crypt_method));
        }
        header.validate(file_size)?;
        Ok(header)
    }

    fn validate(&self, file_size: u64) -> Result<()> {
        let g = self.geometry;
        let unknown = self.incompatible_features & !features::INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(FormatError::UnknownIncompatibleFeatures(
                features::describe(unknown, FeatureKind::Incompatible, self.feature_names()),
            ));
        }
        let zstd_bit = self.incompatible_features & features::INCOMPAT_COMPRESSION_TYPE != 0;
        match (self.compression_type, zstd_bit) {
            (0, false) | (1, true) => {}
            (other, _) => return Err(FormatError::InvalidCompressionType(other)),
        }

        let l1_limit = MAX_L1_BYTES / 8;
        let needed = g.l1_entries_for(self.size);
        if needed > l1_limit {
            return Err(FormatError::TooLarge {
                what: "virtual size",
                value: self.size,
                limit: l1_limit.saturating_mul(g.l2_coverage()),
            });
        }
        if u64::from(self.l1_size) > l1_limit {
            return Err(FormatError::TooLarge {
                what: "L1 table",
                value: u64::from(self.l1_size),
                limit: l1_limit,
            });
        }
        if u64::from(self.l1_size) < needed {
            return Err(FormatError::L1TooSmall {
                l1_size: self.l1_size,
                needed,
            });
        }
        if self.l1_size > 0 {
            aligned(g, "L1 table", self.l1_table_offset.get())?;
            if self.l1_table_offset.get() == 0 {
                return Err(FormatError::Unaligned {
                    what: "L1 table (at the header)",
                    offset: 0,
                });
            }
            past_end(
                "L1 table",
                self.l1_table_offset.get(),
                u64::from(self.l1_size) * 8,
                file_size,
            )?;
        }

        let rt_limit = MAX_REFCOUNT_TABLE_BYTES >> g.cluster_bits();
        let rt_clusters = u64::from(self.refcount_table_clusters);
        if rt_clusters > rt_limit.max(1) {
            return Err(FormatError::TooLarge {
                what: "refcount table",
                value: rt_clusters,
                limit: rt_limit.max(1),
            });
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(FormatError::TooLarge {
                what: "snapshot count",
                value: u64::from(self.nb_snapshots),
                limit: u64::from(MAX_SNAPSHOTS),
            });
        }
        if self.nb_snapshots > 0 {
            aligned(g, "snapshot table", self.snapshots_offset.get())?;
            past_end("snapshot table", self.snapshots_offset.get(), 40, file_size)?;
        }
        if let Some(dedup) = self.dedup_extension() {
            dedup.validate(g, file_size)?;
        }
        Ok(())
    }

    /// Where the refcount table lies: not empty, aligned, after the header
    /// and inside the file. (Its size limit is checked with the rest.)
    fn validate_refcount_table_location(&self, file_size: u64) -> Result<()> {
        let g = self.geometry;
        let rt_clusters = u64::from(self.refcount_table_clusters);
        if rt_clusters == 0 {
            return Err(FormatError::NoRefcountTable);
        }
        aligned(g, "refcount table", self.refcount_table_offset.get())?;
        if self.refcount_table_offset.get() == 0 {
            return Err(FormatError::Unaligned {
                what: "refcount table (at the header)",
                offset: 0,
            });
        }
        past_end(
            "refcount table",
            self.refcount_table_offset.get(),
            rt_clusters.saturating_mul(g.cluster_size()),
            file_size,
        )
    }

    /// The feature name table from the extensions (empty if absent).
    pub fn feature_names(&self) -> &[FeatureName] {
        self.extensions
            .iter()
            .find_map(|e| match e {
                HeaderExtension::FeatureNames(names) => Some(names.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }

    /// The backing file format from its header extension, if present.
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// The external data file name, if the header names one.
    pub fn data_file(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::DataFile(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The dedup extension, if present.
    pub fn dedup_extension(&self) -> Option<DedupExtension> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::Dedup(d) => Some(*d),
            _ => None,
        })
    }

    /// Replaces (or with `None` removes) the dedup extension.
    pub fn set_dedup_extension(&mut self, dedup: Option<DedupExtension>) {
        self.extensions
            .retain(|e| !matches!(e, HeaderExtension::Dedup(_)));
        if let Some(d) = dedup {
            self.extensions.push(HeaderExtension::Dedup(d));
        }
    }

    /// Replaces (or with `None` removes) the bitmaps extension, setting or
    /// clearing the bitmaps autoclear bit with it: `(nb_bitmaps,
    /// directory_size, directory_offset)`.
    pub fn set_bitmaps_extension(&mut self, bitmaps: Option<(u32, u64, u64)>) {
        self.extensions
            .retain(|e| !matches!(e, HeaderExtension::Bitmaps { .. }));
        match bitmaps {
            Some((nb_bitmaps, directory_size, directory_offset)) => {
                self.extensions.push(HeaderExtension::Bitmaps {
                    nb_bitmaps,
                    directory_size,
                    directory_offset,
                });
                self.autoclear_features |= crate::features::AUTOCLEAR_BITMAPS;
            }
            None => self.autoclear_features &= !crate::features::AUTOCLEAR_BITMAPS,
        }
    }

    /// Replaces (or with `None` removes) the backing file name and its
    /// format extension. The name must be 1 to 1023 bytes.
    pub fn set_backing(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        self.extensions
            .retain(|e| !matches!(e, HeaderExtension::BackingFormat(_)));
        self.backing_file = None;
        if let Some((name, format)) = backing {
            if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
                return Err(FormatError::InvalidBackingName(
                    "empty or longer than 1023 bytes",
                ));
            }
            self.backing_file = Some(name.to_string());
            self.extensions
                .insert(0, HeaderExtension::BackingFormat(format.to_string()));
        }
        Ok(())
    }

    /// Incompatible bit 1 with the dedup extension: a deduplicated image.
    pub fn is_dedup(&self) -> bool {
        self.incompatible_features & features::INCOMPAT_CORRUPT_OR_DEDUP != 0
            && self.dedup_extension().is_some()
    }

    /// Incompatible bit 1 without the dedup extension: QEMU's corrupt flag.
    pub fn is_marked_corrupt(&self) -> bool {
        self.incompatible_features & features::INCOMPAT_CORRUPT_OR_DEDUP != 0
            && self.dedup_extension().is_none()
    }

    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & features::INCOMPAT_DIRTY != 0
    }

    /// Whether the lazy refcounts compatible bit is set.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & features::COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Whether v3 zero flags may be used (v3 without extended L2 entries).
    pub fn l2_format(&self) -> crate::l2::L2Format {
        crate::l2::L2Format {
            geometry: self.geometry,
            zero_flag: self.version >= 3 && !self.geometry.extended_l2(),
            external_data: self.incompatible_features & features::INCOMPAT_EXTERNAL_DATA != 0,
        }
    }

    /// Serialises cluster 0: header, extensions, end marker and backing file
    /// name, which must all fit into one cluster. The backing file offset is
    /// placed right after the extensions. When they do not fit (512-byte
    /// clusters), the feature name table, which is only informational, is
    /// left out first.
    pub fn encode(&self) -> Result<Vec<u8>> {
        match self.encode_with(&self.extensions) {
            Err(FormatError::HeaderTooLarge { .. }) if !self.feature_names().is_empty() => {
                let essential: Vec<HeaderExtension> = self
                    .extensions
                    .iter()
                    .filter(|e| !matches!(e, HeaderExtension::FeatureNames(_)))
                    .cloned()
                    .collect();
                self.encode_with(&essential)
            }
            other => other,
        }
    }

    fn encode_with(&self, extensions: &[HeaderExtension]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(4096);
        let mut v2 = RawHeaderV2 {
            magic: QCOW2_MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: 0.into(),
            backing_file_size: 0.into(),
            cluster_bits: self.geometry.cluster_bits().into(),
            size: self.size.into(),
            crypt_method: self.crypt_method.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.get().into(),
            refcount_table_offset: self.refcount_table_offset.get().into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.get().into(),
        };
        let header_length = if self.version == 2 {
            V2_HEADER_LEN
        } else {
            self.header_length.max(V3_HEADER_LEN)
        };
        let extensions = encode_extensions(extensions);
        let backing = self.backing_file.as_deref().unwrap_or("").as_bytes();
        if backing.len() > MAX_BACKING_NAME as usize {
            return Err(FormatError::InvalidBackingName("longer than 1023 bytes"));
        }
        // Each part is bounded (header < 1 KiB, extensions by their count
        // and names, backing name <= 1023 bytes): the sum cannot overflow.
        let before_backing = (header_length as usize).saturating_add(extensions.len());
        let needed = before_backing.saturating_add(backing.len());
        if needed as u64 > self.geometry.cluster_size() {
            return Err(FormatError::HeaderTooLarge {
                needed,
                cluster_size: self.geometry.cluster_size(),
            });
        }
        if self.backing_file.is_some() {
            v2.backing_file_offset = (before_backing as u64).into();
            v2.backing_file_size = (backing.len() as u32).into();
        }
        out.extend_from_slice(v2.as_bytes());
        if self.version == 3 {
            let v3 = RawHeaderV3 {
                incompatible_features: self.incompatible_features.into(),
                compatible_features: self.compatible_features.into(),
                autoclear_features: self.autoclear_features.into(),
                refcount_order: self.refcount_order.into(),
                header_length: header_length.into(),
            };
            out.extend_from_slice(v3.as_bytes());
            out.push(self.compression_type);
            out.extend_from_slice(&self.additional_fields);
            out.resize(header_length as usize, 0);
        }
        out.extend_from_slice(&extensions);
        out.extend_from_slice(backing);
        Ok(out)
    }
}

/// The fields a version 3 header adds; a version 2 header has their
/// defaults (refcount order 4, the v2 header length).
struct V3Fields {
    incompatible: u64,
    compatible: u64,
    autoclear: u64,
    refcount_order: u32,
    header_length: u32,
    compression_type: u8,
    additional_fields: Vec<u8>,
}

impl Default for V3Fields {
    fn default() -> Self {
        Self {
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            additional_fields: Vec::new(),
        }
    }
}

impl V3Fields {
    /// Reads them from `rest` (what follows the v2 fields in `buf`),
    /// checking the header length against the cluster and the buffer.
    fn parse(buf: &[u8], rest: &[u8], cluster_size: u64) -> Result<Self> {
        let (v3, _) = RawHeaderV3::ref_from_prefix(rest).map_err(|_| FormatError::Truncated {
            what: "v3 header",
            needed: u64::from(V3_MIN_HEADER_LEN),
            available: buf.len() as u64,
        })?;
        let header_length = v3.header_length.get();
        if header_length < V3_MIN_HEADER_LEN
            || header_length % 8 != 0
            || u64::from(header_length) > cluster_size
        {
            return Err(FormatError::InvalidHeaderLength {
                version: 3,
                length: header_length,
            });
        }
        if header_length as usize > buf.len() {
            return Err(FormatError::Truncated {
                what: "header",
                needed: u64::from(header_length),
                available: buf.len() as u64,
            });
        }
        let (compression_type, additional_fields) = if header_length > V3_MIN_HEADER_LEN {
            (
                buf[V3_MIN_HEADER_LEN as usize],
                buf[V3_MIN_HEADER_LEN as usize..header_length as usize][1..].to_vec(),
            )
        } else {
            (0, Vec::new())
        };
        Ok(Self {
            incompatible: v3.incompatible_features.get(),
            compatible: v3.compatible_features.get(),
            autoclear: v3.autoclear_features.get(),
            refcount_order: v3.refcount_order.get(),
            header_length,
            compression_type,
            additional_fields,
        })
    }
}

/// The backing file name the v2 fields point to, checked to lie in the
/// first cluster after the header, and where the header extensions end
/// (at the name, or at the end of the first cluster).
fn backing_name(
    buf: &[u8],
    v2: &RawHeaderV2,
    header_length: u32,
    cluster_size: u64,
) -> Result<(Option<String>, usize)> {
    let backing_offset = v2.backing_file_offset.get();
    let backing_size = v2.backing_file_size.get();
    let first_cluster_end = (cluster_size as usize).min(buf.len());
    if backing_offset == 0 {
        return Ok((None, first_cluster_end));
    }
    if backing_size > MAX_BACKING_NAME {
        return Err(FormatError::InvalidBackingName("longer than 1023 bytes"));
    }
    let end = backing_offset.saturating_add(u64::from(backing_size));
    if backing_offset < u64::from(header_length) || end > first_cluster_end as u64 {
        return Err(FormatError::InvalidBackingName(
            "not inside the first cluster",
        ));
    }
    let name = &buf[backing_offset as usize..end as usize];
    let name = String::from_utf8(name.to_vec())
        .map_err(|_| FormatError::InvalidBackingName("not UTF-8"))?;
    Ok((Some(name), backing_offset as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(version: u32) -> Header {
        let g = Geometry::new(16, false).unwrap();
        Header {
            crypt_method: 0,
            version,
            geometry: g,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: HostOffset::new(0x30000),
            refcount_table_offset: HostOffset::new(0x10000),
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: HostOffset::new(0),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: if version == 2 { 72 } else { 112 },
            compression_type: 0,
            additional_fields: if version == 2 { vec![] } else { vec![0; 7] },
            extensions: if version == 2 {
                vec![]
            } else {
                vec![HeaderExtension::FeatureNames(
                    features::standard_feature_names(),
                )]
            },
            backing_file: None,
        }
    }

    fn encoded(h: &Header) -> Vec<u8> {
        let mut buf = h.encode().unwrap();
        buf.resize(0x40000, 0);
        buf
    }

    #[test]
    fn round_trips_v2_and_v3() {
        for version in [2, 3] {
            let mut h = sample(version);
            h.backing_file = Some("base.qcow2".into());
            h.extensions
                .push(HeaderExtension::BackingFormat("qcow2".into()));
            let parsed = Header::parse(&encoded(&h), 0x40000).unwrap();
            assert_eq!(parsed, h);
        }
    }

    /// One row per malformed field: (description, mutation, expected error).
    #[test]
    fn malformed_headers_give_typed_errors() {
        type Poke = fn(&mut Vec<u8>);
        type Expect = fn(&FormatError) -> bool;
        let rows: Vec<(&str, Poke, Expect)> = vec![
            (
                "truncated",
                |b| b.truncate(50),
                |e| matches!(e, FormatError::Truncated { .. }),
            ),
            (
                "magic",
                |b| b[0] = 0,
                |e| matches!(e, FormatError::BadMagic(_)),
            ),
            (
                "version",
                |b| b[7] = 4,
                |e| matches!(e, FormatError::UnsupportedVersion(4)),
            ),
            (
                "cluster_bits 8",
                |b| b[23] = 8,
                |e| matches!(e, FormatError::InvalidClusterBits(8)),
            ),
            (
                "cluster_bits 22",
                |b| b[23] = 22,
                |e| matches!(e, FormatError::InvalidClusterBits(22)),
            ),
            (
                "l1 too large for file",
                |b| b[36..40].copy_from_slice(&100_000u32.to_be_bytes()),
                |e| {
                    matches!(
                        e,
                        FormatError::PastEnd {
                            what: "L1 table",
                            ..
                        }
                    )
                },
            ),
            (
                "l1 too small",
                |b| b[36..40].copy_from_slice(&1u32.to_be_bytes()),
                |e| matches!(e, FormatError::L1TooSmall { .. }),
            ),
            (
                "l1 unaligned",
                |b| b[40..48].copy_from_slice(&0x30200u64.to_be_bytes()),
                |e| {
                    matches!(
                        e,
                        FormatError::Unaligned {
                            what: "L1 table",
                            ..
                        }
                    )
                },
            ),
            (
                "l1 past end",
                |b| b[40..48].copy_from_slice(&0x1000_0000u64.to_be_bytes()),
                |e| matches!(e, FormatError::PastEnd { .. }),
            ),
            (
                "refcount table unaligned",
                |b| b[48..56].copy_from_slice(&0x10008u64.to_be_bytes()),
                |e| {
                    matches!(
                        e,
                        FormatError::Unaligned {
                            what: "refcount table",
                            ..
                        }
                    )
                },
            ),
            (
                "refcount table past end",
                |b| b[48..56].copy_from_slice(&0x7000_0000u64.to_be_bytes()),
                |e| matches!(e, FormatError::PastEnd { .. }),
            ),
            (
                "huge refcount_table_clusters",
                |b| b[56..60].copy_from_slice(&u32::MAX.to_be_bytes()),
                |e| {
                    matches!(
                        e,
                        FormatError::TooLarge {
                            what: "refcount table",
                            ..
                        }
                    )
                },
            ),
            (
                "zero refcount_table_clusters",
                |b| b[56..60].copy_from_slice(&0u32.to_be_bytes()),
                |e| matches!(e, FormatError::NoRefcountTable),
            ),
            (
                "snapshot count",
                |b| b[60..64].copy_from_slice(&u32::MAX.to_be_bytes()),
                |e| {
                    matches!(
                        e,
                        FormatError::TooLarge {
                            what: "snapshot count",
                            ..
                        }
                    )
                },
            ),
            (
                "encrypted",
                |b| b[35] = 2,
                |e| matches!(e, FormatError::Encrypted(2)),
            ),
            (
                "backing name 2000 bytes",
                |b| {
                    b[8..16].copy_from_slice(&200u64.to_be_bytes());
                    b[16..20].copy_from_slice(&2000u32.to_be_bytes());
                },
                |e| matches!(e, FormatError::InvalidBackingName(_)),
            ),
            (
                "backing offset near u64::MAX",
                |b| {
                    b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
                    b[16..20].copy_from_slice(&100u32.to_be_bytes());
                },
                |e| matches!(e, FormatError::InvalidBackingName(_)),
            ),
            (
                "backing name past cluster",
                |b| {
                    b[8..16].copy_from_slice(&0xfff0u64.to_be_bytes());
                    b[16..20].copy_from_slice(&100u32.to_be_bytes());
                },
                |e| matches!(e, FormatError::InvalidBackingName(_)),
            ),
            (
                "header_length < 104",
                |b| b[100..104].copy_from_slice(&96u32.to_be_bytes()),
                |e| matches!(e, FormatError::InvalidHeaderLength { .. }),
            ),
            (
                "header_length unaligned",
                |b| b[100..104].copy_from_slice(&108u32.to_be_bytes()),
                |e| matches!(e, FormatError::InvalidHeaderLength { .. }),
            ),
            (
                "refcount_order 7",
                |b| b[99] = 7,
                |e| matches!(e, FormatError::InvalidRefcountOrder(7)),
            ),
            (
                "unknown incompatible bit",
                |b| b[72] = 0x80,
                |e| matches!(e, FormatError::UnknownIncompatibleFeatures(s) if s.contains("unknown bit 63")),
            ),
            (
                "compression type without bit",
                |b| b[104] = 1,
                |e| matches!(e, FormatError::InvalidCompressionType(1)),
            ),
            (
                "virtual size beyond L1 limit",
                |b| b[24..32].copy_from_slice(&u64::MAX.to_be_bytes()),
                |e| {
                    matches!(
                        e,
                        FormatError::TooLarge {
                            what: "virtual size",
                            ..
                        }
                    )
                },
            ),
        ];
        let good = encoded(&sample(3));
        Header::parse(&good, 0x40000).unwrap();
        for (name, poke, expect) in rows {
            let mut buf = good.clone();
            poke(&mut buf);
            let err = Header::parse(&buf, 0x40000).expect_err(name);
            assert!(expect(&err), "{name}: got {err:?}");
        }
    }

    #[test]
    fn a_buffer_shorter_than_the_first_cluster_is_refused_with_what_it_needs() {
        let good = encoded(&sample(3));
        let needed = Header::bytes_needed(&good[..Header::PREFIX_LEN], 1 << 30).unwrap();
        assert_eq!(needed, 65536, "the first cluster");
        assert_eq!(
            Header::bytes_needed(&good[..Header::PREFIX_LEN], 5000).unwrap(),
            5000,
            "or the whole file, if shorter"
        );
        let err = Header::parse(&good[..4096], 1 << 30).unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::Truncated {
                    needed: 65536,
                    available: 4096,
                    ..
                }
            ),
            "{err:?}"
        );
        let mut whole = good.clone();
        whole.resize(65536, 0);
        Header::parse(&whole, 1 << 30).unwrap();
    }

    #[test]
    fn a_truncated_parse_reports_the_first_table_past_the_end() {
        let good = encoded(&sample(3));
        let (header, truncation) = Header::parse_truncated(&good, 0x40000).unwrap();
        assert!(truncation.is_none());
        assert_eq!(header, Header::parse(&good, 0x40000).unwrap());
        let (_, truncation) = Header::parse_truncated(&good, 0x100).unwrap();
        assert!(
            matches!(
                truncation,
                Some(FormatError::PastEnd {
                    what: "L1 table",
                    ..
                })
            ),
            "{truncation:?}"
        );
        let mut far = good.clone();
        far[40..48].copy_from_slice(&(u64::MAX - 0xffff).to_be_bytes());
        assert!(
            Header::parse_truncated(&far, 0x40000).is_err(),
            "an offset whose end overflows is still refused"
        );
    }

    #[test]
    fn a_check_parse_tolerates_only_the_refcount_table_location() {
        let good = encoded(&sample(3));
        let mut no_table = good.clone();
        no_table[56..60].copy_from_slice(&0u32.to_be_bytes());
        let (header, damage) = Header::parse_for_check(&no_table, 0x40000).unwrap();
        assert_eq!(header.refcount_table_clusters, 0);
        assert!(matches!(damage, Some(FormatError::NoRefcountTable)));
        let mut outside = good.clone();
        outside[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let (_, damage) = Header::parse_for_check(&outside, 0x40000).unwrap();
        assert!(matches!(damage, Some(FormatError::PastEnd { .. })));
        let mut huge = good.clone();
        huge[56..60].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Header::parse_for_check(&huge, 0x40000),
            Err(FormatError::TooLarge { .. })
        ));
        assert!(Header::parse_for_check(&good, 0x40000).unwrap().1.is_none());
    }

    #[test]
    fn the_feature_table_gives_way_in_tiny_clusters() {
        let mut h = sample(3);
        h.geometry = Geometry::new(9, false).unwrap();
        h.size = 1 << 20;
        h.l1_size = 32;
        h.set_dedup_extension(Some(DedupExtension {
            l1_offset: 0x20000,
            l1_entries: 1,
        }));
        let bytes = h.encode().unwrap();
        assert!(bytes.len() <= 512);
        let mut buf = bytes.clone();
        buf.resize(0x40000, 0);
        let parsed = Header::parse(&buf, 0x40000).unwrap();
        assert!(parsed.is_dedup() || parsed.dedup_extension().is_some());
        assert!(parsed.feature_names().is_empty());
    }

    #[test]
    fn dedup_and_corrupt_share_bit_one() {
        let mut h = sample(3);
        h.incompatible_features |= features::INCOMPAT_CORRUPT_OR_DEDUP;
        assert!(h.is_marked_corrupt() && !h.is_dedup());
        h.set_dedup_extension(Some(DedupExtension {
            l1_offset: 0x20000,
            l1_entries: 1,
        }));
        assert!(h.is_dedup() && !h.is_marked_corrupt());
        let parsed = Header::parse(&encoded(&h), 0x40000).unwrap();
        assert!(parsed.is_dedup());
        let mut bad = h.clone();
        bad.set_dedup_extension(Some(DedupExtension {
            l1_offset: 0x20100,
            l1_entries: 1,
        }));
        assert!(Header::parse(&encoded(&bad), 0x40000).is_err());
        bad.set_dedup_extension(Some(DedupExtension {
            l1_offset: 0x20000,
            l1_entries: u32::MAX,
        }));
        assert!(Header::parse(&encoded(&bad), 0x40000).is_err());
    }
}
