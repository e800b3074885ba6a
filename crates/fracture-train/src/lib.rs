//! Training and evaluation: the one crate that joins data, model and metrics.
//!
//! [`train`] runs the loop: batches from `fracture-data` (shuffled and augmented from the seed),
//! the network from `fracture-model`, a numerically stable binary cross-entropy, our own Adam
//! (whose state is saved), validation with `fracture-eval` every epoch, atomic checkpoints and exact
//! resumption. [`TrainedModel`] loads a trained model file for prediction. Progress goes to a
//! caller-supplied callback; this crate never prints.
//!
//! The root holds the entry points; the rest is grouped by concern: [`run`] (the loop, its events
//! and files), [`recipe`] and [`config`] (what a run is told), [`bundle`] (the model file),
//! [`outputs`] (predicting folders, evaluation reports), [`evaluate`] (predicting datasets, test-time
//! augmentation), [`explain`] (heatmaps), [`checkpoint`], [`optim`] and [`loss`].
//!
//! Train a small model on generated radiograph-like images, then load it and predict one image:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use fracture_train::{Preset, TrainSetup, TrainedModel, train};
//!
//! let root = std::env::temp_dir().join(format!("fracture-doc-{}", std::process::id()));
//! let _ = std::fs::remove_dir_all(&root);
//! // <root>/data/{train,val}/{fractured,not fractured}/*.png, 8 + 4 images per class.
//! fracture_testkit::write_synthetic_dataset(
//!     &root.join("data"),
//!     &fracture_testkit::SyntheticSpec::train_val((8, 8), (4, 4)),
//! );
//! let recipe = Preset::Original.recipe().with(&fracture_train::recipe::Overrides {
//!     image_size: Some(24),
//!     epochs: Some(1),
//!     batch_size: Some(8),
//!     ..Default::default()
//! });
//! let setup = TrainSetup::new(&recipe, root.join("data"), root.join("run"));
//! let outcome = train(&setup, &mut |_event| {})?;
//! assert_eq!(outcome.epochs_completed, 1);
//!
//! let model = TrainedModel::load(&outcome.best_model, &fracture_train::candle_core::Device::Cpu)?;
//! let image = std::fs::read(root.join("data/val/fractured/img_0000.png"))?;
//! let p = model.predict_bytes(&image, "img_0000.png".as_ref(), &Default::default())?;
//! println!("P(fractured) = {p:.3}: {}", model.decide(p).name());
//! # std::fs::remove_dir_all(&root)?;
//! # Ok(())
//! # }
//! ```
//!
//! It re-exports the crates it joins, so the command line depends on this crate alone.
#![warn(missing_docs)]

pub mod audit;
mod batcher;
pub mod bundle;
pub mod calibrate;
pub mod checkpoint;
pub mod config;
mod ema;
mod error;
pub mod evaluate;
pub mod evidence;
pub mod explain;
mod inputs;
pub mod localize;
pub mod loss;
pub mod optim;
pub mod outputs;
pub mod recipe;
pub mod robustness;
pub mod run;
mod selection;
mod session;
mod supervision;

pub use bundle::TrainedModel;
pub use config::TrainConfig;
pub use error::{Error, Result};
pub use recipe::{Preset, Recipe};
pub use run::{Event, TrainOutcome, TrainSetup, train};

pub use {
    candle_core, fracture_data as data, fracture_eval as eval, fracture_kernels as kernels,
    fracture_model as model, fracture_plot as plot,
};

// Shortcuts for the crate's own modules.
pub(crate) use batcher::batch_to_tensors;
pub(crate) use config::{AdamConfig, BestMetric, LrSchedule, PosWeight};
pub(crate) use evaluate::{Tta, mean_loss, predict_dataset, predict_images, predict_logits, sigmoid, truth};
pub(crate) use loss::bce_with_logits;
pub(crate) use optim::Adam;
pub(crate) use outputs::{TRAINING_CURVES_FILE, write_training_curves};
pub(crate) use run::EpochReport;
