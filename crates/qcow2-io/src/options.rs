//! Options for creating and opening images.

use crate::{ImageError, Result};

/// qcow2 compatibility level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    /// `compat=0.10`: version 2 header, 16-bit refcounts, no zero flag.
    V2,
    /// `compat=1.1`: version 3 header.
    V3,
}

/// The compression of compressed clusters (the header's
/// `compression_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Raw deflate with a 4 KiB window, as QEMU writes it (type 0).
    #[default]
    Zlib,
    /// One zstd frame per cluster (type 1, incompatible bit 3).
    Zstd,
}

/// How much of a new image is allocated up front (`preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing: clusters are allocated as they are written.
    #[default]
    Off,
    /// Every L2 table and data cluster allocated and mapped; the file is
    /// extended (sparse) to hold them.
    Metadata,
    /// As `Metadata`, with the file's blocks reserved (`fallocate`).
    Falloc,
    /// As `Metadata`, with every data cluster written with zeros.
    Full,
}

impl Preallocation {
    /// Whether every data cluster takes space in the file at creation.
    pub fn writes_every_cluster(self) -> bool {
        matches!(self, Preallocation::Falloc | Preallocation::Full)
    }
}

/// How to create a new image. [`CreateOptions::new`] gives what `qemu-img
/// create` does: 64 KiB clusters, 16-bit refcounts, compat 1.1; chain the
/// setters (or set the public fields) for the rest: new options can be
/// added without a breaking change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to a multiple of 512).
    pub size: u64,
    /// Cluster size: a power of two from 512 bytes to 2 MiB.
    pub cluster_size: u64,
    /// Refcount width: 1, 2, 4, 8, 16, 32 or 64 bits.
    pub refcount_bits: u32,
    /// Compatibility level.
    pub compat: Compat,
    /// Set the lazy refcounts compatible bit (v3 only).
    pub lazy_refcounts: bool,
    /// Deduplicate guest clusters by content (v3, refcount_bits ≥ 2).
    ///
    /// Each distinct cluster content is stored once while its references
    /// fit the refcount width (`2^refcount_bits − 1`); a content with more
    /// references than that is stored in ⌈references / maximum⌉ copies,
    /// new references going to the fullest copy with room, and a flush
    /// moves references out of the emptiest copy when others gain room
    /// (see docs/ARCHITECTURE.md, "Deduplication").
    pub dedup: bool,
    /// Let [`crate::Image::create`] replace an existing file (by default it
    /// refuses one, so an image is never truncated by accident).
    pub overwrite: bool,
    /// How compressed clusters are compressed (`compression_type`; zstd
    /// needs compat=1.1).
    pub compression: Compression,
    /// What is allocated at creation (not with a backing file or dedup).
    pub preallocation: Preallocation,
    /// External data file (`data_file=`): guest data goes to this file, at
    /// the guest offsets, and the image file holds only metadata. The name
    /// is used as given, as QEMU uses it (a relative name is relative to
    /// the current directory). Created (or truncated) with the image.
    pub data_file: Option<String>,
    /// `data_file_raw=on`: the data file is kept a valid raw image of the
    /// disk (every cluster mapped to it, zeroing writes zeros there).
    pub data_file_raw: bool,
    /// Extended L2 entries (`extended_l2=on`): 32 subclusters per cluster,
    /// allocated one by one (compat=1.1, clusters of 16 KiB to 2 MiB, no
    /// dedup).
    pub extended_l2: bool,
    /// Backing file name (stored as given: a relative name is resolved
    /// against the new image's directory) and its format (`qcow2` or `raw`,
    /// recorded in the backing-format extension).
    pub backing: Option<(String, String)>,
    /// Encrypt the image with LUKS, as `encrypt.format=luks` does.
    pub encryption: Option<Encryption>,
}

