//! `qcow2 create [-f qcow2] [-o OPTIONS] FILE SIZE`

use std::path::Path;

use qcow2_io::{Compression, CreateOptions, Image, OpenOptions};

use crate::args::{CreateArgs, ImageFormat, Qcow2Only};
use crate::error::CliError;
use crate::image_options::apply_create_options;
use crate::output::say;

/// Runs the command.
pub fn run(args: &CreateArgs) -> Result<u8, CliError> {
    // The parser admits qcow2 only, the one format created here.
    let Qcow2Only::Qcow2 = args.format;
    let path = args.file.as_path();
    let size = args.size;
    let mut options = CreateOptions::new(size.unwrap_or(0)).overwrite(true);
    apply_create_options(&mut options, args.options().as_ref())?;
    // -o backing_file=...,backing_fmt=... is -b ... -F ...
    let from_options = options.backing.take();
    let backing = args
        .backing
        .clone()
        .or(from_options.as_ref().map(|(n, _)| n.clone()));
    let backing_format =
        args.backing_format
            .or(match from_options.as_ref().map(|(_, f)| f.as_str()) {
                Some("qcow2") => Some(ImageFormat::Qcow2),
                Some("raw") => Some(ImageFormat::Raw),
                Some("") | None => None,
                Some(other) => {
                    return Err(CliError::Usage(format!(
                        "backing_fmt must be qcow2 or raw, not {other:?}"
                    )))
                }
            });
    if let Some(backing) = &backing {
        let format = backing_format.ok_or_else(|| {
            CliError::Usage("-b needs -F (the backing file's format: qcow2 or raw)".into())
        })?;
        let format = format.name();
        if size.is_none() && options.size == 0 {
            options.size = backing_size(path, backing, format)?;
        }
        options = options.backing_file(backing.clone(), format);
    }
    if size.is_none() && options.size == 0 {
        return Err(CliError::Usage(
            "create needs the virtual size: qcow2 create [-f qcow2] FILE SIZE, \
             or -b BACKING -F FMT to take the backing file's size"
                .into(),
        ));
    }
    options.validate().map_err(CliError::image(path))?;
    let image = Image::create(path, &options).map_err(CliError::image(path))?;
    image.close().map_err(CliError::image(path))?;
    if !args.quiet.quiet {
        let list = args.options();
        let given = list.as_ref().map(|l| l.0.as_slice());
        say!(
            "{}",
            formatting_line(path, &options, given.unwrap_or_default())
        );
    }
    Ok(0)
}

/// The line qemu-img prints for a new image, key for key in its order:
/// the options every image has with their values, the others only when
/// given, as given. `dedup=on` is ours, last.
fn formatting_line(path: &Path, options: &CreateOptions, given: &[(String, String)]) -> String {
    let given = |key: &str| {
        given
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let on_off = |on: bool| if on { "on" } else { "off" };
    let mut line = format!(
        "Formatting '{path}', fmt=qcow2 cluster_size={} extended_l2={}",
        options.cluster_size,
        on_off(options.extended_l2),
        path = path.display()
    );
    if let Some(p) = given("preallocation") {
        line.push_str(&format!(" preallocation={p}"));
    }
    let compression = match options.compression {
        Compression::Zlib => "zlib",
        Compression::Zstd => "zstd",
    };
    line.push_str(&format!(
        " compression_type={compression} size={}",
        options.size
    ));
    if let Some((name, format)) = &options.backing {
        line.push_str(&format!(" backing_file={name} backing_fmt={format}"));
    }
    for key in ["data_file", "data_file_raw", "compat"] {
        if let Some(v) = given(key) {
            line.push_str(&format!(" {key}={v}"));
        }
    }
    line.push_str(&format!(
        " lazy_refcounts={} refcount_bits={}",
        on_off(options.lazy_refcounts),
        options.refcount_bits
    ));
    if options.dedup {
        line.push_str(" dedup=on");
    }
    line
}

/// The virtual size of backing file `name` of the image to be created at
/// `path` (a relative name is resolved against that image's directory).
fn backing_size(path: &Path, name: &str, format: &str) -> Result<u64, CliError> {
    let dir = std::path::Path::new(path)
        .parent()
        .map(std::path::Path::to_path_buf);
    let resolved = qcow2_io::backing::resolve(name, dir.as_deref());
    let shown = resolved.to_string_lossy().into_owned();
    if format == "raw" {
        return Ok(std::fs::metadata(&resolved)
            .map_err(|e| {
                CliError::Usage(format!(
                    "{path}: could not open the backing file {shown}: {e}",
                    path = path.display()
                ))
            })?
            .len());
    }
    let image = Image::open(&resolved, &OpenOptions::read_only()).map_err(|e| {
        let why = match e {
            qcow2_io::ImageError::Io { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        CliError::Usage(format!(
            "{path}: could not open the backing file {shown}: {why}",
            path = path.display()
        ))
    })?;
    Ok(image.size())
}
