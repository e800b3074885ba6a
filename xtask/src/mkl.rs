//! `cargo xtask setup-mkl`: Intel MKL for a `--features mkl` build, from Intel's packages on PyPI,
//! into a venv under `target/`. Prints the environment as an `export MKLROOT=…` line.
//!
//! candle's `mkl` feature links MKL statically through `intel-mkl-src` (`mkl-static-lp64-iomp`),
//! whose build script looks for `mkl.h`, `libmkl_core.a` and `libiomp5.a` under `$MKLROOT` (else it
//! would download MKL from a container registry, which this machine cannot reach). The three
//! packages hold exactly those: `mkl-include` the headers, `mkl-static` the static libraries,
//! `intel-openmp` the OpenMP runtime. The binary carries MKL inside it: nothing is needed where it runs.

use std::path::{Path, PathBuf};

use crate::DynError;

/// The pinned packages (one MKL release with its matching OpenMP runtime).
const PACKAGES: [&str; 3] = [
    "mkl-static==2024.2.2",
    "mkl-include==2024.2.2",
    "intel-openmp==2024.2.1",
];

/// The venv the packages go into; its `lib/` and `include/` are MKLROOT's.
fn venv(root: &Path) -> PathBuf {
    root.join("target/mkl")
}

pub(crate) fn run(args: &[String], root: &Path) -> Result<(), DynError> {
    if let Some(other) = args.first() {
        return Err(format!("setup-mkl: unknown option `{other}`").into());
    }
    let venv = venv(root);
    crate::pip_venv(&venv, &PACKAGES)?;
    for needed in ["include/mkl.h", "lib/libmkl_core.a", "lib/libiomp5.a"] {
        if !venv.join(needed).is_file() {
            return Err(format!(
                "no {needed} in {} after installing {}",
                venv.display(),
                PACKAGES.join(" ")
            )
            .into());
        }
    }
    println!("export MKLROOT={}", venv.display());
    Ok(())
}
