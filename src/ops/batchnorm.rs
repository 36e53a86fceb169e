//! Batch normalisation with PyTorch's `nn.BatchNorm2d` semantics on channels-last activations
//! `[..., C]`: statistics over every dimension but the last, biased variance for normalising,
//! `eps` inside the square root, and the running averages updated with the unbiased variance.
//!
//! Kernels: `kernels/batchnorm.cu`. Tests: `tests/batchnorm.rs`. Per-channel reductions are
//! two-stage (partials over chunks of rows, then a fixed-order combine) on both devices, so
//! results are deterministic; the variance is taken around the mean (Chan's pairwise merge of
//! per-chunk two-pass results on the GPU, two passes in f64 on the CPU), never as
//! `E[x^2] - E[x]^2`, so a large common offset does not cancel the spread away.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::{add_untracked, cuda_output, cuda_slice, kernel_int, launch, same_device, scale_forward, NULL_DEVICE_PTR};
use crate::cuda::{launch_elements, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

/// Per-channel statistics of one batch, as the training forward computed them.
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// `[C]`: the mean over every position of the batch.
    pub mean: Tensor,
    /// `[C]`: the biased variance (divided by `count`), the one the forward normalises with.
    pub var: Tensor,
    /// Values per channel (the product of every dimension but the last).
    pub count: usize,
}

/// The backward's per-channel sums: `sum_dy` is the bias gradient, `sum_dy_xhat` (with
/// `xhat = (x - mean) / sqrt(var + eps)`) the weight gradient.
#[derive(Clone, Debug)]
pub struct BatchNormGradSums {
    pub sum_dy: Tensor,
    pub sum_dy_xhat: Tensor,
}

// ------------------------------------------------------------------------------------------------
// Differentiable ops
// ------------------------------------------------------------------------------------------------

