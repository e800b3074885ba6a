//! Running a model over a dataset, and the report of how well it did.

use candle_core::{Device, ModuleT, Tensor};
use fracture_data::{FolderDataset, make_batch};
use fracture_eval::{BinaryMetrics, ConfusionMatrix, roc_auc};
use fracture_model::FractureNet;
use serde::{Deserialize, Serialize};

use crate::{Result, batch_to_tensors, bce_with_logits};

/// The fracture logits of every image of `dataset`, in dataset order, without augmentation or
/// dropout, computed `batch_size` images at a time on `device`.
pub fn predict_logits(
    net: &FractureNet,
    dataset: &FolderDataset,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(dataset.len());
    let indices: Vec<usize> = (0..dataset.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let batch = make_batch(dataset, chunk, None);
        let (x, _) = batch_to_tensors(&batch, device)?;
        out.extend(net.forward_t(&x, false)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// `sigmoid(logit)` in f64: P(fractured).
pub fn sigmoid(logit: f32) -> f64 {
    1.0 / (1.0 + (-f64::from(logit)).exp())
}

/// Mean loss of logits against the dataset's labels, with the training loss function.
pub fn mean_loss(logits: &[f32], dataset: &FolderDataset, pos_weight: Option<f64>) -> Result<f64> {
    let targets: Vec<f32> = dataset.items().iter().map(|i| i.label.target()).collect();
    let n = logits.len();
    let x = Tensor::from_vec(logits.to_vec(), n, &Device::Cpu)?;
    let y = Tensor::from_vec(targets, n, &Device::Cpu)?;
    Ok(f64::from(
        bce_with_logits(&x, &y, pos_weight)?.to_scalar::<f32>()?,
    ))
}

/// How a model did on one set of images at one operating threshold. Positive = fractured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Number of images.
    pub n: usize,
    /// Number of fractured images.
    pub positives: usize,
    /// The operating threshold on P(fractured).
    pub threshold: f64,
    /// (TP + TN) / n.
    pub accuracy: Option<f64>,
    /// TP / (TP + FP).
    pub precision: Option<f64>,
    /// TP / (TP + FN), the same as `sensitivity`.
    pub recall: Option<f64>,
    /// TP / (TP + FN): the share of fractures found.
    pub sensitivity: Option<f64>,
    /// TN / (TN + FP).
    pub specificity: Option<f64>,
    /// TN / (TN + FN).
    pub npv: Option<f64>,
    /// 2·TP / (2·TP + FP + FN).
    pub f1: Option<f64>,
    /// (sensitivity + specificity) / 2.
    pub balanced_accuracy: Option<f64>,
    /// Area under the ROC curve (threshold-free).
    pub roc_auc: Option<f64>,
    /// The counts behind the threshold metrics.
    pub confusion: ConfusionMatrix,
}

impl EvalReport {
    /// The report of P(fractured) `probabilities` against `actual` (`true` = fractured).
    pub fn new(probabilities: &[f64], actual: &[bool], threshold: f64) -> Result<Self> {
        let confusion = ConfusionMatrix::from_scores(probabilities, actual, threshold)?;
        let m = BinaryMetrics::from_confusion(&confusion);
        Ok(EvalReport {
            n: actual.len(),
            positives: actual.iter().filter(|&&a| a).count(),
            threshold,
            accuracy: m.accuracy,
            precision: m.precision,
            recall: m.recall,
            sensitivity: m.recall,
            specificity: m.specificity,
            npv: m.npv,
            f1: m.f1,
            balanced_accuracy: m.balanced_accuracy,
            roc_auc: roc_auc(probabilities, actual)?,
            confusion,
        })
    }
}

/// Logits, probabilities and the report of a model on a dataset.
pub fn evaluate(
    net: &FractureNet,
    dataset: &FolderDataset,
    threshold: f64,
    batch_size: usize,
    device: &Device,
) -> Result<(Vec<f32>, EvalReport)> {
    let logits = predict_logits(net, dataset, batch_size, device)?;
    let report = report_from_logits(&logits, dataset, threshold)?;
    Ok((logits, report))
}

/// The report of logits (in dataset order) against the dataset's labels.
pub fn report_from_logits(logits: &[f32], dataset: &FolderDataset, threshold: f64) -> Result<EvalReport> {
    let probs: Vec<f64> = logits.iter().map(|&l| sigmoid(l)).collect();
    let actual: Vec<bool> = dataset.items().iter().map(|i| i.label.is_fractured()).collect();
    EvalReport::new(&probs, &actual, threshold)
}
