//! LayerNorm family (kernels/layernorm.cu, src/ops/layernorm.rs): forward and backward against
//! independent f64 computations, gradients against finite differences (including the fused
//! residual op with either or both outputs used), GPU against CPU, and shape errors.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::{
    add_layer_norm, add_layer_norm_forward, layer_norm, layer_norm_backward, layer_norm_forward, LayerNormStats,
};
use mcs_engine::{Device, Tape, Tensor};
use proptest::prelude::*;

const EPS: f32 = 1e-5;

/// Per-row mean and 1/sqrt(biased variance + eps), straight from the definition in f64.
fn row_stats_f64(row: &[f32], eps: f32) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// LayerNorm of each row in f64.
fn layer_norm_f64(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let cols = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let (mean, rstd) = row_stats_f64(row, eps);
        out.extend(row.iter().enumerate().map(|(c, &v)| ((v as f64 - mean) * rstd * w[c] as f64 + b[c] as f64) as f32));
    }
    out
}

/// The three LayerNorm gradients in f64, dx through the full per-row Jacobian
/// `d y_j / d x_i = w_j * rstd * (delta_ij - 1/C - xhat_i * xhat_j / C)` (a different route from
/// the engine's closed form).
fn layer_norm_grads_f64(x: &[f32], w: &[f32], dy: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let cols = w.len();
    let (mut dx, mut dw, mut db) = (Vec::with_capacity(x.len()), vec![0.0f64; cols], vec![0.0f64; cols]);
    for (row, g) in x.chunks(cols).zip(dy.chunks(cols)) {
        let (mean, rstd) = row_stats_f64(row, eps);
        let xhat: Vec<f64> = row.iter().map(|&v| (v as f64 - mean) * rstd).collect();
        for i in 0..cols {
            let mut sum = 0.0;
            for j in 0..cols {
                let delta = if i == j { 1.0 } else { 0.0 };
                sum += g[j] as f64 * w[j] as f64 * rstd * (delta - 1.0 / cols as f64 - xhat[i] * xhat[j] / cols as f64);
            }
            dx.push(sum as f32);
            dw[i] += g[i] as f64 * xhat[i];
            db[i] += g[i] as f64;
        }
    }
    let narrow = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect();
    (dx, narrow(dw), narrow(db))
}

/// Random rows in `[offset - 3, offset + 3]` whose first and last entries are the two ends, so
/// that no row of two or more columns has a tiny variance. (A nearly constant row makes
/// LayerNorm ill-conditioned: any rounding of the mean is multiplied by rstd, up to 1/sqrt(eps);
/// that is inherent to the op and not what these comparisons check.)
fn spread_rows(seed: u64, rows: usize, cols: usize, offset: f32) -> Vec<f32> {
    let mut x: Vec<f32> = random_vec(seed, rows * cols, -3.0, 3.0).iter().map(|v| v + offset).collect();
    if cols >= 2 {
        for row in x.chunks_mut(cols) {
            row[0] = offset - 3.0;
            row[cols - 1] = offset + 3.0;
        }
    }
    x
}

fn tensors(device: &Device, parts: &[(&[f32], &[usize])]) -> Vec<Tensor> {
    parts.iter().map(|(data, shape)| Tensor::from_slice(data, shape, device).unwrap()).collect()
}

