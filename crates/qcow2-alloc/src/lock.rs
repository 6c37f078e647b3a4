//! QEMU's image locking protocol, so QEMU, qemu-img, qemu-io, qemu-nbd and
//! this project see each other's opens.
//!
//! QEMU (`block/file-posix.c`) stands each block permission `i` (bit `i`
//! of [`Permissions`]) for two bytes of the image file, locked with
//! open-file-description (OFD) read locks, which stay as long as the file
//! is open and are released when it is closed, by any exit:
//! - byte `100 + i` while the opener *holds* permission `i`;
//! - byte `200 + i` while the opener *does not share* permission `i`.
//!
//! Opening checks the other side: a permission it wants must not be
//! unshared by anyone (byte `200 + i` free of others' locks), and a
//! permission it will not share must not be held by anyone (byte
//! `100 + i`). A writer holds consistent-read, write and resize and shares
//! neither write nor resize; a reader holds consistent-read and, unless it
//! forces sharing (`-U`), shares neither write nor resize either, so it
//! refuses to open an image being written, as qemu-img does.
//!
//! Where the file system has no OFD locks, QEMU's `locking=auto` goes on
//! without locks; so does this module.

use std::fs::File;
use std::io;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};

/// Block permissions, bit for bit QEMU's `BLK_PERM_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions(u8);

impl Permissions {
    /// `BLK_PERM_CONSISTENT_READ`.
    pub const CONSISTENT_READ: Self = Self(1 << 0);
    /// `BLK_PERM_WRITE`.
    pub const WRITE: Self = Self(1 << 1);
    /// `BLK_PERM_WRITE_UNCHANGED`.
    pub const WRITE_UNCHANGED: Self = Self(1 << 2);
    /// `BLK_PERM_RESIZE`.
    pub const RESIZE: Self = Self(1 << 3);
    /// None.
    pub const NONE: Self = Self(0);
    /// `BLK_PERM_ALL`.
    pub const ALL: Self = Self(0x0f);

    /// Both sets.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    fn has(self, bit: u8) -> bool {
        self.0 & (1 << bit) != 0
    }
}

/// How an image file is opened, in QEMU's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockAccess {
    /// Reading; with `force_share` (qemu-img's `-U`) others may write.
    Read {
        /// Share every permission, writing included.
        force_share: bool,
    },
    /// Reading and writing: nobody else may write or resize.
    Write,
}

impl LockAccess {
    /// The permissions held and the ones not shared.
    fn permissions(self) -> (Permissions, Permissions) {
        let unshared = Permissions::WRITE.union(Permissions::RESIZE);
        match self {
            Self::Read { force_share: true } => (Permissions::CONSISTENT_READ, Permissions::NONE),
            Self::Read { force_share: false } => (Permissions::CONSISTENT_READ, unshared),
            Self::Write => (
                Permissions::CONSISTENT_READ
                    .union(Permissions::WRITE)
                    .union(Permissions::RESIZE),
                unshared,
            ),
        }
    }
}

/// Why an image could not be locked.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds a permission this open would not share, or
    /// does not share one it needs. The message is QEMU's.
    #[error("Failed to get {}\"{permission}\" lock: is another process using the image?", if *.shared { "shared " } else { "" })]
    Conflict {
        /// The permission, as QEMU names it ("write", "resize", ...).
        permission: &'static str,
        /// The lock could not be *shared* (this open would refuse others
        /// the permission, and someone holds it).
        shared: bool,
    },
    /// The lock call itself failed.
    #[error("locking the image: {0}")]
    Io(#[from] io::Error),
}

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERMISSION_BITS: u8 = 4;

/// The lock byte of permission `bit` above `base`.
#[allow(clippy::arithmetic_side_effects)] // at most 200 + 3
fn byte(base: i64, bit: u8) -> i64 {
    base + i64::from(bit)
}

fn name(bit: u8) -> &'static str {
    match bit {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

fn flock(kind: libc::c_short, offset: i64) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: offset,
        l_len: 1,
        l_pid: 0,
    }
}

