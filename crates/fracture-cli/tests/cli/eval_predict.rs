//! `eval` and `predict` on trained runs: reports, charts, thresholds, unreadable files.

use super::*;

/// Trains a small model on generated images (once per test binary run per name) and returns its run folder.
pub(crate) fn trained_run(name: &str) -> (PathBuf, PathBuf) {
    let root = fresh_dir(&base(), name);
    let spec = SyntheticSpec {
        splits: vec![
            ("train".into(), 12, 12),
            ("val".into(), 6, 6),
            ("test".into(), 5, 7),
        ],
        ..SyntheticSpec::train_val((0, 0), (0, 0))
    };
    write_synthetic_dataset(&root.join("data"), &spec);
    let run = root.join("run");
    let out = tiny_train(2, &root.join("data"), &run, &[]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (root, run)
}

pub(crate) fn assert_png(path: &std::path::Path) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!((img.width(), img.height()), (800, 600), "{}", path.display());
}

#[test]
fn eval_writes_the_report_predictions_and_charts() {
    let (root, run) = trained_run("eval");
    let out_dir = root.join("eval-out");
    let out = fracture()
        .args(["eval", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(root.join("data"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("test: 12 images, 5 fractured"), "{stdout}");
    for row in [
        "ROC-AUC",
        "sensitivity",
        "specificity",
        "95% CI",
        "Brier score",
        "ECE",
    ] {
        assert!(stdout.contains(row), "{row} missing:\n{stdout}");
    }
    // report.json: the pinned keys.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap()).unwrap();
    let mut keys: Vec<&str> = report.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "accuracy",
            "balanced_accuracy",
            "brier",
            "ci95",
            "confusion",
            "data",
            "ece",
            "f1",
            "model",
            "n",
            "npv",
            "positives",
            "pr_auc",
            "precision",
            "recall",
            "roc_auc",
            "sensitivity",
            "skipped",
            "specificity",
            "split",
            "threshold",
            "threshold_choice",
            "tta"
        ]
    );
    let mut ci: Vec<&str> = report["ci95"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    ci.sort_unstable();
    assert_eq!(
        ci,
        [
            "accuracy",
            "f1",
            "pr_auc",
            "roc_auc",
            "sensitivity",
            "specificity"
        ]
    );
    let c = &report["confusion"];
    let total: u64 = ["tp", "fp", "tn", "fn"]
        .iter()
        .map(|k| c[k].as_u64().unwrap())
        .sum();
    assert_eq!(total, 12);
    assert_eq!(report["threshold_choice"]["source"], "stored");
    // The stored threshold is the model's.
    let stored = fracture_train::TrainedModel::load(&run, &fracture_train::candle_core::Device::Cpu)
        .unwrap()
        .threshold();
    assert_eq!(report["threshold"].as_f64().unwrap(), stored);
    // predictions.csv: a header and one row per image, labels and decisions in words.
    let csv = std::fs::read_to_string(out_dir.join("predictions.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "path,truth,p_fractured,predicted");
    assert_eq!(lines.len(), 13);
    assert!(lines[1..].iter().all(|l| l.contains("fractured")));
    for chart in [
        "confusion.png",
        "roc.png",
        "pr.png",
        "calibration.png",
        "training_curves.png",
    ] {
        assert_png(&out_dir.join(chart));
    }
}

#[test]
fn eval_takes_a_class_folder_threshold_options_and_names_missing_splits() {
    let (root, run) = trained_run("eval-options");
    // A folder whose children are class folders.
    let out = fracture()
        .args(["eval", "--threshold", "0.25", "--tta", "--model"])
        .arg(run.join("model.safetensors"))
        .arg("--data")
        .arg(root.join("data/val"))
        .arg("--out")
        .arg(root.join("flat"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("flat/report.json")).unwrap()).unwrap();
    assert_eq!(report["threshold"], 0.25);
    assert_eq!(report["tta"], true);
    assert_eq!(report["n"], 12);
    // Choosing the threshold on the evaluated images says it is optimistic.
    let out = fracture()
        .args(["eval", "--target-sensitivity", "1.0", "--split", "val", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(root.join("data"))
        .arg("--out")
        .arg(root.join("chosen"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("optimistic"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("chosen/report.json")).unwrap()).unwrap();
    assert_eq!(report["sensitivity"], 1.0);
    // A split the dataset lacks.
    std::fs::remove_dir_all(root.join("data/test")).unwrap();
    let out = fracture()
        .args(["eval", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(root.join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no test split") && stderr.contains("train, val"),
        "{stderr}"
    );
}

#[test]
fn predict_reports_unreadable_files_and_fails_only_when_nothing_is_read() {
    let (root, run) = trained_run("predict");
    let images = root.join("data/test");
    let bad = root.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("broken.jpg"), b"not a jpeg").unwrap();
    std::fs::write(bad.join("empty.png"), b"").unwrap();
    let strict = fracture()
        .args(["predict", "--format", "csv", "--model"])
        .arg(&run)
        .arg(&images)
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert_eq!(
        strict.status.code(),
        Some(1),
        "an unreadable input fails the run: {stderr}"
    );
    assert!(stderr.contains("--keep-going"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&strict.stdout).lines().count(),
        13,
        "the readable images are still predicted"
    );
    let out = fracture()
        .args(["predict", "--keep-going", "--format", "csv", "--model"])
        .arg(&run)
        .arg(&images)
        .arg(&bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    assert_eq!(
        stdout.lines().next(),
        Some("path,p_fractured,predicted,peak_x,peak_y,box_x,box_y,box_w,box_h")
    );
    assert_eq!(stdout.lines().count(), 13, "12 images and a header:\n{stdout}");
    assert!(
        stderr.contains("broken.jpg") && stderr.contains("empty.png"),
        "{stderr}"
    );
    assert!(stderr.contains("12 predicted, 2 unreadable"), "{stderr}");

    let json = fracture()
        .args(["predict", "--format", "json", "--tta", "--model"])
        .arg(&run)
        .arg(&images)
        .output()
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let preds = value["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 12);
    for p in preds {
        let prob = p["p_fractured"].as_f64().unwrap();
        let threshold = value["threshold"].as_f64().unwrap();
        let label = if prob >= threshold {
            "fractured"
        } else {
            "not fractured"
        };
        assert_eq!(p["predicted"], label);
        assert!(p.get("dicom").is_none(), "no DICOM attributes for a PNG: {p}");
    }

    // A DICOM file: its technical attributes in the JSON, and no patient attribute anywhere.
    let scans = root.join("scans");
    std::fs::create_dir_all(&scans).unwrap();
    let samples: Vec<i32> = (0..64 * 48).map(|i| (i * 7) % 4096).collect();
    let spec = fracture_testkit::dicom::DicomSpec {
        window: Some((2048.0, 4096.0)),
        photometric: "MONOCHROME1",
        ..fracture_testkit::dicom::DicomSpec::twelve_bit((64, 48))
    };
    std::fs::write(
        scans.join("scan.dcm"),
        fracture_testkit::dicom::dicom_bytes(&samples, &spec),
    )
    .unwrap();
    let json = fracture()
        .args(["predict", "--format", "json", "--model"])
        .arg(&run)
        .arg(&scans)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&json.stdout);
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dicom = &value["predictions"][0]["dicom"];
    assert_eq!(dicom["modality"], "CR", "{text}");
    assert_eq!(dicom["body_part"], "HAND");
    assert_eq!(dicom["bits_stored"], 12);
    assert_eq!(dicom["photometric"], "MONOCHROME1");
    assert!(
        dicom["transfer_syntax"]
            .as_str()
            .unwrap()
            .starts_with("1.2.840.10008.1.2.1")
    );
    assert!(dicom["window"].is_object(), "{text}");
    for secret in ["Doe", "PID-0042", "19700101", "ACC-77"] {
        assert!(!text.contains(secret), "{secret} echoed: {text}");
    }

    let table = fracture()
        .args(["predict", "--model"])
        .arg(&run)
        .arg(images.join("fractured/img_0000.png"))
        .output()
        .unwrap();
    assert!(table.status.success());
    assert!(String::from_utf8_lossy(&table.stdout).contains("img_0000.png"));

    let nothing = fracture()
        .args(["predict", "--model"])
        .arg(&run)
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(nothing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("no image could be read"));
}
