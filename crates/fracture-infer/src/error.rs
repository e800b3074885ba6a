//! The error type of model files and prediction.

use std::path::PathBuf;

/// What can go wrong reading, writing or running a trained model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or preprocessing an image failed.
    #[error(transparent)]
    Data(#[from] fracture_data::Error),
    /// Building or loading the network failed.
    #[error(transparent)]
    Model(#[from] fracture_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Computing metrics failed.
    #[error(transparent)]
    Eval(#[from] fracture_eval::Error),
    /// Drawing a heatmap failed.
    #[error(transparent)]
    Plot(#[from] fracture_plot::Error),
    /// A setting or a recorded value is out of range, or values contradict each other.
    #[error("invalid setting: {0}")]
    InvalidConfig(String),
    /// A value could not be written as JSON (a non-finite number where JSON has none, for one).
    #[error("cannot write {what} as JSON: {source}")]
    Serialize {
        /// What was being written.
        what: &'static str,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] fracture_fs::PathError),
    /// A loaded model gave no number for an image (its weights overflow on it).
    #[error("{}: the model's output is {value} for this image (its weights overflow): not a usable model", path.display())]
    NoPrediction {
        /// The image (or upload name).
        path: PathBuf,
        /// The output it gave.
        value: f64,
    },
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
