//! [`Predictor`]: the one path from a radiograph to a prediction. Bytes, files, a labelled dataset
//! or already preprocessed images go in; P(fractured) (test-time views averaged, the stored
//! calibration applied), the decision at the stored threshold and, when asked, where the evidence
//! lies come out. `fracture serve`, `predict`, `eval` and the evaluation's robustness analyses all
//! predict through it.

use std::path::{Path, PathBuf};

use candle_core::Device;
use fracture_data::ndarray::{Array2, Array3, Axis};
use fracture_data::{Batch, DecodeLimits, FolderDataset, Skipped, decode_gray, make_batch};
use fracture_model::{CamLayer, CamMethod, GradCam};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::explain::{Explanation, HEAD_FULL_STRENGTH};
use crate::{Result, TrainedModel, Tta, predict_images, sigmoid};

/// Images per forward pass, whatever the batch size asked for (the files decoded at a time): one
/// layer's activations for 32 images at 256 px reach 200 MB, so passes of 8 keep the peak near
/// 300 MB for the ready model at the same throughput on the CPU (measured with
/// `benches/predict_memory.py`).
pub const PASS_IMAGES: usize = 8;

/// One image's prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The file (or the name the bytes were given).
    pub path: PathBuf,
    /// P(fractured), calibrated.
    pub p_fractured: f64,
    /// Whether `p_fractured >= threshold`.
    pub fractured: bool,
    /// Where the evidence lies in the image's own pixels, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<crate::evidence::Evidence>,
}

/// A decoded file: its path, the image resized for the network (u8) and its original width and
/// height in pixels.
type Decoded<'a> = (&'a Path, (Array2<u8>, (u32, u32)));

/// How a [`TrainedModel`] predicts: which test-time views it averages, whether each prediction
/// carries its evidence (and on which feature map), and the limits an encoded image must keep.
/// Made by [`TrainedModel::predictor`]; cheap to copy.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use fracture_infer::TrainedModel;
/// let model = TrainedModel::load("run/model.safetensors".as_ref(), &candle_core::Device::Cpu)?;
/// let bytes = std::fs::read("wrist.png")?;
/// let p = model.predictor().with_tta(true).bytes(&bytes, "wrist.png".as_ref())?;
/// println!("P(fractured) = {:.3}, fractured: {}", p.p_fractured, p.fractured);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Predictor<'m> {
    model: &'m TrainedModel,
    views: Tta,
    evidence: Option<CamLayer>,
    limits: DecodeLimits,
}

impl TrainedModel {
    /// A predictor on this model: the plain image (no test-time views), no evidence, the default
    /// decoding limits.
    pub fn predictor(&self) -> Predictor<'_> {
        Predictor {
            model: self,
            views: Tta::Off,
            evidence: None,
            limits: DecodeLimits::default(),
        }
    }
}

/// What one forward pass over a batch gives: calibrated P(fractured) per image, and each image's
/// map when one was asked for.
struct Scored {
    p: Vec<f64>,
    cams: Option<Vec<GradCam>>,
}

impl<'m> Predictor<'m> {
    /// Averages over the flips the model was trained with ([`TrainedModel::tta`]) when `on`, else
    /// predicts the image alone.
    pub fn with_tta(mut self, on: bool) -> Self {
        self.views = if on { self.model.tta() } else { Tta::Off };
        self
    }

    /// Averages over exactly these views.
    pub fn with_views(mut self, views: Tta) -> Self {
        self.views = views;
        self
    }

    /// Gives each prediction from bytes or files its [`Evidence`](crate::evidence::Evidence),
    /// taken on the feature map `layer` names (one more pass per image), or none.
    pub fn with_evidence(mut self, layer: Option<CamLayer>) -> Self {
        self.evidence = layer;
        self
    }

