//! An exponential moving average of a model's weights (and batch-norm statistics), kept beside the
//! trained model: `shadow ← d·shadow + (1 − d)·live` after every optimizer step, with
//! `d = min(decay, (1 + t) / (10 + t))` at step `t` so the early, noisy weights fade quickly. The
//! average is what is validated and saved: on a small dataset it ranks more steadily than the last
//! step's weights.

use fracture_model::Model;

use crate::Result;

/// The averaged copy of a model.
#[derive(Debug)]
pub(crate) struct Ema {
    decay: f64,
    shadow: Model,
}

impl Ema {
    /// A shadow model equal to `live` now.
    pub(crate) fn new(live: &Model, decay: f64) -> Result<Self> {
        let mut shadow = Model::new(live.config(), 0, &device_of(live))?;
        shadow.net.set_kernels(live.net.kernels());
        let ema = Ema { decay, shadow };
        ema.copy_from(live)?;
        Ok(ema)
    }

    /// Sets the average to `live`'s values.
    pub(crate) fn copy_from(&self, live: &Model) -> Result<()> {
        for ((_, s), (_, l)) in self.shadow.named_vars().iter().zip(live.named_vars()) {
            s.set(&l.as_detached_tensor())?;
        }
        Ok(())
    }

    /// Moves the average towards `live` after optimizer step `step` (0-based).
    pub(crate) fn update(&self, live: &Model, step: u64) -> Result<()> {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for ((_, s), (_, l)) in self.shadow.named_vars().iter().zip(live.named_vars()) {
            let next = ((s.as_detached_tensor() * d)? + (l.as_detached_tensor() * (1.0 - d))?)?;
            s.set(&next.to_dtype(s.dtype())?)?;
        }
        Ok(())
    }

    /// The averaged model.
    pub(crate) fn model(&self) -> &Model {
        &self.shadow
    }
}

fn device_of(model: &Model) -> candle_core::Device {
    model
        .named_vars()
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu)
}

/// The checkpoint names of the average's tensors: `ema.<name>`.
pub(crate) fn checkpoint_key(name: &str) -> String {
    format!("ema.{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use fracture_model::ModelConfig;

    #[test]
    fn the_average_follows_the_live_weights() {
        let live = Model::new(&ModelConfig::seed(16), 1, &Device::Cpu).unwrap();
        let ema = Ema::new(&live, 0.5).unwrap();
        let (name, var) = live.named_vars().remove(0);
        let before = ema.model().named_vars()[0]
            .1
            .as_tensor()
            .to_dtype(DType::F64)
            .unwrap();
        var.set(&(var.as_tensor() + 2.0).unwrap()).unwrap();
        // Step 100: d = min(0.5, 101/110) = 0.5, so the average moves half-way.
        ema.update(&live, 100).unwrap();
        let after = ema.model().named_vars()[0]
            .1
            .as_tensor()
            .to_dtype(DType::F64)
            .unwrap();
        let moved = (after - before)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((moved - 1.0).abs() < 1e-6, "{name}: moved {moved}");
    }
}
