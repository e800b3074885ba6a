//! Evaluation on the real radiographs, and `train` fetching its data first.

use super::eval_predict::assert_png;
use super::*;

#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn eval_on_the_real_radiographs_with_a_briefly_trained_model() {
    let data = fracture_testkit::fracatlas();
    let root = fresh_dir(&base(), "eval-fracatlas");
    let run = root.join("run");
    let out = fracture()
        .args([
            "train",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "64",
            "--pos-weight",
            "auto",
            "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = fracture()
        .args(["eval", "--split", "val", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("val: 512 images, 88 fractured"), "{stdout}");
    for chart in [
        "confusion.png",
        "roc.png",
        "pr.png",
        "calibration.png",
        "training_curves.png",
    ] {
        assert_png(&run.join("eval-val").join(chart));
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval-val/report.json")).unwrap()).unwrap();
    // The stored threshold was chosen on these same validation images for sensitivity ≥ 0.90.
    assert!(report["sensitivity"].as_f64().unwrap() >= 0.9, "{report}");
    let predict = fracture()
        .args(["predict", "--model"])
        .arg(&run)
        .arg(data.join("val/fractured"))
        .output()
        .unwrap();
    assert!(predict.status.success());
    assert_eq!(String::from_utf8_lossy(&predict.stdout).lines().count(), 89);

    // Localization against the radiologists' boxes: all 88 fractured val images have boxes; the
    // report, the per-image scores and the contact sheet agree with each other.
    let boxes = data.join("../fracatlas-boxes.csv");
    let out = fracture()
        .args(["eval", "--split", "val", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(&data)
        .arg("--boxes")
        .arg(&boxes)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("localization: 88 fractured images with boxes (0 without)"),
        "{stdout}"
    );
    let found: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval-val/localization.json")).unwrap())
            .unwrap();
    let images = found["images"].as_array().unwrap();
    assert_eq!((found["report"]["n"].as_u64(), images.len()), (Some(88), 88));
    let hits = images.iter().filter(|i| i["score"]["hit"] == true).count();
    let rate = found["report"]["pointing_game"].as_f64().unwrap();
    assert!((rate - hits as f64 / 88.0).abs() < 1e-12, "{rate} vs {hits}");
    for img in images {
        // Every peak lies inside its own evidence box, inside the 640 × 640 image.
        if let Some(e) = img["evidence"].as_object() {
            let (p, b) = (&e["peak"], &e["box"]);
            let v = |x: &serde_json::Value| x.as_f64().unwrap();
            assert!(
                v(&b[0]) <= v(&p[0]) && v(&p[0]) <= v(&b[0]) + v(&b[2]) && v(&b[0]) + v(&b[2]) <= 640.0,
                "{img}"
            );
        }
    }
    let sheet = image::open(run.join("eval-val/contact_sheet.png")).unwrap();
    assert_eq!(
        (sheet.width(), sheet.height()),
        (6 * 260 + 4, 4 * (260 + fracture_plot::CAPTION_HEIGHT) + 4),
        "24 tiles, 6 per row, each with its file name below"
    );
}

/// With no `--data`, `fracture train` downloads the dataset through fracture-fetch (here from a
/// Kaggle stand-in on loopback), trains, evaluates on the test split and says where the report is.
#[test]
fn train_without_data_downloads_the_dataset_first() {
    use fracture_testkit::{KaggleStub, StubOptions, kaggle_shaped_zip};
    let stub = KaggleStub::start(StubOptions {
        datasets: vec![(
            fracture_fetch::DEFAULT_DATASET.to_string(),
            kaggle_shaped_zip(6, 32),
        )],
        ..StubOptions::default()
    })
    .unwrap();
    let root = fresh_dir(&base(), "download-train");
    let run = root.join("run");
    let out = fracture()
        .args([
            "train",
            "--epochs",
            "1",
            "--image-size",
            "24",
            "--batch-size",
            "8",
            "--out",
        ])
        .arg(&run)
        .env("FRACTURE_KAGGLE_BASE_URL", &stub.base_url)
        .env("FRACTURE_DATA_DIR", root.join("data"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("downloaded bmadushanirodrigo/fracture-multi-region-x-ray-data"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Bone_Fracture_Binary_Classification"),
        "the nested root is found: {stdout}"
    );
    let test_row = stdout
        .lines()
        .find(|l| l.starts_with("test "))
        .unwrap_or_default();
    assert!(
        test_row.contains(" 12 "),
        "evaluated on the 12 test images: {stdout}"
    );
    assert!(
        stdout.contains(&format!("report:     {}", run.join("report.json").display())),
        "{stdout}"
    );
    // `fracture download` finds it too, and prints where it is.
    let dl = fracture()
        .arg("download")
        .env("FRACTURE_KAGGLE_BASE_URL", &stub.base_url)
        .env("FRACTURE_DATA_DIR", root.join("data"))
        .output()
        .unwrap();
    assert!(dl.status.success(), "{}", String::from_utf8_lossy(&dl.stderr));
    assert!(
        String::from_utf8_lossy(&dl.stdout)
            .lines()
            .any(|l| l.starts_with("dataset: ") && l.ends_with("fracture-multi-region-x-ray-data")),
        "{}",
        String::from_utf8_lossy(&dl.stdout)
    );
    // A second run finds the data and downloads nothing.
    let requests = stub.requests().len();
    let again = fracture()
        .args(["train", "--epochs", "1", "--image-size", "24", "--out"])
        .arg(root.join("run2"))
        .env("FRACTURE_KAGGLE_BASE_URL", &stub.base_url)
        .env("FRACTURE_DATA_DIR", root.join("data"))
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(stub.requests().len(), requests);
}

/// `fracture download --dataset fracatlas` fetches the release (here from a figshare stand-in on
/// loopback), splits it per class and says how to train on it; `train` then reads that folder and
/// evaluates on its test split.
#[test]
fn download_fracatlas_lays_out_a_split_that_train_reads() {
    use fracture_testkit::{KaggleStub, StubOptions, fracatlas_shaped_zip};
    let stub = KaggleStub::start(StubOptions {
        datasets: vec![("figshare/22363012".into(), fracatlas_shaped_zip(20, 60, 32))],
        ..StubOptions::default()
    })
    .unwrap();
    let root = fresh_dir(&base(), "download-fracatlas");
    let data = root.join("data");
    let download = || {
        fracture()
            .args([
                "download",
                "--dataset",
                "fracatlas",
                "--figshare-url",
                &stub.figshare_base_url,
            ])
            .env("FRACTURE_DATA_DIR", &data)
            .output()
            .unwrap()
    };
    let out = download();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dest = data.join("fracatlas");
    for line in [
        "CC BY 4.0",
        "split with seed 2023",
        "train          14             42",
        "test            3              9",
        "(20 rows)",
        &format!("dataset: {}", dest.display()),
        &format!("fracture train --data {}", dest.display()),
    ] {
        assert!(stdout.contains(line), "`{line}` missing from:\n{stdout}");
    }
    let run = root.join("run");
    let trained = tiny_train(1, &dest, &run, &[]).output().unwrap();
    let stdout = String::from_utf8_lossy(&trained.stdout);
    assert!(
        trained.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    let test_row = stdout
        .lines()
        .find(|l| l.starts_with("test "))
        .unwrap_or_default();
    assert!(
        test_row.contains(" 12 "),
        "evaluated on the 12 test images: {stdout}"
    );
    // Asked again, nothing is downloaded.
    let requests = stub.requests().len();
    let again = download();
    assert!(again.status.success());
    assert_eq!(stub.requests().len(), requests);
}

#[test]
fn train_without_data_offline_fails_fast_naming_the_alternative() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let root = fresh_dir(&base(), "offline");
    let start = std::time::Instant::now();
    let out = fracture()
        .args(["train", "--epochs", "1"])
        .env(
            "FRACTURE_KAGGLE_BASE_URL",
            format!("http://127.0.0.1:{port}/api/v1"),
        )
        .env("FRACTURE_DATA_DIR", root.join("data"))
        .output()
        .unwrap();
    assert!(
        start.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach") && stderr.contains("--data DIR"),
        "{stderr}"
    );
}