impl CreateOptions {
    /// Defaults for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            cluster_size: 65536,
            refcount_bits: 16,
            compat: Compat::V3,
            lazy_refcounts: false,
            dedup: false,
            overwrite: false,
            compression: Compression::Zlib,
            preallocation: Preallocation::Off,
            data_file: None,
            data_file_raw: false,
            extended_l2: false,
            backing: None,
            encryption: None,
        }
    }

    /// Uses extended L2 entries (subcluster allocation).
    pub fn extended_l2(mut self, on: bool) -> Self {
        self.extended_l2 = on;
        self
    }

    /// Puts guest data in the external data file `name` (raw image of the
    /// disk when `raw`).
    pub fn data_file(mut self, name: impl Into<String>, raw: bool) -> Self {
        self.data_file = Some(name.into());
        self.data_file_raw = raw;
        self
    }

    /// Sets what is allocated at creation.
    pub fn preallocation(mut self, preallocation: Preallocation) -> Self {
        self.preallocation = preallocation;
        self
    }

    /// Sets the compression type of compressed clusters.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Backed by `name` in `format` (`qcow2` or `raw`).
    pub fn backing_file(mut self, name: impl Into<String>, format: impl Into<String>) -> Self {
        self.backing = Some((name.into(), format.into()));
        self
    }

    /// With this cluster size (a power of two from 512 bytes to 2 MiB).
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    /// With this refcount width in bits.
    pub fn refcount_bits(mut self, bits: u32) -> Self {
        self.refcount_bits = bits;
        self
    }

    /// With this compatibility level.
    pub fn compat(mut self, compat: Compat) -> Self {
        self.compat = compat;
        self
    }

    /// With or without the lazy refcounts bit.
    pub fn lazy_refcounts(mut self, on: bool) -> Self {
        self.lazy_refcounts = on;
        self
    }

    /// With or without inline deduplication.
    pub fn dedup(mut self, on: bool) -> Self {
        self.dedup = on;
        self
    }

    /// Allowing [`crate::Image::create`] to replace an existing file.
    pub fn overwrite(mut self, on: bool) -> Self {
        self.overwrite = on;
        self
    }

    /// Sets [`CreateOptions::encryption`].
    pub fn encryption(mut self, encryption: Option<Encryption>) -> Self {
        self.encryption = encryption;
        self
    }

    /// Checks the combination, as `qemu-img create` does.
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(ImageError::InvalidOption(format!(
                "cluster size {cs} must be a power of two between 512 and 2M"
            )));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(ImageError::InvalidOption(format!(
                "refcount bits {} must be a power of two up to 64",
                self.refcount_bits
            )));
        }
        self.validate_compat()?;
        self.validate_backing()?;
        self.validate_layout()
    }

    /// What compat=0.10 cannot hold, and dedup's needs of the refcounts.
    fn validate_compat(&self) -> Result<()> {
        if self.encryption.is_some() {
            let refused = if self.compat == Compat::V2 {
                Some("LUKS encryption needs compat=1.1")
            } else if self.data_file.is_some() {
                Some("encryption with an external data file is not supported")
            } else {
                None
            };
            if let Some(why) = refused {
                return Err(ImageError::InvalidOption(why.into()));
            }
        }
        if self.compat == Compat::V2 && self.refcount_bits != 16 {
            return Err(ImageError::InvalidOption(
                "refcount widths other than 16 bits need compat=1.1".into(),
            ));
        }
        if self.dedup && self.refcount_bits == 1 {
            return Err(ImageError::InvalidOption(
                "dedup=on needs refcount_bits=2 or more: with refcount_bits=1 a cluster holds one reference, so nothing can be shared".into(),
            ));
        }
        if self.compat == Compat::V2 && self.dedup {
            return Err(ImageError::InvalidOption(
                "deduplication needs compat=1.1".into(),
            ));
        }
        if self.compat == Compat::V2 && self.compression == Compression::Zstd {
            return Err(ImageError::InvalidOption(
                "compression_type=zstd needs compat=1.1".into(),
            ));
        }
        if self.compat == Compat::V2 && self.lazy_refcounts {
            return Err(ImageError::InvalidOption(
                "lazy refcounts need compat=1.1".into(),
            ));
        }
        Ok(())
    }

    /// The backing file's name and format, and what preallocation cannot
    /// be combined with.
    fn validate_backing(&self) -> Result<()> {
        if let Some((name, format)) = &self.backing {
            if name.len() > qcow2_format::MAX_BACKING_NAME as usize || name.is_empty() {
                return Err(ImageError::InvalidOption(format!(
                    "backing file name must be 1 to {} bytes",
                    qcow2_format::MAX_BACKING_NAME
                )));
            }
            if format != "qcow2" && format != "raw" {
                return Err(ImageError::InvalidOption(format!(
                    "backing format {format:?} (qcow2 or raw)"
                )));
            }
        }
        if self.preallocation != Preallocation::Off && self.backing.is_some() {
            return Err(ImageError::InvalidOption(
                "preallocation and a backing file cannot be combined (the backing would never show through)".into(),
            ));
        }
        if self.preallocation != Preallocation::Off && self.dedup {
            return Err(ImageError::InvalidOption(
                "preallocation and dedup=on cannot be combined (dedup allocates by content)".into(),
            ));
        }
        Ok(())
    }

    /// Extended L2 entries and the external data file.
    fn validate_layout(&self) -> Result<()> {
        let cs = self.cluster_size;
        if self.extended_l2 && (self.compat == Compat::V2 || self.dedup || cs < 16384) {
            return Err(ImageError::InvalidOption(
                "extended_l2=on needs compat=1.1, clusters of at least 16k (subclusters of 512 bytes), and no dedup (dedup hashes whole clusters)".into(),
            ));
        }
        if let Some(name) = &self.data_file {
            if self.compat == Compat::V2 || self.dedup || name.is_empty() {
                return Err(ImageError::InvalidOption(
                    "an external data file needs compat=1.1, a name, and no dedup".into(),
                ));
            }
            if self.data_file_raw && self.backing.is_some() {
                return Err(ImageError::InvalidOption(
                    "data_file_raw=on and a backing file cannot be combined".into(),
                ));
            }
        } else if self.data_file_raw {
            return Err(ImageError::InvalidOption(
                "data_file_raw=on needs data_file".into(),
            ));
        }
        Ok(())
    }
}

