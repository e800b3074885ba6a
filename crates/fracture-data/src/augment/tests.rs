use super::*;
use proptest::prelude::*;

fn ramp(h: usize, w: usize) -> Array2<f32> {
    Array2::from_shape_fn((h, w), |(y, x)| ((x * 7 + y * 3) % 17) as f32 / 16.0)
}

fn check_keeps_shape_and_range(h: usize, w: usize, seed: u64) -> Result<(), TestCaseError> {
    let aug = Augmenter::new(AugmentConfig::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut img = ramp(h, w);
    aug.apply(&mut img, &mut sample_rng(seed, 0, 0));
    prop_assert_eq!(img.dim(), (h, w));
    prop_assert!(img.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
    Ok(())
}

/// The box `[x, y, w, h]` around the pixels above 0.5.
fn bright_box(image: &Array2<f32>) -> Option<[f32; 4]> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for ((y, x), &v) in image.indexed_iter() {
        if v > 0.5 {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
        }
    }
    (x0 < x1).then(|| [x0 as f32, y0 as f32, (x1 - x0) as f32, (y1 - y0) as f32])
}

fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let ix = (a[0] + a[2]).min(b[0] + b[2]) - a[0].max(b[0]);
    let iy = (a[1] + a[3]).min(b[1] + b[3]) - a[1].max(b[1]);
    let inter = ix.max(0.0) * iy.max(0.0);
    inter / (a[2] * a[3] + b[2] * b[3] - inter)
}

#[test]
fn a_box_moves_with_its_image() {
    // A white rectangle on black, augmented with every geometric transform on and nothing else:
    // the mapped box is the box around the rectangle's pixels in the augmented image.
    let config = AugmentConfig {
        brightness: 0.0,
        contrast: 0.0,
        fill: FillMode::Constant(0.0),
        rotation_deg: 20.0,
        zoom: [0.8, 1.2],
        shift: 0.15,
        ..AugmentConfig::default()
    };
    let aug = Augmenter::new(config).unwrap();
    let (h, w) = (96, 80);
    let region = [20.0f32, 50.0, 24.0, 16.0];
    let mut image = Array2::<f32>::zeros((h, w));
    for y in 50..66 {
        for x in 20..44 {
            image[[y, x]] = 1.0;
        }
    }
    let (mut flips, mut checked) = (0, 0);
    for seed in 0..60u64 {
        let draw = aug.draw(&mut sample_rng(seed, 1, 2));
        let mut moved = image.clone();
        aug.apply(&mut moved, &mut sample_rng(seed, 1, 2));
        let mut by_draw = image.clone();
        draw.apply(&mut by_draw, aug.config());
        assert_eq!(moved, by_draw, "seed {seed}: the draw is not the one apply used");
        flips += usize::from(draw.hflip) + usize::from(draw.vflip);
        let (Some(want), Some(got)) = (bright_box(&moved), draw.map_box(region, (h, w))) else {
            continue;
        };
        checked += 1;
        assert!(
            iou(want, got) > 0.8,
            "seed {seed}: {want:?} vs {got:?} ({draw:?})"
        );
    }
    assert!(checked > 50 && flips > 30, "{checked} checked, {flips} flips");
    // Without augmentation the box stays put; a box pushed outside is gone.
    let none = Augmenter::new(AugmentConfig::none())
        .unwrap()
        .draw(&mut sample_rng(0, 0, 0));
    assert_eq!(none.map_box(region, (h, w)), Some(region));
    assert_eq!(none.map_box([90.0, 0.0, 5.0, 5.0], (h, w)), None);
}

proptest! {
    #[test]
    fn augment_keeps_shape_and_range_for_any_seed(h in 1usize..48, w in 1usize..48, seed: u64) {
        check_keeps_shape_and_range(h, w, seed)?;
    }

    #[test]
    fn flip_twice_is_identity(h in 1usize..40, w in 1usize..40) {
        let img = ramp(h, w);
        let mut a = img.clone();
        flip_horizontal(&mut a);
        flip_horizontal(&mut a);
        prop_assert_eq!(&a, &img);
        flip_vertical(&mut a);
        flip_vertical(&mut a);
        prop_assert_eq!(&a, &img);
    }

    #[test]
    fn same_seed_same_image(seed: u64, epoch in 0u64..5, index in 0u64..1000) {
        let aug = Augmenter::new(AugmentConfig::default()).unwrap();
        let mut a = ramp(24, 20);
        let mut b = a.clone();
        aug.apply(&mut a, &mut sample_rng(seed, epoch, index));
        aug.apply(&mut b, &mut sample_rng(seed, epoch, index));
        prop_assert_eq!(a, b);
    }
}

#[test]
fn different_seeds_give_different_images() {
    let aug = Augmenter::new(AugmentConfig::default()).unwrap();
    let mut a = ramp(32, 32);
    let mut b = a.clone();
    aug.apply(&mut a, &mut sample_rng(1, 0, 0));
    aug.apply(&mut b, &mut sample_rng(2, 0, 0));
    assert_ne!(a, b);
}

