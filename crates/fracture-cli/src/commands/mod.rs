//! One module per subcommand, and what they share.

pub(crate) mod audit;
pub(crate) mod calibrate;
pub(crate) mod download;
pub(crate) mod eval;
pub(crate) mod export;
pub(crate) mod inspect;
pub(crate) mod merge;
pub(crate) mod predict;
pub(crate) mod serve;
pub(crate) mod train;

use fracture_infer::candle_core::Device;

use fracture_infer::model::{CamLayer, FractureNet, Precision};

/// The layer `--cam-layer` asks for, or the network's default without it.
pub(crate) fn cam_layer(arg: Option<CamLayer>, net: &FractureNet) -> CamLayer {
    arg.unwrap_or_else(|| net.default_cam_layer())
}

/// Where a command computes: `--device` (`auto`, `cpu`, `cuda[:N]`, `metal[:N]`), `--cpu` short
/// for `--device cpu`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DeviceArgs {
    /// The compute device: `auto` (the GPU this binary was built for, else the CPU), `cpu`,
    /// `cuda[:N]` or `metal[:N]`.
    #[arg(long, default_value = "auto", conflicts_with = "cpu")]
    device: fracture_infer::model::DeviceChoice,
    /// Compute on the CPU even in a GPU build (same as `--device cpu`).
    #[arg(long)]
    cpu: bool,
}

impl DeviceArgs {
    /// Opens the device, with what to do when it cannot be had.
    pub(crate) fn open(&self) -> anyhow::Result<Device> {
        let choice = if self.cpu {
            fracture_infer::model::DeviceChoice::Cpu
        } else {
            self.device
        };
        choice.open().map_err(|e| match e {
            fracture_infer::model::Error::DeviceUnavailable { .. } => {
                anyhow::anyhow!("{e}; pass --device cpu to use the CPU")
            }
            e => anyhow::Error::new(e),
        })
    }
}

/// What `--precision` asks for: a precision, or `auto` (the default), the one measured faster here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum PrecisionArg {
    /// BF16 where this processor's BF16 products are faster than FP32 (AMX, or AVX-512 BF16 whose
    /// dot-product instruction was timed at under 1.6 FMAs), else FP32.
    #[default]
    Auto,
    /// FP32 operands.
    Fp32,
    /// BF16 operands, FP32 accumulation, in the 1×1, im2col and dense products.
    Bf16,
}

impl PrecisionArg {
    /// The precision to run in on `device`; `auto` says on standard error what it chose and why.
    pub(crate) fn resolve(self, device: &Device) -> Precision {
        match self {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::Auto => {
                let (precision, why) = fracture_infer::model::auto_precision(device);
                eprintln!("precision {precision} (auto: {why})");
                precision
            }
        }
    }

    /// As [`PrecisionArg::resolve`], for a run computing with `kernels`: `auto` is FP32 where
    /// those kernels have no BF16 products (candle's reference operations), and says so.
    pub(crate) fn resolve_for_kernels(
        self,
        device: &Device,
        kernels: fracture_infer::model::Kernels,
    ) -> Precision {
        match (self, kernels.with_precision(Precision::Bf16)) {
            (PrecisionArg::Auto, Err(why)) => {
                eprintln!("precision fp32 (auto: {why})");
                Precision::Fp32
            }
            (choice, _) => choice.resolve(device),
        }
    }
}

/// The model a command predicts with, and in which precision: `--model` and `--precision`, as
/// predict, eval and serve take them.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ModelArgs {
    /// A trained model: a run folder (its model.safetensors) or a weight file. Without it, the
    /// model built into the binary (`models/fracture-lite0.safetensors`, see `models/README.md`).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// The operand precision of the network's matrix products: auto (BF16 where it was measured
    /// faster on this processor, else FP32), fp32, or bf16 (BF16 operands, FP32 accumulation).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    precision: PrecisionArg,
}

impl ModelArgs {
    /// The `--model` path, `None` for the built-in model.
    pub(crate) fn path(&self) -> Option<&std::path::Path> {
        self.model.as_deref()
    }

    /// Loads the model on `device` in the precision asked for (see [`load_model`]).
    pub(crate) fn load(&self, device: &Device) -> anyhow::Result<fracture_infer::TrainedModel> {
        load_model(self.path(), device, self.precision)
    }
}

