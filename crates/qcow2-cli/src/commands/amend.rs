//! `qcow2 amend -o dedup=on|off FILE`: turn deduplication on (the table is
//! built from the data, duplicates shared) or off (the table dropped, bit 1
//! cleared: QEMU writes the image again). Other options are refused with a
//! clear error before anything changes.

use crate::args::{parse_bool, parse_options, AmendArgs, ImageFormat};
use crate::disk::{open_image, resolve_format};
use crate::error::CliError;

/// Runs the command.
pub fn run(args: &AmendArgs) -> Result<u8, CliError> {
    let path = args.file.as_str();
    if args.format.is_some() {
        resolve_format(path, Some(ImageFormat::Qcow2))?;
    }
    let mut dedup = None;
    for (key, value) in parse_options(&args.options)? {
        match key.as_str() {
            "dedup" => dedup = Some(parse_bool(&key, &value)?),
            other => {
                return Err(CliError::Usage(format!(
                    "amending {other:?} is not supported yet (only dedup=on|off); the image is unchanged"
                )))
            }
        }
    }
    let Some(dedup) = dedup else {
        return Err(CliError::Usage("nothing to amend (-o dedup=on|off)".into()));
    };
    let image = open_image(path, true)?;
    let result = if dedup {
        image.enable_dedup()
    } else {
        image.disable_dedup()
    };
    result.map_err(CliError::image(path))?;
    image.close().map_err(CliError::image(path))?;
    if !args.quiet {
        crate::output::say!("Image amended.");
    }
    Ok(0)
}
