//! `cargo xtask <command>`: project automation that is not part of the toolkit itself.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

type DynError = Box<dyn std::error::Error>;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
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
