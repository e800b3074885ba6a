//! Mutated model files through `TrainedModel::load` (and a prediction when one loads): an error
//! naming the file, never a panic. `cargo xtask fuzz --seconds N` runs the same property for longer.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::Device;
use fracture_testkit::{SyntheticSpec, fresh_dir, fuzz_bytes, write_synthetic_dataset};
use fracture_train::{TrainedModel, train};

mod common;

#[test]
fn loading_mutated_model_files_never_panics() {
    let root = fresh_dir(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")), "model-fuzz");
    write_synthetic_dataset(&root.join("data"), &SyntheticSpec::train_val((4, 4), (3, 3)));
    let setup = common::setup(&root.join("data"), &root.join("run"), 16, 1);
    let outcome = train(&setup, &mut |_| {}).unwrap();
    let seeds = vec![std::fs::read(&outcome.best_model).unwrap()];
    let image = std::fs::read(root.join("data/val/fractured/img_0000.png")).unwrap();
    let file = root.join("case.safetensors");
    let cases = fuzz_bytes("model-file", 20261201, &seeds, |bytes| {
        std::fs::write(&file, bytes).unwrap();
        match TrainedModel::load(&file, &Device::Cpu) {
            Ok(model) => {
                // A probability, or an error naming the image (weights that overflow on it).
                match model.predictor().bytes(&image, std::path::Path::new("x.png")) {
                    Ok(p) => assert!((0.0..=1.0).contains(&p.p_fractured), "{p:?}"),
                    Err(e) => assert!(e.to_string().contains("x.png"), "{e}"),
                }
            }
            Err(e) => assert!(e.to_string().contains("case.safetensors"), "{e}"),
        }
    });
    assert!(cases > 0);
}
