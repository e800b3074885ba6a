//! Running a model over images: logits for training, probabilities (optionally test-time augmented)
//! and reports for evaluation.

use candle_core::{Device, ModuleT, Tensor};
use fracture_data::{FolderDataset, make_batch};
use fracture_eval::EvalReport;
use fracture_model::FractureNet;

use crate::{Result, Tta, batch_to_tensors, bce_with_logits, predict_dataset, truth};

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
        let batch = make_batch(dataset, chunk, None)?;
        let (x, _) = batch_to_tensors(&batch, device)?;
        out.extend(net.forward_t(&x, false)?.to_vec1::<f32>()?);
    }
    Ok(out)
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

/// The report of P(fractured) `probabilities` (in dataset order) against the dataset's labels.
pub fn report_for(probabilities: &[f64], dataset: &FolderDataset, threshold: f64) -> Result<EvalReport> {
    Ok(EvalReport::new(probabilities, &truth(dataset), threshold)?)
}

/// Probabilities and the report of a model on a dataset at a threshold.
pub fn evaluate(
    net: &FractureNet,
    dataset: &FolderDataset,
    threshold: f64,
    batch_size: usize,
    device: &Device,
) -> Result<(Vec<f64>, EvalReport)> {
    let probs = predict_dataset(net, dataset, batch_size, Tta::Off, device)?;
    let report = report_for(&probs, dataset, threshold)?;
    Ok((probs, report))
}
