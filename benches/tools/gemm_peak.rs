//! GFLOP/s of the matrix products, FP32 and BF16 on every backend this processor has, against the
//! processor's nominal peak, on the products EfficientNet-Lite0's 1×1 convolutions make at 224 px
//! (one image) and on a square 2048² product (the measured ceiling).
//!
//! ```text
//! cargo run --release -p fracture-benches --example gemm_peak
//! ```
//! The nominal peak is frequency × flops per cycle per core × cores: FP32 FMA 2 units × 16 lanes
//! (AVX-512) or 8 lanes (AVX2) × 2 flops; AVX-512 BF16 `vdpbf16ps` 2 units × 32 products × 2
//! flops; AMX `tdpbf16ps` 1,024 products per cycle × 2 flops. The frequency is the `cpu MHz` of
//! /proc/cpuinfo (the base clock a virtual machine reports; turbo can exceed it). Where the
//! processor has AVX-512 BF16 it first times the two instructions themselves on one core
//! (`fracture_kernels::dot_instruction_times`): the measured ceiling of BF16 against FP32.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Instant;

use fracture_kernels::{Bf16Backend, matmul_bf16};

#[global_allocator]
static ALLOCATOR: fracture_alloc::MiMalloc = fracture_alloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    fracture_alloc::keep_freed_memory();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| cpuinfo.split_whitespace().any(|w| w == f);
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let cores = rayon::current_num_threads() as f64;
    let fp32_lanes = if has("avx512f") { 16.0 } else { 8.0 };
    let peak = |b: Bf16Backend| -> f64 {
        let per_cycle = match b {
            Bf16Backend::Amx => 1024.0 * 2.0,
            Bf16Backend::Avx512 => 2.0 * 32.0 * 2.0,
            Bf16Backend::Emulated | Bf16Backend::Fp32 => 2.0 * fp32_lanes * 2.0,
        };
        mhz * 1e6 * per_cycle * cores / 1e9
    };
    println!(
        "{} threads, {mhz:.0} MHz; nominal peak GFLOP/s: fp32 {:.0}{}",
        cores,
        peak(Bf16Backend::Fp32),
        [Bf16Backend::Avx512, Bf16Backend::Amx]
            .into_iter()
            .filter(|b| b.is_supported())
            .map(|b| format!(", bf16 on {b} {:.0}", peak(b)))
            .collect::<String>()
    );
    if let Some((dp, fma)) = fracture_kernels::dot_instruction_times(20_000_000) {
        // Twice the flops per instruction: BF16 products can only win where `vdpbf16ps` costs
        // less than two FMAs.
        println!(
            "one core: vdpbf16ps {dp:.3} ns, vfmadd231ps {fma:.3} ns per instruction (16 chains); \
             BF16 flop rate / FP32 flop rate at the instructions' ceiling: {:.2}×",
            2.0 * fma / dp
        );
    }
    // (m, k, n): EfficientNet-Lite0's 1×1 convolutions at 224 px for one image (Cout × Cin ·
    // Cin × HW), then the square ceiling.
    let shapes = [
        ("expand 16→96 at 112²", 96, 16, 112 * 112),
        ("project 144→24 at 56²", 24, 144, 56 * 56),
        ("expand 40→240 at 28²", 240, 40, 28 * 28),
        ("project 672→192 at 7²", 192, 672, 7 * 7),
        ("head 320→1280 at 7²", 1280, 320, 7 * 7),
        ("square 2048²", 2048, 2048, 2048),
    ];
    let backends: Vec<Bf16Backend> = Bf16Backend::available()
        .into_iter()
        .filter(|b| *b != Bf16Backend::Emulated)
        .collect();
    println!(
        "| product (m × k · k × n) | {} |",
        backends
            .iter()
            .map(|b| format!("{} GFLOP/s (% of peak)", name(*b)))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(backends.len()));
    for (label, m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 17 % 89) as f32 - 44.0) / 45.0).collect();
        let flops = 2.0 * (m * k * n) as f64;
        let mut cells = Vec::new();
        for &backend in &backends {
            let reps = ((2e9 / flops).ceil() as usize).clamp(3, 2000);
            matmul_bf16(&a, &b, [m, k, n], backend)?;
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(matmul_bf16(&a, &b, [m, k, n], backend)?);
            }
            let rate = flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9;
            cells.push(format!("{rate:.0} ({:.0}%)", 100.0 * rate / peak(backend)));
        }
        println!("| {label}: {m} × {k} · {k} × {n} | {} |", cells.join(" | "));
    }
    Ok(())
}

fn name(b: Bf16Backend) -> String {
    match b {
        Bf16Backend::Fp32 => "fp32".into(),
        other => format!("bf16 on {other}"),
    }
}
