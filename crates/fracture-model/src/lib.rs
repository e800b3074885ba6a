#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod device;
mod efficientnet;
mod error;
mod gradcam;
mod init;
mod layers;
mod net;
pub mod onnx;
pub mod pretrained;
mod weights;

pub use config::{
    ArchConfig, EfficientNetConfig, LOCALIZATION_STRIDES, ModelConfig, ResNetConfig, SeedConfig,
};
pub use device::{
    DeviceChoice, auto_precision, bf16_device_note, compiled_backends, describe_device, device,
};
pub use efficientnet::{LITE0_STAGES, STEM_CHANNELS};
pub use error::{Error, Result};
/// The CPU kernels the networks are built from (the `fracture-kernels` crate), under their old path
/// inside this crate.
pub(crate) use fracture_kernels as kernels;
pub use fracture_kernels::{Kernels, Precision};
pub use gradcam::{CamLayer, CamMethod, GradCam};
pub use init::seeded_var_builder;
pub use net::FractureNet;
pub use pretrained::{PretrainedOrigin, PretrainedWeights};
pub use weights::{
    CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION, MAX_IMAGE_BYTES, Model, TENSORS_SHA256_KEY, tensors_sha256,
};

pub use candle_core;
pub use candle_nn;
