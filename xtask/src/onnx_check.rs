//! `cargo xtask onnx-check`: the ONNX export checked by ONNX Runtime (from PyPI). Exports the model
//! (the built-in one without `--model`) with `fracture export --format onnx`, preprocesses N
//! FracAtlas val radiographs with fracture-data (the input contract: gray, fitted to S × S, / 255),
//! has `fracture predict` score the same files, runs the ONNX file in ONNX Runtime on the CPU
//! (`xtask/scripts/onnx_check.py`, in a venv under `target/`), and fails when any P(fractured)
//! differs by more than 1e-4 or a decision away from the threshold differs. It also times one image
//! in ONNX Runtime and, in a release build, in our own inference (`bench_step infer S 1`), and writes
//! `OUT/onnx-check.json` and `OUT/onnx-check.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

use fracture_data::{DecodeLimits, PreprocessConfig, to_unit};

use crate::{DynError, status};

/// Largest allowed |ΔP| between ONNX Runtime and `fracture predict`.
const TOLERANCE: f64 = 1e-4;

struct Options {
    model: Option<PathBuf>,
    shared: PathBuf,
    out: PathBuf,
    images: usize,
    python: Option<PathBuf>,
    debug_build: bool,
    repeats: u32,
}

fn parse(args: &[String], root: &Path) -> Result<Options, DynError> {
    let mut o = Options {
        model: None,
        shared: root.join("../shared"),
        out: root.join("target/onnx-check"),
        images: 32,
        python: None,
        debug_build: false,
        repeats: 50,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--model" => o.model = Some(PathBuf::from(value("--model")?)),
            "--shared" => o.shared = PathBuf::from(value("--shared")?),
            "--out" => o.out = PathBuf::from(value("--out")?),
            "--images" => o.images = value("--images")?.parse()?,
            "--python" => o.python = Some(PathBuf::from(value("--python")?)),
            "--repeats" => o.repeats = value("--repeats")?.parse()?,
            "--debug-build" => o.debug_build = true,
            other => return Err(format!("onnx-check: unknown argument `{other}`").into()),
        }
    }
    if o.images < 2 || o.repeats == 0 {
        return Err("onnx-check: --images must be at least 2 and --repeats at least 1".into());
    }
    Ok(o)
}

/// A venv under `target/` with ONNX Runtime, NumPy and Pillow from PyPI (made once), or `--python`.
fn python(o: &Options, root: &Path) -> Result<PathBuf, DynError> {
    if let Some(p) = &o.python {
        return Ok(p.clone());
    }
    crate::pip_venv(
        &root.join("target/onnxruntime"),
        &["onnxruntime", "numpy", "pillow"],
    )
}

/// The first `n / 2` val radiographs of each class, by name.
fn val_images(shared: &Path, n: usize) -> Result<Vec<PathBuf>, DynError> {
    let val = shared.join("data/fracatlas/val");
    let mut files = Vec::new();
    for (class, take) in [("fractured", n / 2), ("not fractured", n - n / 2)] {
        let dir = val.join(class);
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| format!("the FracAtlas radiographs are not at {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        files.extend(names.into_iter().take(take));
    }
    Ok(files)
}

/// The preprocessing recorded in a model file's safetensors metadata (`fracture.preprocess`).
fn preprocessing(model_file: &Path) -> Result<PreprocessConfig, DynError> {
    let bytes = std::fs::read(model_file)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("{}: not a safetensors file: {e}", model_file.display()))?;
    let text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("fracture.preprocess"))
        .ok_or_else(|| format!("{}: no fracture.preprocess metadata", model_file.display()))?;
    Ok(serde_json::from_str(text)?)
}

/// `path → p_fractured` of `fracture predict --format jsonl` rows.
fn predicted(jsonl: &Path) -> Result<Vec<(String, f64)>, DynError> {
    let text = std::fs::read_to_string(jsonl)?;
    text.lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line)?;
            let path = row["path"].as_str().ok_or("a row without path")?.to_string();
            let p = row["p_fractured"].as_f64().ok_or("a row without p_fractured")?;
            Ok((path, p))
        })
        .collect()
}