// Outputs are O(|w| * 3 + |b|) <= 8. The CPU accumulates in f64 and rounds once; the GPU sums in
// f32 over at most a few hundred columns (relative error ~1e-6 of the row's scale). With a
// common offset of 1000 the input itself is only resolved to 6e-5 (its f32 ulp) and an f32 sum
// of 300 such values to ~1e-4 of the mean; divided by a row std >= 0.5 and multiplied by
// |w| <= 2 that is up to 4e-4. A one-pass E[x^2] - mean^2 variance (errors ~0.06 on a variance
// of ~3) is off by ~0.1 and fails.
fn forward_atol(offset: f32) -> f32 {
    if offset == 0.0 {
        2e-5
    } else {
        5e-4
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn layer_norm_matches_f64_reference(
        rows in 1usize..30,
        cols in 1usize..300,
        offset in prop_oneof![Just(0.0f32), Just(1000.0f32), Just(-1000.0f32)],
        seed in any::<u64>(),
    ) {
        let x = spread_rows(seed, rows, cols, offset);
        let w = random_vec(seed ^ 1, cols, -2.0, 2.0);
        let b = random_vec(seed ^ 2, cols, -2.0, 2.0);
        let want = layer_norm_f64(&x, &w, &b, EPS);
        let want_stats: Vec<(f64, f64)> = x.chunks(cols).map(|r| row_stats_f64(r, EPS)).collect();
        for device in devices() {
            let t = tensors(&device, &[(&x, &[rows, cols]), (&w, &[cols]), (&b, &[cols])]);
            let y = layer_norm(&Tape::inference(), &t[0], &t[1], &t[2], EPS).unwrap();
            assert_close(&format!("layer_norm on {}", device.name()), &y.to_vec().unwrap(), &want, forward_atol(offset), 1e-5);

            let (_, stats) = layer_norm_forward(&t[0], &t[1], &t[2], EPS).unwrap();
            let mean: Vec<f32> = want_stats.iter().map(|s| s.0 as f32).collect();
            let rstd: Vec<f32> = want_stats.iter().map(|s| s.1 as f32).collect();
            // The mean: f32 sums of up to 300 values near the offset, ~1e-4 at 1000 (see above);
            // rstd is about 0.6 here, and 1/sqrt(eps) ~ 316 when cols = 1, hence relative.
            assert_close(&format!("mean on {}", device.name()), &stats.mean.to_vec().unwrap(), &mean, 1e-5 + offset.abs() * 3e-7, 1e-6);
            assert_close(&format!("rstd on {}", device.name()), &stats.rstd.to_vec().unwrap(), &rstd, 0.0, 1e-4);
        }
    }

    #[test]
    fn add_layer_norm_matches_f64_reference(rows in 1usize..20, cols in 1usize..200, offset in prop_oneof![Just(0.0f32), Just(1000.0f32)], seed in any::<u64>()) {
        let x = spread_rows(seed, rows, cols, offset);
        let r = random_vec(seed ^ 3, rows * cols, -1.0, 1.0);
        let w = random_vec(seed ^ 1, cols, -2.0, 2.0);
        let b = random_vec(seed ^ 2, cols, -2.0, 2.0);
        let sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
        let want = layer_norm_f64(&sum, &w, &b, EPS);
        for device in devices() {
            let t = tensors(&device, &[(&x, &[rows, cols]), (&r, &[rows, cols]), (&w, &[cols]), (&b, &[cols])]);
            let (s, y) = add_layer_norm(&Tape::inference(), &t[0], &t[1], &t[2], &t[3], EPS).unwrap();
            // The sum is one f32 addition, exactly as the reference does it.
            assert_close(&format!("add_layer_norm sum on {}", device.name()), &s.to_vec().unwrap(), &sum, 0.0, 0.0);
            assert_close(&format!("add_layer_norm on {}", device.name()), &y.to_vec().unwrap(), &want, forward_atol(offset), 1e-5);
        }
    }

    #[test]
    fn layer_norm_backward_matches_f64_reference(
        lead in 1usize..4,
        rows in 1usize..90,
        cols in 1usize..70,
        seed in any::<u64>(),
    ) {
        // Up to 270 rows: several of the 64-row chunks the weight/bias reduction works in.
        let shape = [lead, rows, cols];
        let n = lead * rows * cols;
        let x = spread_rows(seed, lead * rows, cols, 0.0);
        let w = random_vec(seed ^ 1, cols, -2.0, 2.0);
        let b = random_vec(seed ^ 2, cols, -2.0, 2.0);
        let dy = random_vec(seed ^ 4, n, -1.0, 1.0);
        let (want_dx, want_dw, want_db) = layer_norm_grads_f64(&x, &w, &dy, EPS);
        for device in devices() {
            let t = tensors(&device, &[(&x, &shape), (&w, &[cols]), (&b, &[cols]), (&dy, &shape)]);
            let (_, stats) = layer_norm_forward(&t[0], &t[1], &t[2], EPS).unwrap();
            prop_assert_eq!(stats.mean.shape(), &[lead, rows]);
            let (dx, dw, db) = layer_norm_backward(&t[0], &t[1], &stats, &t[3]).unwrap();
            let on = device.name();
            // dx: sums of up to 70 terms of size |dy * w| * rstd <= 4 (rstd <= 2 for spread rows;
            // with one column dx is exactly 0): f32 sums err by ~1e-5; 1e-4 leaves margin.
            assert_close(&format!("dx on {on}"), &dx.to_vec().unwrap(), &want_dx, 1e-4, 1e-4);
            // dw, db: sums over up to 270 rows of terms <= 3 in magnitude, f32 on the GPU.
            assert_close(&format!("dweight on {on}"), &dw.to_vec().unwrap(), &want_dw, 1e-4, 1e-5);
            assert_close(&format!("dbias on {on}"), &db.to_vec().unwrap(), &want_db, 1e-4, 1e-5);
        }
    }
}

#[test]
fn a_single_column_normalises_to_the_bias() {
    // var = 0, so xhat = 0 and y = bias whatever x is (PyTorch gives the same).
    for device in devices() {
        let t = tensors(&device, &[(&[5.0, -2.0, 1e4], &[3, 1]), (&[3.0], &[1]), (&[0.25], &[1])]);
        let y = layer_norm(&Tape::inference(), &t[0], &t[1], &t[2], EPS).unwrap();
        assert_eq!(y.to_vec().unwrap(), vec![0.25; 3], "on {}", device.name());
    }
}

// Finite differences in f32 with step 1e-2 on O(1) inputs with row std ~1: truncation error
// O(step^2 * |y'''|) ~ 1e-4, rounding ~1e-7 * |L| / step ~ 1e-4. 2e-3 absolute + 1e-2 relative
// is well above both and far below the size of a wrong gradient (O(1)).
const FD_STEP: f32 = 1e-2;
const FD_ATOL: f32 = 2e-3;
const FD_RTOL: f32 = 1e-2;

fn ln_inputs(seed: u64, rows: usize, cols: usize) -> Vec<(Vec<f32>, Vec<usize>)> {
    vec![
        (random_vec(seed, rows * cols, -2.0, 2.0), vec![rows, cols]),
        (random_vec(seed ^ 1, cols, 0.5, 2.0), vec![cols]),
        (random_vec(seed ^ 2, cols, -1.0, 1.0), vec![cols]),
    ]
}

#[test]
fn layer_norm_gradients_match_finite_differences() {
    for (rows, cols) in [(3, 7), (1, 33), (4, 1)] {
        check_gradients(
            &format!("layer_norm {rows}x{cols}"),
            &ln_inputs(11, rows, cols),
            &[],
            FD_STEP,
            FD_ATOL,
            FD_RTOL,
            |tape, p| layer_norm(tape, &p[0], &p[1], &p[2], EPS),
        );
    }
}

#[test]
fn layer_norm_gives_no_gradient_to_frozen_inputs() {
    // Frozen affine parameters (a frozen tower) and a frozen input with trainable parameters.
    for frozen in [vec![1, 2], vec![0]] {
        check_gradients(
            &format!("layer_norm frozen {frozen:?}"),
            &ln_inputs(12, 3, 6),
            &frozen,
            FD_STEP,
            FD_ATOL,
            FD_RTOL,
            |tape, p| layer_norm(tape, &p[0], &p[1], &p[2], EPS),
        );
    }
}

/// Inputs of the fused op: x, residual, weight, bias.
fn fused_inputs(seed: u64, rows: usize, cols: usize) -> Vec<(Vec<f32>, Vec<usize>)> {
    let mut inputs = ln_inputs(seed, rows, cols);
    inputs.insert(1, (random_vec(seed ^ 3, rows * cols, -1.0, 1.0), vec![rows, cols]));
    inputs
}

#[test]
fn add_layer_norm_gradients_when_only_the_norm_is_used() {
    // Post-LN (BERT): the sum is discarded.
    check_gradients("add_layer_norm -> y", &fused_inputs(13, 3, 7), &[], FD_STEP, FD_ATOL, FD_RTOL, |tape, p| {
        Ok(add_layer_norm(tape, &p[0], &p[1], &p[2], &p[3], EPS)?.1)
    });
}

#[test]
fn add_layer_norm_gradients_when_only_the_sum_is_used() {
    // weight and bias then get no gradient (compared against zero finite differences).
    check_gradients("add_layer_norm -> s", &fused_inputs(14, 3, 7), &[], FD_STEP, FD_ATOL, FD_RTOL, |tape, p| {
        Ok(add_layer_norm(tape, &p[0], &p[1], &p[2], &p[3], EPS)?.0)
    });
}

#[test]
fn add_layer_norm_gradients_when_both_outputs_are_used() {
    // Pre-LN (ViT): the sum s is the residual stream and also feeds the next block's sum together
    // with the normalised y, so gradients reach s both directly and through y. The second fused
    // op reuses the same weight and bias, so their gradients accumulate over two entries as well.
    for return_sum in [true, false] {
        check_gradients(
            &format!("add_layer_norm both (return sum: {return_sum})"),
            &fused_inputs(15, 3, 7),
            &[],
            FD_STEP,
            FD_ATOL,
            FD_RTOL,
            |tape, p| {
                let (s, y) = add_layer_norm(tape, &p[0], &p[1], &p[2], &p[3], EPS)?;
                let (s2, y2) = add_layer_norm(tape, &y, &s, &p[2], &p[3], EPS)?;
                Ok(if return_sum { s2 } else { y2 })
            },
        );
    }
}

#[test]
fn add_layer_norm_gives_no_gradient_to_frozen_inputs() {
    // A frozen residual and frozen affine parameters: only x is differentiated.
    check_gradients(
        "add_layer_norm frozen",
        &fused_inputs(16, 2, 5),
        &[1, 2, 3],
        FD_STEP,
        FD_ATOL,
        FD_RTOL,
        |tape, p| {
            let (s, y) = add_layer_norm(tape, &p[0], &p[1], &p[2], &p[3], EPS)?;
            Ok(add_layer_norm(tape, &y, &s, &p[2], &p[3], EPS)?.1)
        },
    );
}

#[test]
fn shape_errors_name_the_shapes() {
    let x = Tensor::zeros(&[2, 4], &Device::Cpu).unwrap();
    let w = Tensor::zeros(&[3], &Device::Cpu).unwrap();
    let b = Tensor::zeros(&[4], &Device::Cpu).unwrap();
    let err = layer_norm(&Tape::inference(), &x, &w, &b, EPS).unwrap_err().to_string();
    assert!(err.contains("[3]") && err.contains("[2, 4]"), "unexpected message: {err}");

    let r = Tensor::zeros(&[2, 5], &Device::Cpu).unwrap();
    let err = add_layer_norm(&Tape::inference(), &x, &r, &b, &b, EPS).unwrap_err().to_string();
    assert!(err.contains("[2, 4]") && err.contains("[2, 5]"), "unexpected message: {err}");

    let scalar = Tensor::zeros(&[], &Device::Cpu).unwrap();
    let err = layer_norm(&Tape::inference(), &scalar, &b, &b, EPS).unwrap_err().to_string();
    assert!(err.contains("[]"), "unexpected message: {err}");

    let (_, stats) = layer_norm_forward(&x, &b, &b, EPS).unwrap();
    let dy = Tensor::zeros(&[4, 2], &Device::Cpu).unwrap();
    let err = layer_norm_backward(&x, &b, &stats, &dy).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("[4, 2]") && err.contains("[2, 4]"), "unexpected message: {err}");
}

