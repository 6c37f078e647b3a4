//! `qcow2`: create, inspect, check, convert, map and compare qcow2 images,
//! with qemu-img's syntax where it applies.
#![forbid(unsafe_code)]

mod args;
mod commands;
mod copy;
mod disk;
mod error;
mod image_options;
mod output;
mod progress;
mod qemu_json;
mod size;
mod snapshot_list;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use args::{Cli, Command};
use error::CliError;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_failure(&e),
    };
    // qemu-img compare reserves 1 for "images differ" and check 2 and 3
    // for what it found: a failure to run is 2 and 1 respectively.
    let failure_code = match cli.command {
        Command::Compare(_) => 2,
        _ => 1,
    };
    match run(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qcow2: {e}");
            ExitCode::from(failure_code)
        }
    }
}

fn run(command: Command) -> Result<u8, CliError> {
    match command {
        Command::Create(a) => commands::create::run(&a),
        Command::Info(a) => commands::info::run(&a),
        Command::Check(a) => commands::check::run(&a),
        Command::Convert(a) => commands::convert::run(&a),
        Command::Dedup(a) => commands::dedup::run(&a),
        Command::Map(a) => commands::map::run(&a),
        Command::Compare(a) => commands::compare::run(&a),
        Command::Bench(a) => commands::bench::run(&a),
        Command::Serve(a) => commands::serve::run(&a),
        Command::Resize(a) => commands::resize::run(&a),
        Command::Snapshot(a) => commands::snapshot::run(&a),
        Command::Bitmap(a) => commands::bitmap::run(&a),
        Command::Amend(a) => commands::amend::run(&a),
        Command::Rebase(a) => commands::rebase::run(&a),
        Command::Commit(a) => commands::commit::run(&a),
        Command::Measure(a) => commands::measure::run(&a),
    }
}

/// Help and version go to stdout with status 0; a wrong command line is
/// one line on stderr and status 1, as every other error.
fn parse_failure(e: &clap::Error) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(1);
    }
    eprintln!("qcow2: {}", one_line(&e.render().to_string()));
    ExitCode::from(1)
}

/// clap's message without its usage block, on one line.
fn one_line(rendered: &str) -> String {
    let text: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
        .collect();
    let joined = text.join(" ");
    let message = joined.strip_prefix("error: ").unwrap_or(&joined);
    format!("{message} (try `qcow2 --help`)")
}
