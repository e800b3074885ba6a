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
    /// Acquisition: with probability 0.5, a Gaussian blur of standard deviation drawn uniformly
    /// from `[0, blur]` pixels of the network input (0 = off).
    #[serde(default)]
    pub blur: f32,
    /// Acquisition: with probability 0.5, Gaussian noise of standard deviation drawn uniformly from
    /// `[0, noise]` (share of the full range; 0 = off).
    #[serde(default)]
    pub noise: f32,
    /// Acquisition: with probability 0.5, JPEG re-encoding at a quality drawn uniformly from
    /// `[jpeg_quality, 95]` (0 = off).
    #[serde(default)]
    pub jpeg_quality: u8,
    /// Acquisition: with probability 0.5, the image scaled down to a factor drawn uniformly from
    /// `[resolution, 1]` of its side and back up (0 = off): a lower-resolution detector.
    #[serde(default)]
    pub resolution: f32,
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
            blur: 0.0,
            noise: 0.0,
            jpeg_quality: 0,
            resolution: 0.0,
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
            blur: 0.0,
            noise: 0.0,
            jpeg_quality: 0,
            resolution: 0.0,
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
            && !self.has_acquisition()
    }

    fn has_acquisition(&self) -> bool {
        self.blur != 0.0 || self.noise != 0.0 || self.jpeg_quality != 0 || self.resolution != 0.0
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
            ("augment.blur", self.blur, 10.0),
            ("augment.noise", self.noise, 0.5),
            ("augment.resolution", self.resolution, 1.0),
        ] {
            if !(v.is_finite() && (0.0..=max).contains(&v)) {
                return bad(field, format!("{v} is not in [0, {max}]"));
            }
        }
        if self.jpeg_quality > 95 {
            return bad(
                "augment.jpeg_quality",
                format!("{} is not in 1..=95 (0 = off)", self.jpeg_quality),
            );
        }
        if let FillMode::Constant(v) = self.fill
            && !(v.is_finite() && (0.0..=1.0).contains(&v))
        {
            return bad("augment.fill", format!("constant {v} is not in [0, 1]"));
        }
        Ok(())
    }

    /// This configuration with the settings of `spec` changed: comma-separated `key=value` pairs
    /// with the keys `rotation` (degrees), `hflip` and `vflip` (`true`/`false`), `zoom` (`MIN:MAX`),
    /// `shift`, `fill` (`nearest`, or a constant value in [0, 1]: 0 = black), `brightness`,
    /// `contrast`, `gamma`, `blur` (pixels), `noise`, `jpeg` (minimum quality, 0 = off) and
    /// `resolution` (smallest scale factor, 0 = off); e.g.
    /// `zoom=0.75:1.6,blur=1.2,jpeg=30`. The result is validated; an error names the key.
    ///
    /// ```
    /// use fracture_data::AugmentConfig;
    /// let a = AugmentConfig::none().with_overrides("zoom=0.8:1.5, noise=0.02").unwrap();
    /// assert_eq!((a.zoom, a.noise), ([0.8, 1.5], 0.02));
    /// assert!(AugmentConfig::none().with_overrides("zoom=2").is_err());
    /// ```
    pub fn with_overrides(mut self, spec: &str) -> Result<Self> {
        let bad = |field: &'static str, reason: String| Error::InvalidConfig { field, reason };
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad("augment", format!("`{pair}` is not KEY=VALUE")))?;
            let (key, value) = (key.trim(), value.trim());
            let number = |field: &'static str| {
                value
                    .parse::<f32>()
                    .map_err(|_| bad(field, format!("`{value}` is not a number")))
            };
            let flag = |field: &'static str| {
                value
                    .parse::<bool>()
                    .map_err(|_| bad(field, format!("`{value}` is not true or false")))
            };
            match key {
                "rotation" => self.rotation_deg = number("augment.rotation_deg")?,
                "hflip" => self.horizontal_flip = flag("augment.horizontal_flip")?,
                "vflip" => self.vertical_flip = flag("augment.vertical_flip")?,
                "zoom" => {
                    let (lo, hi) = value
                        .split_once(':')
                        .ok_or_else(|| bad("augment.zoom", format!("`{value}` is not MIN:MAX")))?;
                    let parse = |v: &str| {
                        v.trim()
                            .parse::<f32>()
                            .map_err(|_| bad("augment.zoom", format!("`{v}` is not a number")))
                    };
                    self.zoom = [parse(lo)?, parse(hi)?];
                }
                "shift" => self.shift = number("augment.shift")?,
                "fill" => {
                    self.fill = match value {
                        "nearest" => FillMode::Nearest,
                        v => FillMode::Constant(v.parse::<f32>().map_err(|_| {
                            bad(
                                "augment.fill",
                                format!("`{v}` is not `nearest` or a value in [0, 1]"),
                            )
                        })?),
                    }
                }
                "brightness" => self.brightness = number("augment.brightness")?,
                "contrast" => self.contrast = number("augment.contrast")?,
                "gamma" => self.gamma = number("augment.gamma")?,
                "blur" => self.blur = number("augment.blur")?,
                "noise" => self.noise = number("augment.noise")?,
                "resolution" => self.resolution = number("augment.resolution")?,
                "jpeg" => {
                    self.jpeg_quality = value
                        .parse::<u8>()
                        .map_err(|_| bad("augment.jpeg_quality", format!("`{value}` is not 0-95")))?
                }
                other => {
                    return Err(bad(
                        "augment",
                        format!(
                            "unknown key `{other}` (known: rotation, hflip, vflip, zoom, shift, fill, brightness, \
                             contrast, gamma, blur, noise, jpeg, resolution)"
                        ),
                    ));
                }
            }
        }
        self.validate()?;
        Ok(self)
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

