//! Discovery and loading on folder trees made by the tests.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use fracture_data::image::{DynamicImage, GrayImage, ImageBuffer, ImageFormat, Luma, Rgb};
use fracture_data::{
    Dataset, DatasetLayout, Error, FolderDataset, Label, LoadOptions, PreprocessConfig, Split,
    discover_class_folders,
};
use fracture_testkit::{fresh_dir, synthetic_xray};

fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fracture-data-discovery")
}

fn save(img: &DynamicImage, path: &Path, format: ImageFormat) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save_with_format(path, format).unwrap();
}

fn xray(seed: u64) -> DynamicImage {
    DynamicImage::ImageLuma8(synthetic_xray(40, 32, seed.is_multiple_of(2), seed))
}

#[test]
fn aliases_nesting_and_mixed_extensions() {
    let root = fresh_dir(&base(), "aliases");
    let nested = root.join("Bone_Fracture_Binary_Classification/Bone_Fracture_Binary_Classification");
    save(&xray(1), &nested.join("train/Fractured/a.JPG"), ImageFormat::Jpeg);
    save(&xray(2), &nested.join("train/POSITIVE/b.png"), ImageFormat::Png);
    save(
        &xray(3),
        &nested.join("train/not_fractured/c.Bmp"),
        ImageFormat::Bmp,
    );
    save(
        &xray(4),
        &nested.join("train/normal/sub/d.tiff"),
        ImageFormat::Tiff,
    );
    save(&xray(5), &nested.join("Valid/abnormal/e.webp"), ImageFormat::WebP);
    save(
        &xray(6),
        &nested.join("Valid/Non-Fractured/f.jpeg"),
        ImageFormat::Jpeg,
    );
    save(&xray(7), &nested.join("test/fracture/g.tif"), ImageFormat::Tiff);
    save(&xray(8), &nested.join("test/negative/h.PNG"), ImageFormat::Png);
    std::fs::write(nested.join("train/Fractured/notes.txt"), b"radiologist notes").unwrap();
    std::fs::write(nested.join("train/Fractured/empty.jpg"), b"").unwrap();
    std::fs::write(nested.join("train/Fractured/.DS_Store"), b"mac").unwrap();
    std::fs::create_dir_all(nested.join("train/unsure")).unwrap();

    let layout = DatasetLayout::discover(&root).unwrap();
    assert_eq!(layout.root, nested);
    let train = layout.split(Split::Train).unwrap();
    let names: Vec<_> = train
        .iter()
        .map(|i| i.path.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["a.JPG", "b.png", "d.tiff", "c.Bmp"],
        "sorted by label, then path (normal/ < not_fractured/)"
    );
    assert_eq!(train[0].label, Label::Fractured);
    assert_eq!(train[3].label, Label::NotFractured);
    assert_eq!(
        layout.split(Split::Val).unwrap().len(),
        2,
        "`Valid` is the val split"
    );
    assert_eq!(layout.split(Split::Test).unwrap().len(), 2);

    let reasons: Vec<String> = layout.skipped.iter().map(|s| s.to_string()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("notes.txt") && r.contains("not an image")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("empty.jpg") && r.contains("empty")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unsure") && r.contains("not a class folder")),
        "{reasons:?}"
    );
    assert!(
        !reasons.iter().any(|r| r.contains(".DS_Store")),
        "hidden files are ignored"
    );

    // Every supported format decodes.
    let ds = FolderDataset::load(train, &PreprocessConfig::with_size(24), &LoadOptions::default()).unwrap();
    assert_eq!(ds.len(), 4);
    assert!(ds.skipped().is_empty(), "{:?}", ds.skipped());
    let summary = layout.summary();
    let text = summary.to_string();
    assert!(text.contains("train") && text.contains("skipped: 3"), "{text}");
    assert_eq!(summary.split(Split::Train).unwrap().fractured, 2);

    // Deterministic: a second discovery gives the same order.
    assert_eq!(DatasetLayout::discover(&root).unwrap().splits, layout.splits);
}

