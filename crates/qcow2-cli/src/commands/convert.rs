//! `qcow2 convert [-f FMT] [-O raw|qcow2] [-o OPTIONS] [-n [--target-is-zero]] [-W] [-m N] [-t CACHE] [-T CACHE] [-p] [-q] [--bitmaps [--skip-broken-bitmaps]] SRC DST`
//!
//! Opens the source and the target and hands them to the copy engine
//! (`crate::copy`); `-n` writes into an existing target, zeros included.

use std::path::Path;

use qcow2_io::{BitmapInfo, Image, OpenOptions, Storage};

use crate::args::{ConvertArgs, ImageFormat, SourceCache};
use crate::copy::{align_ranges, copy, target_file, CopyMode, Qcow2Target, RawTarget, Target};
use crate::disk::{backing_format_name, refuse_same_file, Disk};
use crate::error::CliError;

/// qemu-img convert's options this tool refuses, each with its reason.
fn refuse_unsupported(args: &ConvertArgs) -> Result<(), CliError> {
    let refused = [
        (
            args.sparse_size.is_some(),
            "-S is not supported: zeros are found and skipped per cluster of the target",
        ),
        (
            args.rate_limit.is_some(),
            "-r (a rate limit) is not supported",
        ),
        (
            args.copy_offload,
            "-C (copy offloading) is not supported: the data goes through this process",
        ),
        (
            args.salvage,
            "--salvage is not supported: a read error ends the conversion",
        ),
        (
            args.target_image_opts,
            "--target-image-opts is not supported: name the target by its file name",
        ),
    ];
    match refused.iter().find(|(given, _)| *given) {
        Some((_, why)) => Err(CliError::Usage((*why).into())),
        None => Ok(()),
    }
}

/// Runs the command.
pub fn run(args: &ConvertArgs) -> Result<u8, CliError> {
    refuse_unsupported(args)?;
    if args.parallel.is_some_and(|n| !(1..=16).contains(&n)) {
        return Err(CliError::Usage(
            "Invalid number of coroutines specified. Must be between 1 and 16.".into(),
        ));
    }
    if args.target_is_zero && !args.no_create {
        return Err(CliError::Usage(
            "--target-is-zero requires use of -n flag".into(),
        ));
    }
    let src_path = args.source.as_path();
    let source = Disk::open_at(
        src_path,
        args.source_format,
        args.source_cache == SourceCache::None,
        args.share.force_share,
        args.snapshot.as_deref(),
    )?;
    let size = source.size();
    let bitmaps = bitmaps_to_copy(args, &source)?;
    let mut inputs = source.files(src_path);
    inputs.extend(args.backing.as_deref().map(std::path::PathBuf::from));
    refuse_same_file(&args.target, &inputs)?;
    let target = open_target(args, size)?;
    // A new target reads as zeros; an existing one must have every byte
    // of the source written, zeros included. An overlay (-B) gets what
    // the source's top image holds, zeros included (they hide the
    // backing's data); the rest is assumed to be in its backing file.
    let ranges = if args.no_create && !args.target_is_zero {
        vec![(0, size)]
    } else if let Some(backing) = &args.backing {
        // Up to the backing file's end: what the source's top image holds
        // (all of it, zeros included, for a source without a backing
        // file). Past it the overlay reads zeros anyway: only stored data
        // goes there. Both as qemu-img does.
        let covered = backing_size(&args.target, backing, args.backing_format)?.min(size);
        let mut ranges: Vec<(u64, u64)> = if source.has_backing() {
            source
                .top_ranges(src_path)?
                .into_iter()
                .filter(|&(start, _)| start < covered)
                .map(|(start, end)| (start, end.min(covered)))
                .collect()
        } else {
            vec![(0, covered)]
        };
        ranges.extend(
            source
                .stored_data_ranges(src_path)?
                .into_iter()
                .filter(|&(_, end)| end > covered)
                .map(|(start, end)| (start.max(covered), end)),
        );
        ranges
    } else {
        source.data_ranges(src_path)?
    };
    let ranges = align_ranges(&ranges, target.granule(), size);
    copy(
        &source,
        src_path,
        &ranges,
        target,
        CopyMode {
            progress: args.progress && !args.quiet.quiet,
            zero_existing: (args.no_create && !args.target_is_zero) || args.backing.is_some(),
            parallel: args.parallel.map(|n| n as usize),
        },
    )?;
    if let (Disk::Qcow2(image), false) = (&source, bitmaps.is_empty()) {
        copy_bitmaps(image, &bitmaps, &args.target)?;
    }
    Ok(0)
}

