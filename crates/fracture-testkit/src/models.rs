//! Damaged and edited copies of a valid model file, for the entry points that load one.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The metadata keys of a trained model file that [`write_bad_models`] edits. The caller passes the
/// crate's own constants, so the keys have one owner.
#[derive(Debug, Clone, Copy)]
pub struct ModelKeys<'a> {
    /// Key of the decision threshold (a JSON number).
    pub threshold: &'a str,
    /// Key of the network configuration (a JSON object with `image_size`).
    pub config: &'a str,
    /// Key of the preprocessing settings (a JSON object with `size`).
    pub preprocess: &'a str,
}

/// One bad model file.
#[derive(Debug, Clone)]
pub struct BadModel {
    /// A short name for the kind of damage.
    pub kind: &'static str,
    /// The file (or folder) written; every one must be refused with an error naming it.
    pub path: PathBuf,
}

/// A safetensors file split into its header (parsed) and data.
fn split(bytes: &[u8]) -> Option<(serde_json::Map<String, Value>, &[u8])> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(len)?)?;
    let Value::Object(map) = serde_json::from_slice(header).ok()? else {
        return None;
    };
    Some((map, &bytes[8 + len..]))
}

fn join(header: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let mut text = serde_json::to_vec(header).unwrap_or_default();
    // safetensors pads the header with spaces to a multiple of 8.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

/// The file with one metadata value replaced (`None` removes the key).
fn edit_metadata(bytes: &[u8], key: &str, value: Option<String>) -> Vec<u8> {
    let Some((mut header, data)) = split(bytes) else {
        return bytes.to_vec();
    };
    if let Some(Value::Object(meta)) = header.get_mut("__metadata__") {
        match value {
            Some(v) => meta.insert(key.to_string(), Value::String(v)),
            None => meta.remove(key),
        };
    }
    join(&header, data)
}

/// The file with one JSON-valued metadata entry's field set to `value`.
fn edit_metadata_field(bytes: &[u8], key: &str, field: &str, value: Value) -> Vec<u8> {
    let current = split(bytes)
        .and_then(|(h, _)| h.get("__metadata__")?.get(key)?.as_str().map(str::to_string))
        .and_then(|s| serde_json::from_str::<Value>(&s).ok());
    let Some(Value::Object(mut object)) = current else {
        return bytes.to_vec();
    };
    object.insert(field.to_string(), value);
    edit_metadata(bytes, key, Some(Value::Object(object).to_string()))
}

/// The first tensor (by name) with at least two different leading dimensions.
fn first_matrix(header: &serde_json::Map<String, Value>) -> Option<String> {
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    names.into_iter().find_map(|name| {
        let shape = header[name].get("shape")?.as_array()?;
        (shape.len() >= 2 && shape[0] != shape[1]).then(|| name.clone())
    })
}

/// The edits of `good`'s first matrix and its data (swapped dimensions, a wrong dtype, a NaN
/// weight, a flipped bit, a weight of 65504), as `(kind, file name, bytes)`; none when `good` has
/// no matrix.
fn tensor_edits(good: &[u8]) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut edits = Vec::new();
    let Some((header, data)) = split(good) else {
        return edits;
    };
    let Some(name) = first_matrix(&header) else {
        return edits;
    };
    let mut swapped = header.clone();
    if let Some(shape) = swapped[&name].get_mut("shape").and_then(Value::as_array_mut) {
        shape.swap(0, 1);
    }
    edits.push((
        "tensor with swapped dimensions",
        "wrong-shape.safetensors",
        join(&swapped, data),
    ));
    let mut dtype = header.clone();
    dtype[&name]["dtype"] = Value::String("F16".into());
    edits.push((
        "tensor with a wrong dtype",
        "wrong-dtype.safetensors",
        join(&dtype, data),
    ));
    let start = header[&name]["data_offsets"][0].as_u64().unwrap_or(0) as usize;
    let mut nan = data.to_vec();
    if let Some(w) = nan.get_mut(start..start + 4) {
        w.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    edits.push(("NaN weight", "nan-weight.safetensors", join(&header, &nan)));
    // Finite but altered weights: only the tensors' recorded digest can tell.
    let mut flipped = data.to_vec();
    if let Some(b) = flipped.get_mut(start + 1) {
        *b ^= 0x40;
    }
    edits.push((
        "one flipped bit in one weight",
        "flipped-bit.safetensors",
        join(&header, &flipped),
    ));
    let mut large = data.to_vec();
    let value: Vec<u8> = if header[&name]["dtype"] == "F16" {
        vec![0xFF, 0x7B]
    } else {
        65504f32.to_le_bytes().to_vec()
    };
    if let Some(w) = large.get_mut(start..start + value.len()) {
        w.copy_from_slice(&value);
    }
    edits.push((
        "one weight set to 65504",
        "large-weight.safetensors",
        join(&header, &large),
    ));
    edits
}

/// Writes damaged and edited copies of the valid model file `good` (its bytes) into `dir`
/// (created): zero bytes, random bytes, truncated, an impossible header length, a garbled header,
/// a tensor with swapped dimensions, a tensor with a wrong dtype, a NaN weight, a threshold of 1.5,
/// a flipped bit in one weight, a weight set to 65504, preprocessing std 1e-30 and mean 1e38,
/// a threshold of 1.5, a non-numeric threshold, a missing network configuration, a 4096-pixel
/// input size, an image renamed as a model, and a folder without a model file.
pub fn write_bad_models(dir: &Path, good: &[u8], keys: ModelKeys<'_>) -> std::io::Result<Vec<BadModel>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    let mut put = |kind: &'static str, name: &str, bytes: Vec<u8>| -> std::io::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, bytes)?;
        out.push(BadModel { kind, path });
        Ok(())
    };
    put("zero bytes", "empty.safetensors", Vec::new())?;
    put(
        "random bytes",
        "random.safetensors",
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
            .collect(),
    )?;
    put(
        "truncated",
        "truncated.safetensors",
        good[..good.len() / 2].to_vec(),
    )?;
    let mut huge = good.to_vec();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    put("impossible header length", "header-length.safetensors", huge)?;
    let mut garbled = good.to_vec();
    if let Some(b) = garbled.get_mut(8) {
        *b = b'[';
    }
    put("garbled header", "garbled.safetensors", garbled)?;
    for (kind, name, bytes) in tensor_edits(good) {
        put(kind, name, bytes)?;
    }
    put(
        "preprocessing std 1e-30",
        "tiny-std.safetensors",
        edit_metadata_field(
            good,
            keys.preprocess,
            "standardize",
            serde_json::json!({"mean": 0.5, "std": 1e-30}),
        ),
    )?;
    put(
        "preprocessing mean 1e38",
        "huge-mean.safetensors",
        edit_metadata_field(
            good,
            keys.preprocess,
            "standardize",
            serde_json::json!({"mean": 1e38, "std": 0.25}),
        ),
    )?;
    put(
        "threshold 1.5",
        "threshold.safetensors",
        edit_metadata(good, keys.threshold, Some("1.5".into())),
    )?;
    put(
        "non-numeric threshold",
        "threshold-text.safetensors",
        edit_metadata(good, keys.threshold, Some("\"high\"".into())),
    )?;
    put(
        "no network configuration",
        "no-config.safetensors",
        edit_metadata(good, keys.config, None),
    )?;
    let big = edit_metadata_field(good, keys.config, "image_size", Value::from(4096));
    put(
        "4096-pixel input",
        "huge-input.safetensors",
        edit_metadata_field(&big, keys.preprocess, "size", Value::from(4096)),
    )?;
    put(
        "PNG named as a model",
        "image.safetensors",
        crate::corpus::png_bomb_header(8, 8),
    )?;
    let empty_run = dir.join("empty-run");
    std::fs::create_dir_all(&empty_run)?;
    out.push(BadModel {
        kind: "run folder without a model file",
        path: empty_run,
    });
    Ok(out)
}