#[test]
fn corrupt_truncated_and_fake_images_are_skipped_and_named() {
    let root = fresh_dir(&base(), "corrupt");
    let good = root.join("train/fractured/good.png");
    save(&xray(10), &good, ImageFormat::Png);
    save(
        &xray(11),
        &root.join("train/not fractured/good.jpg"),
        ImageFormat::Jpeg,
    );
    let mut jpeg = Vec::new();
    xray(12)
        .write_to(&mut std::io::Cursor::new(&mut jpeg), ImageFormat::Jpeg)
        .unwrap();
    let truncated = root.join("train/fractured/truncated.jpg");
    std::fs::write(&truncated, &jpeg[..jpeg.len() / 4]).unwrap();
    let fake = root.join("train/not fractured/fake.png");
    std::fs::write(&fake, b"<html>not a png</html>").unwrap();
    let noise = root.join("train/not fractured/noise.jpg");
    std::fs::write(
        &noise,
        (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<_>>(),
    )
    .unwrap();

    let layout = DatasetLayout::discover(&root).unwrap();
    let ds = FolderDataset::load(
        layout.split(Split::Train).unwrap(),
        &PreprocessConfig::with_size(16),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(ds.len(), 2, "the two good images remain");
    let skipped: Vec<&Path> = ds.skipped().iter().map(|s| s.path.as_path()).collect();
    assert!(skipped.contains(&truncated.as_path()), "{skipped:?}");
    assert!(skipped.contains(&fake.as_path()), "{skipped:?}");
    assert!(skipped.contains(&noise.as_path()), "{skipped:?}");
    assert_eq!(ds.stats().skipped, 3);
    assert!(
        ds.skipped().iter().all(|s| s.reason.contains("decode")),
        "{:?}",
        ds.skipped()
    );
    assert_eq!(ds.counts(), [1, 1]);
    // Out-of-range access is an error, not a panic.
    assert!(ds.get(2).is_err());
}

#[test]
fn layout_errors_name_the_path() {
    let missing = base().join("no-such-folder");
    let err = DatasetLayout::discover(&missing).unwrap_err();
    assert!(
        matches!(err, Error::MissingRoot { .. }) && err.to_string().contains("no-such-folder"),
        "{err}"
    );

    let root = fresh_dir(&base(), "no-splits");
    std::fs::create_dir_all(root.join("images")).unwrap();
    let err = DatasetLayout::discover(&root).unwrap_err().to_string();
    assert!(
        err.contains("no split folder") && err.contains("no-splits"),
        "{err}"
    );

    let root = fresh_dir(&base(), "split-without-classes");
    save(&xray(1), &root.join("train/fractured/a.png"), ImageFormat::Png);
    save(
        &xray(2),
        &root.join("train/not fractured/b.png"),
        ImageFormat::Png,
    );
    std::fs::create_dir_all(root.join("val/misc")).unwrap();
    let err = DatasetLayout::discover(&root).unwrap_err();
    assert!(
        matches!(&err, Error::NoClassFolders { path } if path.ends_with("val")),
        "{err}"
    );

    let root = fresh_dir(&base(), "empty-class");
    save(&xray(1), &root.join("train/fractured/a.png"), ImageFormat::Png);
    std::fs::create_dir_all(root.join("train/not fractured")).unwrap();
    std::fs::write(root.join("train/not fractured/readme.txt"), b"x").unwrap();
    let err = DatasetLayout::discover(&root).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::EmptyClass {
                class: "not fractured",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("empty-class"), "{err}");

    let root = fresh_dir(&base(), "classes-only");
    save(&xray(1), &root.join("fractured/a.png"), ImageFormat::Png);
    save(&xray(2), &root.join("normal/b.png"), ImageFormat::Png);
    let err = DatasetLayout::discover(&root).unwrap_err().to_string();
    assert!(err.contains("class folders but no split folders"), "{err}");
    // ... which is exactly what the flat reader takes.
    let (items, skipped) = discover_class_folders(&root).unwrap();
    assert_eq!(items.len(), 2);
    assert!(skipped.is_empty());
}

#[test]
fn color_depth_and_cmyk_variants_preprocess_alike() {
    let root = fresh_dir(&base(), "variants");
    let gray: GrayImage = synthetic_xray(64, 64, true, 3);
    let rgb = ImageBuffer::from_fn(64, 64, |x, y| {
        let v = gray.get_pixel(x, y).0[0];
        Rgb([v, v, v])
    });
    let g16: ImageBuffer<Luma<u16>, Vec<u16>> =
        ImageBuffer::from_fn(64, 64, |x, y| Luma([u16::from(gray.get_pixel(x, y).0[0]) * 257]));
    let g16_samples = g16.as_raw().clone();
    save(
        &DynamicImage::ImageLuma8(gray.clone()),
        &root.join("gray8.png"),
        ImageFormat::Png,
    );
    save(
        &DynamicImage::ImageRgb8(rgb),
        &root.join("rgb.png"),
        ImageFormat::Png,
    );
    save(
        &DynamicImage::ImageLuma16(g16),
        &root.join("gray16.png"),
        ImageFormat::Png,
    );
    save(
        &DynamicImage::ImageLuma8(gray.clone()),
        &root.join("gray.jpg"),
        ImageFormat::Jpeg,
    );
    // CMYK JPEG (Adobe APP14), as some scanners write: ink = 255 - gray on K only.
    let cmyk: Vec<u8> = gray.as_raw().iter().flat_map(|&v| [0u8, 0, 0, 255 - v]).collect();
    let mut cmyk_jpeg = Vec::new();
    jpeg_encoder::Encoder::new(&mut cmyk_jpeg, 95)
        .encode(&cmyk, 64, 64, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    std::fs::write(root.join("cmyk.jpg"), &cmyk_jpeg).unwrap();

    let cfg = PreprocessConfig::with_size(32);
    let limits = fracture_data::DecodeLimits::default();
    let reference = cfg.load_file(&root.join("gray8.png"), &limits).unwrap();
    // 16-bit images are windowed to the values they hold: the same picture as the 8-bit image the
    // window makes of the same samples.
    let windowed = GrayImage::from_raw(64, 64, fracture_data::window16(g16_samples.as_slice())).unwrap();
    windowed.save(root.join("windowed.png")).unwrap();
    assert_eq!(
        cfg.load_file(&root.join("gray16.png"), &limits).unwrap(),
        cfg.load_file(&root.join("windowed.png"), &limits).unwrap()
    );
    for (name, tolerance) in [("rgb.png", 0), ("gray.jpg", 6), ("cmyk.jpg", 8)] {
        let out = cfg
            .load_file(&root.join(name), &limits)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let max_diff = out
            .iter()
            .zip(reference.iter())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            max_diff <= tolerance,
            "{name}: max difference {max_diff} > {tolerance}"
        );
    }
}

#[test]
fn the_disk_cache_serves_a_second_load_and_notices_changes() {
    let root = fresh_dir(&base(), "cache");
    let cache_dir = root.join("cache");
    let mut items = Vec::new();
    for i in 0..6u64 {
        let path = root.join(format!("train/fractured/{i}.png"));
        save(&xray(i), &path, ImageFormat::Png);
        items.push(fracture_data::Item::new(path, Label::Fractured));
    }
    let options = LoadOptions {
        disk_cache: Some(cache_dir.clone()),
        ..LoadOptions::default()
    };
    let cfg = PreprocessConfig::with_size(20);
    let first = FolderDataset::load(&items, &cfg, &options).unwrap();
    assert_eq!((first.stats().decoded, first.stats().from_disk_cache), (6, 0));
    let second = FolderDataset::load(&items, &cfg, &options).unwrap();
    assert_eq!((second.stats().decoded, second.stats().from_disk_cache), (0, 6));
    for i in 0..6 {
        assert_eq!(first.image_u8(i), second.image_u8(i));
    }
    // Another size is another key; a rewritten file is a miss.
    let other = FolderDataset::load(&items, &PreprocessConfig::with_size(24), &options).unwrap();
    assert_eq!(other.stats().decoded, 6);
    std::thread::sleep(std::time::Duration::from_millis(20));
    save(&xray(99), &items[0].path, ImageFormat::Png);
    let third = FolderDataset::load(&items, &cfg, &options).unwrap();
    assert_eq!((third.stats().decoded, third.stats().from_disk_cache), (1, 5));
    assert_ne!(third.image_u8(0), first.image_u8(0));
    // Entries whose pixels were zeroed on disk (headers intact) are rebuilt, counted, and never
    // served as black images.
    let mut zeroed = 0;
    for entry in std::fs::read_dir(&cache_dir).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        // The pixels sit before the 32-byte checksum.
        let end = bytes.len() - 32;
        bytes[end - 400..end].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        zeroed += 1;
    }
    assert!(zeroed >= 6);
    let rebuilt = FolderDataset::load(&items, &cfg, &options).unwrap();
    assert_eq!(rebuilt.stats().cache_corrupt, 6);
    assert_eq!(rebuilt.stats().decoded, 6);
    for i in 0..6 {
        assert_eq!(rebuilt.image_u8(i), third.image_u8(i));
    }
    let after = FolderDataset::load(&items, &cfg, &options).unwrap();
    assert_eq!(
        (after.stats().from_disk_cache, after.stats().cache_corrupt),
        (6, 0)
    );
    // A shifted load decodes every file again, bypasses the cache and changes the pixels; an
    // unreadable file is still skipped and named.
    std::fs::write(root.join("train/fractured/bad.png"), b"not a png").unwrap();
    items.push(fracture_data::Item::new(
        root.join("train/fractured/bad.png"),
        Label::Fractured,
    ));
    let shifted = LoadOptions {
        shift: Some(fracture_data::Shift::ZoomOut { pad: 1.5 }),
        ..options.clone()
    };
    let padded = FolderDataset::load(&items, &cfg, &shifted).unwrap();
    assert_eq!((padded.stats().decoded, padded.stats().from_disk_cache), (6, 0));
    assert_eq!(padded.skipped().len(), 1);
    assert_ne!(padded.image_u8(1), third.image_u8(1));
    // The padding is black: the corner of a padded image is darker than the unpadded one's.
    let corner = |d: &FolderDataset| d.image_u8(1).unwrap()[[0, 0]];
    assert!(corner(&padded) <= corner(&third));
}

#[test]
fn decompression_bombs_are_errors() {
    let root = fresh_dir(&base(), "bomb");
    // A 20000 × 20000 black PNG compresses to a few hundred kilobytes but would need 400 MB decoded.
    let path = root.join("bomb.png");
    {
        let file = std::fs::File::create(&path).unwrap();
        let mut encoder = png_writer(file, 20_000, 20_000);
        let row = vec![0u8; 20_000];
        for _ in 0..20_000 {
            encoder.write_all(&row).unwrap();
        }
        encoder.finish().unwrap();
    }
    let cfg = PreprocessConfig::with_size(32);
    let err = cfg
        .load_file(&path, &fracture_data::DecodeLimits::default())
        .unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    assert!(err.to_string().contains("bomb.png"), "{err}");
}

/// A streaming PNG writer for a gray image too large to hold comfortably in memory.
fn png_writer(file: std::fs::File, w: u32, h: u32) -> png::StreamWriter<'static, std::fs::File> {
    let mut encoder = png::Encoder::new(file, w, h);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header().unwrap().into_stream_writer().unwrap()
}

