//! `qcow2 map [-f FMT] [--output human|json] FILE`
//!
//! The output is qemu-img's, byte for byte: one extent per line in JSON,
//! with the `depth` of the layer of a backing chain the bytes come from.

use std::path::Path;

use qcow2_io::{Backing, FileStorage, Image, MapKind, OpenOptions, Storage};

use crate::args::{ImageFormat, MapArgs, OutputFormat};
use crate::disk::resolve_format;
use crate::error::CliError;
use crate::output::say;

/// A run of the virtual disk stored the same way in one layer of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Extent {
    start: u64,
    length: u64,
    depth: usize,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    /// Offset in the layer's file, for data that has one.
    offset: Option<u64>,
}

/// Appends `e`, merging it into the previous extent when they continue
/// each other (as qemu-img merges).
fn push(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        let same = (
            last.depth,
            last.present,
            last.zero,
            last.data,
            last.compressed,
        ) == (e.depth, e.present, e.zero, e.data, e.compressed);
        let continues = match (last.offset, e.offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if same && continues && last.start + last.length == e.start {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}

/// The extents of `len` bytes from `start` of `image`, at `depth` in its
/// chain, descending into the backing file where the image has nothing.
fn walk(
    image: &Image,
    start: u64,
    len: u64,
    depth: usize,
    out: &mut Vec<Extent>,
) -> Result<(), qcow2_io::ImageError> {
    let unallocated = |start, length, depth, offset| Extent {
        start,
        length,
        depth,
        present: false,
        zero: true,
        data: false,
        compressed: false,
        offset,
    };
    for e in image.map_range(start, len)? {
        let here = |data: bool, zero: bool, compressed: bool, offset: Option<u64>| Extent {
            start: e.start,
            length: e.length,
            depth,
            present: true,
            zero,
            data,
            compressed,
            offset,
        };
        match e.kind {
            MapKind::Data => push(out, here(true, false, false, e.host_offset)),
            MapKind::Compressed => push(out, here(true, false, true, None)),
            MapKind::Zero => push(out, here(false, true, false, e.host_offset)),
            MapKind::Unallocated => {
                let end = e.start + e.length;
                let Some(backing) = image.backing() else {
                    push(out, unallocated(e.start, e.length, depth, e.host_offset));
                    continue;
                };
                let covered = end.min(backing.size()).max(e.start);
                if covered > e.start {
                    match &*backing {
                        Backing::Qcow2(b) => walk(b, e.start, covered - e.start, depth + 1, out)?,
                        Backing::Raw { file, .. } => {
                            raw_extents(file, e.start, covered, depth + 1, out).map_err(
                                qcow2_io::ImageError::io("finding the data of a raw backing file"),
                            )?
                        }
                    }
                }
                if covered < end {
                    push(out, unallocated(covered, end - covered, depth, None));
                }
            }
        }
    }
    Ok(())
}

/// The extents of `[start, end)` of a raw file at `depth`: its data, and
/// its holes as zeros, as qemu-img maps a raw file.
fn raw_extents(
    file: &FileStorage,
    start: u64,
    end: u64,
    depth: usize,
    out: &mut Vec<Extent>,
) -> std::io::Result<()> {
    let extent = |s: u64, e: u64, data: bool| Extent {
        start: s,
        length: e - s,
        depth,
        present: true,
        zero: !data,
        data,
        compressed: false,
        offset: Some(s),
    };
    let mut at = start;
    for (s, e) in file.data_ranges(start, end)? {
        if s > at {
            push(out, extent(at, s, false));
        }
        push(out, extent(s, e, true));
        at = e;
    }
    if at < end {
        push(out, extent(at, end, false));
    }
    Ok(())
}

/// The file names of the chain, top first, as qemu-img names them.
fn layer_names(image: &Image, path: &Path) -> Vec<String> {
    let mut names = vec![path.display().to_string()];
    let mut info = image.info().ok();
    let mut current = image.backing();
    while let (Some(i), Some(b)) = (info.take(), current) {
        let Some(name) = i.backing_file else { break };
        let last = names.last().cloned().unwrap_or_default();
        let dir = std::path::Path::new(&last).parent();
        let dir = dir.filter(|d| !d.as_os_str().is_empty());
        names.push(
            qcow2_io::backing::resolve(&name, dir)
                .to_string_lossy()
                .into_owned(),
        );
        match &*b {
            Backing::Qcow2(next) => {
                info = next.info().ok();
                current = next.backing();
            }
            Backing::Raw { .. } => break,
        }
    }
    names
}

/// Runs the command.
pub fn run(args: &MapArgs) -> Result<u8, CliError> {
    let path = args.file.as_path();
    let (extents, names) = match resolve_format(path, args.format.value)? {
        ImageFormat::Qcow2 => {
            let options = OpenOptions::read_only().force_share(args.share.force_share);
            let image = crate::disk::open_read_only(path, &options)?;
            let mut out = Vec::new();
            walk(&image, 0, image.size(), 0, &mut out).map_err(CliError::image(path))?;
            (out, layer_names(&image, path))
        }
        ImageFormat::Raw => {
            let file =
                FileStorage::open(std::path::Path::new(path), false).map_err(CliError::io(path))?;
            let length = file.len().map_err(CliError::io(path))?;
            let mut out = Vec::new();
            raw_extents(&file, 0, length, 0, &mut out).map_err(CliError::io(path))?;
            (out, vec![path.display().to_string()])
        }
    };
    match args.output.format {
        OutputFormat::Json => {
            let lines: Vec<String> = extents.iter().map(json_line).collect();
            say!("[{}]", lines.join(",\n"));
        }
        OutputFormat::Human => {
            say!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            // C's "%#x" prints 0 as "0".
            let hex = |v: u64| {
                if v == 0 {
                    "0".to_string()
                } else {
                    format!("{v:#x}")
                }
            };
            for e in extents.iter().filter(|e| e.data && e.offset.is_some()) {
                say!(
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    hex(e.offset.unwrap_or(0)),
                    names
                        .get(e.depth)
                        .map_or_else(|| path.display().to_string(), String::clone)
                );
            }
        }
    }
    Ok(0)
}

/// One extent as qemu-img's `map --output=json` prints it.
fn json_line(e: &Extent) -> String {
    let mut line = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed,
    );
    if let Some(h) = e.offset {
        line.push_str(&format!(", \"offset\": {h}"));
    }
    line.push('}');
    line
}
