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
mod secrets;
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
    if let Err(e) = secrets::install(&cli.secrets.objects, cli.secrets.image_opts) {
        eprintln!("qcow2: {e}");
        return ExitCode::from(failure_code);
    }
    let mut command = cli.command;
    if let Err(e) = resolve_image_arguments(&mut command) {
        eprintln!("qcow2: {e}");
        return ExitCode::from(failure_code);
    }
    match run(command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qcow2: {e}");
            ExitCode::from(failure_code)
        }
    }
}

/// With `--image-opts`, the image arguments (not new targets) are option
/// lists: each becomes the path it names, its passphrase remembered.
fn resolve_image_arguments(command: &mut Command) -> Result<(), CliError> {
    let image = match command {
        Command::Info(a) => &mut a.file,
        Command::Check(a) => &mut a.file,
        Command::Convert(a) => &mut a.source,
        Command::Map(a) => &mut a.file,
        Command::Compare(a) => {
            secrets::resolve_argument(&mut a.first)?;
            &mut a.second
        }
        Command::Serve(a) => &mut a.image,
        Command::Resize(a) => &mut a.file,
        Command::Snapshot(a) => &mut a.image,
        Command::Bitmap(a) => &mut a.file,
        Command::Rebase(a) => &mut a.file,
        Command::Commit(a) => &mut a.file,
        Command::Amend(a) => &mut a.file,
        Command::Dedup(a) => &mut a.image,
        Command::Bench(a) => &mut a.file,
        Command::Measure(a) => match &mut a.file {
            Some(file) => file,
            None => return Ok(()),
        },
        Command::Create(_) => return Ok(()),
    };
    secrets::resolve_argument(image)
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
