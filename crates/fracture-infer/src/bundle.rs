//! A trained model as one file: weights, architecture, preprocessing and operating threshold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use fracture_data::{Label, PreprocessConfig};
use fracture_eval::{EvalReport, ThresholdRule};
use fracture_model::Model;
use serde::{Deserialize, Serialize};

use crate::{EpochReport, Error, Result, TrainConfig};

/// Metadata key of the preprocessing settings (JSON [`PreprocessConfig`]).
pub const PREPROCESS_KEY: &str = "fracture.preprocess";
/// Metadata key of the operating threshold on P(fractured) (a JSON number).
pub const THRESHOLD_KEY: &str = "fracture.threshold";
/// Metadata key of the rule that chose the threshold (JSON [`ThresholdRule`]).
pub const THRESHOLD_RULE_KEY: &str = "fracture.threshold_rule";
/// Metadata key of the training settings (JSON [`TrainConfig`]).
pub const TRAIN_KEY: &str = "fracture.train";
/// Metadata key of the validation results of the saved epoch (JSON).
pub const VALIDATION_KEY: &str = "fracture.validation";

/// Metadata key of the validation report at the stored threshold (JSON [`EvalReport`]).
pub const OPERATING_POINT_KEY: &str = "fracture.operating_point";

/// Metadata key of the pretrained weights a run started from (JSON
/// [`PretrainedOrigin`](fracture_model::PretrainedOrigin): file name, SHA-256, format).
pub const PRETRAINED_KEY: &str = "fracture.pretrained";

/// Metadata key of the folders a run trained on (JSON [`TrainingData`]).
pub const TRAINING_DATA_KEY: &str = "fracture.training_data";

/// Metadata key of the calibration map and its validation figures (JSON
/// [`Calibration`](crate::calibrate::Calibration)).
pub const CALIBRATION_KEY: &str = "fracture.calibration";

/// Metadata key of the threshold's bootstrap interval and margin (JSON
/// [`StableThreshold`](fracture_eval::StableThreshold)).
pub const THRESHOLD_STABILITY_KEY: &str = "fracture.threshold_stability";

/// Metadata key of the SHA-256 (hex, JSON string) of the model's training fingerprints file (see
/// [`crate::audit::training_fingerprints`]): what ties a fingerprints file to its model.
pub const TRAINING_FINGERPRINTS_KEY: &str = "fracture.training_fingerprints_sha256";

/// The folders a model was trained on: the dataset (its train split, and its val split for the
/// checkpoint and threshold) and the extra training folders (their train splits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingData {
    /// The dataset root, as given.
    pub data: String,
    /// Extra training roots, as given (`--extra-train`).
    pub extra_train: Vec<String>,
    /// The box file whose boxes trained the localization head (`--boxes`), as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<String>,
}

/// The file name of the best model inside a run folder.
pub const MODEL_FILE: &str = "model.safetensors";

/// Everything a trained model file records beside the weights and the network configuration, as
/// one typed value. This module is the only writer ([`ModelMeta::to_metadata`]) and reader
/// ([`ModelMeta::from_metadata`]) of the file's metadata keys, and the reader applies the same
/// rules as training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// The preprocessing the model was trained with (its size equals the network's input size).
    pub preprocess: PreprocessConfig,
    /// The operating threshold on P(fractured) as the model reports it (calibrated when
    /// [`ModelMeta::calibration`] is set), in [0, 1]: fractured when `p >= threshold`.
    pub threshold: f64,
    /// The rule that chose the threshold on the validation images.
    pub threshold_rule: Option<ThresholdRule>,
    /// The training settings of the run.
    pub train: Option<TrainConfig>,
    /// The saved epoch's validation report (losses, metrics at 0.5, timing).
    pub validation: Option<EpochReport>,
    /// The validation report at the stored threshold (sensitivity, specificity and their intervals).
    pub operating_point: Option<EvalReport>,
    /// The pretrained weights the run started from.
    pub pretrained: Option<fracture_model::PretrainedOrigin>,
    /// The folders the run trained on.
    pub training_data: Option<TrainingData>,
    /// The calibration applied to every probability the model reports (see
    /// [`TrainedModel::probability`]); `None` for an uncalibrated model.
    pub calibration: Option<crate::calibrate::Calibration>,
    /// How steady the threshold is: its bootstrap interval on the validation images.
    pub threshold_stability: Option<fracture_eval::StableThreshold>,
    /// SHA-256 (lower-case hex) of the bytes of this model's training fingerprints file; `None`
    /// for a model written before fingerprints were tied to their model.
    #[serde(default)]
    pub training_fingerprints: Option<String>,
}

