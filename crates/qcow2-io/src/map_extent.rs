//! How [`Image::map`](crate::Image::map) describes the virtual disk (runs
//! of guest clusters stored the same way), and how
//! [`Bitmaps::dirty_extents`](crate::Bitmaps::dirty_extents) describes a
//! persistent bitmap (runs of granules changed or not).

/// How a range of the virtual disk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Data in the image file.
    Data,
    /// Compressed data in the image file.
    Compressed,
    /// A zero cluster.
    Zero,
    /// Not allocated (reads as zeros without a backing file).
    Unallocated,
}

/// A run of guest clusters stored the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapExtent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// How it is stored.
    pub kind: MapKind,
    /// Host offset of the first byte, for data, and for zero clusters and
    /// unallocated subclusters that keep a host cluster (as `qemu-img map`
    /// reports them); runs are contiguous on the host.
    pub host_offset: Option<u64>,
}

/// A run of a persistent bitmap's granules of one state, in guest bytes
/// (the first and last clipped to the range asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyExtent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Whether the bitmap's bits are set there (written since it was
    /// cleared or added).
    pub dirty: bool,
}
