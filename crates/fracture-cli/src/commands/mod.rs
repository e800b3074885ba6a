//! One module per subcommand, and what they share.

pub(crate) mod inspect;
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
