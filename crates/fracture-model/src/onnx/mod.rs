//! A network as an ONNX model (opset 13), for ONNX Runtime, TensorRT, tract and the other runtimes.
//!
//! The graph takes `image`, `(B, 1, S, S)` f32: the radiograph as gray values in [0, 1] (8-bit value
//! / 255), already fitted to the network's `S × S` input the way the model was trained (see
//! [`OnnxOptions::standardize`] for what the graph does itself). It answers `p_fractured` `(B,)`,
//! the (calibrated) P(fractured), `fractured` `(B,)` bool, the decision at the operating threshold,
//! and, for a network with a localization head, `fracture_map` `(B, M, M)`, each cell's P(a fracture
//! lies in it). Inference mode throughout: batch norms use their running statistics, dropout is
//! left out. Depthwise convolutions are `Conv` with `group`, ReLU6 is `Clip`, TensorFlow's "SAME"
//! padding becomes explicit (possibly uneven) `pads` for the declared input size.

pub(crate) mod graph;
mod proto;

use prost::Message;

use crate::{FractureNet, Result};
use graph::{Act, Graph};
use graph::{dim, dim_param, value_info};
use proto::{GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto};

/// The operator set the graph is written against.
pub const OPSET: i64 = 13;
/// The ONNX IR version that goes with [`OPSET`].
const IR_VERSION: i64 = 7;

/// Name of the graph's input, `(B, 1, S, S)` f32 in [0, 1].
pub const INPUT: &str = "image";
/// Name of the output P(fractured), `(B,)` f32.
pub const OUTPUT_P: &str = "p_fractured";
/// Name of the output decision, `(B,)` bool: `p_fractured >= threshold`.
pub const OUTPUT_DECISION: &str = "fractured";
/// Name of the localization map output, `(B, M, M)` f32 in [0, 1], when the network has the head.
pub const OUTPUT_MAP: &str = "fracture_map";

/// What the exported graph does around the network.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxOptions {
    /// `(mean, std)`: the graph computes `(image − mean) · (1 / std)` before the network, as the
    /// model's preprocessing does after scaling to [0, 1]. `None`: the image goes in unchanged.
    pub standardize: Option<(f32, f32)>,
    /// `(a, b)`: `p_fractured = sigmoid(a · logit + b)` (Platt calibration); `None`: `sigmoid(logit)`.
    pub calibration: Option<(f64, f64)>,
    /// The operating threshold on `p_fractured`, in [0, 1], for the `fractured` output.
    pub threshold: f64,
    /// Extra `metadata_props` (key, value), e.g. the preprocessing as JSON. The exporter adds
    /// `fracture.image_size`, `fracture.threshold`, and the map geometry when there is a map.
    pub metadata: Vec<(String, String)>,
    /// The text of the model's `doc_string`.
    pub doc: String,
}

/// The network and its surroundings as the bytes of an ONNX model file (weights inside).
///
/// An error when the threshold is not in [0, 1], a standardization's `std` is not positive, a
/// calibration slope is not finite and positive, or a weight cannot be read.
pub fn export(net: &FractureNet, options: &OnnxOptions) -> Result<Vec<u8>> {
    check(options)?;
    let size = net.config().image_size;
    let mut g = Graph::default();
    let mut x = INPUT.to_string();
    if let Some((mean, std)) = options.standardize {
        let m = g.constant("standardize.mean", &[], &[mean]);
        let inv = g.constant("standardize.inv_std", &[], &[1.0 / std]);
        let centred = g.node("Sub", &[&x, &m], vec![]);
        x = g.node("Mul", &[&centred, &inv], vec![]);
    }
    let act = Act { x, side: size };
    let (logit, map) = net.to_onnx(&mut g, act)?;
    // (B, 1) → (B,), then the calibration and the sigmoid.
    let flat_shape = g.constant_i64("shape.batch", &[1], &[-1]);
    let mut z = g.node("Reshape", &[&logit, &flat_shape], vec![]);
    if let Some((a, b)) = options.calibration {
        let a = g.constant("calibration.a", &[], &[a as f32]);
        let b = g.constant("calibration.b", &[], &[b as f32]);
        let scaled = g.node("Mul", &[&z, &a], vec![]);
        z = g.node("Add", &[&scaled, &b], vec![]);
    }
    g.named_node("Sigmoid", &[&z], OUTPUT_P, vec![]);
    let t = g.constant("threshold", &[], &[options.threshold as f32]);
    g.named_node("GreaterOrEqual", &[OUTPUT_P, &t], OUTPUT_DECISION, vec![]);
    let batch = || dim_param("batch");
    let mut outputs = vec![
        value_info(OUTPUT_P, proto::FLOAT, vec![batch()], "P(fractured)"),
        value_info(
            OUTPUT_DECISION,
            proto::BOOL,
            vec![batch()],
            "fractured at the operating threshold",
        ),
    ];
    let mut metadata = options.metadata.clone();
    metadata.push(("fracture.image_size".into(), size.to_string()));
    metadata.push(("fracture.threshold".into(), options.threshold.to_string()));
    if let (Some(map), Some((cells, offset, stride))) = (map, net.localization_grid()) {
        let shape = g.constant_i64("shape.map", &[3], &[-1, cells as i64, cells as i64]);
        let m = g.node("Reshape", &[&map, &shape], vec![]);
        g.named_node("Sigmoid", &[&m], OUTPUT_MAP, vec![]);
        outputs.push(value_info(
            OUTPUT_MAP,
            proto::FLOAT,
            vec![batch(), dim(cells), dim(cells)],
            "P(a fracture lies in the cell); cell (i, j) is centred on input pixel (offset + stride·i, offset + stride·j)",
        ));
        metadata.push(("fracture.map_cells".into(), cells.to_string()));
        metadata.push(("fracture.map_offset".into(), offset.to_string()));
        metadata.push(("fracture.map_stride".into(), stride.to_string()));
    }
    let graph = GraphProto {
        node: g.nodes,
        name: "fracture".into(),
        initializer: g.initializers,
        doc_string: String::new(),
        input: vec![value_info(
            INPUT,
            proto::FLOAT,
            vec![batch(), dim(1), dim(size), dim(size)],
            "gray radiograph fitted to S × S, values in [0, 1]",
        )],
        output: outputs,
    };
    let model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "fracture".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: String::new(),
        model_version: 1,
        doc_string: options.doc.clone(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props: metadata
            .into_iter()
            .map(|(key, value)| StringStringEntryProto { key, value })
            .collect(),
    };
    Ok(model.encode_to_vec())
}

fn check(options: &OnnxOptions) -> Result<()> {
    let bad = |what: String| Err(crate::Error::InvalidConfig(format!("ONNX export: {what}")));
    if !(options.threshold.is_finite() && (0.0..=1.0).contains(&options.threshold)) {
        return bad(format!("threshold {} is not in [0, 1]", options.threshold));
    }
    if let Some((mean, std)) = options.standardize
        && !(mean.is_finite() && std.is_finite() && std > 0.0)
    {
        return bad(format!(
            "standardization mean {mean}, std {std}: std must be finite and positive"
        ));
    }
    if let Some((a, b)) = options.calibration
        && !(a.is_finite() && a > 0.0 && b.is_finite())
    {
        return bad(format!(
            "calibration a = {a}, b = {b}: the slope must be finite and positive"
        ));
    }
    Ok(())
}
