//! What [`Keys`] does: the LUKS key slots of an [`Image`](crate::Image).

use crate::image::Keys;
use crate::options::Secret;
use crate::Result;

impl std::fmt::Debug for Keys<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").finish_non_exhaustive()
    }
}

impl Keys<'_> {
    /// Puts `secret` into a LUKS key slot of this (unlocked) image: slot
    /// `slot`, or the first free one; PBKDF2 tuned to take `iter_time_ms`
    /// (`qemu-img amend -o encrypt.state=active,encrypt.new-secret=`).
    /// The slot's material is durable before the header names it. Returns
    /// the slot.
    pub fn add(&self, secret: &Secret, slot: Option<usize>, iter_time_ms: u64) -> Result<usize> {
        self.device.add_key(secret, slot, iter_time_ms)
    }

    /// Erases LUKS key slot `slot`, or every slot `secret` opens
    /// (`encrypt.state=inactive` with `encrypt.keyslot=` or
    /// `encrypt.old-secret=`); erasing every active slot needs `force`
    /// (the data would be unreadable for ever). Returns the slots erased.
    pub fn remove(
        &self,
        slot: Option<usize>,
        secret: Option<&Secret>,
        force: bool,
    ) -> Result<Vec<usize>> {
        self.device.remove_keys(slot, secret, force)
    }
}
