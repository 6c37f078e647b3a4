//! `qcow2 snapshot -l IMAGE`: the internal snapshots, as qemu-img lists
//! them. Creating, applying and deleting are refused for now, with a
//! message that says so (the image is not touched).

use qcow2_io::{Image, OpenOptions};

use crate::args::SnapshotArgs;
use crate::commands::info::print_snapshot_table;
use crate::error::CliError;

/// Runs the command.
pub fn run(args: &SnapshotArgs) -> Result<u8, CliError> {
    let path = args.image.as_str();
    if !args.list {
        return Err(CliError::Usage(
            "creating, applying and deleting snapshots is not supported yet (use qemu-img snapshot); the image is unchanged".into(),
        ));
    }
    let image = Image::open(path, &OpenOptions::read_only()).map_err(CliError::image(path))?;
    let snapshots = image.snapshots().map_err(CliError::image(path))?;
    if !snapshots.is_empty() {
        print_snapshot_table(&snapshots);
    }
    Ok(0)
}
