//! SoftCon family (kernels/softcon.cu, src/ops/softcon.rs): the soft patch-level contrastive loss
//! of docs/model.md §4.2 against a literal f64 transcription, gradients against finite differences of that
//! transcription with the soft targets held fixed, GPU against CPU, and input errors.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::soft_contrastive_loss;
use mcs_engine::{Device, Tape, Tensor};
use proptest::prelude::*;

type Matrix = Vec<Vec<f64>>;

fn matmul_transposed(a: &Matrix, b: &Matrix, scale: f64) -> Matrix {
    a.iter().map(|ra| b.iter().map(|rb| ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f64>() * scale).collect()).collect()
}

fn transpose(m: &Matrix) -> Matrix {
    (0..m[0].len()).map(|j| m.iter().map(|row| row[j]).collect()).collect()
}

fn softmax_rows(m: &Matrix) -> Matrix {
    m.iter()
        .map(|row| {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        })
        .collect()
}

/// `-(1/B) sum_ij targets_ij log softmax_row(logits)_ij` (the official soft cross-entropy).
fn soft_cross_entropy(logits: &Matrix, targets: &Matrix) -> f64 {
    let probs = softmax_rows(logits);
    let total: f64 = probs.iter().zip(targets).flat_map(|(p, t)| p.iter().zip(t).map(|(p, t)| -t * p.ln())).sum();
    total / logits.len() as f64
}

/// Patch tokens `[B, N, E]` and text `[B, E]` as f64 matrices.
fn split(z: &[f64], t: &[f64], [b, n, e]: [usize; 3]) -> (Vec<Matrix>, Matrix) {
    let tokens = (0..b).map(|i| (0..n).map(|k| z[(i * n + k) * e..][..e].to_vec()).collect()).collect();
    (tokens, (0..b).map(|i| t[i * e..][..e].to_vec()).collect())
}

/// The soft targets Y of docs/model.md §4.2 from the text embeddings.
fn targets_f64(text: &Matrix, tau: f64) -> Matrix {
    let s = matmul_transposed(text, text, 1.0 / tau);
    let normalised: Matrix = s
        .iter()
        .map(|row| {
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            row.iter().map(|v| v / norm).collect()
        })
        .collect();
    softmax_rows(&normalised)
}

/// L_SoftCon of docs/model.md §4.2 with the soft targets `y` given (so it can be held fixed).
fn loss_with_targets(tokens: &[Matrix], text: &Matrix, y: &Matrix, tau: f64) -> f64 {
    let means: Matrix = tokens
        .iter()
        .map(|image| {
            let mut mean = vec![0.0; text[0].len()];
            for token in image {
                let norm = token.iter().map(|v| v * v).sum::<f64>().sqrt();
                mean.iter_mut().zip(token).for_each(|(m, v)| *m += v / norm / image.len() as f64);
            }
            mean
        })
        .collect();
    let logits_per_image = matmul_transposed(&means, text, 1.0 / tau);
    let logits_per_text = matmul_transposed(text, &means, 1.0 / tau);
    (soft_cross_entropy(&logits_per_image, y) + soft_cross_entropy(&logits_per_text, &transpose(y))) / 2.0
}

fn loss_f64(z: &[f32], t: &[f32], shape: [usize; 3], tau: f64) -> f64 {
    let z: Vec<f64> = z.iter().map(|&v| v as f64).collect();
    let t: Vec<f64> = t.iter().map(|&v| v as f64).collect();
    let (tokens, text) = split(&z, &t, shape);
    loss_with_targets(&tokens, &text, &targets_f64(&text, tau), tau)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn forward_matches_f64_reference(b in 1usize..9, n in 1usize..20, e in 1usize..80, text_scale in prop_oneof![Just(0.05f32), Just(1.0), Just(4.0)], seed in any::<u64>()) {
        let shape = [b, n, e];
        let z = random_vec(seed, b * n * e, -1.0, 1.0);
        let t: Vec<f32> = random_vec(seed ^ 7, b * e, -1.0, 1.0).iter().map(|v| v * text_scale).collect();
        let tau = 0.2;
        let want = loss_f64(&z, &t, shape, tau as f64) as f32;
        for device in devices() {
            let zt = Tensor::from_slice(&z, &shape, &device).unwrap();
            let tt = Tensor::from_slice(&t, &[b, e], &device).unwrap();
            let loss = soft_contrastive_loss(&Tape::inference(), &zt, &tt, tau).unwrap();
            prop_assert_eq!(loss.shape(), &[] as &[usize]);
            // Logits up to |P||t|/tau ~ 4 * 9 / 0.2 ~ 180 on the largest text scale: f32 dot
            // products and log-sum-exps err by ~1e-7 relative to those, i.e. ~2e-5 absolute.
            assert_close(&format!("softcon {shape:?} x{text_scale} on {}", device.name()), &[loss.to_scalar().unwrap()], &[want], 5e-5, 1e-5);
        }
    }
}

