//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! One safetensors file holds the weights (`model.<name>`), both Adam moments (`adam.m.<name>`,
//! `adam.v.<name>`) and, as JSON metadata under `fracture.checkpoint`, a [`CheckpointMeta`]: the
//! epoch, the optimizer step, all configurations, the best result so far and the history. The random
//! state is implied: shuffling, augmentation and dropout are all derived from the seed, the epoch and
//! the step. One file means a checkpoint is written (atomically) or not at all.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use fracture_data::PreprocessConfig;
use fracture_fs::AtPath;
use fracture_fs::write_atomic;
use fracture_model::{Model, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::{Adam, EpochReport, Error, Result, TrainConfig};

const META_KEY: &str = "fracture.checkpoint";
const FORMAT: u32 = 1;

/// Exactly what a run trains and validates on, so that resuming on anything else is refused
/// naming what changed: one short digest per image (of its path, label and size in bytes), the
/// box file's digest, and the data-shaping options that are not training settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataSetFingerprint {
    /// Training images: the first 16 hex digits of SHA-256 of `path \0 label \0 size`, sorted.
    pub train: Vec<String>,
    /// Validation images, the same way.
    pub val: Vec<String>,
    /// SHA-256 of the `--boxes` file, when one trains the localization head.
    pub boxes: Option<String>,
    /// Data-shaping options, `(name, value)`: extra training folders, partial images, leak
    /// exclusion.
    pub options: Vec<(String, String)>,
}

fn image_digest(item: &fracture_data::Item) -> String {
    use sha2::{Digest, Sha256};
    let size = std::fs::metadata(&item.path).map_or(0, |m| m.len());
    let mut h = Sha256::new();
    h.update(item.path.to_string_lossy().as_bytes());
    h.update([0u8]);
    h.update(item.label.name().as_bytes());
    h.update([0u8]);
    h.update(size.to_le_bytes());
    h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl DataSetFingerprint {
    /// The fingerprint of the loaded splits (readable images only) with `boxes` (the box file's
    /// bytes' SHA-256) and `options`.
    pub(crate) fn of(
        train: &[fracture_data::Item],
        val: &[fracture_data::Item],
        boxes: Option<String>,
        options: Vec<(String, String)>,
    ) -> Self {
        let digests = |items: &[fracture_data::Item]| {
            let mut d: Vec<String> = items.iter().map(image_digest).collect();
            d.sort();
            d
        };
        DataSetFingerprint {
            train: digests(train),
            val: digests(val),
            boxes,
            options,
        }
    }

    /// Why `now` is not the data set this fingerprint was taken of, naming the first difference
    /// (`now_items` name the new images); `None` when it is the same.
    pub(crate) fn mismatch(
        &self,
        now: &DataSetFingerprint,
        now_items: (&[fracture_data::Item], &[fracture_data::Item]),
    ) -> Option<String> {
        for (name, old, new, items) in [
            ("training", &self.train, &now.train, now_items.0),
            ("validation", &self.val, &now.val, now_items.1),
        ] {
            if old == new {
                continue;
            }
            let old_set: std::collections::BTreeSet<&String> = old.iter().collect();
            let new_set: std::collections::BTreeSet<&String> = new.iter().collect();
            let added: Vec<&fracture_data::Item> = items
                .iter()
                .filter(|i| !old_set.contains(&image_digest(i)))
                .collect();
            let gone = old_set.difference(&new_set).count();
            let examples: Vec<String> = added
                .iter()
                .take(3)
                .map(|i| format!("{} ({})", fracture_data::path_text(&i.path), i.label.name()))
                .collect();
            return Some(format!(
                "the {name} images differ from the checkpoint's: {} new or changed (path, label or size{}{}), {gone} no longer there",
                added.len(),
                if examples.is_empty() { "" } else { "; e.g. " },
                examples.join(", ")
            ));
        }
        if self.boxes != now.boxes {
            return Some(format!(
                "the box file differs (checkpoint: {}; now: {})",
                self.boxes.as_deref().unwrap_or("none"),
                now.boxes.as_deref().unwrap_or("none")
            ));
        }
        let old: BTreeMap<&String, &String> = self.options.iter().map(|(k, v)| (k, v)).collect();
        for (k, v) in &now.options {
            if old.get(k) != Some(&v) {
                return Some(format!(
                    "data option `{k}` differs (checkpoint: {}; now: {v})",
                    old.get(k).map_or("unset", |s| s.as_str())
                ));
            }
        }
        None
    }
}

/// Images per class of the splits a run trains and validates on, to notice a changed dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCounts {
    /// Training images per label index (fractured, not fractured).
    pub train: [usize; 2],
    /// Validation images per label index.
    pub val: [usize; 2],
}

/// The best epoch so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// 1-based epoch.
    pub epoch: usize,
    /// Value of the selection metric; `None` when it was undefined on that epoch (ROC-AUC of a
    /// validation set the network scored all alike, for one), so that any defined value replaces it.
    pub value: Option<f64>,
}

