//! The error type of model construction and weight files.

use std::path::PathBuf;

/// What can go wrong building a model or reading and writing its weights.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A configuration value is out of range or inconsistent.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// A weight file could not be read or written.
    #[error(transparent)]
    Io(#[from] fracture_fs::PathError),
    /// A device was asked for whose backend this build does not include.
    #[error(
        "this binary was built without the `{backend}` feature: rebuild with `cargo build --release -p fracture-cli --features {backend}`"
    )]
    DeviceNotBuilt {
        /// `cuda` or `metal`.
        backend: &'static str,
    },
    /// The backend could not open the device.
    #[error("cannot open {device}: {reason}")]
    DeviceUnavailable {
        /// The device asked for, e.g. `cuda:1`.
        device: String,
        /// What the backend said.
        reason: String,
    },
    /// A weight file is not a usable fracture model.
    #[error("{}: {reason}", path.display())]
    BadWeights {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
