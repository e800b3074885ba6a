//! Class activation maps: where in the image the evidence for the fracture score lies.
//!
//! Both methods start from the last convolutional feature map `A` (after its ReLU) and the gradient
//! `G = ∂logit/∂A` of the fracture logit:
//!
//! - **Grad-CAM** (Selvaraju et al., ICCV 2017) weighs each channel by its spatially averaged
//!   gradient, `α_c = mean_ij G_cij`, and maps `ReLU(Σ_c α_c A_c)`.
//! - **HiResCAM** (Draelos & Carin, 2020) keeps the gradient per position: `ReLU(Σ_c G_cij A_cij)`.
//!
//! For a network whose head is global average pooling and a linear layer the two are the same map. For
//! the original CNN, whose dense layer sees every position separately, the averaged weights mix
//! background and evidence: on a constructed case with a known answer (the model's test
//! `grad_cam_points_at_the_evidence`) Grad-CAM came out negative everywhere (most negative on the
//! evidence), while HiResCAM marked the evidence. [`CamMethod::HiResCam`] is therefore the default.
//! Maps are scaled to [0, 1].

use candle_core::{Tensor, Var};

use crate::FractureNet;
use crate::kernels;
use crate::net::{Inner, dense};

/// How channel evidence is combined (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum CamMethod {
    /// Channels weighted by their spatially averaged gradient.
    #[cfg_attr(feature = "clap", value(name = "gradcam"))]
    GradCam,
    /// Gradient times activation at each position (faithful for dense heads); the default.
    #[default]
    #[cfg_attr(feature = "clap", value(name = "hirescam"))]
    HiResCam,
}

/// Which feature map a class activation map is computed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum CamLayer {
    /// The last convolutional map (stride 32 for EfficientNet-Lite0): the map the logit is computed
    /// from, so HiResCAM there is the logit's exact decomposition; the default.
    #[default]
    Last,
    /// For EfficientNet-Lite0, the output of its last stride-16 stage (112 channels): twice as fine,
    /// with the gradient taken through the remaining blocks. The other networks use their last map.
    Stride16,
    /// The localization head's map (EfficientNet-Lite0 trained with boxes, see
    /// [`FractureNet::forward_with_map`]): `sigmoid` of its logits, each cell's probability of
    /// lying inside a fracture, not rescaled, from the forward pass alone (no backward pass). An
    /// error for a network without the head; the method does not apply.
    #[cfg_attr(
        feature = "clap",
        value(
            help = "The localization head's map (a model trained with boxes): each cell's probability of lying inside a fracture"
        )
    )]
    Head,
}

/// A class activation map at the resolution of the last convolutional feature map.
#[derive(Debug, Clone, PartialEq)]
pub struct GradCam {
    /// The method that made it.
    pub method: CamMethod,
    /// The fracture logit of the image (inference mode).
    pub logit: f32,
    /// The map, row-major `height × width`, in [0, 1]: scaled by its maximum (all zeros when no
    /// region raises the score), or for [`CamLayer::Head`] each cell's probability as it is.
    pub map: Vec<f32>,
    /// Rows of the feature map.
    pub height: usize,
    /// Columns of the feature map.
    pub width: usize,
    /// Input pixel coordinate of feature row/column `i`: `offset + stride · i` (centre of its
    /// receptive field), used by [`GradCam::upsample`].
    pub offset: f32,
    /// See `offset`.
    pub stride: f32,
}

impl GradCam {
    /// The map resampled to the `size × size` network input (bilinear, following the layers'
    /// geometry, edges clamped), row-major, in [0, 1].
    pub fn upsample(&self, size: usize) -> Vec<f32> {
        let (h, w) = (self.height, self.width);
        let coord = |u: usize, n: usize| -> (usize, usize, f32) {
            let f = ((u as f32 - self.offset) / self.stride).clamp(0.0, (n - 1) as f32);
            let i0 = f.floor() as usize;
            let i1 = (i0 + 1).min(n - 1);
            (i0, i1, f - i0 as f32)
        };
        let mut out = vec![0.0; size * size];
        if h == 0 || w == 0 {
            return out;
        }
        for y in 0..size {
            let (y0, y1, fy) = coord(y, h);
            for x in 0..size {
                let (x0, x1, fx) = coord(x, w);
                let top = self.map[y0 * w + x0] * (1.0 - fx) + self.map[y0 * w + x1] * fx;
                let bottom = self.map[y1 * w + x0] * (1.0 - fx) + self.map[y1 * w + x1] * fx;
                out[y * size + x] = top * (1.0 - fy) + bottom * fy;
            }
        }
        out
    }
}

