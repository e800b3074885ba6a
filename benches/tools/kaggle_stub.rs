//! Serves a generated, Kaggle-shaped copy of the Bone Fracture dataset on loopback, so the download
//! path (`cargo xtask download`, `fracture train` without `--data`) can be tried without internet.
//!
//! ```text
//! cargo run -p fracture-benches --example kaggle_stub -- [--port 8765] [--per-class 20] [--size 128] [--seconds 600]
//! FRACTURE_KAGGLE_BASE_URL=http://127.0.0.1:8765/api/v1 cargo run --release -p fracture-cli -- train
//! ```
//! The images are synthetic X-ray-like pictures (fractured ones carry a crack), not radiographs. The
//! server stops by itself after `--seconds`.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Duration;

use anyhow::{Context, bail};
use fracture_testkit::{KaggleStub, StubOptions, kaggle_shaped_zip};

fn main() -> anyhow::Result<()> {
    let (mut port, mut per_class, mut size, mut seconds) = (8765u16, 20usize, 128u32, 600u64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("missing value");
        match arg.as_str() {
            "--port" => port = value()?.parse()?,
            "--per-class" => per_class = value()?.parse()?,
            "--size" => size = value()?.parse()?,
            "--seconds" => seconds = value()?.parse()?,
            other => bail!("unknown argument {other} (use --port, --per-class, --size, --seconds)"),
        }
    }
    let zip = kaggle_shaped_zip(per_class, size);
    let stub = KaggleStub::start(StubOptions {
        datasets: vec![(
            "bmadushanirodrigo/fracture-multi-region-x-ray-data".into(),
            zip.clone(),
        )],
        ports: (port, 0),
        lifetime: Some(Duration::from_secs(seconds)),
        ..StubOptions::default()
    })?;
    println!(
        "serving a {}-byte Kaggle-shaped zip ({} images) for {seconds} s",
        zip.len(),
        per_class * 6
    );
    println!("FRACTURE_KAGGLE_BASE_URL={}", stub.base_url);
    std::thread::sleep(Duration::from_secs(seconds));
    Ok(())
}