/// The state of a run after a completed epoch, besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Checkpoint format version.
    pub format: u32,
    /// Completed epochs.
    pub epoch: usize,
    /// Optimizer steps taken (Adam's `t`).
    pub step: u64,
    /// The model.
    pub model: ModelConfig,
    /// The preprocessing.
    pub preprocess: PreprocessConfig,
    /// The training settings.
    pub train: TrainConfig,
    /// The data it was trained on.
    pub data: DataCounts,
    /// The best epoch so far, by the selection metric.
    pub best: Option<Best>,
    /// Epochs since the best one (for early stopping).
    pub epochs_since_best: usize,
    /// One report per completed epoch.
    pub history: Vec<EpochReport>,
    /// The pretrained weights the run started from.
    #[serde(default)]
    pub pretrained: Option<fracture_model::PretrainedOrigin>,
    /// Exactly what the run trains on (absent in checkpoints from before it was recorded, which
    /// resume on per-class counts alone).
    #[serde(default)]
    pub data_set: Option<DataSetFingerprint>,
}

/// Writes a checkpoint atomically.
pub(crate) fn save_checkpoint(
    path: &Path,
    model: &Model,
    adam: &Adam,
    ema: Option<&Model>,
    meta: &CheckpointMeta,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, var) in model.named_vars() {
        tensors.push((format!("model.{name}"), var.as_tensor().to_device(&Device::Cpu)?));
    }
    for (name, var) in ema.map(Model::named_vars).unwrap_or_default() {
        tensors.push((
            crate::ema::checkpoint_key(&name),
            var.as_tensor().to_device(&Device::Cpu)?,
        ));
    }
    for (name, t) in adam.state_tensors()? {
        tensors.push((name, t.to_device(&Device::Cpu)?));
    }
    let json = crate::bundle::json(meta)?;
    let metadata = HashMap::from([(META_KEY.to_string(), json)]);
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    write_atomic(path, &bytes).at(path).map_err(Error::from)
}

/// Reads a checkpoint's metadata and tensors (on `device`).
pub fn read_checkpoint(path: &Path, device: &Device) -> Result<(CheckpointMeta, HashMap<String, Tensor>)> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).at(path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a checkpoint file: {e}")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| bad(format!("no `{META_KEY}` metadata: not a checkpoint")))?;
    let meta: CheckpointMeta =
        serde_json::from_str(json).map_err(|e| bad(format!("unreadable metadata: {e}")))?;
    if meta.format != FORMAT {
        return Err(bad(format!(
            "checkpoint format {} is not supported (this build reads {FORMAT})",
            meta.format
        )));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(e.to_string()))?;
    Ok((meta, tensors))
}

/// Why a checkpoint cannot continue the requested run: the first setting that differs, with both
/// values; `None` when it can.
pub(crate) fn resume_mismatch(
    meta: &CheckpointMeta,
    model: &ModelConfig,
    preprocess: &PreprocessConfig,
    train: &TrainConfig,
    data: &DataCounts,
) -> Option<String> {
    if &meta.model != model {
        return Some(format!(
            "model differs (checkpoint: {:?}; now: {model:?})",
            meta.model
        ));
    }
    if &meta.preprocess != preprocess {
        return Some(format!(
            "preprocessing differs (checkpoint: {:?}; now: {preprocess:?})",
            meta.preprocess
        ));
    }
    let old: BTreeMap<_, _> = meta.train.resume_fingerprint().into_iter().collect();
    for (field, now) in train.resume_fingerprint() {
        if old.get(field) != Some(&now) {
            let was = old.get(field).cloned().unwrap_or_default();
            return Some(format!(
                "training setting `{field}` differs (checkpoint: {was}; now: {now})"
            ));
        }
    }
    if &meta.data != data {
        return Some(format!(
            "the data differs (checkpoint: train {:?}, val {:?} images per class; now: train {:?}, val {:?})",
            meta.data.train, meta.data.val, data.train, data.val
        ));
    }
    None
}

/// Copies the checkpoint's weights into `model` and its moments into `adam`.
pub(crate) fn restore(
    path: &Path,
    tensors: &mut HashMap<String, Tensor>,
    meta: &CheckpointMeta,
    model: &Model,
    adam: &mut Adam,
    ema: Option<&Model>,
) -> Result<()> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let live = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (format!("model.{n}"), v));
    let averaged = ema
        .map(Model::named_vars)
        .unwrap_or_default()
        .into_iter()
        .map(|(n, v)| (crate::ema::checkpoint_key(&n), v));
    for (key, var) in live.chain(averaged) {
        let t = tensors
            .remove(&key)
            .ok_or_else(|| bad(format!("tensor `{key}` is missing")))?;
        if t.dims() != var.dims() {
            return Err(bad(format!(
                "tensor `{key}` has shape {:?}, expected {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    adam.load_state(tensors, meta.step)
        .map_err(|e| bad(e.to_string()))
}
