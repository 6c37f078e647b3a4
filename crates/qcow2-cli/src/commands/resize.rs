//! `qcow2 resize [-f qcow2] [-q] [--shrink] [--preallocation=MODE] FILE [+|-]SIZE`

use qcow2_io::{Image, OpenOptions, Preallocation};

use crate::args::{ImageFormat, ResizeArgs};
use crate::disk::resolve_format;
use crate::error::CliError;
use crate::output::say;

/// Runs the command.
pub fn run(args: &ResizeArgs) -> Result<u8, CliError> {
    let path = args.file.as_path();
    if args.format.value.is_some() {
        resolve_format(path, Some(ImageFormat::Qcow2))?;
    }
    let image = Image::open(
        path,
        &crate::secrets::with_key(path, OpenOptions::read_write()),
    )
    .map_err(CliError::image(path))?;
    crate::disk::warn_damage(&image, path);
    let current = image.size();
    let new = args
        .size
        .apply(current)
        .ok_or_else(|| CliError::Usage("the new size is out of range".into()))?;
    if new == 0 {
        return Err(CliError::Usage("New image size must be positive".into()));
    }
    if new <= current && args.preallocation.is_some_and(|p| p != Preallocation::Off) {
        return Err(CliError::Usage(
            "Preallocation can only be used for growing images".into(),
        ));
    }
    if new < current {
        if !args.shrink {
            return Err(CliError::Usage(
                "use the --shrink option to perform a shrink operation".into(),
            ));
        }
        image.shrink(new).map_err(CliError::image(path))?;
    } else {
        let preallocation = args.preallocation.unwrap_or_default();
        image
            .resize_preallocated(new, preallocation)
            .map_err(CliError::image(path))?;
    }
    image.close().map_err(CliError::image(path))?;
    if !args.quiet.quiet {
        say!("Image resized.");
    }
    Ok(0)
}
