//! `cargo xtask default-model`: trains the ready model of `crates/fracture-cli/models/` from the shared data with the
//! recorded command and seed, stores it in half precision, fits its calibration and threshold on
//! val with the weights that ship, measures what half precision changes, and checks the model card's numbers against a fresh evaluation of the committed file.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{DynError, status};

/// The model file and its card, relative to the project root.
pub(crate) const MODEL: &str = "crates/fracture-cli/models/fracture-lite0.safetensors";
const CARD: &str = "crates/fracture-cli/models/README.md";
/// The card rows checked against a fresh evaluation: (row label, report.json key).
const CARD_ROWS: [(&str, &str); 5] = [
    ("ROC-AUC", "roc_auc"),
    ("PR-AUC", "pr_auc"),
    ("Sensitivity", "sensitivity"),
    ("Specificity", "specificity"),
    ("Threshold", "threshold"),
];
/// Largest allowed difference between a card number and the fresh evaluation.
const TOLERANCE: f64 = 0.002;

/// The augmentation overrides of the ready model's recipe (`fracture train --augment`).
pub(crate) const RECIPE_AUGMENT: &str =
    "zoom=0.65:1.7,shift=0.1,fill=0,noise=0.04,blur=1.0,jpeg=40,resolution=0.5";

/// The training command's arguments after `fracture`, with `shared` the shared folder.
pub(crate) fn train_args(shared: &Path, out: &Path) -> Vec<String> {
    let s = |p: &str| shared.join(p).display().to_string();
    vec![
        "train".into(),
        "--preset".into(),
        "finetune".into(),
        "--data".into(),
        s("data/fracatlas"),
        "--extra-train".into(),
        s("data/fracatlas-extra"),
        "--exclude-leaks".into(),
        "--epochs".into(),
        "8".into(),
        "--boxes".into(),
        s("data/fracatlas-boxes.csv"),
        "--pretrained".into(),
        s(&format!("pretrained/{}", crate::pretrained::FILE)),
        "--seed".into(),
        "42".into(),
        // Wider zoom and the acquisition shifts (noise, blur, JPEG, resolution) in training, so the
        // model holds up when the framing or the scanner changes.
        "--augment".into(),
        RECIPE_AUGMENT.into(),
        "--out".into(),
        out.display().to_string(),
    ]
}

pub(crate) fn run(args: &[String], root: &Path) -> Result<(), DynError> {
    let mut check_only = false;
    // Relative to the project root, where every command below runs, so that the model file records
    // `../shared/...` and not a path of this machine.
    let mut shared = PathBuf::from("../shared");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--check-only" => check_only = true,
            "--shared" => shared = PathBuf::from(it.next().ok_or("--shared needs a folder")?),
            other => {
                return Err(format!(
                    "unknown argument `{other}` (default-model [--check-only] [--shared DIR])"
                )
                .into());
            }
        }
    }
    if !root.join(&shared).join("data/fracatlas").is_dir() {
        return Err(format!(
            "the FracAtlas radiographs are not at {}/data/fracatlas",
            shared.display()
        )
        .into());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Without the bundled model, so that the binary builds before the model file exists.
    status(Command::new(&cargo).current_dir(root).args([
        "build",
        "--release",
        "-p",
        "fracture-cli",
        "--no-default-features",
    ]))?;
    let fracture = root.join("target/release/fracture");
    let work = root.join("target/default-model");
    let run_dir = work.join("run");
    let model = root.join(MODEL);
    if !check_only {
        train_and_export(&fracture, root, &shared, &work, &model)?;
    }
    let evaluate = |model: &Path, name: &str| -> Result<(serde_json::Value, Vec<f64>), DynError> {
        let out = work.join(name);
        status(
            Command::new(&fracture)
                .current_dir(root)
                .args(["eval", "--split", "val", "--model"])
                .arg(model)
                .arg("--data")
                .arg(shared.join("data/fracatlas"))
                .arg("--out")
                .arg(&out),
        )?;
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json"))?)?;
        let csv = std::fs::read_to_string(out.join("predictions.csv"))?;
        let p = csv
            .lines()
            .skip(1)
            .map(|l| {
                l.rsplit(',')
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| format!("unreadable row in predictions.csv: {l}"))
            })
            .collect::<Result<Vec<f64>, String>>()?;
        Ok((report, p))
    };
    let (half, p_half) = evaluate(&model, "eval-f16")?;
    let size = std::fs::metadata(&model)?.len();
    println!("{MODEL}: {:.2} MB", size as f64 / 1e6);
    if size > 10_000_000 {
        return Err(format!("{MODEL} is {size} bytes, over the 10 MB budget").into());
    }
    if run_dir.join("model.safetensors").is_file() {
        let (full, p_full) = evaluate(&run_dir, "eval-f32")?;
        let max_diff = p_full
            .iter()
            .zip(&p_half)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        println!(
            "half precision: val ROC-AUC {:.4} (F32 {:.4}); largest P(fractured) difference over {} val images {max_diff:.5}",
            half["roc_auc"].as_f64().unwrap_or(f64::NAN),
            full["roc_auc"].as_f64().unwrap_or(f64::NAN),
            p_half.len()
        );
    }
    check_card(root, &half)?;
    println!("{CARD} agrees with a fresh evaluation of {MODEL} (within {TOLERANCE})");
    Ok(())
}