/// Runs the fused op and both outputs' backward on `device`; returns (s, y, grads of x, r, w, b).
fn fused_run(device: &Device, inputs: &[Tensor], ds: &Tensor, dy: &Tensor) -> Vec<Vec<f32>> {
    let tape = Tape::new();
    let p: Vec<Tensor> = inputs.iter().map(|t| t.to_device(device).unwrap().into_trainable()).collect();
    let (s, y) = add_layer_norm(&tape, &p[0], &p[1], &p[2], &p[3], EPS).unwrap();
    // Both outputs feed a second fused op, whose sum receives the seed gradient `ds` and whose
    // norm `dy` is ignored; then y alone is back-propagated from a fresh tape with seed `dy`.
    let (s2, _) = add_layer_norm(&tape, &y, &s, &p[2], &p[3], EPS).unwrap();
    let grads = tape.backward_from(&s2, ds.to_device(device).unwrap()).unwrap();
    let mut out = vec![s.to_vec().unwrap(), y.to_vec().unwrap()];
    out.extend(p.iter().map(|t| grads.get(t).unwrap().to_vec().unwrap()));
    let tape = Tape::new();
    let y = layer_norm(&tape, &p[0], &p[2], &p[3], EPS).unwrap();
    let grads = tape.backward_from(&y, dy.to_device(device).unwrap()).unwrap();
    out.extend([&p[0], &p[2], &p[3]].iter().map(|t| grads.get(t).unwrap().to_vec().unwrap()));
    out
}

