//! What training refuses or reports: non-finite losses, bad set-ups, leaks, bad model files, runs in use; and how it uses the data it is given.

use super::*;

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let root = synthetic("nan", (16, 16), (4, 4));
    let mut s = setup(&root.join("data"), &root.join("run"), 24, 3);
    // Epoch 1 trains normally; each later epoch multiplies the rate by 1e30 until the weights overflow.
    s.train.schedule = LrSchedule::Step {
        every_epochs: 1,
        gamma: 1e30,
    };
    s.train.augment = None;
    let err = run(&s).unwrap_err();
    assert!(err.to_string().contains("last good checkpoint is kept"), "{err}");
    let failed_epoch = match err {
        Error::NonFiniteLoss { epoch, .. }
        | Error::NonFiniteOutput { epoch, .. }
        | Error::NonFiniteWeights { epoch, .. } => epoch,
        other => panic!("unexpected error: {other}"),
    };
    assert!(failed_epoch >= 2, "epoch 1 trains at a normal rate");
    let (meta, tensors) =
        read_checkpoint(&s.out.join(fracture_train::run::CHECKPOINT_FILE), &Device::Cpu).unwrap();
    assert_eq!(
        meta.epoch,
        failed_epoch - 1,
        "the kept checkpoint is the last one before the failure"
    );
    for (name, t) in tensors {
        let finite = t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite());
        assert!(finite, "{name} is not finite in the kept checkpoint");
    }
    assert!(fracture_train::TrainedModel::load(&s.out, &Device::Cpu).is_ok());
}

