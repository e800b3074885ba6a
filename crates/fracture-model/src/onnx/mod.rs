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

mod proto;

use candle_core::{DType, Tensor};
use prost::Message;

use crate::layers::BatchNorm;
use crate::net::Inner;
use crate::{FractureNet, Result};
use proto::{
    AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto, attr_type,
};

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
    let (logit, map) = match &net.inner {
        Inner::Seed(n) => (n.to_onnx(&mut g, act)?, None),
        Inner::Resnet(n) => (n.to_onnx(&mut g, act)?, None),
        Inner::EfficientNet(n) => n.to_onnx(&mut g, act)?,
    };
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

fn dim(n: usize) -> Dimension {
    Dimension {
        value: Some(proto::DimValue::Value(n as i64)),
    }
}

fn dim_param(name: &str) -> Dimension {
    Dimension {
        value: Some(proto::DimValue::Param(name.into())),
    }
}

fn value_info(name: &str, elem_type: i32, dims: Vec<Dimension>, doc: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type,
                shape: Some(TensorShapeProto { dim: dims }),
            }),
        }),
        doc_string: doc.into(),
    }
}

/// A value flowing through the graph: its name and its square side in pixels (for "SAME" padding).
#[derive(Debug, Clone)]
pub(crate) struct Act {
    pub(crate) x: String,
    pub(crate) side: usize,
}

/// One convolution: kernel, stride, group and the pads `[top, left, bottom, right]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvAttrs {
    pub(crate) stride: usize,
    pub(crate) pads: [usize; 4],
    pub(crate) group: usize,
}

impl ConvAttrs {
    /// Symmetric padding `p`, stride `s`, no groups.
    pub(crate) fn plain(stride: usize, p: usize) -> Self {
        ConvAttrs {
            stride,
            pads: [p; 4],
            group: 1,
        }
    }

    /// TensorFlow's "SAME" padding for a `k × k` kernel at stride `s` on a `side × side` input.
    pub(crate) fn same(side: usize, kernel: usize, stride: usize, group: usize) -> Self {
        let p = crate::kernels::Padding::same(side, side, kernel, stride);
        ConvAttrs {
            stride,
            pads: [p.top, p.left, p.bottom, p.right],
            group,
        }
    }

    /// The output side for a `k × k` kernel on a `side × side` input.
    pub(crate) fn out_side(&self, side: usize, kernel: usize) -> usize {
        (side + self.pads[0] + self.pads[2]).saturating_sub(kernel) / self.stride + 1
    }
}

/// The nodes and weights written so far, with fresh value names.
#[derive(Debug, Default)]
pub(crate) struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    count: usize,
}

fn ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.iter().map(|&x| x as i64).collect(),
        r#type: attr_type::INTS,
        ..AttributeProto::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: v,
        r#type: attr_type::INT,
        ..AttributeProto::default()
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: v,
        r#type: attr_type::FLOAT,
        ..AttributeProto::default()
    }
}

impl Graph {
    fn fresh(&mut self, op: &str) -> String {
        self.count += 1;
        format!("{}_{}", op.to_ascii_lowercase(), self.count)
    }