impl ModelMeta {
    /// Metadata for a model trained without a recorded run: its preprocessing and threshold only.
    pub fn new(preprocess: PreprocessConfig, threshold: f64) -> Self {
        ModelMeta {
            preprocess,
            threshold,
            threshold_rule: None,
            train: None,
            validation: None,
            operating_point: None,
            pretrained: None,
            training_data: None,
            calibration: None,
            threshold_stability: None,
            training_fingerprints: None,
        }
    }

    /// Checks what training checks: the preprocessing, the threshold in [0, 1], the training settings.
    /// Returns the reason when a field is out of range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.preprocess
            .validate()
            .map_err(|e| format!("`{PREPROCESS_KEY}`: {e}"))?;
        if !(self.threshold.is_finite() && (0.0..=1.0).contains(&self.threshold)) {
            return Err(format!(
                "`{THRESHOLD_KEY}` = {} is not a probability in [0, 1]",
                self.threshold
            ));
        }
        if let Some(train) = &self.train {
            train.validate().map_err(|e| format!("`{TRAIN_KEY}`: {e}"))?;
        }
        if let Some(c) = &self.calibration {
            let fracture_eval::Platt { a, b } = c.platt;
            if !(a.is_finite() && a > 0.0 && b.is_finite()) {
                return Err(format!(
                    "`{CALIBRATION_KEY}`: a = {a}, b = {b}: the slope must be finite and positive, the offset finite"
                ));
            }
        }
        Ok(())
    }

    /// The file's metadata entries (key → JSON text), after [`ModelMeta::validate`].
    pub fn to_metadata(&self) -> Result<BTreeMap<String, String>> {
        self.validate().map_err(Error::InvalidConfig)?;
        let mut out = BTreeMap::new();
        out.insert(PREPROCESS_KEY.to_string(), json(&self.preprocess)?);
        out.insert(THRESHOLD_KEY.to_string(), json(&self.threshold)?);
        let mut optional = |key: &str, value: Option<String>| {
            if let Some(v) = value {
                out.insert(key.to_string(), v);
            }
        };
        optional(
            THRESHOLD_RULE_KEY,
            self.threshold_rule.as_ref().map(json).transpose()?,
        );
        optional(TRAIN_KEY, self.train.as_ref().map(json).transpose()?);
        optional(VALIDATION_KEY, self.validation.as_ref().map(json).transpose()?);
        optional(
            OPERATING_POINT_KEY,
            self.operating_point.as_ref().map(json).transpose()?,
        );
        optional(PRETRAINED_KEY, self.pretrained.as_ref().map(json).transpose()?);
        optional(
            TRAINING_DATA_KEY,
            self.training_data.as_ref().map(json).transpose()?,
        );
        optional(CALIBRATION_KEY, self.calibration.as_ref().map(json).transpose()?);
        optional(
            THRESHOLD_STABILITY_KEY,
            self.threshold_stability.as_ref().map(json).transpose()?,
        );
        optional(
            TRAINING_FINGERPRINTS_KEY,
            self.training_fingerprints.as_ref().map(json).transpose()?,
        );
        Ok(out)
    }

    /// Reads and validates the metadata of a model file. Preprocessing and threshold are required;
    /// the other entries are optional, but one that is present must parse. Returns the reason,
    /// naming the key, when it cannot.
    pub fn from_metadata(metadata: &BTreeMap<String, String>) -> std::result::Result<Self, String> {
        fn read<T: serde::de::DeserializeOwned>(
            metadata: &BTreeMap<String, String>,
            key: &str,
        ) -> std::result::Result<Option<T>, String> {
            metadata
                .get(key)
                .map(|text| serde_json::from_str(text).map_err(|e| format!("unreadable `{key}`: {e}")))
                .transpose()
        }
        let required = |key: &str| format!("no `{key}` metadata: not a trained model file");
        let meta = ModelMeta {
            preprocess: read(metadata, PREPROCESS_KEY)?.ok_or_else(|| required(PREPROCESS_KEY))?,
            threshold: read(metadata, THRESHOLD_KEY)?.ok_or_else(|| required(THRESHOLD_KEY))?,
            threshold_rule: read(metadata, THRESHOLD_RULE_KEY)?,
            train: read(metadata, TRAIN_KEY)?,
            validation: read(metadata, VALIDATION_KEY)?,
            operating_point: read(metadata, OPERATING_POINT_KEY)?,
            pretrained: read(metadata, PRETRAINED_KEY)?,
            training_data: read(metadata, TRAINING_DATA_KEY)?,
            calibration: read(metadata, CALIBRATION_KEY)?,
            threshold_stability: read(metadata, THRESHOLD_STABILITY_KEY)?,
            training_fingerprints: read(metadata, TRAINING_FINGERPRINTS_KEY)?,
        };
        meta.validate()?;
        Ok(meta)
    }
}

