//! Test support shared by the workspace's tests, examples and benches (a dev-dependency only).
//!
//! - [`fracatlas`] finds the real radiographs at `../shared/data/fracatlas` (beside the checkout) or
//!   at `$FRACTURE_SHARED_DIR/data/fracatlas`. The tests that need them are `#[ignore]`d with the
//!   reason ([`NEEDS_FRACATLAS`]), so `cargo test` anywhere lists them as ignored, and `cargo test --
//!   --include-ignored` (what `.ci/run` runs) runs them, failing when the data is missing.
//!   [`fracatlas_optional`] serves tests that use a real radiograph when there is one.
//! - [`synthetic_xray`] and [`write_synthetic_dataset`] generate small X-ray-like images in which the
//!   fractured class carries a visible crack, so a model can learn them in seconds. Fixtures are
//!   generated, never committed.
//! - [`KaggleStub`] stands in for the Kaggle download API and its storage host on loopback, and
//!   [`kaggle_shaped_zip`] builds a small archive shaped like the real download.
#![warn(missing_docs)]
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::path::{Path, PathBuf};

pub mod copies;
mod corpus;
pub mod dicom;
mod fuzz;
mod kaggle;
mod models;
#[cfg(feature = "onnx")]
pub mod onnx;
pub use corpus::{BadInput, Expect, png_bomb_header, write_bad_inputs};
pub use fuzz::{DEFAULT_CASES, fuzz_bytes};
pub use kaggle::{
    Announce, KaggleStub, StubOptions, StubRequest, fracatlas_shaped_zip, kaggle_shaped_zip, zip_of,
};
pub use models::{BadModel, ModelKeys, write_bad_models};

use image::{GrayImage, Luma};

/// The workspace root (the folder with the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The read-only shared folder: `$FRACTURE_SHARED_DIR`, or `shared/` beside the checkout.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("FRACTURE_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("../shared"),
    }
}

/// Whether tests must fail rather than skip when the shared data is missing.
pub fn shared_required() -> bool {
    std::env::var("FRACTURE_REQUIRE_SHARED").is_ok_and(|v| v == "1")
}

/// Why a test that needs the FracAtlas radiographs is ignored by default (`#[ignore = …]` takes a
/// literal, so the tests repeat this text).
pub const NEEDS_FRACATLAS: &str =
    "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it";

/// The FracAtlas radiographs (`<shared>/data/fracatlas`, CC BY 4.0, Abedeen et al. 2023) for a test
/// that needs them. Such tests are `#[ignore]`d, so they run only when asked for (`cargo test --
/// --include-ignored`, as `.ci/run` does); asked for without the data, this panics naming where
/// it looked, never a silent pass.
pub fn fracatlas() -> PathBuf {
    fracatlas_optional().unwrap_or_else(|| {
        panic!(
            "the FracAtlas radiographs are not at {} (set FRACTURE_SHARED_DIR, or run without --include-ignored)",
            shared_dir().join("data/fracatlas").display()
        )
    })
}

/// The FracAtlas radiographs when they are here, for a test that runs either way and uses a real
/// radiograph when it can (a generated one otherwise). Panics when they are missing and
/// `FRACTURE_REQUIRE_SHARED=1` (set by `.ci/run`).
pub fn fracatlas_optional() -> Option<PathBuf> {
    let dir = shared_dir().join("data/fracatlas");
    if dir.join("train").is_dir() {
        return Some(dir);
    }
    assert!(
        !shared_required(),
        "FRACTURE_REQUIRE_SHARED=1 but the FracAtlas radiographs are not at {}",
        dir.display()
    );
    None
}

/// The ImageNet-pretrained EfficientNet-Lite0 files (`<shared>/pretrained`: the PyTorch file, its
/// safetensors copy, the known answers; Apache-2.0) for a test that needs them (ignored by
/// default, like [`fracatlas`]); panics when they are missing.
pub fn pretrained() -> PathBuf {
    let dir = shared_dir().join("pretrained");
    assert!(
        dir.join("reference-outputs.json").is_file(),
        "the pretrained weights are not at {} (set FRACTURE_SHARED_DIR, or run without --include-ignored)",
        dir.display()
    );
    dir
}

