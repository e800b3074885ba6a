//! The one prediction path: bytes, files, datasets and preprocessed inputs give the same calibrated
//! P(fractured) and decision; evidence and explanations agree with it; test-time views are the mean
//! of the flipped images; unreadable files and non-numbers are reported by name.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fracture_data::image::{GrayImage, ImageFormat, imageops};
use fracture_data::ndarray::{Array3, Axis};
use fracture_data::{FolderDataset, Item, Label, LoadOptions, PreprocessConfig};
use fracture_eval::Platt;
use fracture_infer::calibrate::Calibration;
use fracture_infer::model::{CamMethod, Model, ModelConfig};
use fracture_infer::{Error, ModelMeta, TrainedModel, Tta};
use fracture_testkit::{fresh_dir, synthetic_xray};

const SIZE: u32 = 32;

/// A fresh seed CNN with a calibration that moves every probability (so a path that forgets it
/// disagrees) and a threshold near the middle of its outputs.
fn model(dir: &Path) -> TrainedModel {
    model_with(dir, false)
}

/// [`model`], with its first weight tensor set to NaN when `poisoned`.
fn model_with(dir: &Path, poisoned: bool) -> TrainedModel {
    let file = dir.join("model.safetensors");
    let meta = ModelMeta {
        calibration: Some(Calibration {
            platt: Platt { a: 3.0, b: -0.4 },
            images: 10,
            positives: 5,
            ece_uncalibrated: None,
            ece_cross_fitted: None,
            brier_cross_fitted: None,
        }),
        ..ModelMeta::new(PreprocessConfig::with_size(SIZE), 0.5)
    };
    let fresh = Model::new(&ModelConfig::seed(SIZE as usize), 11, &Device::Cpu).unwrap();
    if poisoned {
        for (_, var) in fresh.named_vars() {
            let nan = Tensor::full(f32::NAN, var.shape(), &Device::Cpu).unwrap();
            var.set(&nan).unwrap();
        }
    }
    let trained = TrainedModel {
        model: fresh,
        meta,
        path: file.clone(),
    };
    if poisoned {
        // A file of non-numbers is refused on load, so the poisoned network is used as built.
        return trained;
    }
    trained.save(&file).unwrap();
    TrainedModel::load(&file, &Device::Cpu).unwrap()
}

fn png(image: &GrayImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut out), ImageFormat::Png)
        .unwrap();
    out
}

/// Radiographs of differing shapes written as PNG files.
fn images(dir: &Path, n: usize) -> Vec<(PathBuf, GrayImage)> {
    (0..n)
        .map(|k| {
            let image = synthetic_xray(40 + 7 * k as u32, 36 + 5 * k as u32, k % 2 == 0, k as u64);
            let path = dir.join(format!("img_{k}.png"));
            std::fs::write(&path, png(&image)).unwrap();
            (path, image)
        })
        .collect()
}

