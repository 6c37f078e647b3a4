//! `qcow2 info [--output human|json] FILE`

use std::os::unix::fs::MetadataExt;

use qcow2_io::{Image, OpenOptions};
use serde_json::json;

use crate::args::Args;
use crate::disk::detect_format;
use crate::error::CliError;
use crate::output::say;
use crate::size::human;

/// Runs the command.
pub fn run(argv: &[String]) -> Result<u8, CliError> {
    let args = Args::parse(argv, &["--output", "-f"], &[])?;
    let json = args.json_output()?;
    let [path] = args.expect_positional(&["FILE"])?[..] else {
        unreachable!("expect_positional checked the count")
    };
    let meta = std::fs::metadata(path).map_err(CliError::io(path))?;
    let actual = meta.blocks() * 512;
    let format = args.value("-f").map_or_else(
        || detect_format(path),
        |f| Ok(if f == "qcow2" { "qcow2" } else { "raw" }),
    )?;
    if format == "raw" {
        if json {
            let v = json!({"filename": path, "format": "raw", "virtual-size": meta.len(), "actual-size": actual, "dirty-flag": false});
            say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            say!(
                "image: {path}\nfile format: raw\nvirtual size: {} ({} bytes)\ndisk size: {}",
                human(meta.len()),
                meta.len(),
                human(actual)
            );
        }
        return Ok(0);
    }
    let image = Image::open(path, &OpenOptions::read_only()).map_err(CliError::image(path))?;
    let info = image.info().map_err(CliError::image(path))?;
    let stats = image.dedup_stats().map_err(CliError::image(path))?;
    let snapshots = image.snapshots().map_err(CliError::image(path))?;
    let compat = if info.version == 2 { "0.10" } else { "1.1" };
    if json {
        let mut data = json!({
            "compat": compat,
            "lazy-refcounts": info.lazy_refcounts,
            "refcount-bits": info.refcount_bits,
            "corrupt": info.corrupt,
            "extended-l2": info.extended_l2,
            "dedup": info.dedup,
        });
        if info.version >= 3 {
            data["compression-type"] = json!(info.compression_type);
        }
        if let Some(s) = &stats {
            data["dedup-stats"] = json!({
                "unique-clusters": s.unique_clusters,
                "references": s.references,
                "bytes-saved": s.bytes_saved,
                "index-memory": s.index_memory,
                "crc-failures": s.crc_failures,
            });
        }
        let mut v = json!({
            "filename": path,
            "format": "qcow2",
            "virtual-size": info.virtual_size,
            "actual-size": actual,
            "cluster-size": info.cluster_size,
            "dirty-flag": info.dirty,
            "format-specific": {"type": "qcow2", "data": data},
        });
        if let Some(b) = &info.backing_file {
            v["backing-filename"] = json!(b);
        }
        if !snapshots.is_empty() {
            v["snapshots"] = snapshots
                .iter()
                .map(|s| {
                    json!({
                        "id": s.id,
                        "name": s.name,
                        "vm-state-size": s.vm_state_size,
                        "date-sec": s.date_sec,
                        "date-nsec": s.date_nsec,
                        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    })
                })
                .collect();
        }
        say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        say!("image: {path}");
        say!("file format: qcow2");
        say!(
            "virtual size: {} ({} bytes)",
            human(info.virtual_size),
            info.virtual_size
        );
        say!("disk size: {}", human(actual));
        say!("cluster_size: {}", info.cluster_size);
        if let Some(b) = &info.backing_file {
            say!("backing file: {b}");
        }
        if !snapshots.is_empty() {
            say!("Snapshot list:");
            say!("{:<10}{:<18}{:>10} DATE", "ID", "TAG", "VM SIZE");
            for s in &snapshots {
                say!(
                    "{:<10}{:<18}{:>10} {}",
                    s.id,
                    s.name,
                    human(s.vm_state_size),
                    utc_date(u64::from(s.date_sec))
                );
            }
        }
        say!("Format specific information:");
        say!("    compat: {compat}");
        if info.version >= 3 {
            say!("    compression type: {}", info.compression_type);
        }
        say!("    lazy refcounts: {}", info.lazy_refcounts);
        say!("    refcount bits: {}", info.refcount_bits);
        say!("    corrupt: {}", info.corrupt);
        say!("    extended l2: {}", info.extended_l2);
        say!("    dedup: {}", info.dedup);
        if let Some(s) = &stats {
            say!("    dedup unique clusters: {}", s.unique_clusters);
            say!("    dedup references: {}", s.references);
            say!(
                "    dedup space saved: {} ({} bytes)",
                human(s.bytes_saved),
                s.bytes_saved
            );
            say!("    dedup index memory: {}", human(s.index_memory));
            if s.crc_failures > 0 {
                say!(
                    "    dedup damaged clusters: {} (run `qcow2 check -r all`)",
                    s.crc_failures
                );
            }
        }
        if info.dirty {
            say!("    dirty: true (not closed cleanly; refcounts are repaired on the next read-write open)");
        }
    }
    if info.corrupt {
        eprintln!("qcow2: warning: {path} is marked corrupt; it opens read-only until repaired with `qcow2 check -r all`");
    }
    Ok(0)
}

/// `YYYY-MM-DD hh:mm:ss` (UTC) for seconds since the epoch.
fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc_date;

    #[test]
    fn formats_dates_in_utc() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_date(1_795_651_199), "2026-11-25 23:59:59");
    }
}
