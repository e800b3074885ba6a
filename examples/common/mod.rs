//! What the examples share: a tiny trained model on generated images, for running them without data.

use std::path::PathBuf;

use fracture_train::recipe::Overrides;
use fracture_train::{Preset, TrainSetup, train};

/// Trains the original recipe for one epoch at 32 px on a generated dataset under the system's
/// temporary folder (`<tmp>/<name>`); returns the run folder and the dataset root.
pub(crate) fn tiny_trained_run(name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    fracture_testkit::write_synthetic_dataset(
        &data,
        &fracture_testkit::SyntheticSpec::train_val((12, 12), (5, 5)),
    );
    let recipe = Preset::Original.recipe().with(&Overrides {
        image_size: Some(32),
        epochs: Some(1),
        batch_size: Some(8),
        ..Overrides::default()
    });
    let outcome = train(&TrainSetup::new(&recipe, &data, root.join("run")), &mut |_| {})?;
    Ok((outcome.out, data))
}