/// A model ready to predict: network, preprocessing and threshold, from one weight file.
#[derive(Debug)]
pub struct TrainedModel {
    /// The network and its weights.
    pub model: Model,
    /// What the file records beside the weights: preprocessing, threshold, the run's settings and
    /// validation.
    pub meta: ModelMeta,
    /// The file it was loaded from.
    pub path: PathBuf,
}

impl TrainedModel {
    /// Loads a model from a weight file, or from a run folder (its `model.safetensors`). Every
    /// metadata entry is checked with the rules training applies; an error names the file and key.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let file = if path.is_dir() {
            crate::RunLayout::new(path).model()
        } else {
            path.to_path_buf()
        };
        let model = Model::load(&file, device)?;
        Self::from_model(model, file)
    }

    /// Runs the network's matrix products with `precision` operands from now on (see
    /// [`fracture_model::Kernels::with_precision`]); everything else stays as loaded. BF16 on a
    /// network set to candle's reference operations is an error.
    pub fn set_precision(&mut self, precision: fracture_model::Precision) -> Result<()> {
        let kernels = self
            .model
            .net
            .kernels()
            .with_precision(precision)
            .map_err(|why| Error::InvalidConfig(why.into()))?;
        self.model.net.set_kernels(kernels);
        Ok(())
    }

    /// The operand precision of the network's matrix products.
    pub fn precision(&self) -> fracture_model::Precision {
        self.model.net.kernels().precision()
    }

    /// Checks a loaded network's metadata and wraps it, its network frozen for inference
    /// ([`Model::freeze`]: a trained model is only ever used to predict).
    fn from_model(mut model: Model, file: PathBuf) -> Result<Self> {
        let bad = |reason: String| {
            Error::Model(fracture_model::Error::BadWeights {
                path: file.clone(),
                reason,
            })
        };
        let meta = ModelMeta::from_metadata(&model.metadata).map_err(bad)?;
        if meta.preprocess.size as usize != model.config().image_size {
            return Err(bad(format!(
                "preprocessing size {} differs from the model's input size {}",
                meta.preprocess.size,
                model.config().image_size
            )));
        }
        model.freeze()?;
        Ok(TrainedModel {
            model,
            meta,
            path: file,
        })
    }

    /// Writes the model atomically with its metadata ([`TrainedModel::meta`], validated first).
    pub fn save(&self, path: &Path) -> Result<()> {
        Ok(self.model.save(path, &self.meta.to_metadata()?)?)
    }

    /// Writes the model with its weights stored in half precision (F16): half the file, read back
    /// into F32 by [`TrainedModel::load`]. How much the predictions move is measured by
    /// `cargo xtask default-model` for the bundled model.
    pub fn save_half(&self, path: &Path) -> Result<()> {
        Ok(self
            .model
            .save_as(path, &self.meta.to_metadata()?, candle_core::DType::F16)?)
    }

    /// Writes the model with its weights stored as `dtype` (F32, F16 or BF16).
    pub fn save_as(&self, path: &Path, dtype: candle_core::DType) -> Result<()> {
        Ok(self.model.save_as(path, &self.meta.to_metadata()?, dtype)?)
    }

    /// The model as the bytes of an ONNX file (see [`fracture_model::onnx`]): input `image`
    /// `(B, 1, S, S)` f32, the gray radiograph fitted to `S × S` as [`TrainedModel::preprocess`]
    /// does and scaled to [0, 1] (the standardization, when the model has one, is inside the graph);
    /// outputs `p_fractured` (calibrated, as [`TrainedModel::probability`]), `fractured` at the
    /// stored threshold, and `fracture_map` with a localization head. Test-time augmentation is not
    /// part of the graph. The preprocessing and threshold are also recorded as metadata.
    pub fn to_onnx(&self) -> Result<Vec<u8>> {
        let pre = &self.meta.preprocess;
        let options = fracture_model::onnx::OnnxOptions {
            standardize: pre.standardize.map(|s| (s.mean, s.std)),
            calibration: self.meta.calibration.as_ref().map(|c| (c.platt.a, c.platt.b)),
            threshold: self.meta.threshold,
            metadata: vec![(PREPROCESS_KEY.to_string(), json(pre)?)],
            doc: format!(
                "Bone-fracture classifier exported by fracture from {}. Input: the radiograph as gray \
                 values / 255, fitted to {s} x {s} ({:?}). Research use only, not for diagnosis.",
                self.path.display(),
                pre.resize,
                s = pre.size,
            ),
        };
        Ok(fracture_model::onnx::export(&self.model.net, &options)?)
    }

    /// Loads a model from the bytes of a weight file (a model compiled into a program, say);
    /// `origin` names it in errors and becomes [`TrainedModel::path`].
    pub fn from_bytes(bytes: &[u8], origin: &Path, device: &Device) -> Result<Self> {
        let model = Model::from_safetensors(bytes, origin, device)?;
        Self::from_model(model, origin.to_path_buf())
    }

    /// The preprocessing the model was trained with.
    pub fn preprocess(&self) -> &PreprocessConfig {
        &self.meta.preprocess
    }

    /// The operating threshold on P(fractured).
    pub fn threshold(&self) -> f64 {
        self.meta.threshold
    }

    /// The probability the model reports for an uncalibrated one (the sigmoid of the network's
    /// logit, or the mean of such over test-time views): the stored calibration applied, or `raw`
    /// itself for an uncalibrated model. Every P(fractured) shown passes through here.
    pub fn probability(&self, raw: f64) -> f64 {
        match &self.meta.calibration {
            Some(c) => c.platt.apply(raw),
            None => raw,
        }
    }

    /// The decision at the stored operating point: fractured when `p_fractured >= threshold`.
    pub fn decide(&self, p_fractured: f64) -> Label {
        Label::from_fractured(fracture_eval::is_fractured(p_fractured, self.meta.threshold))
    }

    /// The test-time augmentation that matches the flips the model was trained with (see
    /// [`crate::Tta::for_training`]); the mirror when the file does not record its training.
    pub fn tta(&self) -> crate::Tta {
        crate::Tta::for_training(self.meta.train.as_ref().and_then(|t| t.augment.as_ref()))
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

/// `value` as compact JSON, for a metadata entry.
pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|source| Error::Serialize {
        what: "model metadata",
        source,
    })
}

