//! Accepting clients and the server's life: connections up to the shared
//! limit, each on its own thread with its own pool of workers; a stop
//! request (or, without `persistent`, the last client leaving) ends
//! accepting, lets every connection finish the requests it has read, and
//! flushes the image.

use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::export::Export;
use crate::negotiate::{negotiate, Outcome};
use crate::transmission;
use crate::wire::Stream;

/// How often a waiting accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// Where clients connect.
#[derive(Debug)]
pub enum Listener {
    /// TCP (`-b ADDR -p PORT`).
    Tcp(TcpListener),
    /// A Unix domain socket (`-k PATH`).
    Unix(UnixListener),
}

impl Listener {
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
    }

    /// A waiting client, if any (non-blocking).
    fn accept(&self) -> io::Result<Option<Stream>> {
        let accepted = match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        };
        match accepted {
            Ok(stream) => {
                match &stream {
                    Stream::Tcp(s) => s.set_nonblocking(false)?,
                    Stream::Unix(s) => s.set_nonblocking(false)?,
                }
                stream.set_nodelay()?;
                Ok(Some(stream))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// How the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// Clients served at once (`-e`); more wait to be accepted.
    pub shared: usize,
    /// Keep serving after the last client leaves (`-t`).
    pub persistent: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            shared: 1,
            persistent: false,
        }
    }
}

/// What a finished server did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeReport {
    /// Connections accepted.
    pub connections: u64,
}

/// Serves `export` to clients of `listener` until `stop` is set (or, when
/// not persistent, the last client has gone). Every connection finishes
/// the requests it has read; then the image is flushed.
pub fn serve(
    listener: &Listener,
    export: &Export,
    options: ServerOptions,
    stop: &AtomicBool,
) -> io::Result<ServeReport> {
    listener.set_nonblocking()?;
    let active = AtomicUsize::new(0);
    let open: Mutex<Vec<(u64, Stream)>> = Mutex::new(Vec::new());
    let mut report = ServeReport::default();
    let result = std::thread::scope(|scope| -> io::Result<()> {
        loop {
            if stop.load(Ordering::Acquire) {
                break;
            }
            let idle = active.load(Ordering::Acquire) == 0;
            if !options.persistent && report.connections > 0 && idle {
                break;
            }
            if active.load(Ordering::Acquire) >= options.shared.max(1) {
                std::thread::sleep(POLL);
                continue;
            }
            let Some(stream) = listener.accept()? else {
                std::thread::sleep(POLL);
                continue;
            };
            report.connections += 1;
            let id = report.connections;
            if let Ok(handle) = stream.try_clone() {
                open.lock().push((id, handle));
            }
            active.fetch_add(1, Ordering::AcqRel);
            let (active, open) = (&active, &open);
            scope.spawn(move || {
                let _ = connection(stream, export, options.shared > 1);
                open.lock().retain(|(i, _)| *i != id);
                active.fetch_sub(1, Ordering::AcqRel);
            });
        }
        // Stop reading from every client; each finishes what it has read.
        for (_, stream) in open.lock().iter() {
            let _ = stream.shutdown(Shutdown::Read);
        }
        Ok(())
    });
    result?;
    export
        .image()
        .flush()
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok(report)
}

/// One client, from the greeting to the disconnect.
fn connection(mut stream: Stream, export: &Export, multi_conn: bool) -> io::Result<()> {
    match negotiate(&mut stream, export, multi_conn)? {
        Outcome::Closed => Ok(()),
        Outcome::Transmission(session) => transmission::serve(stream, export, &session),
    }
}

/// A flag set by [`Arc<AtomicBool>`] holders to stop a running server.
pub type StopFlag = Arc<AtomicBool>;
