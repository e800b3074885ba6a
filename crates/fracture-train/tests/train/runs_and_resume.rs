//! Runs that write their outputs and learn, and resumes equal to uninterrupted runs (generated and real radiographs, every recipe).

use super::*;

/// A short run on generated radiographs writes every output, and its files agree with each other.
#[test]
fn a_short_run_writes_every_output() {
    let root = synthetic("outputs", (12, 12), (6, 6));
    let out = root.join("run");
    let mut s = setup(&root.join("data"), &out, 32, 2);
    s.train.early_stopping_patience = Some(5);
    let mut events = Vec::new();
    let outcome = train(&s, &mut |e| {
        events.push(match e {
            Event::Dataset(_) => "dataset",
            Event::EpochStart { .. } => "start",
            Event::EpochEnd(_) => "end",
            Event::Saved { what, .. } => what.name(),
            _ => "",
        })
    })
    .unwrap();
    assert_eq!(outcome.epochs_completed, 2);
    assert_eq!(events.iter().filter(|e| **e == "end").count(), 2);
    assert_eq!(events[0], "dataset");
    for f in [
        "model.safetensors",
        "checkpoints/last.safetensors",
        "metrics.csv",
        "report.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with(
        "epoch,train_loss,val_loss,val_accuracy,val_sensitivity,val_specificity,val_roc_auc,lr"
    ));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["splits"]["val"]["n"], 12);
    assert_eq!(
        report["best_epoch"].as_u64().unwrap() as usize,
        outcome.best_epoch
    );
    // The best model reloads with its preprocessing and predicts like the final report says.
    let trained = fracture_train::TrainedModel::load(&out, &Device::Cpu).unwrap();
    assert_eq!(*trained.preprocess(), s.preprocess());
    // The stored threshold reaches the target sensitivity (0.90) on validation.
    let val = &outcome.reports[&Split::Val];
    assert_eq!(trained.threshold(), val.threshold);
    assert!(val.sensitivity.unwrap() >= 0.9, "{val:?}");
    assert!(out.join("training_curves.png").is_file());
    assert_eq!(
        outcome.reports[&Split::Val].roc_auc,
        report["splits"]["val"]["roc_auc"].as_f64()
    );
}

/// Generated radiographs with a visible crack are learnable: validation ROC-AUC well above chance.
#[test]
fn the_loop_learns_a_learnable_task() {
    let root = synthetic("learn", (40, 40), (16, 16));
    let mut s = setup(&root.join("data"), &root.join("run"), 32, 8);
    s.train.augment = None;
    s.train.adam.lr = 3e-3;
    let outcome = run(&s).unwrap();
    let first = outcome.history.first().unwrap().train_loss;
    let last = outcome.history.last().unwrap().train_loss;
    assert!(last < first * 0.7, "train loss {first} -> {last}");
    let auc = outcome.reports[&Split::Val].roc_auc.unwrap();
    assert!(auc > 0.85, "val ROC-AUC {auc}");
}

/// Stopping after epoch 1 and resuming gives the same weights and Adam moments as an uninterrupted
/// run, bit for bit on the CPU.
pub(crate) fn check_resume_equals_uninterrupted(data: &Path, root: &Path, size: u32, batch: usize) {
    check_resume_with(setup(data, &root.join("whole"), size, 2), root, batch);
}

pub(crate) fn check_resume_with(mut whole: TrainSetup, root: &Path, batch: usize) {
    whole.out = root.join("whole");
    whole.train.batch_size = batch;
    whole.train.schedule = LrSchedule::Cosine { min_lr: 1e-4 };
    whole.train.warmup_steps = 3;
    let a = run(&whole).unwrap();

    let mut first = whole.clone();
    first.out = root.join("split");
    first.stop_after_epochs = Some(1);
    let stopped = run(&first).unwrap();
    assert_eq!(stopped.epochs_completed, 1);
    let mut second = first.clone();
    second.stop_after_epochs = None;
    second.resume = true;
    let mut notices = Vec::new();
    let b = train(&second, &mut |e| {
        if let Event::Notice(t) = e {
            notices.push(t.to_string());
        }
    })
    .unwrap();
    assert!(
        notices.iter().any(|n| n.contains("resuming after epoch 1")),
        "{notices:?}"
    );
    assert_eq!(b.epochs_completed, 2);
    assert_eq!(a.history.len(), b.history.len());
    let diff = max_difference(&checkpoint_tensors(&whole.out), &checkpoint_tensors(&second.out));
    assert!(diff <= 1e-6, "resumed run differs by {diff}");
    assert_eq!(a.history[1].train_loss, b.history[1].train_loss);
}

