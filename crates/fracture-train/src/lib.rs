#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod batcher;
pub mod checkpoint;
mod ema;
mod error;
pub mod evaluate;
mod inputs;
pub mod loss;
pub mod optim;
pub mod recipe;
pub mod run;
mod selection;
mod session;
mod supervision;

pub use error::{Error, Result, RunFolderProblem};
pub use recipe::{Preset, Recipe};
pub use run::{Event, TrainOutcome, TrainSetup, train};

/// The model file, prediction and result files live in `fracture-infer`; under their old paths here
/// so that code written against this crate keeps compiling.
pub use fracture_infer::{
    EpochReport, RunLayout, TrainConfig, TrainedModel, archive, audit, bundle, calibrate, evidence, explain,
    localize, outputs, record as config, robustness,
};

pub use {
    candle_core, fracture_data as data, fracture_eval as eval, fracture_infer as infer,
    fracture_kernels as kernels, fracture_model as model, fracture_plot as plot,
};

// Shortcuts for the crate's own modules.
pub(crate) use batcher::batch_to_tensors;
pub(crate) use config::{AdamConfig, BestMetric, LrSchedule, PosWeight};
pub(crate) use evaluate::{mean_loss, predict_logits};
pub(crate) use fracture_infer::outputs::write_training_curves;
pub(crate) use fracture_infer::{Tta, predict_dataset, sigmoid, truth};
pub use fracture_infer::{image_to_tensor, images_to_tensor};
pub(crate) use loss::bce_with_logits;
pub(crate) use optim::Adam;