/// The source's bitmaps `--bitmaps` copies, checked before anything is
/// written, with qemu-img's refusals: a source or target that cannot hold
/// bitmaps, and (without `--skip-broken-bitmaps`, which warns and skips
/// them) an inconsistent bitmap.
fn bitmaps_to_copy(args: &ConvertArgs, source: &Disk) -> Result<Vec<BitmapInfo>, CliError> {
    if args.skip_broken_bitmaps && !args.bitmaps {
        return Err(CliError::Usage(
            "Use of --skip-broken-bitmaps requires --bitmaps".into(),
        ));
    }
    if !args.bitmaps {
        return Ok(Vec::new());
    }
    if args.target_format != ImageFormat::Qcow2 {
        return Err(CliError::Usage(format!(
            "Format driver '{}' does not support bitmaps",
            args.target_format.name()
        )));
    }
    let Disk::Qcow2(image) = source else {
        return Err(CliError::Usage("Source lacks bitmap support".into()));
    };
    let info = image.info().map_err(CliError::image(&args.source))?;
    let mut out = Vec::new();
    for bitmap in info.bitmaps {
        if !bitmap.in_use {
            out.push(bitmap);
        } else if args.skip_broken_bitmaps {
            eprintln!(
                "qcow2: warning: Skipping inconsistent bitmap '{}'",
                bitmap.name
            );
        } else {
            return Err(CliError::Usage(format!(
                "Cannot copy inconsistent bitmap '{}'; try --skip-broken-bitmaps, or use \
                 'qcow2 bitmap --remove' to delete it",
                bitmap.name
            )));
        }
    }
    Ok(out)
}

/// Adds each of `bitmaps` to the converted image at `target` and sets the
/// bits the source's copy has.
fn copy_bitmaps(source: &Image, bitmaps: &[BitmapInfo], target: &Path) -> Result<(), CliError> {
    let image = Image::open(target, &OpenOptions::read_write()).map_err(CliError::image(target))?;
    for b in bitmaps {
        image
            .bitmaps()
            .add(&b.name, Some(b.granularity), b.auto)
            .and_then(|()| image.bitmaps().merge(&b.name, source, &b.name))
            .map_err(CliError::image(target))?;
    }
    image.close().map_err(CliError::image(target))
}

/// The virtual size of backing file `name` of the overlay at `target` (a
/// relative name resolves against the overlay's directory).
fn backing_size(target: &Path, name: &str, format: Option<ImageFormat>) -> Result<u64, CliError> {
    let dir = target.parent();
    let resolved = qcow2_io::backing::resolve(name, dir.filter(|d| !d.as_os_str().is_empty()));
    Ok(Disk::open(&resolved, format, false, true)?.size())
}

fn open_target(args: &ConvertArgs, size: u64) -> Result<Box<dyn Target>, CliError> {
    let path = args.target.as_path();
    let cache = args.target_cache;
    if args.no_create && args.options().is_some() {
        return Err(CliError::Usage(
            "-o has no effect with -n (the target is not created)".into(),
        ));
    }
    if let Some(backing) = &args.backing {
        if args.no_create || args.target_format != ImageFormat::Qcow2 {
            return Err(CliError::Usage(
                "-B creates a qcow2 overlay: it needs -O qcow2 and no -n".into(),
            ));
        }
        let format = backing_format_name(args.backing_format, || {
            "Use of backing file requires explicit backing format (-F)".into()
        })?;
        return Ok(Box::new(
            Qcow2Target::create_overlay(
                path,
                size,
                args.options().as_ref(),
                (backing, format),
                cache,
            )?
            .compressing(args.compress),
        ));
    }
    if args.compress && args.target_format != ImageFormat::Qcow2 {
        return Err(CliError::Usage(
            "-c compresses qcow2 targets only (-O qcow2)".into(),
        ));
    }
    let target: Box<dyn Target> = match args.target_format {
        ImageFormat::Qcow2 if args.no_create => {
            Box::new(Qcow2Target::open_existing(path, cache)?.compressing(args.compress))
        }
        ImageFormat::Qcow2 => Box::new(
            Qcow2Target::create(path, size, args.options().as_ref(), cache)?
                .compressing(args.compress),
        ),
        ImageFormat::Raw => {
            if args.options().is_some() {
                return Err(CliError::Usage("raw targets take no -o options".into()));
            }
            let file = target_file(path, cache, args.no_create)?;
            if !args.no_create {
                file.set_len(size).map_err(CliError::io(path))?;
            }
            Box::new(RawTarget::new(file, path, cache))
        }
    };
    if args.no_create {
        let target_size = target.size()?;
        if target_size < size {
            return Err(CliError::Usage(format!(
                "{path} ({target_size} bytes) is smaller than the source ({size} bytes)",
                path = path.display()
            )));
        }
    }
    Ok(target)
}
