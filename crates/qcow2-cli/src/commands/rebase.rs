//! `qcow2 rebase [-f qcow2] [-u] [-p] [-q] -b BACKING [-F FMT] FILE`: move
//! an overlay onto another backing file (or none, with `-b ""`), as
//! `qemu-img rebase` does. Without `-u` what the guest reads is kept: the
//! old backing's data is copied in wherever it differs from the new one's.

use qcow2_io::{Image, OpenOptions};

use crate::args::{ImageFormat, RebaseArgs};
use crate::disk::{backing_format_name, resolve_format};
use crate::error::CliError;
use crate::progress::Progress;

/// Runs the command.
pub fn run(args: &RebaseArgs) -> Result<u8, CliError> {
    let path = args.file.as_path();
    if args.format.value.is_some() {
        resolve_format(path, Some(ImageFormat::Qcow2))?;
    }
    let backing = if args.backing.is_empty() {
        if args.backing_format.is_some() {
            return Err(CliError::Usage(
                "-F names the format of a backing file, and -b \"\" removes it".into(),
            ));
        }
        None
    } else {
        let format = backing_format_name(args.backing_format, || {
            format!(
                "Could not change the backing file to '{}': backing format must be specified (-F)",
                args.backing
            )
        })?;
        Some((args.backing.as_str(), format))
    };
    let image = Image::open(
        path,
        &crate::secrets::with_key(path, OpenOptions::read_write()),
    )
    .map_err(CliError::image(path))?;
    if args.unsafe_ {
        image
            .set_backing_file(backing)
            .map_err(CliError::image(path))?;
    } else {
        let mut progress: Option<Progress> = None;
        let show = args.progress && !args.quiet.quiet;
        image
            .rebase(backing, |done, total| {
                let p = progress.get_or_insert_with(|| Progress::new(total, show));
                p.advance(done.saturating_sub(p.done()));
            })
            .map_err(CliError::image(path))?;
        if let Some(p) = progress {
            p.finish();
        }
    }
    image.close().map_err(CliError::image(path))?;
    Ok(0)
}