#[test]
fn bytes_files_datasets_and_inputs_give_the_same_calibrated_prediction() {
    let dir = fresh_dir(&std::env::temp_dir(), "fracture-infer-predictor-paths");
    let model = model(&dir);
    let images = images(&dir, 11);
    let files: Vec<PathBuf> = images.iter().map(|(p, _)| p.clone()).collect();
    let predictor = model.predictor();

    let from_bytes: Vec<f64> = files
        .iter()
        .map(|f| {
            predictor
                .bytes(&std::fs::read(f).unwrap(), f)
                .unwrap()
                .p_fractured
        })
        .collect();
    // Batches of 4 files, passes of 8 images: a short last batch and pass are both exercised.
    let (from_files, skipped) = predictor.files(&files, 4).unwrap();
    assert!(skipped.is_empty());
    let items: Vec<Item> = files
        .iter()
        .map(|p| Item {
            path: p.clone(),
            label: Label::Fractured,
        })
        .collect();
    let dataset = FolderDataset::load(&items, model.preprocess(), &LoadOptions::default()).unwrap();
    let from_dataset = predictor.dataset(&dataset, 3).unwrap();

    // The network's own logits, calibrated by hand: the reference all paths must meet.
    let pre = model.preprocess();
    let mut batch = Array3::<f32>::zeros((files.len(), SIZE as usize, SIZE as usize));
    for (k, (_, image)) in images.iter().enumerate() {
        batch
            .index_axis_mut(Axis(0), k)
            .assign(&pre.to_input(pre.resize(image).unwrap().view()));
    }
    let from_inputs = predictor.inputs(&batch).unwrap();
    let x = fracture_infer::images_to_tensor(batch.view(), &Device::Cpu).unwrap();
    let logits = candle_core::ModuleT::forward_t(&model.model.net, &x, false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let by_hand: Vec<f64> = logits
        .iter()
        .map(|&l| Platt { a: 3.0, b: -0.4 }.apply(fracture_infer::sigmoid(l)))
        .collect();

    for k in 0..files.len() {
        for (what, p) in [
            ("bytes", from_bytes[k]),
            ("files", from_files[k].p_fractured),
            ("dataset", from_dataset[k]),
            ("inputs", from_inputs[k]),
        ] {
            assert!(
                (p - by_hand[k]).abs() < 1e-6,
                "image {k}: {what} gives {p}, the calibrated network {}",
                by_hand[k]
            );
        }
        assert_eq!(from_files[k].path, files[k]);
        assert_eq!(
            from_files[k].fractured,
            from_files[k].p_fractured >= model.threshold()
        );
        assert!(from_files[k].evidence.is_none(), "evidence was not asked for");
    }
    // The calibration moved the probabilities: a path that skipped it would have been caught.
    let uncalibrated = fracture_infer::sigmoid(logits[0]);
    assert!((uncalibrated - by_hand[0]).abs() > 1e-3);
}

#[test]
fn evidence_and_explanations_agree_with_the_plain_prediction() {
    let dir = fresh_dir(&std::env::temp_dir(), "fracture-infer-predictor-evidence");
    let model = model(&dir);
    let images = images(&dir, 5);
    let files: Vec<PathBuf> = images.iter().map(|(p, _)| p.clone()).collect();
    let layer = model.model.net.default_cam_layer();
    let plain = model.predictor().files(&files, 8).unwrap().0;
    let with = model
        .predictor()
        .with_evidence(Some(layer))
        .files(&files, 8)
        .unwrap()
        .0;
    for ((a, b), (path, image)) in plain.iter().zip(&with).zip(&images) {
        // With evidence, P comes from the map's pass: the same number.
        assert!((a.p_fractured - b.p_fractured).abs() < 1e-6, "{a:?} {b:?}");
        let bytes = std::fs::read(path).unwrap();
        let explained = model
            .predictor()
            .explain(&bytes, path, CamMethod::default(), layer)
            .unwrap();
        assert!((explained.p_fractured - a.p_fractured).abs() < 1e-6);
        assert_eq!(explained.fractured, a.fractured);
        // The evidence lies inside the image's own pixels, and is the explanation's.
        if let Some(e) = b.evidence {
            let (w, h) = (f64::from(image.width()), f64::from(image.height()));
            assert!(
                e.peak[0] >= 0.0 && e.peak[0] <= w && e.peak[1] >= 0.0 && e.peak[1] <= h,
                "{e:?}"
            );
            assert!(e.region[0] + e.region[2] <= w + 1.0 && e.region[1] + e.region[3] <= h + 1.0);
            assert_eq!(explained.evidence(), Some(e));
        }
    }
    assert!(with.iter().any(|p| p.evidence.is_some()), "no image had evidence");
}

#[test]
fn test_time_views_are_the_mean_over_the_flipped_images() {
    let dir = fresh_dir(&std::env::temp_dir(), "fracture-infer-predictor-tta");
    let model = model(&dir);
    let (path, image) = images(&dir, 1).remove(0);
    // The mean is taken before calibration, as the network's sigmoid outputs average.
    let raw = |image: &GrayImage| {
        let pre = model.preprocess();
        let input = pre.to_input(pre.resize(image).unwrap().view());
        let x = fracture_infer::image_to_tensor(input.view(), &Device::Cpu).unwrap();
        let logit = candle_core::ModuleT::forward_t(&model.model.net, &x, false)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        fracture_infer::sigmoid(logit)
    };
    let flipped = [
        image.clone(),
        imageops::flip_horizontal(&image),
        imageops::flip_vertical(&image),
        imageops::flip_vertical(&imageops::flip_horizontal(&image)),
    ];
    let mean = flipped.iter().map(raw).sum::<f64>() / 4.0;
    let expected = Platt { a: 3.0, b: -0.4 }.apply(mean);
    let bytes = std::fs::read(&path).unwrap();
    let p = model
        .predictor()
        .with_views(Tta::Flips)
        .bytes(&bytes, &path)
        .unwrap();
    assert!(
        (p.p_fractured - expected).abs() < 1e-5,
        "{} vs {expected}",
        p.p_fractured
    );
    // A model without a training record averages its mirror: `with_tta(true)` chooses that.
    assert_eq!(model.predictor().with_tta(true).views(), Tta::Mirror);
    assert_eq!(model.predictor().with_tta(false).views(), Tta::Off);
}

#[test]
fn unreadable_files_are_reported_in_order_and_non_numbers_name_the_image() {
    let dir = fresh_dir(&std::env::temp_dir(), "fracture-infer-predictor-errors");
    let model = model(&dir);
    let mut files: Vec<PathBuf> = images(&dir, 3).into_iter().map(|(p, _)| p).collect();
    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"\x89PNG not really").unwrap();
    files.insert(1, broken.clone());
    let mut seen = Vec::new();
    model
        .predictor()
        .files_each(&files, 2, &mut |r| {
            seen.push(match r {
                Ok(p) => p.path,
                Err(s) => {
                    assert!(s.reason.contains("broken.png"), "{}", s.reason);
                    s.path
                }
            });
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, files, "every file answered once, in input order");

    // Weights that give NaN: an error naming the image, never a NaN probability.
    let model = model_with(&dir, true);
    let bytes = std::fs::read(&files[0]).unwrap();
    let err = model
        .predictor()
        .bytes(&bytes, "ward-3.png".as_ref())
        .unwrap_err();
    assert!(matches!(err, Error::NoPrediction { .. }), "{err}");
    assert!(err.to_string().contains("ward-3.png"), "{err}");
    // In a batch of files, the run stops with the same error, naming the file.
    let err = model.predictor().files(&files[..1], 1).unwrap_err();
    assert!(err.to_string().contains("img_0.png"), "{err}");
}
