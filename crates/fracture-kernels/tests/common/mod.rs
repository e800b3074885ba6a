//! Helpers shared by the kernels' integration tests.

#![allow(dead_code, clippy::unwrap_used)]

use candle_core::{Device, Tensor};

/// `n` deterministic pseudo-random values in [-1, 1) (xorshift from `seed`).
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A tensor of `shape` filled with [`values`].
pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(values(shape.iter().product(), seed), shape, &Device::Cpu).unwrap()
}

/// Runs the test `name` of this test binary again in a child process with `key=value` in its
/// environment, and fails unless it passed there. The calling test should return early when `key`
/// is already set (it is then the child).
pub(crate) fn passes_in_child_with(name: &str, key: &str, value: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads", "1"])
        .env(key, value)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} with {key}={value}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
