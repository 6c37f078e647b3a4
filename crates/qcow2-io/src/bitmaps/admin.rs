//! The bitmap operations of an open image (`qemu-img bitmap`'s). A change
//! holds every range lock, so no write is between setting its bit and
//! writing its data while a bitmap is cleared or copied; each change is
//! stored before it returns.

use crate::image::Device;
use crate::map_extent::DirtyExtent;
use crate::Result;

impl Device {
    pub(crate) fn add_bitmap(
        &self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        self.meta
            .lock()
            .bitmap_ops()
            .add(name, granularity, enabled)
    }

    pub(crate) fn remove_bitmap(&self, name: &str) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        self.meta.lock().bitmap_ops().remove(name)
    }

    pub(crate) fn clear_bitmap(&self, name: &str) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        self.meta.lock().bitmap_ops().clear(name)
    }

    pub(crate) fn set_bitmap_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        self.meta.lock().bitmap_ops().set_enabled(name, enabled)
    }

    pub(crate) fn merge_bitmap(
        &self,
        target: &str,
        source: &Device,
        source_name: &str,
    ) -> Result<()> {
        self.check_writable()?;
        let bits = source.meta.lock().bitmap_ops().bits(source_name)?;
        let _all = self.lock_for_change(0..u64::MAX)?;
        self.meta.lock().bitmap_ops().merge(target, &bits)
    }

    pub(crate) fn dirty_extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<DirtyExtent>> {
        self.check_bounds(offset, len)?;
        self.meta.lock().bitmap_ops().runs(name, offset, len)
    }
}
