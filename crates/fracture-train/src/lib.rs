//! Training and evaluation: the one crate that joins data, model and metrics.
//!
//! Today it holds the bridge from `ndarray` batches to tensors ([`batch_to_tensors`]) and the
//! numerically stable loss ([`bce_with_logits`]). It re-exports the crates it joins, so the command
//! line depends on this crate alone.
#![warn(missing_docs)]

mod batcher;
mod error;
mod loss;

pub use batcher::batch_to_tensors;
pub use error::{Error, Result};
pub use loss::bce_with_logits;

pub use {candle_core, fracture_data as data, fracture_eval as eval, fracture_model as model};
