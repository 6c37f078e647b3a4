//! A server on a Unix socket for the tests that use NBD clients: `qcow2
//! serve`, or qemu-nbd beside it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{bin, ok, p};

/// A running `qcow2 serve` on a Unix socket.
pub struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    /// `qcow2 serve -k SOCKET EXTRA... IMAGE`.
    pub fn start(image: &Path, socket: &Path, extra: &[&str]) -> Self {
        let mut args = vec!["serve", "-k", p(socket)];
        args.extend_from_slice(extra);
        args.push(p(image));
        Self::spawn(bin(), &args, socket)
    }

    /// `qemu-nbd -f qcow2 -k SOCKET EXTRA... IMAGE`.
    pub fn qemu_nbd(image: &Path, socket: &Path, extra: &[&str]) -> Self {
        let mut args = vec!["-f", "qcow2", "-k", p(socket)];
        args.extend_from_slice(extra);
        args.push(p(image));
        Self::spawn("qemu-nbd", &args, socket)
    }

    /// `program ARGS`, serving on `socket` once it exists.
    pub fn spawn(program: &str, args: &[&str], socket: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(program)
            .args(args)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the server starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            socket: socket.to_path_buf(),
        }
    }

    /// Its NBD URI.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", p(&self.socket))
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        ok("kill", &["-TERM", &self.child.id().to_string()]);
        self.wait()
    }

    /// Waits for it to end.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) {
        ok("kill", &["-KILL", &self.child.id().to_string()]);
        self.wait();
    }
}

impl Drop for Server {
    /// A failed test leaves no server behind.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
