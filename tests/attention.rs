//! Scaled dot-product attention (src/ops/attention.rs) against a naive f64 loop, with and without
//! a padding mask, on every device; GPU against CPU; gradients against finite differences.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::scaled_dot_product_attention;
use mcs_engine::{Device, Tape, Tensor};
use proptest::prelude::*;

/// Dimensions of one attention problem.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
}

/// Naive attention in f64: for each (batch, head, query), softmax over keys of
/// scale * q.k + mask, then the weighted sum of value rows.
fn attention_f64(q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>, scale: f32, s: Dims) -> Vec<f32> {
    let mut out = vec![0.0f32; s.b * s.h * s.tq * s.dv];
    for bi in 0..s.b {
        for hi in 0..s.h {
            let head = bi * s.h + hi;
            for qi in 0..s.tq {
                let q_row = &q[(head * s.tq + qi) * s.d..][..s.d];
                let scores: Vec<f64> = (0..s.tk)
                    .map(|ki| {
                        let k_row = &k[(head * s.tk + ki) * s.d..][..s.d];
                        let dot: f64 = q_row.iter().zip(k_row).map(|(&a, &b)| a as f64 * b as f64).sum();
                        scale as f64 * dot + mask.map_or(0.0, |m| m[bi * s.tk + ki] as f64)
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for c in 0..s.dv {
                    let value: f64 =
                        (0..s.tk).map(|ki| weights[ki] / total * v[(head * s.tk + ki) * s.dv + c] as f64).sum();
                    out[(head * s.tq + qi) * s.dv + c] = value as f32;
                }
            }
        }
    }
    out
}

/// A padding mask: batch `bi` keeps its first `tk - bi % tk` keys (at least one), drops the rest.
fn padding_mask(b: usize, tk: usize) -> Vec<f32> {
    (0..b * tk).map(|i| if i % tk < tk - (i / tk) % tk { 0.0 } else { -1e30 }).collect()
}

fn run_case(device: &Device, s: Dims, masked: bool, seed: u64) {
    let q = random_vec(seed, s.b * s.h * s.tq * s.d, -1.0, 1.0);
    let k = random_vec(seed + 1, s.b * s.h * s.tk * s.d, -1.0, 1.0);
    let v = random_vec(seed + 2, s.b * s.h * s.tk * s.dv, -1.0, 1.0);
    let mask = padding_mask(s.b, s.tk);
    let scale = 1.0 / (s.d as f32).sqrt();
    let want = attention_f64(&q, &k, &v, masked.then_some(&mask[..]), scale, s);
    let t = |data: &[f32], shape: &[usize]| Tensor::from_slice(data, shape, device).unwrap();
    let mask_t = t(&mask, &[s.b, s.tk]);
    let y = scaled_dot_product_attention(
        &Tape::inference(),
        &t(&q, &[s.b, s.h, s.tq, s.d]),
        &t(&k, &[s.b, s.h, s.tk, s.d]),
        &t(&v, &[s.b, s.h, s.tk, s.dv]),
        masked.then_some(&mask_t),
        scale,
    )
    .unwrap();
    assert_eq!(y.shape(), &[s.b, s.h, s.tq, s.dv]);
    // Scores are f32 dot products of <= 65 terms (error ~1e-6), the softmax adds ~1e-6 relative,
    // and the output is a convex combination of values in [-1, 1]: 1e-5 absolute covers all three.
    assert_close(
        &format!("attention {s:?} masked={masked} on {}", device.name()),
        &y.to_vec().unwrap(),
        &want,
        1e-5,
        1e-5,
    );
}

#[test]
fn attention_matches_f64_with_and_without_padding_mask() {
    for device in devices() {
        for masked in [false, true] {
            run_case(&device, Dims { b: 2, h: 3, tq: 7, tk: 33, d: 16, dv: 8 }, masked, 1);
            run_case(&device, Dims { b: 3, h: 1, tq: 1, tk: 1, d: 1, dv: 1 }, masked, 2);
            run_case(&device, Dims { b: 1, h: 2, tq: 65, tk: 65, d: 65, dv: 33 }, masked, 3);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn attention_matches_f64_over_shapes(
        b in 1usize..4, h in 1usize..4, tq in 1usize..40, tk in 1usize..40, d in 1usize..40, dv in 1usize..40,
        masked in any::<bool>(), seed in any::<u64>(),
    ) {
        for device in devices() {
            run_case(&device, Dims { b, h, tq, tk, d, dv }, masked, seed);
        }
    }
}

// Finite differences in f32 with eps 1e-2 through a softmax: truncation O(eps^2) ~ 1e-4 times the
// curvature, rounding ~1e-7 * |L| / eps ~ 1e-5. 2e-3 absolute + 1e-2 relative sits above both.
#[test]
fn attention_gradients_match_finite_differences() {
    let s = Dims { b: 2, h: 2, tq: 3, tk: 4, d: 3, dv: 2 };
    let inputs = [
        (random_vec(11, s.b * s.h * s.tq * s.d, -1.0, 1.0), vec![s.b, s.h, s.tq, s.d]),
        (random_vec(12, s.b * s.h * s.tk * s.d, -1.0, 1.0), vec![s.b, s.h, s.tk, s.d]),
        (random_vec(13, s.b * s.h * s.tk * s.dv, -1.0, 1.0), vec![s.b, s.h, s.tk, s.dv]),
    ];
    let mask = padding_mask(s.b, s.tk);
    for masked in [false, true] {
        check_gradients(&format!("attention masked={masked}"), &inputs, &[], 1e-2, 2e-3, 1e-2, |tape, p| {
            let m = Tensor::from_vec(mask.clone(), &[s.b, s.tk])?;
            scaled_dot_product_attention(tape, &p[0], &p[1], &p[2], masked.then_some(&m), 0.8)
        });
    }
}

#[test]
fn gpu_matches_cpu_forward_and_backward() {
    let Some(gpu) = gpu() else { return };
    let s = Dims { b: 2, h: 3, tq: 33, tk: 65, d: 16, dv: 24 };
    let q = random_tensor(21, &[s.b, s.h, s.tq, s.d], -1.0, 1.0, &Device::Cpu);
    let k = random_tensor(22, &[s.b, s.h, s.tk, s.d], -1.0, 1.0, &Device::Cpu);
    let v = random_tensor(23, &[s.b, s.h, s.tk, s.dv], -1.0, 1.0, &Device::Cpu);
    let mask = Tensor::from_vec(padding_mask(s.b, s.tk), &[s.b, s.tk]).unwrap();
    let dy = random_tensor(24, &[s.b, s.h, s.tq, s.dv], -1.0, 1.0, &Device::Cpu);
    let run = |device: &Device| {
        let tape = Tape::new();
        let [q, k, v] = [&q, &k, &v].map(|t| t.to_device(device).unwrap().into_trainable());
        let m = mask.to_device(device).unwrap();
        let y = scaled_dot_product_attention(&tape, &q, &k, &v, Some(&m), 0.25).unwrap();
        let grads = tape.backward_from(&y, dy.to_device(device).unwrap()).unwrap();
        let mut out = vec![y.to_vec().unwrap()];
        out.extend([&q, &k, &v].map(|t| grads.get(t).unwrap().to_vec().unwrap()));
        out
    };
    let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
    for (i, what) in ["output", "dq", "dk", "dv"].iter().enumerate() {
        // The same f32 maths with sums over <= 65 terms in different orders on each device.
        assert_close(&format!("attention {what} gpu vs cpu"), &on_gpu[i], &on_cpu[i], 1e-5, 1e-4);
    }
}

#[test]
fn bad_shapes_are_errors_naming_the_shapes() {
    let t = |shape: &[usize]| Tensor::zeros(shape, &Device::Cpu).unwrap();
    let tape = Tape::inference();
    let message = |r: mcs_engine::Result<Tensor>| r.unwrap_err().to_string();
    let (q, k, v) = (t(&[2, 3, 5, 8]), t(&[2, 3, 7, 8]), t(&[2, 3, 7, 4]));

    let err = message(scaled_dot_product_attention(&tape, &q, &t(&[2, 3, 7, 6]), &v, None, 1.0));
    assert!(err.contains("[2, 3, 5, 8]") && err.contains("[2, 3, 7, 6]"), "{err}");
    let err = message(scaled_dot_product_attention(&tape, &q, &k, &t(&[2, 3, 6, 4]), None, 1.0));
    assert!(err.contains("[2, 3, 6, 4]"), "{err}");
    let err = message(scaled_dot_product_attention(&tape, &t(&[3, 5, 8]), &k, &v, None, 1.0));
    assert!(err.contains("[3, 5, 8]"), "{err}");
    let err = message(scaled_dot_product_attention(&tape, &q, &k, &v, Some(&t(&[2, 5])), 1.0));
    assert!(err.contains("mask") && err.contains("[2, 5]") && err.contains("[2, 7]"), "{err}");
}