impl Augmenter {
    /// The random values of one application, drawn from `rng` exactly as [`Augment::apply`] draws
    /// them: from a generator in the same state, `apply` transforms the image by this draw. A
    /// trainer uses it to move annotations (boxes) along with their image.
    pub fn draw(&self, rng: &mut dyn RngCore) -> AugmentDraw {
        let c = &self.config;
        // Every random value in a fixed order, so a sample's randomness does not depend on which
        // other augmentations are switched on.
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
        // Acquisition draws, each only when switched on (same reason as gamma).
        let maybe = |on: bool, rng: &mut dyn RngCore| -> Option<f32> {
            if on {
                let apply = rng.random_bool(0.5);
                let t: f32 = rng.random();
                apply.then_some(t)
            } else {
                None
            }
        };
        let resolution = maybe(c.resolution > 0.0, rng).map(|t| lerp(c.resolution, 1.0, t));
        let blur = maybe(c.blur > 0.0, rng).map(|t| t * c.blur);
        let noise = maybe(c.noise > 0.0, rng).map(|t| (t * c.noise, rng.next_u64()));
        let jpeg = maybe(c.jpeg_quality > 0, rng)
            .map(|t| lerp(f32::from(c.jpeg_quality), 95.0, t).round().clamp(1.0, 95.0) as u8);
        AugmentDraw {
            resolution,
            blur,
            noise,
            jpeg,
            hflip: c.horizontal_flip && hflip,
            vflip: c.vertical_flip && vflip,
            warp: c.has_warp().then_some(WarpDraw {
                angle_deg: angle,
                zoom,
                shift: [dx, dy],
            }),
            bright,
            contrast,
            gamma,
        }
    }
}

/// The random values of one augmentation (see [`Augmenter::draw`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentDraw {
    /// Mirrored left-right.
    pub hflip: bool,
    /// Mirrored top-bottom (after the left-right mirror).
    pub vflip: bool,
    /// The affine warp, when one is switched on.
    pub warp: Option<WarpDraw>,
    bright: f32,
    contrast: f32,
    gamma: f32,
    resolution: Option<f32>,
    blur: Option<f32>,
    noise: Option<(f32, u64)>,
    jpeg: Option<u8>,
}

/// The warp of an [`AugmentDraw`]: rotation and zoom about the image centre, then a shift.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarpDraw {
    /// Rotation, degrees.
    pub angle_deg: f32,
    /// Scale factor (above 1 enlarges the content).
    pub zoom: f32,
    /// Translation `[x, y]` as a fraction of the width and height.
    pub shift: [f32; 2],
}

impl WarpDraw {
    fn on(&self, (h, w): (usize, usize)) -> Warp {
        Warp {
            angle_rad: self.angle_deg.to_radians(),
            zoom: self.zoom,
            shift_x: self.shift[0] * w as f32,
            shift_y: self.shift[1] * h as f32,
        }
    }
}