/// The model exported by `fracture export` into `o.out`: the ONNX graph and the full-precision
/// safetensors file (whose metadata gives the preprocessing).
fn export(fracture: &Path, o: &Options) -> Result<(PathBuf, PathBuf), DynError> {
    let (onnx, weights) = (o.out.join("fracture.onnx"), o.out.join("model.safetensors"));
    for (format, file, extra) in [
        ("onnx", &onnx, None),
        ("safetensors", &weights, Some("--full-precision")),
    ] {
        let mut export = Command::new(fracture);
        export.args(["export", "--format", format, "--out"]).arg(file);
        export.args(extra);
        if let Some(m) = &o.model {
            export.arg("--model").arg(m);
        }
        status(&mut export)?;
    }
    Ok((onnx, weights))
}

/// Our batch-1 latency at `side` px in ms (`bench_step` in a release build), `None` for a debug build.
fn our_latency_ms(o: &Options, cargo: &str, root: &Path, side: usize) -> Result<Option<f64>, DynError> {
    Ok(if o.debug_build {
        None
    } else {
        let mut build = Command::new(cargo);
        build.current_dir(root).args([
            "build",
            "--release",
            "-p",
            "fracture-benches",
            "--example",
            "bench_step",
        ]);
        status(&mut build)?;
        let rate = crate::result_rate(
            Command::new(root.join("target/release/examples/bench_step"))
                .args(["infer", &side.to_string(), "1", &o.repeats.to_string()])
                .args(["--arch", "efficientnet-lite0"]),
        )?;
        Some(1000.0 / rate)
    })
}

/// Our P against ONNX Runtime's per file, in `files` order: the largest |ΔP|, the files whose
/// decisions differ (away from the threshold by more than [`TOLERANCE`]) and our P in that order.
fn compare(
    files: &[PathBuf],
    ours: &[(String, f64)],
    theirs: &[serde_json::Value],
    decisions: &[serde_json::Value],
    threshold: f64,
) -> Result<(f64, Vec<String>, Vec<f64>), DynError> {
    let mut worst = 0f64;
    let mut disagreements = Vec::new();
    let mut ours_in_order = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let key = f.display().to_string();
        let p = ours
            .iter()
            .find(|(path, _)| *path == key)
            .map(|(_, p)| *p)
            .ok_or_else(|| format!("fracture predict gave no row for {key}"))?;
        ours_in_order.push(p);
        let q = theirs
            .get(i)
            .and_then(serde_json::Value::as_f64)
            .ok_or("short ONNX output")?;
        worst = worst.max((p - q).abs());
        let decision = decisions.get(i).and_then(serde_json::Value::as_bool);
        if (p - threshold).abs() > TOLERANCE && decision != Some(p >= threshold) {
            disagreements.push(key);
        }
    }
    Ok((worst, disagreements, ours_in_order))
}

