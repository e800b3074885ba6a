//! The leakage audit, the built-in model's card, subgroups, shifts and calibration on real radiographs.

use super::eval_predict::assert_png;
use super::*;

#[test]
fn audit_finds_a_planted_leak_and_training_can_leave_it_out() {
    let root = fresh_dir(&base(), "audit");
    let data = root.join("data");
    write_synthetic_dataset(&data, &SyntheticSpec::train_val((12, 12), (6, 6)));
    // A val radiograph copied into train, mirrored and re-encoded as JPEG: a leak.
    let original = data.join("val/fractured/img_0002.png");
    let mirrored = image::imageops::flip_horizontal(&image::open(&original).unwrap().to_luma8());
    mirrored.save(data.join("train/fractured/leak.jpg")).unwrap();
    std::fs::write(data.join("train/not fractured/broken.png"), b"\x89PNG not really").unwrap();

    let out = root.join("audit");
    let run = fracture()
        .args(["audit", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "an unreadable file is reported, not fatal: {stderr}"
    );
    assert!(stderr.contains("broken.png"), "{stderr}");
    assert!(stdout.contains("train ↔ val"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("audit.json")).unwrap()).unwrap();
    assert_eq!(report["counts"]["unreadable"], 1);
    let leak = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g.to_string().contains("leak.jpg"))
        .unwrap_or_else(|| panic!("the leak is in no group: {report}"));
    assert!(leak.to_string().contains("img_0002.png"), "{leak}");
    assert_eq!(leak["splits"], serde_json::json!(["train", "val"]));
    let csv = std::fs::read_to_string(out.join("duplicates.csv")).unwrap();
    assert!(
        csv.starts_with("group,split,class,path,distance,exact\n"),
        "{csv}"
    );
    assert!(csv.contains("leak.jpg"));
    assert!(out.join("sheets/group-0001.png").is_file());

    // Training acts on it: --exclude-leaks leaves the copy out and says so; the run keeps the
    // training fingerprints, and eval on val warns when a model trained on the copy meets the original.
    let train = |name: &str, exclude: bool| {
        let mut cmd = tiny_train(1, &data, &root.join(name), &[]);
        if exclude {
            cmd.arg("--exclude-leaks");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // 26 listed: 24 images, the copy and the unreadable file (skipped when loading).
    let stdout = train("clean", true);
    assert!(
        stdout.contains("excluding leaks: 1 of 26 training images"),
        "{stdout}"
    );
    assert!(stdout.contains("leak.jpg"), "{stdout}");
    train("leaky", false);
    assert!(root.join("leaky/training-fingerprints.bin").is_file());
    let eval = |run: &str| {
        let out = fracture()
            .args(["eval", "--split", "val", "--model"])
            .arg(root.join(run))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(root.join(format!("{run}-eval")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let leaky = eval("leaky");
    assert!(
        leaky.contains("1 of the 12 evaluated images have a near duplicate")
            && leaky.contains("img_0002.png"),
        "{leaky}"
    );
    let clean = eval("clean");
    assert!(clean.contains("none of the 12 images"), "{clean}");

    // Both exported into one folder: each keeps its own fingerprints, tied to it by their digest,
    // so eval of the leaky export still sees the leak (it once read the clean run's file).
    let exports = root.join("exports");
    for run in ["leaky", "clean"] {
        let out = fracture()
            .args(["export", "--model"])
            .arg(root.join(run))
            .arg("--out")
            .arg(exports.join(format!("{run}.safetensors")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(exports.join(format!("{run}.fingerprints.bin")).is_file());
    }
    let leaky = eval("exports/leaky.safetensors");
    assert!(
        leaky.contains("1 of the 12 evaluated images have a near duplicate"),
        "{leaky}"
    );
    // A fingerprints file swapped for another model's is refused by name, not trusted.
    std::fs::copy(
        exports.join("clean.fingerprints.bin"),
        exports.join("leaky.fingerprints.bin"),
    )
    .unwrap();
    let swapped = eval("exports/leaky.safetensors");
    assert!(
        swapped.contains("belong to another model")
            && swapped.contains("leakage into these images is not checked"),
        "{swapped}"
    );
}

#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn the_built_in_model_reproduces_its_model_card() {
    let models = fracture_testkit::workspace_root().join("crates/fracture-cli/models");
    let size = std::fs::metadata(models.join("fracture-lite0.safetensors"))
        .unwrap()
        .len();
    assert!(size <= 10_000_000, "the ready model is {size} bytes, over 10 MB");
    let data = fracture_testkit::fracatlas();
    let root = fresh_dir(&base(), "built-in-model");
    // No --model: the model compiled into the binary, which is the committed file.
    let out = fracture()
        .args(["eval", "--split", "val", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(root.join("eval"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("none of the 512 images is a near duplicate"),
        "the ready model was trained without near copies of val: {stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("eval/report.json")).unwrap()).unwrap();
    let card = std::fs::read_to_string(models.join("README.md")).unwrap();
    for (row, key) in [
        ("ROC-AUC", "roc_auc"),
        ("Sensitivity", "sensitivity"),
        ("Specificity", "specificity"),
    ] {
        let stated = fracture_testkit::card_value(&card, row)
            .unwrap_or_else(|| panic!("the card has no `| {row} |` row"));
        let fresh = report[key].as_f64().unwrap();
        assert!(
            (stated - fresh).abs() <= 0.002,
            "{row}: the card says {stated}, a fresh evaluation {fresh}"
        );
    }
}

/// A small real validation subset: the first `fractured` fractured and `intact` intact val
/// radiographs (sorted by name), copied into `<dir>/{fractured,not fractured}`.
pub(crate) fn val_subset(
    data: &std::path::Path,
    dir: &std::path::Path,
    fractured: usize,
    intact: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for (class, count) in [("fractured", fractured), ("not fractured", intact)] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(data.join("val").join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for f in files.into_iter().take(count) {
            std::fs::copy(&f, dir.join(class).join(f.file_name().unwrap())).unwrap();
            ids.push(f.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    ids
}

#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn eval_reports_subgroups_and_acquisition_shifts_on_real_radiographs() {
    let data = fracture_testkit::fracatlas();
    let meta = data.parent().unwrap().join("fracatlas-meta.csv");
    assert!(meta.is_file(), "{} is missing", meta.display());
    let root = fresh_dir(&base(), "groups-shifts");
    let subset = root.join("val");
    let ids = val_subset(&data, &subset, 16, 32);
    let out = fracture()
        .args(["eval", "--shifts", "--groups"])
        .arg(&meta)
        .arg("--data")
        .arg(&subset)
        .arg("--out")
        .arg(root.join("eval"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("eval/report.json")).unwrap()).unwrap();
    // Group sizes as the metadata file says, counted here independently.
    let text = std::fs::read_to_string(&meta).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let hand = header.iter().position(|h| *h == "hand").unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let hands = rows
        .iter()
        .filter(|r| ids.iter().any(|id| id == r[0]) && r[hand] == "1")
        .count();
    let groups = report["groups"]["groups"].as_array().unwrap();
    let names: Vec<&str> = groups.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"hand") && names.contains(&"leg"), "{names:?}");
    assert!(
        !names.contains(&"fractured") && !names.contains(&"split"),
        "{names:?}"
    );
    let g = groups.iter().find(|g| g["name"] == "hand").unwrap();
    assert_eq!(g["n"].as_u64().unwrap() as usize, hands);
    assert_eq!(report["groups"]["unmatched"], 0);
    // A group with too few cases says so rather than printing noise.
    let thin = groups
        .iter()
        .find(|g| g["positives"].as_u64().unwrap() < 5)
        .expect("some group of 48 images has fewer than 5 fractures");
    assert!(thin["roc_auc"].is_null() && thin["note"].as_str().unwrap().contains("too few"));
    assert!(
        stdout.contains("subgroups") && stdout.contains("too few cases"),
        "{stdout}"
    );
    // Every shift of the suite, each on all 48 images, with its change of ROC-AUC.
    let shifts = report["shifts"].as_array().unwrap();
    assert_eq!(shifts.len(), 12);
    let base_auc = report["roc_auc"].as_f64().unwrap();
    for s in shifts {
        assert_eq!(s["n"], 48, "{s}");
        let auc = s["roc_auc"].as_f64().unwrap();
        let delta = s["delta_roc_auc"].as_f64().unwrap();
        assert!((auc - base_auc - delta).abs() < 1e-12);
    }
    let names: Vec<&str> = shifts.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"zoom in 60%") && names.contains(&"JPEG q30"),
        "{names:?}"
    );
    // The shifts change what the model sees: the mean P(fractured) of the fractures moves.
    let means: Vec<f64> = shifts
        .iter()
        .map(|s| s["mean_p_fractured"].as_f64().unwrap())
        .collect();
    assert!(means.iter().any(|m| (m - means[0]).abs() > 1e-3), "{means:?}");
    assert!(
        stdout.contains("acquisition shifts") && stdout.contains("zoom out 1.5x"),
        "{stdout}"
    );
    assert_png(&root.join("eval/groups.png"));
    assert_png(&root.join("eval/shifts.png"));
    // The built-in model reports calibrated probabilities.
    assert!(stdout.contains("probabilities calibrated"), "{stdout}");
}

#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn calibrate_refits_the_probabilities_and_threshold_on_real_radiographs() {
    let data = fracture_testkit::fracatlas();
    let root = fresh_dir(&base(), "calibrate");
    let subset = root.join("val");
    val_subset(&data, &subset, 20, 60);
    let model = root.join("calibrated.safetensors");
    let out = fracture()
        .args(["calibrate", "--target-sensitivity", "0.9", "--data"])
        .arg(&subset)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("calibrated on 80 images (20 fractured)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cross-fitted") && stdout.contains("F16 weights"),
        "{stdout}"
    );
    // The weights are the built-in model's, bit for bit: the file keeps their half precision.
    let built_in =
        fracture_testkit::workspace_root().join("crates/fracture-cli/models/fracture-lite0.safetensors");
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len() as i64;
    assert!(
        (size(&model) - size(&built_in)).abs() < 20_000,
        "{} vs {}",
        size(&model),
        size(&built_in)
    );
    let out = fracture()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&subset)
        .arg("--out")
        .arg(root.join("eval"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("eval/report.json")).unwrap()).unwrap();
    // On the images it was fitted on, the stored threshold keeps the target sensitivity.
    assert!(report["sensitivity"].as_f64().unwrap() >= 0.9, "{report}");
    // Fractures only: nothing to calibrate against, a clear refusal, no file written.
    let tiny = root.join("tiny");
    val_subset(&data, &tiny, 3, 0);
    let out = fracture()
        .args(["calibrate", "--data"])
        .arg(&tiny)
        .arg("--out")
        .arg(root.join("tiny.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("error:"));
    assert!(!root.join("tiny.safetensors").exists());
}
