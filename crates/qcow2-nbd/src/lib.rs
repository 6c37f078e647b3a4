//! An NBD server for qcow2 images: QEMU, the Linux kernel and every NBD
//! client read and write a [`qcow2_io::Image`] (deduplicated or not) live.
//!
//! The protocol is written from the NBD protocol document (fixed newstyle
//! negotiation; `NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`, `EXPORT_NAME`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` with
//! `base:allocation`, `qemu:allocation-depth` and
//! `qemu:dirty-bitmap:NAME` (several per request, as the protocol allows); commands `READ`, `WRITE` with `FUA`, `FLUSH`,
//! `TRIM`, `WRITE_ZEROES` with `NO_HOLE` and `FAST_ZERO`, `BLOCK_STATUS`,
//! `CACHE`, `DISC`). The `nbd` crate (0.3) was judged first: it serves
//! simple replies one request at a time and offers neither structured
//! replies nor metadata contexts (block status), so this crate writes the
//! protocol itself, in one module per phase:
//!
//! - `proto`: constants; `wire`: fields and streams;
//! - `negotiate`: the handshake, which settles a `session`;
//! - `contexts`: the metadata contexts offered and their extents;
//! - `transmission`: requests served concurrently, replies out of order;
//! - `server`: accepting clients, the shared limit, stopping cleanly.
//!
//! Only the export, its options and the server loop are public.
//!
//! It depends on `qcow2-io`'s public API only.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use std::sync::Arc;
//! use qcow2_io::{Image, OpenOptions};
//! use qcow2_nbd::{serve, Export, ExportOptions, Listener, ServerOptions};
//!
//! let image = Arc::new(Image::open("disk.qcow2", &OpenOptions::read_write())?);
//! let export = Export::new(image.clone(), ExportOptions::default());
//! let listener = Listener::Unix(std::os::unix::net::UnixListener::bind("/tmp/nbd.sock")?);
//! let stop = AtomicBool::new(false);
//! serve(&listener, &export, ServerOptions::default(), &stop)?;
//! image.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod buffers;
mod contexts;
mod export;
mod negotiate;
// The protocol's tables are kept whole, as the NBD document lists them,
// though this server does not send every value.
#[allow(dead_code)]
mod proto;
mod server;
mod session;
mod transmission;
mod wire;

pub use export::{DetectZeroes, DiscardMode, Export, ExportOptions};
pub use server::{serve, Listener, ServeReport, ServerOptions, StopFlag};
