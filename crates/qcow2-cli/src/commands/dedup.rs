//! `qcow2 dedup [-p] [-o OUT] IMAGE`
//!
//! Without `-o`, turns IMAGE (a plain v3 qcow2 image) into a deduplicated
//! one in place. With `-o OUT`, writes a new deduplicated image with the
//! same cluster size, as `convert -O qcow2 -o dedup=on` would.

use qcow2_io::{Image, OpenOptions};

use crate::args::{CacheMode, DedupArgs};
use crate::copy::{copy, CopyMode, Qcow2Target};
use crate::disk::{open_image, refuse_same_file, Disk};
use crate::error::CliError;
use crate::image_options::OptionList;
use crate::output::say;
use crate::size::human;

/// Runs the command.
pub fn run(args: &DedupArgs) -> Result<u8, CliError> {
    let path = args.image.as_path();
    let result_path = match args.output.as_deref() {
        Some(out) => {
            let source = Disk::open(path, None, false, false)?;
            refuse_same_file(out, &source.files(path))?;
            let cluster_size = match &source {
                Disk::Qcow2(image) => image.cluster_size(),
                Disk::Raw { .. } => 65536,
            };
            let options = OptionList(vec![
                ("dedup".into(), "on".into()),
                ("cluster_size".into(), cluster_size.to_string()),
            ]);
            let target = Qcow2Target::create(out, source.size(), Some(&options), CacheMode::None)?;
            let ranges = source.data_ranges(path)?;
            let mode = CopyMode {
                progress: args.progress && !args.quiet.quiet,
                zero_existing: false,
                parallel: None,
            };
            copy(&source, path, &ranges, Box::new(target), mode)?;
            out
        }
        None => {
            let image = open_image(path, true)?;
            image.dedup().enable().map_err(CliError::image(path))?;
            image.close().map_err(CliError::image(path))?;
            path
        }
    };
    if !args.quiet.quiet {
        let image = Image::open(result_path, &OpenOptions::read_only())
            .map_err(CliError::image(result_path))?;
        if let Some(s) = image
            .dedup()
            .stats()
            .map_err(CliError::image(result_path))?
        {
            say!(
                "{result_path}: {} unique clusters, {} references, {} saved",
                s.unique_clusters,
                s.references,
                human(s.bytes_saved),
                result_path = result_path.display()
            );
        }
    }
    Ok(0)
}
