//! `qcow2 commit [-f qcow2] [-b BASE] [-d] [-p] [-q] FILE`: write what
//! FILE (and the images between it and BASE) hold into BASE, as
//! `qemu-img commit` does, then empty FILE so it reads through again
//! (unless `-d`, or `-b`, which leaves the images between stale).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2_io::{Backing, Image, MapKind, OpenOptions};

use crate::args::{CacheMode, CommitArgs, ImageFormat};
use crate::copy::{copy, CopyMode, Qcow2Target, RawTarget, Target};
use crate::disk::{resolve_format, Disk};
use crate::error::CliError;
use crate::output::say;

/// The commit target found in the chain: its path and whether it is qcow2.
struct Base {
    path: PathBuf,
    qcow2: bool,
}

/// The backing files between the top and the base (top's first) and the
/// base.
fn find_base(top: &Image, wanted: Option<&Path>) -> Result<(Vec<Arc<Backing>>, Base), CliError> {
    let mut between = Vec::new();
    let mut current = top.backing();
    loop {
        let Some(layer) = current else {
            return Err(CliError::Usage(match wanted {
                Some(w) => format!("'{}' is not in the backing chain", w.display()),
                None => "the image has no backing file to commit into".into(),
            }));
        };
        let path = layer
            .path()
            .ok_or_else(|| CliError::Usage("a backing file without a path".into()))?
            .to_path_buf();
        if wanted.is_none_or(|w| w == path) {
            let qcow2 = matches!(*layer, Backing::Qcow2(_));
            return Ok((between, Base { path, qcow2 }));
        }
        current = match &*layer {
            Backing::Qcow2(image) => image.backing(),
            Backing::Raw { .. } => None,
        };
        between.push(layer);
    }
}

/// The ranges any of `layers` holds (data, compressed or zero), merged.
fn allocated(layers: &[&Image], path: &Path) -> Result<Vec<(u64, u64)>, CliError> {
    let mut ranges = Vec::new();
    for layer in layers {
        for e in layer.map().map_err(CliError::image(path))? {
            if e.kind != MapKind::Unallocated {
                ranges.push((e.start, e.start + e.length));
            }
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    Ok(merged)
}

/// Runs the command.
pub fn run(args: &CommitArgs) -> Result<u8, CliError> {
    let path = args.file.as_path();
    if args.format.value.is_some() {
        resolve_format(path, Some(ImageFormat::Qcow2))?;
    }
    let wanted = args
        .base
        .as_deref()
        .map(|b| std::fs::canonicalize(b).map_err(CliError::io(b)))
        .transpose()?;
    // The chain is read while this process writes the base: the source
    // shares writing (its own base), and the base's writer lock keeps
    // other processes out.
    let source = Disk::open(path, Some(ImageFormat::Qcow2), false, true)?;
    let Disk::Qcow2(top) = &source else {
        return Err(CliError::Usage(format!(
            "{path} is not a qcow2 image",
            path = path.display()
        )));
    };
    let (between, base) = find_base(top, wanted.as_deref())?;
    let mut above: Vec<&Image> = vec![top];
    above.extend(between.iter().filter_map(|layer| match &**layer {
        Backing::Qcow2(image) => Some(&**image),
        Backing::Raw { .. } => None,
    }));
    let ranges = allocated(&above, path)?;
    let size = top.size();
    let base_path = base.path.as_path();
    let target: Box<dyn Target> = if base.qcow2 {
        let target = Qcow2Target::open_existing(base_path, CacheMode::Writeback)?;
        if target.size()? < size {
            target.grow(size)?;
        }
        Box::new(target)
    } else {
        Box::new(RawTarget::open_existing(
            base_path,
            size,
            CacheMode::Writeback,
        )?)
    };
    copy(
        &source,
        path,
        &ranges,
        target,
        CopyMode {
            progress: args.progress && !args.quiet.quiet,
            zero_existing: true,
            parallel: None,
        },
    )?;
    drop(source);
    if !args.keep && args.base.is_none() {
        let image = Image::open(
            path,
            &crate::secrets::with_key(path, OpenOptions::read_write()),
        )
        .map_err(CliError::image(path))?;
        image.make_empty().map_err(CliError::image(path))?;
        image.close().map_err(CliError::image(path))?;
    }
    if !args.quiet.quiet {
        say!("Image committed.");
    }
    Ok(0)
}
