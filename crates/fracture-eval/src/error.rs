//! The error type of the metrics.

/// What can go wrong computing metrics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Predictions and labels have different lengths.
    #[error("{predictions} predictions but {labels} labels")]
    LengthMismatch {
        /// Number of predictions (or scores).
        predictions: usize,
        /// Number of labels.
        labels: usize,
    },
    /// A score or threshold is NaN or outside its range.
    #[error("invalid {what}: {value}")]
    InvalidValue {
        /// Which input, e.g. `threshold` or `score 12`.
        what: String,
        /// The offending value.
        value: f64,
    },
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
