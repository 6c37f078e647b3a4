//! [`ContentAccess`]: how the dedup state reads a data cluster and hashes
//! it. On a plain image: through the image file, with SHA-256. On an
//! encrypted one: through the decrypting data path, with HMAC-SHA-256
//! keyed from the volume key (the dedup table, in the clear, then reveals
//! which clusters are equal, which sharing shows anyway, but not what
//! they hold).

use std::sync::Arc;

use qcow2_alloc::Storage;
use qcow2_dedup::{ContentHash, ContentHasher};
use qcow2_format::{Geometry, HostCluster};

use crate::{ImageError, Result};

/// Reading and hashing guest data for the dedup state.
#[derive(Clone, Default)]
pub(crate) struct ContentAccess {
    hasher: ContentHasher,
    /// The decrypting data path of an encrypted image.
    data: Option<Arc<dyn Storage>>,
}

impl std::fmt::Debug for ContentAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentAccess")
            .field("hasher", &self.hasher)
            .field("encrypted", &self.data.is_some())
            .finish()
    }
}

impl ContentAccess {
    /// Access to an encrypted image's contents.
    pub(crate) fn encrypted(hasher: ContentHasher, data: Arc<dyn Storage>) -> Self {
        Self {
            hasher,
            data: Some(data),
        }
    }

    /// The hash of `content`.
    pub(crate) fn hash(&self, content: &[u8]) -> ContentHash {
        self.hasher.hash(content)
    }

    /// Whether host cluster `host` holds the content hashed `expected`.
    pub(crate) fn holds(
        &self,
        storage: &dyn Storage,
        geometry: Geometry,
        host: HostCluster,
        expected: &[u8; 32],
        buf: &mut [u8],
    ) -> Result<bool> {
        self.read_cluster(storage, geometry, host, buf)?;
        Ok(self.hash(buf).0 == *expected)
    }

    /// Reads host cluster `host` as the guest sees it.
    pub(crate) fn read_cluster(
        &self,
        storage: &dyn Storage,
        geometry: Geometry,
        host: HostCluster,
        buf: &mut [u8],
    ) -> Result<()> {
        let source = self.data.as_deref().unwrap_or(storage);
        source
            .read_at(buf, geometry.host_offset(host).get())
            .map_err(ImageError::io("reading a data cluster to hash it"))
    }
}
