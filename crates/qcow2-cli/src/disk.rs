//! A source or target disk of either format, for convert and compare.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2_io::{Backing, FileStorage, Image, LockAccess, MapKind, OpenOptions, Storage};

pub use qcow2_io::is_zero;

use crate::args::ImageFormat;
use crate::error::CliError;

/// An opened disk image: raw or qcow2.
pub enum Disk {
    /// A raw file.
    Raw {
        /// The file, read through the page cache (its readahead keeps the
        /// device busier than direct reads of one chunk at a time).
        file: FileStorage,
        /// Its length.
        size: u64,
    },
    /// A qcow2 image.
    Qcow2(Box<Image>),
}

/// qcow2 if the file starts with the qcow2 magic, else raw.
pub fn detect_format(path: &Path) -> Result<ImageFormat, CliError> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(CliError::io(path))?;
    let n = file.read(&mut magic).map_err(CliError::io(path))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// The format to read `path` as: the one asked for (a file asked for as
/// qcow2 must carry the qcow2 magic), or the one its content shows.
pub fn resolve_format(path: &Path, asked: Option<ImageFormat>) -> Result<ImageFormat, CliError> {
    let found = detect_format(path)?;
    match asked {
        None => Ok(found),
        Some(ImageFormat::Qcow2) if found != ImageFormat::Qcow2 => Err(CliError::Usage(format!(
            "{path} is not a qcow2 image (no qcow2 magic); use -f raw to read it as raw",
            path = path.display()
        ))),
        Some(f) => Ok(f),
    }
}

/// The backing file format given with `-F`. It is never probed, as
/// qemu-img refuses to: a guest can write a header into a raw backing
/// file that would change how the host opens it. `missing` is the error
/// for a missing `-F`.
pub fn backing_format_name(
    asked: Option<ImageFormat>,
    missing: impl FnOnce() -> String,
) -> Result<&'static str, CliError> {
    asked
        .map(ImageFormat::name)
        .ok_or_else(|| CliError::Usage(missing()))
}

/// Refuses to write `output` when it is the same file as one of `inputs`
/// (compared by device and inode, so `a.qcow2`, `./a.qcow2` and links all
/// match), before anything is created or truncated: writing it would
/// destroy what is being read. QEMU refuses the same through its image
/// locks; this holds without them.
pub fn refuse_same_file<P: AsRef<Path>>(output: &Path, inputs: &[P]) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(out) = std::fs::metadata(output) else {
        return Ok(());
    };
    for input in inputs {
        let input = input.as_ref();
        if let Ok(meta) = std::fs::metadata(input) {
            if meta.dev() == out.dev() && meta.ino() == out.ino() {
                return Err(CliError::Usage(format!(
                    "{} is the same file as the input {}: writing it would destroy what is being read",
                    output.display(),
                    input.display()
                )));
            }
        }
    }
    Ok(())
}

/// Opens `path` read-only as a qcow2 image, saying on stderr when its
/// refcount structure is damaged: the data still reads (as QEMU reads it),
/// and `check -r all` repairs the image.
pub fn open_read_only(path: &Path, options: &OpenOptions) -> Result<Image, CliError> {
    let image = Image::open(path, &crate::secrets::with_key(path, options.clone()))
        .map_err(CliError::image(path))?;
    warn_damage(&image, path);
    Ok(image)
}

/// Says on stderr that `image`'s file is truncated, or that its refcount
/// structure is damaged, if it is.
pub fn warn_damage(image: &Image, path: &Path) {
    if let Some(truncation) = image.truncation() {
        eprintln!(
            "qcow2: warning: {path} is truncated: {truncation}; the missing part reads as zeros",
            path = path.display()
        );
    }
    if let Some(damage) = image.refcount_damage() {
        eprintln!(
            "qcow2: warning: {path}: {damage}; reading the data anyway, \
             run 'qcow2 check -r all {path}' to repair the image",
            path = path.display()
        );
    }
}