use std::io::Write;

/// A small dataset: train and val, two images per class each.
#[cfg(unix)]
fn linked_dataset(name: &str) -> PathBuf {
    let root = fresh_dir(&base(), name);
    for (i, dir) in [
        "train/fractured",
        "train/not fractured",
        "val/fractured",
        "val/not fractured",
    ]
    .iter()
    .enumerate()
    {
        for j in 0..2 {
            save(
                &xray((i * 2 + j) as u64),
                &root.join(dir).join(format!("{i}{j}.png")),
                ImageFormat::Png,
            );
        }
    }
    root
}

#[cfg(unix)]
fn counts(layout: &DatasetLayout, split: Split) -> [usize; 2] {
    let items = layout.split(split).unwrap();
    let f = items.iter().filter(|i| i.label == Label::Fractured).count();
    [f, items.len() - f]
}

#[cfg(unix)]
#[test]
fn links_to_folders_above_cannot_loop_or_relabel() {
    use std::os::unix::fs::symlink;
    let root = linked_dataset("link-loops");
    // Ten links back to the class folder itself, and one to the split folder above it.
    for i in 0..10 {
        symlink(".", root.join(format!("train/fractured/self{i}"))).unwrap();
    }
    symlink("..", root.join("train/fractured/up")).unwrap();
    let layout = DatasetLayout::discover(&root).unwrap();
    assert_eq!(
        counts(&layout, Split::Train),
        [2, 2],
        "no image counted twice or relabelled"
    );
    assert_eq!(counts(&layout, Split::Val), [2, 2]);
    assert_eq!(layout.link_problems.len(), 1, "{:?}", layout.link_problems);
    let problem = &layout.link_problems[0];
    assert!(problem.path.ends_with("train/fractured/up"), "{problem}");
    assert!(problem.reason.contains("out of its class folder"), "{problem}");
    assert!(
        layout.skipped.iter().any(|s| s.reason.contains("already walked")),
        "{:?}",
        layout.skipped
    );

    // The plain listing (predict) follows links but walks each folder once and lists each file once.
    let (files, skipped) = fracture_data::list_image_files(&root).unwrap();
    assert_eq!(files.len(), 8, "{files:?}");
    assert!(skipped.iter().all(|s| !s.reason.is_empty()));
}

