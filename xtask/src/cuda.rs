//! `cargo xtask setup-cuda`: the CUDA compiler and headers a `--features cuda` build needs, from
//! NVIDIA's packages on PyPI, into a venv under `target/`, so the CUDA build compiles on a machine
//! without a GPU or a system CUDA toolkit. Prints the environment as `export NAME=value` lines.
//!
//! What a build needs: `nvcc` and its host-side tools (`nvidia-cuda-nvcc`, from CUDA 13 on the only
//! wheel that carries the `nvcc` driver itself), the runtime headers (`nvidia-cuda-runtime`) and
//! CCCL (`nvidia-cuda-cccl`: `cuda_fp16.h` includes `<nv/target>`). candle's kernels are compiled to
//! PTX for `CUDA_COMPUTE_CAP`; cudarc takes its API version from `CUDARC_CUDA_VERSION`.
//!
//! candle links cudarc with `dynamic-linking`: the `fracture` binary names `libcuda`, `libcublas`,
//! `libcublasLt`, `libcurand`, `libnvrtc` and `libcudart` at link time (and `libcudnn` with the
//! `cudnn` feature, whose bindings cudarc carries: no cuDNN headers are needed to build). `libcuda` comes only with
//! NVIDIA's driver, so this writes link stubs into `<toolkit>/lib/stubs` (a folder cudarc's build
//! script searches): shared libraries with the real libraries' sonames that define every function
//! cudarc declares and do nothing (`libcudart`, which the runtime package installs, is linked
//! as itself, copied: candle's MoE kernels call runtime functions beyond cudarc's). The binary links against them and, on a machine
//! with the driver and CUDA 13's libraries, loads the real ones by soname; a stub is never run.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{DynError, status};

/// The pinned packages: CUDA 13.0, the oldest CUDA 13. candle's kernels are PTX that the driver
/// compiles when the binary starts, and a driver compiles PTX only from a toolkit no newer than its
/// own CUDA version (the 580 driver series is CUDA 13.0): the oldest toolkit runs on the most drivers.
/// `nvcc`'s own dependencies (the front end in `nvidia-nvvm`, headers in `nvidia-cuda-crt`) are
/// pinned too: left free, pip takes the newest, whose PTX the 13.0 `ptxas` refuses.
const PACKAGES: [&str; 5] = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
];

/// The compute capability the PTX is compiled for by default: 9.0 (Hopper, the H100/H200).
const DEFAULT_COMPUTE_CAP: &str = "90";

/// The API version cudarc is told to use: the toolkit's.
const CUDARC_VERSION: &str = "13000";

/// The libraries candle's build links, as cudarc's module of each and the real library's soname.
const LINKED: [(&str, &str, &str); 7] = [
    ("driver", "cuda", "libcuda.so.1"),
    ("cudnn", "cudnn", "libcudnn.so.9"),
    ("cublas", "cublas", "libcublas.so.13"),
    ("cublaslt", "cublasLt", "libcublasLt.so.13"),
    ("curand", "curand", "libcurand.so.10"),
    ("nvrtc", "nvrtc", "libnvrtc.so.13"),
    ("runtime", "cudart", "libcudart.so.13"),
];

/// The functions a cudarc `sys` module declares (its lines `pub unsafe fn NAME(`), each once (a
/// function can be declared once per CUDA version), sorted.
fn declared_functions(source: &str) -> Vec<&str> {
    let mut names: Vec<&str> = source
        .lines()
        .filter_map(|line| line.strip_prefix("pub unsafe fn "))
        .filter_map(|rest| rest.split('(').next())
        .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The source folder of the cudarc the workspace resolves, from `cargo metadata`.
fn cudarc_source(root: &Path) -> Result<PathBuf, DynError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--features",
            "fracture-cli/cuda",
        ])
        .output()?;
    if !out.status.success() {
        return Err(format!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "cudarc")
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or("cargo metadata lists no cudarc: is candle's `cuda` feature gone?")?;
    Ok(Path::new(manifest).with_file_name("src"))
}

/// Writes the link stubs (see the module's documentation) into `stubs`.
fn write_link_stubs(root: &Path, stubs: &Path) -> Result<(), DynError> {
    let src = cudarc_source(root)?;
    std::fs::create_dir_all(stubs)?;
    for (module, name, soname) in LINKED {
        let library = stubs.join(format!("lib{name}.so"));
        let _ = std::fs::remove_file(&library);
        // A real library the toolkit's packages installed (the runtime, `libcudart`) is linked
        // itself: candle's MoE kernels call runtime functions cudarc does not declare.
        let real = stubs.parent().map(|lib| lib.join(soname));
        if let Some(real) = real.filter(|r| r.is_file()) {
            std::fs::copy(&real, &library)?;
            eprintln!("{} copied as {}", real.display(), library.display());
            continue;
        }
        let sys = src.join(module).join("sys/mod.rs");
        let source = std::fs::read_to_string(&sys).map_err(|e| format!("{}: {e}", sys.display()))?;
        let functions = declared_functions(&source);
        if functions.is_empty() {
            return Err(format!("{} declares no functions", sys.display()).into());
        }
        let c = stubs.join(format!("{name}.c"));
        let mut text =
            format!("/* Link stub for {soname}: never run; the real library is loaded by soname. */\n");
        for f in &functions {
            text.push_str(&format!("void {f}(void) {{}}\n"));
        }
        std::fs::write(&c, text)?;
        status(
            Command::new("cc")
                .args(["-shared", "-fPIC", "-o"])
                .arg(&library)
                .arg(format!("-Wl,-soname,{soname}"))
                .arg(&c),
        )?;
        eprintln!("link stub {} ({} functions)", library.display(), functions.len());
    }
    Ok(())
}

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
    crate::pip_venv(&venv, &PACKAGES)?;
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
    write_link_stubs(root, &cuda.join("lib/stubs"))?;
    let path = std::env::var("PATH").unwrap_or_default();
    println!("export PATH={}:{path}", cuda.join("bin").display());
    println!("export CUDA_ROOT={}", cuda.display());
    println!("export CUDA_PATH={}", cuda.display());
    println!("export CUDA_COMPUTE_CAP={cap}");
    println!("export CUDARC_CUDA_VERSION={CUDARC_VERSION}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_functions_are_the_sys_modules_wrappers() {
        let source = "pub type CUresult = u32;\n\
            pub unsafe fn cuInit(Flags: u32) -> CUresult {\n    extern \"C\" { fn cuInit(f: u32) -> u32; }\n}\n\
            pub unsafe fn cuMemAlloc_v2(p: *mut u64, n: usize) -> CUresult {}\n\
            pub unsafe fn cuInit(Flags: u32) -> CUresult {}\n\
            pub fn helper() {}\n";
        assert_eq!(declared_functions(source), ["cuInit", "cuMemAlloc_v2"]);
    }
}
