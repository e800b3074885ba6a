//! The error type of training and evaluation.

use std::path::PathBuf;

/// What can go wrong while training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or preprocessing the data failed.
    #[error(transparent)]
    Data(#[from] fracture_data::Error),
    /// Building or loading the model failed.
    #[error(transparent)]
    Model(#[from] fracture_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Computing metrics failed.
    #[error(transparent)]
    Eval(#[from] fracture_eval::Error),
    /// Reading, writing or running a model file failed.
    #[error(transparent)]
    Infer(#[from] fracture_infer::Error),
    /// A setting is out of range or settings contradict each other.
    #[error("invalid setting: {0}")]
    InvalidConfig(String),
    /// A value could not be written as JSON (a non-finite number where JSON has none, for one).
    #[error("cannot write {what} as JSON: {source}")]
    Serialize {
        /// What was being written.
        what: &'static str,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// Drawing a chart or heatmap failed.
    #[error(transparent)]
    Plot(#[from] fracture_plot::Error),
    /// A file or folder of the run could not be read or written.
    #[error(transparent)]
    Io(#[from] fracture_fs::PathError),
    /// The run folder does not fit what was asked (a new run, or resuming one).
    #[error("{}: {problem}", path.display())]
    RunFolder {
        /// The run folder, or its checkpoint.
        path: PathBuf,
        /// What does not fit.
        problem: RunFolderProblem,
    },
    /// The dataset's symbolic links leave its root or put one image in two classes or splits, and
    /// [`crate::TrainSetup::allow_link_problems`] is off.
    #[error(
        "{}: {count} symbolic link(s) change what this dataset means (they could relabel images or \
         leak validation images into training):\n{listed}",
        root.display()
    )]
    LinkProblems {
        /// The dataset root.
        root: PathBuf,
        /// How many links are a problem.
        count: usize,
        /// The first few, one per line.
        listed: String,
    },
    /// The recipe starts from ImageNet-pretrained EfficientNet-Lite0 weights that are not where it
    /// looks ([`crate::Recipe::pretrained_weights`]).
    #[error(
        "the recipe starts from ImageNet-pretrained EfficientNet-Lite0 weights, expected at {}",
        path.display()
    )]
    MissingPretrained {
        /// Where they were looked for.
        path: PathBuf,
    },
    /// Boxes were given ([`crate::TrainSetup::boxes`]) for a network without a localization head
    /// (only EfficientNet-Lite0 has one).
    #[error("a box file trains a localization head, which only the EfficientNet-Lite0 network has")]
    BoxesWithoutHead,
    /// The network has a localization head but no box file trains it.
    #[error("the network has a localization head but no box file trains it")]
    HeadWithoutBoxes,
    /// A checkpoint cannot be used.
    #[error("{}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// The loss became NaN or infinite; the last checkpoint written before it is kept.
    #[error(
        "the training loss became {value} at epoch {epoch}, step {step}; the last good checkpoint is kept"
    )]
    NonFiniteLoss {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step within the epoch.
        step: usize,
        /// The loss value.
        value: f64,
    },
    /// The model's validation outputs became NaN or infinite; the last checkpoint written before it is kept.
    #[error(
        "the model's outputs became {value} at the validation of epoch {epoch}; the last good checkpoint is kept"
    )]
    NonFiniteOutput {
        /// 1-based epoch.
        epoch: usize,
        /// The first non-finite logit.
        value: f64,
    },
    /// A loaded model gave no number for an image (its weights overflow on it).
    #[error("{}: the model's output is {value} for this image (its weights overflow): not a usable model", path.display())]
    NoPrediction {
        /// The image (or upload name).
        path: PathBuf,
        /// The logit it gave.
        value: f64,
    },
    /// A parameter became NaN or infinite; the last checkpoint written before it is kept.

    #[error("parameter `{param}` became non-finite during epoch {epoch}; the last good checkpoint is kept")]
    NonFiniteWeights {
        /// 1-based epoch.
        epoch: usize,
        /// The parameter's name.
        param: String,
    },
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a run folder fails to fit a request ([`Error::RunFolder`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunFolderProblem {
    /// The path exists and is not a folder.
    #[error("exists and is not a folder")]
    NotAFolder,
    /// Resuming was asked for, but the folder holds no checkpoint.
    #[error("nothing to resume: no checkpoint here")]
    NothingToResume,
    /// A new run was asked for, but the folder already holds one.
    #[error("this folder already holds a run")]
    HoldsARun,
    /// Resuming with settings or data that differ from the run's.
    #[error("cannot resume: {0}")]
    SettingsDiffer(String),
    /// Resuming with fewer epochs than the run has already trained.
    #[error(
        "cannot resume: the run has already trained {trained} epochs, more than the {requested} asked for"
    )]
    FewerEpochs {
        /// Epochs the run has trained.
        trained: usize,
        /// Epochs asked for now.
        requested: usize,
    },
}
