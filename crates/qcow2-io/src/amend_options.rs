//! What [`Image::amend`](crate::Image::amend) changes.

use crate::Compat;

/// What [`Image::amend`](crate::Image::amend) changes; `None` keeps the
/// current value. Build it from `AmendOptions::default()` and set the
/// fields wanted: new options may be added without a breaking change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmendOptions {
    /// `compat=0.10` (version 2) or `compat=1.1` (version 3).
    pub compat: Option<Compat>,
    /// `lazy_refcounts=on|off` (version 3 only).
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits=1|2|4|8|16|32|64` (other than 16: version 3 only).
    pub refcount_bits: Option<u32>,
    /// `size=`: the new virtual size in bytes (rounded up to 512). Unlike
    /// [`Image::resize`](crate::Image::resize) it may shrink, as `qemu-img
    /// amend -o size=` does (what lies past the new end is dropped); 0
    /// keeps the size, as in QEMU.
    pub size: Option<u64>,
    /// `data_file=`: the name the header gives the external data file, for
    /// an image that has one (moved or renamed); it takes effect at the
    /// next open. Refused on an image without an external data file, and
    /// empty (the image would not name its data).
    pub data_file: Option<String>,
    /// `data_file_raw=`: `false` drops the promise that the external data
    /// file reads as the guest disk; `true` is accepted only where it
    /// already holds (it cannot be made true after the fact), as in QEMU.
    pub data_file_raw: Option<bool>,
}

impl AmendOptions {
    /// Whether nothing would change.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
