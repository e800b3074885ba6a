//! `cargo xtask gpu-check`: the GPU build proven in one prepared run. Builds the `fracture` binary
//! (with `--features cuda` for a CUDA device), trains a recipe for a few epochs on the shared
//! radiographs on the device, evaluates the model on val on the device and on the CPU (ROC-AUC of
//! each, per-image |ΔP|, evaluation time), times EfficientNet-Lite0's train step and inference
//! (`bench_step`) at each size and batch on the device and the first of them on the CPU, and
//! writes the figures to
//! `OUT/gpu-check.json` and `OUT/gpu-check.md` (the table the builds page is filled from).
//!
//! `--device cpu` runs the same steps with the CPU as "the device": the dry run `.ci/run` uses to
//! keep this script working on machines without a GPU (`--debug-build` there, to reuse the test
//! build instead of compiling a release binary).
//!
//! `--prebuilt DIR` skips the build and runs `DIR/fracture` and `DIR/bench_step`: for a GPU machine
//! without a Rust toolchain, with binaries built elsewhere (`setup-cuda`'s link stubs let them link
//! without the driver).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::{DynError, status};

/// Largest allowed difference between the device's and the CPU's val ROC-AUC.
const AUC_TOLERANCE: f64 = 0.005;

/// What `gpu-check` is asked to do.
struct Options {
    device: String,
    preset: String,
    epochs: u32,
    shared: PathBuf,
    out: PathBuf,
    debug_build: bool,
    prebuilt: Option<PathBuf>,
    sizes: Vec<u32>,
    batches: Vec<u32>,
    iters: u32,
}

fn parse(args: &[String], root: &Path) -> Result<Options, DynError> {
    let mut o = Options {
        device: "cuda".into(),
        preset: "finetune".into(),
        epochs: 1,
        shared: PathBuf::from("../shared"),
        out: root.join("target/gpu-check"),
        debug_build: false,
        prebuilt: None,
        sizes: vec![224, 448],
        batches: vec![32, 128],
        iters: 5,
    };
    let list = |v: String| -> Result<Vec<u32>, DynError> {
        v.split(',')
            .map(|x| x.trim().parse::<u32>().map_err(Into::into))
            .collect()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--device" => o.device = value("--device")?,
            "--preset" => o.preset = value("--preset")?,
            "--epochs" => o.epochs = value("--epochs")?.parse()?,
            "--shared" => o.shared = PathBuf::from(value("--shared")?),
            "--out" => o.out = PathBuf::from(value("--out")?),
            "--debug-build" => o.debug_build = true,
            "--prebuilt" => o.prebuilt = Some(PathBuf::from(value("--prebuilt")?)),
            "--sizes" => o.sizes = list(value("--sizes")?)?,
            "--batches" => o.batches = list(value("--batches")?)?,
            "--iters" => o.iters = value("--iters")?.parse()?,
            other => return Err(format!("gpu-check: unknown argument `{other}`").into()),
        }
    }
    if !(o.device == "cpu" || o.device.starts_with("cuda")) {
        return Err(format!("gpu-check: --device {} is not cpu or cuda[:N]", o.device).into());
    }
    Ok(o)
}

/// Runs `cmd` (printed first) and returns its wall time in seconds.
fn timed(cmd: &mut Command) -> Result<f64, DynError> {
    let start = Instant::now();
    status(cmd)?;
    Ok(start.elapsed().as_secs_f64())
}

/// `path → p_fractured` from an evaluation's predictions.csv, sorted by path.
fn probabilities(csv_path: &Path) -> Result<Vec<(String, f64)>, DynError> {
    let mut reader = csv::Reader::from_path(csv_path).map_err(|e| format!("{}: {e}", csv_path.display()))?;
    let header = reader.headers()?.clone();
    let column = |name: &str| {
        header
            .iter()
            .position(|c| c == name)
            .ok_or(format!("{}: no {name} column", csv_path.display()))
    };
    let (path, p) = (column("path")?, column("p_fractured")?);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record?;
        let (name, value) = (record.get(path), record.get(p));
        let (Some(name), Some(value)) = (name, value) else {
            return Err(format!("{}: a short row", csv_path.display()).into());
        };
        rows.push((name.to_string(), value.parse::<f64>()?));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(rows)
}

