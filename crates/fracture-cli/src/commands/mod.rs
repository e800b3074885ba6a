//! One module per subcommand, and what they share.

pub(crate) mod audit;
pub(crate) mod download;
pub(crate) mod eval;
pub(crate) mod inspect;
pub(crate) mod predict;
pub(crate) mod serve;
pub(crate) mod train;

use fracture_train::candle_core::Device;

/// How images are brought to a square.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum ResizeArg {
    /// Scale both axes to the size (what the original project did).
    Stretch,
    /// Keep the aspect ratio and pad with black.
    Letterbox,
}

/// The compute device, with a hint when a GPU build finds no GPU.
pub(crate) fn pick_device(force_cpu: bool) -> anyhow::Result<Device> {
    fracture_train::model::device(force_cpu)
        .map_err(|e| anyhow::anyhow!("cannot open the GPU ({e}); pass --cpu to use the CPU"))
}

/// A metric with three decimals, or `n/a` when undefined.
pub(crate) fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "n/a".into())
}

/// A 95% interval as `(95% CI a-b)`, or nothing.
pub(crate) fn fmt_ci(i: Option<fracture_train::eval::Interval>) -> String {
    i.map(|i| format!("(95% CI {:.3}-{:.3})", i.lower, i.upper))
        .unwrap_or_default()
}
