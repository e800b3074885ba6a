//! Adam whose state can be saved and restored, so a resumed run continues exactly.
//!
//! Candle's `AdamW` keeps its moments private; a checkpoint of it holds the weights only, and a
//! resumed run restarts the moment estimates from zero.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::{AdamConfig, Error, Result};

/// The two moment estimates of one parameter.
#[derive(Debug)]
enum Moments {
    /// For f32 parameters on the CPU: plain buffers, updated in place with the parameter in one pass.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Elsewhere: tensors on the parameter's device, updated with tensor operations.
    Device { m: Tensor, v: Tensor },
}

/// Adam (Kingma & Ba) with bias correction and optional decoupled weight decay, over named
/// parameters. Update of each parameter `p` with gradient `g` at step `t`:
///
/// ```text
/// m ← β1·m + (1 − β1)·g            v ← β2·v + (1 − β2)·g²
/// p ← p·(1 − lr·wd)                 p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
/// ```
/// (PyTorch's `Adam`/`AdamW` arithmetic.) For f32 parameters on the CPU the whole update is one fused
/// pass over parameter, gradient and moments, in place; elsewhere it is written with tensor
/// operations. Both are checked against each other.
#[derive(Debug)]
pub struct Adam {
    config: AdamConfig,
    params: Vec<(String, Var)>,
    moments: Vec<Moments>,
    /// Each parameter's learning rate relative to the step's (1 unless set by
    /// [`Adam::set_lr_scales`]): parameter groups, e.g. a smaller rate for a pretrained backbone.
    lr_scales: Vec<f64>,
    t: u64,
}

fn host(var: &Var) -> bool {
    matches!(var.device(), Device::Cpu) && var.dtype() == DType::F32
}

fn zeros(var: &Var) -> Result<Moments> {
    Ok(if host(var) {
        Moments::Host {
            m: vec![0.0; var.elem_count()],
            v: vec![0.0; var.elem_count()],
        }
    } else {
        Moments::Device {
            m: var.zeros_like()?,
            v: var.zeros_like()?,
        }
    })
}

/// The fused update of one f32 parameter on the CPU, applied in place through candle's in-place op
/// interface (the parameter is the destination, the gradient the source).
struct FusedStep<'a> {
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    beta1: f32,
    beta2: f32,
    eps: f32,
    step_size: f32,
    inv_bc2_sqrt: f32,
    decay: f32,
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "fracture-adam"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (dst, src) else {
            candle_core::bail!("adam: f32 parameters and gradients expected");
        };
        let (Some((ps, pe)), Some((gs, ge))) = (dst_l.contiguous_offsets(), g_l.contiguous_offsets()) else {
            candle_core::bail!("adam: contiguous parameters and gradients expected");
        };
        let (p, g) = (&mut p[ps..pe], &g[gs..ge]);
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!(
                "adam: {} parameters, {} gradients, {} moments",
                p.len(),
                g.len(),
                m.len()
            );
        }
        const CHUNK: usize = 1 << 16;
        let (b1, b2, eps, step, inv, decay) = (
            self.beta1,
            self.beta2,
            self.eps,
            self.step_size,
            self.inv_bc2_sqrt,
            self.decay,
        );
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    let gi = g[i];
                    let mi = b1 * m[i] + (1.0 - b1) * gi;
                    let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                    m[i] = mi;
                    v[i] = vi;
                    p[i] = p[i] * decay - step * mi / (vi.sqrt() * inv + eps);
                }
            });
        Ok(())
    }
}

impl Adam {
    /// An optimizer over `params` (name, variable), moments at zero.
    pub fn new(params: Vec<(String, Var)>, config: AdamConfig) -> Result<Self> {
        let moments = params.iter().map(|(_, p)| zeros(p)).collect::<Result<Vec<_>>>()?;
        let lr_scales = vec![1.0; params.len()];
        Ok(Adam {
            config,
            params,
            moments,
            lr_scales,
            t: 0,
        })
    }