    /// The limits an encoded image must keep (pixels, file size, DICOM frames).
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The model it predicts with.
    pub fn model(&self) -> &'m TrainedModel {
        self.model
    }

    /// The device the model's weights live on.
    pub fn device(&self) -> Device {
        self.model.device()
    }

    /// The test-time views it averages.
    pub fn views(&self) -> Tta {
        self.views
    }

    /// The decoding limits it applies.
    pub fn limits(&self) -> &DecodeLimits {
        &self.limits
    }

    /// The core every other method calls: preprocessed inputs `(B, S, S)` (as
    /// [`fracture_data::PreprocessConfig::to_input`] makes them) through the network, P averaged
    /// over the views and calibrated; with `cam`, each image's map of the plain view as well (its
    /// logit then serves the plain view's P, saving a pass when no other view is asked for).
    fn score(&self, inputs: &Array3<f32>, cam: Option<(CamMethod, CamLayer)>) -> Result<Scored> {
        let device = self.model.device();
        let net = &self.model.model.net;
        let cams = match cam {
            Some((method, layer)) => {
                let x = crate::images_to_tensor(inputs.view(), &device)?;
                Some(net.grad_cams_at(&x, method, layer)?)
            }
            None => None,
        };
        let raw = match (&cams, self.views) {
            (Some(cams), Tta::Off) => cams.iter().map(|c| sigmoid(c.logit)).collect(),
            _ => predict_images(net, inputs, self.views, &device)?,
        };
        Ok(Scored {
            p: raw.into_iter().map(|p| self.model.probability(p)).collect(),
            cams,
        })
    }

    /// Calibrated P(fractured) of preprocessed inputs `(B, S, S)` f32 (as
    /// [`fracture_data::PreprocessConfig::to_input`] makes them: in [0, 1], standardized when the
    /// model was trained so), in order.
    pub fn inputs(&self, inputs: &Array3<f32>) -> Result<Vec<f64>> {
        Ok(self.score(inputs, None)?.p)
    }

    /// Calibrated P(fractured) of every image of `dataset` (loaded with the model's
    /// preprocessing), in dataset order, `batch_size` images a pass.
    pub fn dataset(&self, dataset: &FolderDataset, batch_size: usize) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(dataset.len());
        let indices: Vec<usize> = (0..dataset.len()).collect();
        for chunk in indices.chunks(batch_size.max(1)) {
            let Batch { images, .. } = make_batch(dataset, chunk, None)?;
            out.extend(self.inputs(&images)?);
        }
        Ok(out)
    }

    /// The prediction for one encoded image (any supported format, DICOM included); `origin`
    /// names it in errors and in [`Prediction::path`].
    pub fn bytes(&self, bytes: &[u8], origin: &Path) -> Result<Prediction> {
        let decoded = self
            .model
            .preprocess()
            .load_bytes_sized(bytes, origin, &self.limits)?;
        let mut out = self.decoded(&[(origin, decoded)])?;
        out.pop().ok_or_else(|| crate::Error::NoPrediction {
            path: origin.to_path_buf(),
            value: f64::NAN,
        })
    }

    /// The prediction for one encoded image with its full map (`method` on the feature map
    /// `layer` names; [`fracture_model::FractureNet::default_cam_layer`] is the localization head
    /// when the model has one): what the page and `predict --heatmap` draw. P is the same as
    /// [`Predictor::bytes`] gives.
    pub fn explain(
        &self,
        bytes: &[u8],
        origin: &Path,
        method: CamMethod,
        layer: CamLayer,
    ) -> Result<Explanation> {
        let image = decode_gray(bytes, origin, &self.limits)?;
        let pre = self.model.preprocess();
        let input = pre.to_input(pre.resize(&image)?.view());
        let scored = self.score(&input.insert_axis(Axis(0)), Some((method, layer)))?;
        let cam = scored
            .cams
            .and_then(|mut c| c.pop())
            .ok_or_else(|| crate::Error::InvalidConfig("no activation map for the image".into()))?;
        let p = checked(scored.p.first().copied().unwrap_or(f64::NAN), origin)?;
        Ok(Explanation {
            p_fractured: p,
            fractured: self.model.decide(p).is_fractured(),
            content: pre.content_box(image.width(), image.height()),
            image,
            map: cam.upsample(pre.size as usize),
            size: pre.size,
            full_strength: if layer == CamLayer::Head {
                HEAD_FULL_STRENGTH
            } else {
                1.0
            },
        })
    }

    /// Predicts every file: `batch_size` files at a time are decoded (in parallel) with the
    /// model's preprocessing and predicted, and each result goes to `each` in input order as soon
    /// as its batch is done (a prediction, or the file that could not be read). Memory does not
    /// grow with the number of files. An error returned by `each` stops the run and is returned.
    pub fn files_each(
        &self,
        files: &[PathBuf],
        batch_size: usize,
        each: &mut dyn FnMut(std::result::Result<Prediction, Skipped>) -> Result<()>,
    ) -> Result<()> {
        let pre = self.model.preprocess();
        for files in files.chunks(batch_size.max(1)) {
            let decoded: Vec<_> = files
                .par_iter()
                .map(|p| pre.load_file_sized(p, &self.limits))
                .collect();
            let mut chunk = Vec::with_capacity(files.len());
            let mut results = Vec::with_capacity(files.len());
            for (path, result) in files.iter().zip(decoded) {
                match result {
                    Ok(img) => {
                        chunk.push((path.as_path(), img));
                        results.push(None);
                    }
                    Err(e) => results.push(Some(Skipped {
                        reason: e.to_string(),
                        path: path.clone(),
                    })),
                }
            }
            let mut predicted = self.decoded(&chunk)?.into_iter();
            for slot in results {
                match slot {
                    Some(skipped) => each(Err(skipped))?,
                    None => {
                        if let Some(p) = predicted.next() {
                            each(Ok(p))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// [`Predictor::files_each`] collected: the predictions (input order, unreadable files left
    /// out) and the unreadable files. Holds every prediction in memory.
    pub fn files(&self, files: &[PathBuf], batch_size: usize) -> Result<(Vec<Prediction>, Vec<Skipped>)> {
        let mut out = Vec::with_capacity(files.len());
        let mut skipped = Vec::new();
        self.files_each(files, batch_size, &mut |r| {
            match r {
                Ok(p) => out.push(p),
                Err(s) => skipped.push(s),
            }
            Ok(())
        })?;
        Ok((out, skipped))
    }

    /// Predicts decoded images (resized to the input, with their original `(width, height)`),
    /// [`PASS_IMAGES`] a pass.
    fn decoded(&self, chunk: &[Decoded<'_>]) -> Result<Vec<Prediction>> {
        let pre = self.model.preprocess();
        let s = pre.size as usize;
        let cam = self.evidence.map(|layer| (CamMethod::default(), layer));
        let mut out = Vec::with_capacity(chunk.len());
        for part in chunk.chunks(PASS_IMAGES) {
            let mut batch = Array3::<f32>::zeros((part.len(), s, s));
            for (k, (_, (img, _))) in part.iter().enumerate() {
                batch.index_axis_mut(Axis(0), k).assign(&pre.to_input(img.view()));
            }
            let scored = self.score(&batch, cam)?;
            for (k, ((path, (_, dims)), p)) in part.iter().zip(scored.p).enumerate() {
                let p = checked(p, path)?;
                let evidence = scored.cams.as_ref().and_then(|cams| {
                    crate::evidence::locate(
                        &cams[k].upsample(s),
                        s,
                        pre.content_box(dims.0, dims.1),
                        *dims,
                        crate::evidence::EVIDENCE_LEVEL,
                    )
                });
                out.push(Prediction {
                    path: path.to_path_buf(),
                    p_fractured: p,
                    fractured: self.model.decide(p).is_fractured(),
                    evidence,
                });
            }
        }
        Ok(out)
    }
}

/// `p` itself, or the error that names the image whose network output was not a number.
fn checked(p: f64, path: &Path) -> Result<f64> {
    if p.is_nan() {
        return Err(crate::Error::NoPrediction {
            path: path.to_path_buf(),
            value: p,
        });
    }
    Ok(p)
}