/// Opens a qcow2 image whose aligned data requests bypass the page cache
/// (for bulk rewrites such as `qcow2 dedup`).
pub fn open_image(path: &Path, writable: bool) -> Result<Image, CliError> {
    let p = Path::new(path);
    let storage = FileStorage::open(p, writable)
        .map_err(CliError::io(path))?
        .with_direct_io(p, writable);
    let options = if writable {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    let image = Image::open_on_file(
        Arc::new(storage),
        &crate::secrets::with_key(p, options.clone()),
        p,
    )
    .map_err(CliError::image(path))?;
    warn_damage(&image, path);
    Ok(image)
}

impl Disk {
    /// Opens `path` read-only as `format`, or as detected from its content.
    /// With `direct`, aligned reads bypass the page cache; with
    /// `force_share` (qemu-img's `-U`), an image others are writing opens
    /// too.
    pub fn open(
        path: &Path,
        format: Option<ImageFormat>,
        direct: bool,
        force_share: bool,
    ) -> Result<Self, CliError> {
        Self::open_at(path, format, direct, force_share, None)
    }

    /// [`Disk::open`] at an internal snapshot of a qcow2 image (its ID or
    /// name; qemu-img's `snapshot.id=` and `snapshot.name=` forms too).
    pub fn open_at(
        path: &Path,
        format: Option<ImageFormat>,
        direct: bool,
        force_share: bool,
        snapshot: Option<&str>,
    ) -> Result<Self, CliError> {
        let format = resolve_format(path, format)?;
        let p = Path::new(path);
        let mut file = FileStorage::open(p, false).map_err(CliError::io(path))?;
        if direct {
            file = file.with_direct_io(p, false);
        }
        match format {
            ImageFormat::Qcow2 => {
                let mut options = match snapshot {
                    Some(s) => OpenOptions::at_snapshot(s),
                    None => OpenOptions::read_only(),
                };
                options.force_share = force_share;
                let image = Image::open_on_file(
                    Arc::new(file),
                    &crate::secrets::with_key(p, options.clone()),
                    p,
                )
                .map_err(CliError::image(path))?;
                warn_damage(&image, path);
                Ok(Disk::Qcow2(Box::new(image)))
            }
            ImageFormat::Raw if snapshot.is_some() => Err(CliError::Usage(format!(
                "{path} is a raw image: it has no snapshots (-l)",
                path = path.display()
            ))),
            ImageFormat::Raw => {
                // QEMU locks raw images as well.
                file.lock(LockAccess::Read { force_share })
                    .map_err(|e| CliError::image(path)(e.into()))?;
                let size = file.len().map_err(CliError::io(path))?;
                Ok(Disk::Raw { file, size })
            }
        }
    }

    /// The files this disk reads: its own and every backing file below.
    pub fn files(&self, path: &Path) -> Vec<PathBuf> {
        let mut files = vec![PathBuf::from(path)];
        let Disk::Qcow2(image) = self else {
            return files;
        };
        let mut current = image.backing();
        while let Some(layer) = current {
            files.extend(layer.path().map(Path::to_path_buf));
            current = match &*layer {
                Backing::Qcow2(next) => next.backing(),
                Backing::Raw { .. } => None,
            };
        }
        files
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Raw { size, .. } => *size,
            Disk::Qcow2(image) => image.size(),
        }
    }

    /// Reads `buf.len()` bytes from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64, path: &Path) -> Result<(), CliError> {
        match self {
            Disk::Raw { file, .. } => file.read_at(buf, offset).map_err(CliError::io(path)),
            Disk::Qcow2(image) => image.read_at(buf, offset).map_err(CliError::image(path)),
        }
    }

    /// Ranges `[start, end)` allocated anywhere in the disk's chain, merged,
    /// in order, as qemu-img's block status reports allocation: data,
    /// compressed and zero clusters of any layer, all of a raw file.
    pub fn allocated_ranges(&self, path: &Path) -> Result<Vec<(u64, u64)>, CliError> {
        let mut ranges = Vec::new();
        match self {
            Disk::Raw { size, .. } => ranges.push((0, *size)),
            Disk::Qcow2(image) => allocated_in_chain(image, image.size(), &mut ranges)
                .map_err(CliError::image(path))?,
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges.into_iter().filter(|(s, e)| s < e) {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Ok(merged)
    }

    /// Ranges `[start, end)` stored as data (data or compressed clusters,
    /// not zero clusters; a raw file's data), merged, in order: what a
    /// copy that may skip zeros must read.
    pub fn stored_data_ranges(&self, path: &Path) -> Result<Vec<(u64, u64)>, CliError> {
        let Disk::Qcow2(image) = self else {
            return self.data_ranges(path);
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in image.map().map_err(CliError::image(path))? {
            if matches!(e.kind, MapKind::Data | MapKind::Compressed) {
                match out.last_mut() {
                    Some(last) if last.1 == e.start => last.1 += e.length,
                    _ => out.push((e.start, e.start + e.length)),
                }
            }
        }
        Ok(out)
    }

    /// Whether the disk reads unallocated ranges through a backing file.
    pub fn has_backing(&self) -> bool {
        matches!(self, Disk::Qcow2(image) if image.backing().is_some())
    }

    /// Ranges `[start, end)` the image itself holds (data, compressed or
    /// zero clusters; not what its backing chain shows), merged, in order.
    /// All of a raw file.
    pub fn top_ranges(&self, path: &Path) -> Result<Vec<(u64, u64)>, CliError> {
        match self {
            Disk::Raw { size, .. } => Ok(vec![(0, *size)]),
            Disk::Qcow2(image) => {
                let mut out: Vec<(u64, u64)> = Vec::new();
                for e in image.map().map_err(CliError::image(path))? {
                    if e.kind != MapKind::Unallocated {
                        match out.last_mut() {
                            Some(last) if last.1 == e.start => last.1 += e.length,
                            _ => out.push((e.start, e.start + e.length)),
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Ranges `[start, end)` that may hold non-zero data, in order; what
    /// lies between them reads as zeros.
    pub fn data_ranges(&self, path: &Path) -> Result<Vec<(u64, u64)>, CliError> {
        match self {
            // To 1 MiB: a window's holes read as zeros, which copies skip.
            Disk::Raw { file, size } => file
                .data_windows(0, *size, 1 << 20)
                .map_err(CliError::io(path)),
            // Unallocated ranges of an overlay show its backing file.
            Disk::Qcow2(image) if image.backing().is_some() => Ok(vec![(0, image.size())]),
            Disk::Qcow2(image) => {
                let mut out: Vec<(u64, u64)> = Vec::new();
                for e in image.map().map_err(CliError::image(path))? {
                    if matches!(e.kind, MapKind::Data | MapKind::Compressed) {
                        match out.last_mut() {
                            Some(last) if last.1 == e.start => last.1 += e.length,
                            _ => out.push((e.start, e.start + e.length)),
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Adds the ranges below `limit` that `image` or its backing chain
/// allocates.
fn allocated_in_chain(
    image: &Image,
    limit: u64,
    out: &mut Vec<(u64, u64)>,
) -> qcow2_io::Result<()> {
    for e in image.map()? {
        if e.kind != MapKind::Unallocated && e.start < limit {
            out.push((e.start, (e.start + e.length).min(limit)));
        }
    }
    match image.backing().as_deref() {
        Some(Backing::Qcow2(next)) => allocated_in_chain(next, limit.min(image.size()), out),
        Some(Backing::Raw { size, .. }) => {
            out.push((0, (*size).min(limit)));
            Ok(())
        }
        None => Ok(()),
    }
}
