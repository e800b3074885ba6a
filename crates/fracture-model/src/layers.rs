//! Layers shared by the architectures.

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;
use candle_nn::init::Init;

use crate::Result;
use crate::kernels::{self, Activation, Kernels};

/// Which statistics a batch normalization uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stats {
    /// The batch's own, moving the running statistics towards them (training).
    Batch,
    /// The running statistics, unchanged (inference, or frozen statistics while fine-tuning).
    Running,
}

/// Batch normalization over channels with learnable scale (`weight`) and shift (`bias`), optionally
/// followed by an activation. The running statistics are variables of the model so they are saved
/// with it, but `Model::trainable_vars` leaves them out of the optimizer.
#[derive(Debug)]
pub(crate) struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    /// Weight of the batch statistics in the running ones (PyTorch's convention:
    /// `running = (1 − momentum)·running + momentum·batch`).
    momentum: f64,
}

impl BatchNorm {
    /// A batch norm of `channels` whose scale starts at `gamma` (1, or 0 for the last of a residual
    /// branch), with variables `weight`, `bias`, `running_mean` and `running_var` under `vb`.
    pub(crate) fn new(
        channels: usize,
        gamma: f64,
        eps: f64,
        momentum: f64,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(BatchNorm {
            weight: vb.get_with_hints(channels, "weight", Init::Const(gamma))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            // The same storage as the model's variables: updating them updates what is saved.
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps,
            momentum,
        })
    }

    /// `act(normalize(x))` for `x (B, C, H, W)`. With [`Stats::Batch`] it normalizes with the
    /// batch's statistics and moves the running ones towards them (the variance unbiased); with
    /// [`Stats::Running`] it uses the running statistics (gradients still reach the scale, shift
    /// and input).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        stats: Stats,
        act: Activation,
        k: Kernels,
    ) -> candle_core::Result<Tensor> {
        let c = self.weight.elem_count();
        if stats == Stats::Batch {
            let (y, mean, var) = kernels::batch_norm_train(x, &self.weight, &self.bias, self.eps, act, k)?;
            self.update_running(&mean, &var, x.elem_count() / c)?;
            return Ok(y);
        }
        let (scale, shift) = self.fixed()?;
        kernels::affine_act(x, &scale, &shift, act, k)
    }

    /// The normalization with the running statistics as `x · scale + shift`: `(scale, shift)`,
    /// `(C,)` each.
    fn fixed(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let scale = self
            .weight
            .broadcast_div(&(self.running_var.as_detached_tensor() + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (self.running_mean.as_detached_tensor() * &scale)?)?;
        Ok((scale, shift))
    }

    /// [`BatchNorm::fixed`] as host vectors, for folding into the next layer.
    pub(crate) fn fixed_host(&self) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let (scale, shift) = self.fixed()?;
        let host = |t: Tensor| t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>();
        Ok((host(scale)?, host(shift)?))
    }
}

impl BatchNorm {
    /// The learnt scale and shift, `(C,)` each.
    pub(crate) fn affine(&self) -> [&Tensor; 2] {
        [&self.weight, &self.bias]
    }

    /// ε.
    pub(crate) fn eps(&self) -> f64 {
        self.eps
    }

    /// The running mean and variance as host vectors.
    pub(crate) fn running(&self) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let get = |v: &Var| {
            v.as_detached_tensor()
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()
        };
        Ok((get(&self.running_mean)?, get(&self.running_var)?))
    }

    /// Moves the running statistics towards a batch's mean and biased variance (`(C,)` each) over
    /// `n` values per channel; the variance is unbiased first.
    pub(crate) fn update_running(&self, mean: &Tensor, var: &Tensor, n: usize) -> candle_core::Result<()> {
        let n = n as f64;
        let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let m = self.momentum;
        let dt = self.running_mean.dtype();
        let rm = (self.running_mean.as_detached_tensor() * (1.0 - m))? + (mean.to_dtype(dt)? * m)?;
        let rv = (self.running_var.as_detached_tensor() * (1.0 - m))? + (var.to_dtype(dt)? * (m * unbias))?;
        self.running_mean.set(&rm?)?;
        self.running_var.set(&rv?)
    }
}
