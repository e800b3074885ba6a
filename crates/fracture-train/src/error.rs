//! The error type of training and evaluation.

/// What can go wrong while training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or preprocessing the data failed.
    #[error(transparent)]
    Data(#[from] fracture_data::Error),
    /// Building or loading the model failed.
    #[error(transparent)]
    Model(#[from] fracture_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Computing metrics failed.
    #[error(transparent)]
    Eval(#[from] fracture_eval::Error),
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
