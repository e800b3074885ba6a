//! Boxes as training signal: a localization head trained from annotated boxes points at what they
//! annotate, and the run refuses boxes it cannot use.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use fracture_testkit::{Rng, fresh_dir};
use fracture_train::data::image::{GrayImage, Luma};
use fracture_train::model::{ArchConfig, CamLayer, CamMethod, ModelConfig};
use fracture_train::{Event, Preset, TrainConfig, TrainSetup, TrainedModel, train};

mod common;
use common::setup;

const SIZE: u32 = 64;
/// Side of the planted "fracture", pixels.
const SPOT: u32 = 16;

fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fracture-train-box-tests")
}

/// `<root>/data/{train,val}/{fractured,not fractured}/img_NNNN.png`: noisy gray images, the
/// fractured ones with a bright square at a random place; `<root>/boxes.csv` holds every square.
/// Returns the boxes of the val images (`(path, [x, y, w, h])`).
fn write_dataset(root: &Path, train: usize, val: usize) -> Vec<(PathBuf, [f64; 4])> {
    let mut rng = Rng::new(11);
    let mut csv = String::from("id,split,x,y,w,h\n");
    let mut val_boxes = Vec::new();
    for (split, n) in [("train", train), ("val", val)] {
        for (class, fractured) in [("fractured", true), ("not fractured", false)] {
            let dir = root.join("data").join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let x0 = 2 + (rng.unit() * (SIZE - SPOT - 4) as f32) as u32;
                let y0 = 2 + (rng.unit() * (SIZE - SPOT - 4) as f32) as u32;
                let noise: Vec<f32> = (0..SIZE * SIZE).map(|_| rng.unit()).collect();
                let img = GrayImage::from_fn(SIZE, SIZE, |x, y| {
                    let inside = fractured && (x0..x0 + SPOT).contains(&x) && (y0..y0 + SPOT).contains(&y);
                    let v = if inside { 0.85 } else { 0.25 } + 0.1 * noise[(y * SIZE + x) as usize];
                    Luma([(v * 255.0) as u8])
                });
                let name = format!("{split}{i:03}");
                let path = dir.join(format!("{name}.png"));
                img.save(&path).unwrap();
                if fractured {
                    csv.push_str(&format!("{name},{split},{x0},{y0},{SPOT},{SPOT}\n"));
                    if split == "val" {
                        val_boxes.push((path, [x0, y0, SPOT, SPOT].map(f64::from)));
                    }
                }
            }
        }
    }
    std::fs::write(root.join("boxes.csv"), csv).unwrap();
    val_boxes
}

/// The fine-tuning recipe at 64 px from scratch, its batch norms' running statistics following
/// the batches ten times faster than the pretrained network's (a short run from scratch would
/// otherwise validate with statistics still near their initial values).
fn lite0_setup(root: &Path, epochs: usize) -> TrainSetup {
    let recipe = Preset::Finetune.recipe();
    let mut model = ModelConfig {
        image_size: SIZE as usize,
        ..recipe.model.clone()
    };
    if let ArchConfig::EfficientNetLite0(e) = &mut model.arch {
        e.bn_momentum = 0.1;
    }
    TrainSetup {
        model,
        fit: recipe.fit,
        train: TrainConfig {
            epochs,
            batch_size: 8,
            warmup_steps: 0,
            // Classification is trivial here (ROC-AUC 1 after the first epoch), so choose the best
            // epoch by the validation loss, which keeps improving with the features.
            best_metric: fracture_train::config::BestMetric::ValLoss,
            ..recipe.train
        },
        ..setup(&root.join("data"), &root.join("run"), SIZE, epochs)
    }
}