#[test]
fn bad_setups_are_clear_errors() {
    let root = synthetic("bad", (4, 4), (2, 2));
    let data = root.join("data");

    // No train split.
    let no_train = fresh_dir(&base(), "no-train");
    write_synthetic_dataset(
        &no_train,
        &SyntheticSpec {
            splits: vec![("val".into(), 2, 2)],
            ..SyntheticSpec::train_val((0, 0), (0, 0))
        },
    );
    let err = run(&setup(&no_train, &root.join("r0"), 24, 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no train split"), "{err}");

    // An image size the architecture cannot take.
    let err = run(&setup(&data, &root.join("r1"), 8, 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("image_size 8"), "{err}");

    // The preprocessing size is the model's (a setup cannot make them disagree); a size outside
    // the one range of input sizes is refused, naming it.
    let mut s = setup(&data, &root.join("r2"), 24, 1);
    s.model.image_size = 5000;
    assert_eq!(s.preprocess().size, 5000);
    let err = run(&s).unwrap_err().to_string();
    assert!(err.contains("5000") && err.contains("8..=4096"), "{err}");

    // An --out that cannot be a folder.
    let file = root.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = run(&setup(&data, &file.join("run"), 24, 1)).unwrap_err();
    assert!(matches!(err, Error::Io(_)), "{err}");

    // An existing run is not overwritten without --resume, and --resume needs a checkpoint.
    let out = root.join("r3");
    run(&setup(&data, &out, 24, 1)).unwrap();
    let before = std::fs::read(out.join("checkpoints/last.safetensors")).unwrap();
    let err = run(&setup(&data, &out, 24, 1)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::RunFolder {
                problem: fracture_train::RunFolderProblem::HoldsARun,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("already holds a run"), "{err}");
    assert_eq!(
        std::fs::read(out.join("checkpoints/last.safetensors")).unwrap(),
        before,
        "checkpoint untouched"
    );
    let mut fresh = setup(&data, &root.join("r4"), 24, 1);
    fresh.resume = true;
    let err = run(&fresh).unwrap_err();
    assert!(
        matches!(
            err,
            Error::RunFolder {
                problem: fracture_train::RunFolderProblem::NothingToResume,
                ..
            }
        ),
        "{err}"
    );

    // Resuming with other settings names the setting and leaves the checkpoint alone.
    let mut other = setup(&data, &out, 24, 2);
    other.resume = true;
    other.train.seed = 7;
    let err = run(&other).unwrap_err().to_string();
    assert!(err.contains("`seed` differs"), "{err}");
    let mut other = setup(&data, &out, 24, 2);
    other.resume = true;
    other.train.augment = Some(AugmentConfig {
        rotation_deg: 3.0,
        ..AugmentConfig::default()
    });
    assert!(run(&other).unwrap_err().to_string().contains("`augment` differs"));
    assert_eq!(
        std::fs::read(out.join("checkpoints/last.safetensors")).unwrap(),
        before
    );
}

#[test]
fn without_a_val_split_a_stratified_share_of_train_is_used_and_announced() {
    let root = fresh_dir(&base(), "no-val");
    write_synthetic_dataset(
        &root,
        &SyntheticSpec {
            splits: vec![("train".into(), 10, 20)],
            ..SyntheticSpec::train_val((0, 0), (0, 0))
        },
    );
    let mut notes = Vec::new();
    let outcome = train(&setup(&root, &root.join("run"), 24, 1), &mut |e| {
        if let Event::Notice(t) = e {
            notes.push(t.to_string());
        }
    })
    .unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("no val split") && n.contains("20%")),
        "{notes:?}"
    );
    let val = &outcome.reports[&Split::Val];
    assert_eq!((val.n, val.positives), (6, 2));
}

#[test]
fn early_stopping_ends_a_run_that_stops_improving() {
    let root = synthetic("early-stop", (6, 6), (4, 4));
    let mut s = setup(&root.join("data"), &root.join("run"), 24, 10);
    // A rate so small the weights cannot change in f32: validation loss never improves after epoch 1.
    s.train.adam.lr = 1e-30;
    s.train.augment = None;
    s.train.best_metric = fracture_train::config::BestMetric::ValLoss;
    s.train.early_stopping_patience = Some(2);
    let mut notes = Vec::new();
    let outcome = train(&s, &mut |e| {
        if let Event::Notice(t) = e {
            notes.push(t.to_string());
        }
    })
    .unwrap();
    assert!(outcome.stopped_early);
    assert_eq!(
        outcome.epochs_completed, 3,
        "epoch 1 is best, two more without improvement"
    );
    assert_eq!(outcome.best_epoch, 1);
    assert!(notes.iter().any(|n| n.starts_with("early stopping")), "{notes:?}");
}

#[test]
fn a_test_split_is_evaluated_and_auto_pos_weight_is_negatives_over_positives() {
    let root = fresh_dir(&base(), "with-test");
    let spec = SyntheticSpec {
        splits: vec![
            ("train".into(), 4, 12),
            ("val".into(), 2, 2),
            ("test".into(), 3, 5),
        ],
        ..SyntheticSpec::train_val((0, 0), (0, 0))
    };
    write_synthetic_dataset(&root.join("data"), &spec);
    let mut s = setup(&root.join("data"), &root.join("run"), 24, 1);
    s.train.pos_weight = fracture_train::config::PosWeight::Auto;
    let mut notes = Vec::new();
    let outcome = train(&s, &mut |e| {
        if let Event::Notice(t) = e {
            notes.push(t.to_string());
        }
    })
    .unwrap();
    assert!(notes.iter().any(|n| n.contains("12 / 4 = 3.000")), "{notes:?}");
    let test = &outcome.reports[&Split::Test];
    assert_eq!((test.n, test.positives), (8, 3));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["splits"]["test"]["n"], 8);
}

/// Our kernels and candle's own operations give the same training run: per-epoch losses and the
/// final validation ROC-AUC agree within floating-point tolerance.
#[test]
fn fast_and_reference_kernels_train_alike() {
    let root = synthetic("kernels-e2e", (16, 16), (8, 8));
    let mut outcomes = Vec::new();
    for (name, kernels) in [
        ("fast", fracture_train::model::Kernels::Fast),
        ("reference", fracture_train::model::Kernels::Reference),
    ] {
        let mut s = setup(&root.join("data"), &root.join(name), 24, 3);
        s.kernels = kernels;
        outcomes.push(run(&s).unwrap());
    }
    let (a, b) = (&outcomes[0], &outcomes[1]);
    for (ea, eb) in a.history.iter().zip(&b.history) {
        let rel = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-9);
        assert!(
            rel(ea.train_loss, eb.train_loss) < 1e-3,
            "epoch {}: {} vs {}",
            ea.epoch,
            ea.train_loss,
            eb.train_loss
        );
        assert!(
            rel(ea.val_loss, eb.val_loss) < 1e-3,
            "epoch {}: {} vs {}",
            ea.epoch,
            ea.val_loss,
            eb.val_loss
        );
    }
    let (ra, rb) = (
        a.reports[&Split::Val].roc_auc.unwrap(),
        b.reports[&Split::Val].roc_auc.unwrap(),
    );
    assert!((ra - rb).abs() < 0.02, "{ra} vs {rb}");
}

