//! `cargo xtask <command>`: project automation that is not part of the toolkit itself.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

type DynError = Box<dyn std::error::Error>;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  download [--dataset owner/slug] [--dest DIR] [--force] [--base-url URL]
                             download and extract a Kaggle dataset (default: the Bone Fracture Multi-Region
                             X-ray Data) into DIR (default data/<slug>), then print images per split and class.
                             Credentials, when the dataset needs them: KAGGLE_API_TOKEN, ~/.kaggle/access_token,
                             kaggle.json, or KAGGLE_USERNAME + KAGGLE_KEY
  setup-python               create target/pyref, a Python venv with Pillow, OpenCV and NumPy (from PyPI)
  bench-preprocess [--seconds S] [--python PATH]
                             preprocessing rate of fracture-data vs the image crate, PIL and OpenCV,
                             in one run (benches/preprocess_compare.py)";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), DynError> {
    let args: Vec<String> = env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("download") => download(&args[1..]),
        Some("setup-python") => setup_python(),
        Some("bench-preprocess") => bench_preprocess(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n{USAGE}").into()),
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn venv_python() -> PathBuf {
    project_root().join("target/pyref/bin/python")
}

fn status(cmd: &mut Command) -> Result<(), DynError> {
    eprintln!("$ {cmd:?}");
    let st = cmd
        .status()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !st.success() {
        return Err(format!("{:?} failed with {st}", cmd.get_program()).into());
    }
    Ok(())
}

fn setup_python() -> Result<(), DynError> {
    let venv = project_root().join("target/pyref");
    if !venv_python().exists() {
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    status(Command::new(venv_python()).args([
        "-m",
        "pip",
        "install",
        "-q",
        "pillow",
        "opencv-python-headless",
        "numpy",
    ]))
}

fn bench_preprocess(args: &[String]) -> Result<(), DynError> {
    let mut seconds = "2".to_string();
    let mut python = venv_python();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().ok_or("--seconds needs a value")?.clone(),
            "--python" => python = PathBuf::from(it.next().ok_or("--python needs a value")?),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}").into()),
        }
    }
    if !python.exists() {
        return Err(format!(
            "no Python at {}; run `cargo xtask setup-python` first",
            python.display()
        )
        .into());
    }
    status(
        Command::new(python)
            .arg(project_root().join("benches/preprocess_compare.py"))
            .arg(seconds),
    )
}

fn download(args: &[String]) -> Result<(), DynError> {
    let mut dataset = fracture_fetch::DEFAULT_DATASET.to_string();
    let mut dest: Option<PathBuf> = None;
    let mut force = false;
    let mut base_url = fracture_fetch::base_url_from_env();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dataset" => dataset = it.next().ok_or("--dataset needs owner/slug")?.clone(),
            "--dest" => dest = Some(PathBuf::from(it.next().ok_or("--dest needs a folder")?)),
            "--force" => force = true,
            "--base-url" => base_url = it.next().ok_or("--base-url needs a URL")?.clone(),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}").into()),
        }
    }
    let dataset: fracture_fetch::DatasetRef = dataset.parse()?;
    let dest = dest.unwrap_or_else(|| project_root().join("data").join(&dataset.slug));
    let options = fracture_fetch::FetchOptions {
        base_url,
        force,
        ..fracture_fetch::FetchOptions::new(dataset.clone(), dest.clone())
    };
    let started = std::time::Instant::now();
    let mut last = std::time::Instant::now();
    let fetched = fracture_fetch::fetch(&options, &mut |event| match event {
        fracture_fetch::Event::Status(s) => println!("{s}"),
        fracture_fetch::Event::Retry {
            attempt,
            wait,
            reason,
        } => {
            println!(
                "attempt {attempt} failed ({reason}); retrying in {:.1} s",
                wait.as_secs_f64()
            )
        }
        fracture_fetch::Event::Progress { downloaded, total } => {
            if last.elapsed().as_millis() >= 1000 || total == Some(downloaded) {
                last = std::time::Instant::now();
                println!(
                    "  {}",
                    progress_line(downloaded, total, started.elapsed().as_secs_f64())
                );
            }
        }
    })?;
    if fetched.cached {
        println!(
            "{dataset} is already in {} (pass --force to download it again)",
            dest.display()
        );
    } else {
        println!(
            "downloaded {dataset}: {} bytes, {} files",
            fetched.archive_bytes, fetched.files
        );
    }
    let layout = fracture_data::DatasetLayout::discover(&fetched.root)?;
    print!("{}", layout.summary());
    Ok(())
}

/// `12.3 / 45.6 MB, 3.4 MB/s, ETA 10 s`.
fn progress_line(done: u64, total: Option<u64>, seconds: f64) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let rate = done as f64 / seconds.max(1e-3);
    match total {
        Some(t) if t > 0 => {
            let eta = t.saturating_sub(done) as f64 / rate.max(1.0);
            format!(
                "{:.1} / {:.1} MB, {:.1} MB/s, ETA {eta:.0} s",
                mb(done),
                mb(t),
                rate / 1e6
            )
        }
        _ => format!("{:.1} MB, {:.1} MB/s", mb(done), rate / 1e6),
    }
}
