//! Batchnorm family (kernels/batchnorm.cu, src/ops/batchnorm.rs): training and evaluation forward
//! and backward against an independent f64 restatement of nn.BatchNorm2d on channels-last data, a
//! large common offset that a naive variance would cancel away, the running-statistics update
//! against PyTorch's formula, finite differences, GPU against CPU, and shape errors.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::{
    batch_norm_eval, batch_norm_forward, batch_norm_running_update, batch_norm_stats, batch_norm_train, BatchStats,
};
use mcs_engine::{Device, Tape, Tensor};

/// Unit roundoff of f32.
const U: f64 = 1.0 / (1u64 << 24) as f64;
const EPS: f32 = 1e-5;

/// nn.BatchNorm2d in f64, restated from its definition on `[rows, C]` data.
struct Reference {
    mean: Vec<f64>,
    /// Biased.
    var: Vec<f64>,
    y: Vec<f64>,
    /// Training-mode gradients (through the batch statistics).
    dx: Vec<f64>,
    dweight: Vec<f64>,
    dbias: Vec<f64>,
    /// `sum |dy * xhat|` per channel: what bounds the rounding of the f32 weight-gradient sum.
    dweight_abs: Vec<f64>,
    dbias_abs: Vec<f64>,
}

fn reference(x: &[f32], w: &[f32], b: &[f32], dy: &[f32], channels: usize) -> Reference {
    let rows = x.len() / channels;
    let n = rows as f64;
    let col = |c: usize| (0..rows).map(move |r| r * channels + c);
    let mean: Vec<f64> = (0..channels).map(|c| col(c).map(|i| x[i] as f64).sum::<f64>() / n).collect();
    let var: Vec<f64> =
        (0..channels).map(|c| col(c).map(|i| (x[i] as f64 - mean[c]).powi(2)).sum::<f64>() / n).collect();
    let rstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + EPS as f64).sqrt()).collect();
    let xhat = |i: usize| (x[i] as f64 - mean[i % channels]) * rstd[i % channels];
    let y = (0..x.len()).map(|i| xhat(i) * w[i % channels] as f64 + b[i % channels] as f64).collect();
    let dbias: Vec<f64> = (0..channels).map(|c| col(c).map(|i| dy[i] as f64).sum()).collect();
    let dweight: Vec<f64> = (0..channels).map(|c| col(c).map(|i| dy[i] as f64 * xhat(i)).sum()).collect();
    let dbias_abs = (0..channels).map(|c| col(c).map(|i| (dy[i] as f64).abs()).sum()).collect();
    let dweight_abs = (0..channels).map(|c| col(c).map(|i| (dy[i] as f64 * xhat(i)).abs()).sum()).collect();
    // d xhat_i / d x_j = rstd (delta_ij - 1/n - xhat_i xhat_j / n) within a channel.
    let dx = (0..x.len())
        .map(|i| {
            let c = i % channels;
            w[c] as f64 * rstd[c] * (dy[i] as f64 - dbias[c] / n - xhat(i) * dweight[c] / n)
        })
        .collect();
    Reference { mean, var, y, dx, dweight, dbias, dweight_abs, dbias_abs }
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Per-channel sums of `rows` terms against f64: `|got - want| <= 2 (rows + 4) u sum|terms| +
/// extra` (Higham §4.2: any f32 summation order is within `(n - 1) u sum|terms|`; the +4 covers
/// the rounded factors of each term and the factor 2 the final rounding). `extra` is the error
/// the terms themselves carry in from the statistics.
fn assert_sums(what: &str, got: &[f32], want: &[f64], abs: &[f64], rows: usize, extra: f64) {
    for (c, ((&g, &w), &a)) in got.iter().zip(want).zip(abs).enumerate() {
        let bound = 2.0 * (rows as f64 + 4.0) * U * a + extra + 1e-7;
        assert!((g as f64 - w).abs() <= bound, "{what}: channel {c} is {g}, expected {w} (allowed {bound:e})");
    }
}

/// Training forward and backward on every device against the f64 reference.
fn check_train(shape: &[usize], seed: u64, offset: f32, spread: f32) {
    let channels = *shape.last().unwrap();
    let n: usize = shape.iter().product();
    let rows = n / channels;
    let x: Vec<f32> = random_vec(seed, n, -spread, spread).into_iter().map(|v| v + offset).collect();
    let w = random_vec(seed ^ 1, channels, 0.5, 1.5);
    let b = random_vec(seed ^ 2, channels, -0.5, 0.5);
    let dy = random_vec(seed ^ 3, n, -1.0, 1.0);
    let want = reference(&x, &w, &b, &dy, channels);
    for device in devices() {
        let on = |what: &str| format!("batch_norm_train {what} {shape:?} offset {offset} on {}", device.name());
        let tape = Tape::new();
        let xt = Tensor::from_slice(&x, shape, &device).unwrap().into_trainable();
        let wt = Tensor::from_slice(&w, &[channels], &device).unwrap().into_trainable();
        let bt = Tensor::from_slice(&b, &[channels], &device).unwrap().into_trainable();
        let (y, stats) = batch_norm_train(&tape, &xt, &wt, &bt, EPS).unwrap();
        assert_eq!(stats.count, rows);
        // The mean of values |x| <= offset + spread: the GPU sums chunks of 64 rows in f32 (8
        // per thread, then 8 partials), whose rounding is about sqrt(8) ulp(64 |x|) / 64 ~ 2e-7
        // |x| with random signs and under 4e-6 |x| at worst; 2e-6 (offset + spread) sits between.
        // The CPU accumulates in f64 and only rounds the result.
        let mean_tol = (offset.abs() + spread) * 2e-6;
        assert_close(&on("mean"), &stats.mean.to_vec().unwrap(), &to_f32(&want.mean), mean_tol, 0.0);
        // The variance is taken around the mean, so its relative error is a few sqrt(n) u, not
        // the (offset / spread)^2 n u that E[x^2] - E[x]^2 would give (more than all of it at
        // offset 1e3). With an offset, Chan's merge multiplies each chunk mean's error (~2e-4 at
        // 1e3) by the spread of the chunk means, ~3e-5 of the variance in all: 3e-4 is 10x that
        // and still ~1000x below what a naive variance would be off by.
        let var_rtol = if offset == 0.0 { 2e-5 } else { 3e-4 };
        assert_close(&on("var"), &stats.var.to_vec().unwrap(), &to_f32(&want.var), 0.0, var_rtol);
        // y = (x - mean) rstd w + b, |y| <= ~3: the mean's error times rstd (<= 2 here, spread
        // >= 1) plus a few ulp: 2 mean_tol + 2e-6.
        assert_close(&on("y"), &y.to_vec().unwrap(), &to_f32(&want.y), 2.0 * mean_tol / spread + 2e-6, 1e-5);
        let grads = tape.backward_from(&y, Tensor::from_slice(&dy, shape, &device).unwrap()).unwrap();
        let grad = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
        assert_sums(&on("dbias"), &grad(&bt), &want.dbias, &want.dbias_abs, rows, 0.0);
        // Each xhat carries the mean's error times rstd (<= 2 / spread here) and half the
        // variance's relative error: at most sum|dy| (2 mean_tol / spread) + var_rtol sum|dy xhat|.
        for c in 0..channels {
            let extra = want.dbias_abs[c] * 2.0 * (mean_tol / spread) as f64 + var_rtol as f64 * want.dweight_abs[c];
            let (got, want_c) = (&grad(&wt)[c..c + 1], &want.dweight[c..c + 1]);
            assert_sums(&on("dweight"), got, want_c, &want.dweight_abs[c..c + 1], rows, extra);
        }
        // dx = w rstd (dy - mean(dy) - xhat mean(dy xhat)), w <= 1.5, rstd <= 2 / spread: the
        // xhat error above times mean(dy xhat) <= 1, times w rstd, i.e. <= 6 mean_tol / spread^2,
        // plus a few ulp of terms up to ~10.
        let dx_tol = 6.0 * mean_tol / (spread * spread) + 1e-5;
        assert_close(&on("dx"), &grad(&xt), &to_f32(&want.dx), dx_tol, 1e-4);
    }
}

#[test]
fn training_matches_f64_on_small_and_unet_like_shapes() {
    // Two values per channel (the fewest training allows), one image row, odd sizes, channel
    // counts below, at and above a 32-channel tile, and a UNet-like 14x14 grid.
    let shapes: [&[usize]; 7] =
        [&[2, 1], &[1, 1, 7, 3], &[2, 3, 4, 5], &[1, 5, 5, 32], &[3, 2, 3, 33], &[2, 14, 14, 40], &[2, 9]];
    for (k, shape) in shapes.into_iter().enumerate() {
        check_train(shape, 10 + k as u64, 0.0, 2.0);
    }
}

/// Values around 1e3 with spread 1: E[x^2] - E[x]^2 in f32 would lose the variance (1e6 has an
/// ulp of 0.06, a fifth of the variance 1/3) while the two-pass / Chan reduction keeps it to
/// 1e-4 relative.
#[test]
fn a_large_common_offset_keeps_the_variance_accurate() {
    check_train(&[2, 16, 16, 5], 30, 1000.0, 1.0);
    check_train(&[1, 24, 25, 3], 31, -1000.0, 1.0);
}

#[test]
fn running_update_follows_pytorch_with_the_unbiased_variance() {
    let (shape, channels) = ([2, 3, 5, 4], 4);
    let x = random_vec(40, 120, -2.0, 3.0);
    let old_mean = random_vec(41, channels, -1.0, 1.0);
    let old_var = random_vec(42, channels, 0.5, 2.0);
    let want = reference(&x, &[1.0; 4], &[0.0; 4], &[0.0; 120], channels);
    let n = 30.0f64;
    for device in devices() {
        let xt = Tensor::from_slice(&x, &shape, &device).unwrap();
        let ones = Tensor::ones(&[channels], &device).unwrap();
        let zeros = Tensor::zeros(&[channels], &device).unwrap();
        let (_, stats) = batch_norm_train(&Tape::new(), &xt, &ones, &zeros, EPS).unwrap();
        let rm = Tensor::from_slice(&old_mean, &[channels], &device).unwrap();
        let rv = Tensor::from_slice(&old_var, &[channels], &device).unwrap();
        for momentum in [0.1f32, 0.01, 1.0] {
            let m = momentum as f64;
            let (new_mean, new_var) = batch_norm_running_update(&rm, &rv, &stats, momentum).unwrap();
            let want_mean: Vec<f32> =
                (0..channels).map(|c| ((1.0 - m) * old_mean[c] as f64 + m * want.mean[c]) as f32).collect();
            let want_var: Vec<f32> = (0..channels)
                .map(|c| ((1.0 - m) * old_var[c] as f64 + m * want.var[c] * n / (n - 1.0)) as f32)
                .collect();
            // Two rounded products and a sum of values below 4, on statistics within ~1e-6: a few
            // ulp. A biased variance instead would be off by m * var / 29, >= 1e-4 here.
            let on = format!("momentum {momentum} on {}", device.name());
            assert_close(&format!("running mean {on}"), &new_mean.to_vec().unwrap(), &want_mean, 2e-6, 2e-6);
            assert_close(&format!("running var {on}"), &new_var.to_vec().unwrap(), &want_var, 2e-6, 2e-6);
        }
    }
}

/// PyTorch refuses to train on one value per channel; so do batch_norm_train and the running
/// update (whose unbiased variance would divide by n - 1 = 0).
#[test]
fn one_value_per_channel_is_refused_in_training() {
    let cpu = Device::Cpu;
    let ones = Tensor::ones(&[3], &cpu).unwrap();
    let x = Tensor::ones(&[1, 1, 1, 3], &cpu).unwrap();
    let err = batch_norm_train(&Tape::new(), &x, &ones, &ones, EPS).unwrap_err().to_string();
    assert!(err.contains("more than 1 value per channel") && err.contains("[1, 1, 1, 3]"), "{err}");
    let stats = batch_norm_stats(&x).unwrap();
    assert_eq!(stats.count, 1);
    let err = batch_norm_running_update(&ones, &ones, &stats, 0.1).unwrap_err().to_string();
    assert!(err.contains("more than 1 value per channel"), "{err}");
    // Evaluation mode has no such limit: a single pixel normalises with the running statistics.
    let y = batch_norm_eval(&Tape::new(), &x, &ones, &ones, &ones, &ones, 0.0).unwrap();
    assert_eq!(y.to_vec().unwrap(), vec![1.0; 3]);
}

#[test]
fn evaluation_uses_the_running_statistics_and_matches_f64() {
    let (shape, channels) = ([2, 3, 4, 6], 6);
    let n = 144;
    let x = random_vec(50, n, -2.0, 2.0);
    let (w, b) = (random_vec(51, channels, 0.5, 1.5), random_vec(52, channels, -0.5, 0.5));
    let (rm, rv) = (random_vec(53, channels, -0.5, 0.5), random_vec(54, channels, 0.5, 2.0));
    let dy = random_vec(55, n, -1.0, 1.0);
    let rstd: Vec<f64> = rv.iter().map(|&v| 1.0 / (v as f64 + EPS as f64).sqrt()).collect();
    let xhat = |i: usize| (x[i] as f64 - rm[i % channels] as f64) * rstd[i % channels];
    let want_y: Vec<f32> = (0..n).map(|i| (xhat(i) * w[i % channels] as f64 + b[i % channels] as f64) as f32).collect();
    let want_dx: Vec<f32> =
        (0..n).map(|i| (dy[i] as f64 * w[i % channels] as f64 * rstd[i % channels]) as f32).collect();
    let want_dw: Vec<f32> =
        (0..channels).map(|c| (c..n).step_by(channels).map(|i| dy[i] as f64 * xhat(i)).sum::<f64>() as f32).collect();
    let want_db: Vec<f32> =
        (0..channels).map(|c| (c..n).step_by(channels).map(|i| dy[i] as f64).sum::<f64>() as f32).collect();
    for device in devices() {
        let on = |what: &str| format!("batch_norm_eval {what} on {}", device.name());
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &device).unwrap();
        let tape = Tape::new();
        let (xt, wt, bt) =
            (t(&x, &shape).into_trainable(), t(&w, &[channels]).into_trainable(), t(&b, &[channels]).into_trainable());
        let y = batch_norm_eval(&tape, &xt, &wt, &bt, &t(&rm, &[channels]), &t(&rv, &[channels]), EPS).unwrap();
        // A handful of rounded operations on values below ~4: a few ulp.
        assert_close(&on("y"), &y.to_vec().unwrap(), &want_y, 2e-6, 2e-6);
        let grads = tape.backward_from(&y, t(&dy, &shape)).unwrap();
        let grad = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
        assert_close(&on("dx"), &grad(&xt), &want_dx, 1e-6, 2e-6);
        // Sums of 24 terms below ~3 in magnitude: 24 * 3 * u ~ 5e-6.
        assert_close(&on("dweight"), &grad(&wt), &want_dw, 1e-5, 0.0);
        assert_close(&on("dbias"), &grad(&bt), &want_db, 1e-5, 0.0);
    }
}