#[test]
fn gamma_alone_is_a_monotone_map_within_its_range() {
    let cfg = AugmentConfig {
        gamma: 0.5,
        ..AugmentConfig::none()
    };
    let aug = Augmenter::new(cfg).unwrap();
    let img = ramp(16, 16);
    let mut changed = 0;
    for seed in 0..20 {
        let mut out = img.clone();
        aug.apply(&mut out, &mut sample_rng(seed, 0, 0));
        // v^γ with γ in [1/1.5, 1.5]: order kept, 0 and 1 fixed, every value between v^1.5 and v^(2/3).
        for (&v, &o) in img.iter().zip(&out) {
            assert!(
                o >= v.powf(1.5) - 1e-6 && o <= v.powf(1.0 / 1.5) + 1e-6,
                "{v} -> {o}"
            );
        }
        changed += usize::from(out != img);
    }
    assert!(changed >= 18, "gamma changed {changed} of 20 images");
    let bad = AugmentConfig {
        gamma: 3.0,
        ..AugmentConfig::none()
    };
    assert!(
        Augmenter::new(bad)
            .unwrap_err()
            .to_string()
            .contains("augment.gamma")
    );
}

#[test]
fn none_is_identity() {
    let aug = Augmenter::new(AugmentConfig::none()).unwrap();
    let img = ramp(16, 16);
    let mut out = img.clone();
    aug.apply(&mut out, &mut sample_rng(0, 0, 0));
    assert_eq!(out, img);
}

#[test]
fn flips_mirror_exactly() {
    let img = Array2::from_shape_vec((2, 3), vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5]).unwrap();
    let mut h = img.clone();
    flip_horizontal(&mut h);
    assert_eq!(h.as_slice().unwrap(), &[0.2, 0.1, 0.0, 0.5, 0.4, 0.3]);
    let mut v = img.clone();
    flip_vertical(&mut v);
    assert_eq!(v.as_slice().unwrap(), &[0.3, 0.4, 0.5, 0.0, 0.1, 0.2]);
}

#[test]
fn rotation_by_180_degrees_equals_both_flips() {
    let img = ramp(9, 11);
    let mut flipped = img.clone();
    flip_horizontal(&mut flipped);
    flip_vertical(&mut flipped);
    let warp = Warp {
        angle_rad: std::f32::consts::PI,
        zoom: 1.0,
        shift_x: 0.0,
        shift_y: 0.0,
    };
    let rotated = warp.apply(&img, FillMode::Nearest);
    for (a, b) in rotated.iter().zip(flipped.iter()) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn shift_moves_content_and_fills_with_the_constant() {
    let mut img = Array2::<f32>::zeros((8, 8));
    img[[4, 2]] = 1.0;
    let warp = Warp {
        angle_rad: 0.0,
        zoom: 1.0,
        shift_x: 3.0,
        shift_y: -1.0,
    };
    let out = warp.apply(&img, FillMode::Constant(0.5));
    assert!((out[[3, 5]] - 1.0).abs() < 1e-6);
    assert!((out[[4, 0]] - 0.5).abs() < 1e-6, "left columns come from outside");
}

#[test]
fn invalid_settings_name_their_field() {
    let bad = AugmentConfig {
        zoom: [1.2, 0.8],
        ..AugmentConfig::default()
    };
    assert!(
        Augmenter::new(bad)
            .unwrap_err()
            .to_string()
            .contains("augment.zoom")
    );
    let bad = AugmentConfig {
        shift: f32::NAN,
        ..AugmentConfig::default()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("augment.shift"));
}

#[test]
fn acquisition_augmentation_changes_images_within_range_and_keeps_older_streams() {
    let base = AugmentConfig::default();
    let acq = base
        .with_overrides("blur=1.5, noise=0.05, jpeg=30, resolution=0.4")
        .unwrap();
    let (plain, acquired) = (Augmenter::new(base).unwrap(), Augmenter::new(acq).unwrap());
    let mut changed = 0;
    for seed in 0..24u64 {
        let a = plain.draw(&mut sample_rng(seed, 0, 1));
        let b = acquired.draw(&mut sample_rng(seed, 0, 1));
        // The draws of the older settings come first and are the same.
        assert_eq!((a.hflip, a.vflip, a.warp), (b.hflip, b.vflip, b.warp));
        assert_eq!((a.bright, a.contrast, a.gamma), (b.bright, b.contrast, b.gamma));
        assert!(a.blur.is_none() && a.noise.is_none() && a.jpeg.is_none() && a.resolution.is_none());
        let mut x = ramp(40, 48);
        let mut y = x.clone();
        a.apply(&mut x, plain.config());
        b.apply(&mut y, acquired.config());
        assert!(y.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
        changed += usize::from(x != y);
        if let Some(q) = b.jpeg {
            assert!((30..=95).contains(&q));
        }
        if let Some(f) = b.resolution {
            assert!((0.4..=1.0).contains(&f));
        }
    }
    // Each acquisition step runs with probability 0.5: nearly every image gets at least one.
    assert!(changed >= 18, "{changed} of 24 changed");
    let err = base.with_overrides("blurr=1").unwrap_err().to_string();
    assert!(err.contains("blurr"), "{err}");
    assert!(base.with_overrides("jpeg=120").is_err());
    assert!(
        base.with_overrides("noise=x")
            .unwrap_err()
            .to_string()
            .contains("augment.noise")
    );
}