#[cfg(unix)]
#[test]
fn an_image_linked_into_two_splits_or_classes_is_a_problem_kept_where_it_lives() {
    use std::os::unix::fs::symlink;
    let root = linked_dataset("link-leaks");
    // A val image linked into train, and a train image linked into the other class.
    symlink(
        root.join("val/fractured/20.png"),
        root.join("train/fractured/leak.png"),
    )
    .unwrap();
    symlink(
        root.join("train/fractured/00.png"),
        root.join("train/not fractured/relabelled.png"),
    )
    .unwrap();
    // A file outside the dataset, linked in.
    let outside = fresh_dir(&base(), "link-outside");
    save(&xray(99), &outside.join("x.png"), ImageFormat::Png);
    symlink(outside.join("x.png"), root.join("val/not fractured/outside.png")).unwrap();

    let layout = DatasetLayout::discover(&root).unwrap();
    let paths =
        |s: Split| -> Vec<PathBuf> { layout.split(s).unwrap().iter().map(|i| i.path.clone()).collect() };
    assert!(
        paths(Split::Val).contains(&root.join("val/fractured/20.png")),
        "the val image stays in val"
    );
    assert!(!paths(Split::Train).contains(&root.join("train/fractured/leak.png")));
    assert!(!paths(Split::Train).contains(&root.join("train/not fractured/relabelled.png")));
    assert!(
        paths(Split::Val).contains(&root.join("val/not fractured/outside.png")),
        "kept, but reported"
    );
    assert_eq!(counts(&layout, Split::Train), [2, 2]);
    assert_eq!(counts(&layout, Split::Val), [2, 3]);
    let reasons: Vec<String> = layout.link_problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:#?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("leak.png") && r.contains("dropped from train/fractured")),
        "{reasons:#?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("relabelled.png") && r.contains("dropped from train/not fractured")),
        "{reasons:#?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("outside.png") && r.contains("leaving the dataset root")),
        "{reasons:#?}"
    );
    assert!(layout.summary().to_string().contains("symbolic link problems: 3"));
}
