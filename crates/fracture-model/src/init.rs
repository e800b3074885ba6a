//! Seeded parameter initialisation.
//!
//! Candle's CPU random generator cannot be seeded, so a model built through a plain `VarMap` starts
//! from different weights each run. [`seeded_var_builder`] draws every parameter from its own ChaCha8
//! stream, keyed by the run seed and the parameter's name, so the same seed gives the same model on
//! any device and in any construction order.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A `VarBuilder` that creates missing variables in `varmap` with seeded values (following each
/// layer's initialisation hint) and returns existing ones unchanged.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededInit {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}

struct SeededInit {
    varmap: VarMap,
    seed: u64,
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self.varmap.data();
        let mut vars = data
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        if let Some(existing) = vars.get(name) {
            if existing.shape() != &shape {
                candle_core::bail!(
                    "variable `{name}` has shape {:?}, expected {:?}",
                    existing.shape(),
                    shape
                );
            }
            return Ok(existing.as_tensor().clone());
        }
        let values = init_values(&shape, init, self.seed, name);
        let tensor = Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let data = self.varmap.data();
        let vars = data
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        match vars.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable named `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|v| v.contains_key(name))
            .unwrap_or(false)
    }
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Values for one parameter, drawn in f64 and stored as f64 (cast to the model dtype by the caller).
fn init_values(shape: &Shape, init: Init, seed: u64, name: &str) -> Vec<f64> {
    let n = shape.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash(name));
    let mut uniform = |lo: f64, up: f64| -> Vec<f64> { (0..n).map(|_| rng.random_range(lo..up)).collect() };
    match init {
        Init::Const(c) => vec![c; n],
        Init::Uniform { lo, up } => uniform(lo, up),
        Init::Randn { mean, stdev } => normal(n, mean, stdev, seed ^ name_hash(name)),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = fan.for_shape(shape).max(1);
            let std = non_linearity.gain() / (fan as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound)
                }
                NormalOrUniform::Normal => normal(n, 0.0, std, seed ^ name_hash(name)),
            }
        }
    }
}

/// `n` normal samples by the Box-Muller transform.
fn normal(n: usize, mean: f64, std: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push(mean + std * r * t.cos());
        out.push(mean + std * r * t.sin());
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_and_names_get_distinct_streams() {
        let dev = Device::Cpu;
        let a = VarMap::new();
        let b = VarMap::new();
        let va = seeded_var_builder(&a, 7, DType::F32, &dev);
        let vb = seeded_var_builder(&b, 7, DType::F32, &dev);
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let x = va.get_with_hints((4, 3), "x", init).unwrap();
        // Different creation order, same values.
        let y_b = vb.get_with_hints((4, 3), "y", init).unwrap();
        let x_b = vb.get_with_hints((4, 3), "x", init).unwrap();
        assert_eq!(x.to_vec2::<f32>().unwrap(), x_b.to_vec2::<f32>().unwrap());
        assert_ne!(x.to_vec2::<f32>().unwrap(), y_b.to_vec2::<f32>().unwrap());
        // A second request returns the same variable.
        let again = va.get_with_hints((4, 3), "x", init).unwrap();
        assert_eq!(again.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
        assert!(va.get_with_hints((2, 2), "x", init).is_err(), "shape mismatch");
    }

    #[test]
    fn kaiming_normal_has_the_expected_spread() {
        let shape = Shape::from((256, 64));
        let v = init_values(&shape, candle_nn::init::DEFAULT_KAIMING_NORMAL, 1, "w");
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        let expected = 2.0 / 64.0; // gain² / fan_in for ReLU
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var / expected - 1.0).abs() < 0.05, "{var} vs {expected}");
    }
}