#[test]
fn a_batch_of_one_has_zero_loss_and_gradient() {
    // One image: every softmax is over a single logit, so log softmax = 0 whatever the inputs.
    for device in devices() {
        let tape = Tape::new();
        let z = random_tensor(1, &[1, 4, 6], -1.0, 1.0, &device).into_trainable();
        let t = random_tensor(2, &[1, 6], -1.0, 1.0, &device).into_trainable();
        let loss = soft_contrastive_loss(&tape, &z, &t, 0.2).unwrap();
        assert_eq!(loss.to_scalar().unwrap(), 0.0, "on {}", device.name());
        let grads = tape.backward(&loss).unwrap();
        assert!(grads.get(&z).unwrap().to_vec().unwrap().iter().all(|&g| g == 0.0));
        assert!(grads.get(&t).unwrap().to_vec().unwrap().iter().all(|&g| g == 0.0));
    }
}

// Patch tokens: the targets do not depend on them, so the generic f32 finite-difference check of
// the whole op applies. Step 1e-2 on tokens of norm ~1: truncation ~1e-4 * |f'''| (f''' of order
// 1/(tau^2 N) here), rounding ~6e-8 / 2e-2 ~ 3e-6. 5e-5 absolute + 1e-2 relative covers both.
#[test]
fn patch_token_gradients_match_finite_differences() {
    for (b, n, e) in [(2, 3, 4), (4, 2, 5), (3, 1, 3)] {
        let z = random_vec(11 + b as u64, b * n * e, -1.0, 1.0);
        let t = random_vec(12 + b as u64, b * e, -1.0, 1.0);
        let inputs = [(z, vec![b, n, e]), (t, vec![b, e])];
        check_gradients(&format!("softcon d/dz [{b}, {n}, {e}]"), &inputs, &[1], 1e-2, 5e-5, 1e-2, |tape, p| {
            soft_contrastive_loss(tape, &p[0], &p[1], 0.2)
        });
    }
}

