//! Running an exported ONNX model in tract (pure Rust), the independent runtime the export tests
//! compare our own predictions with.

use tract_onnx::prelude::*;

/// Runs the ONNX model `bytes` on one f32 input of shape `dims` (row-major `values`) and returns
/// every output as (shape, values as f32; booleans as 0/1). Panics with tract's message when the
/// file does not load or run: a test failure is what that means here.
pub fn run(bytes: &[u8], dims: &[usize], values: Vec<f32>) -> Vec<(Vec<usize>, Vec<f32>)> {
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .expect("tract reads the ONNX file")
        .with_input_fact(0, f32::fact(dims).into())
        .expect("tract accepts the input shape")
        .into_optimized()
        .expect("tract optimizes the graph")
        .into_runnable()
        .expect("tract plans the graph");
    let input = tract_ndarray::ArrayD::from_shape_vec(dims.to_vec(), values).expect("input shape");
    let outputs = model
        .run(tvec!(Tensor::from(input).into()))
        .expect("tract runs the graph");
    outputs
        .iter()
        .map(|t| {
            let t = t.cast_to::<f32>().expect("outputs cast to f32");
            let view = t.to_plain_array_view::<f32>().expect("an f32 tensor");
            (view.shape().to_vec(), view.iter().copied().collect())
        })
        .collect()
}