    /// Sets each parameter's learning rate relative to the step's, by name: `scale(name)` (for
    /// weight decay too, so decay follows the parameter's rate, as in PyTorch's parameter groups).
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        self.lr_scales = self.params.iter().map(|(name, _)| scale(name)).collect();
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
        for (((_, var), moments), &scale) in self
            .params
            .iter()
            .zip(self.moments.iter_mut())
            .zip(&self.lr_scales)
        {
            let Some(g) = grads.get(var) else { continue };
            let lr = lr * scale;
            let step_size = lr / bc1;
            let decay = 1.0 - lr * weight_decay;
            match moments {
                Moments::Host { m, v } => {
                    let op = FusedStep {
                        m: RefCell::new(m.as_mut_slice()),
                        v: RefCell::new(v.as_mut_slice()),
                        beta1: beta1 as f32,
                        beta2: beta2 as f32,
                        eps: eps as f32,
                        step_size: step_size as f32,
                        inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
                        decay: decay as f32,
                    };
                    var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                }
                Moments::Device { m, v } => {
                    let new_m = ((&*m * beta1)? + (g * (1.0 - beta1))?)?;
                    let new_v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let mut p = var.as_tensor().clone();
                    if weight_decay > 0.0 {
                        p = (p * decay)?;
                    }
                    let denom = ((new_v.sqrt()? / bc2_sqrt)? + eps)?;
                    let update = ((&new_m / denom)? * step_size)?;
                    var.set(&(p - update)?)?;
                    // Detached: otherwise each moment keeps this step's gradient graph alive, which keeps
                    // the previous moment's graph alive, and memory grows without bound over a run.
                    *m = new_m.detach();
                    *v = new_v.detach();
                }
            }
        }
        Ok(())
    }

    /// Back-propagates `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor, lr: f64) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads, lr)
    }

    /// The moments as named tensors on the CPU: `adam.m.<param>` and `adam.v.<param>`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for ((name, var), moments) in self.params.iter().zip(&self.moments) {
            let (m, v) = match moments {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, var.shape(), &Device::Cpu)?,
                    Tensor::from_slice(v, var.shape(), &Device::Cpu)?,
                ),
                Moments::Device { m, v } => (m.to_device(&Device::Cpu)?, v.to_device(&Device::Cpu)?),
            };
            out.push((format!("adam.m.{name}"), m));
            out.push((format!("adam.v.{name}"), v));
        }
        Ok(out)
    }

    /// Restores the moments (taken out of `tensors` by name) and the step count.
    pub fn load_state(&mut self, tensors: &mut HashMap<String, Tensor>, t: u64) -> Result<()> {
        for ((name, var), moments) in self.params.iter().zip(self.moments.iter_mut()) {
            let mut take = |kind: &str| -> Result<Tensor> {
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
                Ok(tensor)
            };
            let (m, v) = (take("m")?, take("v")?);
            *moments = match moments {
                Moments::Host { .. } => Moments::Host {
                    m: m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                    v: v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                },
                Moments::Device { .. } => Moments::Device {
                    m: m.to_device(var.device())?.to_dtype(var.dtype())?,
                    v: v.to_device(var.device())?.to_dtype(var.dtype())?,
                },
            };
        }
        self.t = t;
        Ok(())
    }

    /// The first moment of parameter `i` as a tensor (for tests and diagnostics).
    pub fn first_moment(&self, i: usize) -> Result<Option<Tensor>> {
        let (Some((_, var)), Some(moments)) = (self.params.get(i), self.moments.get(i)) else {
            return Ok(None);
        };
        Ok(Some(match moments {
            Moments::Host { m, .. } => Tensor::from_slice(m, var.shape(), &Device::Cpu)?,
            Moments::Device { m, .. } => m.clone(),
        }))
    }

    /// Whether any moment still tracks an autograd graph (it never should).
    pub fn moments_track_graphs(&self) -> bool {
        self.moments.iter().any(|m| match m {
            Moments::Host { .. } => false,
            Moments::Device { m, v } => m.track_op() || v.track_op(),
        })
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
    fn the_fused_cpu_step_matches_the_tensor_step() {
        let dev = Device::Cpu;
        let start: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin()).collect();
        let cfg = AdamConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..AdamConfig::default()
        };
        // f32 → fused host path; the same values in f64 → tensor path.
        let p32 = Var::from_vec(start.clone(), 1000, &dev).unwrap();
        let p64 = Var::from_vec(
            start.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            1000,
            &dev,
        )
        .unwrap();
        let mut a = Adam::new(vec![("p".into(), p32.clone())], cfg).unwrap();
        let mut b = Adam::new(vec![("p".into(), p64.clone())], cfg).unwrap();
        for _ in 0..5 {
            a.backward_step(&(p32.as_tensor().sqr().unwrap().sum_all().unwrap()), 1e-2)
                .unwrap();
            b.backward_step(&(p64.as_tensor().sqr().unwrap().sum_all().unwrap()), 1e-2)
                .unwrap();
        }
        let x = p32.as_tensor().to_vec1::<f32>().unwrap();
        let y = p64.as_tensor().to_vec1::<f64>().unwrap();
        for (u, w) in x.iter().zip(&y) {
            assert!((f64::from(*u) - w).abs() < 1e-5, "{u} vs {w}");
        }
    }

    #[test]
    fn moments_do_not_keep_graphs_alive() {
        let dev = Device::Cpu;
        // f64: the tensor path, which is the one that could keep graphs.
        let p = Var::new(&[1.0f64, 2.0, 3.0], &dev).unwrap();
        let mut opt = Adam::new(vec![("p".into(), p.clone())], AdamConfig::default()).unwrap();
        for _ in 0..3 {
            let loss = (p.as_tensor().sqr().unwrap() * 2.0).unwrap().sum_all().unwrap();
            opt.backward_step(&loss, 1e-2).unwrap();
        }
        assert!(
            !opt.moments_track_graphs(),
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
        let mut state: HashMap<String, Tensor> = a.state_tensors().unwrap().into_iter().collect();
        assert!(state.contains_key("adam.m.w") && state.contains_key("adam.v.w"));
        let q = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let mut b = Adam::new(vec![("w".into(), q.clone())], AdamConfig::default()).unwrap();
        b.load_state(&mut state, a.steps()).unwrap();
        assert_eq!(b.steps(), 1);
        let (ma, mb) = (
            a.first_moment(0).unwrap().unwrap(),
            b.first_moment(0).unwrap().unwrap(),
        );
        assert_eq!(ma.to_vec1::<f32>().unwrap(), mb.to_vec1::<f32>().unwrap());
        let mut empty = HashMap::new();
        assert!(
            b.load_state(&mut empty, 1)
                .unwrap_err()
                .to_string()
                .contains("adam.m.w")
        );
    }

    #[test]
    fn lr_scales_act_per_parameter() {
        let dev = Device::Cpu;
        let (a, b) = (
            Var::new(&[1.0f64], &dev).unwrap(),
            Var::new(&[1.0f64], &dev).unwrap(),
        );
        let mut opt = Adam::new(
            vec![("backbone.w".into(), a.clone()), ("head.w".into(), b.clone())],
            AdamConfig::default(),
        )
        .unwrap();
        opt.set_lr_scales(|name| if name.starts_with("head.") { 1.0 } else { 0.25 });
        let loss = (a.as_tensor() + b.as_tensor()).unwrap().sum_all().unwrap();
        opt.backward_step(&loss, 0.1).unwrap();
        // The first Adam step moves each parameter by its rate (m/√v = 1 at t = 1).
        let (da, db) = (
            1.0 - a.as_tensor().to_vec1::<f64>().unwrap()[0],
            1.0 - b.as_tensor().to_vec1::<f64>().unwrap()[0],
        );
        assert!((db - 0.1).abs() < 1e-6 && (da - 0.025).abs() < 1e-6, "{da} {db}");
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
