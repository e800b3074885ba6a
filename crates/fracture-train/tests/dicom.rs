//! A trained model reads a radiograph stored as DICOM (every way `scanner_variants` writes it) as it
//! reads the source JPEG: the same P(fractured) within 0.02.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use fracture_testkit::dicom::scanner_variants;
use fracture_testkit::{SyntheticSpec, fresh_dir, write_synthetic_dataset};
use fracture_train::data::{DecodeLimits, decode_gray};
use fracture_train::{TrainedModel, train};

mod common;
use common::setup;

#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn dicom_copies_of_real_radiographs_get_the_source_probability() {
    let fracatlas = fracture_testkit::fracatlas();
    let root = fresh_dir(
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fracture-train-dicom"),
        "p",
    );
    write_synthetic_dataset(&root.join("data"), &SyntheticSpec::train_val((8, 8), (4, 4)));
    let outcome = train(&setup(&root.join("data"), &root.join("run"), 64, 2), &mut |_| {}).unwrap();
    let model = TrainedModel::load(&outcome.best_model, &fracture_train::candle_core::Device::Cpu).unwrap();
    let limits = DecodeLimits::default();
    let mut files: Vec<PathBuf> = ["val/fractured", "val/not fractured"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(fracatlas.join(d))
                .unwrap()
                .map(|e| e.unwrap().path())
        })
        .collect();
    files.sort();
    let mut spread = Vec::new();
    for path in files.iter().step_by(97).take(4) {
        let bytes = std::fs::read(path).unwrap();
        let predictor = model.predictor().with_limits(limits);
        let p_source = predictor.bytes(&bytes, path).unwrap().p_fractured;
        spread.push(p_source);
        let gray = decode_gray(&bytes, path, &limits).unwrap();
        for (name, _, dicom) in scanner_variants(gray.width(), gray.height(), gray.as_raw()) {
            let p = predictor.bytes(&dicom, "scan.dcm".as_ref()).unwrap().p_fractured;
            assert!(
                (p - p_source).abs() < 0.02,
                "{}: {name}: P(fractured) {p:.4} against {p_source:.4} from the JPEG",
                path.display()
            );
        }
    }
    // The model is not constant, so agreeing is not trivial.
    let (lo, hi) = spread
        .iter()
        .fold((1.0f64, 0.0f64), |(a, b), &p| (a.min(p), b.max(p)));
    assert!(
        hi - lo > 0.005,
        "the model answers {spread:?} for every radiograph"
    );
}