/// `value` as indented JSON, for a report file; `what` names it in the error.
pub fn json_pretty<T: serde::Serialize + ?Sized>(value: &T, what: &'static str) -> Result<String> {
    serde_json::to_string_pretty(value).map_err(|source| Error::Serialize { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ModelMeta {
        ModelMeta {
            threshold_rule: Some(ThresholdRule::Youden),
            train: Some(TrainConfig::default()),
            ..ModelMeta::new(PreprocessConfig::with_size(64), 0.3)
        }
    }

    #[test]
    fn metadata_round_trips_through_the_file_entries() {
        let m = meta();
        let entries = m.to_metadata().unwrap();
        assert!(entries.contains_key(THRESHOLD_KEY) && !entries.contains_key(VALIDATION_KEY));
        assert_eq!(ModelMeta::from_metadata(&entries).unwrap(), m);
    }

    #[test]
    fn a_missing_threshold_or_an_unreadable_entry_is_an_error_naming_the_key() {
        let mut entries = meta().to_metadata().unwrap();
        entries.remove(THRESHOLD_KEY);
        let err = ModelMeta::from_metadata(&entries).unwrap_err();
        assert!(err.contains(THRESHOLD_KEY) && err.contains("no "), "{err}");
        // Training settings that do not parse were once ignored (the mirror TTA was used instead).
        let mut entries = meta().to_metadata().unwrap();
        entries.insert(TRAIN_KEY.into(), "{\"epochs\": \"many\"}".into());
        let err = ModelMeta::from_metadata(&entries).unwrap_err();
        assert!(err.contains(TRAIN_KEY) && err.contains("unreadable"), "{err}");
        let mut entries = meta().to_metadata().unwrap();
        entries.insert(THRESHOLD_KEY.into(), "1.5".into());
        assert!(
            ModelMeta::from_metadata(&entries)
                .unwrap_err()
                .contains("not a probability")
        );
    }

    #[test]
    fn a_calibration_round_trips_and_a_decreasing_one_is_refused() {
        let cal = crate::calibrate::Calibration {
            platt: fracture_eval::Platt { a: 0.9, b: -1.7 },
            images: 512,
            positives: 88,
            ece_uncalibrated: Some(0.13),
            ece_cross_fitted: Some(0.03),
            brier_cross_fitted: None,
        };
        let m = ModelMeta {
            calibration: Some(cal),
            ..meta()
        };
        let entries = m.to_metadata().unwrap();
        assert_eq!(ModelMeta::from_metadata(&entries).unwrap(), m);
        let mut entries = entries;
        entries.insert(
            CALIBRATION_KEY.into(),
            json(&crate::calibrate::Calibration {
                platt: fracture_eval::Platt { a: -1.0, b: 0.0 },
                ..cal
            })
            .unwrap(),
        );
        let err = ModelMeta::from_metadata(&entries).unwrap_err();
        assert!(err.contains(CALIBRATION_KEY) && err.contains("positive"), "{err}");
    }
}
