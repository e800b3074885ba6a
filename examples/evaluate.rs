//! Evaluate a trained model on a labelled folder: sensitivity, specificity and ROC-AUC with their
//! 95% bootstrap intervals at the model's stored operating point.
//!
//! ```text
//! cargo run --release -p fracture-examples --example evaluate -- MODEL FOLDER
//! ```
//! `FOLDER` holds class folders (`fractured`, `not fractured`), e.g. `../shared/data/fracatlas/val`.
//! Without arguments it trains a tiny model on generated images and evaluates their validation split.
#![allow(clippy::print_stdout)]

mod common;

use std::path::PathBuf;

use anyhow::bail;
use fracture_train::TrainedModel;
use fracture_train::candle_core::Device;
use fracture_train::data::{LoadOptions, discover_labelled_images};
use fracture_train::eval::Interval;
use fracture_train::outputs::{ThresholdChoice, evaluate_items};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, folder) = match args.as_slice() {
        [] => {
            let (run, data) = common::tiny_trained_run("fracture-example-evaluate")?;
            (run, data.join("val"))
        }
        [model, folder] => (PathBuf::from(model), PathBuf::from(folder)),
        _ => bail!("usage: evaluate [MODEL FOLDER]"),
    };
    let model = TrainedModel::load(&model, &Device::Cpu)?;
    let (items, _) = discover_labelled_images(&folder)?;
    let eval = evaluate_items(
        &model,
        &items,
        ThresholdChoice::Stored,
        false,
        32,
        &LoadOptions::default(),
    )?;
    let r = &eval.report;
    let show = |name: &str, value: Option<f64>, ci: Option<Interval>| {
        let value = value.map_or("undefined".to_string(), |v| format!("{v:.3}"));
        let ci = ci.map_or(String::new(), |i| {
            format!(" (95% CI {:.3}-{:.3})", i.lower, i.upper)
        });
        println!("{name:<12} {value}{ci}");
    };
    println!(
        "{} images, {} fractured, threshold {:.3}",
        r.n, r.positives, r.threshold
    );
    show("sensitivity", r.sensitivity, r.ci95.sensitivity);
    show("specificity", r.specificity, r.ci95.specificity);
    show("ROC-AUC", r.roc_auc, r.ci95.roc_auc);
    println!("{} unreadable file(s) skipped", eval.skipped.len());
    Ok(())
}