impl AugmentDraw {
    /// Where the point `(x, y)` of an `(h, w)` image lands in the augmented image, in continuous
    /// pixel coordinates (pixel `i` spans `[i, i + 1)`): the flips, then the warp.
    pub fn map_point(&self, (x, y): (f32, f32), (h, w): (usize, usize)) -> (f32, f32) {
        let x = if self.hflip { w as f32 - x } else { x };
        let y = if self.vflip { h as f32 - y } else { y };
        match self.warp {
            None => (x, y),
            Some(warp) => {
                let warp = warp.on((h, w));
                // Pixel centres sit at i + 0.5; the warp works on centre indices.
                let (px, py) = warp.forward(x - 0.5, y - 0.5, (h, w));
                (px + 0.5, py + 0.5)
            }
        }
    }

    /// The axis-aligned box `[x, y, width, height]` around the augmented corners of `region` (a box
    /// in an `(h, w)` image, pixels), clipped to the image; `None` when nothing of it stays inside.
    pub fn map_box(&self, region: [f32; 4], (h, w): (usize, usize)) -> Option<[f32; 4]> {
        let [x, y, bw, bh] = region;
        let corners = [(x, y), (x + bw, y), (x, y + bh), (x + bw, y + bh)].map(|p| self.map_point(p, (h, w)));
        let x0 = corners.iter().map(|c| c.0).fold(f32::INFINITY, f32::min).max(0.0);
        let y0 = corners.iter().map(|c| c.1).fold(f32::INFINITY, f32::min).max(0.0);
        let x1 = corners
            .iter()
            .map(|c| c.0)
            .fold(f32::NEG_INFINITY, f32::max)
            .min(w as f32);
        let y1 = corners
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max)
            .min(h as f32);
        (x1 > x0 && y1 > y0).then_some([x0, y0, x1 - x0, y1 - y0])
    }

    /// Applies this draw to `image` (as [`Augment::apply`] does with the same values).
    pub fn apply(&self, image: &mut Array2<f32>, config: &AugmentConfig) {
        if self.hflip {
            flip_horizontal(image);
        }
        if self.vflip {
            flip_vertical(image);
        }
        if let Some(warp) = self.warp {
            *image = warp.on(image.dim()).apply(image, config.fill);
        }
        if config.brightness != 0.0 || config.contrast != 0.0 {
            let mean = image.mean().unwrap_or(0.0);
            let (contrast, bright) = (self.contrast, self.bright);
            image.mapv_inplace(|v| ((v - mean) * contrast + mean + bright).clamp(0.0, 1.0));
        }
        if self.gamma != 1.0 {
            let gamma = self.gamma;
            image.mapv_inplace(|v| v.powf(gamma));
        }
        if let Some(factor) = self.resolution {
            crate::acquisition::resolution_round_trip(image, factor);
        }
        if let Some(sigma) = self.blur {
            crate::acquisition::gaussian_blur(image, sigma);
        }
        if let Some((sigma, seed)) = self.noise {
            crate::acquisition::add_noise(image, sigma, seed);
        }
        if let Some(quality) = self.jpeg {
            // Re-encoding an in-memory gray image fails only on an encoder bug; the image is
            // written only after a successful decode, so it is then left as it was.
            let _ = crate::acquisition::jpeg_round_trip(image, quality);
        }
    }
}

impl Augment for Augmenter {
    fn apply(&self, image: &mut Array2<f32>, rng: &mut dyn RngCore) {
        if self.config.is_identity() {
            return;
        }
        self.draw(rng).apply(image, &self.config);
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
    /// Where centre-index point `(x, y)` of an `(h, w)` image goes: `c + t + zoom · R(angle) · (p − c)`.
    fn forward(&self, x: f32, y: f32, (h, w): (usize, usize)) -> (f32, f32) {
        let (cx, cy) = ((w as f32 - 1.0) * 0.5, (h as f32 - 1.0) * 0.5);
        let (sin, cos) = self.angle_rad.sin_cos();
        let (ux, uy) = (x - cx, y - cy);
        (
            cx + self.shift_x + self.zoom * (cos * ux - sin * uy),
            cy + self.shift_y + self.zoom * (sin * ux + cos * uy),
        )
    }

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
mod tests;