/// LUKS encryption of a new image (qemu-img's `encrypt.*` options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encryption {
    /// The passphrase of key slot 0 (`encrypt.key-secret`).
    pub secret: Secret,
    /// The block cipher: `aes` (QEMU's default), `serpent`, `twofish` or
    /// `cast5` (CBC only).
    pub cipher: String,
    /// Mode and IV generator: `xts-plain64` (QEMU's default), `xts-plain`,
    /// `cbc-plain64`, `cbc-plain` or `cbc-essiv:sha256`.
    pub cipher_mode: String,
    /// Key bits of the cipher (`encrypt.cipher-alg=aes-256` is `aes`, 256):
    /// 128, 192 or 256 (cast5: 128). A 192-bit key in CBC mode is refused,
    /// as QEMU cannot open such a volume (its key split in 4000 stripes
    /// fills no whole sector).
    pub key_bits: u32,
    /// Hash of PBKDF2 and the anti-forensic split: `sha1`, `sha256`
    /// (QEMU's default) or `sha512`.
    pub hash: String,
    /// Milliseconds PBKDF2 should take to unlock the key slot
    /// (`encrypt.iter-time`, 2000 by default in QEMU).
    pub iter_time_ms: u64,
}

impl Encryption {
    /// QEMU's defaults (aes-256-xts-plain64, sha256, 2 s) with `secret`.
    pub fn luks(secret: Secret) -> Self {
        Self {
            secret,
            cipher: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            key_bits: 256,
            hash: "sha256".into(),
            iter_time_ms: 2000,
        }
    }
}

/// How to open an existing image. Start from [`OpenOptions::read_only`],
/// [`OpenOptions::read_write`] or another constructor and chain the
/// setters (or set the public fields): new options can be added without a
/// breaking change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Open for writing.
    pub write: bool,
    /// Bytes of L2 tables to keep in memory.
    pub l2_cache_bytes: u64,
    /// Bytes of refcount blocks to keep in memory.
    pub refcount_cache_bytes: u64,
    /// Open for repair: a writable open of an image QEMU marked corrupt is
    /// allowed (for `check` with repair only, as the specification permits
    /// writes "for regaining consistency"); a repair that leaves the image
    /// clean clears the mark.
    pub repair: bool,
    /// Open for a consistency check: damage to the refcount structure (a
    /// table that is empty, unaligned or outside the file; blocks outside
    /// the file) does not fail the open, so the check can report it and,
    /// with repair, rebuild the structure as `qemu-img check -r all` does.
    /// Until then every allocation fails.
    pub check: bool,
    /// Open read-only at this internal snapshot (its ID, or else its
    /// name; `snapshot.id=` or `snapshot.name=` choose): reads see the
    /// disk's data as it was when it was taken, at the image's current
    /// virtual size (zeros past what the snapshot covered), exactly as
    /// `qemu-img convert -l` reads it. Refused for writing.
    pub snapshot: Option<String>,
    /// Take QEMU's image locks (on by default): a read-write open refuses
    /// an image that another process (QEMU, qemu-img, qemu-nbd, this
    /// library) writes or reads without sharing writes, and then keeps
    /// them out; a read-only open refuses an image being written. Backing
    /// files are locked as read-only opens. Off is QEMU's `locking=off`:
    /// nothing protects the image then. Where the file system has no OFD
    /// locks the open goes on unlocked, as QEMU's `locking=auto` does.
    pub locking: bool,
    /// For a read-only open: share every permission, writing included, as
    /// qemu-img's `-U` (`--force-share`) does, so an image in use can be
    /// inspected (what is read may be changing). Refused for writing.
    pub force_share: bool,
    /// Give the space of freed clusters back to the host file system (on
    /// by default), as QEMU's `pass-discard-request` and
    /// `pass-discard-other` do: when a cluster's refcount falls to 0 (a
    /// guest discard or trim, an overwrite of a shared or compressed
    /// cluster, a deleted snapshot, a dedup consolidation, a shrink), a
    /// hole is punched there, once the metadata that freed it is durable;
    /// and [`Image::close`](crate::Image::close) cuts the free clusters at
    /// the end of the file off it. Off keeps freed clusters allocated in
    /// the file for reuse and the file's length as it is.
    pub punch_holes: bool,
    /// The passphrase of a LUKS-encrypted image (QEMU's
    /// `encrypt.key-secret`). Without it an encrypted image still opens
    /// read-only, for what needs no key (`info`, `map`, `check`); reading
    /// guest data then fails, and a read-write open fails with
    /// [`ImageError::NeedsPassphrase`].
    pub key_secret: Option<Secret>,
}

