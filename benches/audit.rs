//! The leakage audit's two costs: signatures of 64 radiographs (512 × 512 JPEGs, both cores) against
//! preprocessing the same 64 for training (`PreprocessConfig` at 128 px, both cores) in the same run,
//! and grouping 100,000 signatures (generated: random hashes with 1,000 planted near copies).
//!
//! `cargo bench -p fracture-benches --bench audit`. The JPEGs are FracAtlas radiographs (CC BY 4.0)
//! when `../shared/data/fracatlas` exists, otherwise generated X-rays. Targets: signatures at least
//! the preprocessing rate; grouping 100,000 in under 10 s on 2 cores.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fracture_data::audit::{AuditImage, DEFAULT_THRESHOLD, Signature, group, signature};
use fracture_data::{DecodeLimits, Label, PreprocessConfig};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

const IMAGES: usize = 64;
const SIGNATURES: usize = 100_000;

fn jpegs() -> Vec<Vec<u8>> {
    let grays: Vec<image::GrayImage> = match fracture_testkit::fracatlas_optional() {
        Some(root) => {
            let mut files: Vec<_> = std::fs::read_dir(root.join("val/not fractured"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            files
                .iter()
                .take(IMAGES)
                .map(|p| image::open(p).unwrap().to_luma8())
                .collect()
        }
        None => (0..IMAGES as u64)
            .map(|s| fracture_testkit::synthetic_xray(640, 640, s % 2 == 0, s))
            .collect(),
    };
    grays
        .iter()
        .map(|g| {
            let resized = image::imageops::resize(g, 512, 512, image::imageops::FilterType::Triangle);
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
                .encode(resized.as_raw(), 512, 512, image::ExtendedColorType::L8)
                .unwrap();
            out
        })
        .collect()
}

fn signatures_vs_preprocessing(c: &mut Criterion) {
    let files = jpegs();
    let limits = DecodeLimits::default();
    let origin = Path::new("bench.jpg");
    let preprocess = PreprocessConfig::with_size(128);
    let mut group = c.benchmark_group("audit_64_jpegs_512px");
    group.throughput(Throughput::Elements(IMAGES as u64));
    group.bench_function("preprocess_128", |b| {
        b.iter(|| {
            files
                .par_iter()
                .map(|bytes| preprocess.load_bytes(black_box(bytes), origin, &limits).unwrap())
                .collect::<Vec<_>>()
        })
    });
    let thumbnail = PreprocessConfig::with_size(fracture_data::audit::THUMBNAIL_SIDE);
    group.bench_function("thumbnail_only", |b| {
        b.iter(|| {
            files
                .par_iter()
                .map(|bytes| thumbnail.load_bytes(black_box(bytes), origin, &limits).unwrap())
                .collect::<Vec<_>>()
        })
    });
    group.bench_function("signature", |b| {
        b.iter(|| {
            files
                .par_iter()
                .map(|bytes| signature(black_box(bytes), origin, &limits).unwrap())
                .collect::<Vec<_>>()
        })
    });
    group.finish();
}

/// Random signatures; every 100th is a near copy (3 bits flipped in probe 0) of the one before.
fn synthetic_signatures() -> Vec<Signature> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut out: Vec<Signature> = Vec::with_capacity(SIGNATURES);
    for i in 0..SIGNATURES {
        let detail = [rng.random(), rng.random(), rng.random(), rng.random::<u64>() >> 1];
        let mut sig = Signature {
            sha256: rng.random(),
            fingerprint: rng.random::<u64>() >> 1,
            detail,
            probes: (0..88).map(|_| rng.random::<u64>() >> 1).collect(),
            view_details: vec![detail; 11],
        };
        if i % 100 == 1 {
            let previous = &out[i - 1];
            sig.fingerprint = previous.probes[0] ^ 0b1001_0001;
            sig.detail = previous.probe_detail(0);
        }
        out.push(sig);
    }
    out
}

fn grouping(c: &mut Criterion) {
    let signatures = synthetic_signatures();
    let images: Vec<AuditImage> = (0..SIGNATURES)
        .map(|i| {
            AuditImage::new(
                format!("img{i}.png"),
                ["train", "val"][i % 2],
                Label::NotFractured,
            )
        })
        .collect();
    let mut g = c.benchmark_group("audit_group");
    g.sample_size(10).measurement_time(Duration::from_secs(30));
    g.throughput(Throughput::Elements(SIGNATURES as u64));
    g.bench_function("100k_signatures", |b| {
        b.iter(|| {
            let report = group(images.clone(), black_box(&signatures), DEFAULT_THRESHOLD);
            assert!(report.groups.len() >= SIGNATURES / 100);
            report.groups.len()
        })
    });
    g.finish();
}

criterion_group!(benches, signatures_vs_preprocessing, grouping);
criterion_main!(benches);