pub(crate) fn run(args: &[String], root: &Path) -> Result<(), DynError> {
    let o = parse(args, root)?;
    let files = val_images(&o.shared, o.images)?;
    let python = python(&o, root)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let profile = if o.debug_build { "debug" } else { "release" };
    let mut build = Command::new(&cargo);
    if o.debug_build {
        build.current_dir(root).args(crate::TEST_BUILD);
    } else {
        build
            .current_dir(root)
            .args(["build", "--release", "-p", "fracture-cli"]);
    }
    status(&mut build)?;
    let fracture = root.join("target").join(profile).join("fracture");
    if o.out.exists() {
        std::fs::remove_dir_all(&o.out)?;
    }
    std::fs::create_dir_all(&o.out)?;
    let (onnx, weights) = export(&fracture, &o)?;
    let pre = preprocessing(&weights)?;
    let side = pre.size as usize;
    // The inputs, by fracture-data's own preprocessing, as the graph's contract states them.
    let limits = DecodeLimits::default();
    let mut raw = Vec::with_capacity(files.len() * side * side * 4);
    for f in &files {
        let image = pre.load_file(f, &limits)?;
        raw.extend(to_unit(image.view()).iter().flat_map(|v| v.to_le_bytes()));
    }
    let inputs = o.out.join("inputs.f32");
    std::fs::write(&inputs, raw)?;
    let list = o.out.join("inputs.txt");
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    std::fs::write(&list, names.join("\n") + "\n")?;
    let ours_file = o.out.join("ours.jsonl");
    let mut predict = Command::new(&fracture);
    predict
        .args(["predict", "--no-evidence", "--format", "jsonl", "--out"])
        .arg(&ours_file)
        .args(&files);
    if let Some(m) = &o.model {
        predict.arg("--model").arg(m);
    }
    status(&mut predict)?;
    let ours = predicted(&ours_file)?;
    let script = root.join("xtask/scripts/onnx_check.py");
    eprintln!("$ {} {} …", python.display(), script.display());
    let out = Command::new(&python)
        .arg(&script)
        .arg(&onnx)
        .arg(&inputs)
        .arg(files.len().to_string())
        .arg(side.to_string())
        .arg(o.repeats.to_string())
        .arg(&list)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!("ONNX Runtime failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let ort: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let theirs = ort["p_fractured"]
        .as_array()
        .ok_or("no p_fractured from ONNX Runtime")?;
    let decisions = ort["fractured"]
        .as_array()
        .ok_or("no fractured from ONNX Runtime")?;
    let threshold: f64 = ort["metadata"]["fracture.threshold"]
        .as_str()
        .ok_or("no fracture.threshold in the ONNX metadata")?
        .parse()?;
    let (worst, disagreements, ours_in_order) = compare(&files, &ours, theirs, decisions, threshold)?;
    let ort_ms = ort["latency_ms_median"].as_f64().ok_or("no latency")?;
    // The README's Python preprocessing (Pillow) instead of ours: how far P moves (reported only).
    let pillow_worst = ort["p_fractured_pillow"].as_array().map(|ps| {
        ps.iter()
            .zip(&ours_in_order)
            .filter_map(|(q, p)| q.as_f64().map(|q| (p - q).abs()))
            .fold(0f64, f64::max)
    });
    let ours_ms = our_latency_ms(&o, &cargo, root, side)?;
    let report = serde_json::json!({
        "images": files.len(),
        "image_size": side,
        "onnxruntime": ort["onnxruntime"],
        "outputs": ort["outputs"],
        "map_shape": ort["map_shape"],
        "largest_abs_dp": worst,
        "tolerance": TOLERANCE,
        "decision_disagreements": disagreements,
        "largest_abs_dp_pillow_preprocessing": pillow_worst,
        "onnxruntime_latency_ms_b1": ort_ms,
        "fracture_latency_ms_b1": ours_ms,
        "build": profile,
    });
    std::fs::write(
        o.out.join("onnx-check.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let pillow_text = pillow_worst.map_or("not measured".to_string(), |d| format!("{d:.2e}"));
    let ours_text = ours_ms.map_or("not measured (debug build)".to_string(), |ms| {
        format!("{ms:.1} ms")
    });
    let md = format!(
        "| check | value |\n|---|---|\n| images (FracAtlas val) | {} |\n| ONNX Runtime | {} |\n| largest \\|ΔP\\| vs `fracture predict` | {worst:.2e} (limit {TOLERANCE:.0e}) |\n| decisions that differ | {} |\n| largest \\|ΔP\\| with Pillow's resizing instead of ours (the README's Python) | {pillow_text} |\n| latency, 1 image {side} px, ONNX Runtime CPU | {ort_ms:.1} ms |\n| latency, 1 image {side} px, fracture FP32 (`bench_step`) | {ours_text} |\n",
        files.len(),
        ort["onnxruntime"].as_str().unwrap_or("?"),
        disagreements.len(),
    );
    std::fs::write(o.out.join("onnx-check.md"), &md)?;
    println!("{md}");
    if worst > TOLERANCE || !disagreements.is_empty() {
        return Err(format!(
            "ONNX Runtime disagrees with fracture: largest |ΔP| {worst:.2e}, decisions differing on {disagreements:?}"
        )
        .into());
    }
    Ok(())
}
