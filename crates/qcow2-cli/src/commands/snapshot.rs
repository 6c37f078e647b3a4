//! `qcow2 snapshot -l|-c NAME|-a NAME|-d NAME IMAGE`: list, create, apply
//! and delete internal snapshots, as `qemu-img snapshot` does (the list is
//! printed as qemu-img prints it).

use qcow2_io::{Image, OpenOptions};

use crate::args::SnapshotArgs;
use crate::error::CliError;
use crate::snapshot_list::print_snapshot_table;

/// Runs the command.
pub fn run(args: &SnapshotArgs) -> Result<u8, CliError> {
    let path = args.image.as_path();
    let change = |what: &str, name: &str, op: &dyn Fn(&Image) -> qcow2_io::Result<()>| {
        let image = Image::open(
            path,
            &crate::secrets::with_key(path, OpenOptions::read_write()),
        )
        .map_err(CliError::image(path))?;
        crate::disk::warn_damage(&image, path);
        op(&image)
            .map_err(|e| CliError::Usage(format!("Could not {what} snapshot '{name}': {e}")))?;
        image.close().map_err(CliError::image(path))?;
        Ok(0)
    };
    if let Some(name) = &args.create {
        return change("create", name, &|image| {
            image.snapshots().create(name).map(drop)
        });
    }
    if let Some(name) = &args.apply {
        return change("apply", name, &|image| image.snapshots().apply(name));
    }
    if let Some(name) = &args.delete {
        return change("delete", name, &|image| image.snapshots().delete(name));
    }
    let image = crate::disk::open_read_only(path, &OpenOptions::read_only())?;
    let snapshots = image.snapshots().list().map_err(CliError::image(path))?;
    if !snapshots.is_empty() {
        print_snapshot_table(&snapshots);
    }
    Ok(0)
}