#[test]
fn extra_training_data_joins_the_train_split_and_never_the_validation() {
    let root = synthetic("extra-train", (4, 4), (3, 3));
    write_synthetic_dataset(
        &root.join("extra"),
        &SyntheticSpec {
            splits: vec![("train".into(), 2, 6), ("val".into(), 5, 5)],
            ..SyntheticSpec::train_val((0, 0), (0, 0))
        },
    );
    let mut s = setup(&root.join("data"), &root.join("run"), 24, 1);
    s.extra_train = vec![root.join("extra")];
    let (mut notes, mut train_counts) = (Vec::new(), None);
    let outcome = train(&s, &mut |e| match e {
        Event::Notice(t) => notes.push(t.to_string()),
        Event::EpochStart { images, .. } => train_counts = Some(images),
        _ => {}
    })
    .unwrap();
    assert_eq!(train_counts, Some(16), "8 own + 8 extra training images");
    assert!(
        notes.iter().any(|n| n.contains("adding 8 training images")),
        "{notes:?}"
    );
    // The model file and report.json record both folders.
    let saved = fracture_train::TrainedModel::load(&outcome.best_model, &Device::Cpu).unwrap();
    let recorded = saved.meta.training_data.unwrap();
    assert_eq!(
        recorded.extra_train,
        vec![fracture_train::data::path_text(&root.join("extra"))]
    );
    assert_eq!(recorded.data, fracture_train::data::path_text(&s.data));
    let report = std::fs::read_to_string(outcome.out.join("report.json")).unwrap();
    assert!(
        report.contains("\"extra_train\"") && report.contains("extra"),
        "{report}"
    );
    let val = &outcome.reports[&Split::Val];
    assert_eq!(
        (val.n, val.positives),
        (6, 3),
        "the extra folder's val split is not read"
    );

    // A root without a train split, and one whose training images are the validation images.
    s.out = root.join("run-2");
    write_synthetic_dataset(
        &root.join("val-only"),
        &SyntheticSpec {
            splits: vec![("val".into(), 1, 1)],
            ..SyntheticSpec::train_val((0, 0), (0, 0))
        },
    );
    s.extra_train = vec![root.join("val-only")];
    let err = run(&s).unwrap_err().to_string();

    assert!(
        err.contains("extra training data needs a `train` folder"),
        "{err}"
    );
    #[cfg(unix)]
    {
        let leaky = root.join("leaky");
        std::fs::create_dir_all(&leaky).unwrap();
        std::os::unix::fs::symlink(root.join("data").join("val"), leaky.join("train")).unwrap();
        s.out = root.join("run-3");
        s.extra_train = vec![leaky];
        let err = run(&s).unwrap_err().to_string();
        assert!(err.contains("leaving the dataset root"), "{err}");
        // Links accepted, the overlap with validation is still refused.
        s.allow_link_problems = true;
        let err = run(&s).unwrap_err().to_string();
        assert!(err.contains("also a validation or test image"), "{err}");
    }
}

