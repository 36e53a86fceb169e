//! Scaled dot-product attention (src/ops/attention.rs) against a naive f64 loop, with and without
//! a padding mask, on every device; GPU against CPU; gradients against finite differences; and
//! dropout on the probabilities against the same loop with the Philox mask applied.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::{
    attention_heads_inference, dropout_keeps, scaled_dot_product_attention, scaled_dot_product_attention_with_dropout,
    DropoutKey, HeadColumns,
};
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
    attention_f64_with_dropout(q, k, v, mask, scale, s, |_| 1.0)
}

/// [`attention_f64`] with each probability multiplied by `dropout_factor(index)`, its row-major
/// index in the `[B, H, Tq, Tk]` probabilities (0 when dropped, 1 / (1 - p) when kept).
fn attention_f64_with_dropout(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    scale: f32,
    s: Dims,
    dropout_factor: impl Fn(usize) -> f64,
) -> Vec<f32> {
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
                let row = (head * s.tq + qi) * s.tk;
                for c in 0..s.dv {
                    let value: f64 = (0..s.tk)
                        .map(|ki| {
                            weights[ki] / total * dropout_factor(row + ki) * v[(head * s.tk + ki) * s.dv + c] as f64
                        })
                        .sum();
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

const DROPOUT_KEY: DropoutKey = DropoutKey { seed: 99, stream: 1234 };

/// Random q, k, v and the padding mask of one problem, as CPU values.
fn problem(s: Dims, seed: u64) -> [Vec<f32>; 4] {
    [
        random_vec(seed, s.b * s.h * s.tq * s.d, -1.0, 1.0),
        random_vec(seed + 1, s.b * s.h * s.tk * s.d, -1.0, 1.0),
        random_vec(seed + 2, s.b * s.h * s.tk * s.dv, -1.0, 1.0),
        padding_mask(s.b, s.tk),
    ]
}

#[test]
fn dropout_of_zero_equals_plain_attention_bit_for_bit() {
    let s = Dims { b: 2, h: 3, tq: 5, tk: 9, d: 8, dv: 4 };
    let [q, k, v, mask] = problem(s, 31);
    for device in devices() {
        let t = |data: &[f32], shape: &[usize]| Tensor::from_slice(data, shape, &device).unwrap();
        let (q, k, v, m) = (t(&q, &[2, 3, 5, 8]), t(&k, &[2, 3, 9, 8]), t(&v, &[2, 3, 9, 4]), t(&mask, &[2, 9]));
        let tape = Tape::inference();
        let plain = scaled_dot_product_attention(&tape, &q, &k, &v, Some(&m), 0.3).unwrap();
        let zero =
            scaled_dot_product_attention_with_dropout(&tape, &q, &k, &v, Some(&m), 0.3, Some((0.0, DROPOUT_KEY)))
                .unwrap();
        assert_eq!(plain.to_vec().unwrap(), zero.to_vec().unwrap(), "on {}", device.name());
    }
}

#[test]
fn dropout_on_probabilities_matches_f64_reference() {
    let s = Dims { b: 2, h: 2, tq: 7, tk: 33, d: 16, dv: 8 };
    let p = 0.25f32;
    let [q, k, v, mask] = problem(s, 41);
    let factor = |i: usize| if dropout_keeps(DROPOUT_KEY, p, i as u64) { 1.0 / (1.0 - p as f64) } else { 0.0 };
    let want = attention_f64_with_dropout(&q, &k, &v, Some(&mask), 0.25, s, factor);
    let plain = attention_f64(&q, &k, &v, Some(&mask), 0.25, s);
    assert!(want.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3), "dropout changed nothing");
    for device in devices() {
        let t = |data: &[f32], shape: &[usize]| Tensor::from_slice(data, shape, &device).unwrap();
        let y = scaled_dot_product_attention_with_dropout(
            &Tape::inference(),
            &t(&q, &[s.b, s.h, s.tq, s.d]),
            &t(&k, &[s.b, s.h, s.tk, s.d]),
            &t(&v, &[s.b, s.h, s.tk, s.dv]),
            Some(&t(&mask, &[s.b, s.tk])),
            0.25,
            Some((p, DROPOUT_KEY)),
        )
        .unwrap();
        // As the plain case (1e-5), with kept probabilities scaled by 4/3: sums of values in
        // [-1, 1] weighted by up to 4/3 of a convex combination.
        assert_close(&format!("attention with dropout on {}", device.name()), &y.to_vec().unwrap(), &want, 2e-5, 1e-5);
    }
}

// As the plain gradient check: the dropout mask is fixed by its key, so it only rescales paths.
#[test]
fn attention_with_dropout_gradients_match_finite_differences() {
    let s = Dims { b: 2, h: 2, tq: 3, tk: 4, d: 3, dv: 2 };
    let [q, k, v, mask] = problem(s, 51);
    let inputs = [(q, vec![s.b, s.h, s.tq, s.d]), (k, vec![s.b, s.h, s.tk, s.d]), (v, vec![s.b, s.h, s.tk, s.dv])];
    check_gradients("attention with dropout", &inputs, &[], 1e-2, 2e-3, 1e-2, |tape, p| {
        let m = Tensor::from_vec(mask.clone(), &[s.b, s.tk])?;
        scaled_dot_product_attention_with_dropout(tape, &p[0], &p[1], &p[2], Some(&m), 0.8, Some((0.3, DROPOUT_KEY)))
    });
}

#[test]
fn gpu_matches_cpu_with_dropout() {
    let Some(gpu) = gpu() else { return };
    let s = Dims { b: 2, h: 3, tq: 33, tk: 65, d: 16, dv: 24 };
    let [q, k, v, mask] = problem(s, 61);
    let dy = random_vec(65, s.b * s.h * s.tq * s.dv, -1.0, 1.0);
    let run = |device: &Device| {
        let t = |data: &[f32], shape: &[usize]| Tensor::from_slice(data, shape, device).unwrap();
        let tape = Tape::new();
        let q = t(&q, &[s.b, s.h, s.tq, s.d]).into_trainable();
        let k = t(&k, &[s.b, s.h, s.tk, s.d]).into_trainable();
        let v = t(&v, &[s.b, s.h, s.tk, s.dv]).into_trainable();
        let m = t(&mask, &[s.b, s.tk]);
        let y = scaled_dot_product_attention_with_dropout(&tape, &q, &k, &v, Some(&m), 0.25, Some((0.1, DROPOUT_KEY)))
            .unwrap();
        let grads = tape.backward_from(&y, t(&dy, y.shape())).unwrap();
        let mut out = vec![y.to_vec().unwrap()];
        out.extend([&q, &k, &v].map(|x| grads.get(x).unwrap().to_vec().unwrap()));
        out
    };
    let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
    for (i, what) in ["output", "dq", "dk", "dv"].iter().enumerate() {
        // The masks are bit-identical; the rest is the plain case's tolerance (sums of <= 65 terms
        // in different orders), with kept probabilities scaled by 1 / 0.9.
        assert_close(&format!("attention with dropout {what} gpu vs cpu"), &on_gpu[i], &on_cpu[i], 2e-5, 1e-4);
    }
}

#[test]
fn attention_dropout_probability_outside_zero_one_is_an_error() {
    let t = |shape: &[usize]| Tensor::zeros(shape, &Device::Cpu).unwrap();
    let (q, k, v) = (t(&[1, 1, 2, 4]), t(&[1, 1, 3, 4]), t(&[1, 1, 3, 2]));
    let err = scaled_dot_product_attention_with_dropout(&Tape::new(), &q, &k, &v, None, 1.0, Some((1.0, DROPOUT_KEY)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dropout") && err.contains('1'), "unexpected message: {err}");
}

/// The fused CPU inference attention (heads read in place from `[B, T, C]` column blocks, as a
/// fused QKV projection writes them) gives what splitting the heads, the composed op and merging
/// them give: the same products and row softmax, so the same bits. Query counts below and above
/// one task's 64, with and without a key mask; and an item's result does not depend on the batch.
#[test]
fn fused_inference_attention_equals_the_composed_op() {
    let cpu = Device::Cpu;
    let split = |x: &Tensor, heads: usize| {
        let (b, t, w) = (x.dim(0), x.dim(1), x.dim(2));
        let x = mcs_engine::ops::reshape(&Tape::inference(), x, &[b, t, heads, w / heads]).unwrap();
        mcs_engine::ops::permute(&Tape::inference(), &x, &[0, 2, 1, 3]).unwrap()
    };
    for &(b, heads, tq, tk, d) in &[(2, 3, 17, 16, 8), (3, 2, 197, 150, 16), (1, 4, 70, 256, 8)] {
        let w = heads * d;
        // q, k, v side by side in one [B, T, 3W] tensor when Tq = Tk, as the vision tower has them.
        let qkv = random_tensor(41, &[b, tq.max(tk), 3 * w], -2.0, 2.0, &cpu);
        let (q_t, kv_t) =
            (random_tensor(42, &[b, tq, w], -2.0, 2.0, &cpu), random_tensor(43, &[b, tk, 2 * w], -2.0, 2.0, &cpu));
        let mut mask = vec![0.0f32; b * tk];
        mask[tk - 3..tk].iter_mut().for_each(|m| *m = -1e30);
        let mask = Tensor::from_slice(&mask, &[b, tk], &cpu).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        for use_mask in [false, true] {
            let m = use_mask.then_some(&mask);
            let columns = |t, offset| HeadColumns { tensor: t, offset, width: w };
            let fused =
                attention_heads_inference(columns(&q_t, 0), columns(&kv_t, 0), columns(&kv_t, w), heads, m, scale)
                    .unwrap();
            let tape = Tape::inference();
            let narrow = |t: &Tensor, offset| mcs_engine::ops::narrow(&tape, t, 2, offset, w).unwrap();
            let composed = scaled_dot_product_attention(
                &tape,
                &split(&q_t, heads),
                &split(&narrow(&kv_t, 0), heads),
                &split(&narrow(&kv_t, w), heads),
                m,
                scale,
            )
            .unwrap();
            let composed = mcs_engine::ops::permute(&tape, &composed, &[0, 2, 1, 3]).unwrap();
            assert_eq!(fused.shape(), [b, tq, w]);
            assert!(
                fused.to_vec().unwrap() == composed.to_vec().unwrap(),
                "b={b} h={heads} tq={tq} tk={tk} mask={use_mask}"
            );
            // Item 0 alone gives item 0's rows of the batch.
            let first = |t: &Tensor| mcs_engine::ops::narrow(&tape, t, 0, 0, 1).unwrap();
            let mask_first = m.map(first);
            let alone = attention_heads_inference(
                columns(&first(&q_t), 0),
                columns(&first(&kv_t), 0),
                columns(&first(&kv_t), w),
                heads,
                mask_first.as_ref(),
                scale,
            )
            .unwrap();
            assert!(alone.to_vec().unwrap()[..] == fused.to_vec().unwrap()[..tq * w]);
        }
        if tq == tk {
            let columns = |offset| HeadColumns { tensor: &qkv, offset, width: w };
            let fused = attention_heads_inference(columns(0), columns(w), columns(2 * w), heads, None, scale).unwrap();
            let tape = Tape::inference();
            let part = |offset| split(&mcs_engine::ops::narrow(&tape, &qkv, 2, offset, w).unwrap(), heads);
            let composed = scaled_dot_product_attention(&tape, &part(0), &part(w), &part(2 * w), None, scale).unwrap();
            let composed = mcs_engine::ops::permute(&tape, &composed, &[0, 2, 1, 3]).unwrap();
            assert!(fused.to_vec().unwrap() == composed.to_vec().unwrap(), "fused QKV b={b} tq={tq}");
        }
    }
}
