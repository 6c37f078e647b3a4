//! The export: one shared [`Image`] and how it is offered (name, read-only,
//! discard and zero-detection policy).

use std::sync::Arc;

use qcow2_io::Image;

use crate::proto::{tx, MAX_REQUEST};
use crate::session::Session;

/// What `NBD_CMD_TRIM` does (qemu-nbd's `--discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Acknowledge trims and keep the data (qemu-nbd's default).
    #[default]
    Ignore,
    /// Deallocate trimmed clusters.
    Unmap,
}

/// What a write of all zeros becomes (qemu-nbd's `--detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// A write like any other.
    #[default]
    Off,
    /// A write-zeroes that keeps the clusters allocated.
    On,
    /// A write-zeroes that may deallocate whole clusters (needs
    /// `--discard=unmap`, as in qemu-nbd; otherwise as `On`).
    Unmap,
}

/// How the image is offered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportOptions {
    /// The export's name (`-x`); the empty name is the default export.
    pub name: String,
    /// A description shown by `NBD_OPT_LIST` and `NBD_OPT_INFO`.
    pub description: String,
    /// Refuse writes with `EPERM` (`-r`).
    pub read_only: bool,
    /// Trim policy.
    pub discard: DiscardMode,
    /// Zero-detection policy.
    pub detect_zeroes: DetectZeroes,
    /// Persistent bitmaps offered as `qemu:dirty-bitmap:NAME` contexts
    /// (qemu-nbd's `-B NAME`).
    pub bitmaps: Vec<String>,
    /// Offer the `qemu:allocation-depth` context (qemu-nbd's `-A`).
    pub allocation_depth: bool,
}

/// The image and its offer. Cheap to clone (the image is shared).
#[derive(Debug, Clone)]
pub struct Export {
    image: Arc<Image>,
    options: ExportOptions,
    zero_flag: bool,
}

impl Export {
    /// Offers `image` as `options` say. A writable export needs an image
    /// opened for writing.
    pub fn new(image: Arc<Image>, mut options: ExportOptions) -> Self {
        options.read_only |= !image.is_writable();
        let zero_flag = image.header().version >= 3;
        Self {
            image,
            options,
            zero_flag,
        }
    }

    /// Checks that every bitmap the options name can be exported: it
    /// exists and is consistent (as qemu-nbd refuses to start otherwise).
    pub fn check_bitmaps(&self) -> qcow2_io::Result<()> {
        for name in &self.options.bitmaps {
            self.image.bitmaps().dirty_extents(name, 0, 0)?;
        }
        Ok(())
    }

    /// The image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The export's options.
    pub fn options(&self) -> &ExportOptions {
        &self.options
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The export's description.
    pub fn description(&self) -> &str {
        &self.options.description
    }

    /// Whether a client asking for `name` gets this export.
    pub fn answers_to(&self, name: &[u8]) -> bool {
        name == self.options.name.as_bytes()
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// Whether zeroing can keep allocations without writing data (v3
    /// zero flag); a fast zero with `NO_HOLE` is refused otherwise.
    pub fn zeroes_fast_with_allocation(&self) -> bool {
        self.zero_flag
    }

    /// Minimum, preferred and maximum request sizes.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let preferred = self.image.cluster_size().min(u64::from(MAX_REQUEST)) as u32;
        (1, preferred.max(4096), MAX_REQUEST)
    }

    /// The transmission flags for a session.
    pub(crate) fn transmission_flags(&self, session: &Session) -> u16 {
        let mut flags = tx::HAS_FLAGS
            | tx::SEND_FLUSH
            | tx::SEND_FUA
            | tx::SEND_TRIM
            | tx::SEND_WRITE_ZEROES
            | tx::SEND_FAST_ZERO
            | tx::SEND_CACHE;
        if session.multi_conn {
            flags |= tx::CAN_MULTI_CONN;
        }
        if self.options.read_only {
            flags |= tx::READ_ONLY;
        }
        if session.structured {
            flags |= tx::SEND_DF;
        }
        flags
    }
}
