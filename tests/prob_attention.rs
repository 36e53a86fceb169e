//! Probabilistic cross-attention (kernels/prob_attention.cu, src/ops/prob_attention.rs): the fused
//! op against an independent f64 loop and against the composed version (forward and all five
//! gradients), finite-difference gradients, GPU against CPU with the same noise, and the noise key.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_vec};
use mcs_engine::ops::{prob_attention, prob_attention_composed, ItemNoise, NoiseKey, NoiseMode};
use mcs_engine::philox::{normal, stream_id};
use mcs_engine::{Device, Result, Tape, Tensor};
use proptest::prelude::*;

/// Sizes of one test case: `samples * batch` rows.
#[derive(Copy, Clone, Debug)]
struct Case {
    samples: usize,
    batch: usize,
    tq: usize,
    tk: usize,
    c: usize,
}

impl Case {
    fn rows(&self) -> usize {
        self.samples * self.batch
    }
    fn q_shape(&self) -> Vec<usize> {
        vec![self.rows(), self.tq, self.c]
    }
    fn k_shape(&self) -> Vec<usize> {
        vec![self.rows(), self.tk, self.c]
    }
    fn shapes(&self) -> [Vec<usize>; 5] {
        [self.q_shape(), self.k_shape(), self.k_shape(), self.k_shape(), self.k_shape()]
    }
}

/// The paper's beta (docs/model.md §2).
const BETA: f32 = 2.35;

fn noise(samples: usize, first_draw: u64) -> NoiseKey {
    NoiseKey {
        seed: 0x5EED_1234_ABCD,
        first_draw,
        samples,
        adapter: 3,
        direction: 1,
        mode: NoiseMode::Plain,
        items: ItemNoise::ByRow,
    }
}

/// Host data of (q, k_mu, k_var, v_mu, v_var): means in [-1, 1], variances in [0.1, 1] (they are
/// softplus(.) + 1e-6 in the model, so positive), scaled like the model's LayerNormed keys.
fn case_data(case: Case, seed: u64) -> [Vec<f32>; 5] {
    let (qn, kn) = (case.rows() * case.tq * case.c, case.rows() * case.tk * case.c);
    [
        random_vec(seed, qn, -1.0, 1.0),
        random_vec(seed + 1, kn, -1.0, 1.0),
        random_vec(seed + 2, kn, 0.1, 1.0),
        random_vec(seed + 3, kn, -1.0, 1.0),
        random_vec(seed + 4, kn, 0.1, 1.0),
    ]
}

fn to_tensors(case: Case, data: &[Vec<f32>; 5], device: &Device, trainable: bool) -> Vec<Tensor> {
    data.iter()
        .zip(case.shapes())
        .map(|(v, shape)| {
            let t = Tensor::from_slice(v, &shape, device).unwrap();
            if trainable {
                t.into_trainable()
            } else {
                t
            }
        })
        .collect()
}

type AttentionFn = fn(&Tape, &Tensor, &Tensor, &Tensor, &Tensor, &Tensor, f32, NoiseKey) -> Result<Tensor>;

fn call(f: AttentionFn, tape: &Tape, t: &[Tensor], key: NoiseKey) -> Result<Tensor> {
    f(tape, &t[0], &t[1], &t[2], &t[3], &t[4], BETA, key)
}

/// The output and the gradients of all five inputs for an output gradient `d_out`.
fn forward_backward(
    f: AttentionFn,
    case: Case,
    data: &[Vec<f32>; 5],
    d_out: &[f32],
    key: NoiseKey,
    device: &Device,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let tape = Tape::new();
    let inputs = to_tensors(case, data, device, true);
    let out = call(f, &tape, &inputs, key).unwrap();
    let grads = tape.backward_from(&out, Tensor::from_slice(d_out, out.shape(), device).unwrap()).unwrap();
    let grads = inputs.iter().map(|t| grads.get(t).expect("every input gets a gradient").to_vec().unwrap()).collect();
    (out.to_vec().unwrap(), grads)
}

