//! `qcow2 check [--output human|json] [-r leaks|all] FILE`
//!
//! Exit status as qemu-img: 0 clean, 2 corruptions (also metadata too
//! damaged to open), 3 leaks only, 63 for a raw image (no checks), 1 when
//! the check could not run.

use std::path::Path;

use qcow2_io::{CheckReport, FormatError, Image, ImageError, OpenOptions, RepairMode};
use serde_json::{json, Map, Value};

use crate::args::{CheckArgs, ImageFormat, OutputFormat, RepairArg};
use crate::disk::{detect_format, resolve_format};
use crate::error::CliError;
use crate::output::say;
use crate::qemu_json::to_qemu_json;

/// Runs the command.
pub fn run(args: &CheckArgs) -> Result<u8, CliError> {
    let path = args.file.as_path();
    if args.format.value.is_some() {
        resolve_format(path, Some(ImageFormat::Qcow2))?;
    } else if detect_format(path)? == ImageFormat::Raw {
        // qemu-img's exit status for a format without checks.
        eprintln!(
            "qcow2: {path}: this image format (raw) does not support checks",
            path = path.display()
        );
        return Ok(63);
    }
    let repair = match args.repair {
        None => RepairMode::None,
        Some(RepairArg::Leaks) => RepairMode::Leaks,
        Some(RepairArg::All) => RepairMode::All,
    };
    let options = if repair == RepairMode::None {
        OpenOptions::for_check()
    } else {
        OpenOptions::for_repair()
    };
    let options = options.force_share(args.share.force_share);
    let image = match Image::open(path, &crate::secrets::with_key(path, options.clone())) {
        Ok(image) => image,
        // A header that cannot be parsed: the check could not run, which
        // qemu-img reports as exit 1 ("check not completed"). A table
        // past the end of the file is damage QEMU opens and counts (below).
        Err(e)
            if matches!(&e, ImageError::Format(f)
                if !matches!(f, FormatError::PastEnd { .. } | FormatError::Truncated { .. })) =>
        {
            eprintln!(
                "qcow2: {path}: the image cannot be opened, so it was not checked: {e}",
                path = path.display()
            );
            return Ok(1);
        }
        // Metadata too damaged to open even for a check (a truncated
        // file, tables past its end): corruption, as qemu-img reports it.
        Err(e @ (ImageError::Format(_) | ImageError::Corrupt(_))) => {
            eprintln!(
                "qcow2: {path}: the image is corrupt and cannot be checked: {e}",
                path = path.display()
            );
            return Ok(2);
        }
        Err(e) => return Err(CliError::image(path)(e)),
    };
    let report = image.check(repair).map_err(CliError::image(path))?;
    image.close().map_err(CliError::image(path))?;
    // Findings go to stderr in every output format, even with -q, as
    // qemu-img's block driver prints them.
    for f in &report.findings {
        eprintln!("{}", f.message);
    }
    if report.refcounts_rebuilt {
        eprintln!("Rebuilding refcount structure");
    }
    if !args.quiet.quiet {
        match args.output.format {
            OutputFormat::Json => say!("{}", to_qemu_json(&report_json(path, &report))),
            OutputFormat::Human => print_human(&report, repair),
        }
    }
    Ok(if report.corruptions > 0 || report.dedup_errors > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else if report.check_errors > 0 {
        1
    } else {
        0
    })
}

/// qemu-img's check report: counters that are zero are left out, as
/// qemu-img leaves them out (`check-errors` is always there).
fn report_json(path: &Path, report: &CheckReport) -> Value {
    let mut v = Map::new();
    v.insert("filename".into(), json!(path));
    v.insert("format".into(), json!("qcow2"));
    v.insert("check-errors".into(), json!(report.check_errors));
    let optional = [
        ("image-end-offset", report.image_end_offset),
        ("corruptions", report.corruptions),
        ("leaks", report.leaks),
        ("corruptions-fixed", report.corruptions_fixed),
        ("leaks-fixed", report.leaks_fixed),
        ("total-clusters", report.total_clusters),
        ("allocated-clusters", report.allocated_clusters),
        ("fragmented-clusters", report.fragmented_clusters),
        ("compressed-clusters", report.compressed_clusters),
        ("dedup-errors", report.dedup_errors),
        ("dedup-fixed", report.dedup_fixed),
    ];
    for (key, value) in optional.into_iter().filter(|(_, n)| *n > 0) {
        v.insert(key.into(), json!(value));
    }
    Value::Object(v)
}

fn print_human(report: &CheckReport, repair: RepairMode) {
    if repair != RepairMode::None
        && (report.leaks_fixed > 0 || report.corruptions_fixed > 0 || report.dedup_fixed > 0)
    {
        say!("The following inconsistencies were found and repaired:\n");
        say!("    {} leaked clusters", report.leaks_fixed);
        if report.dedup_fixed > 0 {
            say!("    {} corruptions", report.corruptions_fixed);
            say!(
                "    {} dedup table errors (table rebuilt)\n",
                report.dedup_fixed
            );
        } else {
            say!("    {} corruptions\n", report.corruptions_fixed);
        }
        say!("Double checking the fixed image now...");
    }
    if report.is_clean() {
        say!("No errors were found on the image.");
    }
    let summaries = [
        (report.corruptions, "errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it."),
        (report.leaks, "leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data."),
        (report.dedup_errors, "dedup table errors were found.\nGuest data reads correctly, but new writes share clusters by this table: rebuild it with `qcow2 check -r all` before writing."),
        (report.check_errors, "internal errors have occurred during the check."),
    ];
    for (count, text) in summaries.into_iter().filter(|(n, _)| *n > 0) {
        say!("\n{count} {text}");
    }
    let total = report.total_clusters.max(1) as f64;
    let allocated = report.allocated_clusters as f64;
    say!(
        "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
        report.allocated_clusters,
        report.total_clusters,
        allocated / total * 100.0,
        if allocated > 0.0 {
            report.fragmented_clusters as f64 / allocated * 100.0
        } else {
            0.0
        },
        if allocated > 0.0 {
            report.compressed_clusters as f64 / allocated * 100.0
        } else {
            0.0
        },
    );
    say!("Image end offset: {}", report.image_end_offset);
}
