//! Seeded data augmentation on `(H, W)` f32 images in [0, 1].

use ndarray::{Array2, Axis};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A random transformation of one image. The caller owns and seeds the random number generator, so
/// the same seed gives the same images.
pub trait Augment: Send + Sync {
    /// Transforms `image` (shape `(H, W)`, values in [0, 1]) in place; keeps its shape and keeps
    /// values in [0, 1].
    fn apply(&self, image: &mut Array2<f32>, rng: &mut dyn RngCore);
}

/// What lies outside the source image after a rotation, zoom-out or shift.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillMode {
    /// Repeat the nearest edge pixel (Keras' default, what the original project used).
    #[default]
    Nearest,
    /// A constant value in [0, 1] (0 = black).
    Constant(f32),
}

/// Which augmentations run and how strong they are. Every one can be switched off on its own:
/// an angle, shift, brightness or contrast of 0, a zoom range of `[1, 1]`, a flip flag of `false`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Rotation by an angle drawn uniformly from `[-rotation_deg, rotation_deg]` degrees.
    pub rotation_deg: f32,
    /// Mirror left-right with probability 0.5.
    pub horizontal_flip: bool,
    /// Mirror top-bottom with probability 0.5.
    pub vertical_flip: bool,
    /// Scale factor drawn uniformly from `[zoom[0], zoom[1]]`; above 1 enlarges the content.
    pub zoom: [f32; 2],
    /// Translation along each axis drawn uniformly from `[-shift, shift]`, as a fraction of the side.
    pub shift: f32,
    /// An offset drawn uniformly from `[-brightness, brightness]` added to every pixel.
    pub brightness: f32,
    /// A factor drawn uniformly from `[1 - contrast, 1 + contrast]` that scales the distance of
    /// every pixel from the image mean.
    pub contrast: f32,
    /// Gamma correction `v ↦ v^γ` with `ln γ` drawn uniformly from `[-ln(1 + gamma), ln(1 + gamma)]`:
    /// mimics the different exposure curves of X-ray systems (0 = off).
    #[serde(default)]
    pub gamma: f32,
    /// What fills the area outside the source after a geometric transform.
    #[serde(default)]
    pub fill: FillMode,
}

impl Default for AugmentConfig {
    /// Moderate settings in the spirit of the original project: ±15°, both flips, zoom 0.9-1.1,
    /// shift 10%, brightness ±0.1, contrast ±10%, nearest-edge fill.
    fn default() -> Self {
        AugmentConfig {
            rotation_deg: 15.0,
            horizontal_flip: true,
            vertical_flip: true,
            zoom: [0.9, 1.1],
            shift: 0.1,
            brightness: 0.1,
            contrast: 0.1,
            gamma: 0.0,
            fill: FillMode::Nearest,
        }
    }
}

impl AugmentConfig {
    /// Every augmentation off: [`Augmenter::apply`] leaves images unchanged.
    pub fn none() -> Self {
        AugmentConfig {
            rotation_deg: 0.0,
            horizontal_flip: false,
            vertical_flip: false,
            zoom: [1.0, 1.0],
            shift: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            gamma: 0.0,
            fill: FillMode::Nearest,
        }
    }

    /// Whether no augmentation is switched on.
    pub fn is_identity(&self) -> bool {
        !self.has_warp()
            && !self.horizontal_flip
            && !self.vertical_flip
            && self.brightness == 0.0
            && self.contrast == 0.0
            && self.gamma == 0.0
    }

    fn has_warp(&self) -> bool {
        self.rotation_deg != 0.0 || self.zoom != [1.0, 1.0] || self.shift != 0.0
    }

    /// Checks that every value is finite and in its range, naming the field that is not.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        if !(self.rotation_deg.is_finite() && (0.0..=180.0).contains(&self.rotation_deg)) {
            return bad(
                "augment.rotation_deg",
                format!("{} is not in [0, 180]", self.rotation_deg),
            );
        }
        let [lo, hi] = self.zoom;
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi && hi <= 10.0) {
            return bad(
                "augment.zoom",
                format!("[{lo}, {hi}] must satisfy 0 < min <= max <= 10"),
            );
        }
        for (field, v, max) in [
            ("augment.shift", self.shift, 1.0),
            ("augment.brightness", self.brightness, 1.0),
            ("augment.contrast", self.contrast, 1.0),
            ("augment.gamma", self.gamma, 2.0),
        ] {
            if !(v.is_finite() && (0.0..=max).contains(&v)) {
                return bad(field, format!("{v} is not in [0, {max}]"));
            }
        }
        if let FillMode::Constant(v) = self.fill
            && !(v.is_finite() && (0.0..=1.0).contains(&v))
        {
            return bad("augment.fill", format!("constant {v} is not in [0, 1]"));
        }
        Ok(())
    }
}

/// The standard augmentation pipeline: flips, then one affine warp (rotation, zoom, shift) with
/// bilinear sampling, then brightness and contrast, clamping to [0, 1], then gamma.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmenter {
    config: AugmentConfig,
}

impl Augmenter {
    /// An augmenter for a validated configuration.
    pub fn new(config: AugmentConfig) -> Result<Self> {
        config.validate()?;
        Ok(Augmenter { config })
    }

    /// Its configuration.
    pub fn config(&self) -> &AugmentConfig {
        &self.config
    }
}

