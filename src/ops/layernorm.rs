//! LayerNorm over the last dimension (PyTorch semantics: biased variance, `eps` inside the square
//! root) and the fused residual add + LayerNorm of transformer blocks.
//! Kernels: `kernels/layernorm.cu`. Tests: `tests/layernorm.rs`.

use std::sync::Arc;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::{cuda_output, cuda_slice, launch, same_device, NULL_DEVICE_PTR};
use crate::cuda::{launch_elements, launch_rows, CudaDevice, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::fastmath;
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

/// Per-row statistics saved by the forward pass for the backward pass. Both have the shape of
/// the input without its last dimension.
#[derive(Clone, Debug)]
pub struct LayerNormStats {
    pub mean: Tensor,
    /// `1 / sqrt(var + eps)`.
    pub rstd: Tensor,
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension of `x`; `weight` and
/// `bias` have shape `[C]`, `C` being that dimension. All three inputs are differentiable.
pub fn layer_norm(tape: &Tape, x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    let (y, stats) = layer_norm_forward(x, weight, bias, eps)?;
    Ok(record_layer_norm(tape, y, x, weight, bias, stats))
}

/// The residual add fused with the LayerNorm that follows it: returns `(s, y)` with
/// `s = x + residual` and `y = layer_norm(s)`, both computed by one kernel.
///
/// Either output, or both, may be used later (a pre-LN block keeps `s` as its residual stream, a
/// post-LN block only `y`). The tape sees two entries, `s = x + residual` and `y = LN(s)`, so the
/// gradient reaching `s` from later ops and the one coming back through `y` are added by the
/// tape before flowing on to `x` and `residual`.
pub fn add_layer_norm(
    tape: &Tape,
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let (s, y, stats) = add_layer_norm_forward(x, residual, weight, bias, eps)?;
    let s = tape.record(s, &[x, residual], |ds| Ok(vec![Some(ds.clone()), Some(ds.clone())]));
    let y = record_layer_norm(tape, y, &s, weight, bias, stats);
    Ok((s, y))
}

/// Records `y = LN(normalized)` on the tape; backward computes only the gradients that are needed.
fn record_layer_norm(
    tape: &Tape,
    y: Tensor,
    normalized: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: LayerNormStats,
) -> Tensor {
    let needs = (normalized.needs_grad(), weight.needs_grad(), bias.needs_grad());
    let (saved_x, saved_weight) = (normalized.clone(), weight.clone());
    tape.record(y, &[normalized, weight, bias], move |dy| {
        let dx = if needs.0 { Some(layer_norm_backward_input(&saved_x, &saved_weight, &stats, dy)?) } else { None };
        let (dweight, dbias) = if needs.1 || needs.2 {
            let (dw, db) = layer_norm_backward_params(&saved_x, &stats, dy)?;
            (needs.1.then_some(dw), needs.2.then_some(db))
        } else {
            (None, None)
        };
        Ok(vec![dx, dweight, dbias])
    })
}

/// Rows and columns of a LayerNorm input with `[C]`-shaped weight and bias.
fn check_affine(op: &'static str, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<(usize, usize)> {
    if x.rank() == 0 || x.dim(-1) == 0 {
        return Err(Error::shape(op, format!("needs a non-empty last dimension, got input of shape {:?}", x.shape())));
    }
    let cols = x.dim(-1);
    if weight.shape() != [cols] || bias.shape() != [cols] {
        return Err(Error::shape(
            op,
            format!(
                "weight {:?} and bias {:?} must both have shape [{cols}] for input of shape {:?}",
                weight.shape(),
                bias.shape(),
                x.shape()
            ),
        ));
    }
    to_i32(op, cols)?;
    Ok((x.numel() / cols, cols))
}

/// A size passed to a kernel as `int`.
fn to_i32(op: &'static str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::shape(op, format!("size {n} exceeds the kernels' 32-bit limit")))
}

/// The shape of one statistic per row: the input's shape without its last dimension.
fn stats_shape(x: &Tensor) -> Vec<usize> {
    x.shape()[..x.rank() - 1].to_vec()
}

/// Threads per row: about four columns per thread, at least one warp, at most 1024.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(4).next_power_of_two() as u32).clamp(32, 1024)
}

/// Untracked LayerNorm forward: the output and the per-row statistics the backward needs.
pub fn layer_norm_forward(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<(Tensor, LayerNormStats)> {
    let (rows, cols) = check_affine("layer_norm", x, weight, bias)?;
    match same_device("layer_norm", &[x, weight, bias])? {
        Device::Cpu => cpu_forward(x.cpu_data("layer_norm")?, weight, bias, cols, eps, x),
        Device::Cuda(dev) => {
            let (y, _, stats) = cuda_forward(&dev, x, None, weight, bias, rows, cols, eps)?;
            Ok((y, stats))
        }
    }
}

/// Untracked fused forward: `(s, y, stats)` with `s = x + residual`, `y = LN(s)`, and the
/// statistics of `s`.
pub fn add_layer_norm_forward(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, LayerNormStats)> {
    if x.shape() != residual.shape() {
        return Err(Error::shape(
            "add_layer_norm",
            format!("input {:?} and residual {:?} must have the same shape", x.shape(), residual.shape()),
        ));
    }
    let (rows, cols) = check_affine("add_layer_norm", x, weight, bias)?;
    match same_device("add_layer_norm", &[x, residual, weight, bias])? {
        Device::Cpu => {
            let (xs, rs) = (x.cpu_data("add_layer_norm")?, residual.cpu_data("add_layer_norm")?);
            let sum: Vec<f32> = xs.par_iter().zip(rs).map(|(a, b)| a + b).collect();
            let (y, stats) = cpu_forward(&sum, weight, bias, cols, eps, x)?;
            Ok((Tensor::from_vec(sum, x.shape())?, y, stats))
        }
        Device::Cuda(dev) => {
            let (y, s, stats) = cuda_forward(&dev, x, Some(residual), weight, bias, rows, cols, eps)?;
            // Invariant: cuda_forward returns the sum whenever it was given a residual.
            Ok((s.expect("the fused kernel writes the sum"), y, stats))
        }
    }
}

/// CPU reference: normalises each row of `xs` (shaped like `like`). Statistics are accumulated
/// in f64, with the variance taken around the mean (two passes) for rows with a large offset.
fn cpu_forward(
    xs: &[f32],
    weight: &Tensor,
    bias: &Tensor,
    cols: usize,
    eps: f32,
    like: &Tensor,
) -> Result<(Tensor, LayerNormStats)> {
    let (w, b) = (weight.cpu_data("layer_norm")?, bias.cpu_data("layer_norm")?);
    let rows = xs.len() / cols;
    let (mut y, mut mean, mut rstd) = (host_buffer(xs.len()), vec![0.0f32; rows], vec![0.0f32; rows]);
    y.par_chunks_mut(cols).zip(xs.par_chunks(cols)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(
        |((yr, xr), (mean_out, rstd_out))| {
            let mu = fastmath::sum_f64(xr) / cols as f64;
            let var = fastmath::zip_sum_f64(xr, xr, move |v, _| (v as f64 - mu).powi(2)) / cols as f64;
            let rs = 1.0 / (var + eps as f64).sqrt();
            fastmath::vectorised(move || {
                for (((out, &x), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                    *out = ((x as f64 - mu) * rs) as f32 * w + b;
                }
            });
            *mean_out = mu as f32;
            *rstd_out = rs as f32;
        },
    );
    let shape = stats_shape(like);
    let stats = LayerNormStats { mean: Tensor::from_vec(mean, &shape)?, rstd: Tensor::from_vec(rstd, &shape)? };
    Ok((Tensor::from_vec(y, like.shape())?, stats))
}

/// Launches `layer_norm_forward`; returns `(y, s, stats)` where `s` is the sum when a residual
/// was given.
#[allow(clippy::too_many_arguments)]
fn cuda_forward(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    bias: &Tensor,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<(Tensor, Option<Tensor>, LayerNormStats)> {
    let shape = stats_shape(x);
    if rows == 0 {
        let empty = || Tensor::zeros(x.shape(), &x.device());
        let stats =
            LayerNormStats { mean: Tensor::zeros(&shape, &x.device())?, rstd: Tensor::zeros(&shape, &x.device())? };
        return Ok((empty()?, residual.map(|_| empty()).transpose()?, stats));
    }
    let f = dev.function(KernelFamily::Layernorm, "layer_norm_forward")?;
    let (mut y, mut mean, mut rstd) = (dev.alloc(x.numel())?, dev.alloc(rows)?, dev.alloc(rows)?);
    let mut sum = residual.map(|_| dev.alloc(x.numel())).transpose()?;
    let cols_i = cols as i32; // fits: checked by check_affine
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut y);
    match sum.as_mut() {
        Some(s) => b.arg(s),
        None => b.arg(&NULL_DEVICE_PTR),
    };
    b.arg(&mut mean).arg(&mut rstd).arg(cuda_slice(x)?);
    match residual {
        Some(r) => b.arg(cuda_slice(r)?),
        None => b.arg(&NULL_DEVICE_PTR),
    };
    b.arg(cuda_slice(weight)?).arg(cuda_slice(bias)?).arg(&cols_i).arg(&eps);
    // SAFETY: arguments match `layer_norm_forward(float* y, float* sum_out, float* mean,
    // float* rstd, const float* x, const float* residual, const float* weight, const float* bias,
    // int cols, float eps)`; y, sum_out (or null), x and residual (or null) hold rows*cols floats,
    // mean and rstd hold rows, weight and bias hold cols.
    launch("layer_norm_forward", unsafe { b.launch(launch_rows(rows, row_threads(cols))?) })?;
    let stats = LayerNormStats { mean: cuda_output(dev, mean, &shape), rstd: cuda_output(dev, rstd, &shape) };
    Ok((cuda_output(dev, y, x.shape()), sum.map(|s| cuda_output(dev, s, x.shape())), stats))
}

/// Checks the saved statistics and the output gradient against the normalised input `x`.
fn check_backward(op: &'static str, x: &Tensor, stats: &LayerNormStats, dy: &Tensor) -> Result<(usize, usize)> {
    if x.rank() == 0 || x.dim(-1) == 0 {
        return Err(Error::shape(op, format!("needs a non-empty last dimension, got input of shape {:?}", x.shape())));
    }
    let shape = stats_shape(x);
    if dy.shape() != x.shape() || stats.mean.shape() != shape || stats.rstd.shape() != shape {
        return Err(Error::shape(
            op,
            format!(
                "gradient {:?}, mean {:?} and rstd {:?} do not fit input {:?}",
                dy.shape(),
                stats.mean.shape(),
                stats.rstd.shape(),
                x.shape()
            ),
        ));
    }
    let cols = x.dim(-1);
    to_i32(op, cols)?;
    Ok((x.numel() / cols, cols))
}

/// Untracked gradient of the normalised input:
/// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` per row, with `g = dy * weight`.
pub fn layer_norm_backward_input(x: &Tensor, weight: &Tensor, stats: &LayerNormStats, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "layer_norm_backward";
    let (rows, cols) = check_backward(OP, x, stats, dy)?;
    if weight.shape() != [cols] {
        return Err(Error::shape(
            OP,
            format!("weight {:?} must have shape [{cols}] for input {:?}", weight.shape(), x.shape()),
        ));
    }
    match same_device(OP, &[x, weight, &stats.mean, &stats.rstd, dy])? {
        Device::Cpu => {
            let (xs, w, dys) = (x.cpu_data(OP)?, weight.cpu_data(OP)?, dy.cpu_data(OP)?);
            let (mean, rstd) = (stats.mean.cpu_data(OP)?, stats.rstd.cpu_data(OP)?);
            let mut dx = host_buffer(xs.len());
            dx.par_chunks_mut(cols).zip(xs.par_chunks(cols).zip(dys.par_chunks(cols))).enumerate().for_each(
                |(row, (dxr, (xr, dyr)))| {
                    let (mu, rs) = (mean[row] as f64, rstd[row] as f64);
                    let xhat = move |x: f32| (x as f64 - mu) * rs;
                    let g = move |dy: f32, w: f32| dy as f64 * w as f64;
                    let g_mean = fastmath::zip_sum_f64(dyr, w, g) / cols as f64;
                    let gx_mean = fastmath::zip3_sum_f64(dyr, w, xr, |dy, w, x| g(dy, w) * xhat(x)) / cols as f64;
                    fastmath::vectorised(move || {
                        for (((out, &dy), &w), &x) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
                            *out = (rs * (g(dy, w) - g_mean - xhat(x) * gx_mean)) as f32;
                        }
                    });
                },
            );
            Tensor::from_vec(dx, x.shape())
        }
        Device::Cuda(dev) => {
            if rows == 0 {
                return Tensor::zeros(x.shape(), &x.device());
            }
            let f = dev.function(KernelFamily::Layernorm, "layer_norm_backward_input")?;
            let mut dx = dev.alloc(x.numel())?;
            let cols_i = cols as i32; // fits: checked by check_backward
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dx)
                .arg(cuda_slice(x)?)
                .arg(cuda_slice(weight)?)
                .arg(cuda_slice(&stats.mean)?)
                .arg(cuda_slice(&stats.rstd)?)
                .arg(cuda_slice(dy)?)
                .arg(&cols_i);
            // SAFETY: arguments match `layer_norm_backward_input(float* dx, const float* x,
            // const float* weight, const float* mean, const float* rstd, const float* dy, int cols)`;
            // dx, x and dy hold rows*cols floats, mean and rstd rows, weight cols.
            launch("layer_norm_backward_input", unsafe { b.launch(launch_rows(rows, row_threads(cols))?) })?;
            Ok(cuda_output(&dev, dx, x.shape()))
        }
    }
}

/// Rows summed per block (in parallel chunks) by the weight/bias gradient reduction, before the
/// per-chunk partial sums are added up in order. Keeps both the CPU and GPU results deterministic.
const PARAM_ROWS_PER_CHUNK: usize = 64;
/// At most this many chunks, so the GPU's partial buffers and grid stay bounded for huge inputs.
const PARAM_MAX_CHUNKS: usize = 4096;
/// Threads per block along the rows in `layer_norm_param_grads_partial` (its PARAM_ROWS_PER_PASS).
const PARAM_ROWS_PER_PASS: u32 = 8;

/// Untracked gradients of weight and bias: `(sum_rows(dy * xhat), sum_rows(dy))`.
pub fn layer_norm_backward_params(x: &Tensor, stats: &LayerNormStats, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "layer_norm_backward";
    let (rows, cols) = check_backward(OP, x, stats, dy)?;
    let chunks = rows.div_ceil(PARAM_ROWS_PER_CHUNK).clamp(1, PARAM_MAX_CHUNKS);
    let rows_per_chunk = rows.div_ceil(chunks).max(1);
    match same_device(OP, &[x, &stats.mean, &stats.rstd, dy])? {
        Device::Cpu => {
            let (xs, dys) = (x.cpu_data(OP)?, dy.cpu_data(OP)?);
            let (mean, rstd) = (stats.mean.cpu_data(OP)?, stats.rstd.cpu_data(OP)?);
            let chunk_len = rows_per_chunk * cols;
            let partials: Vec<(Vec<f64>, Vec<f64>)> = xs
                .par_chunks(chunk_len)
                .zip(dys.par_chunks(chunk_len))
                .enumerate()
                .map(|(chunk, (xc, dyc))| {
                    let (mut dw, mut db) = (vec![0.0f64; cols], vec![0.0f64; cols]);
                    for (i, (xr, dyr)) in xc.chunks(cols).zip(dyc.chunks(cols)).enumerate() {
                        let row = chunk * rows_per_chunk + i;
                        let (mu, rs) = (mean[row] as f64, rstd[row] as f64);
                        for c in 0..cols {
                            dw[c] += dyr[c] as f64 * (xr[c] as f64 - mu) * rs;
                            db[c] += dyr[c] as f64;
                        }
                    }
                    (dw, db)
                })
                .collect();
            let (mut dw, mut db) = (vec![0.0f64; cols], vec![0.0f64; cols]);
            for (pw, pb) in &partials {
                dw.iter_mut().zip(pw).for_each(|(t, p)| *t += p);
                db.iter_mut().zip(pb).for_each(|(t, p)| *t += p);
            }
            let to_f32 = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect();
            Ok((Tensor::from_vec(to_f32(dw), &[cols])?, Tensor::from_vec(to_f32(db), &[cols])?))
        }
        Device::Cuda(dev) => {
            if rows == 0 {
                return Ok((Tensor::zeros(&[cols], &x.device())?, Tensor::zeros(&[cols], &x.device())?));
            }
            let (rows_i, cols_i, chunks_i, per_chunk_i) =
                (to_i32(OP, rows)?, cols as i32, chunks as i32, rows_per_chunk as i32);
            let (mut partial_dw, mut partial_db) = (dev.alloc(chunks * cols)?, dev.alloc(chunks * cols)?);
            let f = dev.function(KernelFamily::Layernorm, "layer_norm_param_grads_partial")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut partial_dw)
                .arg(&mut partial_db)
                .arg(cuda_slice(x)?)
                .arg(cuda_slice(&stats.mean)?)
                .arg(cuda_slice(&stats.rstd)?)
                .arg(cuda_slice(dy)?)
                .arg(&rows_i)
                .arg(&cols_i)
                .arg(&per_chunk_i);
            let config = LaunchConfig {
                grid_dim: (cols.div_ceil(32) as u32, chunks as u32, 1),
                block_dim: (32, PARAM_ROWS_PER_PASS, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match `layer_norm_param_grads_partial(float* partial_dw,
            // float* partial_db, const float* x, const float* mean, const float* rstd,
            // const float* dy, int rows, int cols, int rows_per_chunk)`; the partial buffers hold
            // chunks*cols floats and chunks*rows_per_chunk >= rows, x and dy hold rows*cols,
            // mean and rstd rows; the block is (32, PARAM_ROWS_PER_PASS) as the kernel expects.
            launch("layer_norm_param_grads_partial", unsafe { b.launch(config) })?;

            let (mut dw, mut db) = (dev.alloc(cols)?, dev.alloc(cols)?);
            let f = dev.function(KernelFamily::Layernorm, "layer_norm_param_grads_finish")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dw).arg(&mut db).arg(&partial_dw).arg(&partial_db).arg(&chunks_i).arg(&cols_i);
            // SAFETY: arguments match `layer_norm_param_grads_finish(float* dweight, float* dbias,
            // const float* partial_dw, const float* partial_db, int chunks, int cols)`; dweight and
            // dbias hold cols floats, the partial buffers chunks*cols (all written above).
            launch("layer_norm_param_grads_finish", unsafe { b.launch(launch_elements(cols)) })?;
            Ok((cuda_output(&dev, dw, &[cols]), cuda_output(&dev, db, &[cols])))
        }
    }
}

/// Untracked full backward: `(dx, dweight, dbias)` for the normalised input `x`.
pub fn layer_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    stats: &LayerNormStats,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dx = layer_norm_backward_input(x, weight, stats, dy)?;
    let (dweight, dbias) = layer_norm_backward_params(x, stats, dy)?;
    Ok((dx, dweight, dbias))
}
