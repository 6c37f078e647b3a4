//! Writing to stdout without panicking when the reader goes away
//! (`qcow2 map img | head`).

use std::io::Write;

/// Writes one line to stdout. A closed pipe ends the process quietly, as
/// it would end any command-line tool; other errors are reported once.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}") {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let _ = writeln!(std::io::stderr(), "qcow2: writing to stdout: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
}

/// `println!` that does not panic on a closed pipe.
macro_rules! say {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
pub(crate) use say;
