//! Backing files: the image an overlay reads through where it has no
//! cluster of its own.
//!
//! A backing file name is resolved as QEMU resolves it: an absolute name as
//! it is, a relative one against the directory of the image that names it.
//! Its format comes from the backing-format header extension, or, when
//! that is missing, from its content (the qcow2 magic, else raw). Chains of
//! any length open read-only, guarded against loops (a file met twice) and
//! bounded in depth.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use qcow2_alloc::{FileStorage, LockAccess, Storage};

use crate::{ImageError, OpenOptions, Result};

/// Longest chain opened (the image itself not counted).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// A backing file opened as a file: a raw one is ready to read, a qcow2
/// one still to be opened as an image (by the image module, which owns the
/// chain's types).
#[derive(Debug)]
pub(crate) enum BackingFile {
    /// A qcow2 image, with the read-only options and the chain context to
    /// open it in.
    Qcow2 {
        file: FileStorage,
        options: OpenOptions,
        context: ChainContext,
    },
    /// A raw file, locked for reading when locking is on.
    Raw {
        file: FileStorage,
        size: u64,
        path: PathBuf,
    },
}

/// Where a chain is being opened from: the directory names are resolved
/// against, and the files already in the chain.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChainContext {
    pub(crate) base_dir: Option<PathBuf>,
    pub(crate) visited: HashSet<PathBuf>,
    pub(crate) depth: usize,
    /// The canonical path of the image opened in this context, if known.
    pub(crate) own: Option<PathBuf>,
}

impl BackingFile {
    /// Opens the backing file `name` (format `format`, if the overlay names
    /// one) of an image opened in `context`.
    pub(crate) fn open(
        name: &str,
        format: Option<&str>,
        options: &OpenOptions,
        context: &ChainContext,
    ) -> Result<Self> {
        if context.depth >= MAX_CHAIN_DEPTH {
            return Err(ImageError::InvalidOption(format!(
                "backing chain longer than {MAX_CHAIN_DEPTH} images"
            )));
        }
        let path = resolve(name, context.base_dir.as_deref());
        let canonical = std::fs::canonicalize(&path).map_err(|source| ImageError::Io {
            op: "opening the backing file",
            source: std::io::Error::new(source.kind(), format!("{}: {source}", path.display())),
        })?;
        if context.visited.contains(&canonical) {
            return Err(ImageError::BackingChainLoop(canonical));
        }
        let file = FileStorage::open(&path, false).map_err(|source| ImageError::Io {
            op: "opening the backing file",
            source: std::io::Error::new(source.kind(), format!("{}: {source}", path.display())),
        })?;
        let format = match format {
            Some(f) => f.to_string(),
            None => probe(&file)?.to_string(),
        };
        match format.as_str() {
            "qcow2" => {
                let mut inner = context.clone();
                inner.base_dir = canonical.parent().map(Path::to_path_buf);
                inner.visited.insert(canonical.clone());
                inner.own = Some(canonical);
                inner.depth += 1;
                let read_only = OpenOptions {
                    write: false,
                    repair: false,
                    check: false,
                    snapshot: None,
                    ..options.clone()
                };
                Ok(BackingFile::Qcow2 {
                    file,
                    options: read_only,
                    context: inner,
                })
            }
            "raw" | "file" => {
                if options.locking {
                    file.lock(LockAccess::Read {
                        force_share: options.force_share,
                    })?;
                }
                let size = file
                    .len()
                    .map_err(ImageError::io("reading the backing file size"))?;
                Ok(BackingFile::Raw {
                    file,
                    size,
                    path: canonical,
                })
            }
            other => Err(ImageError::Unsupported(format!(
                "backing file format {other:?} (raw and qcow2 are read)"
            ))),
        }
    }
}

/// `name` as QEMU resolves a backing file name: absolute as it is, relative
/// against `base_dir` (the directory of the image naming it).
pub fn resolve(name: &str, base_dir: Option<&Path>) -> PathBuf {
    let path = Path::new(name);
    match base_dir {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

/// `qcow2` when the file starts with the qcow2 magic, else `raw`.
fn probe(file: &FileStorage) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    file.read_at(&mut magic, 0)
        .map_err(ImageError::io("probing the backing file"))?;
    Ok(if magic == *b"QFI\xfb" { "qcow2" } else { "raw" })
}
