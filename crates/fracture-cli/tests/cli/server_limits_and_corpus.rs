//! The server's limits (timeouts, connections, uploads, hosts), error messages, and the bad-input corpus.

use super::eval_predict::trained_run;
use super::server_page::{Server, http, jpeg, multipart, post};
use super::*;

/// Sends `request` on a fresh connection to the server at `url` and returns everything it answers
/// until it closes the connection or `wait` passes, with the time that took.
pub(crate) fn raw_exchange(
    url: &str,
    request: &[u8],
    wait: std::time::Duration,
) -> (String, std::time::Duration) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    let start = std::time::Instant::now();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "the server held the connection for {wait:?}: {}",
                    String::from_utf8_lossy(&answer)
                )
            }
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&answer).into_owned(), start.elapsed())
}

#[test]
fn the_server_times_out_idle_and_slow_clients_and_caps_connections() {
    use std::time::Duration;
    let (_root, run) = trained_run("serve-timeouts");
    let server = Server::start(
        &run,
        &[
            "--max-upload-mb",
            "1",
            "--header-timeout-secs",
            "1",
            "--body-timeout-secs",
            "1",
            "--max-connections",
            "40",
        ],
    );
    let base = server.url.clone();
    let wait = Duration::from_secs(8);
    // An idle connection and a half-sent request line are closed after the header timeout.
    let (answer, took) = raw_exchange(&base, b"", wait);
    assert!(took >= Duration::from_millis(900), "{took:?} {answer}");
    let (_, took) = raw_exchange(&base, b"GET /api/hea", wait);
    assert!(took < Duration::from_secs(5), "{took:?}");
    // A body that stops arriving is answered 408.
    let (answer, _) = raw_exchange(
        &base,
        b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\nonly a little",
        wait,
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within"), "{answer}");
    // A declared length over the limit from a client that waits for the go-ahead: 413 at once.
    let (answer, took) = raw_exchange(
        &base,
        b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\nContent-Length: 50000000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        wait,
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        took < Duration::from_millis(900),
        "answered before any timeout: {took:?}"
    );
    // Errors of the routing layer are JSON too: unknown route, wrong method, an over-long request
    // target, and a query the extractor refuses (a repeated field).
    let long_target = format!(
        "GET /api/health?{} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "x".repeat(10_000)
    );
    for (request, status) in [
        (long_target.as_bytes(), "414"),
        (
            &b"POST /api/predict?heatmap=1&heatmap=0 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"[..],
            "400",
        ),
        (
            &b"GET /nope HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"[..],
            "404",
        ),
        (
            &b"DELETE /api/predict HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"[..],
            "405",
        ),
    ] {
        let (answer, _) = raw_exchange(&base, request, wait);
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer}");
        assert!(answer.contains("{\"error\":"), "{answer}");
    }
    // Connections over the cap are closed at once; those under it are served. (A second server with
    // a longer header timeout, so the idle connections outlive a slow machine's scheduling.)
    drop(server);
    let server = Server::start(&run, &["--header-timeout-secs", "6", "--max-connections", "10"]);
    let base = server.url.clone();
    let idle: Vec<std::net::TcpStream> = (0..10)
        .map(|_| std::net::TcpStream::connect(base.trim_start_matches("http://")).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));

    let (answer, took) = raw_exchange(
        &base,
        b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n",
        wait,
    );
    assert!(
        answer.is_empty() && took < Duration::from_millis(500),
        "{took:?} {answer}"
    );
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let (answer, _) = raw_exchange(
        &base,
        b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        wait,
    );
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("ok"),
        "{answer}"
    );
}

#[test]
fn uploads_are_read_from_the_file_field_only_once() {
    let (_root, run) = trained_run("serve-fields");
    let server = Server::start(&run, &[]);
    let url = format!("{}/api/predict", server.url);
    let image = jpeg(true, 3);
    let boundary = "b0undary";
    let part = |name: &str, file: Option<&str>, bytes: &[u8]| {
        let mut p = match file {
            Some(f) => format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\r\n"
            ),
            None => format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"),
        }
        .into_bytes();
        p.extend_from_slice(bytes);
        p.extend_from_slice(b"\r\n");
        p
    };
    let ct = format!("multipart/form-data; boundary={boundary}");
    let end = format!("--{boundary}--\r\n").into_bytes();
    // A text field before the file.
    let form = [
        part("note", None, b"left wrist"),
        part("file", Some("a.jpg"), &image),
        end.clone(),
    ]
    .concat();
    let (status, body) = post(&url, &ct, &form);
    assert_eq!(status, 200, "{body}");
    // Two files: refused, not half-answered.
    let form = [
        part("file", Some("a.jpg"), &image),
        part("file", Some("b.jpg"), &image),
        end.clone(),
    ]
    .concat();
    let (status, body) = post(&url, &ct, &form);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("more than one"),
        "{body}"
    );
    // No `file` field at all.
    let form = [part("upload", Some("a.jpg"), &image), end].concat();
    let (status, body) = post(&url, &ct, &form);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("named `file`"), "{body}");
    // The model's description does not reveal where its file lives.
    let model: serde_json::Value = http()
        .get(&format!("{}/api/model", server.url))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert!(model.get("path").is_none(), "{model}");
}