/// A passphrase: zeroed when dropped, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(zeroize::Zeroizing<Vec<u8>>);

impl Secret {
    /// The passphrase `bytes` (as QEMU's `--object secret` takes them:
    /// raw bytes, no trailing newline).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(zeroize::Zeroizing::new(bytes.into()))
    }

    /// The passphrase's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl OpenOptions {
    /// Read-write for `check` with repair.
    pub fn for_repair() -> Self {
        Self {
            write: true,
            repair: true,
            check: true,
            ..Self::default()
        }
    }

    /// Read-only for `check` without repair.
    pub fn for_check() -> Self {
        Self {
            write: false,
            check: true,
            ..Self::default()
        }
    }

    /// Read-only with default caches.
    pub fn read_only() -> Self {
        Self {
            write: false,
            ..Self::default()
        }
    }

    /// These options with QEMU's `-U`: a read-only open that shares
    /// writing with others (see [`OpenOptions::force_share`]).
    pub fn sharing(self) -> Self {
        Self {
            force_share: true,
            ..self
        }
    }

    /// Read-only at internal snapshot `id_or_name`.
    pub fn at_snapshot(id_or_name: impl Into<String>) -> Self {
        Self {
            snapshot: Some(id_or_name.into()),
            ..Self::read_only()
        }
    }

    /// Read-write with default caches.
    pub fn read_write() -> Self {
        Self {
            write: true,
            ..Self::default()
        }
    }

    /// Sets [`OpenOptions::write`].
    pub fn write(mut self, on: bool) -> Self {
        self.write = on;
        self
    }

    /// Sets [`OpenOptions::l2_cache_bytes`].
    pub fn l2_cache_bytes(mut self, bytes: u64) -> Self {
        self.l2_cache_bytes = bytes;
        self
    }

    /// Sets [`OpenOptions::refcount_cache_bytes`].
    pub fn refcount_cache_bytes(mut self, bytes: u64) -> Self {
        self.refcount_cache_bytes = bytes;
        self
    }

    /// Sets [`OpenOptions::force_share`].
    pub fn force_share(mut self, on: bool) -> Self {
        self.force_share = on;
        self
    }

    /// Sets [`OpenOptions::punch_holes`].
    pub fn punch_holes(mut self, on: bool) -> Self {
        self.punch_holes = on;
        self
    }

    /// Sets [`OpenOptions::locking`].
    pub fn locking(mut self, on: bool) -> Self {
        self.locking = on;
        self
    }

    /// Sets [`OpenOptions::key_secret`].
    pub fn key_secret(mut self, secret: Option<Secret>) -> Self {
        self.key_secret = secret;
        self
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            write: false,
            l2_cache_bytes: 32 << 20,
            refcount_cache_bytes: 4 << 20,
            repair: false,
            check: false,
            snapshot: None,
            locking: true,
            force_share: false,
            punch_holes: true,
            key_secret: None,
        }
    }
}
