//! The fracture classifiers on candle: architectures, configuration, devices and weight files.
//!
//! [`FractureNet`] takes `(B, 1, S, S)` f32 images and returns `(B,)` fracture logits
//! (`sigmoid` = P(fractured)); it implements candle's `ModuleT`, so dropout sees the training flag.
//! [`Model`] pairs a network with its variables and reads and writes self-describing weight files.
//!
//! This crate does no I/O except weight files and knows nothing of image formats, datasets or
//! training: it depends on no other fracture crate.
//!
//! Build a network, run it, and round-trip its weight file:
//!
//! ```
//! use candle_core::{Device, ModuleT, Tensor};
//! use fracture_model::{Model, ModelConfig};
//!
//! let config = ModelConfig::seed(32); // the original CNN at 32 × 32
//! let model = Model::new(&config, 7, &Device::Cpu)?;
//! let x = Tensor::zeros((2, 1, 32, 32), candle_core::DType::F32, &Device::Cpu)?; // (B, 1, H, W)
//! let logits = model.net.forward_t(&x, false)?; // (B,)
//! assert_eq!(logits.dims(), &[2]);
//! let file = std::env::temp_dir().join(format!("fracture-model-doc-{}.safetensors", std::process::id()));
//! model.save(&file, &Default::default())?;
//! let again = Model::load(&file, &Device::Cpu)?;
//! assert_eq!(again.config(), &config);
//! # std::fs::remove_file(&file).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod config;
mod device;
mod efficientnet;
mod error;
mod gradcam;
mod init;
mod layers;
mod net;
pub mod pretrained;
mod weights;

pub use config::{ArchConfig, EfficientNetConfig, ModelConfig, ResNetConfig, SeedConfig};
pub use device::{compiled_backends, describe_device, device};
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