/// A copy of a linear layer whose weights are not tracked by autograd.
fn detached(layer: &candle_nn::Linear) -> candle_nn::Linear {
    candle_nn::Linear::new(layer.weight().detach(), layer.bias().map(Tensor::detach))
}

impl FractureNet {
    /// The class activation map of the fracture logit for one image `(1, 1, S, S)`, in inference mode.
    pub fn grad_cam(&self, xs: &Tensor, method: CamMethod) -> candle_core::Result<GradCam> {
        if xs.dim(0)? != 1 {
            candle_core::bail!("grad_cam takes one image, got a batch of {}", xs.dim(0)?);
        }
        self.grad_cams(xs, method)?
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("no map for the image".into()))
    }

    /// The class activation maps of a batch `(B, 1, S, S)`, one per image, from one forward pass in
    /// inference mode (each image's logit comes with its map, so the map costs no second pass).
    /// Images do not interact: every layer runs per image at inference (batch norm uses its running
    /// statistics), so the summed logits' gradient is each image's own.
    pub fn grad_cams(&self, xs: &Tensor, method: CamMethod) -> candle_core::Result<Vec<GradCam>> {
        self.grad_cams_at(xs, method, CamLayer::Last)
    }

    /// [`FractureNet::grad_cams`] on the feature map `layer` names.
    pub fn grad_cams_at(
        &self,
        xs: &Tensor,
        method: CamMethod,
        layer: CamLayer,
    ) -> candle_core::Result<Vec<GradCam>> {
        self.check_input(xs)?;
        if layer == CamLayer::Head {
            return self.head_maps(xs, method);
        }
        let (features, offset, stride, logits) = match &self.inner {
            Inner::Seed(net) => {
                let a = self.features(net, xs)?;
                // Make the feature map a leaf so the backward pass reports its gradient, and run the head
                // on detached weights so that the backward pass computes nothing else.
                let a = Var::from_tensor(&a.detach())?;
                let x = kernels::max_pool2x2(a.as_tensor(), self.kernels)?.flatten_from(1)?;
                let x = dense(&detached(&net.fc1), &x, true, self.kernels)?;
                let logit = dense(&detached(&net.fc2), &x, false, self.kernels)?.squeeze(1)?;
                // conv1 (valid 3×3) → pool 2 → conv2 (valid 3×3): feature i is centred on input 2i + 3.5.
                (a, 3.5f32, 2.0f32, logit)
            }
            Inner::Resnet(net) => {
                let a = self.resnet_features(net, xs, false)?;
                let a = Var::from_tensor(&a.detach())?;
                let pooled = a.as_tensor().mean(3)?.mean(2)?;
                let logit = dense(&detached(&net.fc), &pooled, false, self.kernels)?.squeeze(1)?;
                let (offset, stride) = net.geometry();
                (a, offset, stride, logit)
            }
            Inner::EfficientNet(net) if layer == CamLayer::Stride16 => {
                let running = crate::layers::Stats::Running;
                let split = net.stride16_blocks();
                let a = net.features_until(xs, running, self.kernels, split)?;
                let a = Var::from_tensor(&a.detach())?;
                // The remaining blocks run on the leaf, so the backward pass reaches it through them.
                let rest = net.features_after(a.as_tensor(), running, self.kernels, split)?;
                let pooled = rest.mean(3)?.mean(2)?;
                let logit = dense(&detached(&net.fc), &pooled, false, self.kernels)?.squeeze(1)?;
                let (offset, stride) = net.geometry_until(self.config().image_size, split);
                (a, offset, stride, logit)
            }
            Inner::EfficientNet(net) => {
                let a = net.features(xs, crate::layers::Stats::Running, self.kernels)?;
                let a = Var::from_tensor(&a.detach())?;
                let pooled = a.as_tensor().mean(3)?.mean(2)?;
                let logit = dense(&detached(&net.fc), &pooled, false, self.kernels)?.squeeze(1)?;
                let (offset, stride) = net.geometry(self.config().image_size);
                (a, offset, stride, logit)
            }
        };
        let grads = logits.sum_all()?.backward()?;
        let a = features.as_tensor();
        let (b, _, h, w) = a.dims4()?;
        let maps = match grads.get(a) {
            Some(g) => {
                let weighted = match method {
                    CamMethod::GradCam => a.broadcast_mul(&g.mean_keepdim(3)?.mean_keepdim(2)?)?,
                    CamMethod::HiResCam => (a * g)?,
                };
                weighted.sum(1)?.relu()?.flatten_all()?.to_vec1::<f32>()?
            }
            None => vec![0.0; b * h * w],
        };
        scaled_maps(&maps, &logits, method, (h, w), (offset, stride), true)
    }

    /// The layer [`FractureNet::grad_cams_at`] uses when none is asked for: the localization
    /// head when the network has one, else the last map.
    pub fn default_cam_layer(&self) -> CamLayer {
        if self.has_localization_head() {
            CamLayer::Head
        } else {
            CamLayer::Last
        }
    }

    /// The localization head's maps ([`CamLayer::Head`]).
    fn head_maps(&self, xs: &Tensor, method: CamMethod) -> candle_core::Result<Vec<GradCam>> {
        let Some((_, offset, stride)) = self.localization_grid() else {
            candle_core::bail!("this network has no localization head (it was trained without boxes)");
        };
        let (logits, map) = self.forward_with_map(xs, false)?;
        let (_, h, w) = map.dims3()?;
        let probabilities = candle_nn::ops::sigmoid(&map)?.flatten_all()?.to_vec1::<f32>()?;
        scaled_maps(&probabilities, &logits, method, (h, w), (offset, stride), false)
    }
}