/// Central f64 finite differences of `f` at `x` with step `h`.
fn numeric_gradient(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f32> {
    (0..x.len())
        .map(|i| {
            let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
            plus[i] += h;
            minus[i] -= h;
            ((f(&plus) - f(&minus)) / (2.0 * h)) as f32
        })
        .collect()
}

#[test]
fn text_and_token_gradients_match_f64_differences_with_targets_held_fixed() {
    // The official code computes the targets under no_grad: the text gradient flows through the
    // logits only. Differentiate the f64 transcription with Y frozen at its unperturbed value.
    let (b, n, e, tau) = (4usize, 3usize, 5usize, 0.2f64);
    let shape = [b, n, e];
    let z32 = random_vec(21, b * n * e, -1.0, 1.0);
    let t32 = random_vec(22, b * e, -1.0, 1.0);
    let z: Vec<f64> = z32.iter().map(|&v| v as f64).collect();
    let t: Vec<f64> = t32.iter().map(|&v| v as f64).collect();
    let fixed_targets = targets_f64(&split(&z, &t, shape).1, tau);
    let want_dt = numeric_gradient(&t, 1e-6, |tp| {
        let (tokens, text) = split(&z, tp, shape);
        loss_with_targets(&tokens, &text, &fixed_targets, tau)
    });
    let want_dz = numeric_gradient(&z, 1e-6, |zp| {
        let (tokens, text) = split(zp, &t, shape);
        loss_with_targets(&tokens, &text, &fixed_targets, tau)
    });
    // With the targets differentiated too, the text gradient would differ: make sure the check
    // can tell the two apart.
    let full_dt = numeric_gradient(&t, 1e-6, |tp| {
        let (tokens, text) = split(&z, tp, shape);
        loss_with_targets(&tokens, &text, &targets_f64(&text, tau), tau)
    });
    let gap = want_dt.iter().zip(&full_dt).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(gap > 1e-3, "the target path does not change the text gradient here ({gap})");

    for device in devices() {
        let tape = Tape::new();
        let zt = Tensor::from_slice(&z32, &shape, &device).unwrap().into_trainable();
        let tt = Tensor::from_slice(&t32, &[b, e], &device).unwrap().into_trainable();
        let loss = soft_contrastive_loss(&tape, &zt, &tt, tau as f32).unwrap();
        let grads = tape.backward(&loss).unwrap();
        // f64 differences with step 1e-6 are accurate to ~1e-9; the op's gradients carry f32
        // rounding of values of order 1 / tau = 5.
        let (dz, dt) = (grads.get(&zt).unwrap().to_vec().unwrap(), grads.get(&tt).unwrap().to_vec().unwrap());
        assert_close(&format!("softcon d/dtext on {}", device.name()), &dt, &want_dt, 2e-6, 1e-4);
        assert_close(&format!("softcon d/dz on {}", device.name()), &dz, &want_dz, 2e-6, 1e-4);
    }
}

#[test]
fn gpu_forward_and_backward_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::Cpu;
    // Paper-like widths: 24 images, 196 patches, 512 channels; and a batch of 64 (the largest the
    // one-block pair kernel is meant for) with widths that are not multiples of 32.
    for (b, n, e) in [(24, 196, 512), (64, 7, 45), (2, 3, 1)] {
        let z = random_tensor(31, &[b, n, e], -1.0, 1.0, &cpu);
        let t = random_tensor(32, &[b, e], -0.3, 0.3, &cpu);
        let run = |device: &Device| {
            let tape = Tape::new();
            let zd = z.to_device(device).unwrap().into_trainable();
            let td = t.to_device(device).unwrap().into_trainable();
            let loss = soft_contrastive_loss(&tape, &zd, &td, 0.2).unwrap();
            let value = loss.to_scalar().unwrap();
            let grads = tape.backward_from(&loss, Tensor::from_slice(&[1.3], &[], device).unwrap()).unwrap();
            (value, grads.get(&zd).unwrap().to_vec().unwrap(), grads.get(&td).unwrap().to_vec().unwrap())
        };
        let ((lg, dzg, dtg), (lc, dzc, dtc)) = (run(&gpu), run(&cpu));
        // f32 dot products of up to 512 terms and 196-term means on the GPU against f64 on the
        // CPU: ~1e-6 relative to logits of order 10.
        assert_close(&format!("[{b},{n},{e}] loss: gpu vs cpu"), &[lg], &[lc], 1e-5, 1e-5);
        // The absolute part scales with the largest gradient, but never below 1e-6: with one
        // channel (e = 1) a normalised patch mean is +-1 whatever z is, so d/dz is exactly zero,
        // and each side returns its own rounding residue of the two O(1) terms that cancel in the
        // normalisation's backward (1e-18 on the CPU, 0 on the GPU).
        let max_dz = dzc.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let max_dt = dtc.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let (atol_dz, atol_dt) = ((max_dz * 1e-4).max(1e-6), (max_dt * 1e-4).max(1e-6));
        assert_close(&format!("[{b},{n},{e}] d/dz: gpu vs cpu"), &dzg, &dzc, atol_dz, 1e-4);
        assert_close(&format!("[{b},{n},{e}] d/dtext: gpu vs cpu"), &dtg, &dtc, atol_dt, 1e-4);
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_values() {
    let cpu = Device::Cpu;
    let z = Tensor::zeros(&[2, 3, 4], &cpu).unwrap();
    let err = soft_contrastive_loss(&Tape::inference(), &z, &Tensor::zeros(&[3, 4], &cpu).unwrap(), 0.2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[3, 4]") && err.contains("[2, 3, 4]"), "{err}");
    let err = soft_contrastive_loss(&Tape::inference(), &z, &Tensor::zeros(&[2, 5], &cpu).unwrap(), 0.2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[2, 5]"), "{err}");
    let flat = Tensor::zeros(&[6, 4], &cpu).unwrap();
    let err = soft_contrastive_loss(&Tape::inference(), &flat, &Tensor::zeros(&[6, 4], &cpu).unwrap(), 0.2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[B, N, E]") && err.contains("[6, 4]"), "{err}");
    let t = Tensor::ones(&[2, 4], &cpu).unwrap();
    for tau in [0.0, -1.0, f32::NAN] {
        let err = soft_contrastive_loss(&Tape::inference(), &z, &t, tau).unwrap_err().to_string();
        assert!(err.contains("temperature"), "{err}");
    }
}
