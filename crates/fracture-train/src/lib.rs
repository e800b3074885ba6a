#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod archive;
pub mod audit;
mod batcher;
pub mod bundle;
pub mod calibrate;
pub mod checkpoint;
pub mod config;
mod ema;
mod error;
pub mod evaluate;
pub mod evidence;
pub mod explain;
mod inputs;
pub mod localize;
pub mod loss;
pub mod optim;
pub mod outputs;
pub mod recipe;
pub mod robustness;
pub mod run;
mod selection;
mod session;
mod supervision;

pub use bundle::TrainedModel;
pub use config::TrainConfig;
pub use error::{Error, Result, RunFolderProblem};
pub use recipe::{Preset, Recipe};
pub use run::{Event, RunLayout, TrainOutcome, TrainSetup, train};

pub use {
    candle_core, fracture_data as data, fracture_eval as eval, fracture_kernels as kernels,
    fracture_model as model, fracture_plot as plot,
};

// Shortcuts for the crate's own modules.
pub(crate) use batcher::batch_to_tensors;
pub use batcher::{image_to_tensor, images_to_tensor};
pub(crate) use config::{AdamConfig, BestMetric, LrSchedule, PosWeight};
pub(crate) use evaluate::{Tta, mean_loss, predict_dataset, predict_images, predict_logits, sigmoid, truth};
pub(crate) use loss::bce_with_logits;
pub(crate) use optim::Adam;
pub(crate) use outputs::{TRAINING_CURVES_FILE, write_training_curves};
pub(crate) use run::EpochReport;
