//! Benchmarks of the pipeline's stages on one thread unless stated:
//! preprocessing one 512 × 512 JPEG (ours vs the plain `image` crate), augmentation of a 128 × 128
//! image, a CPU forward pass of the seed CNN on a batch of 8, metrics on 100k predictions, and
//! decoding a 2,000 × 2,500 12-bit radiograph as DICOM (uncompressed and lossless JPEG) against the
//! same samples as a 16-bit PNG.
//!
//! `cargo bench -p fracture-benches --bench pipeline`. The JPEG is a FracAtlas radiograph (CC BY 4.0)
//! resized to 512 × 512 when `../shared/data/fracatlas` exists, otherwise a generated X-ray.
#![allow(clippy::print_stderr, clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::path::Path;

use candle_core::{DType, Device, ModuleT, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fracture_data::{Augment, AugmentConfig, Augmenter, DecodeLimits, PreprocessConfig, sample_rng};
use fracture_eval::{BinaryMetrics, ConfusionMatrix};
use fracture_model::{Model, ModelConfig};
use image::imageops::FilterType;

/// A FracAtlas radiograph (the first fractured training image) when the shared data exists,
/// otherwise a generated X-ray.
fn radiograph() -> image::GrayImage {
    match fracture_testkit::fracatlas_optional() {
        Some(root) => {
            let dir = root.join("train/fractured");
            let first = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .min()
                .unwrap();
            image::open(&first).unwrap().to_luma8()
        }
        None => fracture_testkit::synthetic_xray(640, 640, true, 1),
    }
}

fn jpeg_512() -> Vec<u8> {
    let gray = radiograph();
    let resized = image::imageops::resize(&gray, 512, 512, FilterType::Triangle);
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(resized)
        .into_rgb8()
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .unwrap();
    out.into_inner()
}

fn preprocess(c: &mut Criterion) {
    let bytes = jpeg_512();
    let cfg = PreprocessConfig::with_size(128);
    let limits = DecodeLimits::default();
    let origin = Path::new("bench.jpg");
    let mut group = c.benchmark_group("preprocess_512px_jpeg_to_128");
    group.throughput(Throughput::Elements(1));
    group.bench_function("fracture_data", |b| {
        b.iter(|| cfg.load_bytes(black_box(&bytes), origin, &limits).unwrap())
    });
    group.bench_function("image_crate_baseline", |b| {
        b.iter(|| {
            let gray = image::load_from_memory(black_box(&bytes)).unwrap().to_luma8();
            image::imageops::resize(&gray, 128, 128, FilterType::Triangle)
        })
    });
    group.finish();
}

/// Decoding a 2,000 × 2,500 12-bit radiograph to 8-bit luma: as DICOM (uncompressed, and lossless
/// JPEG) and as a 16-bit PNG of the same samples, in the same run.
fn dicom(c: &mut Criterion) {
    use fracture_testkit::dicom::{DicomSpec, dicom_bytes, syntax, to_twelve_bits};
    let (w, h) = (2000u32, 2500u32);
    let big = image::imageops::resize(&radiograph(), w, h, FilterType::Triangle);
    let samples: Vec<i32> = big.as_raw().iter().map(|&v| to_twelve_bits(v)).collect();
    let spec = DicomSpec {
        window: Some((2048.0, 4096.0)),
        ..DicomSpec::twelve_bit((w, h))
    };
    let plain = dicom_bytes(&samples, &spec);
    let lossless = dicom_bytes(
        &samples,
        &DicomSpec {
            syntax: syntax::JPEG_LOSSLESS_SV1,
            ..spec.clone()
        },
    );
    let png16 = {
        let img: image::ImageBuffer<image::Luma<u16>, Vec<u16>> =
            image::ImageBuffer::from_raw(w, h, samples.iter().map(|&v| v as u16).collect()).unwrap();
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("decode_2000x2500_12bit");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    for (name, bytes) in [
        ("dicom", &plain),
        ("dicom_jpeg_lossless", &lossless),
        ("png16", &png16),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| fracture_data::decode_gray(black_box(bytes), Path::new("bench"), &limits).unwrap())
        });
    }
    group.finish();
}

fn augment(c: &mut Criterion) {
    let aug = Augmenter::new(AugmentConfig::default()).unwrap();
    let img = fracture_data::to_unit(
        fracture_data::ndarray::Array2::from_shape_fn((128, 128), |(y, x)| ((x * 3 + y) % 256) as u8).view(),
    );
    let mut i = 0;
    c.bench_function("augment_128px", |b| {
        b.iter(|| {
            let mut x = img.clone();
            i += 1;
            aug.apply(&mut x, &mut sample_rng(0, 0, i));
            x
        })
    });
}

fn forward(c: &mut Criterion) {
    let model = Model::new(&ModelConfig::seed(128), 0, &Device::Cpu).unwrap();
    let x = Tensor::rand(0f32, 1.0, (8, 1, 128, 128), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let mut group = c.benchmark_group("seed_cnn_cpu");
    group.sample_size(10);
    group.throughput(Throughput::Elements(8));
    group.bench_function("forward_batch8_128px", |b| {
        b.iter(|| model.net.forward_t(black_box(&x), false).unwrap())
    });
    group.finish();
}

fn metrics(c: &mut Criterion) {
    let n = 100_000;
    let scores: Vec<f64> = (0..n).map(|i| ((i * 7919) % 1000) as f64 / 1000.0).collect();
    let actual: Vec<bool> = (0..n).map(|i| (i * 31) % 5 == 0).collect();
    c.bench_function("confusion_and_metrics_100k", |b| {
        b.iter(|| {
            BinaryMetrics::from_confusion(
                &ConfusionMatrix::from_scores(black_box(&scores), &actual, 0.5).unwrap(),
            )
        })
    });
}

criterion_group!(benches, preprocess, dicom, augment, forward, metrics);
criterion_main!(benches);