#[test]
fn a_loopback_server_answers_only_to_loopback_host_names() {
    let (_root, run) = trained_run("serve-hosts");
    let server = Server::start(&run, &["--allowed-host", "xray.example:8080"]);
    let wait = std::time::Duration::from_secs(8);
    let port = server.url.rsplit(':').next().unwrap().to_string();
    for (host, ok) in [
        (format!("127.0.0.1:{port}"), true),
        (format!("localhost:{port}"), true),
        (format!("[::1]:{port}"), true),
        ("xray.example".to_string(), true),
        ("attacker.example".to_string(), false),
        (format!("evil.test:{port}"), false),
    ] {
        let request = format!("GET /api/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (answer, _) = raw_exchange(&server.url, request.as_bytes(), wait);
        let expected = if ok { "HTTP/1.1 200" } else { "HTTP/1.1 421" };
        assert!(answer.starts_with(expected), "{host}: {answer}");
        if !ok {
            assert!(answer.contains("--allowed-host"), "{answer}");
        }
    }
}

#[test]
fn error_messages_name_the_cause_once() {
    let out = fracture()
        .args(["predict", "--model", "/nonexistent/model.safetensors", "x.png"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("/nonexistent/model.safetensors"), "{stderr}");
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
    assert!(
        !stderr.contains("Os {") && !stderr.contains("kind:"),
        "no Debug structs: {stderr}"
    );
}

#[test]
fn eval_on_fractures_only_reports_what_is_defined() {
    let (root, run) = trained_run("eval-one-class");
    let only = root.join("only-fractures");
    std::fs::create_dir_all(only.join("fractured")).unwrap();
    for entry in std::fs::read_dir(root.join("data/test/fractured")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, only.join("fractured").join(path.file_name().unwrap())).unwrap();
    }
    let out = fracture()
        .args(["eval", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(&only)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("5 images, 5 fractured"), "{stdout}");
    assert!(stdout.contains("fractures only"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("eval-folder/report.json")).unwrap()).unwrap();
    assert!(report["sensitivity"].as_f64().is_some(), "{report}");
    assert!(report["ci95"]["sensitivity"].is_object(), "{report}");
    assert!(
        report["specificity"].is_null() && report["roc_auc"].is_null(),
        "{report}"
    );
}

/// Most resident memory a command of the corpus tests may reach.
pub(crate) const MAX_COMMAND_RSS: u64 = 2 << 30;

/// Runs a command to completion within `secs` seconds (killed and failed otherwise), with its peak
/// resident memory under [`MAX_COMMAND_RSS`] (sampled while it runs, where `/proc` exists).
pub(crate) fn bounded(mut cmd: Command, secs: u64) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = std::time::Instant::now();
    let mut peak = 0u64;
    let status = loop {
        if let Some(rss) = fracture_testkit::peak_rss_bytes(Some(child.id())) {
            peak = peak.max(rss);
            if peak > MAX_COMMAND_RSS {
                let _ = child.kill();
                panic!("{cmd:?} took {peak} bytes of memory");
            }
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

#[test]
fn the_bad_input_corpus_through_predict_train_inspect_and_eval() {
    use fracture_testkit::Expect;
    let (root, run) = trained_run("corpus");
    let corpus = root.join("corpus");
    let entries =
        fracture_testkit::write_bad_inputs(&corpus, &fracture_testkit::synthetic_xray(64, 48, true, 2))
            .unwrap();
    let readable = entries.iter().filter(|e| e.expect == Expect::Readable).count();

    // predict: every readable file predicted once, every unreadable one named, exit 1 (0 with --keep-going).
    let mut cmd = fracture();
    cmd.args(["predict", "--format", "json", "--model"])
        .arg(&run)
        .arg(&corpus);
    let out = bounded(cmd, 120);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        value["predictions"].as_array().unwrap().len(),
        readable,
        "{value}"
    );
    for e in entries.iter().filter(|e| e.expect == Expect::Unreadable) {
        let name = e.path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(stderr.contains(&name), "{}: {stderr}", e.kind);
    }
    let mut cmd = fracture();
    cmd.args(["predict", "--keep-going", "--format", "csv", "--model"])
        .arg(&run)
        .arg(&corpus);
    assert!(bounded(cmd, 120).status.success());

    // A dataset whose fractured training class is the corpus: bad files skipped and reported.
    let data = root.join("corpus-data");
    fracture_testkit::write_synthetic_dataset(
        &data,
        &fracture_testkit::SyntheticSpec::train_val((6, 6), (3, 3)),
    );
    let class = data.join("train/fractured/corpus");
    fracture_testkit::write_bad_inputs(&class, &fracture_testkit::synthetic_xray(64, 48, true, 3)).unwrap();
    let mut cmd = fracture();
    cmd.args(["inspect", "--data"]).arg(&data);
    let out = bounded(cmd, 60);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut cmd = fracture();
    cmd.args(["train", "--epochs", "1", "--image-size", "24", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(root.join("corpus-run"));
    let out = bounded(cmd, 300);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("bomb.png") && !text.contains("panicked"), "{text}");
    let mut cmd = fracture();
    cmd.args(["eval", "--split", "train", "--model"])
        .arg(root.join("corpus-run"))
        .arg("--data")
        .arg(&data);
    let out = bounded(cmd, 120);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_bad_model_files_through_predict_eval_and_serve() {
    let (root, run) = trained_run("bad-models");
    let good = std::fs::read(run.join("model.safetensors")).unwrap();
    let keys = fracture_testkit::ModelKeys {
        threshold: fracture_train::bundle::THRESHOLD_KEY,
        config: fracture_train::model::CONFIG_KEY,
        preprocess: fracture_train::bundle::PREPROCESS_KEY,
    };
    let bad = fracture_testkit::write_bad_models(&root.join("bad"), &good, keys).unwrap();
    let image = root.join("one.png");
    fracture_testkit::synthetic_xray(64, 48, true, 5)
        .save(&image)
        .unwrap();
    for b in &bad {
        let name = b.path.file_name().unwrap().to_string_lossy().into_owned();
        let mut runs = Vec::new();
        let mut cmd = fracture();
        cmd.args(["predict", "--format", "json", "--model"])
            .arg(&b.path)
            .arg(&image);
        runs.push(("predict", bounded(cmd, 60)));
        let mut cmd = fracture();
        cmd.args(["eval", "--split", "val", "--model"])
            .arg(&b.path)
            .arg("--data")
            .arg(root.join("data"));
        runs.push(("eval", bounded(cmd, 60)));
        let mut cmd = fracture();
        cmd.args(["serve", "--addr", "127.0.0.1:0", "--model"])
            .arg(&b.path);
        runs.push(("serve", bounded(cmd, 60)));
        for (what, out) in runs {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{what} {}: {stderr}", b.kind);
            assert!(
                stderr.contains(&name) && !stderr.contains("panicked"),
                "{what} {}: {stderr}",
                b.kind
            );
            assert!(out.stdout.is_empty(), "{what} {}: no partial output", b.kind);
        }
    }
}

#[test]
fn the_bad_input_corpus_through_the_server() {
    use fracture_testkit::Expect;
    let (root, run) = trained_run("corpus-serve");
    let entries = fracture_testkit::write_bad_inputs(
        &root.join("corpus"),
        &fracture_testkit::synthetic_xray(64, 48, false, 4),
    )
    .unwrap();
    let server = Server::start(&run, &[]);
    let url = format!("{}/api/predict?heatmap=1", server.url);
    for e in entries.iter().filter(|e| e.path.is_file()) {
        let bytes = std::fs::read(&e.path).unwrap();
        let (status, body) = post(&url, "application/octet-stream", &bytes);
        match e.expect {
            Expect::Readable => {
                assert_eq!(status, 200, "{}: {body}", e.kind);
                assert!(body["heatmap_png_base64"].is_string(), "{}", e.kind);
            }
            _ => {
                assert_eq!(status, 400, "{}: {body}", e.kind);
                assert!(
                    body["error"].as_str().is_some_and(|s| !s.is_empty()),
                    "{}: {body}",
                    e.kind
                );
            }
        }
    }
    // Malformed forms: no boundary, a form cut inside its part, a part without a name, and every
    // corpus image inside a well-formed form (the same answers as raw).
    let (content_type, form) = multipart("x.jpg", &jpeg(true, 1));
    for (what, ct, body) in [
        ("no boundary", "multipart/form-data".to_string(), form.clone()),
        ("cut form", content_type.clone(), form[..form.len() / 2].to_vec()),
        (
            "nameless part",
            content_type.clone(),
            String::from_utf8_lossy(&form)
                .replace("name=\"file\"; ", "")
                .into_bytes(),
        ),
    ] {
        let (status, body) = post(&url, &ct, &body);
        assert_eq!(status, 400, "{what}: {body}");
        assert!(body["error"].as_str().is_some_and(|s| !s.is_empty()), "{what}");
    }
    for e in entries.iter().filter(|e| e.path.is_file()) {
        let (ct, body) = multipart("corpus", &std::fs::read(&e.path).unwrap());
        let (status, _) = post(&url, &ct, &body);
        assert_eq!(
            status == 200,
            e.expect == Expect::Readable,
            "{} in a form",
            e.kind
        );
    }
    let health: serde_json::Value = http()
        .get(&format!("{}/api/health", server.url))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(health["status"], "ok", "the server is still up");
}
