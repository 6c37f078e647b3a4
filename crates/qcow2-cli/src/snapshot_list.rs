//! The snapshot table as qemu-img prints it, for `info` and `snapshot -l`.

use qcow2_format::snapshot::Snapshot;

use crate::output::say;
use crate::size::human;

/// The icount QEMU keeps in a snapshot's extra data (bytes 16..24), if any.
pub(crate) fn icount(s: &Snapshot) -> Option<u64> {
    let bytes: [u8; 8] = s.extra.get(16..24)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes)).filter(|&v| v != u64::MAX)
}

/// The snapshot table as qemu-img prints it (`info`, `snapshot -l`).
pub(crate) fn print_snapshot_table(snapshots: &[Snapshot]) {
    say!("Snapshot list:");
    say!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID",
        "TAG",
        "VM_SIZE",
        "DATE",
        "VM_CLOCK",
        "ICOUNT"
    );
    for s in snapshots {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            s.vm_clock_nsec / 1_000_000 % 1000
        );
        say!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            s.id,
            s.name,
            human(s.vm_state_size),
            utc_date(u64::from(s.date_sec)),
            clock,
            icount(s).map_or_else(|| "--".to_string(), |n| n.to_string())
        );
    }
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