/// One [`GradCam`] per image from row-major maps `(B, h, w)` (≥ 0) and the logits `(B,)`, each map
/// scaled by its maximum when `rescale`.
fn scaled_maps(
    maps: &[f32],
    logits: &Tensor,
    method: CamMethod,
    (h, w): (usize, usize),
    (offset, stride): (f32, f32),
    rescale: bool,
) -> candle_core::Result<Vec<GradCam>> {
    let logits = logits.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    Ok(maps
        .chunks(h * w)
        .zip(logits)
        .map(|(map, logit)| {
            let max = map.iter().copied().fold(0.0f32, f32::max);
            let map = if rescale && max > 0.0 {
                map.iter().map(|v| v / max).collect()
            } else {
                map.to_vec()
            };
            GradCam {
                method,
                logit,
                map,
                height: h,
                width: w,
                offset,
                stride,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_gives_each_image_its_own_map() {
        let device = candle_core::Device::Cpu;
        for config in [
            crate::ModelConfig::seed(24),
            crate::ModelConfig::efficientnet_lite0(64),
        ] {
            let model = crate::Model::new(&config, 3, &device).unwrap();
            let s = config.image_size;
            let xs = Tensor::rand(0f32, 1f32, (3, 1, s, s), &device).unwrap();
            let batch = model.net.grad_cams(&xs, CamMethod::HiResCam).unwrap();
            assert_eq!(batch.len(), 3);
            for (i, cam) in batch.iter().enumerate() {
                let one = model
                    .net
                    .grad_cam(&xs.narrow(0, i, 1).unwrap(), CamMethod::HiResCam)
                    .unwrap();
                assert!(
                    (one.logit - cam.logit).abs() < 1e-4,
                    "{} vs {}",
                    one.logit,
                    cam.logit
                );
                let diff = one
                    .map
                    .iter()
                    .zip(&cam.map)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(diff < 1e-4, "{}: map differs by {diff}", config.arch_name());
            }
        }
    }

    #[test]
    fn the_stride16_map_of_efficientnet_is_twice_as_fine_with_the_same_logit() {
        let device = candle_core::Device::Cpu;
        let config = crate::ModelConfig::efficientnet_lite0(64);
        let model = crate::Model::new(&config, 5, &device).unwrap();
        let xs = Tensor::rand(0f32, 1f32, (2, 1, 64, 64), &device).unwrap();
        let last = model
            .net
            .grad_cams_at(&xs, CamMethod::HiResCam, CamLayer::Last)
            .unwrap();
        let fine = model
            .net
            .grad_cams_at(&xs, CamMethod::HiResCam, CamLayer::Stride16)
            .unwrap();
        for (a, b) in last.iter().zip(&fine) {
            assert_eq!((a.height, a.width, a.stride), (2, 2, 32.0));
            assert_eq!((b.height, b.width, b.stride), (4, 4, 16.0));
            assert!((a.logit - b.logit).abs() < 1e-4, "{} vs {}", a.logit, b.logit);
            assert!(b.map.iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }

    fn lite0_with_head(size: usize, seed: u64, stride: usize) -> crate::Model {
        let mut config = crate::ModelConfig::efficientnet_lite0(size);
        if let crate::ArchConfig::EfficientNetLite0(e) = &mut config.arch {
            e.localization_head = true;
            e.localization_stride = stride;
        }
        crate::Model::new(&config, seed, &candle_core::Device::Cpu).unwrap()
    }

    /// The plain forward pass's logits, checked equal to `logits` (the head must not change them).
    fn assert_same_logits(model: &crate::Model, xs: &Tensor, logits: &Tensor) -> Tensor {
        let plain = candle_core::ModuleT::forward_t(&model.net, xs, false).unwrap();
        let d = (logits - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "the head changes the logit by {d}");
        plain
    }

    #[test]
    fn the_localization_head_maps_the_stride16_grid_from_the_forward_pass() {
        let device = candle_core::Device::Cpu;
        let model = lite0_with_head(64, 9, 16);
        assert!(model.net.has_localization_head());
        assert_eq!(model.net.default_cam_layer(), CamLayer::Head);
        let names: Vec<String> = model.named_vars().into_iter().map(|(n, _)| n).collect();
        for want in [
            "head.loc.conv1.weight",
            "head.loc.conv1.bias",
            "head.loc.conv2.weight",
            "head.loc.conv2.bias",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing");
        }
        let xs = Tensor::rand(0f32, 1f32, (2, 1, 64, 64), &device).unwrap();
        let (logits, map) = model.net.forward_with_map(&xs, false).unwrap();
        assert_eq!(map.dims(), &[2, 4, 4]);
        let (cells, _, stride) = model.net.localization_grid().unwrap();
        assert_eq!((cells, stride), (4, 16.0));
        let plain = assert_same_logits(&model, &xs, &logits);
        // Untrained, the map starts near the prior sigmoid(−4).
        let p = candle_nn::ops::sigmoid(&map)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((p - 0.018).abs() < 0.01, "{p}");
        let cams = model
            .net
            .grad_cams_at(&xs, CamMethod::HiResCam, CamLayer::Head)
            .unwrap();
        for (cam, logit) in cams.iter().zip(plain.to_vec1::<f32>().unwrap()) {
            assert_eq!((cam.height, cam.width, cam.stride), (4, 4, 16.0));
            assert!((cam.logit - logit).abs() < 1e-5);
            assert!(cam.map.iter().all(|v| (0.0..=1.0).contains(v)));
            // Probabilities, not rescaled: untrained, every cell is near the prior.
            assert!(cam.map.iter().all(|&v| (v - 0.018).abs() < 0.02), "{:?}", cam.map);
        }
        // A network without the head says so.
        let plain_model = crate::Model::new(&crate::ModelConfig::efficientnet_lite0(64), 9, &device).unwrap();
        assert_eq!(plain_model.net.default_cam_layer(), CamLayer::Last);
        let err = plain_model
            .net
            .grad_cams_at(&xs, CamMethod::HiResCam, CamLayer::Head)
            .unwrap_err();
        assert!(err.to_string().contains("no localization head"), "{err}");
        assert!(plain_model.net.forward_with_map(&xs, false).is_err());
    }

    #[test]
    fn the_fine_localization_head_maps_the_stride8_grid() {
        let device = candle_core::Device::Cpu;
        let model = lite0_with_head(64, 9, 8);
        assert_eq!(model.net.localization_grid(), Some((8, 7.0, 8.0)));
        let xs = Tensor::rand(0f32, 1f32, (2, 1, 64, 64), &device).unwrap();
        let (logits, map) = model.net.forward_with_map(&xs, false).unwrap();
        assert_eq!(map.dims(), &[2, 8, 8]);
        assert_same_logits(&model, &xs, &logits);
        let cams = model
            .net
            .grad_cams_at(&xs, CamMethod::HiResCam, CamLayer::Head)
            .unwrap();
        assert_eq!(
            (cams[0].height, cams[0].width, cams[0].stride, cams[0].offset),
            (8, 8, 8.0, 7.0)
        );
        // An odd size: "SAME" padding rounds up, and the upsampled stride-16 features are cropped.
        let odd = lite0_with_head(72, 9, 8);
        let xs = Tensor::rand(0f32, 1f32, (1, 1, 72, 72), &device).unwrap();
        let (_, map) = odd.net.forward_with_map(&xs, false).unwrap();
        assert_eq!(map.dims(), &[1, 9, 9]);
        let bad = crate::ModelConfig {
            arch: crate::ArchConfig::EfficientNetLite0(crate::EfficientNetConfig {
                localization_stride: 4,
                ..Default::default()
            }),
            ..crate::ModelConfig::efficientnet_lite0(64)
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("localization_stride")
        );
    }

    #[test]
    fn the_localization_heads_gradient_matches_finite_differences() {
        for stride in [16, 8] {
            check_head_gradient(stride);
        }
    }

    /// A `shape` tensor uniform in `[lo, hi)` from a seeded generator: the same values every run
    /// (candle's `Tensor::rand` cannot be seeded, and a central difference that happens to straddle
    /// a ReLU6 corner would fail one run in many).
    fn seeded(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| rng.random_range(lo..hi))
            .collect();
        Tensor::from_vec(values, shape, &candle_core::Device::Cpu).unwrap()
    }

    fn check_head_gradient(stride: usize) {
        let device = candle_core::Device::Cpu;
        let model = lite0_with_head(32, 4, stride);
        let xs = seeded(&[2, 1, 32, 32], 0.0, 1.0, 100 + stride as u64);
        let cells = 32 / stride;
        let r = seeded(&[2, cells, cells], -1.0, 1.0, 200 + stride as u64);
        let vars = model.named_vars();
        let objective = || -> f64 {
            let (_, map) = model.net.forward_with_map(&xs, false).unwrap();
            f64::from((map * &r).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
        };
        let (_, map) = model.net.forward_with_map(&xs, false).unwrap();
        let grads = (map * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for name in [
            "head.loc.conv1.weight",
            "head.loc.conv2.weight",
            "_blocks.10._project_conv.weight",
        ] {
            let var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let values = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // The coordinate with the largest gradient, probed by central differences.
            let i = (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap();
            let eps = 1e-2f32;
            let probe = |v: f32| {
                let mut w = values.clone();
                w[i] = v;
                var.set(&Tensor::from_vec(w, var.as_tensor().shape(), &device).unwrap())
                    .unwrap();
                objective()
            };
            let numeric = (probe(values[i] + eps) - probe(values[i] - eps)) / (2.0 * f64::from(eps));
            probe(values[i]);
            let analytic = f64::from(g[i]);
            assert!(
                (numeric - analytic).abs() <= 0.05 * analytic.abs().max(1e-3),
                "{name}[{i}]: analytic {analytic} vs numeric {numeric}"
            );
        }
    }

    #[test]
    fn upsampling_follows_the_layer_geometry() {
        // A single hot feature at (0, 0): the input pixels near its receptive-field centre (3.5, 3.5)
        // light up, the far corner stays dark.
        let mut map = vec![0.0; 4 * 4];
        map[0] = 1.0;
        let cam = GradCam {
            method: CamMethod::HiResCam,
            logit: 0.0,
            map,
            height: 4,
            width: 4,
            offset: 3.5,
            stride: 2.0,
        };
        let up = cam.upsample(14);
        assert_eq!(up.len(), 196);
        assert!(
            (up[3 * 14 + 3] - 1.0).abs() < 1e-6,
            "clamped region before the first centre"
        );
        assert!(up[13 * 14 + 13].abs() < 1e-6);
        assert!(
            (up[4 * 14 + 4] - 0.5625).abs() < 1e-6,
            "bilinear between centres: 0.75²"
        );
    }
}
