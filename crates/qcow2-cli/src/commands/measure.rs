//! `qcow2 measure [--output human|json] [-f FMT] [-O FMT] [-o OPTIONS] [-c]
//! [-l SNAPSHOT] (--size SIZE | FILE)`: the file size of an image converted
//! from FILE (or created with SIZE), as `qemu-img measure` reports it, with
//! two additions qemu-img lacks: `-c` (a compressed target: the source's
//! clusters are compressed to count them) and `-o dedup=on` (a
//! deduplicated target: only the source's distinct clusters count, plus
//! the dedup table).

use std::path::Path;

use qcow2_format::features::INCOMPAT_EXTERNAL_DATA;
use qcow2_io::measure::{bitmaps_size, dedup_table_size};
use qcow2_io::FileStorage;
use qcow2_io::{measure, Backing, ContentHash, CreateOptions, Image, MapKind};
use serde_json::{json, Map, Value};

use crate::args::{ImageFormat, MeasureArgs, OutputFormat};
use crate::disk::{is_zero, Disk};
use crate::error::CliError;
use crate::image_options::{apply_create_options, parse_bool};
use crate::output::say;
use crate::qemu_json::to_qemu_json;

/// The ranges of `[start, end)` that `image` or its backing chain holds
/// data for (zero clusters and holes left out), in order.
fn allocated(
    image: &Image,
    start: u64,
    end: u64,
    out: &mut Vec<(u64, u64)>,
) -> qcow2_io::Result<()> {
    let holes = file_with_holes(image);
    for e in image.map_range(start, end - start)? {
        let (s, t) = (e.start, e.start + e.length);
        match e.kind {
            MapKind::Data => match (&holes, e.host_offset) {
                // As qemu-img: data clusters that are holes in the file
                // (preallocated, never written) read as zeros, and a
                // convert copies nothing of them.
                (Some(file), Some(host)) => {
                    let ranges = file.data_ranges(host, host + e.length).map_err(
                        qcow2_io::ImageError::io("finding the data of the image file"),
                    )?;
                    out.extend(
                        ranges
                            .iter()
                            .map(|&(a, b)| (s + (a - host), s + (b - host))),
                    );
                }
                _ => out.push((s, t)),
            },
            MapKind::Compressed => out.push((s, t)),
            MapKind::Zero => {}
            MapKind::Unallocated => match image.backing().as_deref() {
                Some(Backing::Qcow2(b)) if s < b.size() => allocated(b, s, t.min(b.size()), out)?,
                Some(Backing::Raw { file, size, .. }) if s < *size => {
                    out.extend(file.data_ranges(s, t.min(*size)).map_err(
                        qcow2_io::ImageError::io("finding the data of a raw backing file"),
                    )?)
                }
                _ => {}
            },
        }
    }
    Ok(())
}

/// `image`'s own file, where its holes read as zeros: guest data in the
/// file itself, not encrypted (a hole would decrypt to noise).
fn file_with_holes(image: &Image) -> Option<FileStorage> {
    let header = image.header();
    let external = header.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0;
    if header.crypt_method != 0 || external {
        return None;
    }
    FileStorage::open(image.path()?, false).ok()
}

/// The first byte of each `cluster`-sized cluster the ranges touch.
fn clusters(ranges: &[(u64, u64)], cluster: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &(start, end) in ranges {
        let mut c = start / cluster * cluster;
        while c < end {
            if out.last() != Some(&c) {
                out.push(c);
            }
            c += cluster;
        }
    }
    out
}

/// Bytes of data clusters a new image made with `options` from `source`
/// needs.
fn data_bytes(
    source: &Disk,
    path: &Path,
    options: &CreateOptions,
    compress: bool,
) -> Result<u64, CliError> {
    let size = source.size();
    let ranges = match source {
        Disk::Raw { file, .. } => file.data_ranges(0, size).map_err(CliError::io(path))?,
        Disk::Qcow2(image) => {
            let mut out = Vec::new();
            allocated(image, 0, size, &mut out).map_err(CliError::image(path))?;
            out
        }
    };
    let cs = options.cluster_size;
    let touched = clusters(&ranges, cs);
    if !compress && !options.dedup {
        return Ok(touched.len() as u64 * cs);
    }
    let mut buf = vec![0u8; cs as usize];
    let mut packed = 0u64;
    let mut unique = std::collections::HashSet::new();
    for at in touched {
        let len = (size - at).min(cs) as usize;
        buf.fill(0);
        source.read_at(&mut buf[..len], at, path)?;
        if is_zero(&buf) {
            continue;
        }
        if options.dedup {
            unique.insert(ContentHash::of(&buf).0);
        } else {
            packed += qcow2_io::measure::compressed_len(&buf, options.compression)
                .map_err(CliError::image(path))?;
        }
    }
    Ok(if options.dedup {
        unique.len() as u64 * cs
    } else {
        // Pieces are packed back to back; a table allocated between two of
        // them can leave the rest of a cluster unused, at most one cluster
        // per L2 table or refcount block, which this bounds.
        let slack = (packed / cs / 1024 + 1) * cs;
        packed.next_multiple_of(cs) + slack
    })
}

