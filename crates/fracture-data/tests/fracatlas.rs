//! The real radiographs: FracAtlas (Abedeen et al., Scientific Data 10, 521, 2023; CC BY 4.0), read
//! from `../shared/data/fracatlas`. Skipped with a message where absent, unless
//! `FRACTURE_REQUIRE_SHARED=1`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use fracture_data::{Dataset, DatasetLayout, FolderDataset, Label, LoadOptions, PreprocessConfig, Split};

#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn all_2028_radiographs_load_with_the_documented_counts() {
    let root = fracture_testkit::fracatlas();
    let layout = DatasetLayout::discover(&root).unwrap();
    let summary = layout.summary();
    let counts: Vec<(Split, usize, usize)> = summary
        .splits
        .iter()
        .map(|s| (s.split, s.fractured, s.not_fractured))
        .collect();
    assert_eq!(
        counts,
        vec![(Split::Train, 281, 1235), (Split::Val, 88, 424)],
        "{summary}"
    );
    assert!(layout.skipped.is_empty(), "{summary}");

    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fracatlas-cache-64");
    let _ = std::fs::remove_dir_all(&cache);
    let options = LoadOptions {
        disk_cache: Some(cache),
        ..LoadOptions::default()
    };
    let cfg = PreprocessConfig::with_size(64);
    let mut total = 0;
    for split in [Split::Train, Split::Val] {
        let items = layout.split(split).unwrap();
        let ds = FolderDataset::load(items, &cfg, &options).unwrap();
        assert_eq!(ds.len(), items.len(), "{split}: {:?}", ds.skipped());
        assert_eq!(ds.stats().decoded, items.len());
        total += ds.len();
        // Real radiographs: neither blank nor saturated.
        for i in (0..ds.len()).step_by(97) {
            let s = ds.get(i).unwrap();
            let mean = s.image.mean().unwrap();
            let std = s.image.std(0.0);
            assert!(
                (0.02..0.98).contains(&mean) && std > 0.02,
                "{}: mean {mean} std {std}",
                ds.path(i).unwrap().display()
            );
        }
        // The second load comes entirely from the disk cache and gives the same pixels.
        let again = FolderDataset::load(items, &cfg, &options).unwrap();
        assert_eq!(
            (again.stats().decoded, again.stats().from_disk_cache),
            (0, items.len())
        );
        assert_eq!(again.image_u8(5), ds.image_u8(5));
        assert_eq!(
            again.counts()[Label::Fractured.index()],
            ds.counts()[Label::Fractured.index()]
        );
    }
    assert_eq!(total, 2028);
}
