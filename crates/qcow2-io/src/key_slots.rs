//! Key slots of an open LUKS image (`qemu-img amend`'s `encrypt.*`): the
//! work is in `crypto::keyslots`; this holds the locks while it runs.

use crate::image::Device;
use crate::options::Secret;
use crate::{ImageError, Result};

impl Device {
    pub(crate) fn add_key(
        &self,
        secret: &Secret,
        slot: Option<usize>,
        iter_time_ms: u64,
    ) -> Result<usize> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        let key = self
            .volume_key
            .as_ref()
            .ok_or(ImageError::NeedsPassphrase)?;
        let meta = self.meta.lock();
        crate::crypto::keyslots::add(
            &*self.storage,
            meta.header(),
            key,
            secret,
            slot,
            iter_time_ms,
        )
    }

    pub(crate) fn remove_keys(
        &self,
        slot: Option<usize>,
        secret: Option<&Secret>,
        force: bool,
    ) -> Result<Vec<usize>> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        if self.volume_key.is_none() {
            return Err(ImageError::NeedsPassphrase);
        }
        let meta = self.meta.lock();
        crate::crypto::keyslots::erase(&*self.storage, meta.header(), slot, secret, force)
    }
}