/// Runs the command.
pub fn run(args: &MeasureArgs) -> Result<u8, CliError> {
    if args.compress
        && args.options().as_ref().is_some_and(|l| {
            l.0.iter()
                .any(|(k, v)| k == "dedup" && parse_bool(k, v).unwrap_or(false))
        })
    {
        return Err(CliError::Usage(
            "-c and dedup=on cannot be combined: dedup images take no compressed clusters".into(),
        ));
    }
    let source = match &args.file {
        Some(path) => Some(Disk::open_at(
            path,
            args.format.value,
            false,
            args.share.force_share,
            args.snapshot.as_deref(),
        )?),
        None if args.snapshot.is_some() => {
            return Err(CliError::Usage("-l needs a source image".into()))
        }
        None => None,
    };
    let path = args.file.as_deref().unwrap_or(Path::new("measure --size"));
    let size = match (&source, &args.size) {
        (Some(s), _) => s.size(),
        (None, Some(size)) => *size,
        (None, None) => return Err(CliError::Usage("expected --size SIZE or FILE".into())),
    };
    let (required, fully, bitmaps) = match args.target_format {
        ImageFormat::Raw => {
            if args.options().is_some() || args.compress {
                return Err(CliError::Usage("raw targets take no -o or -c".into()));
            }
            let bytes = size.next_multiple_of(512);
            (bytes, bytes, None)
        }
        ImageFormat::Qcow2 => measure_qcow2(args, source.as_ref(), path, size)?,
    };
    match args.output.format {
        OutputFormat::Human => {
            say!("required size: {required}");
            say!("fully allocated size: {fully}");
            if let Some(b) = bitmaps {
                say!("bitmaps size: {b}");
            }
        }
        OutputFormat::Json => {
            let mut v = Map::new();
            v.insert("required".into(), json!(required));
            v.insert("fully-allocated".into(), json!(fully));
            if let Some(b) = bitmaps {
                v.insert("bitmaps".into(), json!(b));
            }
            say!("{}", to_qemu_json(&Value::Object(v)));
        }
    }
    Ok(0)
}

/// The figures of a qcow2 target of `size` bytes (from `source`, or
/// empty): required and fully allocated bytes, and the bitmaps' bytes
/// where the source can hold persistent bitmaps.
fn measure_qcow2(
    args: &MeasureArgs,
    source: Option<&Disk>,
    path: &Path,
    size: u64,
) -> Result<(u64, u64, Option<u64>), CliError> {
    let mut options = CreateOptions::new(size);
    apply_create_options(&mut options, args.options().as_ref())?;
    options.size = size;
    let data = match source {
        Some(s) => Some(data_bytes(s, path, &options, args.compress)?),
        None => None,
    };
    let mut m = measure(&options, data).map_err(CliError::image(path))?;
    if options.dedup {
        let extra = dedup_table_size(options.cluster_size, m.required / options.cluster_size);
        m.required += extra;
        m.fully_allocated += extra;
    }
    let bitmaps = match source {
        // As qemu-img: only a source that can hold persistent bitmaps
        // (compat=1.1) has a bitmaps figure.
        Some(Disk::Qcow2(image))
            if options.compat == qcow2_io::Compat::V3 && image.header().version >= 3 =>
        {
            let info = image.info().map_err(CliError::image(path))?;
            let list: Vec<(usize, u64)> = info
                .bitmaps
                .iter()
                .map(|b| (b.name.len(), b.granularity))
                .collect();
            Some(bitmaps_size(options.cluster_size, size, &list))
        }
        _ => None,
    };
    Ok((m.required, m.fully_allocated, bitmaps))
}