/// An empty folder `<base>/<name>`, removed first if it exists.
pub fn fresh_dir(base: &Path, name: &str) -> PathBuf {
    let dir = base.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small deterministic generator (SplitMix64), so fixtures need no RNG dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform value in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// An X-ray-like `width × height` image: dark background, a bright bone shaft at a random position
/// and angle, mild noise; when `fractured`, a dark crack crosses the shaft.
pub fn synthetic_xray(width: u32, height: u32, fractured: bool, seed: u64) -> GrayImage {
    let mut rng = Rng::new(seed);
    let (w, h) = (width as f32, height as f32);
    let cx = w * (0.35 + 0.3 * rng.unit());
    let tilt = (rng.unit() - 0.5) * 0.4;
    let half = w * (0.08 + 0.05 * rng.unit());
    let crack_y = h * (0.3 + 0.4 * rng.unit());
    let crack_slope = (rng.unit() - 0.5) * 1.2;
    let crack_half = (h * 0.05).max(1.5);
    GrayImage::from_fn(width, height, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let axis = cx + tilt * (yf - h * 0.5);
        let d = (xf - axis).abs();
        let mut v = 0.12 + 0.05 * rng.unit();
        if d < half {
            // Cortex brighter than the marrow.
            v = 0.6 + 0.3 * (d / half) + 0.04 * rng.unit();
            let crack = (yf - crack_y - crack_slope * (xf - axis)).abs();
            if fractured && crack < crack_half {
                v = 0.15 + 0.05 * rng.unit();
            }
        }
        Luma([(v.clamp(0.0, 1.0) * 255.0) as u8])
    })
}

/// Counts and format of a generated dataset.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    /// Per split folder name: (fractured count, not-fractured count).
    pub splits: Vec<(String, usize, usize)>,
    /// Image side in pixels.
    pub size: u32,
    /// File extension, `png` or `jpg`.
    pub extension: &'static str,
    /// Seed of the first image.
    pub seed: u64,
}

impl SyntheticSpec {
    /// `train`/`val` splits with the given counts, 48-pixel PNGs.
    pub fn train_val(train: (usize, usize), val: (usize, usize)) -> Self {
        SyntheticSpec {
            splits: vec![("train".into(), train.0, train.1), ("val".into(), val.0, val.1)],
            size: 48,
            extension: "png",
            seed: 1,
        }
    }
}

/// Writes `<root>/<split>/{fractured,not fractured}/img_NNNN.<ext>` for every split of `spec`.
pub fn write_synthetic_dataset(root: &Path, spec: &SyntheticSpec) {
    let mut seed = spec.seed;
    for (split, fractured, normal) in &spec.splits {
        for (class, count, is_fractured) in
            [("fractured", *fractured, true), ("not fractured", *normal, false)]
        {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..count {
                seed += 1;
                let img = synthetic_xray(spec.size, spec.size, is_fractured, seed);
                img.save(dir.join(format!("img_{i:04}.{}", spec.extension)))
                    .unwrap();
            }
        }
    }
}

/// Peak resident memory in bytes (`VmHWM` of `/proc/<pid>/status`) of process `pid`, or of this
/// process when `None`. `None` where `/proc` is not available (not Linux) or the process is gone.
pub fn peak_rss_bytes(pid: Option<u32>) -> Option<u64> {
    let file = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(file).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The first number of a Markdown table row `| {row} | number …` in `card` (the ready model's card,
/// `crates/fracture-cli/models/README.md`), for the checks that hold the card to a fresh
/// evaluation (a test and `cargo xtask default-model`).
pub fn card_value(card: &str, row: &str) -> Option<f64> {
    let prefix = format!("| {row} |");
    let line = card.lines().find(|l| l.starts_with(&prefix))?;
    line[prefix.len()..]
        .split('|')
        .next()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
