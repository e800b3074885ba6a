//! Training and evaluation: the one crate that joins data, model and metrics.
//!
//! [`train`] runs the loop: batches from `fracture-data` (shuffled and augmented from the seed),
//! the network from `fracture-model`, the numerically stable [`bce_with_logits`], our own [`Adam`]
//! (whose state is saved), validation with `fracture-eval` every epoch, atomic checkpoints and exact
//! resumption. [`TrainedModel`] loads a trained model file for prediction. Progress goes to a
//! caller-supplied callback; this crate never prints.
//!
//! It re-exports the crates it joins, so the command line depends on this crate alone.
#![warn(missing_docs)]

mod batcher;
mod bundle;
mod checkpoint;
mod config;
mod ema;
mod error;
mod evaluate;
mod explain;
mod inputs;
mod loss;
mod optim;
mod outputs;
mod preset;
mod selection;
mod session;
mod trainer;

pub use batcher::batch_to_tensors;
pub use bundle::{
    MODEL_FILE, OPERATING_POINT_KEY, PREPROCESS_KEY, PRETRAINED_KEY, THRESHOLD_KEY, THRESHOLD_RULE_KEY,
    TRAIN_KEY, TrainedModel, VALIDATION_KEY,
};
pub use checkpoint::{Best, CheckpointMeta, DataCounts, read_checkpoint};
pub use config::{AdamConfig, BestMetric, LrSchedule, PosWeight, TrainConfig};
pub use error::{Error, Result};
pub use evaluate::{
    Tta, evaluate, mean_loss, predict_dataset, predict_images, predict_logits, report_for, sigmoid, truth,
};
pub use explain::Explanation;
pub use fracture_eval::EvalReport;
pub use loss::bce_with_logits;
pub use optim::Adam;
pub use outputs::{
    CHART_FILES, EvalSource, Evaluation, PREDICTIONS_CSV, Prediction, REPORT_JSON, TRAINING_CURVES_FILE,
    ThresholdChoice, csv_field, evaluate_items, predict_files, read_metrics_csv, write_evaluation,
    write_training_curves,
};
pub use preset::{ArchKind, IMAGENET_SCALING, Overrides, PRETRAINED_FILE, Preset, Recipe, ScheduleKind};
pub use trainer::{
    Artifact, CHECKPOINT_FILE, EpochReport, Event, METRICS_FILE, REPORT_FILE, RunReport, TrainOutcome,
    TrainSetup, metrics_csv, train,
};

pub use {
    candle_core, fracture_data as data, fracture_eval as eval, fracture_model as model, fracture_plot as plot,
};