/// The formula of docs/model.md §2.3 in f64 with plain loops, taking the noise from its definition.
fn reference_f64(case: Case, data: &[Vec<f32>; 5], key: NoiseKey, beta: f64) -> Vec<f32> {
    let [q, k_mu, k_var, v_mu, v_var] = data;
    let (tq, tk, c) = (case.tq, case.tk, case.c);
    let mut out = vec![0.0f32; case.rows() * tq * c];
    for row in 0..case.rows() {
        let (sample, b) = (row / case.batch, row % case.batch);
        let stream = stream_id(key.first_draw + sample as u64, key.adapter, key.direction);
        let kv = |t: &[f32], k: usize, ch: usize| t[(row * tk + k) * c + ch] as f64;
        for i in 0..tq {
            let qv = |ch: usize| q[(row * tq + i) * c + ch] as f64;
            let logits: Vec<f64> = (0..tk)
                .map(|k| {
                    let mu: f64 = (0..c).map(|ch| qv(ch) * kv(k_mu, k, ch)).sum::<f64>() / (c as f64).sqrt();
                    let var: f64 = (0..c).map(|ch| qv(ch) * qv(ch) * kv(k_var, k, ch)).sum::<f64>() / c as f64;
                    mu - beta * var.sqrt()
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            for ch in 0..c {
                let mut o = 0.0f64;
                for (k, l) in logits.iter().enumerate() {
                    let eps = normal(key.seed, stream, ((b * tk + k) * c + ch) as u64) as f64;
                    o += (l - max).exp() / total * (kv(v_mu, k, ch) + kv(v_var, k, ch).sqrt() * eps);
                }
                out[(row * tq + i) * c + ch] = o as f32;
            }
        }
    }
    out
}

fn fused_forward(case: Case, data: &[Vec<f32>; 5], key: NoiseKey, device: &Device) -> Vec<f32> {
    call(prob_attention, &Tape::inference(), &to_tensors(case, data, device, false), key).unwrap().to_vec().unwrap()
}

// The output is a convex combination of V samples of size O(1..3); the f32 kernels accumulate dot
// products of at most 256 terms of size O(1), which leaves relative errors of a few 1e-6 in the
// logits and the weights. 2e-5 absolute + 1e-4 relative is well above that and far below the
// differences a wrong index, noise element or softmax term makes (O(0.01) and up).
const FORWARD_ATOL: f32 = 2e-5;
const FORWARD_RTOL: f32 = 1e-4;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    // Sizes straddle the kernels' tiles (32 queries, 16 keys, 32 channels per lane group).
    #[test]
    fn fused_forward_matches_f64_reference(
        samples in 1usize..3, batch in 1usize..3, tq in 1usize..40, tk in 1usize..40, c in 1usize..70,
        seed in any::<u64>(), first_draw in 0u64..1000,
    ) {
        let case = Case { samples, batch, tq, tk, c };
        let data = case_data(case, seed);
        let key = noise(samples, first_draw);
        let want = reference_f64(case, &data, key, BETA as f64);
        for device in devices() {
            let got = fused_forward(case, &data, key, &device);
            assert_close(&format!("{case:?} on {}", device.name()), &got, &want, FORWARD_ATOL, FORWARD_RTOL);
        }
    }
}

#[test]
fn fused_forward_matches_f64_reference_at_paper_size() {
    // One adapter direction of the paper config: 197 image tokens attending to 256 text tokens, C = 256.
    let case = Case { samples: 2, batch: 1, tq: 197, tk: 256, c: 256 };
    let data = case_data(case, 11);
    let key = noise(2, 40);
    let want = reference_f64(case, &data, key, BETA as f64);
    for device in devices() {
        assert_close(
            &format!("paper size on {}", device.name()),
            &fused_forward(case, &data, key, &device),
            &want,
            FORWARD_ATOL,
            FORWARD_RTOL,
        );
    }
}

#[test]
fn single_key_output_is_the_value_sample() {
    // With one key the weights are exactly 1, so O = V_mu + sqrt(V_var) * eps: the noise itself.
    let case = Case { samples: 2, batch: 3, tq: 2, tk: 1, c: 7 };
    let data = case_data(case, 5);
    let key = noise(2, 9);
    let mut want = Vec::new();
    for row in 0..case.rows() {
        let stream = key.stream(row / case.batch);
        for _query in 0..case.tq {
            for ch in 0..case.c {
                let eps = normal(key.seed, stream, ((row % case.batch) * case.c + ch) as u64);
                let at = row * case.c + ch;
                want.push(data[3][at] + data[4][at].sqrt() * eps);
            }
        }
    }
    for device in devices() {
        // CPU: the same f32 operations, so exact. GPU: sqrt is correctly rounded on both, but the
        // kernel may fuse the multiply-add (one rounding instead of two): 1 ulp of values <= ~4.
        let atol = if device.is_cuda() { 1e-6 } else { 0.0 };
        assert_close(
            &format!("one key on {}", device.name()),
            &fused_forward(case, &data, key, &device),
            &want,
            atol,
            0.0,
        );
    }
}

#[test]
fn fused_matches_composed_forward_and_gradients() {
    let cases = [
        Case { samples: 1, batch: 1, tq: 5, tk: 7, c: 12 },
        Case { samples: 2, batch: 2, tq: 3, tk: 17, c: 16 },
        Case { samples: 2, batch: 1, tq: 37, tk: 21, c: 40 },
        Case { samples: 1, batch: 2, tq: 9, tk: 33, c: 129 },
    ];
    for (n, case) in cases.into_iter().enumerate() {
        let data = case_data(case, 100 + n as u64);
        let d_out = random_vec(200 + n as u64, case.rows() * case.tq * case.c, -1.0, 1.0);
        let key = noise(case.samples, 7 * n as u64);
        assert_fused_matches_composed(case, &data, &d_out, key, &format!("{case:?}"));
    }
}

/// The fused op against the composed one on every device: output and all five gradients.
fn assert_fused_matches_composed(case: Case, data: &[Vec<f32>; 5], d_out: &[f32], key: NoiseKey, label: &str) {
    for device in devices() {
        let (fused_out, fused_grads) = forward_backward(prob_attention, case, data, d_out, key, &device);
        let (composed_out, composed_grads) = forward_backward(prob_attention_composed, case, data, d_out, key, &device);
        let at = format!("{label} on {}", device.name());
        assert_close(&format!("output, {at}"), &fused_out, &composed_out, FORWARD_ATOL, FORWARD_RTOL);
        // Gradients are sums of up to Tq * C (or Tk * C) products of O(1) terms computed in
        // f32 along different paths (the composed one through sqrt's and softmax's own
        // backward rules, the fused one through delta = dO.O); their relative differences are
        // ~1e-6 of the terms' magnitude, which reaches ~10 for the largest sums. A wrong
        // factor (beta, 1/2, 1/C) or index gives differences of the gradients' own size.
        for (name, (f, c)) in
            ["q", "k_mu", "k_var", "v_mu", "v_var"].iter().zip(fused_grads.iter().zip(&composed_grads))
        {
            assert_close(&format!("d{name}, {at}"), f, c, 1e-4, 1e-3);
        }
    }
}

// Finite differences in f32 with step 1e-2 on O(1) inputs: truncation error ~eps^2 * f''' ~ 1e-4
// (the variances stay >= 0.3, so sqrt's derivatives stay bounded), rounding error of the probe
// ~1e-7 * |L| / eps ~ 1e-4. 2e-3 absolute + 1e-2 relative sits above both.
#[test]
fn fused_gradients_match_finite_differences() {
    let case = Case { samples: 2, batch: 1, tq: 3, tk: 4, c: 5 };
    let mut data = case_data(case, 21);
    // Variances in [0.3, 1.3] so that a step of 1e-2 keeps them far from 0.
    for variances in [2, 4] {
        data[variances].iter_mut().for_each(|v| *v += 0.3);
    }
    let inputs: Vec<(Vec<f32>, Vec<usize>)> = data.iter().cloned().zip(case.shapes()).collect();
    let key = noise(2, 3);
    check_gradients("prob_attention", &inputs, &[], 1e-2, 2e-3, 1e-2, |tape, p| call(prob_attention, tape, p, key));
    // A subset of the inputs needing gradients (the others frozen) gets exactly that subset.
    check_gradients("prob_attention (q, v_var only)", &inputs, &[1, 2, 3], 1e-2, 2e-3, 1e-2, |tape, p| {
        call(prob_attention, tape, p, key)
    });
    check_gradients("prob_attention (keys only)", &inputs, &[0, 3, 4], 1e-2, 2e-3, 1e-2, |tape, p| {
        call(prob_attention, tape, p, key)
    });
}

#[test]
fn shifting_every_key_mean_by_one_vector_changes_nothing() {
    // docs/model.md §10.9: adding the same vector u to every key mean adds q.u / sqrt(C) to all of a
    // query's logits, and softmax ignores that. So the output does not move, and the gradient of
    // K_mu summed over the keys (the gradient along that shift) is 0 up to rounding.
    let case = Case { samples: 2, batch: 2, tq: 6, tk: 9, c: 8 };
    let data = case_data(case, 31);
    let key = noise(2, 0);
    let shift = random_vec(32, case.c, -2.0, 2.0);
    let mut shifted = data.clone();
    for (i, v) in shifted[1].iter_mut().enumerate() {
        *v += shift[i % case.c];
    }
    let d_out = random_vec(33, case.rows() * case.tq * case.c, -1.0, 1.0);
    for device in devices() {
        let (out, grads) = forward_backward(prob_attention, case, &data, &d_out, key, &device);
        // Logits grow by up to |q.u|/sqrt(C) ~ 4: the f32 rounding of the shifted logits (~5e-7
        // relative) is what remains.
        let (shifted_out, _) = forward_backward(prob_attention, case, &shifted, &d_out, key, &device);
        assert_close(&format!("shifted keys on {}", device.name()), &shifted_out, &out, 1e-5, 1e-5);
        let mut along_shift = vec![0.0f32; case.rows() * case.c];
        for (at, g) in grads[1].iter().enumerate() {
            let (row, ch) = (at / (case.tk * case.c), at % case.c);
            along_shift[row * case.c + ch] += g;
        }
        // Sums of Tk = 9 gradient terms of size <= ~1 that cancel exactly in exact arithmetic.
        assert_close(
            &format!("sum over keys of dK_mu on {}", device.name()),
            &along_shift,
            &vec![0.0; along_shift.len()],
            1e-5,
            0.0,
        );
    }
}

#[test]
fn noise_is_reproducible_and_follows_the_key() {
    let case = Case { samples: 2, batch: 2, tq: 4, tk: 6, c: 9 };
    let data = case_data(case, 41);
    let key = noise(2, 17);
    for device in devices() {
        let run = |key: NoiseKey| fused_forward(case, &data, key, &device);
        let first = run(key);
        assert_eq!(first, run(key), "same key, same data: the output must repeat bit for bit");
        for (what, other) in [
            ("first_draw", NoiseKey { first_draw: 18, ..key }),
            ("seed", NoiseKey { seed: key.seed + 1, ..key }),
            ("adapter", NoiseKey { adapter: 4, ..key }),
            ("direction", NoiseKey { direction: 0, ..key }),
        ] {
            let moved = run(other);
            let rows_differ = first.chunks(case.tq * case.c).zip(moved.chunks(case.tq * case.c)).all(|(a, b)| a != b);
            assert!(rows_differ, "changing the {what} must change the noise of every row");
        }
        // Sample s of a stacked call is a single-sample call at draw first_draw + s.
        let row_len = case.batch * case.tq * case.c;
        for s in 0..case.samples {
            let single = Case { samples: 1, ..case };
            let rows: [Vec<f32>; 5] = std::array::from_fn(|t| {
                let per_row = data[t].len() / case.rows();
                data[t][s * case.batch * per_row..][..case.batch * per_row].to_vec()
            });
            let alone = fused_forward(single, &rows, noise(1, key.first_draw + s as u64), &device);
            assert_eq!(
                &first[s * row_len..][..row_len],
                &alone[..],
                "sample {s} on {} differs from its own draw",
                device.name()
            );
        }
    }
}

/// The key of `noise` in antithetic mode.
fn antithetic(samples: usize, first_draw: u64) -> NoiseKey {
    NoiseKey { mode: NoiseMode::Antithetic, ..noise(samples, first_draw) }
}

/// `data` with every sample's rows replaced by sample 0's, so that samples differ only in noise.
fn same_inputs_per_sample(case: Case, mut data: [Vec<f32>; 5]) -> [Vec<f32>; 5] {
    for t in data.iter_mut() {
        let per_sample = t.len() / case.samples;
        let first = t[..per_sample].to_vec();
        for chunk in t.chunks_mut(per_sample) {
            chunk.copy_from_slice(&first);
        }
    }
    data
}

#[test]
fn antithetic_pairs_read_one_stream_with_opposite_signs() {
    // With one key O = V_mu + sqrt(V_var) * eps, so the output shows the noise each sample drew.
    // Samples 0..5 from draw 5: draw 5 is the odd half of pair (4, 5), draws 6/7 and 8/9 pair up
    // within the call; nothing is unpaired. From draw 0 with 3 samples, draw 2 is unpaired (plain).
    for (samples, first_draw) in [(5usize, 5u64), (3, 0)] {
        let case = Case { samples, batch: 2, tq: 2, tk: 1, c: 7 };
        let data = case_data(case, 6);
        let key = antithetic(samples, first_draw);
        let mut want = Vec::new();
        for row in 0..case.rows() {
            let draw = first_draw + (row / case.batch) as u64;
            let (stream, sign) =
                (stream_id(draw & !1, key.adapter, key.direction), if draw % 2 == 1 { -1.0 } else { 1.0 });
            assert_eq!(key.source(row / case.batch), (stream, sign < 0.0), "NoiseKey::source of draw {draw}");
            for _query in 0..case.tq {
                for ch in 0..case.c {
                    let eps = sign * normal(key.seed, stream, ((row % case.batch) * case.c + ch) as u64);
                    let at = row * case.c + ch;
                    want.push(data[3][at] + data[4][at].sqrt() * eps);
                }
            }
        }
        for device in devices() {
            // As in single_key_output_is_the_value_sample: exact on the CPU, 1 ulp (FMA) on a GPU.
            let atol = if device.is_cuda() { 1e-6 } else { 0.0 };
            let got = fused_forward(case, &data, key, &device);
            assert_close(
                &format!("antithetic, one key, {samples} from draw {first_draw} on {}", device.name()),
                &got,
                &want,
                atol,
                0.0,
            );
        }
    }
}

#[test]
fn antithetic_outputs_of_a_pair_are_exact_negations_when_v_mu_is_zero() {
    // V_s = +-sqrt(V_var) eps and the same weights A for both samples of a pair, so O_1 = -O_0
    // bit for bit (rounding is symmetric under negation), on every backend, with many keys.
    let case = Case { samples: 3, batch: 2, tq: 37, tk: 21, c: 40 };
    let mut data = same_inputs_per_sample(case, case_data(case, 51));
    data[3].iter_mut().for_each(|v| *v = 0.0);
    let row_len = case.batch * case.tq * case.c;
    for device in devices() {
        let out = fused_forward(case, &data, antithetic(3, 0), &device);
        let negated: Vec<f32> = out[..row_len].iter().map(|v| -v).collect();
        assert_eq!(&out[row_len..2 * row_len], &negated[..], "sample 1 is not -sample 0 on {}", device.name());
        // The unpaired sample 2 is plain draw 2, not a copy of either.
        let plain = fused_forward(case, &data, noise(3, 0), &device);
        assert_eq!(&out[2 * row_len..], &plain[2 * row_len..], "unpaired sample on {}", device.name());
        assert_ne!(&out[2 * row_len..], &out[..row_len]);
    }
}

#[test]
fn antithetic_mode_is_reproducible_and_keeps_even_draws_plain() {
    let case = Case { samples: 4, batch: 2, tq: 5, tk: 6, c: 9 };
    let data = case_data(case, 61);
    let row_len = case.batch * case.tq * case.c;
    for device in devices() {
        let first = fused_forward(case, &data, antithetic(4, 0), &device);
        assert_eq!(first, fused_forward(case, &data, antithetic(4, 0), &device), "antithetic must repeat bit for bit");
        let plain = fused_forward(case, &data, noise(4, 0), &device);
        // Even draws read their own stream in both modes; odd draws differ.
        for s in 0..case.samples {
            let (a, p) = (&first[s * row_len..][..row_len], &plain[s * row_len..][..row_len]);
            if s % 2 == 0 {
                assert_eq!(a, p, "even sample {s} differs from plain on {}", device.name());
            } else {
                assert_ne!(a, p, "odd sample {s} equals plain on {}", device.name());
            }
        }
    }
}

#[test]
fn fused_matches_composed_in_antithetic_mode() {
    // As fused_matches_composed_forward_and_gradients (same tolerances, same reasons), with pairs
    // and an unpaired sample, so that the backward's regenerated noise is negated too (dV_var).
    let case = Case { samples: 3, batch: 2, tq: 9, tk: 17, c: 33 };
    let data = case_data(case, 71);
    let d_out = random_vec(72, case.rows() * case.tq * case.c, -1.0, 1.0);
    assert_fused_matches_composed(case, &data, &d_out, antithetic(3, 1), "antithetic");
}

#[test]
fn gpu_matches_cpu_in_antithetic_mode() {
    let Some(gpu) = gpu() else { return };
    // Tolerances and reasons as in gpu_matches_cpu_with_the_same_noise.
    let case = Case { samples: 3, batch: 2, tq: 45, tk: 33, c: 100 };
    let data = case_data(case, 81);
    let d_out = random_vec(82, case.rows() * case.tq * case.c, -1.0, 1.0);
    let key = antithetic(3, 7);
    let (gpu_out, gpu_grads) = forward_backward(prob_attention, case, &data, &d_out, key, &gpu);
    let (cpu_out, cpu_grads) = forward_backward(prob_attention, case, &data, &d_out, key, &Device::Cpu);
    assert_close("antithetic output gpu vs cpu", &gpu_out, &cpu_out, FORWARD_ATOL, FORWARD_RTOL);
    for (name, (g, c)) in ["q", "k_mu", "k_var", "v_mu", "v_var"].iter().zip(gpu_grads.iter().zip(&cpu_grads)) {
        assert_close(&format!("antithetic d{name} gpu vs cpu"), g, c, 1e-4, 1e-3);
    }
}

#[test]
fn gpu_matches_cpu_with_the_same_noise() {
    let Some(gpu) = gpu() else { return };
    let cases = [
        Case { samples: 2, batch: 2, tq: 17, tk: 17, c: 16 },  // tiny config
        Case { samples: 3, batch: 1, tq: 45, tk: 33, c: 100 }, // nothing a multiple of a tile
        Case { samples: 2, batch: 2, tq: 197, tk: 256, c: 256 }, // paper, image -> text
        Case { samples: 1, batch: 2, tq: 256, tk: 197, c: 256 }, // paper, text -> image
    ];
    for (n, case) in cases.into_iter().enumerate() {
        let data = case_data(case, 300 + n as u64);
        let d_out = random_vec(400 + n as u64, case.rows() * case.tq * case.c, -1.0, 1.0);
        let key = noise(case.samples, n as u64);
        let (gpu_out, gpu_grads) = forward_backward(prob_attention, case, &data, &d_out, key, &gpu);
        let (cpu_out, cpu_grads) = forward_backward(prob_attention, case, &data, &d_out, key, &Device::Cpu);
        // Bit-identical noise, the same formulas, different summation orders (and FMA on the GPU).
        assert_close(&format!("output gpu vs cpu, {case:?}"), &gpu_out, &cpu_out, FORWARD_ATOL, FORWARD_RTOL);
        // As for fused vs composed: sums of up to 256 * 256 f32 terms in different orders.
        for (name, (g, c)) in ["q", "k_mu", "k_var", "v_mu", "v_var"].iter().zip(gpu_grads.iter().zip(&cpu_grads)) {
            assert_close(&format!("d{name} gpu vs cpu, {case:?}"), g, c, 1e-4, 1e-3);
        }
    }
    // More channels than the kernels spread over a warp: an error, not a wrong answer.
    let wide = Case { samples: 1, batch: 1, tq: 2, tk: 2, c: 300 };
    let err =
        call(prob_attention, &Tape::inference(), &to_tensors(wide, &case_data(wide, 1), &gpu, false), noise(1, 0))
            .unwrap_err();
    assert!(err.to_string().contains("C = 300"), "unexpected message: {err}");
}

#[test]
fn bad_shapes_are_rejected_with_their_shapes() {
    let t = |shape: &[usize]| Tensor::zeros(shape, &Device::Cpu).unwrap();
    let attempt = |q: &[usize], k: &[usize], v_var: &[usize], samples: usize| {
        let (q, k, v_var) = (t(q), t(k), t(v_var));
        prob_attention(&Tape::inference(), &q, &k, &k, &k, &v_var, BETA, noise(samples, 0)).unwrap_err().to_string()
    };
    let err = attempt(&[3, 4, 8], &[3, 5, 8], &[3, 5, 8], 2);
    assert!(err.contains("2 samples") && err.contains("[3, 4, 8]"), "unexpected message: {err}");
    let err = attempt(&[2, 4, 8], &[2, 5, 6], &[2, 5, 6], 1);
    assert!(err.contains("[2, 4, 8]") && err.contains("[2, 5, 6]"), "unexpected message: {err}");
    let err = attempt(&[2, 4, 8], &[2, 5, 8], &[2, 6, 8], 1);
    assert!(err.contains("v_var [2, 6, 8]"), "unexpected message: {err}");
    let err = attempt(&[4, 8], &[5, 8], &[5, 8], 1);
    assert!(err.contains("rank-3") && err.contains("[4, 8]"), "unexpected message: {err}");
    let err = attempt(&[2, 4, 8], &[2, 0, 8], &[2, 0, 8], 1);
    assert!(err.contains("non-empty") && err.contains("[2, 0, 8]"), "unexpected message: {err}");
}