/// Training-mode batch norm: `y = (x - mean) / sqrt(var + eps) * weight + bias` with the batch's
/// per-channel mean and biased variance. `x` is `[..., C]` (e.g. NHWC), `weight` and `bias` `[C]`.
/// Returns the output and the batch statistics (for [`batch_norm_running_update`]). The recorded
/// backward differentiates through the statistics (they depend on `x`). Like PyTorch, a batch with
/// a single value per channel is an error: its variance is 0 and its unbiased variance undefined.
pub fn batch_norm_train(
    tape: &Tape,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<(Tensor, BatchStats)> {
    let (y, stats) = batch_norm_train_forward(x, weight, bias, eps)?;
    let needs = [x.needs_grad(), weight.needs_grad(), bias.needs_grad()];
    let (saved_x, saved_weight, saved_stats) = (x.clone(), weight.clone(), stats.clone());
    let y = tape.record(y, &[x, weight, bias], move |dy| {
        let sums = batch_norm_grad_sums(&saved_x, dy, &saved_stats.mean, &saved_stats.var, eps)?;
        let dx = if needs[0] {
            let (mean, var) = (&saved_stats.mean, &saved_stats.var);
            Some(batch_norm_backward_input(Some(&saved_x), dy, &saved_weight, Some(mean), var, eps, Some(&sums))?)
        } else {
            None
        };
        Ok(vec![dx, needs[1].then_some(sums.sum_dy_xhat), needs[2].then_some(sums.sum_dy)])
    });
    Ok((y, stats))
}

/// Evaluation-mode batch norm: as [`batch_norm_train`] but with the given running statistics
/// (`[C]` each), which are constants: gradients flow to `x`, `weight` and `bias` only.
pub fn batch_norm_eval(
    tape: &Tape,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let y = batch_norm_forward(x, weight, bias, running_mean, running_var, eps)?;
    let needs = [x.needs_grad(), weight.needs_grad(), bias.needs_grad()];
    let saved = (x.clone(), weight.clone(), running_mean.clone(), running_var.clone());
    Ok(tape.record(y, &[x, weight, bias], move |dy| {
        let (x, weight, mean, var) = &saved;
        let dx = needs[0].then(|| batch_norm_backward_input(None, dy, weight, None, var, eps, None)).transpose()?;
        let (dweight, dbias) = if needs[1] || needs[2] {
            let sums = batch_norm_grad_sums(x, dy, mean, var, eps)?;
            (needs[1].then_some(sums.sum_dy_xhat), needs[2].then_some(sums.sum_dy))
        } else {
            (None, None)
        };
        Ok(vec![dx, dweight, dbias])
    }))
}

/// PyTorch's running-statistics update (untracked), returning the new `(running_mean,
/// running_var)`: `new = (1 - momentum) * old + momentum * batch`, where the batch variance fed to
/// the running average is the unbiased one, `var * n / (n - 1)`.
///
/// `n = 1`: PyTorch's `F.batch_norm` refuses to train on one value per channel ("Expected more
/// than 1 value per channel when training"), and its kernels would divide 0 by 0 here. This
/// refuses it too (and [`batch_norm_train`] never produces such statistics).
pub fn batch_norm_running_update(
    running_mean: &Tensor,
    running_var: &Tensor,
    stats: &BatchStats,
    momentum: f32,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "batch_norm_running_update";
    let channels = stats.mean.numel();
    for (what, t) in [("running_mean", running_mean), ("running_var", running_var), ("batch var", &stats.var)] {
        if t.shape() != [channels] || stats.mean.shape() != [channels] {
            return Err(Error::shape(
                OP,
                format!(
                    "{what} has shape {:?}, expected [{channels}] like the batch mean {:?}",
                    t.shape(),
                    stats.mean.shape()
                ),
            ));
        }
    }
    if stats.count < 2 {
        return Err(Error::shape(
            OP,
            format!("the unbiased variance needs more than 1 value per channel, the batch had {}", stats.count),
        ));
    }
    same_device(OP, &[running_mean, running_var, &stats.mean, &stats.var])?;
    let n = stats.count as f64;
    let keep = 1.0 - momentum;
    let mean = add_untracked(&scale_forward(running_mean, keep)?, &scale_forward(&stats.mean, momentum)?)?;
    let unbiased_weight = (momentum as f64 * n / (n - 1.0)) as f32;
    let var = add_untracked(&scale_forward(running_var, keep)?, &scale_forward(&stats.var, unbiased_weight)?)?;
    Ok((mean, var))
}

// ------------------------------------------------------------------------------------------------
// Shapes and work split
// ------------------------------------------------------------------------------------------------

/// `(rows, channels)` of `x` viewed as `[rows, C]`, after checking that every `[C]` tensor in
/// `per_channel` (named) has that shape.
fn check_shapes(op: &'static str, x: &Tensor, per_channel: &[(&str, &Tensor)]) -> Result<(usize, usize)> {
    if x.rank() < 2 || x.dim(-1) == 0 {
        return Err(Error::shape(
            op,
            format!("expects an activation [..., C] of rank 2 or more with C > 0, got shape {:?}", x.shape()),
        ));
    }
    let channels = x.dim(-1);
    for (what, t) in per_channel {
        if t.shape() != [channels] {
            return Err(Error::shape(
                op,
                format!("{what} has shape {:?}, expected [{channels}] for input of shape {:?}", t.shape(), x.shape()),
            ));
        }
    }
    let rows = x.numel() / channels;
    kernel_int(op, "rows (values per channel)", rows)?;
    kernel_int(op, "channels", channels)?;
    Ok((rows, channels))
}

/// Rows a reduction chunk aims for: enough work per block to hide the partial's write.
const ROWS_PER_CHUNK: usize = 64;
/// At most this many chunks: with C = 64 that is 2048 blocks of 256 threads (a full H100), and it
/// bounds the serial combine of stage 2.
const MAX_CHUNKS: usize = 1024;
/// `blockDim.y` of the chunk kernels (`CHUNK_THREADS_Y` in the kernel file).
const CHUNK_THREADS_Y: u32 = 8;

/// `(rows_per_chunk, chunks)` covering `rows >= 1` rows; every chunk is non-empty.
fn chunking(rows: usize) -> (usize, usize) {
    let wanted = rows.div_ceil(ROWS_PER_CHUNK).clamp(1, MAX_CHUNKS);
    let rows_per_chunk = rows.div_ceil(wanted);
    (rows_per_chunk, rows.div_ceil(rows_per_chunk))
}

/// The launch of a chunk kernel: 32 channels by `CHUNK_THREADS_Y` rows a block, one block per
/// (32-channel tile, chunk).
fn chunk_launch(channels: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (channels.div_ceil(32) as u32, chunks as u32, 1),
        block_dim: (32, CHUNK_THREADS_Y, 1),
        shared_mem_bytes: 0,
    }
}

