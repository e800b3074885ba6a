//! Cross-site and overload refusals, special files, the built-in model's outputs, BF16, devices.

use super::audit_and_real::val_subset;
use super::eval_predict::trained_run;
use super::server_limits_and_corpus::raw_exchange;
use super::server_page::{Server, jpeg};
use super::*;

#[test]
fn the_server_refuses_cross_site_posts_and_forged_hosts_and_sends_hardening_headers() {
    let (_root, run) = trained_run("serve-hardening");
    let server = Server::start(&run, &[]);
    let wait = std::time::Duration::from_secs(8);
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let body = jpeg(true, 3);
    let post_with = |extra: &str, target: &str| {
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        raw_exchange(&server.url, &request, wait).0
    };
    // The page's own origin, and a client that sends none (curl), are served.
    let own = post_with(&format!("Origin: http://127.0.0.1:{port}\r\n"), "/api/predict");
    assert!(own.starts_with("HTTP/1.1 200"), "{own}");
    let plain = post_with("", "/api/predict");
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    let same = post_with("Sec-Fetch-Site: same-origin\r\n", "/api/predict");
    assert!(same.starts_with("HTTP/1.1 200"), "{same}");
    // Another site's page posting through the browser is refused, by Origin or by Sec-Fetch-Site.
    for extra in [
        "Origin: http://evil.example\r\n",
        "Origin: null\r\n",
        &format!("Origin: http://localhost.evil.example:{port}\r\n"),
        "Sec-Fetch-Site: cross-site\r\n",
        "Sec-Fetch-Site: same-site\r\n",
    ] {
        let answer = post_with(extra, "/api/predict");
        assert!(answer.starts_with("HTTP/1.1 403"), "{extra}: {answer}");
        assert!(answer.contains("cross-origin requests are refused"), "{answer}");
    }
    // An absolute-form target naming another host than Host.
    let answer = post_with("", "http://evil.com/api/predict");
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Two Host headers: localhost, then another.
    let request = format!(
        "GET /api/health HTTP/1.1\r\nHost: localhost:{port}\r\nHost: evil.com\r\nConnection: close\r\n\r\n"
    );
    let (answer, _) = raw_exchange(&server.url, request.as_bytes(), wait);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Every answer carries the hardening headers, the page included.
    let request = format!("GET / HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n");
    let (page, _) = raw_exchange(&server.url, request.as_bytes(), wait);
    let lower = page.to_ascii_lowercase();
    for header in [
        "content-security-policy: default-src 'self'",
        "x-content-type-options: nosniff",
        "x-frame-options: deny",
        "referrer-policy: no-referrer",
    ] {
        assert!(lower.contains(header), "{header} missing: {page}");
    }
}

