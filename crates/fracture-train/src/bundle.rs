//! A trained model as one file: weights, architecture, preprocessing and operating threshold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, ModuleT, Tensor};
use fracture_data::{DecodeLimits, PreprocessConfig};
use fracture_model::Model;

use crate::{Error, Result};

/// Metadata key of the preprocessing settings (JSON [`PreprocessConfig`]).
pub const PREPROCESS_KEY: &str = "fracture.preprocess";
/// Metadata key of the operating threshold on P(fractured) (a JSON number).
pub const THRESHOLD_KEY: &str = "fracture.threshold";
/// Metadata key of the rule that chose the threshold (JSON [`ThresholdRule`](fracture_eval::ThresholdRule)).
pub const THRESHOLD_RULE_KEY: &str = "fracture.threshold_rule";
/// Metadata key of the training settings (JSON [`TrainConfig`](crate::TrainConfig)).
pub const TRAIN_KEY: &str = "fracture.train";
/// Metadata key of the validation results of the saved epoch (JSON).
pub const VALIDATION_KEY: &str = "fracture.validation";

/// Metadata key of the validation report at the stored threshold (JSON [`EvalReport`](fracture_eval::EvalReport)).
pub const OPERATING_POINT_KEY: &str = "fracture.operating_point";

/// Metadata key of the pretrained weights a run started from (JSON
/// [`PretrainedOrigin`](fracture_model::PretrainedOrigin): file name, SHA-256, format).
pub const PRETRAINED_KEY: &str = "fracture.pretrained";

/// The file name of the best model inside a run folder.
pub const MODEL_FILE: &str = "model.safetensors";

/// A model ready to predict: network, preprocessing and threshold, from one weight file.
#[derive(Debug)]
pub struct TrainedModel {
    /// The network and its weights (its `metadata` holds everything the file stored).
    pub model: Model,
    /// The preprocessing the model was trained with.
    pub preprocess: PreprocessConfig,
    /// The operating threshold on P(fractured).
    pub threshold: f64,
    /// The file it was loaded from.
    pub path: PathBuf,
}

impl TrainedModel {
    /// Loads a model from a weight file, or from a run folder (its `model.safetensors`).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(MODEL_FILE)
        } else {
            path.to_path_buf()
        };
        let model = Model::load(&file, device)?;
        let bad = |reason: String| {
            Error::Model(fracture_model::Error::BadWeights {
                path: file.clone(),
                reason,
            })
        };
        let preprocess: PreprocessConfig = match model.metadata.get(PREPROCESS_KEY) {
            Some(json) => {
                serde_json::from_str(json).map_err(|e| bad(format!("unreadable `{PREPROCESS_KEY}`: {e}")))?
            }
            None => {
                return Err(bad(format!(
                    "no `{PREPROCESS_KEY}` metadata: not a trained model file"
                )));
            }
        };
        let threshold: f64 = match model.metadata.get(THRESHOLD_KEY) {
            Some(json) => {
                serde_json::from_str(json).map_err(|e| bad(format!("unreadable `{THRESHOLD_KEY}`: {e}")))?
            }
            None => fracture_eval::DEFAULT_THRESHOLD,
        };
        preprocess
            .validate()
            .map_err(|e| bad(format!("`{PREPROCESS_KEY}`: {e}")))?;
        if !(threshold.is_finite() && (0.0..=1.0).contains(&threshold)) {
            return Err(bad(format!(
                "`{THRESHOLD_KEY}` = {threshold} is not a probability in [0, 1]"
            )));
        }
        if preprocess.size as usize != model.config().image_size {
            return Err(bad(format!(
                "preprocessing size {} differs from the model's input size {}",
                preprocess.size,
                model.config().image_size
            )));
        }
        Ok(TrainedModel {
            model,
            preprocess,
            threshold,
            path: file,
        })
    }

    /// Writes the model atomically with its preprocessing, threshold and `extra` metadata.
    pub fn save(&self, path: &Path, extra: &BTreeMap<String, String>) -> Result<()> {
        let mut meta = extra.clone();
        meta.insert(PREPROCESS_KEY.into(), json(&self.preprocess)?);
        meta.insert(THRESHOLD_KEY.into(), json(&self.threshold)?);
        Ok(self.model.save(path, &meta)?)
    }

    /// P(fractured) of one encoded image (any supported format); `origin` names it in errors.
    pub fn predict_bytes(&self, bytes: &[u8], origin: &Path, limits: &DecodeLimits) -> Result<f64> {
        let input = self.preprocess.preprocess_bytes(bytes, origin, limits)?;
        let s = self.preprocess.size as usize;
        let data: Vec<f32> = input.iter().copied().collect();
        let device = self.device();
        let x = Tensor::from_vec(data, (1, 1, s, s), &device)?;
        let logit = self.model.net.forward_t(&x, false)?.to_vec1::<f32>()?;
        let logit = logit.first().copied().unwrap_or(f32::NAN);
        if logit.is_nan() {
            return Err(Error::NoPrediction {
                path: origin.to_path_buf(),
                value: f64::from(logit),
            });
        }
        Ok(crate::sigmoid(logit))
    }

    /// The test-time augmentation that matches the flips the model was trained with (see
    /// [`crate::Tta::for_training`]); the mirror when the file does not say.
    pub fn tta(&self) -> crate::Tta {
        let train: Option<crate::TrainConfig> = self
            .model
            .metadata
            .get(TRAIN_KEY)
            .and_then(|j| serde_json::from_str(j).ok());
        crate::Tta::for_training(train.as_ref().and_then(|t| t.augment.as_ref()))
    }

    /// The pretrained weights the model started from, when the file records them.
    pub fn pretrained(&self) -> Option<fracture_model::PretrainedOrigin> {
        self.model
            .metadata
            .get(PRETRAINED_KEY)
            .and_then(|j| serde_json::from_str(j).ok())
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.model
            .named_vars()
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu)
    }
}

pub(crate) fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::InvalidConfig(format!("cannot serialise settings: {e}")))
}
