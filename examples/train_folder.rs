//! Train a classifier on a dataset folder with a preset recipe, printing progress.
//!
//! ```text
//! cargo run --release -p fracture-examples --example train_folder -- DATA OUT [original|radiograph|finetune] [EPOCHS]
//! ```
//! `DATA` holds `<split>/<class>/<image>` (`train`, ideally `val`; classes `fractured` and
//! `not fractured`). Without arguments it trains one epoch at 32 px on a small generated dataset in
//! the system's temporary folder, so the example runs anywhere.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::{Context, bail};
use fracture_train::recipe::Overrides;
use fracture_train::{Event, Preset, TrainSetup, train};

#[global_allocator]
static ALLOCATOR: fracture_alloc::MiMalloc = fracture_alloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    fracture_alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (data, out, preset, overrides) = match args.as_slice() {
        [] => {
            let root = std::env::temp_dir().join("fracture-example-train");
            let _ = std::fs::remove_dir_all(&root);
            fracture_testkit::write_synthetic_dataset(
                &root.join("data"),
                &fracture_testkit::SyntheticSpec::train_val((16, 16), (6, 6)),
            );
            let small = Overrides {
                image_size: Some(32),
                epochs: Some(1),
                batch_size: Some(8),
                ..Overrides::default()
            };
            (root.join("data"), root.join("run"), Preset::Original, small)
        }
        [data, out, rest @ ..] => {
            let preset = match rest.first().map(String::as_str) {
                None | Some("original") => Preset::Original,
                Some("radiograph") => Preset::Radiograph,
                Some("finetune") => Preset::Finetune,
                Some(other) => bail!("unknown preset `{other}`"),
            };
            let epochs = rest
                .get(1)
                .map(|e| e.parse().context("EPOCHS must be a whole number"))
                .transpose()?;
            let overrides = Overrides {
                epochs,
                ..Overrides::default()
            };
            (PathBuf::from(data), PathBuf::from(out), preset, overrides)
        }
        _ => bail!("usage: train_folder [DATA OUT [PRESET [EPOCHS]]]"),
    };
    let recipe = preset.recipe().with(&overrides);
    let mut setup = TrainSetup::new(&recipe, &data, &out);
    // The finetune preset starts from ImageNet weights in data/pretrained/ (see `cargo xtask
    // pretrained`); an error names the path when they are missing.
    setup.pretrained = recipe.pretrained_weights(std::path::Path::new("data"))?;
    let outcome = train(&setup, &mut |event| match event {
        Event::Notice(text) => println!("note: {text}"),
        Event::EpochEnd(r) => println!(
            "epoch {}: train loss {:.4}, val loss {:.4}, val ROC-AUC {}",
            r.epoch,
            r.train_loss,
            r.val_loss,
            r.val.roc_auc.map_or("undefined".into(), |a| format!("{a:.3}"))
        ),
        _ => {}
    })?;
    let val = &outcome.reports[&fracture_train::data::Split::Val];
    println!(
        "best epoch {} → {}; val sensitivity {:?}, specificity {:?} at threshold {:.3}",
        outcome.best_epoch,
        outcome.best_model.display(),
        val.sensitivity,
        val.specificity,
        val.threshold
    );
    Ok(())
}