/// Errors that mean "this file system has no OFD locks".
fn unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::EINVAL | Errno::ENOSYS | Errno::ENOTSUP | Errno::ENOLCK
    )
}

/// Whether another open file description holds a lock on byte `offset`.
fn held_by_others(file: &File, offset: i64) -> Result<Option<bool>, LockError> {
    let mut probe = flock(libc::F_WRLCK as libc::c_short, offset);
    match fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)) {
        Ok(_) => Ok(Some(probe.l_type != libc::F_UNLCK as libc::c_short)),
        Err(e) if unsupported(e) => Ok(None),
        Err(e) => Err(io::Error::from(e).into()),
    }
}

fn lock_byte(file: &File, offset: i64) -> Result<bool, LockError> {
    match fcntl(
        file,
        FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK as libc::c_short, offset)),
    ) {
        Ok(_) => Ok(true),
        Err(e) if unsupported(e) => Ok(false),
        Err(e) => Err(io::Error::from(e).into()),
    }
}

/// Takes QEMU's locks for `access` on `file` and checks them against the
/// locks of every other open of the file. The locks last while `file` (its
/// open file description) stays open. On a conflict nothing stays locked
/// that was not before. Returns whether the file system supports the
/// locks (without them the open goes on unlocked, as QEMU's does).
pub fn lock_image(file: &File, access: LockAccess) -> Result<bool, LockError> {
    let (held, unshared) = access.permissions();
    let mut taken = Vec::new();
    let result = (|| {
        for bit in 0..PERMISSION_BITS {
            for (set, base) in [(held, PERM_BASE), (unshared, SHARED_BASE)] {
                if set.has(bit) {
                    if !lock_byte(file, byte(base, bit))? {
                        return Ok(false);
                    }
                    taken.push(byte(base, bit));
                }
            }
        }
        for bit in 0..PERMISSION_BITS {
            let checks = [(held, SHARED_BASE, false), (unshared, PERM_BASE, true)];
            for (set, base, shared) in checks {
                if set.has(bit) && held_by_others(file, byte(base, bit))? == Some(true) {
                    return Err(LockError::Conflict {
                        permission: name(bit),
                        shared,
                    });
                }
            }
        }
        Ok(true)
    })();
    if result.is_err() {
        // Only what this call took: the file held nothing before.
        for offset in taken {
            let _ = fcntl(
                file,
                FcntlArg::F_OFD_SETLK(&flock(libc::F_UNLCK as libc::c_short, offset)),
            );
        }
    }
    result
}

/// Releases every lock byte of QEMU's protocol that `file` holds (the
/// image is closed, though the file stays open).
pub fn unlock_image(file: &File) {
    for base in [PERM_BASE, SHARED_BASE] {
        for bit in 0..PERMISSION_BITS {
            let offset = byte(base, bit);
            let _ = fcntl(
                file,
                FcntlArg::F_OFD_SETLK(&flock(libc::F_UNLCK as libc::c_short, offset)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn writers_exclude_writers_and_plain_readers_but_not_forced_readers() {
        let dir = std::env::temp_dir().join(format!("qcow2-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let writer = open(&path);
        if !lock_image(&writer, LockAccess::Write).unwrap() {
            eprintln!("*** SKIPPED: no OFD locks on {} ***", dir.display());
            return;
        }
        let second = open(&path);
        let err = lock_image(&second, LockAccess::Write).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Failed to get \"write\" lock: is another process using the image?"
        );
        let reader = open(&path);
        let err = lock_image(&reader, LockAccess::Read { force_share: false }).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("Failed to get shared \"write\" lock"));
        let forced = open(&path);
        assert!(lock_image(&forced, LockAccess::Read { force_share: true }).unwrap());
        drop(writer);
        // The writer is gone: the plain reader gets in, and then keeps
        // writers out, while another plain reader shares with it.
        assert!(lock_image(&reader, LockAccess::Read { force_share: false }).unwrap());
        let another = open(&path);
        assert!(lock_image(&another, LockAccess::Read { force_share: false }).unwrap());
        assert!(lock_image(&second, LockAccess::Write).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
