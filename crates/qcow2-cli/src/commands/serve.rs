//! `qcow2 serve`: the image as an NBD export, with qemu-nbd's options.
//!
//! SIGINT and SIGTERM stop accepting clients, let connected clients finish
//! the requests already read, flush, and close the image cleanly (dirty bit
//! cleared); the socket and pid files are removed. Without `-t` the server
//! ends when its last client disconnects, as qemu-nbd does.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use qcow2_io::{Image, OpenOptions, Recovery};
use qcow2_nbd::{DetectZeroes, DiscardMode, Export, ExportOptions, Listener, ServerOptions};

use crate::args::{DetectZeroesArg, DiscardArg, ImageFormat, ServeArgs};
use crate::disk::resolve_format;
use crate::error::CliError;

/// Runs the command.
pub fn run(args: &ServeArgs) -> Result<u8, CliError> {
    let path = args.image.as_path();
    if args.format.is_some() {
        resolve_format(path, Some(ImageFormat::Qcow2))?;
    }
    let options = (if args.read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    })
    .punch_holes(!args.no_hole_punching);
    let image = Arc::new(
        Image::open(path, &crate::secrets::with_key(path, options.clone()))
            .map_err(CliError::image(path))?,
    );
    if let Some(r) = image.recovery() {
        say_recovered(path, r);
    }
    let export = Export::new(image.clone(), export_options(args));
    export.check_bitmaps().map_err(CliError::image(path))?;
    let listener = listen(args)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(CliError::io("installing a signal handler"))?;
    }
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, format!("{}\n", std::process::id()))
            .map_err(CliError::io(pid_file))?;
    }
    let served = qcow2_nbd::serve(
        &listener,
        &export,
        ServerOptions {
            shared: usize::from(args.shared),
            persistent: args.persistent,
        },
        &stop,
    );
    drop(export);
    let closed = image.close();
    if let Some(socket) = &args.socket {
        let _ = std::fs::remove_file(socket);
    }
    if let Some(pid_file) = &args.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    served.map_err(CliError::io(path))?;
    closed.map_err(CliError::image(path))?;
    Ok(0)
}

/// The one line a server prints when it opened an image that was not
/// closed cleanly.
fn say_recovered(path: &Path, r: &Recovery) {
    eprintln!(
        "qcow2: {} was not closed cleanly: refcounts {} ({} leaked clusters freed, \
         {} corruptions fixed), {} dedup entries dropped; flushed data is intact",
        path.display(),
        if r.refcounts_rebuilt {
            "rebuilt"
        } else {
            "checked"
        },
        r.leaks_fixed,
        r.corruptions_fixed,
        r.dedup_entries_dropped,
    );
}

/// The export as the command line describes it.
fn export_options(args: &ServeArgs) -> ExportOptions {
    ExportOptions {
        name: args.export_name.clone(),
        description: args.description.clone(),
        read_only: args.read_only,
        discard: match args.discard {
            DiscardArg::Ignore => DiscardMode::Ignore,
            DiscardArg::Unmap => DiscardMode::Unmap,
        },
        detect_zeroes: match args.detect_zeroes {
            DetectZeroesArg::Off => DetectZeroes::Off,
            DetectZeroesArg::On => DetectZeroes::On,
            DetectZeroesArg::Unmap => DetectZeroes::Unmap,
        },
        bitmaps: args.bitmaps.clone(),
        allocation_depth: args.allocation_depth,
    }
}

/// The socket the command line asks for: a Unix socket (`-k`), or TCP.
fn listen(args: &ServeArgs) -> Result<Listener, CliError> {
    Ok(match &args.socket {
        Some(socket) => Listener::Unix(UnixListener::bind(socket).map_err(CliError::io(socket))?),
        None => {
            let address = format!("{}:{}", args.bind, args.port);
            let bound = if args.bind.contains(':') {
                TcpListener::bind((args.bind.as_str(), args.port))
            } else {
                TcpListener::bind(&address)
            };
            Listener::Tcp(bound.map_err(CliError::io(&address))?)
        }
    })
}