/// A metric with three decimals, or `n/a` when undefined.
pub(crate) fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "n/a".into())
}

/// A 95% interval as `(95% CI a-b)`, or nothing.
pub(crate) fn fmt_ci(i: Option<fracture_infer::eval::Interval>) -> String {
    i.map(|i| format!("(95% CI {:.3}-{:.3})", i.lower, i.upper))
        .unwrap_or_default()
}

/// The model compiled into this binary (feature `bundled-model`, on by default): the repository's
/// `crates/fracture-cli/models/fracture-lite0.safetensors` and its training fingerprints (inside
/// this package, so it is published with it).
#[cfg(feature = "bundled-model")]
const BUNDLED: Option<(&[u8], &[u8])> = Some((
    include_bytes!("../../models/fracture-lite0.safetensors"),
    include_bytes!("../../models/training-fingerprints.bin"),
));
#[cfg(not(feature = "bundled-model"))]
const BUNDLED: Option<(&[u8], &[u8])> = None;

/// The name the bundled model goes by in messages and reports.
pub(crate) const BUNDLED_NAME: &str = "models/fracture-lite0.safetensors (built in)";

/// The model a command uses: `--model` when given (a run folder or a weight file), else the model
/// compiled into the binary, set to predict in `precision` (resolved on `device`).
pub(crate) fn load_model(
    model: Option<&std::path::Path>,
    device: &Device,
    precision: PrecisionArg,
) -> anyhow::Result<fracture_infer::TrainedModel> {
    use anyhow::Context;
    let mut loaded = match (model, BUNDLED) {
        (Some(path), _) => fracture_infer::TrainedModel::load(path, device).context("cannot load the model"),
        (None, Some((bytes, _))) => {
            fracture_infer::TrainedModel::from_bytes(bytes, std::path::Path::new(BUNDLED_NAME), device)
                .context("cannot load the built-in model")
        }
        (None, None) => anyhow::bail!(
            "no --model given, and this binary was built without the bundled model (feature `bundled-model`)"
        ),
    }?;
    let precision = precision.resolve(device);
    loaded.set_precision(precision)?;
    if let (Precision::Bf16, Some(note)) = (precision, fracture_infer::model::bf16_device_note(device)) {
        eprintln!("warning: --{note}");
    }
    Ok(loaded)
}

/// The bytes of the bundled model's training fingerprints, when the binary has the model.
pub(crate) fn bundled_fingerprints() -> Option<Vec<u8>> {
    BUNDLED.map(|(_, fingerprints)| fingerprints.to_vec())
}

/// The training fingerprints that go with `model` (see [`load_model`]): the ones tied to it beside
/// a model file or in a run folder (see `fracture_infer::audit::training_fingerprints`), or the
/// bundled model's. `recorded` is the SHA-256 the model's metadata records for them. `Ok(None)`
/// when there are none.
pub(crate) fn model_fingerprints(
    model: Option<&std::path::Path>,
    recorded: Option<&str>,
) -> anyhow::Result<Option<(String, Vec<fracture_infer::data::audit::Known>)>> {
    match (model, BUNDLED) {
        (Some(path), _) => Ok(fracture_infer::audit::training_fingerprints(path, recorded)?
            .map(|(file, known)| (file.display().to_string(), known))),
        (None, Some((_, bytes))) => {
            let origin = std::path::Path::new("models/training-fingerprints.bin (built in)");
            if let Some(expected) = recorded
                && fracture_infer::audit::sha256_hex(bytes) != expected
            {
                anyhow::bail!("{}: not the fingerprints of the built-in model", origin.display());
            }
            let known = fracture_infer::data::audit::fingerprints_from_bytes(bytes, origin)?;
            Ok(Some((origin.display().to_string(), known)))
        }
        (None, None) => Ok(None),
    }
}

/// Whether `path` decodes only in part (checked again strictly, for the typed error): `predict`
/// flags such files with `--allow-partial` and, like `train`, suggests the flag without it.
pub(crate) fn is_partial(path: &std::path::Path) -> bool {
    let strict = fracture_infer::data::DecodeLimits::default();
    fracture_infer::data::read_file_limited(path, &strict)
        .and_then(|bytes| fracture_infer::data::decode_gray(&bytes, path, &strict))
        .is_err_and(|e| matches!(e, fracture_infer::data::Error::Partial { .. }))
}
