//! Embed a trained model in another program: load it once, then answer P(fractured) and the
//! decision for image bytes as they arrive, from any thread.
//!
//! ```text
//! cargo run --release -p fracture-examples --example embed -- MODEL IMAGE...
//! ```
//! Without arguments it trains a tiny model on generated images and classifies two of them.
#![allow(clippy::print_stdout)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::bail;
use fracture_train::TrainedModel;
use fracture_train::candle_core::Device;
use fracture_train::data::DecodeLimits;

/// What the host program keeps: the model (loaded once) and the decoding limits it accepts.
struct Classifier {
    model: TrainedModel,
    limits: DecodeLimits,
}

impl Classifier {
    fn load(path: &Path) -> anyhow::Result<Self> {
        Ok(Classifier {
            model: TrainedModel::load(path, &Device::Cpu)?,
            limits: DecodeLimits::default(),
        })
    }

    /// P(fractured) and the label at the model's operating point for one encoded image.
    fn classify(&self, bytes: &[u8], name: &str) -> anyhow::Result<(f64, &'static str)> {
        let p = self
            .model
            .predictor()
            .with_limits(self.limits)
            .bytes(bytes, Path::new(name))?;
        Ok((p.p_fractured, self.model.decide(p.p_fractured).name()))
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, images): (PathBuf, Vec<PathBuf>) = match args.as_slice() {
        [] => {
            let (run, data) = common::tiny_trained_run("fracture-example-embed")?;
            let pick = |class: &str| data.join("val").join(class).join("img_0000.png");
            (run, vec![pick("fractured"), pick("not fractured")])
        }
        [model, images @ ..] if !images.is_empty() => {
            (PathBuf::from(model), images.iter().map(PathBuf::from).collect())
        }
        _ => bail!("usage: embed [MODEL IMAGE...]"),
    };
    // Shared by threads: inference takes `&self`.
    let classifier = Arc::new(Classifier::load(&model)?);
    let handles: Vec<_> = images
        .into_iter()
        .map(|path| {
            let classifier = Arc::clone(&classifier);
            std::thread::spawn(move || -> anyhow::Result<String> {
                let bytes = std::fs::read(&path)?;
                let (p, label) = classifier.classify(&bytes, &path.display().to_string())?;
                Ok(format!("{}: P(fractured) = {p:.3} → {label}", path.display()))
            })
        })
        .collect();
    for handle in handles {
        match handle.join() {
            Ok(line) => println!("{}", line?),
            Err(_) => bail!("a classifying thread panicked"),
        }
    }
    Ok(())
}