// ------------------------------------------------------------------------------------------------
// Untracked forward
// ------------------------------------------------------------------------------------------------

/// Untracked training forward: the batch statistics, then the normalisation with them.
pub fn batch_norm_train_forward(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<(Tensor, BatchStats)> {
    const OP: &str = "batch_norm_train";
    let (rows, _) = check_shapes(OP, x, &[("weight", weight), ("bias", bias)])?;
    if rows < 2 {
        return Err(Error::shape(
            OP,
            format!(
                "expected more than 1 value per channel when training (as PyTorch), got input of shape {:?}",
                x.shape()
            ),
        ));
    }
    let stats = batch_norm_stats(x)?;
    let y = batch_norm_forward(x, weight, bias, &stats.mean, &stats.var, eps)?;
    Ok((y, stats))
}

/// Untracked per-channel mean and biased variance of `x` (`[..., C]`, at least one value per
/// channel).
pub fn batch_norm_stats(x: &Tensor) -> Result<BatchStats> {
    const OP: &str = "batch_norm_stats";
    let (rows, channels) = check_shapes(OP, x, &[])?;
    if rows == 0 {
        return Err(Error::shape(OP, format!("no values per channel in input of shape {:?}", x.shape())));
    }
    let (rows_per_chunk, chunks) = chunking(rows);
    match same_device(OP, &[x])? {
        Device::Cpu => {
            let (mean, var) = stats_cpu(x.cpu_data(OP)?, channels, rows_per_chunk);
            Ok(BatchStats {
                mean: Tensor::from_vec(mean, &[channels])?,
                var: Tensor::from_vec(var, &[channels])?,
                count: rows,
            })
        }
        Device::Cuda(dev) => {
            // Fit: checked by check_shapes (chunks <= MAX_CHUNKS, rows_per_chunk <= rows).
            let (rows_i, channels_i, per_chunk_i, chunks_i) =
                (rows as i32, channels as i32, rows_per_chunk as i32, chunks as i32);
            let (mut partial_mean, mut partial_m2) = (dev.alloc(chunks * channels)?, dev.alloc(chunks * channels)?);
            let kernel = "batch_norm_stats_partial";
            let f = dev.function(KernelFamily::Batchnorm, kernel)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut partial_mean).arg(&mut partial_m2).arg(cuda_slice(x)?);
            b.arg(&rows_i).arg(&channels_i).arg(&per_chunk_i);
            // SAFETY: arguments match `(float*, float*, const float*, int rows, int channels, int
            // rows_per_chunk)`; x holds rows*C floats, each partial chunks*C, and the grid has one
            // block row per chunk with chunks * rows_per_chunk >= rows.
            launch(kernel, unsafe { b.launch(chunk_launch(channels, chunks)) })?;

            let (mut mean, mut var) = (dev.alloc(channels)?, dev.alloc(channels)?);
            let kernel = "batch_norm_stats_finish";
            let f = dev.function(KernelFamily::Batchnorm, kernel)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut mean).arg(&mut var).arg(&partial_mean).arg(&partial_m2);
            b.arg(&rows_i).arg(&channels_i).arg(&per_chunk_i).arg(&chunks_i);
            // SAFETY: arguments match `(float*, float*, const float*, const float*, int x4)`; mean
            // and var hold C floats, the partials chunks*C, all written by the launch above.
            launch(kernel, unsafe { b.launch(launch_elements(channels)) })?;
            Ok(BatchStats {
                mean: cuda_output(&dev, mean, &[channels]),
                var: cuda_output(&dev, var, &[channels]),
                count: rows,
            })
        }
    }
}