#[test]
fn uploads_beyond_the_queue_are_answered_503_before_their_bodies_are_read() {
    use std::io::Write;
    let (_root, run) = trained_run("serve-queue");
    let server = Server::start(&run, &["--max-queued-uploads", "1"]);
    let port = server.url.rsplit(':').next().unwrap().to_string();
    // One upload holds the only slot: its headers announce 5 MB, its body trickles.
    let mut held = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    held.write_all(
        format!(
            "POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\nContent-Length: 5000000\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    held.write_all(&[0u8; 1000]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let body = jpeg(false, 4);
    let request = |len: usize| {
        format!(
            "POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()
    };
    // A second one is refused at once, without the server waiting for its 19 MB body.
    let (answer, took) = raw_exchange(&server.url, &request(19 << 20), std::time::Duration::from_secs(8));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 2"), "{answer}");
    assert!(answer.contains("busy"), "{answer}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    // Once the first upload ends, the slot is free again.
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut full = request(body.len());
    full.extend_from_slice(&body);
    let (answer, _) = raw_exchange(&server.url, &full, std::time::Duration::from_secs(30));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[cfg(unix)]
#[test]
fn special_files_closed_pipes_and_a_file_as_audit_out_are_named_clearly() {
    let root = fresh_dir(&base(), "special-files");
    // A FIFO and a device given to predict: said what they are, never "Not a directory".
    let fifo = root.join("pipe.jpg");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let out = fracture()
        .arg("predict")
        .arg(&fifo)
        .arg("/dev/zero")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pipe.jpg: a named pipe (FIFO), neither an image file nor a folder"),
        "{stderr}"
    );
    assert!(stderr.contains("/dev/zero: a device"), "{stderr}");
    assert!(!stderr.contains("os error 20"), "{stderr}");

    let data = root.join("data");
    write_synthetic_dataset(&data, &SyntheticSpec::train_val((6, 6), (3, 3)));
    // --out naming a file fails before the audit runs.
    let file = root.join("taken.txt");
    std::fs::write(&file, b"x").unwrap();
    let out = fracture()
        .args(["audit", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("exists and is not a folder"), "{stderr}");
    assert!(out.stdout.is_empty(), "the audit did not run");
    // Its output piped into a reader that has gone: no panic, and the files are written.
    let dest = root.join("audit");
    let mut child = fracture()
        .args(["audit", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&dest)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(done.status.code(), Some(101), "{stderr}");
    assert!(dest.join("audit.json").is_file());
}

#[test]
fn eval_of_the_built_in_model_writes_into_the_current_folder_never_into_models() {
    let root = fresh_dir(&base(), "eval-built-in-cwd");
    let data = root.join("data");
    write_synthetic_dataset(&data, &SyntheticSpec::train_val((2, 2), (3, 3)));
    let models = fracture_testkit::workspace_root().join("crates/fracture-cli/models");
    let before: Vec<_> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let out = fracture()
        .current_dir(&root)
        .args(["eval", "--split", "val", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(root.join("eval-val/report.json").is_file());
    let after: Vec<_> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "nothing written next to the built-in model");
    assert!(!root.join("models").exists());
}

/// Images the built-in model was trained on are recognised from its fingerprints: the warning
/// shows five and says how many more, and the evaluation folder lists them all.
#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn eval_lists_every_training_image_it_recognises_in_a_file() {
    let shared = fracture_testkit::fracatlas();
    let root = fresh_dir(&base(), "eval-near-duplicates");
    let data = root.join("data");
    for (class, n) in [("fractured", 3), ("not fractured", 4)] {
        let dir = data.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        let mut files: Vec<_> = std::fs::read_dir(shared.join("train").join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(n) {
            std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    let out = fracture()
        .current_dir(&root)
        .args(["eval", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("7 of the 7 evaluated images"), "{stderr}");
    assert!(
        stderr.contains("… and 2 more (all 7 are listed in near-duplicates.csv"),
        "{stderr}"
    );
    let listed = std::fs::read_to_string(root.join("eval-folder/near-duplicates.csv")).unwrap();
    assert_eq!(listed.lines().count(), 8, "{listed}");
    assert!(listed.starts_with("path,distance\n"));
}

/// P(fractured) of each image `fracture predict` reports, by path.
pub(crate) fn predicted_p(out: &std::process::Output) -> std::collections::BTreeMap<String, f64> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_string(),
                p["p_fractured"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The built-in model in BF16 on 48 real val radiographs: with the products emulated
/// (`FRACTURE_BF16=emulated`, the numbers of AMX and AVX-512 BF16 on any processor) every P moves,
/// by at most 0.01; with the fp32 fallback forced, `--precision bf16` gives exactly the FP32 answers.
#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn bf16_inference_stays_within_a_hundredth_of_fp32_on_real_radiographs() {
    let data = fracture_testkit::fracatlas();
    let root = fresh_dir(&base(), "bf16-predict");
    let subset = root.join("val");
    val_subset(&data, &subset, 16, 32);
    let predict = |precision: &str, backend: &str| {
        fracture()
            .args([
                "predict",
                "--no-evidence",
                "--format",
                "json",
                "--precision",
                precision,
            ])
            .arg(&subset)
            .env("FRACTURE_BF16", backend)
            .output()
            .unwrap()
    };
    let fp32 = predicted_p(&predict("fp32", "emulated"));
    assert_eq!(fp32.len(), 48);
    let bf16 = predicted_p(&predict("bf16", "emulated"));
    let deltas: Vec<f64> = fp32.iter().map(|(k, p)| (bf16[k] - p).abs()).collect();
    let worst = deltas.iter().copied().fold(0.0, f64::max);
    assert!(worst <= 0.01, "max |ΔP| {worst}");
    assert!(deltas.iter().filter(|d| **d > 0.0).count() >= 40, "{deltas:?}");
    assert_eq!(predicted_p(&predict("bf16", "fp32")), fp32);
}

/// `--precision auto` (the default) says what it chose and why, and where BF16 products are not
/// faster (forced fp32, or emulated) it predicts exactly as `--precision fp32` and trains in FP32,
/// recording `fp32`, never `auto`.
#[test]
fn auto_precision_says_its_choice_and_is_fp32_where_bf16_is_not_faster() {
    let (root, run) = trained_run("auto-precision");
    let images = root.join("data").join("test");
    let predict = |extra: &[&str], backend: &str| {
        fracture()
            .args(["predict", "--no-evidence", "--format", "json", "--model"])
            .arg(&run)
            .args(extra)
            .arg(&images)
            .env("FRACTURE_BF16", backend)
            .output()
            .unwrap()
    };
    let fp32 = predicted_p(&predict(&["--precision", "fp32"], "emulated"));
    assert_eq!(fp32.len(), 12);
    for (backend, why) in [
        ("emulated", "emulated BF16 is no faster than fp32"),
        ("fp32", "FRACTURE_BF16=fp32"),
    ] {
        let out = predict(&[], backend);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("precision fp32 (auto: ") && stderr.contains(why),
            "{stderr}"
        );
        assert_eq!(predicted_p(&out), fp32, "{backend}");
    }
    let trained = root.join("run-auto");
    let out = tiny_train(1, &root.join("data"), &trained, &[])
        .env("FRACTURE_BF16", "emulated")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("precision fp32 (auto: emulated BF16"), "{stderr}");
    let model =
        fracture_train::TrainedModel::load(&trained, &fracture_train::candle_core::Device::Cpu).unwrap();
    let train_cfg = model.meta.train.as_ref().unwrap();
    assert_eq!(train_cfg.precision, fracture_train::model::Precision::Fp32);
    // With candle's reference operations auto is FP32 on any processor, and says why.
    let reference = tiny_train(
        1,
        &root.join("data"),
        &root.join("run-auto-reference"),
        &["--kernels", "reference"],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&reference.stderr);
    assert!(reference.status.success(), "{stderr}");
    assert!(
        stderr.contains("precision fp32 (auto: precision bf16 needs our kernels"),
        "{stderr}"
    );
}

/// `train --precision bf16` trains with BF16 products (emulated here, so on any processor), says
/// so, and records the precision in the model file's training settings and the backend in its
/// validation report; with candle's reference operations it is refused.
#[test]
fn train_in_bf16_records_the_precision_and_backend() {
    let root = fresh_dir(&base(), "train-bf16");
    write_synthetic_dataset(&root.join("data"), &SyntheticSpec::train_val((6, 10), (4, 4)));
    let run = root.join("run");
    let train = |extra: &[&str], out: &std::path::Path| {
        tiny_train(1, &root.join("data"), out, &["--precision", "bf16"])
            .args(extra)
            .env("FRACTURE_BF16", "emulated")
            .output()
            .unwrap()
    };
    let out = train(&[], &run);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("precision bf16: matrix products on emulated (FRACTURE_BF16=emulated)"),
        "{stdout}"
    );
    let model = fracture_train::TrainedModel::load(&run, &fracture_train::candle_core::Device::Cpu).unwrap();
    let train_cfg = model.meta.train.as_ref().unwrap();
    assert_eq!(train_cfg.precision, fracture_train::model::Precision::Bf16);
    let validation = model.meta.validation.as_ref().unwrap();
    assert_eq!(
        validation.bf16_backend,
        Some(fracture_train::kernels::Bf16Backend::Emulated)
    );
    // A loaded model predicts in FP32 unless asked.
    assert_eq!(model.precision(), fracture_train::model::Precision::Fp32);
    let refused = train(&["--kernels", "reference"], &root.join("run-reference"));
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("precision bf16 needs our kernels"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// `--device` names the device; one whose backend this binary lacks is refused, naming the
/// feature to build with, before any work; `--device cpu` and `--cpu` run.
#[test]
fn a_device_this_build_lacks_is_named_with_its_feature() {
    let root = fresh_dir(&base(), "device");
    write_synthetic_dataset(&root.join("data"), &SyntheticSpec::train_val((2, 2), (2, 2)));
    let image = std::fs::read_dir(root.join("data/val/fractured"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let predict = |device: &[&str]| {
        fracture()
            .arg("predict")
            .args(device)
            .arg("--no-evidence")
            .arg(&image)
            .output()
            .unwrap()
    };
    let out = predict(&["--device", "cuda:1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "cuda") {
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("without the `cuda` feature") && stderr.contains("--features cuda"),
        "{stderr}"
    );
    let bad = predict(&["--device", "tpu"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cuda[:N]"));
    for device in [&["--device", "cpu"][..], &["--cpu"][..], &[][..]] {
        let out = predict(device);
        assert!(
            out.status.success(),
            "{device:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