impl Augment for Augmenter {
    fn apply(&self, image: &mut Array2<f32>, rng: &mut dyn RngCore) {
        let c = &self.config;
        if c.is_identity() {
            return;
        }
        // Draw every random value in a fixed order so a sample's randomness does not depend on
        // which other augmentations are switched on.
        let hflip = rng.random_bool(0.5);
        let vflip = rng.random_bool(0.5);
        let angle: f32 = rng.random_range(-1.0..=1.0) * c.rotation_deg;
        let zoom: f32 = lerp(c.zoom[0], c.zoom[1], rng.random());
        let dx: f32 = rng.random_range(-1.0..=1.0) * c.shift;
        let dy: f32 = rng.random_range(-1.0..=1.0) * c.shift;
        let bright: f32 = rng.random_range(-1.0..=1.0) * c.brightness;
        let contrast: f32 = 1.0 + rng.random_range(-1.0..=1.0) * c.contrast;
        // Drawn only when switched on, so configurations from before it existed keep their streams.
        let gamma = if c.gamma > 0.0 {
            (rng.random_range(-1.0f32..=1.0) * (1.0 + c.gamma).ln()).exp()
        } else {
            1.0
        };

        if c.horizontal_flip && hflip {
            flip_horizontal(image);
        }
        if c.vertical_flip && vflip {
            flip_vertical(image);
        }
        if c.has_warp() {
            let (h, w) = image.dim();
            let warp = Warp {
                angle_rad: angle.to_radians(),
                zoom,
                shift_x: dx * w as f32,
                shift_y: dy * h as f32,
            };
            *image = warp.apply(image, c.fill);
        }
        if c.brightness != 0.0 || c.contrast != 0.0 {
            let mean = image.mean().unwrap_or(0.0);
            image.mapv_inplace(|v| ((v - mean) * contrast + mean + bright).clamp(0.0, 1.0));
        }
        if gamma != 1.0 {
            image.mapv_inplace(|v| v.powf(gamma));
        }
    }
}

fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}

/// Mirrors an image left-right in place.
pub fn flip_horizontal(image: &mut Array2<f32>) {
    image.invert_axis(Axis(1));
    *image = image.as_standard_layout().into_owned();
}

/// Mirrors an image top-bottom in place.
pub fn flip_vertical(image: &mut Array2<f32>) {
    image.invert_axis(Axis(0));
    *image = image.as_standard_layout().into_owned();
}

/// A rotation about the image centre, a zoom about the centre, then a shift.
#[derive(Debug, Clone, Copy)]
struct Warp {
    angle_rad: f32,
    zoom: f32,
    shift_x: f32,
    shift_y: f32,
}

impl Warp {
    /// Resamples `src` through the inverse transform with bilinear interpolation.
    fn apply(&self, src: &Array2<f32>, fill: FillMode) -> Array2<f32> {
        let (h, w) = src.dim();
        let (cx, cy) = ((w as f32 - 1.0) * 0.5, (h as f32 - 1.0) * 0.5);
        // Inverse of p' = c + t + zoom · R(angle) · (p − c):  p = c + R(−angle) · (p' − c − t) / zoom.
        let (sin, cos) = self.angle_rad.sin_cos();
        let inv = 1.0 / self.zoom;
        let mut out = Array2::<f32>::zeros((h, w));
        for ((y, x), v) in out.indexed_iter_mut() {
            let ux = x as f32 - cx - self.shift_x;
            let uy = y as f32 - cy - self.shift_y;
            let sx = cx + (cos * ux + sin * uy) * inv;
            let sy = cy + (-sin * ux + cos * uy) * inv;
            *v = bilinear(src, sx, sy, fill);
        }
        out
    }
}

fn bilinear(src: &Array2<f32>, x: f32, y: f32, fill: FillMode) -> f32 {
    let (h, w) = src.dim();
    let (maxx, maxy) = (w as f32 - 1.0, h as f32 - 1.0);
    let (x, y) = match fill {
        FillMode::Nearest => (x.clamp(0.0, maxx), y.clamp(0.0, maxy)),
        FillMode::Constant(c) => {
            if !(x > -1.0 && x < w as f32 && y > -1.0 && y < h as f32) {
                return c;
            }
            (x, y)
        }
    };
    let x0 = x.floor();
    let y0 = y.floor();
    let (fx, fy) = (x - x0, y - y0);
    let at = |xi: f32, yi: f32| -> f32 {
        if xi < 0.0 || yi < 0.0 || xi > maxx || yi > maxy {
            match fill {
                FillMode::Constant(c) => c,
                FillMode::Nearest => src[[yi.clamp(0.0, maxy) as usize, xi.clamp(0.0, maxx) as usize]],
            }
        } else {
            src[[yi as usize, xi as usize]]
        }
    };
    let top = at(x0, y0) * (1.0 - fx) + at(x0 + 1.0, y0) * fx;
    let bottom = at(x0, y0 + 1.0) * (1.0 - fx) + at(x0 + 1.0, y0 + 1.0) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// The generator for one sample of one epoch: a distinct ChaCha8 stream per `(seed, epoch, index)`,
/// so augmented batches are identical whatever the thread count or batch order.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..].copy_from_slice(b"augment\0");
    ChaCha8Rng::from_seed(key)
}

#[cfg(test)]
mod tests {
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
}