#[cfg(unix)]
#[test]
fn a_dataset_whose_links_leak_validation_images_is_refused_unless_allowed() {
    let root = synthetic("link-leak", (4, 4), (3, 3));
    let data = root.join("data");
    let val_image = std::fs::read_dir(data.join("val").join("fractured"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::os::unix::fs::symlink(&val_image, data.join("train").join("fractured").join("leak.png")).unwrap();
    let mut s = setup(&data, &root.join("run"), 24, 1);
    let err = run(&s).unwrap_err().to_string();
    assert!(
        err.contains("leak.png") && err.contains("symbolic link(s) change what this dataset means"),
        "{err}"
    );
    assert!(!root.join("run").join("model.safetensors").exists());

    s.allow_link_problems = true;
    let mut notes = Vec::new();
    let outcome = train(&s, &mut |e| {
        if let Event::Notice(t) = e {
            notes.push(t.to_string());
        }
    })
    .unwrap();
    assert!(
        notes.iter().any(|n| n.contains("symbolic link problem")),
        "{notes:?}"
    );
    assert_eq!(outcome.reports[&Split::Val].n, 6, "the val image stays in val");
}

#[test]
fn a_model_file_with_a_threshold_outside_zero_to_one_is_refused_at_load() {
    let root = synthetic("bad-threshold", (4, 4), (3, 3));
    let outcome = run(&setup(&root.join("data"), &root.join("run"), 24, 1)).unwrap();
    let model = fracture_train::TrainedModel::load(&outcome.best_model, &Device::Cpu).unwrap();
    // Saved again, it loads with the same metadata.
    let copy = root.join("copy.safetensors");
    model.save(&copy).unwrap();
    assert_eq!(
        fracture_train::TrainedModel::load(&copy, &Device::Cpu)
            .unwrap()
            .meta,
        model.meta
    );
    for bad in [1.5, -0.25] {
        // Saving refuses it too, so the edited file is written below the typed metadata.
        let mut edited_meta = model.meta.clone();
        edited_meta.threshold = bad;
        assert!(edited_meta.to_metadata().is_err());
        let mut entries = model.meta.to_metadata().unwrap();
        entries.insert(fracture_train::bundle::THRESHOLD_KEY.into(), bad.to_string());
        let edited = root.join(format!("edited-{bad}.safetensors"));
        model.model.save(&edited, &entries).unwrap();
        let err = fracture_train::TrainedModel::load(&edited, &Device::Cpu)
            .expect_err("a threshold outside [0, 1] must not load")
            .to_string();
        assert!(
            err.contains("fracture.threshold")
                && err.contains("not a probability")
                && err.contains("edited-"),
            "{err}"
        );
    }
}

#[test]
fn resuming_with_fewer_epochs_and_an_impossible_target_are_refused_up_front() {
    let root = synthetic("resume-fewer", (4, 4), (3, 3));
    let mut s = setup(&root.join("data"), &root.join("run"), 24, 2);
    s.train.threshold_rule = fracture_train::eval::ThresholdRule::TargetSensitivity { target: 2.0 };
    let err = run(&s).unwrap_err().to_string();
    assert!(
        err.contains("target_sensitivity") && err.contains("(0, 1]"),
        "{err}"
    );
    assert!(!root.join("run").exists(), "refused before any work");

    s.train.threshold_rule = fracture_train::eval::ThresholdRule::TargetSensitivity { target: 0.9 };
    run(&s).unwrap();
    s.resume = true;
    s.train.epochs = 1;
    let err = run(&s).unwrap_err();
    assert!(
        matches!(
            err,
            Error::RunFolder {
                problem: fracture_train::RunFolderProblem::FewerEpochs {
                    trained: 2,
                    requested: 1
                },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("already trained 2 epochs"), "{err}");
    s.train.epochs = 2;
    let mut notes = Vec::new();
    train(&s, &mut |e| {
        if let Event::Notice(t) = e {
            notes.push(t.to_string());
        }
    })
    .unwrap();
    assert!(notes.iter().any(|n| n.contains("nothing to do")), "{notes:?}");
}

#[test]
fn every_bad_model_file_of_the_corpus_is_refused_with_its_name() {
    let root = synthetic("bad-models", (4, 4), (3, 3));
    let outcome = run(&setup(&root.join("data"), &root.join("run"), 24, 1)).unwrap();
    let good = std::fs::read(&outcome.best_model).unwrap();
    let keys = fracture_testkit::ModelKeys {
        threshold: fracture_train::bundle::THRESHOLD_KEY,
        config: fracture_train::model::CONFIG_KEY,
        preprocess: fracture_train::bundle::PREPROCESS_KEY,
    };
    let bad = fracture_testkit::write_bad_models(&root.join("bad"), &good, keys).unwrap();
    assert!(bad.len() >= 18, "{}", bad.len());
    for b in &bad {
        let err = match fracture_train::TrainedModel::load(&b.path, &Device::Cpu) {
            Ok(_) => panic!("{} loaded", b.kind),
            Err(e) => e.to_string(),
        };
        let name = b.path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(err.contains(&name), "{}: {err}", b.kind);
        let reason = match b.kind {
            "one flipped bit in one weight" | "one weight set to 65504" => "altered or damaged",
            "preprocessing std 1e-30" | "preprocessing mean 1e38" => "preprocess.standardize",
            _ => "",
        };
        assert!(err.contains(reason), "{}: {err}", b.kind);
        assert!(
            !err.contains("{ ") && !err.contains("Error("),
            "{}: Debug text in {err}",
            b.kind
        );
    }
    // None of them made the loader allocate what a declared size implies (4096 px, u64::MAX header).
    if let Some(peak) = fracture_testkit::peak_rss_bytes(None) {
        assert!(peak < 3 << 30, "peak memory {peak} bytes");
    }
}

#[test]
fn a_model_file_declaring_a_huge_input_is_refused_at_load() {
    let root = synthetic("huge-input", (4, 4), (3, 3));
    let outcome = run(&radiograph_setup(&root.join("data"), &root.join("run"), 32, 1)).unwrap();
    // The residual network's weights do not depend on the input size: only the metadata changes.
    let bytes = std::fs::read(&outcome.best_model).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    for key in [
        fracture_train::model::CONFIG_KEY,
        fracture_train::bundle::PREPROCESS_KEY,
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&meta[key]).unwrap();
        let field = if key == fracture_train::bundle::PREPROCESS_KEY {
            "size"
        } else {
            "image_size"
        };
        v[field] = serde_json::json!(4096);
        meta.insert(key.to_string(), v.to_string());
    }
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let edited = root.join("huge.safetensors");
    safetensors::serialize_to_file(tensors.tensors(), Some(meta), &edited).unwrap();
    let err = fracture_train::TrainedModel::load(&edited, &Device::Cpu)
        .expect_err("a 4096 px residual model must not load")
        .to_string();
    assert!(
        err.contains("4096") && err.contains("GB") && err.contains("huge.safetensors"),
        "{err}"
    );
}

#[test]
fn resuming_on_images_swapped_between_classes_is_refused_naming_them() {
    let root = synthetic("resume-swapped", (5, 5), (3, 3));
    let data = root.join("data");
    let mut s = setup(&data, &root.join("run"), 24, 2);
    s.stop_after_epochs = Some(1);
    run(&s).unwrap();
    // Two images trade classes: the per-class counts stay the same.
    let files = |class: &str| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("train").join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let (f, n) = (files("fractured")[0].clone(), files("not fractured")[0].clone());
    let f_to = data.join("train/not fractured/swapped-f.png");
    let n_to = data.join("train/fractured/swapped-n.png");
    std::fs::rename(&f, &f_to).unwrap();
    std::fs::rename(&n, &n_to).unwrap();
    let mut resumed = s.clone();
    resumed.resume = true;
    resumed.stop_after_epochs = None;
    let err = run(&resumed).unwrap_err().to_string();
    assert!(
        err.contains("cannot resume: the training images differ")
            && err.contains("2 new or changed")
            && err.contains("2 no longer there"),
        "{err}"
    );
    // Put back, it resumes.
    std::fs::rename(&f_to, &f).unwrap();
    std::fs::rename(&n_to, &n).unwrap();
    run(&resumed).unwrap();
}

#[test]
fn a_run_folder_in_use_is_refused_and_partial_files_of_dead_runs_are_cleaned() {
    let root = synthetic("locked", (4, 4), (3, 3));
    let out = root.join("run");
    let s = setup(&root.join("data"), &out, 24, 1);
    std::fs::create_dir_all(out.join("checkpoints")).unwrap();
    {
        // Another run holds the folder (here: a lock in this process's name).
        let _held = fracture_fs::FolderLock::acquire(&out).unwrap();
        let err = run(&s).unwrap_err().to_string();
        assert!(
            err.contains(&format!("in use by process {}", std::process::id())),
            "{err}"
        );
    }
    // A temporary left by a process that no longer runs (pid above Linux's maximum) is removed
    // and named; the lock is gone after the run.
    let stale = out.join("checkpoints/.last.safetensors.tmp-4294967295");
    std::fs::write(&stale, b"partial").unwrap();
    let mut notes = Vec::new();
    fracture_train::train(&s, &mut |e| {
        if let Event::Notice(t) = e {
            notes.push(t.to_string());
        }
    })
    .unwrap();
    if cfg!(target_os = "linux") {
        assert!(!stale.exists());
        assert!(
            notes
                .iter()
                .any(|n| n.contains("removed") && n.contains(".last.safetensors.tmp-4294967295")),
            "{notes:?}"
        );
    }
    assert!(!out.join(fracture_fs::LOCK_FILE).exists());
}