#[test]
fn resume_equals_an_uninterrupted_run_on_generated_images() {
    let root = synthetic("resume", (10, 14), (5, 5));
    check_resume_equals_uninterrupted(&root.join("data"), &root, 24, 8);
}

/// The radiograph preset's residual network resumes exactly too: its batch-norm running statistics
/// travel in the checkpoint with the weights and moments.
#[test]
fn the_residual_network_resumes_exactly() {
    let root = synthetic("resume-resnet", (10, 14), (5, 5));
    let s = radiograph_setup(&root.join("data"), &root.join("whole"), 32, 2);
    check_resume_with(s, &root, 8);
    let (_, tensors) = read_checkpoint(
        &root.join("whole").join(fracture_train::run::CHECKPOINT_FILE),
        &Device::Cpu,
    )
    .unwrap();
    let var = tensors["model.stem.bn.running_var"].to_vec1::<f32>().unwrap();
    assert!(
        var.iter().any(|v| (v - 1.0).abs() > 1e-3),
        "running statistics moved: {var:?}"
    );
    assert!(
        !tensors
            .keys()
            .any(|k| k.contains("running_") && !k.starts_with("model.")),
        "no optimizer state for running statistics"
    );
}

/// The fine-tuning recipe at 32 px on generated images, starting from a pretrained backbone (here a
/// seeded EfficientNet-Lite0 written as a safetensors file): with a moving average of the weights,
/// a smaller backbone rate and batch statistics it resumes exactly (the average travels in the
/// checkpoint); the model file records the pretrained file's SHA-256.
pub(crate) fn finetune_setup(root: &Path, epochs: usize) -> TrainSetup {
    let recipe = Preset::Finetune.recipe();
    let size = 32;
    let model = ModelConfig {
        image_size: size as usize,
        ..recipe.model.clone()
    };
    let backbone = fracture_train::model::Model::new(&model, 77, &Device::Cpu).unwrap();
    let tensors: Vec<(String, Tensor)> = backbone
        .named_vars()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("head."))
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let file = root.join("backbone.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &file).unwrap();
    TrainSetup {
        model,
        fit: recipe.fit,
        train: TrainConfig {
            epochs,
            batch_size: 8,
            ema_decay: Some(0.99),
            backbone_lr_scale: 0.5,
            ..recipe.train
        },
        pretrained: Some(file),
        ..setup(&root.join("data"), &root.join("whole"), size, epochs)
    }
}