/// Untracked normalisation with given statistics (the batch's or the running ones):
/// `y = (x - mean) / sqrt(var + eps) * weight + bias`, per channel.
pub fn batch_norm_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "batch_norm";
    let (rows, channels) =
        check_shapes(OP, x, &[("weight", weight), ("bias", bias), ("mean", mean), ("variance", var)])?;
    let device = same_device(OP, &[x, weight, bias, mean, var])?;
    if rows == 0 {
        return Tensor::zeros(x.shape(), &device);
    }
    match device {
        Device::Cpu => {
            let (w, b) = (weight.cpu_data(OP)?, bias.cpu_data(OP)?);
            let (mu, rstd) = mean_rstd(mean.cpu_data(OP)?, var.cpu_data(OP)?, eps);
            let xs = x.cpu_data(OP)?;
            let mut y = host_buffer(xs.len());
            y.par_chunks_mut(ROWS_PER_CHUNK * channels).zip(xs.par_chunks(ROWS_PER_CHUNK * channels)).for_each(
                |(yc, xc)| {
                    for (yr, xr) in yc.chunks_mut(channels).zip(xc.chunks(channels)) {
                        for c in 0..channels {
                            yr[c] = ((xr[c] as f64 - mu[c]) * rstd[c]) as f32 * w[c] + b[c];
                        }
                    }
                },
            );
            Tensor::from_vec(y, x.shape())
        }
        Device::Cuda(dev) => {
            let (rows_i, channels_i) = (rows as i32, channels as i32); // fit: check_shapes
            let mut y = dev.alloc(x.numel())?;
            let kernel = "batch_norm_apply";
            let f = dev.function(KernelFamily::Batchnorm, kernel)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut y).arg(cuda_slice(x)?).arg(cuda_slice(mean)?).arg(cuda_slice(var)?);
            b.arg(cuda_slice(weight)?).arg(cuda_slice(bias)?).arg(&eps).arg(&rows_i).arg(&channels_i);
            // SAFETY: arguments match `(float*, const float* x4, const float*, float, int, int)`
            // in that order (y, x, mean, var, weight, bias, eps, rows, channels); y and x hold
            // rows*C floats, the four per-channel tensors C (checked above).
            launch(kernel, unsafe { b.launch(launch_elements(x.numel())) })?;
            Ok(cuda_output(&dev, y, x.shape()))
        }
    }
}

/// The mean and `1 / sqrt(var + eps)` per channel, in f64, for the CPU loops.
fn mean_rstd(mean: &[f32], var: &[f32], eps: f32) -> (Vec<f64>, Vec<f64>) {
    let mu = mean.iter().map(|&m| m as f64).collect();
    let rstd = var.iter().map(|&v| 1.0 / (v as f64 + eps as f64).sqrt()).collect();
    (mu, rstd)
}

