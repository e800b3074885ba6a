#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod archive;
pub mod audit;
pub mod bundle;
pub mod calibrate;
mod csvio;
mod error;
pub mod evidence;
pub mod explain;
pub mod layout;
pub mod localize;
pub mod outputs;
pub mod predict;
pub mod predictor;
pub mod record;
pub mod robustness;

pub use bundle::{ModelMeta, TrainedModel};
pub use error::{Error, Result};
pub use layout::RunLayout;
pub use predict::{Tta, image_to_tensor, images_to_tensor, predict_dataset, predict_images, sigmoid, truth};
pub use predictor::{PASS_IMAGES, Prediction, Predictor};
pub use record::{EpochReport, TrainConfig};

pub use {
    candle_core, fracture_data as data, fracture_eval as eval, fracture_kernels as kernels,
    fracture_model as model, fracture_plot as plot,
};