#[test]
fn the_finetune_recipe_resumes_exactly_with_its_moving_average() {
    let root = synthetic("resume-finetune", (10, 14), (5, 5));
    let s = finetune_setup(&root, 2);
    let file = s.pretrained.clone().unwrap();
    check_resume_with(s, &root, 8);
    let (_, tensors) = read_checkpoint(
        &root.join("whole").join(fracture_train::run::CHECKPOINT_FILE),
        &Device::Cpu,
    )
    .unwrap();
    assert!(tensors.contains_key("ema._blocks.3._depthwise_conv.weight"));
    assert!(tensors.contains_key("ema._bn1.running_var"));
    let best = fracture_train::TrainedModel::load(&root.join("whole"), &Device::Cpu).unwrap();
    let origin = best.meta.pretrained.clone().unwrap();
    let digest: String = sha2::Sha256::digest(std::fs::read(&file).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(origin.sha256, digest);
    assert_eq!(origin.file, "backbone.safetensors");
}

/// With a moving average, the averaged weights are what is validated and saved: after one epoch the
/// model file holds exactly the checkpoint's `ema.*` tensors.
#[test]
fn with_a_moving_average_the_average_is_saved() {
    let root = synthetic("ema-saved", (6, 8), (4, 4));
    let s = finetune_setup(&root, 1);
    let outcome = run(&s).unwrap();
    assert_eq!(outcome.best_epoch, 1);
    let (_, tensors) =
        read_checkpoint(&s.out.join(fracture_train::run::CHECKPOINT_FILE), &Device::Cpu).unwrap();
    let saved = fracture_train::TrainedModel::load(&outcome.best_model, &Device::Cpu).unwrap();
    let mut differs_from_live = false;
    for (name, var) in saved.model.named_vars() {
        let v = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ema = tensors[&format!("ema.{name}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let live = tensors[&format!("model.{name}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(v, ema, "{name}");
        differs_from_live |= v != live;
    }
    assert!(
        differs_from_live,
        "the average equals the live weights: nothing was averaged"
    );
}

/// With a backbone learning rate of 0 and frozen batch norms, only the head trains: every backbone
/// tensor of the trained model, running statistics included, equals the pretrained file's.
#[test]
fn a_zero_backbone_rate_with_frozen_batch_norm_keeps_the_pretrained_backbone() {
    let root = synthetic("frozen-backbone", (10, 14), (5, 5));
    let mut s = finetune_setup(&root, 1);
    s.train.backbone_lr_scale = 0.0;
    s.train.freeze_batch_norm = true;
    s.train.ema_decay = None;
    s.train.adam.weight_decay = 0.0;
    let outcome = run(&s).unwrap();
    let pretrained = candle_core::safetensors::load(s.pretrained.as_ref().unwrap(), &Device::Cpu).unwrap();
    let trained = fracture_train::TrainedModel::load(&outcome.best_model, &Device::Cpu).unwrap();
    let mut head_moved = false;
    for (name, var) in trained.model.named_vars() {
        let now = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        match pretrained.get(&name) {
            Some(t) => assert_eq!(
                now,
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name} moved"
            ),
            None => {
                assert!(name.starts_with("head."), "{name} is not in the pretrained file");
                head_moved = true;
            }
        }
    }
    assert!(head_moved);
}

/// The recommended recipe, shortened (one epoch at 64 px), on the real radiographs: it trains, the
/// validation report is complete, and the model reloads as a letterboxed residual network.
#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn the_radiograph_preset_runs_on_the_real_radiographs() {
    let data = fracture_testkit::fracatlas();
    let root = fresh_dir(&base(), "fracatlas-preset");
    let mut s = radiograph_setup(&data, &root.join("run"), 64, 1);
    s.train.batch_size = 64;
    let outcome = run(&s).unwrap();
    let val = &outcome.reports[&Split::Val];
    assert_eq!((val.n, val.positives), (512, 88));
    assert!(val.roc_auc.is_some_and(|v| v.is_finite()));
    assert!(val.ci95.pr_auc.is_some() && val.ci95.f1.is_some());
    let trained = fracture_train::TrainedModel::load(&s.out, &Device::Cpu).unwrap();
    assert_eq!(trained.model.config().arch_name(), "resnet");
    assert_eq!(*trained.preprocess(), s.preprocess());
    assert_eq!(
        trained.tta(),
        fracture_train::infer::Tta::Mirror,
        "trained without vertical flips"
    );
}

#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn resume_equals_an_uninterrupted_run_on_the_real_radiographs() {
    let data = fracture_testkit::fracatlas();
    let root = fresh_dir(&base(), "resume-fracatlas");
    check_resume_equals_uninterrupted(&data, &root, 24, 64);
}

#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn a_short_run_on_the_real_radiographs_writes_every_output() {
    let data = fracture_testkit::fracatlas();
    let root = fresh_dir(&base(), "fracatlas-short");
    let mut s = setup(&data, &root.join("run"), 32, 1);
    s.train.batch_size = 64;
    let mut summary = String::new();
    let outcome = train(&s, &mut |e| {
        if let Event::Dataset(d) = e {
            summary = d.to_string();
        }
    })
    .unwrap();
    assert!(
        summary.contains("281") && summary.contains("1235") && summary.contains("424"),
        "{summary}"
    );
    let val = &outcome.reports[&Split::Val];
    assert_eq!((val.n, val.positives), (512, 88));
    assert!(val.roc_auc.is_some_and(|v| v.is_finite()));
    for f in [
        "model.safetensors",
        "checkpoints/last.safetensors",
        "metrics.csv",
        "report.json",
    ] {
        assert!(s.out.join(f).is_file(), "{f} missing");
    }
}
