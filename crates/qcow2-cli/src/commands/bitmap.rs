//! `qcow2 bitmap`: the operations of `qemu-img bitmap` on an image's
//! persistent dirty bitmaps, run in the order given; each is stored before
//! the next runs, so a failure leaves the ones before it done (as in
//! qemu-img, whose message it prints).

use qcow2_io::{Image, OpenOptions};

use crate::args::ImageFormat;
use crate::args::{BitmapArgs, BitmapOperation};
use crate::disk::resolve_format;
use crate::error::CliError;

/// Runs the command.
pub fn run(args: &BitmapArgs) -> Result<u8, CliError> {
    let ops = &args.operations.0;
    let path = args.file.as_path();
    let adds = ops.contains(&BitmapOperation::Add);
    let merges = ops.iter().any(|op| matches!(op, BitmapOperation::Merge(_)));
    if args.granularity.is_some() && !adds {
        return Err(CliError::Usage(
            "granularity only supported with --add".into(),
        ));
    }
    if args.source_file.is_some() && !merges {
        return Err(CliError::Usage("-b only supported with --merge".into()));
    }
    if args.format.value.is_some() {
        resolve_format(path, Some(ImageFormat::Qcow2))?;
    }
    let image = Image::open(
        path,
        &crate::secrets::with_key(path, OpenOptions::read_write()),
    )
    .map_err(CliError::image(path))?;
    let source = match &args.source_file {
        Some(file) => {
            resolve_format(file, Some(ImageFormat::Qcow2))?;
            let options = OpenOptions::read_only();
            Some(
                Image::open(file, &crate::secrets::with_key(file, options.clone()))
                    .map_err(CliError::image(file))?,
            )
        }
        None => None,
    };
    let name = args.bitmap.as_str();
    for op in ops {
        let (what, result) = match op {
            BitmapOperation::Add => ("add", image.bitmaps().add(name, args.granularity, true)),
            BitmapOperation::Remove => ("remove", image.bitmaps().remove(name)),
            BitmapOperation::Clear => ("clear", image.bitmaps().clear(name)),
            BitmapOperation::Enable => ("enable", image.bitmaps().enable(name)),
            BitmapOperation::Disable => ("disable", image.bitmaps().disable(name)),
            BitmapOperation::Merge(from) => (
                "merge",
                image
                    .bitmaps()
                    .merge(name, source.as_ref().unwrap_or(&image), from),
            ),
        };
        result.map_err(|e| {
            CliError::Usage(format!("Operation {what} on bitmap {name} failed: {e}"))
        })?;
    }
    if let Some(source) = source {
        source.close().map_err(CliError::image(path))?;
    }
    image.close().map_err(CliError::image(path))?;
    Ok(0)
}