/// Trains the ready model with the recorded command into `work/run`, exports it in half precision
/// to `model` and fits its calibration and threshold again on the weights that ship.
fn train_and_export(
    fracture: &Path,
    root: &Path,
    shared: &Path,
    work: &Path,
    model: &Path,
) -> Result<(), DynError> {
    let run_dir = work.join("run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)?;
    }
    std::fs::create_dir_all(work)?;
    println!("training: fracture {}", train_args(shared, &run_dir).join(" "));
    status(
        Command::new(fracture)
            .current_dir(root)
            .args(train_args(shared, &run_dir)),
    )?;
    status(
        Command::new(fracture)
            .current_dir(root)
            .args(["export", "--model"])
            .arg(&run_dir)
            .arg("--out")
            .arg(model),
    )?;
    // Training fitted the calibration and chose the threshold on the val scores of the F32
    // weights; fit both again, by the same rule, on the val scores of the weights that ship.
    let rule = std::fs::read_to_string(run_dir.join("report.json"))?;
    let rule: serde_json::Value = serde_json::from_str(&rule)?;
    let target = rule["threshold_rule"]["target"]
        .as_f64()
        .ok_or("the run's report.json has no target-sensitivity threshold rule")?;
    status(
        Command::new(fracture)
            .current_dir(root)
            .args(["calibrate", "--split", "val", "--model"])
            .arg(model)
            .arg("--data")
            .arg(shared.join("data/fracatlas"))
            .args(["--target-sensitivity", &target.to_string(), "--out"])
            .arg(model),
    )?;
    Ok(())
}

/// Each row of the model card against a fresh evaluation's report (`half`): an error naming the
/// rows that differ by more than [`TOLERANCE`].
fn check_card(root: &Path, half: &serde_json::Value) -> Result<(), DynError> {
    let card = std::fs::read_to_string(root.join(CARD))?;
    let mut wrong = Vec::new();
    for (row, key) in CARD_ROWS {
        let stated = fracture_testkit::card_value(&card, row)
            .ok_or_else(|| format!("{CARD} has no `| {row} |` row"))?;
        let fresh = half[key]
            .as_f64()
            .ok_or_else(|| format!("report.json has no {key}"))?;
        let ok = (stated - fresh).abs() <= TOLERANCE;
        println!(
            "{row:<12} card {stated:.3}  fresh {fresh:.4}  {}",
            if ok { "ok" } else { "DIFFERS" }
        );
        if !ok {
            wrong.push(row);
        }
    }
    if !wrong.is_empty() {
        return Err(format!("{CARD} disagrees with a fresh evaluation: {}", wrong.join(", ")).into());
    }
    Ok(())
}
