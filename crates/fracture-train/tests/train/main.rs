//! The training loop end to end: outputs, exact resumption, bad input.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fracture_testkit::{SyntheticSpec, fresh_dir, write_synthetic_dataset};
use fracture_train::checkpoint::read_checkpoint;
use fracture_train::config::LrSchedule;
use fracture_train::data::{AugmentConfig, Split};
use fracture_train::model::ModelConfig;
use fracture_train::{Error, Event, Preset, TrainConfig, TrainOutcome, TrainSetup, train};
use sha2::Digest;

#[path = "../common/mod.rs"]
mod common;
pub(crate) use common::setup;

pub(crate) fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fracture-train-tests")
}

pub(crate) fn synthetic(name: &str, train: (usize, usize), val: (usize, usize)) -> PathBuf {
    let root = fresh_dir(&base(), name);
    write_synthetic_dataset(&root.join("data"), &SyntheticSpec::train_val(train, val));
    root
}

/// [`setup`] with the radiograph preset's network, preprocessing and training settings at `size`.
pub(crate) fn radiograph_setup(data: &Path, out: &Path, size: u32, epochs: usize) -> TrainSetup {
    let recipe = Preset::Radiograph.recipe();
    TrainSetup {
        model: ModelConfig::resnet(size as usize),
        fit: recipe.fit,
        train: TrainConfig {
            epochs,
            ..recipe.train
        },
        ..setup(data, out, size, epochs)
    }
}

pub(crate) fn run(s: &TrainSetup) -> Result<TrainOutcome, Error> {
    train(s, &mut |_| {})
}

pub(crate) fn checkpoint_tensors(out: &Path) -> HashMap<String, Tensor> {
    read_checkpoint(&out.join(fracture_train::run::CHECKPOINT_FILE), &Device::Cpu)
        .unwrap()
        .1
}

/// Largest absolute difference between two checkpoints' tensors (weights and Adam moments).
pub(crate) fn max_difference(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (name, ta) in a {
        let tb = &b[name];
        let d = (ta - tb)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d);
    }
    worst
}

mod refusals_and_data;
mod runs_and_resume;