    /// Adds `op(inputs)` and returns its (single) output's name.
    pub(crate) fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.named_node(op, inputs, &out, attrs);
        out
    }

    fn named_node(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: format!("{op}:{output}"),
            op_type: op.into(),
            attribute: attrs,
        });
    }

    /// A float initializer with the given shape; returns its name (made unique).
    pub(crate) fn constant(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let name = format!("{name}#{}", self.initializers.len());
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: proto::FLOAT,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    /// An int64 initializer (shapes, slice bounds).
    pub(crate) fn constant_i64(&mut self, name: &str, dims: &[usize], values: &[i64]) -> String {
        let name = format!("{name}#{}", self.initializers.len());
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: proto::INT64,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    /// A model tensor as a float initializer of the same shape.
    pub(crate) fn weight(&mut self, name: &str, t: &Tensor) -> Result<String> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.constant(name, t.dims(), &values))
    }

    /// `Conv` of `x` with weight `w (O, I/group, k, k)` and an optional bias `(O,)`.
    pub(crate) fn conv(
        &mut self,
        name: &str,
        x: &Act,
        w: &Tensor,
        bias: Option<&Tensor>,
        attrs: ConvAttrs,
    ) -> Result<Act> {
        let k = w.dim(3)?;
        let w = self.weight(&format!("{name}.weight"), w)?;
        let mut inputs = vec![x.x.as_str(), w.as_str()];
        let b;
        if let Some(bias) = bias {
            b = self.weight(&format!("{name}.bias"), bias)?;
            inputs.push(&b);
        }
        let out = self.node(
            "Conv",
            &inputs,
            vec![
                ints("kernel_shape", &[k, k]),
                ints("strides", &[attrs.stride, attrs.stride]),
                ints("pads", &attrs.pads),
                ints("dilations", &[1, 1]),
                int("group", attrs.group as i64),
            ],
        );
        Ok(Act {
            x: out,
            side: attrs.out_side(x.side, k),
        })
    }

    /// `BatchNormalization` with the running statistics (inference).
    pub(crate) fn batch_norm(&mut self, name: &str, x: &Act, bn: &BatchNorm) -> Result<Act> {
        let [w, b] = bn.affine();
        let (mean, var) = bn.running()?;
        let c = mean.len();
        let w = self.weight(&format!("{name}.weight"), w)?;
        let b = self.weight(&format!("{name}.bias"), b)?;
        let m = self.constant(&format!("{name}.running_mean"), &[c], &mean);
        let v = self.constant(&format!("{name}.running_var"), &[c], &var);
        let out = self.node(
            "BatchNormalization",
            &[&x.x, &w, &b, &m, &v],
            vec![float("epsilon", bn.eps() as f32)],
        );
        Ok(Act { x: out, side: x.side })
    }

    /// `Relu`.
    pub(crate) fn relu(&mut self, x: &Act) -> Act {
        Act {
            x: self.node("Relu", &[&x.x], vec![]),
            side: x.side,
        }
    }

    /// ReLU6 as `Clip(x, 0, 6)`.
    pub(crate) fn relu6(&mut self, x: &Act) -> Act {
        let lo = self.constant("relu6.min", &[], &[0.0]);
        let hi = self.constant("relu6.max", &[], &[6.0]);
        Act {
            x: self.node("Clip", &[&x.x, &lo, &hi], vec![]),
            side: x.side,
        }
    }

    /// `MaxPool` 2 × 2, stride 2, floor (as the fused convolution-and-pooling kernels).
    pub(crate) fn max_pool2(&mut self, x: &Act) -> Act {
        Act {
            x: self.node(
                "MaxPool",
                &[&x.x],
                vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
            ),
            side: x.side / 2,
        }
    }

    /// Elementwise sum of two values of the same shape.
    pub(crate) fn add(&mut self, a: &Act, b: &Act) -> Act {
        Act {
            x: self.node("Add", &[&a.x, &b.x], vec![]),
            side: a.side,
        }
    }

    /// Global average pooling and a dense layer `weight (1, C)`, `bias (1,)`: the logit `(B, 1)`.
    pub(crate) fn pooled_head(&mut self, x: &Act, fc: &candle_nn::Linear) -> Result<String> {
        let pooled = self.node("GlobalAveragePool", &[&x.x], vec![]);
        let flat = self.node("Flatten", &[&pooled], vec![int("axis", 1)]);
        self.dense(&flat, fc)
    }

    /// `Gemm` with a candle linear layer (`weight (O, I)`, so `transB`).
    pub(crate) fn dense(&mut self, x: &str, fc: &candle_nn::Linear) -> Result<String> {
        let w = self.weight("fc.weight", fc.weight())?;
        let bias = fc
            .bias()
            .ok_or_else(|| crate::Error::InvalidConfig("dense layer without bias".into()))?;
        let b = self.weight("fc.bias", bias)?;
        Ok(self.node("Gemm", &[x, &w, &b], vec![int("transB", 1)]))
    }
}
