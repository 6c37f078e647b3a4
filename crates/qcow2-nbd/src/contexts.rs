//! The metadata contexts an export offers, as qemu-nbd names them:
//! `base:allocation`, `qemu:allocation-depth` (`-A`) and one
//! `qemu:dirty-bitmap:NAME` per exported bitmap (`-B NAME`); which of them
//! a client's query selects; and the extents of each over a range, for
//! `NBD_CMD_BLOCK_STATUS`.

use qcow2_io::{Backing, Image, MapKind};

use crate::export::Export;
pub(crate) use crate::session::MetaContext;

/// The prefix of a dirty bitmap context.
pub(crate) const DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// `base:allocation` flags.
const HOLE: u32 = 1 << 0;
const ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:` flag.
const DIRTY: u32 = 1 << 0;

/// The contexts `export` offers with their ids (fixed for the export, so a
/// client's selection is a list of ids).
pub(crate) fn offered(export: &Export) -> Vec<(u32, MetaContext)> {
    let mut out = vec![(1, MetaContext::BaseAllocation)];
    if export.options().allocation_depth {
        out.push((2, MetaContext::AllocationDepth));
    }
    for (i, name) in export.options().bitmaps.iter().enumerate() {
        out.push((3 + i as u32, MetaContext::DirtyBitmap(name.clone())));
    }
    out
}

/// The offered contexts `query` names: exactly, or (when listing) every
/// context of a namespace (`base:`, `qemu:`, `qemu:dirty-bitmap:`).
pub(crate) fn matching(
    offered: &[(u32, MetaContext)],
    query: &str,
    listing: bool,
) -> Vec<(u32, MetaContext)> {
    offered
        .iter()
        .filter(|(_, c)| {
            let name = c.name();
            name == query
                || (listing
                    && matches!(query, "base:" | "qemu:" | DIRTY_BITMAP)
                    && name.starts_with(query))
        })
        .cloned()
        .collect()
}

/// The extents of `context` over `[offset, offset + len)`: `(length,
/// flags)`, neighbours of one state merged.
pub(crate) fn extents(
    image: &Image,
    context: &MetaContext,
    offset: u64,
    len: u64,
) -> qcow2_io::Result<Vec<(u32, u32)>> {
    let mut runs: Vec<(u64, u32)> = Vec::new();
    match context {
        MetaContext::BaseAllocation => chain_runs(image, offset, len, &base_allocation, &mut runs)?,
        MetaContext::DirtyBitmap(name) => {
            for e in image.bitmaps().dirty_extents(name, offset, len)? {
                runs.push((e.length, if e.dirty { DIRTY } else { 0 }));
            }
        }
        MetaContext::AllocationDepth => {
            chain_runs(image, offset, len, &|layer, _| layer, &mut runs)?
        }
    }
    let mut merged: Vec<(u32, u32)> = Vec::new();
    for (length, flags) in runs {
        match merged.last_mut() {
            Some(last) if last.1 == flags => last.0 += length as u32,
            _ => merged.push((length as u32, flags)),
        }
    }
    Ok(merged)
}

/// `base:allocation` flags of a range the layer holds: data, or a hole
/// reading as zeros.
fn base_allocation(_layer: u32, kind: MapKind) -> u32 {
    match kind {
        MapKind::Data | MapKind::Compressed => 0,
        MapKind::Zero | MapKind::Unallocated => HOLE | ZERO,
    }
}

/// Appends the state of `[offset, offset + len)` as the whole backing
/// chain of `image` answers it: a range `image` holds gets `state(layer,
/// kind)` (layer 1 being `image`, zero clusters included), an unallocated
/// one what its backing file answers (a raw backing file holds data), and
/// what no layer holds `state(0, Unallocated)`. With the layer as the
/// state this is qemu-nbd's `qemu:allocation-depth`; with the kind,
/// `base:allocation` (an overlay reads its backing file's data, which is
/// not a hole).
fn chain_runs(
    image: &Image,
    offset: u64,
    len: u64,
    state: &dyn Fn(u32, MapKind) -> u32,
    out: &mut Vec<(u64, u32)>,
) -> qcow2_io::Result<()> {
    layer_runs(image, offset, len, 1, state, out)
}

fn layer_runs(
    image: &Image,
    offset: u64,
    len: u64,
    layer: u32,
    state: &dyn Fn(u32, MapKind) -> u32,
    out: &mut Vec<(u64, u32)>,
) -> qcow2_io::Result<()> {
    for e in image.map_range(offset, len)? {
        if e.kind != MapKind::Unallocated {
            out.push((e.length, state(layer, e.kind)));
            continue;
        }
        let backing = image.backing();
        let covered = match backing.as_deref() {
            Some(b) => b.size().saturating_sub(e.start).min(e.length),
            None => 0,
        };
        match backing.as_deref() {
            Some(Backing::Qcow2(next)) if covered > 0 => {
                layer_runs(next, e.start, covered, layer + 1, state, out)?
            }
            Some(Backing::Raw { .. }) if covered > 0 => {
                out.push((covered, state(layer + 1, MapKind::Data)))
            }
            _ => {}
        }
        if covered < e.length {
            out.push((e.length - covered, state(0, MapKind::Unallocated)));
        }
    }
    Ok(())
}