#[test]
fn a_head_trained_on_boxes_points_into_them() {
    let root = fresh_dir(&base(), "learns");
    let val_boxes = write_dataset(&root, 64, 12);
    let s = lite0_setup(&root, 10).with_boxes(root.join("boxes.csv"), 1.0, 16);
    let mut notes = Vec::new();
    let outcome = train(&s, &mut |e| {
        if let Event::Notice(t) = e {
            notes.push(t.to_string());
        }
    })
    .unwrap();
    assert!(
        notes.iter().any(|n| n.contains(
            "64 boxes on 64 fractured training images (0 fractured without boxes, 64 not fractured)"
        )),
        "{notes:?}"
    );
    let losses: Vec<f64> = notes
        .iter()
        .filter_map(|n| {
            n.split("localization loss ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(losses.len(), 10, "{notes:?}");
    assert!(
        losses[9] < 0.6 * losses[0],
        "the localization loss does not fall: {losses:?}"
    );

    let model = TrainedModel::load(&outcome.best_model, &fracture_train::candle_core::Device::Cpu).unwrap();
    assert!(model.model.net.has_localization_head());
    assert_eq!(model.model.net.default_cam_layer(), CamLayer::Head);
    assert_eq!(
        model.meta.training_data.as_ref().and_then(|d| d.boxes.clone()),
        Some(fracture_train::data::path_text(&root.join("boxes.csv")))
    );
    // The evidence of held-out fractured images: its peak falls in the planted square (a random
    // point would, about one time in eight).
    let margin = 0.05 * f64::from(SIZE);
    let mut hits = 0;
    for (path, b) in &val_boxes {
        let bytes = std::fs::read(path).unwrap();
        let e = model
            .predictor()
            .explain(
                &bytes,
                path,
                CamMethod::default(),
                model.model.net.default_cam_layer(),
            )
            .unwrap();
        let peak = e.evidence().unwrap().peak;
        if peak[0] >= b[0] - margin
            && peak[0] <= b[0] + b[2] + margin
            && peak[1] >= b[1] - margin
            && peak[1] <= b[1] + b[3] + margin
        {
            hits += 1;
        }
    }
    assert!(hits >= 10, "{hits} of {} peaks in the box", val_boxes.len());
}

#[test]
fn boxes_the_run_cannot_use_are_refused() {
    let root = fresh_dir(&base(), "refused");
    write_dataset(&root, 4, 2);
    // The seed network has no localization head.
    let seed =
        setup(&root.join("data"), &root.join("seed"), SIZE, 1).with_boxes(root.join("boxes.csv"), 1.0, 16);
    let err = train(&seed, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("only the EfficientNet-Lite0 network"), "{err}");
    // A head without boxes.
    let mut headless = lite0_setup(&root, 1);
    if let ArchConfig::EfficientNetLite0(e) = &mut headless.model.arch {
        e.localization_head = true;
    }
    let err = train(&headless, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("no box file trains it"), "{err}");
    // Boxes of no training image.
    std::fs::write(root.join("other.csv"), "id,x,y,w,h\nsomething_else,1,2,3,4\n").unwrap();
    let mut s = lite0_setup(&root, 1).with_boxes(root.join("other.csv"), 1.0, 16);
    s.out = root.join("other");
    let err = train(&s, &mut |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("other.csv") && err.contains("no fractured training image has a box"),
        "{err}"
    );
    // A zero weight, a missing file, a bad row: each named.
    let mut s = lite0_setup(&root, 1).with_boxes(root.join("boxes.csv"), 0.0, 16);
    s.out = root.join("zero");
    let err = train(&s, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("box_weight"), "{err}");
    let mut s = lite0_setup(&root, 1).with_boxes(root.join("missing.csv"), 1.0, 16);
    s.out = root.join("missing");
    let err = train(&s, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("missing.csv"), "{err}");
    std::fs::write(root.join("bad.csv"), "id,x,y,w,h\ntrain000,1,2,three,4\n").unwrap();
    let mut s = lite0_setup(&root, 1).with_boxes(root.join("bad.csv"), 1.0, 16);
    s.out = root.join("bad");
    let err = train(&s, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("bad.csv:2:") && err.contains("column w"), "{err}");
}

#[test]
fn resuming_with_another_box_file_is_refused_naming_it() {
    let root = fresh_dir(&base(), "resume-boxes");
    write_dataset(&root, 6, 3);
    let mut s = lite0_setup(&root, 2).with_boxes(root.join("boxes.csv"), 1.0, 16);
    s.stop_after_epochs = Some(1);
    train(&s, &mut |_| {}).unwrap();
    // The same boxes, one moved by a pixel: another file.
    let text = std::fs::read_to_string(root.join("boxes.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let fields: Vec<&str> = lines[1].split(',').collect();
    let moved = format!(
        "{},{},{},{},{},{}",
        fields[0],
        fields[1],
        fields[2].parse::<u32>().unwrap() + 1,
        fields[3],
        fields[4],
        fields[5]
    );
    lines[1] = moved;
    std::fs::write(root.join("moved.csv"), lines.join("\n") + "\n").unwrap();
    let mut resumed = s.clone().with_boxes(root.join("moved.csv"), 1.0, 16);
    resumed.resume = true;
    resumed.stop_after_epochs = None;
    let err = train(&resumed, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("cannot resume: the box file differs"), "{err}");
    // With the original file it resumes.
    let mut same = s.clone();
    same.resume = true;
    same.stop_after_epochs = None;
    train(&same, &mut |_| {}).unwrap();
}

#[test]
fn impossible_boxes_are_errors_naming_their_line_or_image() {
    use fracture_train::localize::{localize_items, read_boxes};
    let root = fresh_dir(&base(), "impossible");
    write_dataset(&root, 4, 2);
    for (name, row, reason) in [
        ("outside", "val000,val,100000,2,3,4", "beyond 16384 pixels"),
        ("zero", "val000,val,1,2,0,4", "zero or negative width"),
        ("huge", "val000,val,0,0,1e308,1e308", "beyond 16384 pixels"),
        ("negative", "val000,val,-5,2,3,4", "left of or above"),
    ] {
        let path = root.join(format!("{name}.csv"));
        std::fs::write(&path, format!("id,split,x,y,w,h\nval001,val,1,1,2,2\n{row}\n")).unwrap();
        let err = read_boxes(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{name}.csv:3:")) && err.contains(reason),
            "{err}"
        );
    }
    // Within the limits but outside its 64-pixel image: named when the image is measured.
    let mut s = lite0_setup(&root, 1);
    s.out = root.join("model");
    let outcome = train(&s, &mut |_| {}).unwrap();
    let model = TrainedModel::load(&outcome.best_model, &fracture_train::candle_core::Device::Cpu).unwrap();
    let layout = fracture_train::data::DatasetLayout::discover(&root.join("data")).unwrap();
    let val = layout.split(fracture_train::data::Split::Val).unwrap().to_vec();
    let fractured = val.iter().find(|i| i.label.is_fractured()).unwrap();
    let id = fracture_train::localize::image_id(&fractured.path);
    std::fs::write(root.join("far.csv"), format!("id,x,y,w,h\n{id},60,60,500,500\n")).unwrap();
    let boxes = read_boxes(&root.join("far.csv")).unwrap();
    let err = localize_items(
        &model,
        &val,
        &boxes,
        &fracture_train::data::DecodeLimits::default(),
        CamMethod::default(),
        model.model.net.default_cam_layer(),
        0.5,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("lies outside the image of 64 × 64 pixels") && err.contains(&id),
        "{err}"
    );
}
