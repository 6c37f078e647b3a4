//! `qcow2 map [-f FMT] [--output human|json] FILE`
//!
//! The JSON output is qemu-img's, byte for byte: one extent per line.

use qcow2_io::{Image, MapExtent, MapKind, OpenOptions};

use crate::args::{ImageFormat, MapArgs, OutputFormat};
use crate::disk::resolve_format;
use crate::error::CliError;
use crate::output::say;

/// Runs the command.
pub fn run(args: &MapArgs) -> Result<u8, CliError> {
    let path = args.file.as_str();
    let extents = match resolve_format(path, args.format)? {
        ImageFormat::Qcow2 => {
            let image =
                Image::open(path, &OpenOptions::read_only()).map_err(CliError::image(path))?;
            image.map().map_err(CliError::image(path))?
        }
        ImageFormat::Raw => {
            let length = std::fs::metadata(path).map_err(CliError::io(path))?.len();
            vec![MapExtent {
                start: 0,
                length,
                kind: MapKind::Data,
                host_offset: Some(0),
            }]
        }
    };
    match args.output {
        OutputFormat::Json => {
            let lines: Vec<String> = extents.iter().map(json_line).collect();
            say!("[{}]", lines.join(",\n"));
        }
        OutputFormat::Human => {
            say!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in extents.iter().filter(|e| e.kind == MapKind::Data) {
                say!(
                    "{:<16}{:<16}{:<16}{path}",
                    format!("{:#x}", e.start),
                    format!("{:#x}", e.length),
                    format!("{:#x}", e.host_offset.unwrap_or(0))
                );
            }
        }
    }
    Ok(0)
}

/// One extent as qemu-img's `map --output=json` prints it.
fn json_line(e: &MapExtent) -> String {
    let mut line = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": 0, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start,
        e.length,
        e.kind != MapKind::Unallocated,
        matches!(e.kind, MapKind::Zero | MapKind::Unallocated),
        matches!(e.kind, MapKind::Data | MapKind::Compressed),
        e.kind == MapKind::Compressed,
    );
    if let Some(h) = e.host_offset {
        line.push_str(&format!(", \"offset\": {h}"));
    }
    line.push('}');
    line
}
