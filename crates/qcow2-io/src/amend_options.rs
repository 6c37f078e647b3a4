//! What [`Image::amend`](crate::Image::amend) changes.

use crate::Compat;

/// What [`Image::amend`](crate::Image::amend) changes; `None` keeps the current value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// `compat=0.10` (version 2) or `compat=1.1` (version 3).
    pub compat: Option<Compat>,
    /// `lazy_refcounts=on|off` (version 3 only).
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits=1|2|4|8|16|32|64` (other than 16: version 3 only).
    pub refcount_bits: Option<u32>,
}
