//! A model with its parameters, and the self-describing weight file.
//!
//! A weight file is one safetensors file: the parameters as F32 tensors named by their `vb.pp` paths,
//! and string metadata holding `fracture.format` (`"1"`), `fracture.model_config` (the
//! [`ModelConfig`] as JSON) and whatever the caller adds (fracture-train adds the preprocessing
//! settings and the operating threshold). Renaming a layer field breaks old files: the names are a
//! file format.
//!
//! Every file this build writes also carries [`TENSORS_SHA256_KEY`], a SHA-256 of the tensors as
//! stored (see [`tensors_sha256`]); loading recomputes it and refuses a file whose weights changed
//! since (one flipped bit in one weight moves predictions silently otherwise). Files written
//! before the digest existed have none and load as before.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use fracture_fs::AtPath;

use crate::{Error, FractureNet, ModelConfig, Result, seeded_var_builder};

/// Metadata key of the file-format version.
pub const FORMAT_KEY: &str = "fracture.format";
/// Metadata key of the model configuration (JSON).
pub const CONFIG_KEY: &str = "fracture.model_config";
/// Metadata key of the SHA-256 of the stored tensors (lower-case hex; see [`tensors_sha256`]).
pub const TENSORS_SHA256_KEY: &str = "fracture.tensors_sha256";
/// The file-format version this build writes and reads.
pub const FORMAT_VERSION: &str = "1";

