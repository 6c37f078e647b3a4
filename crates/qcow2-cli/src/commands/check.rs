//! `qcow2 check [--output human|json] [-r leaks|all] FILE`
//!
//! Exit status as qemu-img: 0 clean, 2 corruptions, 3 leaks only, 1 when
//! the check could not run.

use qcow2_io::{CheckReport, Image, OpenOptions, RepairMode};
use serde_json::json;

use crate::args::Args;
use crate::error::CliError;
use crate::output::say;

/// Runs the command.
pub fn run(argv: &[String]) -> Result<u8, CliError> {
    let args = Args::parse(argv, &["--output", "-r", "-f"], &["-q"])?;
    let json = args.json_output()?;
    let [path] = args.expect_positional(&["FILE"])?[..] else {
        unreachable!("expect_positional checked the count")
    };
    let repair = match args.value("-r") {
        None => RepairMode::None,
        Some("leaks") => RepairMode::Leaks,
        Some("all") => RepairMode::All,
        Some(other) => {
            return Err(CliError::Usage(format!(
                "-r must be leaks or all, not {other:?}"
            )))
        }
    };
    let options = if repair == RepairMode::None {
        OpenOptions::read_only()
    } else {
        OpenOptions::for_repair()
    };
    let image = Image::open(path, &options).map_err(CliError::image(path))?;
    let report = image.check(repair).map_err(CliError::image(path))?;
    image.close().map_err(CliError::image(path))?;
    if json {
        let v = json!({
            "filename": path,
            "format": "qcow2",
            "check-errors": report.check_errors,
            "corruptions": report.corruptions,
            "leaks": report.leaks,
            "corruptions-fixed": report.corruptions_fixed,
            "leaks-fixed": report.leaks_fixed,
            "dedup-errors": report.dedup_errors,
            "dedup-fixed": report.dedup_fixed,
            "image-end-offset": report.image_end_offset,
            "total-clusters": report.total_clusters,
            "allocated-clusters": report.allocated_clusters,
            "fragmented-clusters": report.fragmented_clusters,
            "compressed-clusters": report.compressed_clusters,
        });
        say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print_human(&report, repair);
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

fn print_human(report: &CheckReport, repair: RepairMode) {
    for f in &report.findings {
        eprintln!("{}", f.message);
    }
    if repair != RepairMode::None
        && (report.leaks_fixed > 0 || report.corruptions_fixed > 0 || report.dedup_fixed > 0)
    {
        say!("The following inconsistencies were found and repaired:\n");
        say!("    {} leaked clusters", report.leaks_fixed);
        say!("    {} corruptions", report.corruptions_fixed);
        say!(
            "    {} dedup table errors (table rebuilt)\n",
            report.dedup_fixed
        );
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
