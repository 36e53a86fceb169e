//! The matrix-product FLOP count `mcs-engine bench` reports (`ops::flops`): each op adds two
//! operations per multiply-add at its logical shape. One test in its own binary, so no other
//! test's products run between the readings.

use mcs_engine::ops::{self, flops::matrix_flops, MatmulOpts};
use mcs_engine::{Device, Tape, Tensor};

fn filled(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_slice(&(0..n).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
}

#[test]
fn every_product_counts_two_flops_per_multiply_add() {
    let before = matrix_flops();
    // A batched matmul: 2 products of [3, 4] x [4, 5].
    ops::matmul_forward(&filled(&[2, 3, 4]), &filled(&[2, 4, 5]), MatmulOpts::default()).unwrap();
    assert_eq!(matrix_flops() - before, 2 * 2 * 3 * 4 * 5);

    // linear: [6, 8] rows x [8 -> 3]; a product with few rows runs padded, and the padding is
    // not useful work.
    let before = matrix_flops();
    ops::linear_forward(&filled(&[6, 8]), &filled(&[3, 8]), Some(&filled(&[3]))).unwrap();
    assert_eq!(matrix_flops() - before, 2 * 6 * 8 * 3);

    // Its backward: dX = dY W and dW = dY^T X, one product each.
    let tape = Tape::new();
    let x = filled(&[6, 8]).into_trainable();
    let w = filled(&[3, 8]).into_trainable();
    let y = ops::linear(&tape, &x, &w, None).unwrap();
    let loss = ops::sum_all(&tape, &y).unwrap();
    let before = matrix_flops();
    tape.backward(&loss).unwrap();
    assert_eq!(matrix_flops() - before, 2 * (2 * 6 * 8 * 3));
}
