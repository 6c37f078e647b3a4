//! `qcow2 amend -o OPTIONS FILE`: change an image's options in place, as
//! `qemu-img amend` does: `compat=0.10|1.1`, `lazy_refcounts=on|off`,
//! `refcount_bits=N`, `size=` (grow or shrink), `data_file=NAME` and
//! `data_file_raw=off`, and `dedup=on|off` (the dedup table built from the
//! data, duplicates shared; or dropped, so QEMU writes the image again).
//! Every option is checked before anything changes; unknown ones are
//! refused.

use qcow2_io::Compat;

use crate::args::{AmendArgs, ImageFormat};
use crate::disk::{open_image, resolve_format};
use crate::error::CliError;
use crate::image_options::{parse_amend_options, KeyChange};

/// Runs the command.
pub fn run(args: &AmendArgs) -> Result<u8, CliError> {
    let path = args.file.as_path();
    if args.format.value.is_some() {
        resolve_format(path, Some(ImageFormat::Qcow2))?;
    }
    let (amend, dedup, keys) = parse_amend_options(&args.options())?;
    let changes_format = !amend.is_empty();
    if let Some(keys) = keys {
        if dedup.is_some() || changes_format {
            return Err(CliError::Usage(
                "encrypt.* options are amended alone; the image is unchanged".into(),
            ));
        }
        return change_keys(path, &keys, args.force);
    }
    if dedup.is_none() && !changes_format {
        return Err(CliError::Usage("nothing to amend".into()));
    }
    if dedup == Some(true) && amend.compat == Some(Compat::V2) {
        return Err(CliError::Usage(
            "dedup=on needs compat=1.1; the image is unchanged".into(),
        ));
    }
    let mut image = open_image(path, true)?;
    // Everything is checked before the first change.
    if changes_format {
        image
            .check_amend(&amend, dedup == Some(false))
            .map_err(CliError::image(path))?;
    }
    if dedup == Some(false) {
        image.dedup().disable().map_err(CliError::image(path))?;
    }
    if changes_format {
        image.amend(&amend).map_err(CliError::image(path))?;
    }
    if dedup == Some(true) {
        image.dedup().enable().map_err(CliError::image(path))?;
    }
    image.close().map_err(CliError::image(path))?;
    // Nothing to print on success, with or without -q, as qemu-img amend.
    Ok(0)
}

/// `-o encrypt.state=active,encrypt.new-secret=ID[,encrypt.keyslot=N]` adds
/// a key; `-o encrypt.state=inactive,encrypt.keyslot=N` or
/// `encrypt.old-secret=ID` erases (every active slot only with `--force`).
fn change_keys(path: &std::path::Path, keys: &KeyChange, force: bool) -> Result<u8, CliError> {
    let image = open_image(path, true)?;
    let activate = keys.activate.unwrap_or(keys.new_secret.is_some());
    if activate {
        let secret = keys.new_secret.as_ref().ok_or_else(|| {
            CliError::Usage("encrypt.state=active needs encrypt.new-secret".into())
        })?;
        image
            .keys()
            .add(secret, keys.slot, keys.iter_time_ms.unwrap_or(2000))
            .map_err(CliError::image(path))?;
    } else {
        image
            .keys()
            .remove(keys.slot, keys.old_secret.as_ref(), force)
            .map_err(CliError::image(path))?;
    }
    image.close().map_err(CliError::image(path))?;
    Ok(0)
}
