//! DHN-NCE family (kernels/dhn_nce.cu, src/ops/dhn_nce.rs): the loss against a literal f64
//! transcription of its defining sums (with the hard-negative weights written out, not the
//! log-sum-exp form the op uses), gradients against finite differences (f32 through the op, and
//! f64 through the transcription, where they also show that the weights are differentiated),
//! the batch-of-two and zero-hardness special cases, stability at extreme temperatures, GPU
//! against CPU, and input errors.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_vec};
use mcs_engine::ops::{dhn_nce_loss, DhnNceConfig};
use mcs_engine::{Device, Tape, Tensor};

fn config(temperature: f32, beta_image: f32, beta_text: f32) -> DhnNceConfig {
    DhnNceConfig { temperature, beta_image, beta_text }
}

/// `rows` random unit vectors of `width` (the op's intended inputs), in f32.
fn unit_rows(seed: u64, rows: usize, width: usize) -> Vec<f32> {
    let mut x = random_vec(seed, rows * width, -1.0, 1.0);
    for row in x.chunks_mut(width) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    x
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `S = v t^T / tau` in f64, `[B][B]`.
fn similarities(v: &[f64], t: &[f64], batch: usize, tau: f64) -> Vec<Vec<f64>> {
    let width = v.len() / batch;
    (0..batch)
        .map(|i| {
            (0..batch)
                .map(|j| {
                    v[i * width..][..width].iter().zip(&t[j * width..][..width]).map(|(a, b)| a * b).sum::<f64>() / tau
                })
                .collect()
        })
        .collect()
}

fn transpose(m: &[Vec<f64>]) -> Vec<Vec<f64>> {
    (0..m.len()).map(|j| m.iter().map(|row| row[j]).collect()).collect()
}

/// One direction of the loss as the equation writes it:
/// `-(1/B) sum_i [ S_ii - log sum_{j != i} w_ij exp(S_ij) ]` with
/// `w_ij = (B - 1) exp(beta W_ij) / sum_{k != i} exp(beta W_ik)`. The weights are computed from
/// `weight_sim` (`sim` itself, unless a test holds them fixed).
fn literal_direction(sim: &[Vec<f64>], weight_sim: &[Vec<f64>], beta: f64) -> f64 {
    let batch = sim.len();
    let mut total = 0.0;
    for i in 0..batch {
        let denominator: f64 = (0..batch).filter(|&k| k != i).map(|k| (beta * weight_sim[i][k]).exp()).sum();
        let weighted: f64 = (0..batch)
            .filter(|&j| j != i)
            .map(|j| (batch - 1) as f64 * (beta * weight_sim[i][j]).exp() / denominator * sim[i][j].exp())
            .sum();
        total += sim[i][i] - weighted.ln();
    }
    -total / batch as f64
}

/// `L_vt + L_tv` of the equation, in f64; the weights come from `weights_from` (image, text)
/// when given, else from `v`, `t`.
fn literal_loss(v: &[f64], t: &[f64], batch: usize, cfg: DhnNceConfig, weights_from: Option<(&[f64], &[f64])>) -> f64 {
    let tau = cfg.temperature as f64;
    let sim = similarities(v, t, batch, tau);
    let weight_sim = match weights_from {
        Some((v0, t0)) => similarities(v0, t0, batch, tau),
        None => sim.clone(),
    };
    literal_direction(&sim, &weight_sim, cfg.beta_image as f64)
        + literal_direction(&transpose(&sim), &transpose(&weight_sim), cfg.beta_text as f64)
}

/// The op's loss and gradients on `device`, for the output gradient `seed`.
fn run(v: &[f32], t: &[f32], batch: usize, cfg: DhnNceConfig, device: &Device, seed: f32) -> (f32, Vec<f32>, Vec<f32>) {
    let width = v.len() / batch;
    let tape = Tape::new();
    let vt = Tensor::from_slice(v, &[batch, width], device).unwrap().into_trainable();
    let tt = Tensor::from_slice(t, &[batch, width], device).unwrap().into_trainable();
    let loss = dhn_nce_loss(&tape, &vt, &tt, cfg).unwrap();
    assert_eq!(loss.shape(), &[] as &[usize], "the loss is a scalar");
    let value = loss.to_scalar().unwrap();
    let grads = tape.backward_from(&loss, Tensor::from_slice(&[seed], &[], device).unwrap()).unwrap();
    (value, grads.get(&vt).unwrap().to_vec().unwrap(), grads.get(&tt).unwrap().to_vec().unwrap())
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

#[test]
fn default_config_is_the_papers() {
    assert_eq!(DhnNceConfig::default(), config(0.6, 0.15, 0.15));
}

#[test]
fn forward_matches_the_literal_f64_equation() {
    let cases = [
        (2, 5, config(0.6, 0.15, 0.15)),
        (3, 1, config(0.6, 0.15, 0.15)),
        (5, 16, DhnNceConfig::default()),
        (8, 33, config(0.2, 0.5, 0.0)),
        (13, 64, config(0.07, 0.15, 0.3)),
        (17, 24, config(1.0, -0.4, 2.0)),
        (40, 128, config(0.6, 0.15, 0.15)),
    ];
    for (case, (batch, width, cfg)) in cases.into_iter().enumerate() {
        let v = unit_rows(100 + case as u64, batch, width);
        let t = unit_rows(200 + case as u64, batch, width);
        let want = literal_loss(&to_f64(&v), &to_f64(&t), batch, cfg, None) as f32;
        for device in devices() {
            let vt = Tensor::from_slice(&v, &[batch, width], &device).unwrap();
            let tt = Tensor::from_slice(&t, &[batch, width], &device).unwrap();
            let got = dhn_nce_loss(&Tape::inference(), &vt, &tt, cfg).unwrap().to_scalar().unwrap();
            // Unit rows: |S_ij| <= 1/tau, and the f32 dot products behind S err by ~sqrt(D) u / tau
            // (u = 6e-8; < 1e-5 / tau for D <= 128). Each of the 2B row terms moves by at most
            // (2 + 2|beta|) times that, and the loss averages them over B; the f32 log-sum-exps add
            // ~u relative to 1/tau. 4e-5 / tau absolute (2e-5 / tau for the bound, x2 slack) and
            // 1e-5 relative cover both.
            let atol = 4e-5 / cfg.temperature;
            assert_close(&format!("B={batch} D={width} {cfg:?} on {}", device.name()), &[got], &[want], atol, 1e-5);
        }
    }
}

// The op's gradient against f32 central differences of the op itself, on unit inputs perturbed
// freely (the op is defined for any input). Step 1e-2: truncation ~ h^2/6 |f'''| with f''' of order
// (1 + beta)^3 / tau^3 / B ~ 1e-4 here, rounding ~ u |L| / h ~ 3e-5; 3e-4 absolute + 1e-2 relative
// on gradients of order 1 / (B tau) ~ 0.1-0.5 covers both.
#[test]
fn gradients_match_finite_differences() {
    for (case, (batch, width, cfg)) in [
        (2, 3, DhnNceConfig::default()),
        (4, 5, DhnNceConfig::default()),
        (5, 4, config(0.8, 0.5, -0.2)),
        (6, 3, config(1.0, 1.0, 0.0)),
    ]
    .into_iter()
    .enumerate()
    {
        let v = unit_rows(300 + case as u64, batch, width);
        let t = unit_rows(400 + case as u64, batch, width);
        let inputs = [(v, vec![batch, width]), (t, vec![batch, width])];
        check_gradients(&format!("dhn_nce B={batch} D={width} {cfg:?}"), &inputs, &[], 1e-2, 3e-4, 1e-2, |tape, p| {
            dhn_nce_loss(tape, &p[0], &p[1], cfg)
        });
    }
}

/// Central f64 differences of `f` at `x` with step `h`.
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
fn gradients_flow_through_the_hard_negative_weights() {
    // f64 differences of the literal equation, with the weights moving with the inputs; and the
    // same with the weights frozen, to show the check tells the two apart.
    let (batch, width) = (6usize, 7usize);
    let cfg = config(0.3, 0.5, 0.8);
    let (v32, t32) = (unit_rows(501, batch, width), unit_rows(502, batch, width));
    let (v, t) = (to_f64(&v32), to_f64(&t32));
    let want_dv = numeric_gradient(&v, 1e-6, |vp| literal_loss(vp, &t, batch, cfg, None));
    let want_dt = numeric_gradient(&t, 1e-6, |tp| literal_loss(&v, tp, batch, cfg, None));
    let frozen_dv = numeric_gradient(&v, 1e-6, |vp| literal_loss(vp, &t, batch, cfg, Some((&v, &t))));
    let gap = want_dv.iter().zip(&frozen_dv).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(gap > 1e-2, "freezing the weights does not change the gradient here ({gap})");
    for device in devices() {
        let (_, dv, dt) = run(&v32, &t32, batch, cfg, &device, 1.0);
        // f64 differences with step 1e-6 are accurate to ~1e-9; the op's gradients carry f32
        // rounding of S (~u / tau) and of the softmax terms, on gradients of order 1/(B tau) ~ 0.5.
        assert_close(&format!("dhn_nce d/dimage on {}", device.name()), &dv, &want_dv, 2e-6, 1e-4);
        assert_close(&format!("dhn_nce d/dtext on {}", device.name()), &dt, &want_dt, 2e-6, 1e-4);
    }
}

#[test]
fn a_batch_of_two_ignores_the_hardness() {
    // With one negative per row its weight is (B - 1) * 1 = 1 whatever beta is, so
    // L = -(S_00 + S_11 - S_01 - S_10) and dv_0 = -(t_0 - t_1) / tau, dt_0 = -(v_0 - v_1) / tau
    // (and the mirror images for index 1).
    let (batch, width, tau) = (2usize, 6usize, 0.6f32);
    let (v, t) = (unit_rows(601, batch, width), unit_rows(602, batch, width));
    let sim = similarities(&to_f64(&v), &to_f64(&t), batch, tau as f64);
    let want = -(sim[0][0] + sim[1][1] - sim[0][1] - sim[1][0]) as f32;
    let diff = |x: &[f32], a: usize, b: usize| -> Vec<f32> {
        (0..width).map(|c| (-(x[a * width + c] as f64 - x[b * width + c] as f64) / tau as f64) as f32).collect()
    };
    let want_dv = [diff(&t, 0, 1), diff(&t, 1, 0)].concat();
    let want_dt = [diff(&v, 0, 1), diff(&v, 1, 0)].concat();
    for device in devices() {
        for (beta_image, beta_text) in [(0.15, 0.15), (0.0, 3.0), (-0.7, 1.5)] {
            let (loss, dv, dt) = run(&v, &t, batch, config(tau, beta_image, beta_text), &device, 1.0);
            let what = format!("B=2 betas ({beta_image}, {beta_text}) on {}", device.name());
            // Four f32 dot products of unit rows over tau, and log-sum-exps of one term (exact up
            // to a rounding or two of S): a few u / tau.
            assert_close(&format!("{what}: loss"), &[loss], &[want], 2e-6, 1e-6);
            // Each entry is a sum of two ~1/tau terms from softmaxes of one entry (exactly 1).
            assert_close(&format!("{what}: d/dimage"), &dv, &want_dv, 2e-6, 1e-5);
            assert_close(&format!("{what}: d/dtext"), &dt, &want_dt, 2e-6, 1e-5);
        }
    }
}

#[test]
fn zero_hardness_is_decoupled_info_nce() {
    // With beta = 0 every weight is (B - 1) / (B - 1) = 1, so each direction is the decoupled
    // InfoNCE -(1/B) sum_i [S_ii - log sum_{j != i} exp(S_ij)], with no log(B - 1) offset (that
    // offset appears only if the weights are normalised to sum to 1 instead of B - 1).
    let (batch, width, tau) = (9usize, 12usize, 0.25f32);
    let (v, t) = (unit_rows(701, batch, width), unit_rows(702, batch, width));
    let sim = similarities(&to_f64(&v), &to_f64(&t), batch, tau as f64);
    let info_nce = |m: &[Vec<f64>]| -> f64 {
        let total: f64 =
            (0..batch).map(|i| m[i][i] - (0..batch).filter(|&j| j != i).map(|j| m[i][j].exp()).sum::<f64>().ln()).sum();
        -total / batch as f64
    };
    let want = (info_nce(&sim) + info_nce(&transpose(&sim))) as f32;
    for device in devices() {
        let (loss, _, _) = run(&v, &t, batch, config(tau, 0.0, 0.0), &device, 1.0);
        // As in forward_matches_the_literal_f64_equation: 4e-5 / tau absolute.
        assert_close(&format!("beta = 0 on {}", device.name()), &[loss], &[want], 4e-5 / tau, 1e-5);
    }
}

#[test]
fn extreme_temperatures_stay_finite_and_correct() {
    let (batch, width) = (8usize, 16usize);
    let v = unit_rows(801, batch, width);
    // Aligned pairs: every positive is exactly 1/tau, far above the negatives.
    let aligned = v.clone();
    // Near-duplicates: the positive and the hardest negatives are all close to 1/tau.
    let near: Vec<f32> = v.iter().enumerate().map(|(k, x)| if k % width == 0 { x + 0.05 } else { *x }).collect();
    let mut duplicate_rows = v.clone();
    duplicate_rows.copy_within(0..width, width); // rows 0 and 1 of the text are the same
    for (name, t) in [("aligned", &aligned), ("near-duplicate", &near), ("duplicate rows", &duplicate_rows)] {
        for device in devices() {
            for tau in [1e-3f32, 1e-2, 100.0] {
                let cfg = config(tau, 0.15, 0.15);
                let (loss, dv, dt) = run(&v, t, batch, cfg, &device, 1.0);
                let what = format!("{name} tau={tau} on {}", device.name());
                assert!(loss.is_finite(), "{what}: loss {loss}");
                assert!(dv.iter().chain(&dt).all(|g| g.is_finite()), "{what}: non-finite gradient");
                if tau >= 1e-2 {
                    // The literal sums reach exp(1.15 / tau) = e^115 at tau = 1e-2, still within
                    // f64; at tau = 1e-3 they overflow, so only finiteness is checked there.
                    let want = literal_loss(&to_f64(&v), &to_f64(t), batch, cfg, None) as f32;
                    // 4e-5 / tau as in forward_matches_the_literal_f64_equation (4e-3 at tau=1e-2,
                    // against a loss of order 1/tau = 100).
                    assert_close(&format!("{what}: loss"), &[loss], &[want], 4e-5 / tau, 1e-5);
                }
            }
        }
    }
}

#[test]
fn gpu_forward_and_backward_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::Cpu;
    // A batch of two, widths that are not multiples of 32, a batch past one warp per row, and one
    // whose rows span several strides of a 256-thread block.
    for (batch, width, cfg) in [
        (2, 3, DhnNceConfig::default()),
        (37, 45, config(0.07, 0.3, 0.1)),
        (130, 64, DhnNceConfig::default()),
        (700, 8, config(0.2, 0.15, 0.5)),
    ] {
        let v = unit_rows(900 + batch as u64, batch, width);
        let t = unit_rows(950 + batch as u64, batch, width);
        let (lg, dvg, dtg) = run(&v, &t, batch, cfg, &gpu, 1.3);
        let (lc, dvc, dtc) = run(&v, &t, batch, cfg, &cpu, 1.3);
        // Both take S from an f32 GEMM (other summation orders: ~sqrt(D) u / tau apart); the GPU
        // then works in f32 where the CPU uses f64 (~u relative to the ~1/tau terms).
        let what = format!("B={batch} D={width} {cfg:?}");
        assert_close(&format!("{what} loss: gpu vs cpu"), &[lg], &[lc], 2e-5 / cfg.temperature, 1e-5);
        // Gradient entries are sums over the batch of softmax terms times unit rows over tau; the
        // absolute part scales with the largest gradient.
        assert_close(&format!("{what} d/dimage: gpu vs cpu"), &dvg, &dvc, max_abs(&dvc) * 1e-4, 1e-4);
        assert_close(&format!("{what} d/dtext: gpu vs cpu"), &dtg, &dtc, max_abs(&dtc) * 1e-4, 1e-4);
        // No atomics and fixed summation orders: a second run is bit for bit the same.
        let again = run(&v, &t, batch, cfg, &gpu, 1.3);
        assert_eq!(lg.to_bits(), again.0.to_bits(), "{what}: loss differs between runs");
        assert!(dvg.iter().zip(&again.1).chain(dtg.iter().zip(&again.2)).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_values() {
    let cpu = Device::Cpu;
    let loss = |v: &[usize], t: &[usize], cfg: DhnNceConfig| {
        let v = Tensor::ones(v, &cpu).unwrap();
        let t = Tensor::ones(t, &cpu).unwrap();
        dhn_nce_loss(&Tape::inference(), &v, &t, cfg).unwrap_err().to_string()
    };
    let ok = DhnNceConfig::default();
    for batch in [0, 1] {
        let err = loss(&[batch, 4], &[batch, 4], ok);
        assert!(err.contains(&format!("batch size {batch}")), "{err}");
    }
    let err = loss(&[4, 8], &[4, 9], ok);
    assert!(err.contains("[4, 8]") && err.contains("[4, 9]"), "{err}");
    let err = loss(&[4, 8], &[5, 8], ok);
    assert!(err.contains("[4, 8]") && err.contains("[5, 8]"), "{err}");
    let err = loss(&[2, 4, 8], &[2, 4, 8], ok);
    assert!(err.contains("[B, D]") && err.contains("[2, 4, 8]"), "{err}");
    let err = loss(&[4, 0], &[4, 0], ok);
    assert!(err.contains("[4, 0]"), "{err}");
    for tau in [0.0, -0.6, f32::NAN, f32::INFINITY] {
        let err = loss(&[4, 8], &[4, 8], config(tau, 0.15, 0.15));
        assert!(err.contains("temperature") && err.contains(&tau.to_string()), "{err}");
    }
    for (beta_image, beta_text) in [(f32::NAN, 0.15), (0.15, f32::INFINITY), (f32::NEG_INFINITY, 0.0)] {
        let err = loss(&[4, 8], &[4, 8], config(0.6, beta_image, beta_text));
        assert!(err.contains("beta") && err.contains(&beta_image.to_string()), "{err}");
    }
}
