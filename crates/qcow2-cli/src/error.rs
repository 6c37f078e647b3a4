use std::path::{Path, PathBuf};

use qcow2_io::ImageError;
use thiserror::Error;

/// Everything a command can fail with; printed as one line.
#[derive(Debug, Error)]
pub enum CliError {
    /// The command line is wrong.
    #[error("{0}")]
    Usage(String),
    /// The image library failed.
    #[error("{}: {source}", path.display())]
    Image {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: ImageError,
    },
    /// A plain file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    /// Wraps a library error with the file it concerns.
    pub fn image<P: AsRef<Path> + ?Sized>(path: &P) -> impl FnOnce(ImageError) -> Self + '_ {
        move |source| Self::Image {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// Wraps an I/O error with the file it concerns.
    pub fn io<P: AsRef<Path> + ?Sized>(path: &P) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}
