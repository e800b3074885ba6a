//! The error type of downloads and extraction.

use std::path::PathBuf;

/// What can go wrong fetching a dataset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `owner/slug` is malformed.
    #[error("invalid dataset `{0}`: expected `owner/slug` (letters, digits, `-`, `_`, `.`)")]
    BadDataset(String),
    /// The server could not be reached at all (no network, DNS failure, refused connection).
    #[error(
        "cannot reach {url}: {reason}. Without network access, download the dataset elsewhere and \
         train on its folder"
    )]
    Unreachable {
        /// The URL that failed.
        url: String,
        /// What the client said.
        reason: String,
    },
    /// The dataset does not exist (HTTP 404).
    #[error("dataset `{dataset}` was not found at {url} (HTTP 404): check the owner/slug")]
    NotFound {
        /// `owner/slug`.
        dataset: String,
        /// The URL asked.
        url: String,
    },
    /// Access was refused anonymously and with every credential found.
    #[error(
        "access to `{dataset}` was refused (HTTP {status}). Credential sources tried: {tried}. Check the \
         credentials, and accept the dataset's terms on its Kaggle page if it asks you to"
    )]
    Forbidden {
        /// `owner/slug`.
        dataset: String,
        /// The last status.
        status: u16,
        /// The sources that were looked at, in order (never their values).
        tried: String,
    },
    /// An unexpected HTTP status.
    #[error("{url}: HTTP {status}")]
    Http {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// Retries did not get the whole file.
    #[error("download of {url} failed after {attempts} attempts: {reason}")]
    GaveUp {
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
    /// The downloaded file does not match the checksum the server sent.
    #[error("{}: {algorithm} checksum mismatch (server {expected}, file {actual}); the file was removed", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// `md5` or `crc32c`.
        algorithm: &'static str,
        /// What the server announced.
        expected: String,
        /// What the file has.
        actual: String,
    },
    /// The archive is unusable or unsafe; nothing was extracted.
    #[error("{}: {reason}", path.display())]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The destination exists but was not written by a download.
    #[error("{} exists and was not made by a download: it is replaced only when forced", path.display())]
    DestinationExists {
        /// The folder.
        path: PathBuf,
    },
    /// The destination holds FracAtlas split otherwise than asked (another seed or other shares); it
    /// is split again only when forced.
    #[error(
        "{} holds FracAtlas split with seed {seed}, val {val}, test {test}, not the split asked for: it is split again only when forced",
        path.display()
    )]
    SplitDiffers {
        /// The dataset folder.
        path: PathBuf,
        /// The seed of the split it holds.
        seed: u64,
        /// The val share it holds.
        val: f64,
        /// The test share it holds.
        test: f64,
    },
    /// The val and test shares asked for cannot split a dataset.
    #[error(
        "the val ({val}) and test ({test}) shares must each lie in [0, 1) and leave some images for train"
    )]
    BadSplit {
        /// The val share asked for.
        val: f64,
        /// The test share asked for.
        test: f64,
    },
    /// A downloaded release does not have the layout its reader expects.
    #[error("{}: {reason}", path.display())]
    Release {
        /// The file or folder that is not as expected.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A local file operation failed.
    #[error(transparent)]
    Io(#[from] fracture_fs::PathError),
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
