//! Softmax family (kernels/softmax.cu, src/ops/softmax.rs): forward against an independent f64
//! computation, GPU against CPU, and gradients against finite differences.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::{log_softmax_last, softmax_last};
use mcs_engine::{Device, Tape, Tensor};
use proptest::prelude::*;

/// Straightforward f64 softmax of each row of `x + mask` (mask rows shared by groups of rows).
fn softmax_f64(x: &[f32], cols: usize, mask: Option<&[f32]>, rows_per_mask_row: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for (r, row) in x.chunks(cols).enumerate() {
        let shifted: Vec<f64> = row
            .iter()
            .enumerate()
            .map(|(c, &v)| v as f64 + mask.map_or(0.0, |m| m[(r / rows_per_mask_row) * cols + c] as f64))
            .collect();
        let max = shifted.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = shifted.iter().map(|v| (v - max).exp()).sum();
        out.extend(shifted.iter().map(|v| ((v - max).exp() / sum) as f32));
    }
    out
}

// f32 exp and a sum over at most a few thousand terms: relative error stays near 1e-6; 2e-6
// absolute on probabilities in [0, 1] leaves room for the accumulation order differing.
const PROB_ATOL: f32 = 2e-6;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn softmax_matches_f64_reference(rows in 1usize..40, cols in 1usize..300, seed in any::<u64>(), masked in any::<bool>()) {
        let x = random_vec(seed, rows * cols, -8.0, 8.0);
        // Mask: one row per group of rows, with padding positions at -1e30 (never all padding).
        let groups = if rows % 2 == 0 { 2 } else { 1 };
        let mask: Vec<f32> = (0..groups * cols).map(|i| if i % cols > 0 && (i + seed as usize).is_multiple_of(3) { -1e30 } else { 0.0 }).collect();
        let want = softmax_f64(&x, cols, masked.then_some(&mask[..]), rows / groups);
        for device in devices() {
            let xt = Tensor::from_slice(&x, &[rows, cols], &device).unwrap();
            let mt = Tensor::from_slice(&mask, &[groups, cols], &device).unwrap();
            let y = softmax_last(&Tape::inference(), &xt, masked.then_some(&mt)).unwrap();
            assert_close(&format!("softmax on {}", device.name()), &y.to_vec().unwrap(), &want, PROB_ATOL, 1e-5);
        }
    }

    #[test]
    fn log_softmax_matches_f64_reference(rows in 1usize..20, cols in 1usize..1100, seed in any::<u64>()) {
        let x = random_vec(seed, rows * cols, -30.0, 30.0);
        let want_stable = {
            // Log-sum-exp in f64 (the log of an f32 probability would underflow for tiny ones).
            let mut out = Vec::new();
            for row in x.chunks(cols) {
                let max = row.iter().map(|&v| v as f64).fold(f64::NEG_INFINITY, f64::max);
                let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                out.extend(row.iter().map(|&v| (v as f64 - lse) as f32));
            }
            out
        };
        for device in devices() {
            let xt = Tensor::from_slice(&x, &[rows, cols], &device).unwrap();
            let y = log_softmax_last(&Tape::inference(), &xt).unwrap();
            // Values reach about -60: f32 subtraction keeps ~1e-7 relative, the log-sum-exp ~1e-6.
            assert_close(&format!("log_softmax on {}", device.name()), &y.to_vec().unwrap(), &want_stable, 1e-5, 1e-6);
        }
    }
}

#[test]
fn softmax_rejects_a_mask_that_does_not_fit() {
    let x = Tensor::zeros(&[3, 4], &Device::Cpu).unwrap();
    let mask = Tensor::zeros(&[2, 4], &Device::Cpu).unwrap();
    let err = softmax_last(&Tape::inference(), &x, Some(&mask)).unwrap_err().to_string();
    assert!(err.contains("mask") && err.contains("[2, 4]"), "unexpected message: {err}");
}

// Finite differences in f32 with eps 1e-2 on O(1) values: truncation error O(eps^2) ~ 1e-4,
// rounding error ~ 1e-7 / eps ~ 1e-5. 2e-3 absolute + 1e-2 relative sits well above both.
#[test]
fn softmax_gradient_matches_finite_differences() {
    let x = random_vec(7, 3 * 5, -2.0, 2.0);
    let mask: Vec<f32> = vec![0.0, 0.0, -1e30, 0.0, 0.0];
    check_gradients("softmax", &[(x, vec![3, 5])], &[], 1e-2, 2e-3, 1e-2, |tape, p| {
        let m = Tensor::from_vec(mask.clone(), &[1, 5])?;
        softmax_last(tape, &p[0], Some(&m))
    });
}

#[test]
fn log_softmax_gradient_matches_finite_differences() {
    let x = random_vec(8, 4 * 6, -3.0, 3.0);
    check_gradients("log_softmax", &[(x, vec![4, 6])], &[], 1e-2, 2e-3, 1e-2, |tape, p| log_softmax_last(tape, &p[0]));
}

#[test]
fn gpu_backward_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let x = random_tensor(3, &[37, 129], -4.0, 4.0, &Device::Cpu);
    let dy = random_tensor(4, &[37, 129], -1.0, 1.0, &Device::Cpu);
    for log in [false, true] {
        let run = |device: &Device| {
            let tape = Tape::new();
            let xd = x.to_device(device).unwrap().into_trainable();
            let y = if log { log_softmax_last(&tape, &xd) } else { softmax_last(&tape, &xd, None) }.unwrap();
            let grads = tape.backward_from(&y, dy.to_device(device).unwrap()).unwrap();
            grads.get(&xd).unwrap().to_vec().unwrap()
        };
        // Same maths in f32 with different summation order across 129 columns.
        assert_close(&format!("softmax backward (log={log}) gpu vs cpu"), &run(&gpu), &run(&Device::Cpu), 1e-5, 1e-4);
    }
}
