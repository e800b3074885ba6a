//! `cargo xtask setup-cuda`: the CUDA compiler and headers a `--features cuda` build needs, from
//! NVIDIA's packages on PyPI, into a venv under `target/`, so the CUDA build compiles on a machine
//! without a GPU or a system CUDA toolkit. Prints the environment as `export NAME=value` lines.
//!
//! What a build needs: `nvcc` and its host-side tools (`nvidia-cuda-nvcc`, from CUDA 13 on the only
//! wheel that carries the `nvcc` driver itself), the runtime headers (`nvidia-cuda-runtime`) and
//! CCCL (`nvidia-cuda-cccl`: `cuda_fp16.h` includes `<nv/target>`). candle's kernels are compiled to
//! PTX for `CUDA_COMPUTE_CAP`; cudarc loads the driver and libraries at run time and takes its API
//! version from `CUDARC_CUDA_VERSION` (the newest it knows, 13.4, as 13.5's API is a superset).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{DynError, status};

/// The pinned packages (CUDA 13.5 toolchain, CCCL as published with it).
const PACKAGES: [&str; 3] = [
    "nvidia-cuda-nvcc==13.5.37",
    "nvidia-cuda-runtime==13.5.37",
    "nvidia-cuda-cccl==13.3.5.0.6",
];

/// The compute capability the PTX is compiled for by default: 9.0 (Hopper, the H100/H200).
const DEFAULT_COMPUTE_CAP: &str = "90";

/// The API version cudarc is told to use (it knows CUDA up to 13.4).
const CUDARC_VERSION: &str = "13040";

/// The venv and the toolkit folder inside it.
fn toolkit(root: &Path) -> (PathBuf, PathBuf) {
    let venv = root.join("target/cuda-toolkit");
    let found = std::fs::read_dir(venv.join("lib"))
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path())))
        .map(|python| python.join("site-packages/nvidia/cu13"))
        .unwrap_or_else(|| venv.join("lib/python3/site-packages/nvidia/cu13"));
    (venv, found)
}

pub(crate) fn run(args: &[String], root: &Path) -> Result<(), DynError> {
    let mut cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| DEFAULT_COMPUTE_CAP.into());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--compute-cap" => cap = it.next().ok_or("--compute-cap needs a value, e.g. 90")?.clone(),
            other => return Err(format!("setup-cuda: unknown option `{other}`").into()),
        }
    }
    let (venv, _) = toolkit(root);
    let python = venv.join("bin/python");
    if !python.exists() {
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    // pip's progress goes to stderr, so stdout stays the `export` lines only.
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(PACKAGES)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot run pip in {}: {e}", venv.display()))?;
    if !out.success() {
        return Err(format!("pip could not install {}", PACKAGES.join(" ")).into());
    }
    let (_, cuda) = toolkit(root);
    let nvcc = cuda.join("bin/nvcc");
    if !nvcc.is_file() {
        return Err(format!(
            "no nvcc at {} after installing {}",
            nvcc.display(),
            PACKAGES.join(" ")
        )
        .into());
    }
    let path = std::env::var("PATH").unwrap_or_default();
    println!("export PATH={}:{path}", cuda.join("bin").display());
    println!("export CUDA_ROOT={}", cuda.display());
    println!("export CUDA_PATH={}", cuda.display());
    println!("export CUDA_COMPUTE_CAP={cap}");
    println!("export CUDARC_CUDA_VERSION={CUDARC_VERSION}");
    Ok(())
}
