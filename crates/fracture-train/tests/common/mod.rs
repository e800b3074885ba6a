//! Support shared by the integration tests of fracture-train.

use std::path::Path;

use candle_core::Device;
use fracture_train::data::DecodeLimits;
use fracture_train::model::ModelConfig;
use fracture_train::{TrainConfig, TrainSetup};

/// A short run of the seed CNN at `size` px on the CPU, batch 16, no extras.
pub(crate) fn setup(data: &Path, out: &Path, size: u32, epochs: usize) -> TrainSetup {
    TrainSetup {
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        model: ModelConfig::seed(size as usize),
        fit: Default::default(),
        train: TrainConfig {
            epochs,
            batch_size: 16,
            ..TrainConfig::default()
        },
        resume: false,
        cache_dir: None,
        limits: DecodeLimits::default(),
        device: Device::Cpu,
        stop_after_epochs: None,
        pretrained: None,
        extra_train: Vec::new(),
        boxes: None,
        allow_link_problems: false,
        exclude_leaks: false,
        kernels: Default::default(),
    }
}
