//! Helpers shared by the model's integration tests.

#![allow(dead_code, clippy::unwrap_used)]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// A deterministic pseudo-random image batch `(b, 1, s, s)` in [0, 1].
pub(crate) fn input(b: usize, s: usize, seed: u64, dtype: DType) -> Tensor {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<f64> = (0..b * s * s)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect();
    Tensor::from_vec(data, (b, 1, s, s), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Stable binary cross-entropy with logits: max(x,0) − x·y + ln(1 + e^(−|x|)), mean over the batch.
pub(crate) fn bce(logits: &Tensor, targets: &Tensor) -> Tensor {
    let relu = logits.relu().unwrap();
    let softplus = logits
        .abs()
        .unwrap()
        .neg()
        .unwrap()
        .exp()
        .unwrap()
        .affine(1.0, 1.0)
        .unwrap()
        .log()
        .unwrap();
    ((relu - (logits * targets).unwrap()).unwrap() + softplus)
        .unwrap()
        .mean_all()
        .unwrap()
}

/// Checks `per_tensor` elements of every variable (f64) against central finite differences of
/// `loss` with step 1e-6: |numeric − backward| ≤ 1e-6 + 1e-4 · max(|numeric|, |backward|). Every
/// variable is restored afterwards. Returns how many elements were checked.
pub(crate) fn assert_backward_matches_finite_differences(
    vars: &[(String, Var)],
    grads: &GradStore,
    loss: impl Fn() -> f64,
    per_tensor: usize,
) -> usize {
    let eps = 1e-6;
    let mut checked = 0;
    for (name, var) in vars {
        let grad = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let set = |v: Vec<f64>| {
            var.set(&Tensor::from_vec(v, var.shape(), var.device()).unwrap())
                .unwrap()
        };
        let n = base.len();
        for k in 0..n.min(per_tensor) {
            let i = (k * 7919) % n;
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                set(v);
                loss()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            set(base.clone());
            let err = (numeric - grad[i]).abs();
            assert!(
                err <= 1e-6 + 1e-4 * numeric.abs().max(grad[i].abs()),
                "{name}[{i}]: backward {} vs finite difference {numeric}",
                grad[i]
            );
            checked += 1;
        }
    }
    checked
}

/// A `size × size` image of deterministic noise in [0.1, 0.3] (varying with `i`) and, when `patch` is
/// `Some((row, column))`, a bright `side × side` square with that top-left corner.
pub(crate) fn patch_image(size: usize, i: usize, patch: Option<(usize, usize)>, side: usize) -> Vec<f32> {
    (0..size * size)
        .map(|k| {
            let (y, x) = (k / size, k % size);
            let noise = ((k * 7919 + i * 104_729) % 97) as f32 / 97.0 * 0.2 + 0.1;
            match patch {
                Some((py, px)) if (py..py + side).contains(&y) && (px..px + side).contains(&x) => 0.95,
                _ => noise,
            }
        })
        .collect()
}

/// The share of a `size × size` map's mass in its top-left `corner × corner` square (0 when the map
/// is all zeros).
pub(crate) fn corner_mass(map: &[f32], size: usize, corner: usize) -> f32 {
    let (mut inside, mut total) = (0.0f32, 0.0f32);
    for y in 0..size {
        for x in 0..size {
            let v = map[y * size + x];
            total += v;
            if y < corner && x < corner {
                inside += v;
            }
        }
    }
    if total > 0.0 { inside / total } else { 0.0 }
}
