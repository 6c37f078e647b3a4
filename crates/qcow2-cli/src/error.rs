use qcow2_io::ImageError;
use thiserror::Error;

/// Everything a command can fail with; printed as one line.
#[derive(Debug, Error)]
pub enum CliError {
    /// The command line is wrong.
    #[error("{0}")]
    Usage(String),
    /// The image library failed.
    #[error("{path}: {source}")]
    Image {
        /// The file concerned.
        path: String,
        /// What went wrong.
        #[source]
        source: ImageError,
    },
    /// A plain file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    /// Wraps a library error with the file it concerns.
    pub fn image(path: &str) -> impl FnOnce(ImageError) -> Self + '_ {
        move |source| Self::Image {
            path: path.to_string(),
            source,
        }
    }

    /// Wraps an I/O error with the file it concerns.
    pub fn io(path: &str) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_string(),
            source,
        }
    }
}