// Finite differences in f32 with step 1e-2 on inputs of std ~1 per channel: truncation error
// O(step^2 |y'''|) ~ 1e-4, rounding ~1e-7 |L| / step ~ 1e-4; 2e-3 absolute + 1e-2 relative is well
// above both and far below a wrong gradient (O(1); dropping the path through the statistics
// changes dx by about |dy| itself).
#[test]
fn gradients_match_finite_differences() {
    let (shape, channels) = (vec![2, 3, 2, 4], 4);
    let inputs = [
        (random_vec(60, 48, -2.0, 2.0), shape.clone()),
        (random_vec(61, channels, 0.5, 1.5), vec![channels]),
        (random_vec(62, channels, -0.5, 0.5), vec![channels]),
    ];
    for frozen in [&[][..], &[0], &[1, 2]] {
        check_gradients(
            &format!("batch_norm_train (frozen {frozen:?})"),
            &inputs,
            frozen,
            1e-2,
            2e-3,
            1e-2,
            |tape, p| Ok(batch_norm_train(tape, &p[0], &p[1], &p[2], EPS)?.0),
        );
    }
    let rm = Tensor::from_vec(random_vec(63, channels, -0.5, 0.5), &[channels]).unwrap();
    let rv = Tensor::from_vec(random_vec(64, channels, 0.5, 2.0), &[channels]).unwrap();
    check_gradients("batch_norm_eval", &inputs, &[], 1e-2, 2e-3, 1e-2, |tape, p| {
        batch_norm_eval(tape, &p[0], &p[1], &p[2], &rm, &rv, EPS)
    });
}

