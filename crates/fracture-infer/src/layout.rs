//! The run folder: the one type that names every file training writes there.

use std::path::{Path, PathBuf};

pub use crate::bundle::MODEL_FILE;

/// File name of a run's training fingerprints (see `fracture_data::audit::fingerprints_to_bytes`).
pub const FINGERPRINTS_FILE: &str = "training-fingerprints.bin";
/// The training-curves chart of a run.
pub const TRAINING_CURVES_FILE: &str = "training_curves.png";
/// Where the last checkpoint of a run lives, relative to the run folder.
pub const CHECKPOINT_FILE: &str = "checkpoints/last.safetensors";
/// The per-epoch metrics table of a run.
pub const METRICS_FILE: &str = "metrics.csv";
/// The final evaluation of the best model.
pub const REPORT_FILE: &str = "report.json";

/// The files of a run folder: the one type that names every file training writes there (the names
/// themselves are the constants of this module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLayout {
    root: PathBuf,
}

impl RunLayout {
    /// The layout of the run folder `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunLayout { root: root.into() }
    }

    /// The run folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The best model ([`crate::bundle::MODEL_FILE`]).
    pub fn model(&self) -> PathBuf {
        self.root.join(crate::bundle::MODEL_FILE)
    }

    /// The last checkpoint ([`CHECKPOINT_FILE`]).
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join(CHECKPOINT_FILE)
    }

    /// The folder of the checkpoint.
    pub fn checkpoints_dir(&self) -> PathBuf {
        let checkpoint = self.checkpoint();
        checkpoint
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone())
    }

    /// The per-epoch metrics ([`METRICS_FILE`]).
    pub fn metrics(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// The best model's evaluation ([`REPORT_FILE`]).
    pub fn report(&self) -> PathBuf {
        self.root.join(REPORT_FILE)
    }

    /// The training images' fingerprints ([`FINGERPRINTS_FILE`]).
    pub fn fingerprints(&self) -> PathBuf {
        self.root.join(FINGERPRINTS_FILE)
    }

    /// The loss and metric curves ([`TRAINING_CURVES_FILE`]).
    pub fn training_curves(&self) -> PathBuf {
        self.root.join(TRAINING_CURVES_FILE)
    }
}
