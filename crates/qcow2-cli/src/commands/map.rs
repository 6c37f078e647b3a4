//! `qcow2 map [--output human|json] FILE`

use qcow2_io::{Image, MapKind, OpenOptions};
use serde_json::json;

use crate::args::Args;
use crate::error::CliError;
use crate::output::say;

/// Runs the command.
pub fn run(argv: &[String]) -> Result<u8, CliError> {
    let args = Args::parse(argv, &["--output", "-f"], &[])?;
    let json = args.json_output()?;
    let [path] = args.expect_positional(&["FILE"])?[..] else {
        unreachable!("expect_positional checked the count")
    };
    let image = Image::open(path, &OpenOptions::read_only()).map_err(CliError::image(path))?;
    let extents = image.map().map_err(CliError::image(path))?;
    if json {
        let list: Vec<_> = extents
            .iter()
            .map(|e| {
                let mut v = json!({
                    "start": e.start,
                    "length": e.length,
                    "depth": 0,
                    "present": e.kind != MapKind::Unallocated,
                    "zero": matches!(e.kind, MapKind::Zero | MapKind::Unallocated),
                    "data": matches!(e.kind, MapKind::Data | MapKind::Compressed),
                    "compressed": e.kind == MapKind::Compressed,
                });
                if let Some(h) = e.host_offset {
                    v["offset"] = json!(h);
                }
                v
            })
            .collect();
        say!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
    } else {
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
    Ok(0)
}
