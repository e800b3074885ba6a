//! One radiograph through `fracture-infer` alone: load a model file, predict, say where the
//! evidence lies. `fracture-downstream [MODEL] [IMAGE]`; by default the ready model committed in
//! fracture's repository and the first fractured radiograph of FracAtlas's val split (CC BY 4.0)
//! at `../shared/data/fracatlas` beside the repository.

use std::error::Error;
use std::path::{Path, PathBuf};

use fracture_infer::TrainedModel;
use fracture_infer::candle_core::Device;

/// The repository root: two folders above this package.
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The first image (by name) of FracAtlas's val split, fractured class.
fn first_radiograph() -> Result<PathBuf, Box<dyn Error>> {
    let folder = repository().join("../shared/data/fracatlas/val/fractured");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .map_err(|e| format!("no radiographs at {} ({e}): give an image as the second argument", folder.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| format!("{} holds no images", folder.display()).into())
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let model_file = args
        .next()
        .unwrap_or_else(|| repository().join("crates/fracture-cli/models/fracture-lite0.safetensors"));
    let image = match args.next() {
        Some(path) => path,
        None => first_radiograph()?,
    };
    let model = TrainedModel::load(&model_file, &Device::Cpu)?;
    let layer = model.model.net.default_cam_layer();
    let bytes = std::fs::read(&image).map_err(|e| format!("{}: {e}", image.display()))?;
    let p = model.predictor().with_evidence(Some(layer)).bytes(&bytes, &image)?;
    println!("image: {}", image.display());
    println!(
        "P(fractured) = {:.4}; threshold {:.4}; {}",
        p.p_fractured,
        model.threshold(),
        if p.fractured { "fractured" } else { "not fractured" }
    );
    match p.evidence {
        Some(e) => println!(
            "evidence: peak at ({:.0}, {:.0}), box x {:.0} y {:.0} width {:.0} height {:.0} (image pixels)",
            e.peak[0], e.peak[1], e.region[0], e.region[1], e.region[2], e.region[3]
        ),
        None => println!("evidence: none above the map's level"),
    }
    Ok(())
}
