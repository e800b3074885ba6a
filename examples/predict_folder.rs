//! Predict every image of a folder with a trained model and write a CSV table.
//!
//! ```text
//! cargo run --release -p fracture-examples --example predict_folder -- MODEL FOLDER [OUT.csv]
//! ```
//! `MODEL` is a run folder or its `model.safetensors`. Without arguments it trains a tiny model on
//! generated images first and predicts their validation folder, so the example runs anywhere.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::path::PathBuf;

use anyhow::bail;
use fracture_train::TrainedModel;
use fracture_train::candle_core::Device;
use fracture_train::data::discover_labelled_images;
use fracture_train::infer::Prediction;
use fracture_train::outputs::{CsvColumns, predictions_csv};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, folder, out) = match args.as_slice() {
        [] => {
            let (run, data) = common::tiny_trained_run("fracture-example-predict")?;
            (run, data.join("val"), None)
        }
        [model, folder] => (PathBuf::from(model), PathBuf::from(folder), None),
        [model, folder, out] => (
            PathBuf::from(model),
            PathBuf::from(folder),
            Some(PathBuf::from(out)),
        ),
        _ => bail!("usage: predict_folder [MODEL FOLDER [OUT.csv]]"),
    };
    let model = TrainedModel::load(&model, &Device::Cpu)?;
    // Every image below the folder (class folders or not); unreadable ones are reported, not fatal.
    let (items, _) = discover_labelled_images(&folder)?;
    let files: Vec<PathBuf> = items.into_iter().map(|i| i.path).collect();
    // With evidence: each row also says where in the image the evidence lies (peak and box).
    let (predictions, unreadable) = model
        .predictor()
        .with_evidence(Some(model.model.net.default_cam_layer()))
        .files(&files, 32)?;
    for skipped in &unreadable {
        eprintln!("unreadable: {}: {}", skipped.path.display(), skipped.reason);
    }
    let rows: Vec<_> = predictions.iter().map(Prediction::row).collect();
    let columns = CsvColumns {
        truth: false,
        evidence: true,
        shard: None,
    };
    let table = predictions_csv(&rows, columns)?;
    match out {
        Some(path) => std::fs::write(&path, &table)?,
        None => print!("{table}"),
    }
    eprintln!(
        "{} predicted at threshold {:.3}, {} unreadable",
        predictions.len(),
        model.threshold(),
        unreadable.len()
    );
    Ok(())
}