#[test]
fn gpu_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    // A UNet stage at reduced size, an odd channel count, and a large offset.
    for (shape, offset) in [([2, 28, 28, 64], 0.0f32), ([3, 7, 9, 45], 0.0), ([1, 16, 20, 35], 500.0)] {
        let channels = shape[3];
        let x = random_tensor(70, &shape, offset - 2.0, offset + 2.0, &Device::Cpu);
        let w = random_tensor(71, &[channels], 0.5, 1.5, &Device::Cpu);
        let b = random_tensor(72, &[channels], -0.5, 0.5, &Device::Cpu);
        let dy = random_tensor(73, &shape, -1.0, 1.0, &Device::Cpu);
        let run = |device: &Device| {
            let tape = Tape::new();
            let xd = x.to_device(device).unwrap().into_trainable();
            let wd = w.to_device(device).unwrap().into_trainable();
            let bd = b.to_device(device).unwrap().into_trainable();
            let (y, stats) = batch_norm_train(&tape, &xd, &wd, &bd, EPS).unwrap();
            let grads = tape.backward_from(&y, dy.to_device(device).unwrap()).unwrap();
            let grad = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
            let eval = batch_norm_forward(&xd, &wd, &bd, &stats.mean, &stats.var, EPS).unwrap().to_vec().unwrap();
            let v = |t: &Tensor| t.to_vec().unwrap();
            [v(&y), v(&stats.mean), v(&stats.var), grad(&xd), grad(&wd), grad(&bd), eval]
        };
        let (g, c) = (run(&gpu), run(&Device::Cpu));
        let what = |name: &str| format!("{name} {shape:?} offset {offset} gpu vs cpu");
        let rows = (shape.iter().product::<usize>() / channels) as f32;
        // The GPU's f32 mean is within ~sqrt(rows) u (offset + 2) of the CPU's f64-accumulated one
        // (random-walk rounding over per-chunk sums); 1e-6 * (offset + 2) is well above that.
        let mean_tol = 2e-6 * (offset + 2.0);
        assert_close(&what("mean"), &g[1], &c[1], mean_tol, 0.0);
        // Chan's combine of per-chunk M2s: relative error a few sqrt(rows) u, plus with an offset
        // the chunk means' errors times their spread (see a_large_common_offset...).
        let var_rtol = if offset == 0.0 { 2e-5 } else { 3e-4 };
        assert_close(&what("var"), &g[2], &c[2], 0.0, var_rtol);
        // y and the normalisation with given statistics: the mean's error times rstd (~0.9), and
        // the variance's relative error (x0.5) times |xhat| <= 2.
        for k in [0, 6] {
            assert_close(&what("y"), &g[k], &c[k], 2.0 * mean_tol + 1e-5, 1e-5);
        }
        // dbias: sums of `rows` terms |dy| <= 1 in different orders: ~sqrt(rows) u rows.
        let sum_tol = 4.0 * rows.sqrt() * 6e-8 * rows;
        assert_close(&what("dbias"), &g[5], &c[5], sum_tol, 0.0);
        // dweight likewise with |dy xhat| <= 2, plus the mean's error through xhat.
        assert_close(&what("dweight"), &g[4], &c[4], 2.0 * sum_tol + mean_tol * rows, 0.0);
        // dx: dy minus the two means (each with the sums' error / rows) times w rstd.
        assert_close(&what("dx"), &g[3], &c[3], 2.0 * mean_tol + 1e-5, 1e-4);
    }
}