/// A network together with the variables it trains.
pub struct Model {
    /// The network.
    pub net: FractureNet,
    /// Its parameters (F32), keyed by name.
    pub varmap: VarMap,
    /// Metadata read from the weight file (empty for a fresh model), including [`CONFIG_KEY`].
    pub metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", self.config())
            .field("params", &self.param_count())
            .field("metadata", &self.metadata.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Model {
    /// A freshly initialised model: every parameter drawn from a stream seeded by `seed` and its name.
    pub fn new(config: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, device);
        let net = FractureNet::new(config, vb)?;
        Ok(Model {
            net,
            varmap,
            metadata: BTreeMap::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        self.net.config()
    }

    /// Every variable sorted by name (parameters and batch-norm running statistics): a stable order
    /// for weight files and checkpoints. Optimizers take [`Model::trainable_vars`].
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data();
        let mut vars: Vec<(String, Var)> = match data.lock() {
            Ok(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        };
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The variables an optimizer updates, sorted by name: every variable except batch-norm running
    /// statistics (`*.running_mean`, `*.running_var`), which the forward pass itself maintains.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.named_vars()
            .into_iter()
            .filter(|(name, _)| !is_running_stat(name))
            .collect()
    }

    /// A copy of [`Model::net`] for inference only: its layers hold plain tensors (copies of the
    /// variables' current values) instead of the variables themselves, so a forward pass records
    /// no graph for autograd and frees each activation as soon as the next layer has used it.
    /// Through the variables, a forward pass keeps every intermediate tensor alive until its output
    /// is dropped: about 70 MB per 256-px image for EfficientNet-Lite0 (the speed is the same). The
    /// kernels and batch-norm settings are kept; the values are those of now (training on).
    pub fn inference_net(&self) -> Result<FractureNet> {
        let vars = self.named_vars();
        let device = vars.first().map_or(Device::Cpu, |(_, v)| v.device().clone());
        let tensors: HashMap<String, Tensor> = vars
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &device);
        let mut net = FractureNet::new(self.config(), vb)?;
        net.set_kernels(self.net.kernels());
        net.set_frozen_batch_norm(self.net.frozen_batch_norm());
        net.freeze_weights();
        Ok(net)
    }

    /// Replaces [`Model::net`] by its [`Model::inference_net`] (the variables stay in
    /// [`Model::varmap`] for saving). A frozen model cannot be trained: an optimizer would update
    /// the variables, not the layers.
    pub fn freeze(&mut self) -> Result<()> {
        self.net = self.inference_net()?;
        Ok(())
    }

    /// Total number of trainable scalars.
    pub fn param_count(&self) -> usize {
        self.trainable_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The weight file's bytes: every parameter plus [`FORMAT_KEY`], [`CONFIG_KEY`] and `extra`.
    pub fn to_safetensors(&self, extra: &BTreeMap<String, String>) -> Result<Vec<u8>> {
        self.to_safetensors_as(extra, DType::F32)
    }

    /// Like [`Model::to_safetensors`], with every tensor stored as `dtype` (`F16` halves the file;
    /// [`Model::load`] reads any float type back into F32). Only F32, F16 and BF16 are accepted.
    pub fn to_safetensors_as(&self, extra: &BTreeMap<String, String>, dtype: DType) -> Result<Vec<u8>> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::InvalidConfig(format!(
                "weights are stored as F32, F16 or BF16, not {dtype:?}"
            )));
        }
        let mut metadata: HashMap<String, String> = extra.clone().into_iter().collect();
        metadata.insert(FORMAT_KEY.into(), FORMAT_VERSION.into());
        let config = serde_json::to_string(self.config())
            .map_err(|e| Error::InvalidConfig(format!("cannot serialise the model config: {e}")))?;
        metadata.insert(CONFIG_KEY.into(), config);
        let tensors: Vec<(String, Tensor)> = self
            .named_vars()
            .into_iter()
            .map(|(name, var)| Ok((name, var.as_tensor().to_dtype(dtype)?.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let serialize = |metadata: HashMap<String, String>| {
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .map_err(|e| Error::Candle(candle_core::Error::Msg(format!("safetensors: {e}"))))
        };
        // The digest is of the tensors exactly as stored, so it is taken from a first serialisation.
        metadata.remove(TENSORS_SHA256_KEY);
        let first = serialize(metadata.clone())?;
        let stored = safetensors::SafeTensors::deserialize(&first)
            .map_err(|e| Error::Candle(candle_core::Error::Msg(format!("safetensors: {e}"))))?;
        metadata.insert(TENSORS_SHA256_KEY.into(), tensors_sha256(&stored));
        serialize(metadata)
    }

    /// Writes the weight file atomically (temporary file, fsync, rename): an interrupted save leaves
    /// the previous file intact.
    pub fn save(&self, path: &Path, extra: &BTreeMap<String, String>) -> Result<()> {
        self.save_as(path, extra, DType::F32)
    }

    /// [`Model::save`] with the tensors stored as `dtype` (see [`Model::to_safetensors_as`]).
    pub fn save_as(&self, path: &Path, extra: &BTreeMap<String, String>, dtype: DType) -> Result<()> {
        let bytes = self.to_safetensors_as(extra, dtype)?;
        fracture_fs::write_atomic(path, &bytes)
            .at(path)
            .map_err(Error::from)
    }

    /// The precision the tensors of a weight file are stored in (F32, F16 or BF16; the first
    /// tensor's, as [`Model::save_as`] writes them all alike), read from the header alone, so that a
    /// tool rewriting the file's metadata can keep its weights bit for bit.
    pub fn stored_dtype(path: &Path) -> Result<DType> {
        let bytes = std::fs::read(path).at(path)?;
        let bad = |reason: String| Error::BadWeights {
            path: path.to_path_buf(),
            reason,
        };
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors weight file: {e}")))?;
        let first = tensors
            .tensors()
            .into_iter()
            .map(|(_, view)| view.dtype())
            .next()
            .ok_or_else(|| bad("the file holds no tensor".into()))?;
        match first {
            safetensors::Dtype::F32 => Ok(DType::F32),
            safetensors::Dtype::F16 => Ok(DType::F16),
            safetensors::Dtype::BF16 => Ok(DType::BF16),
            other => Err(bad(format!("tensors stored as {other:?}, not F32, F16 or BF16"))),
        }
    }

    /// Reads a weight file written by [`Model::save`] and rebuilds the network on `device`.
    ///
    /// Errors name the file and what is wrong: not a safetensors file, no fracture metadata, an
    /// unknown architecture, a missing or unexpected tensor, or a tensor whose shape differs from
    /// what the stored configuration implies.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).at(path)?;
        Self::from_safetensors(&bytes, path, device)
    }

    /// Like [`Model::load`], from bytes already in memory; `origin` names them in errors.
    pub fn from_safetensors(bytes: &[u8], origin: &Path, device: &Device) -> Result<Self> {
        let bad = |reason: String| Error::BadWeights {
            path: origin.to_path_buf(),
            reason,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors weight file: {e}")))?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        match metadata.get(FORMAT_KEY).map(String::as_str) {
            Some(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(bad(format!(
                    "weight format version {v} is not supported (this build reads 1)"
                )));
            }
            None => {
                return Err(bad(format!(
                    "not a fracture model file (no `{FORMAT_KEY}` metadata)"
                )));
            }
        }
        let config_json = metadata
            .get(CONFIG_KEY)
            .ok_or_else(|| bad(format!("no `{CONFIG_KEY}` metadata")))?;
        let config: ModelConfig =
            serde_json::from_str(config_json).map_err(|e| bad(format!("unreadable model config: {e}")))?;
        config
            .validate()
            .map_err(|e| bad(format!("stored model config: {e}")))?;
        let mut tensors = candle_core::safetensors::load_buffer(bytes, device)
            .map_err(|e| bad(format!("unreadable tensors: {e}")))?;
        let mut model = Model::new(&config, 0, device).map_err(|e| bad(e.to_string()))?;
        for (name, var) in model.named_vars() {
            let tensor = tensors.remove(&name).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` is missing for the {} architecture",
                    config.arch_name()
                ))
            })?;
            if tensor.dims() != var.dims() {
                return Err(bad(format!(
                    "tensor `{name}` has shape {:?}, but the stored config implies {:?}",
                    tensor.dims(),
                    var.dims()
                )));
            }
            let tensor = tensor.to_dtype(DType::F32)?;
            let finite = tensor
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            if !finite {
                return Err(bad(format!("tensor `{name}` holds NaN or infinite values")));
            }
            var.set(&tensor)?;
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(bad(format!(
                "tensor `{extra}` is not part of the {} architecture (a file from another architecture?)",
                config.arch_name()
            )));
        }
        if let Some(expected) = metadata.get(TENSORS_SHA256_KEY) {
            let stored = safetensors::SafeTensors::deserialize(bytes)
                .map_err(|e| bad(format!("not a safetensors weight file: {e}")))?;
            let actual = tensors_sha256(&stored);
            if !actual.eq_ignore_ascii_case(expected.trim()) {
                return Err(bad(format!(
                    "the weights do not match the SHA-256 recorded when the file was written \
                     (recorded {expected}, found {actual}): the file was altered or damaged"
                )));
            }
        }
        model.metadata = metadata;
        Ok(model)
    }
}

/// SHA-256 (lower-case hex) of a weight file's tensors as stored: for each tensor in name order,
/// its name, a zero byte, its dtype's name, its shape (each dimension as 8 little-endian bytes,
/// then a zero byte) and its raw bytes. The metadata is not part of it, so a tool may rewrite the
/// metadata (threshold, calibration) without touching the weights.
pub fn tensors_sha256(tensors: &safetensors::SafeTensors<'_>) -> String {
    use sha2::{Digest, Sha256};
    let mut names = tensors.names();
    names.sort();
    let mut hasher = Sha256::new();
    for name in names {
        let Ok(view) = tensors.tensor(name) else { continue };
        hasher.update(name.as_bytes());
        hasher.update([0u8]);
        hasher.update(format!("{:?}", view.dtype()).as_bytes());
        for &d in view.shape() {
            hasher.update((d as u64).to_le_bytes());
        }
        hasher.update([0u8]);
        hasher.update(view.data());
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The most memory the declared input size of a loaded model may imply for one image (2 GiB; see
/// [`ModelConfig::input_implied_bytes`]): a model file declaring a larger input is refused at load
/// instead of exhausting memory at its first image.
pub const MAX_IMAGE_BYTES: u64 = 2 << 30;

/// Whether a variable name is a batch-norm running statistic rather than a trained parameter.
fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}