/// The largest and the median absolute difference between two runs' P over the same images.
fn differences(a: &[(String, f64)], b: &[(String, f64)]) -> Result<(f64, f64), DynError> {
    if a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.0 != y.0) {
        return Err("the device's and the CPU's predictions are not over the same images".into());
    }
    let mut d: Vec<f64> = a.iter().zip(b).map(|(x, y)| (x.1 - y.1).abs()).collect();
    d.sort_by(f64::total_cmp);
    let max = d.last().copied().unwrap_or(0.0);
    let median = d.get(d.len() / 2).copied().unwrap_or(0.0);
    Ok((max, median))
}

/// One evaluation: the device, val ROC-AUC, seconds, and P(fractured) per image.
type Evaluation = (String, f64, f64, Vec<(String, f64)>);
/// One timing: mode, size, batch, images/s on the device and (for the first) on the CPU.
type Step = (&'static str, u32, u32, f64, Option<f64>);

/// Writes `gpu-check.json` and `gpu-check.md` into `o.out` and prints the table; returns the
/// ROC-AUC difference between the device (`evals[0]`) and the CPU (`evals[1]`).
fn write_results(
    o: &Options,
    build_s: f64,
    train_s: f64,
    evals: &[Evaluation],
    steps: &[Step],
) -> Result<f64, DynError> {
    let (max_dp, median_dp) = differences(&evals[0].3, &evals[1].3)?;
    let images = evals[0].3.len();
    let auc_gap = (evals[0].1 - evals[1].1).abs();
    let summary = serde_json::json!({
        "device": o.device,
        "preset": o.preset,
        "epochs": o.epochs,
        "build_seconds": build_s,
        "train_seconds": train_s,
        "val_images": images,
        "roc_auc": { "device": evals[0].1, "cpu": evals[1].1, "difference": auc_gap },
        "p_fractured_difference": { "max": max_dp, "median": median_dp },
        "eval_seconds": { "device": evals[0].2, "cpu": evals[1].2 },
        "images_per_second": steps
            .iter()
            .map(|(mode, size, batch, dev, cpu)| serde_json::json!({
                "mode": mode, "size": size, "batch": batch, "device": dev, "cpu": cpu,
            }))
            .collect::<Vec<_>>(),
    });
    let table = format!(
        "| gpu-check, {device}, {preset} × {epochs} epoch(s) | value |\n|---|---|\n\
         | build | {build_s:.0} s |\n| train | {train_s:.1} s |\n\
         | val ROC-AUC, {device} / CPU | {a:.4} / {b:.4} (difference {auc_gap:.4}) |\n\
         | per-image \\|ΔP\\|, max / median ({images} images) | {max_dp:.2e} / {median_dp:.2e} |\n\
         | eval over val, {device} / CPU | {ea:.1} s / {eb:.1} s ({ratio:.1}×) |\n",
        device = o.device,
        preset = o.preset,
        epochs = o.epochs,
        a = evals[0].1,
        b = evals[1].1,
        ea = evals[0].2,
        eb = evals[1].2,
        ratio = evals[1].2 / evals[0].2.max(1e-9),
    );
    let mut table = table;
    for (mode, size, batch, dev, cpu) in steps {
        let what = if *mode == "train" {
            "train step"
        } else {
            "inference"
        };
        let cpu = cpu.map_or(String::new(), |c| {
            format!(" vs CPU {c:.1} ({:.1}×)", dev / c.max(1e-9))
        });
        table.push_str(&format!(
            "| {what}, {size} px, batch {batch} (img/s) | {dev:.1}{cpu} |\n"
        ));
    }
    std::fs::write(
        o.out.join("gpu-check.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    std::fs::write(o.out.join("gpu-check.md"), &table)?;
    println!("{table}");
    Ok(auc_gap)
}

pub(crate) fn run(args: &[String], root: &Path) -> Result<(), DynError> {
    let o = parse(args, root)?;
    let data = o.shared.join("data/fracatlas");
    if !root.join(&data).is_dir() {
        return Err(format!("the FracAtlas radiographs are not at {}", data.display()).into());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build_s = 0.0;
    let cuda = o.device.starts_with("cuda");
    let packages: &[(&str, Option<&str>)] = if o.prebuilt.is_some() {
        &[]
    } else if o.debug_build && !cuda {
        // The binaries of `cargo test --workspace` (the same selection's features), so a run after
        // the tests compiles nothing; `-p` alone would resolve other features and rebuild candle.
        build_s += timed(Command::new(&cargo).current_dir(root).args(crate::TEST_BUILD))?;
        &[]
    } else {
        &[("fracture-cli", None), ("fracture-benches", Some("bench_step"))]
    };
    for &(package, example) in packages {
        let mut build = Command::new(&cargo);
        build.current_dir(root).args(["build", "-p", package]);
        if let Some(example) = example {
            build.args(["--example", example]);
        }
        if !o.debug_build {
            build.arg("--release");
        }
        if cuda {
            build.args(["--features", "cuda"]);
        }
        build_s += timed(&mut build)?;
    }
    let (bench_step, fracture) = match &o.prebuilt {
        Some(dir) => (dir.join("bench_step"), dir.join("fracture")),
        None if o.debug_build => (
            root.join("target/debug/examples/bench_step"),
            root.join("target/debug/fracture"),
        ),
        None => (
            root.join("target/release/examples/bench_step"),
            root.join("target/release/fracture"),
        ),
    };
    if o.out.exists() {
        std::fs::remove_dir_all(&o.out)?;
    }
    std::fs::create_dir_all(&o.out)?;
    let run_dir = o.out.join("run");
    let mut train = Command::new(&fracture);
    train
        .current_dir(root)
        .args(["train", "--preset", &o.preset, "--epochs", &o.epochs.to_string()])
        .args(["--device", &o.device, "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&run_dir);
    if o.preset == "finetune" {
        train
            .arg("--pretrained")
            .arg(o.shared.join("pretrained").join(crate::pretrained::FILE));
    }
    let train_s = timed(&mut train)?;
    let mut evals = Vec::new();
    for device in [o.device.as_str(), "cpu"] {
        let dir = o.out.join(format!("eval-{}", device.replace(':', "-")));
        let seconds = timed(
            Command::new(&fracture)
                .current_dir(root)
                .args(["eval", "--split", "val", "--device", device, "--model"])
                .arg(&run_dir)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&dir),
        )?;
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json"))?)?;
        let auc = report["roc_auc"].as_f64().ok_or("report.json has no roc_auc")?;
        evals.push((
            device.to_string(),
            auc,
            seconds,
            probabilities(&dir.join("predictions.csv"))?,
        ));
    }
    // EfficientNet-Lite0's train step and inference on random data: every size × batch on the
    // device, the first of each on the CPU too (our kernels), for the ratio.
    let mut steps = Vec::new();
    let rate = |mode: &str, size: u32, batch: u32, device: &str| -> Result<f64, DynError> {
        crate::result_rate(
            Command::new(&bench_step)
                .current_dir(root)
                .args([mode, &size.to_string(), &batch.to_string(), &o.iters.to_string()])
                .args(["--arch", "efficientnet-lite0", "--device", device]),
        )
    };
    for mode in ["train", "infer"] {
        for (i, &size) in o.sizes.iter().enumerate() {
            for (j, &batch) in o.batches.iter().enumerate() {
                let on_device = rate(mode, size, batch, &o.device)?;
                let on_cpu = if i == 0 && j == 0 {
                    Some(rate(mode, size, batch, "cpu")?)
                } else {
                    None
                };
                println!(
                    "{mode} {size} px batch {batch}: {on_device:.1} img/s on {}",
                    o.device
                );
                steps.push((mode, size, batch, on_device, on_cpu));
            }
        }
    }
    let auc_gap = write_results(&o, build_s, train_s, &evals, &steps)?;
    if auc_gap > AUC_TOLERANCE {
        return Err(format!(
            "the device's val ROC-AUC differs from the CPU's by {auc_gap:.4} (allowed {AUC_TOLERANCE})"
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_pair_images_and_refuse_mismatches() {
        let a = vec![
            ("a".to_string(), 0.5),
            ("b".to_string(), 0.25),
            ("c".to_string(), 0.0),
        ];
        let b = vec![
            ("a".to_string(), 0.5),
            ("b".to_string(), 0.5),
            ("c".to_string(), 0.125),
        ];
        assert_eq!(differences(&a, &b).unwrap(), (0.25, 0.125));
        assert!(differences(&a, &b[..2]).is_err());
    }

    #[test]
    fn options_refuse_unknown_devices() {
        let root = Path::new("/x");
        assert!(parse(&["--device".into(), "tpu".into()], root).is_err());
        let o = parse(
            &["--device".into(), "cuda:1".into(), "--epochs".into(), "2".into()],
            root,
        )
        .unwrap();
        assert_eq!((o.device.as_str(), o.epochs), ("cuda:1", 2));
    }
}
