//! Single-image preprocessing rate: decode a JPEG and resize it to 128 × 128, on one thread, with
//! our pipeline (zune-jpeg straight to luma + fast_image_resize) and with the plain `image` crate
//! (decode to RGB, `to_luma8`, triangle resize) as a baseline.
//!
//! ```text
//! cargo run --release -p fracture-benches --example preprocess_rate -- FILE.jpg [SECONDS]
//! ```
//! Prints `RESULT impl=... img_per_s=...` lines; `benches/preprocess_compare.py` runs it beside PIL
//! and OpenCV on the same file.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use fracture_data::{DecodeLimits, PreprocessConfig};
use image::imageops::FilterType;

fn rate(budget: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().context("usage: preprocess_rate FILE.jpg [SECONDS]")?);
    let seconds: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2.0);
    let budget = Duration::from_secs_f64(seconds);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let cfg = PreprocessConfig::with_size(128);
    let limits = DecodeLimits::default();
    cfg.load_bytes(&bytes, &path, &limits)?;

    let ours = rate(budget, || {
        let _ = std::hint::black_box(cfg.load_bytes(&bytes, &path, &limits));
    });
    let baseline = rate(budget, || {
        if let Ok(img) = image::load_from_memory(&bytes) {
            let gray = img.to_luma8();
            std::hint::black_box(image::imageops::resize(&gray, 128, 128, FilterType::Triangle));
        }
    });
    println!("RESULT impl=fracture-data img_per_s={ours:.1}");
    println!("RESULT impl=image-crate img_per_s={baseline:.1}");
    Ok(())
}
