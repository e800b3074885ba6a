//! Adam whose state can be saved and restored, so a resumed run continues exactly.
//!
//! Candle's `AdamW` keeps its moments private; a checkpoint of it holds the weights only, and a
//! resumed run restarts the moment estimates from zero.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::{AdamConfig, Error, Result};

/// Adam (Kingma & Ba) with bias correction and optional decoupled weight decay, over named
/// parameters. Update of each parameter `p` with gradient `g` at step `t`:
///
/// ```text
/// m ← β1·m + (1 − β1)·g            v ← β2·v + (1 − β2)·g²
/// p ← p·(1 − lr·wd)                 p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
/// ```
/// (PyTorch's `Adam`/`AdamW` arithmetic.)
#[derive(Debug)]
pub struct Adam {
    config: AdamConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: u64,
}

impl Adam {
    /// An optimizer over `params` (name, variable), moments at zero.
    pub fn new(params: Vec<(String, Var)>, config: AdamConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(|(_, p)| p.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Adam {
            config,
            params,
            m,
            v,
            t: 0,
        })
    }

    /// Steps taken so far (the `t` of the bias correction).
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// The parameters, in the optimizer's order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with learning rate `lr` from the gradients in `grads`. A parameter without a
    /// gradient is left unchanged (its moments too).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let AdamConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.config;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - beta2.powi(self.t as i32)).sqrt();
        let step_size = lr / bc1;
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            let m = ((&self.m[i] * beta1)? + (g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let mut p = var.as_tensor().clone();
            if weight_decay > 0.0 {
                p = (p * (1.0 - lr * weight_decay))?;
            }
            let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
            let update = ((&m / denom)? * step_size)?;
            var.set(&(p - update)?)?;
            // Detached: otherwise each moment keeps this step's gradient graph alive, which keeps the
            // previous moment's graph alive, and memory grows without bound over a run.
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }

    /// Back-propagates `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor, lr: f64) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads, lr)
    }

    /// The moments as named tensors: `adam.m.<param>` and `adam.v.<param>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("adam.m.{name}"), self.m[i].clone()));
            out.push((format!("adam.v.{name}"), self.v[i].clone()));
        }
        out
    }

    /// Restores the moments (taken out of `tensors` by name) and the step count.
    pub fn load_state(&mut self, tensors: &mut HashMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("adam.{kind}.{name}");
                let tensor = tensors
                    .remove(&key)
                    .ok_or_else(|| Error::InvalidConfig(format!("optimizer state `{key}` is missing")))?;
                if tensor.dims() != var.dims() {
                    return Err(Error::InvalidConfig(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        tensor.dims(),
                        var.dims()
                    )));
                }
                *slot = tensor.to_device(var.device())?.to_dtype(var.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the documented update of PyTorch's `torch.optim.Adam`, replayed in f64 for one
    /// scalar: p0 = 1.0, loss p² (g = 2p), lr 0.1, default betas and eps.
    #[test]
    fn matches_the_reference_update_on_a_quadratic() {
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f64], &dev).unwrap();
        let mut opt = Adam::new(
            vec![("p".into(), p.clone())],
            AdamConfig {
                lr: 0.1,
                ..AdamConfig::default()
            },
        )
        .unwrap();
        // Reference loop in f64 with the same formula.
        let (mut rp, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for t in 1..=5 {
            let loss = p.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.backward_step(&loss, 0.1).unwrap();
            let g = 2.0 * rp;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let denom = (v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt()) + 1e-8;
            rp -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / denom;
            let got = p.as_tensor().to_vec1::<f64>().unwrap()[0];
            assert!((got - rp).abs() < 1e-12, "step {t}: {got} vs {rp}");
        }
        assert_eq!(opt.steps(), 5);
    }

    #[test]
    fn moments_do_not_keep_graphs_alive() {
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f32, 2.0, 3.0], &dev).unwrap();
        let mut opt = Adam::new(vec![("p".into(), p.clone())], AdamConfig::default()).unwrap();
        for _ in 0..3 {
            let loss = (p.as_tensor().sqr().unwrap() * 2.0).unwrap().sum_all().unwrap();
            opt.backward_step(&loss, 1e-2).unwrap();
        }
        assert!(
            opt.m.iter().chain(&opt.v).all(|t| !t.track_op()),
            "a moment tensor still tracks its graph"
        );
    }

    #[test]
    fn state_round_trips() {
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let mut a = Adam::new(vec![("w".into(), p.clone())], AdamConfig::default()).unwrap();
        a.backward_step(&p.as_tensor().sqr().unwrap().sum_all().unwrap(), 1e-2)
            .unwrap();
        let mut state: HashMap<String, Tensor> = a.state_tensors().into_iter().collect();
        assert!(state.contains_key("adam.m.w") && state.contains_key("adam.v.w"));
        let q = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let mut b = Adam::new(vec![("w".into(), q.clone())], AdamConfig::default()).unwrap();
        b.load_state(&mut state, a.steps()).unwrap();
        assert_eq!(b.steps(), 1);
        assert_eq!(b.m[0].to_vec1::<f32>().unwrap(), a.m[0].to_vec1::<f32>().unwrap());
        let mut empty = HashMap::new();
        assert!(
            b.load_state(&mut empty, 1)
                .unwrap_err()
                .to_string()
                .contains("adam.m.w")
        );
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let dev = Device::Cpu;
        let p = Var::new(&[2.0f64], &dev).unwrap();
        let cfg = AdamConfig {
            weight_decay: 0.5,
            ..AdamConfig::default()
        };
        let mut opt = Adam::new(vec![("p".into(), p.clone())], cfg).unwrap();
        // A vanishing gradient (1e-30) moves p by ~1e-23: only the decay acts, p ← p·(1 − lr·wd).
        let loss = (p.as_tensor() * 1e-30).unwrap().sum_all().unwrap();
        opt.backward_step(&loss, 0.1).unwrap();
        let got = p.as_tensor().to_vec1::<f64>().unwrap()[0];
        assert!((got - 2.0 * 0.95).abs() < 1e-12, "{got}");
    }
}
