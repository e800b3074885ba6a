//! The graph builder the architectures write their nodes through: fresh value names, weights as
//! initializers, and one helper per operator the networks use.

use candle_core::{DType, Tensor};

use super::proto::{
    self, AttributeProto, Dimension, NodeProto, TensorProto, TensorShapeProto, TensorTypeProto, TypeProto,
    ValueInfoProto, attr_type,
};
use crate::Result;
use crate::layers::BatchNorm;

pub(super) fn dim(n: usize) -> Dimension {
    Dimension {
        value: Some(proto::DimValue::Value(n as i64)),
    }
}

pub(super) fn dim_param(name: &str) -> Dimension {
    Dimension {
        value: Some(proto::DimValue::Param(name.into())),
    }
}

pub(super) fn value_info(name: &str, elem_type: i32, dims: Vec<Dimension>, doc: &str) -> ValueInfoProto {
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
    pub(super) nodes: Vec<NodeProto>,
    pub(super) initializers: Vec<TensorProto>,
    count: usize,
    /// The names of ReLU6's bounds 0 and 6, written once and shared by every `Clip`.
    relu6_bounds: Option<(String, String)>,
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

    pub(super) fn named_node(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) {
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
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims, proto::FLOAT, raw)
    }

    /// An int64 initializer (shapes, slice bounds).
    pub(crate) fn constant_i64(&mut self, name: &str, dims: &[usize], values: &[i64]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims, proto::INT64, raw)
    }

    /// An initializer of `data_type` holding `raw` (little-endian, row-major), under a unique name.
    fn initializer(&mut self, name: &str, dims: &[usize], data_type: i32, raw: Vec<u8>) -> String {
        let name = format!("{name}#{}", self.initializers.len());
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            name: name.clone(),
            raw_data: raw,
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
        let (lo, hi) = match &self.relu6_bounds {
            Some(bounds) => bounds.clone(),
            None => {
                let bounds = (
                    self.constant("relu6.min", &[], &[0.0]),
                    self.constant("relu6.max", &[], &[6.0]),
                );
                self.relu6_bounds = Some(bounds.clone());
                bounds
            }
        };
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
