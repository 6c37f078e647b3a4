//! `qcow2`: create, inspect, check, convert, map and compare qcow2 images,
//! with qemu-img's syntax where it applies.
#![forbid(unsafe_code)]

mod args;
mod commands;
mod disk;
mod error;
mod output;
mod progress;
mod size;

use std::process::ExitCode;

use error::CliError;
use output::say;

const USAGE: &str = "\
qcow2: qcow2 images with inline deduplication

usage: qcow2 COMMAND [OPTIONS]

commands:
  create [-f qcow2] [-o OPTIONS] FILE SIZE
        OPTIONS: cluster_size=N,refcount_bits=N,compat=0.10|1.1,lazy_refcounts=on|off,dedup=on|off
  info [--output human|json] FILE
  check [--output human|json] [-r leaks|all] FILE
  convert [-f FMT] [-O raw|qcow2] [-o OPTIONS] [-p] SRC DST
  dedup [-p] [-o OUT] IMAGE      deduplicate IMAGE in place, or into a new image OUT
  map [--output human|json] FILE
  compare [-f FMT] [-F FMT] [-p] A B

sizes take the suffixes k, M, G, T, P, E (powers of 1024)";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(code) => ExitCode::from(code),
        Err(CliError::Help) => {
            say!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qcow2: {e}");
            // qemu-img compare reserves 1 for "images differ".
            let compare = argv.first().is_some_and(|c| c == "compare");
            ExitCode::from(if compare { 2 } else { e.exit_code() })
        }
    }
}

fn run(argv: &[String]) -> Result<u8, CliError> {
    let Some((command, rest)) = argv.split_first() else {
        return Err(CliError::Usage(
            "no command given (try `qcow2 --help`)".into(),
        ));
    };
    match command.as_str() {
        "create" => commands::create::run(rest),
        "info" => commands::info::run(rest),
        "check" => commands::check::run(rest),
        "convert" => commands::convert::run(rest),
        "dedup" => commands::dedup::run(rest),
        "map" => commands::map::run(rest),
        "compare" => commands::compare::run(rest),
        "-h" | "--help" | "help" => Err(CliError::Help),
        "-V" | "--version" => {
            say!("qcow2 {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        other => Err(CliError::Usage(format!(
            "unknown command {other:?} (try `qcow2 --help`)"
        ))),
    }
}
