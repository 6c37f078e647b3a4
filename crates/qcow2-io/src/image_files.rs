//! What opening and creating an image needs besides the image itself:
//! reading the header, QEMU's image locks, the external data file, and
//! the backing chain context of an image file.

use std::path::Path;
use std::sync::Arc;

use qcow2_alloc::{FileStorage, LockAccess, Storage};
use qcow2_format::{Header, MAX_CLUSTER_BITS};

use crate::allocator::RefcountLoading;
use crate::backing::ChainContext;
use crate::{CreateOptions, ImageError, OpenOptions, Result};

/// Creates (or truncates) the external data file `name` (as given: a
/// relative name is relative to the current directory, as in QEMU), sized
/// to the virtual disk, its blocks reserved or written as the
/// preallocation asks.
pub(crate) fn create_data_file(name: &str, options: &CreateOptions) -> Result<()> {
    let data =
        FileStorage::create(Path::new(name)).map_err(ImageError::io("creating the data file"))?;
    let size = options.size.next_multiple_of(512);
    data.set_len(size)
        .map_err(ImageError::io("sizing the data file"))?;
    match options.preallocation {
        crate::Preallocation::Falloc => data
            .allocate(0, size)
            .map_err(ImageError::io("reserving the data file"))?,
        crate::Preallocation::Full => {
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < size {
                let n = (size - at).min(zeros.len() as u64);
                data.write_at(&zeros[..n as usize], at)
                    .map_err(ImageError::io("writing the data file"))?;
                at += n;
            }
        }
        _ => {}
    }
    data.flush()
        .map_err(ImageError::io("syncing the data file"))
}

/// Opens the external data file `header` names, writable when the image
/// is. The name is used as it is, as QEMU uses it: a relative one is
/// relative to the current directory (unlike a backing file name).
pub(crate) fn open_data_file(header: &Header, options: &OpenOptions) -> Result<Arc<dyn Storage>> {
    let name = header.data_file().ok_or_else(|| {
        ImageError::Corrupt("the image has an external data file but does not name it".into())
    })?;
    let path = Path::new(name);
    let file = FileStorage::open(path, options.write).map_err(|source| ImageError::Io {
        op: "opening the external data file",
        source: std::io::Error::new(source.kind(), format!("{}: {source}", path.display())),
    })?;
    Ok(Arc::new(file))
}

/// Takes QEMU's image locks on `storage` for an open with `options`.
pub(crate) fn take_locks(storage: &dyn Storage, options: &OpenOptions) -> Result<()> {
    if options.write && options.force_share {
        return Err(ImageError::InvalidOption(
            "force-share (-U) is for read-only opens only".into(),
        ));
    }
    if options.locking {
        let access = if options.write {
            LockAccess::Write
        } else {
            LockAccess::Read {
                force_share: options.force_share,
            }
        };
        storage.lock(access)?;
    }
    Ok(())
}

/// A compat=0.10 image keeps no virtual size per snapshot, so QEMU refuses
/// to resize one that has snapshots (applying one afterwards would fail).
pub(crate) fn refuse_v2_with_snapshots(header: &Header) -> Result<()> {
    if header.version < 3 && header.nb_snapshots > 0 {
        return Err(ImageError::Unsupported(
            "can't resize a compat=0.10 image which has snapshots (as in QEMU)".into(),
        ));
    }
    Ok(())
}

/// The chain context of the image file at `path`: relative backing names
/// resolve against its directory, and it counts as visited.
pub(crate) fn chain_context_of(path: &Path) -> ChainContext {
    let mut context = ChainContext::default();
    if let Ok(canonical) = std::fs::canonicalize(path) {
        context.base_dir = canonical.parent().map(Path::to_path_buf);
        context.visited.insert(canonical.clone());
        context.own = Some(canonical);
    }
    context
}

/// Reads the header; for a check (`tolerant`), damage to the refcount
/// table's location is returned instead of failing. With
/// `tolerant_blocks` (a read-only open), the table's location must be
/// sound, as QEMU demands, but damaged refcount blocks are read through.
pub(crate) fn read_header(
    storage: &dyn Storage,
    tolerant: bool,
    tolerant_blocks: bool,
) -> Result<(Header, RefcountLoading)> {
    let file_size = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    let mut buf = vec![0u8; file_size.min(1 << MAX_CLUSTER_BITS) as usize];
    storage
        .read_at(&mut buf, 0)
        .map_err(ImageError::io("reading the header"))?;
    if !tolerant {
        let loading = if tolerant_blocks {
            RefcountLoading::Tolerant(None)
        } else {
            RefcountLoading::Strict
        };
        return Ok((Header::parse(&buf, file_size)?, loading));
    }
    let (header, damage) = Header::parse_for_check(&buf, file_size)?;
    Ok((
        header,
        RefcountLoading::Tolerant(damage.map(|e| e.to_string())),
    ))
}