#[test]
fn gpu_forward_and_backward_match_cpu() {
    let Some(gpu) = gpu() else { return };
    // 2100 rows (33 chunks of the weight/bias reduction) of 77 columns (a partial 32-column tile).
    let shape = [3, 700, 77];
    let cpu = Device::Cpu;
    let inputs = [
        random_tensor(1, &shape, -3.0, 3.0, &cpu),
        random_tensor(2, &shape, -1.0, 1.0, &cpu),
        random_tensor(3, &[77], 0.5, 2.0, &cpu),
        random_tensor(4, &[77], -1.0, 1.0, &cpu),
    ];
    let ds = random_tensor(5, &shape, -1.0, 1.0, &cpu);
    let dy = random_tensor(6, &shape, -1.0, 1.0, &cpu);
    let names = ["s", "y", "dx", "dresidual", "dweight", "dbias", "ln dx", "ln dweight", "ln dbias"];
    let (on_gpu, on_cpu) = (fused_run(&gpu, &inputs, &ds, &dy), fused_run(&cpu, &inputs, &ds, &dy));
    for ((name, g), c) in names.iter().zip(&on_gpu).zip(&on_cpu) {
        // Same maths; the GPU sums in f32 (77 columns per row, 2100 rows for the parameter
        // gradients, whose values reach ~1e3), the CPU in f64.
        let atol = if name.contains("weight") || name.contains("bias") { 2e-3 } else { 1e-4 };
        assert_close(&format!("{name}: gpu vs cpu"), g, c, atol, 1e-4);
    }
    // The weight/bias reduction has a fixed order: bit-identical on a second run.
    assert_eq!(fused_run(&gpu, &inputs, &ds, &dy), on_gpu, "GPU LayerNorm backward is not deterministic");
}

#[test]
fn untracked_stats_have_the_leading_shape() {
    let x = random_tensor(9, &[2, 3, 5], -1.0, 1.0, &Device::Cpu);
    let w = Tensor::ones(&[5], &Device::Cpu).unwrap();
    let b = Tensor::zeros(&[5], &Device::Cpu).unwrap();
    let (s, y, LayerNormStats { mean, rstd }) = add_layer_norm_forward(&x, &x, &w, &b, EPS).unwrap();
    assert_eq!(
        (s.shape(), y.shape(), mean.shape(), rstd.shape()),
        (&[2, 3, 5][..], &[2, 3, 5][..], &[2, 3][..], &[2, 3][..])
    );
}
