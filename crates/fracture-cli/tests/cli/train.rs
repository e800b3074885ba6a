//! `train`: options, presets, boxes, resuming.

use super::*;

#[test]
fn an_out_of_range_image_size_is_refused() {
    let root = fresh_dir(&base(), "bad-size");
    write_synthetic_dataset(&root, &SyntheticSpec::train_val((1, 1), (1, 1)));
    let out = fracture()
        .args(["inspect", "--image-size", "4", "--data"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("preprocess.size"), "{stderr}");
}

#[test]
fn train_help_explains_every_option() {
    let out = fracture().args(["train", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--data",
        "--out",
        "--epochs",
        "--batch-size",
        "--lr",
        "--image-size",
        "--arch",
        "--seed",
        "--pos-weight",
        "--resume",
        "--cpu",
        "--no-augment",
        "--patience",
        "--schedule",
        "--preset",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    // Each preset's value, read from the presets: the finetune recipe's too.
    let epochs = |p: fracture_train::Preset| p.recipe().train.epochs;
    let expected = format!(
        "[default: {}; radiograph: {}; finetune: {}]",
        epochs(fracture_train::Preset::Original),
        epochs(fracture_train::Preset::Radiograph),
        epochs(fracture_train::Preset::Finetune)
    );
    assert!(
        help.contains(&expected) && help.contains("[default: 32]"),
        "{expected} missing from:\n{help}"
    );
    assert!(
        help.contains("finetune: 1e-6]"),
        "the finetune cosine floor is missing:\n{help}"
    );
}

#[test]
fn train_runs_end_to_end_and_reports_where_it_wrote() {
    let root = fresh_dir(&base(), "train-synthetic");
    write_synthetic_dataset(&root.join("data"), &SyntheticSpec::train_val((6, 10), (4, 4)));
    std::fs::write(
        root.join("data/train/fractured/corrupt.jpg"),
        b"\xff\xd8\xff garbage",
    )
    .unwrap();
    let out_dir = root.join("run");
    let out = tiny_train(2, &root.join("data"), &out_dir, &[]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("warning: skipped") && stdout.contains("corrupt.jpg"),
        "{stdout}"
    );
    assert!(stdout.contains("epoch 2: train loss"), "{stdout}");
    assert!(stdout.contains("finished: 2 epochs"), "{stdout}");
    for line in ["model:", "checkpoint:", "metrics:", "report:"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(line) && l.contains(out_dir.to_str().unwrap())),
            "{line}\n{stdout}"
        );
    }
    // A second run into the same folder refuses to overwrite it.
    let again = fracture()
        .args(["train", "--epochs", "1", "--image-size", "24", "--data"])
        .arg(root.join("data"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
}

/// `--preset radiograph` trains the residual network with letterboxed inputs, class weighting and
/// its augmentation; an explicit option (here the size and epochs) overrides the preset.
#[test]
fn the_radiograph_preset_trains_the_residual_network() {
    let root = fresh_dir(&base(), "preset");
    write_synthetic_dataset(&root.join("data"), &SyntheticSpec::train_val((6, 10), (4, 4)));
    let run = root.join("run");
    let out = fracture()
        .args([
            "train",
            "--preset",
            "radiograph",
            "--epochs",
            "2",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--data",
        ])
        .arg(root.join("data"))
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("training resnet (radiograph preset) at 32×32"),
        "{stdout}"
    );
    assert!(stdout.contains("positive-class weight (auto)"), "{stdout}");
    assert!(stdout.contains("finished: 2 epochs"), "{stdout}");
    // The weight file's header names the architecture, the letterbox and the preset's augmentation.
    let bytes = std::fs::read(run.join("model.safetensors")).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&bytes[8..8 + len]);
    for needle in ["resnet", "letterbox", "stem.bn.running_var", "gamma"] {
        assert!(header.contains(needle), "{needle} missing from the header");
    }
    let eval = fracture()
        .args(["eval", "--tta", "--split", "val", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(root.join("data"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&eval.stdout);
    assert!(
        eval.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    assert!(text.contains("TTA"), "{text}");
}

/// Without the pretrained weights the finetune preset stops at once and says how to get them.
#[test]
fn the_finetune_preset_without_weights_says_how_to_get_them() {
    let root = fresh_dir(&base(), "finetune-missing");
    write_synthetic_dataset(&root.join("data"), &SyntheticSpec::train_val((2, 2), (2, 2)));
    let out = fracture()
        .args(["train", "--preset", "finetune", "--data-dir"])
        .arg(root.join("nowhere"))
        .arg("--data")
        .arg(root.join("data"))
        .arg("--out")
        .arg(root.join("run"))
        .env_remove("FRACTURE_PRETRAINED")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cargo xtask pretrained")
            && stderr.contains("--pretrained")
            && stderr.contains("nowhere/pretrained/efficientnet-lite0-57934424.pth"),
        "{stderr}"
    );
    assert!(!root.join("run/checkpoints").exists(), "nothing is started");
}

/// The finetune preset end to end at 32 px from a pretrained backbone file (a seeded network's,
/// as safetensors): it trains, records the weights it started from, and `eval`, `predict` (with
/// heatmaps) work on the model file.
/// A seeded EfficientNet-Lite0 backbone (no `head.*`) written as `<root>/lite0.safetensors`: a
/// stand-in for the ImageNet weights that `--pretrained` reads.
pub(crate) fn seeded_backbone(root: &std::path::Path) -> PathBuf {
    use fracture_train::model::{Model, ModelConfig};
    let backbone = Model::new(
        &ModelConfig::efficientnet_lite0(32),
        5,
        &fracture_train::candle_core::Device::Cpu,
    )
    .unwrap();
    let tensors: Vec<(String, fracture_train::candle_core::Tensor)> = backbone
        .named_vars()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("head."))
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let weights = root.join("lite0.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &weights).unwrap();
    weights
}

#[test]
fn the_finetune_preset_trains_evaluates_and_explains() {
    let root = fresh_dir(&base(), "finetune");
    write_synthetic_dataset(&root.join("data"), &SyntheticSpec::train_val((6, 10), (4, 4)));
    let weights = seeded_backbone(&root);
    let run = root.join("run");
    let out = fracture()
        .args([
            "train",
            "--preset",
            "finetune",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--pretrained",
        ])
        .arg(&weights)
        .arg("--data")
        .arg(root.join("data"))
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("training efficientnet-lite0 (finetune preset) at 32×32"),
        "{stdout}"
    );
    assert!(
        stdout.contains("backbone from") && stdout.contains("lite0.safetensors"),
        "{stdout}"
    );
    let bytes = std::fs::read(run.join("model.safetensors")).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&bytes[8..8 + len]);
    for needle in [
        "efficientnet_lite0",
        "fracture.pretrained",
        "lite0.safetensors",
        "_blocks.15._project_conv.weight",
    ] {
        assert!(header.contains(needle), "{needle} missing from the header");
    }
    let eval = fracture()
        .args(["eval", "--split", "val", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(root.join("data"))
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let heatmaps = root.join("heatmaps");
    let predict = fracture()
        .args(["predict", "--format", "json", "--model"])
        .arg(&run)
        .arg(root.join("data/val/fractured"))
        .arg("--heatmap")
        .arg(&heatmaps)
        .output()
        .unwrap();
    assert!(
        predict.status.success(),
        "{}",
        String::from_utf8_lossy(&predict.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&predict.stdout).unwrap();
    assert!(json.to_string().contains("p_fractured"), "{json}");
    assert_eq!(std::fs::read_dir(&heatmaps).unwrap().count(), 4);
    // Each prediction says where its evidence lies: a peak inside its box, in the image's pixels.
    let rows = json["predictions"].as_array().unwrap();
    assert!(rows.iter().all(|r| r.get("evidence").is_some()), "{json}");
    for row in rows.iter().filter(|r| !r["evidence"].is_null()) {
        let e = &row["evidence"];
        let num = |v: &serde_json::Value| v.as_f64().unwrap();
        let (px, py) = (num(&e["peak"][0]), num(&e["peak"][1]));
        let b: Vec<f64> = e["box"].as_array().unwrap().iter().map(num).collect();
        assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] > 0.0 && b[3] > 0.0, "{row}");
        assert!(
            b[0] <= px && px <= b[0] + b[2] && b[1] <= py && py <= b[1] + b[3],
            "{row}"
        );
    }
    // The CSV carries the same as columns; --no-evidence leaves them out.
    let csv = fracture()
        .args(["predict", "--format", "csv", "--model"])
        .arg(&run)
        .arg(root.join("data/val/fractured"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&csv.stdout);
    assert!(
        text.starts_with("path,p_fractured,predicted,peak_x,peak_y,box_x,box_y,box_w,box_h\n"),
        "{text}"
    );
    let plain = fracture()
        .args(["predict", "--format", "csv", "--no-evidence", "--model"])
        .arg(&run)
        .arg(root.join("data/val/fractured"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&plain.stdout).starts_with("path,p_fractured,predicted\n"));
}

/// `train --boxes` gives the finetune network a localization head, whose map is then the evidence
/// of `predict` and of `eval --boxes`; boxes a run cannot use are refused before training.
#[test]
fn boxes_train_a_localization_head_that_gives_the_evidence() {
    let root = fresh_dir(&base(), "boxes");
    let data = root.join("data");
    write_synthetic_dataset(&data, &SyntheticSpec::train_val((6, 6), (3, 3)));
    // A box over the middle of every fractured image (48 px), in the `fracatlas-boxes.csv` format.
    let mut csv = String::from("id,split,x,y,w,h\n");
    for split in ["train", "val"] {
        for entry in std::fs::read_dir(data.join(split).join("fractured")).unwrap() {
            let path = entry.unwrap().path();
            let id = path.file_stem().unwrap().to_string_lossy().into_owned();
            csv.push_str(&format!("{id},{split},12,16,20,14\n"));
        }
    }
    let boxes = root.join("boxes.csv");
    std::fs::write(&boxes, csv).unwrap();
    let run = root.join("run");
    let train = |preset: &str, out: &std::path::Path, extra: &[&str]| {
        fracture()
            .args([
                "train",
                "--preset",
                preset,
                "--epochs",
                "1",
                "--image-size",
                "32",
                "--batch-size",
                "6",
            ])
            .args(extra)
            .arg("--data")
            .arg(&data)
            .arg("--boxes")
            .arg(&boxes)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    // The original network has no head to train: refused, naming the preset that has one.
    let refused = train("original", &root.join("seed"), &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("--preset finetune"),
        "{stderr}"
    );
    // A weight without boxes is a usage error.
    let usage = fracture().args(["train", "--box-weight", "2"]).output().unwrap();
    assert!(String::from_utf8_lossy(&usage.stderr).contains("--boxes"));
    // The finetune preset, its backbone from a seeded network written as a weight file.
    let weights = seeded_backbone(&root).to_string_lossy().into_owned();
    let out = train("finetune", &run, &["--pretrained", &weights]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        format!("{stdout}{stderr}")
            .contains("boxes on 6 fractured training images (0 fractured without boxes, 6 not fractured)"),
        "{stdout}\n{stderr}"
    );
    let bytes = std::fs::read(run.join("model.safetensors")).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&bytes[8..8 + len]);
    for needle in ["head.loc.conv1.weight", "localization_head", "boxes.csv"] {
        assert!(header.contains(needle), "{needle} missing from the header");
    }
    let predict = fracture()
        .args(["predict", "--format", "json", "--model"])
        .arg(&run)
        .arg(data.join("val/fractured"))
        .output()
        .unwrap();
    assert!(
        predict.status.success(),
        "{}",
        String::from_utf8_lossy(&predict.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&predict.stdout).unwrap();
    let rows = json["predictions"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["evidence"]["peak"].is_array()), "{json}");
    let eval_dir = root.join("eval");
    let eval = fracture()
        .args(["eval", "--split", "val", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(&data)
        .arg("--boxes")
        .arg(&boxes)
        .arg("--out")
        .arg(&eval_dir)
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval_dir.join("localization.json")).unwrap()).unwrap();
    assert_eq!(report["report"]["n"].as_u64(), Some(3), "{report}");
    assert_eq!(report["map"], "Head", "{report}");
}

/// A training process killed with SIGKILL in the middle of epoch 2 resumes from its epoch-1
/// checkpoint and ends with the same weights as a run that was never interrupted.
#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn a_run_killed_mid_epoch_resumes_from_its_last_checkpoint() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let data = fracture_testkit::fracatlas();
    let root = fresh_dir(&base(), "killed");
    let args = [
        "train",
        "--epochs",
        "2",
        "--image-size",
        "24",
        "--batch-size",
        "64",
        "--cpu",
    ];
    let killed = root.join("killed");
    let mut child = fracture()
        .args(args)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&killed)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let reader = BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        let mid_epoch_2 = line.contains("epoch 2 step");
        seen.push(line);
        if mid_epoch_2 {
            child.kill().unwrap(); // SIGKILL on Unix
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child should have been killed: {seen:?}");
    let checkpoint = killed.join(fracture_train::run::CHECKPOINT_FILE);
    let dev = fracture_train::candle_core::Device::Cpu;
    let (meta, _) = fracture_train::checkpoint::read_checkpoint(&checkpoint, &dev).unwrap();
    assert_eq!(meta.epoch, 1, "the checkpoint of epoch 1 survives the kill");

    let resumed = fracture()
        .args(args)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&killed)
        .arg("--resume")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(text.contains("resuming after epoch 1"), "{text}");
    assert!(
        !text.contains("epoch 1/2"),
        "epoch 1 is not trained again: {text}"
    );

    let whole = root.join("whole");
    let straight = fracture()
        .args(args)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&whole)
        .output()
        .unwrap();
    assert!(straight.status.success());
    let (_, a) =
        fracture_train::checkpoint::read_checkpoint(&whole.join(fracture_train::run::CHECKPOINT_FILE), &dev)
            .unwrap();
    let (meta_b, b) = fracture_train::checkpoint::read_checkpoint(&checkpoint, &dev).unwrap();
    assert_eq!(meta_b.epoch, 2);
    for (name, ta) in &a {
        let diff = (ta - &b[name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-6, "{name} differs by {diff}");
    }
}