/// Per-chunk f64 sums of `f(row, c)` over the rows of each chunk (in parallel), then the chunks
/// added in order: a deterministic column sum of `[rows, C]`.
fn column_sums_f64(
    rows: usize,
    channels: usize,
    rows_per_chunk: usize,
    f: impl Fn(usize, usize) -> f64 + Sync,
) -> Vec<f64> {
    let chunks = rows.div_ceil(rows_per_chunk);
    let partials: Vec<Vec<f64>> = (0..chunks)
        .into_par_iter()
        .map(|chunk| {
            let mut acc = vec![0.0f64; channels];
            for row in chunk * rows_per_chunk..rows.min((chunk + 1) * rows_per_chunk) {
                for (c, a) in acc.iter_mut().enumerate() {
                    *a += f(row, c);
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f64; channels];
    for partial in &partials {
        total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
    }
    total
}

/// CPU reference of the statistics: the mean, then the mean squared deviation from it (two
/// passes, f64 accumulation).
fn stats_cpu(xs: &[f32], channels: usize, rows_per_chunk: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = xs.len() / channels;
    let sums = column_sums_f64(rows, channels, rows_per_chunk, |r, c| xs[r * channels + c] as f64);
    let mean: Vec<f64> = sums.iter().map(|s| s / rows as f64).collect();
    let squares =
        column_sums_f64(rows, channels, rows_per_chunk, |r, c| (xs[r * channels + c] as f64 - mean[c]).powi(2));
    let var = squares.iter().map(|s| (s / rows as f64) as f32).collect();
    (mean.iter().map(|&m| m as f32).collect(), var)
}

// ------------------------------------------------------------------------------------------------
// Untracked backward
// ------------------------------------------------------------------------------------------------

/// Untracked per-channel sums of the backward, `sum(dy)` and `sum(dy * xhat)` with
/// `xhat = (x - mean) / sqrt(var + eps)`: the bias and weight gradients, and what the training
/// input gradient needs.
pub fn batch_norm_grad_sums(
    x: &Tensor,
    dy: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<BatchNormGradSums> {
    const OP: &str = "batch_norm_backward";
    let (rows, channels) = check_shapes(OP, x, &[("mean", mean), ("variance", var)])?;
    check_gradient(OP, x, dy)?;
    let device = same_device(OP, &[x, dy, mean, var])?;
    if rows == 0 {
        let zeros = || Tensor::zeros(&[channels], &device);
        return Ok(BatchNormGradSums { sum_dy: zeros()?, sum_dy_xhat: zeros()? });
    }
    let (rows_per_chunk, chunks) = chunking(rows);
    match device {
        Device::Cpu => {
            let (xs, dys) = (x.cpu_data(OP)?, dy.cpu_data(OP)?);
            let (mu, rstd) = mean_rstd(mean.cpu_data(OP)?, var.cpu_data(OP)?, eps);
            let sum_dy = column_sums_f64(rows, channels, rows_per_chunk, |r, c| dys[r * channels + c] as f64);
            let sum_dy_xhat = column_sums_f64(rows, channels, rows_per_chunk, |r, c| {
                let at = r * channels + c;
                dys[at] as f64 * (xs[at] as f64 - mu[c]) * rstd[c]
            });
            let to_tensor = |v: Vec<f64>| Tensor::from_vec(v.into_iter().map(|s| s as f32).collect(), &[channels]);
            Ok(BatchNormGradSums { sum_dy: to_tensor(sum_dy)?, sum_dy_xhat: to_tensor(sum_dy_xhat)? })
        }
        Device::Cuda(dev) => {
            let (rows_i, channels_i, per_chunk_i, chunks_i) =
                (rows as i32, channels as i32, rows_per_chunk as i32, chunks as i32);
            let (mut partial_dy, mut partial_dy_xhat) = (dev.alloc(chunks * channels)?, dev.alloc(chunks * channels)?);
            let kernel = "batch_norm_grad_sums_partial";
            let f = dev.function(KernelFamily::Batchnorm, kernel)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut partial_dy).arg(&mut partial_dy_xhat).arg(cuda_slice(x)?).arg(cuda_slice(dy)?);
            b.arg(cuda_slice(mean)?).arg(cuda_slice(var)?).arg(&eps);
            b.arg(&rows_i).arg(&channels_i).arg(&per_chunk_i);
            // SAFETY: arguments match `(float*, float*, const float* x4, float, int x3)`; x and dy
            // hold rows*C floats, mean and var C, each partial chunks*C, and the grid has one block
            // row per chunk with chunks * rows_per_chunk >= rows.
            launch(kernel, unsafe { b.launch(chunk_launch(channels, chunks)) })?;

            let (mut sum_dy, mut sum_dy_xhat) = (dev.alloc(channels)?, dev.alloc(channels)?);
            let kernel = "batch_norm_grad_sums_finish";
            let f = dev.function(KernelFamily::Batchnorm, kernel)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut sum_dy).arg(&mut sum_dy_xhat).arg(&partial_dy).arg(&partial_dy_xhat);
            b.arg(&channels_i).arg(&chunks_i);
            // SAFETY: arguments match `(float*, float*, const float*, const float*, int, int)`;
            // the outputs hold C floats, the partials chunks*C, all written above.
            launch(kernel, unsafe { b.launch(launch_elements(channels)) })?;
            Ok(BatchNormGradSums {
                sum_dy: cuda_output(&dev, sum_dy, &[channels]),
                sum_dy_xhat: cuda_output(&dev, sum_dy_xhat, &[channels]),
            })
        }
    }
}

fn check_gradient(op: &'static str, x: &Tensor, dy: &Tensor) -> Result<()> {
    if dy.shape() != x.shape() {
        return Err(Error::shape(op, format!("gradient {:?} does not match input {:?}", dy.shape(), x.shape())));
    }
    Ok(())
}

/// Untracked input gradient. Training mode (`train_sums` given, with the batch statistics, `x` and
/// `mean` given): `dx = weight * rstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n)`, the standard
/// batch-norm backward through the statistics. Evaluation mode (`train_sums` `None`; `x` and
/// `mean` are then not needed): `dx = weight * rstd * dy`, the statistics being constants.
/// `rstd = 1 / sqrt(var + eps)`, `n` the values per channel.
pub fn batch_norm_backward_input(
    x: Option<&Tensor>,
    dy: &Tensor,
    weight: &Tensor,
    mean: Option<&Tensor>,
    var: &Tensor,
    eps: f32,
    train_sums: Option<&BatchNormGradSums>,
) -> Result<Tensor> {
    const OP: &str = "batch_norm_backward";
    let (rows, channels) = check_shapes(OP, dy, &[("weight", weight), ("variance", var)])?;
    let train = match (x, mean, train_sums) {
        (Some(x), Some(mean), Some(sums)) => {
            check_gradient(OP, x, dy)?;
            check_shapes(OP, x, &[("mean", mean), ("sum_dy", &sums.sum_dy), ("sum_dy_xhat", &sums.sum_dy_xhat)])?;
            same_device(OP, &[dy, x, mean, &sums.sum_dy, &sums.sum_dy_xhat])?;
            Some((x, mean, sums))
        }
        (_, _, None) => None,
        _ => return Err(Error::shape(OP, "the training-mode input gradient needs x and the batch mean")),
    };
    let device = same_device(OP, &[dy, weight, var])?;
    if rows == 0 {
        return Tensor::zeros(dy.shape(), &device);
    }
    match device {
        Device::Cpu => {
            let (dys, w) = (dy.cpu_data(OP)?, weight.cpu_data(OP)?);
            let rstd: Vec<f64> = var.cpu_data(OP)?.iter().map(|&v| 1.0 / (v as f64 + eps as f64).sqrt()).collect();
            let mut dx = host_buffer(dys.len());
            let block = ROWS_PER_CHUNK * channels;
            match train {
                None => dx.par_chunks_mut(block).zip(dys.par_chunks(block)).for_each(|(dxc, dyc)| {
                    for (i, (out, &g)) in dxc.iter_mut().zip(dyc).enumerate() {
                        let c = i % channels;
                        *out = (w[c] as f64 * rstd[c] * g as f64) as f32;
                    }
                }),
                Some((x, mean, sums)) => {
                    let (xs, mu) = (x.cpu_data(OP)?, mean.cpu_data(OP)?);
                    let (s_dy, s_dy_xhat) = (sums.sum_dy.cpu_data(OP)?, sums.sum_dy_xhat.cpu_data(OP)?);
                    let n = rows as f64;
                    dx.par_chunks_mut(block).zip(dys.par_chunks(block).zip(xs.par_chunks(block))).for_each(
                        |(dxc, (dyc, xc))| {
                            for (i, (out, (&g, &xv))) in dxc.iter_mut().zip(dyc.iter().zip(xc)).enumerate() {
                                let c = i % channels;
                                let xhat = (xv as f64 - mu[c] as f64) * rstd[c];
                                let centred = g as f64 - s_dy[c] as f64 / n - xhat * (s_dy_xhat[c] as f64 / n);
                                *out = (w[c] as f64 * rstd[c] * centred) as f32;
                            }
                        },
                    );
                }
            }
            Tensor::from_vec(dx, dy.shape())
        }
        Device::Cuda(dev) => {
            let (rows_i, channels_i) = (rows as i32, channels as i32); // fit: check_shapes
            let mut dx = dev.alloc(dy.numel())?;
            let kernel = "batch_norm_backward_input";
            let f = dev.function(KernelFamily::Batchnorm, kernel)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dx);
            match train {
                Some((x, _, _)) => b.arg(cuda_slice(x)?),
                None => b.arg(&NULL_DEVICE_PTR),
            };
            b.arg(cuda_slice(dy)?);
            match train {
                Some((_, mean, _)) => b.arg(cuda_slice(mean)?),
                None => b.arg(&NULL_DEVICE_PTR),
            };
            b.arg(cuda_slice(var)?).arg(cuda_slice(weight)?);
            match train {
                Some((_, _, sums)) => b.arg(cuda_slice(&sums.sum_dy)?).arg(cuda_slice(&sums.sum_dy_xhat)?),
                None => b.arg(&NULL_DEVICE_PTR).arg(&NULL_DEVICE_PTR),
            };
            b.arg(&eps).arg(&rows_i).arg(&channels_i);
            // SAFETY: arguments match `(float* dx, const float* x, const float* dy, const float*
            // mean, const float* var, const float* weight, const float* sum_dy, const float*
            // sum_dy_xhat, float eps, int rows, int channels)`; dx, dy (and x) hold rows*C floats,
            // the per-channel tensors C. In evaluation mode x, mean and both sums are null, and the
            // kernel reads none of them when sum_dy is null.
            launch(kernel, unsafe { b.launch(launch_elements(dy.numel())) })?;
            Ok(cuda_output(&dev, dx, dy.shape()))
        }
    }
}