#[test]
fn bad_shapes_are_refused_and_named() {
    let cpu = Device::Cpu;
    let z = |shape: &[usize]| Tensor::zeros(shape, &cpu).unwrap();
    let o = |shape: &[usize]| Tensor::ones(shape, &cpu).unwrap();
    let tape = Tape::inference();
    let err = batch_norm_train(&tape, &z(&[4]), &o(&[4]), &z(&[4]), EPS).unwrap_err().to_string();
    assert!(err.contains("[4]") && err.contains("rank 2"), "{err}");
    let err = batch_norm_train(&tape, &z(&[2, 3, 3, 4]), &o(&[3]), &z(&[4]), EPS).unwrap_err().to_string();
    assert!(err.contains("weight") && err.contains("[3]") && err.contains("[2, 3, 3, 4]"), "{err}");
    let err = batch_norm_train(&tape, &z(&[2, 3, 3, 4]), &o(&[4]), &z(&[1, 4]), EPS).unwrap_err().to_string();
    assert!(err.contains("bias") && err.contains("[1, 4]"), "{err}");
    let err =
        batch_norm_eval(&tape, &z(&[2, 3, 3, 4]), &o(&[4]), &z(&[4]), &z(&[4]), &o(&[5]), EPS).unwrap_err().to_string();
    assert!(err.contains("variance") && err.contains("[5]") && err.contains("[2, 3, 3, 4]"), "{err}");
    let stats = BatchStats { mean: z(&[4]), var: o(&[4]), count: 10 };
    let err = batch_norm_running_update(&z(&[4]), &o(&[3]), &stats, 0.1).unwrap_err().to_string();
    assert!(err.contains("running_var") && err.contains("[3]"), "{err}");
    let err = batch_norm_stats(&z(&[0, 4])).unwrap_err().to_string();
    assert!(err.contains("[0, 4]"), "{err}");
}
