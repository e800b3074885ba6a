//! `cargo xtask fuzz`.

use std::process::Command;

use crate::{DynError, status};

/// `cargo xtask fuzz`: the `fuzz` integration tests with a time budget per property.
pub(crate) fn run(args: &[String]) -> Result<(), DynError> {
    let mut seconds = 60.0f64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().ok_or("--seconds needs a value")?.parse()?,
            other => return Err(format!("fuzz: unknown option `{other}`").into()),
        }
    }
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("fuzz: --seconds {seconds} must be positive").into());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The library properties are the `fuzz` integration tests; the server's upload path lives in
    // the binary, so its property is a unit test there (`fuzz_…`).
    let targets: [&[&str]; 2] = [
        &[
            "-p",
            "fracture-data",
            "-p",
            "fracture-fetch",
            "-p",
            "fracture-train",
            "--test",
            "fuzz",
        ],
        &["-p", "fracture-cli", "--bin", "fracture", "fuzz_"],
    ];
    for target in targets {
        status(
            Command::new(&cargo)
                .current_dir(crate::project_root())
                .env("FRACTURE_FUZZ_SECONDS", seconds.to_string())
                .args(["test", "--release"])
                .args(target)
                .args(["--", "--nocapture", "--test-threads", "1"]),
        )?;
    }
    Ok(())
}
