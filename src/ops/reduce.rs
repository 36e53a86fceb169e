//! Reductions: sum and mean over the last dimension or over the whole tensor, and L2
//! normalisation of the last dimension.
//! Kernels: `kernels/reduce.cu`. Tests: `tests/reduce.rs`.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::{cuda_output, cuda_slice, launch, same_device};
use crate::cuda::{launch_elements, launch_rows, CudaDevice, KernelFamily, BLOCK};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::{host_buffer, numel, Tensor};

/// `x.sum(dim=-1)`: shape `[..., C]` to `[...]`.
pub fn sum_last(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let y = sum_last_forward(x)?;
    let shape = x.shape().to_vec();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(sum_last_backward(dy, &shape)?)])))
}

/// `x.mean(dim=-1)`: shape `[..., C]` to `[...]`.
pub fn mean_last(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let y = mean_last_forward(x)?;
    let shape = x.shape().to_vec();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(mean_last_backward(dy, &shape)?)])))
}

/// `x.sum()`: a scalar (shape `[]`); 0 for an empty tensor.
pub fn sum_all(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let y = sum_all_forward(x)?;
    let shape = x.shape().to_vec();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(sum_all_backward(dy, &shape)?)])))
}

/// `x.mean()`: a scalar (shape `[]`). An empty tensor is an error.
pub fn mean_all(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let y = mean_all_forward(x)?;
    let shape = x.shape().to_vec();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(mean_all_backward(dy, &shape)?)])))
}

/// `x / x.norm(dim=-1, keepdim=True)`, with no epsilon (an all-zero row gives NaN, as in the
/// reference implementation).
pub fn l2_normalize_last(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let (y, norm) = l2_normalize_forward(x)?;
    let saved = y.clone();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(l2_normalize_backward(&saved, &norm, dy)?)])))
}

/// Rows and columns of an input reduced over its last dimension.
fn rows_cols(op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
    if x.rank() == 0 || x.dim(-1) == 0 {
        return Err(Error::shape(op, format!("needs a non-empty last dimension, got shape {:?}", x.shape())));
    }
    let cols = x.dim(-1);
    to_i32(op, cols)?;
    Ok((x.numel() / cols, cols))
}

/// A size passed to a kernel as `int`.
fn to_i32(op: &'static str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::shape(op, format!("size {n} exceeds the kernels' 32-bit limit")))
}

/// Threads per row: enough to keep a warp busy on short rows without idling on long ones.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(4).next_power_of_two() as u32).clamp(32, 1024)
}

/// Untracked `x.sum(dim=-1)`.
pub fn sum_last_forward(x: &Tensor) -> Result<Tensor> {
    scaled_row_sums("sum_last", x, |_| 1.0)
}

/// Untracked `x.mean(dim=-1)`.
pub fn mean_last_forward(x: &Tensor) -> Result<Tensor> {
    scaled_row_sums("mean_last", x, |cols| 1.0 / cols as f64)
}

/// Untracked gradient of `sum_last` for an input of shape `input_shape`: `dy` repeated along the
/// last dimension.
pub fn sum_last_backward(dy: &Tensor, input_shape: &[usize]) -> Result<Tensor> {
    broadcast_last("sum_last_backward", dy, input_shape, |_| 1.0)
}

/// Untracked gradient of `mean_last`: `dy / C` repeated along the last dimension.
pub fn mean_last_backward(dy: &Tensor, input_shape: &[usize]) -> Result<Tensor> {
    broadcast_last("mean_last_backward", dy, input_shape, |cols| 1.0 / cols as f64)
}

/// `scale(C) * sum` of each row; rows are summed in f64 on the CPU.
fn scaled_row_sums(op: &'static str, x: &Tensor, scale: impl Fn(usize) -> f64) -> Result<Tensor> {
    let (rows, cols) = rows_cols(op, x)?;
    let scale = scale(cols);
    let out_shape = &x.shape()[..x.rank() - 1];
    match same_device(op, &[x])? {
        Device::Cpu => {
            let y = x
                .cpu_data(op)?
                .par_chunks(cols)
                .map(|row| (row.iter().map(|&v| v as f64).sum::<f64>() * scale) as f32)
                .collect();
            Tensor::from_vec(y, out_shape)
        }
        Device::Cuda(dev) => {
            if rows == 0 {
                return Tensor::zeros(out_shape, &x.device());
            }
            let f = dev.function(KernelFamily::Reduce, "sum_rows")?;
            let mut y = dev.alloc(rows)?;
            let (cols_i, scale_f) = (cols as i32, scale as f32); // cols fits: checked by rows_cols
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut y).arg(cuda_slice(x)?).arg(&cols_i).arg(&scale_f);
            // SAFETY: arguments match `sum_rows(float* y, const float* x, int cols, float scale)`;
            // x holds rows*cols floats, y rows.
            launch("sum_rows", unsafe { b.launch(launch_rows(rows, row_threads(cols))?) })?;
            Ok(cuda_output(&dev, y, out_shape))
        }
    }
}

/// `dx[..., c] = scale(C) * dy[...]` for an input of shape `input_shape = [..., C]`.
fn broadcast_last(
    op: &'static str,
    dy: &Tensor,
    input_shape: &[usize],
    scale: impl Fn(usize) -> f64,
) -> Result<Tensor> {
    if input_shape.is_empty() || dy.shape() != &input_shape[..input_shape.len() - 1] {
        return Err(Error::shape(
            op,
            format!("gradient {:?} does not fit input {input_shape:?} reduced over its last dimension", dy.shape()),
        ));
    }
    let cols = input_shape[input_shape.len() - 1];
    broadcast_rows(op, dy, input_shape, cols, scale(cols) as f32)
}

/// `dx[i] = scale * dy[i / cols]`, shaped `shape` (the backward of every sum and mean here).
fn broadcast_rows(op: &'static str, dy: &Tensor, shape: &[usize], cols: usize, scale: f32) -> Result<Tensor> {
    let n = numel(shape);
    match same_device(op, &[dy])? {
        Device::Cpu => {
            let dys = dy.cpu_data(op)?;
            let dx = (0..n).map(|i| dys[i / cols] * scale).collect();
            Tensor::from_vec(dx, shape)
        }
        Device::Cuda(dev) => {
            if n == 0 {
                return Tensor::zeros(shape, &dy.device());
            }
            let f = dev.function(KernelFamily::Reduce, "broadcast_rows")?;
            let mut dx = dev.alloc(n)?;
            let (n_i, cols_i) = (n as i64, cols as i64);
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dx).arg(cuda_slice(dy)?).arg(&n_i).arg(&cols_i).arg(&scale);
            // SAFETY: arguments match `broadcast_rows(float* dx, const float* dy, long n,
            // long cols, float scale)`; dx holds n floats and dy n / cols (checked by callers).
            launch("broadcast_rows", unsafe { b.launch(launch_elements(n)) })?;
            Ok(cuda_output(&dev, dx, shape))
        }
    }
}

/// Untracked `x.sum()`.
pub fn sum_all_forward(x: &Tensor) -> Result<Tensor> {
    scaled_total("sum_all", x, 1.0)
}

/// Untracked `x.mean()`.
pub fn mean_all_forward(x: &Tensor) -> Result<Tensor> {
    if x.numel() == 0 {
        return Err(Error::shape("mean_all", format!("cannot take the mean of empty shape {:?}", x.shape())));
    }
    scaled_total("mean_all", x, 1.0 / x.numel() as f64)
}

/// Untracked gradient of `sum_all`: the scalar `dy` everywhere in `input_shape`.
pub fn sum_all_backward(dy: &Tensor, input_shape: &[usize]) -> Result<Tensor> {
    broadcast_scalar("sum_all_backward", dy, input_shape, 1.0)
}

/// Untracked gradient of `mean_all`: `dy / numel` everywhere in `input_shape`.
pub fn mean_all_backward(dy: &Tensor, input_shape: &[usize]) -> Result<Tensor> {
    broadcast_scalar("mean_all_backward", dy, input_shape, 1.0 / numel(input_shape).max(1) as f64)
}

fn broadcast_scalar(op: &'static str, dy: &Tensor, input_shape: &[usize], scale: f64) -> Result<Tensor> {
    if dy.numel() != 1 {
        return Err(Error::shape(
            op,
            format!("gradient of a whole-tensor reduction must be a scalar, got {:?}", dy.shape()),
        ));
    }
    broadcast_rows(op, dy, input_shape, numel(input_shape).max(1), scale as f32)
}

/// Elements summed per CPU chunk; chunk sums are then added in order, so the result does not
/// depend on how rayon schedules the chunks.
const CPU_SUM_CHUNK: usize = 1 << 16;
/// Most blocks of the first pass of the GPU whole-tensor sum (the second pass is one block).
const SUM_ALL_MAX_BLOCKS: usize = 1024;

/// `scale * sum(x)` as a scalar: f64 chunk sums on the CPU; on the GPU a grid-stride pass to at
/// most `SUM_ALL_MAX_BLOCKS` partial sums and a one-block pass over those (deterministic).
fn scaled_total(op: &'static str, x: &Tensor, scale: f64) -> Result<Tensor> {
    let n = x.numel();
    match same_device(op, &[x])? {
        Device::Cpu => {
            let chunk_sums: Vec<f64> =
                x.cpu_data(op)?.par_chunks(CPU_SUM_CHUNK).map(|c| c.iter().map(|&v| v as f64).sum()).collect();
            Tensor::from_vec(vec![(chunk_sums.iter().sum::<f64>() * scale) as f32], &[])
        }
        Device::Cuda(dev) => {
            let blocks = n.div_ceil(BLOCK as usize).clamp(1, SUM_ALL_MAX_BLOCKS);
            let mut partial = dev.alloc(blocks)?;
            let n_i = n as i64;
            let f = dev.function(KernelFamily::Reduce, "sum_all_partial")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut partial).arg(cuda_slice(x)?).arg(&n_i);
            let config =
                LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: arguments match `sum_all_partial(float* partial, const float* x, long n)`;
            // x holds n floats, partial one per block of the grid.
            launch("sum_all_partial", unsafe { b.launch(config) })?;

            scaled_sum_cuda(&dev, &partial, blocks, scale)
        }
    }
}

/// `scale * sum(values[..count])` as a scalar tensor, by the one-block `sum_all_finish` (the
/// second pass of every full reduction, the losses' means included).
pub(crate) fn scaled_sum_cuda(
    dev: &Arc<CudaDevice>,
    values: &CudaSlice<f32>,
    count: usize,
    scale: f64,
) -> Result<Tensor> {
    let count_i = i32::try_from(count)
        .map_err(|_| Error::shape("sum_all", format!("{count} partial sums exceed the kernel's 32-bit count")))?;
    let mut out = dev.alloc(1)?;
    let scale_f = scale as f32;
    let f = dev.function(KernelFamily::Reduce, "sum_all_finish")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out).arg(values).arg(&count_i).arg(&scale_f);
    // SAFETY: arguments match `sum_all_finish(float* out, const float* partial, int count,
    // float scale)`; values holds at least `count` floats, out one.
    launch("sum_all_finish", unsafe { b.launch(launch_rows(1, BLOCK)?) })?;
    Ok(cuda_output(dev, out, &[]))
}

/// Untracked L2 normalisation of the last dimension: `(x / norm, norm)`, `norm` shaped like `x`
/// without its last dimension.
pub fn l2_normalize_forward(x: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "l2_normalize";
    let (rows, cols) = rows_cols(OP, x)?;
    let norm_shape = &x.shape()[..x.rank() - 1];
    match same_device(OP, &[x])? {
        Device::Cpu => {
            let xs = x.cpu_data(OP)?;
            let mut y = host_buffer(xs.len());
            let mut norm = vec![0.0f32; rows];
            y.par_chunks_mut(cols).zip(xs.par_chunks(cols)).zip(norm.par_iter_mut()).for_each(|((yr, xr), n)| {
                *n = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt() as f32;
                yr.iter_mut().zip(xr).for_each(|(out, &v)| *out = v / *n);
            });
            Ok((Tensor::from_vec(y, x.shape())?, Tensor::from_vec(norm, norm_shape)?))
        }
        Device::Cuda(dev) => {
            if rows == 0 {
                return Ok((Tensor::zeros(x.shape(), &x.device())?, Tensor::zeros(norm_shape, &x.device())?));
            }
            let f = dev.function(KernelFamily::Reduce, "l2_normalize_forward")?;
            let (mut y, mut norm) = (dev.alloc(x.numel())?, dev.alloc(rows)?);
            let cols_i = cols as i32; // fits: checked by rows_cols
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut y).arg(&mut norm).arg(cuda_slice(x)?).arg(&cols_i);
            // SAFETY: arguments match `l2_normalize_forward(float* y, float* norm, const float* x,
            // int cols)`; x and y hold rows*cols floats, norm rows.
            launch("l2_normalize_forward", unsafe { b.launch(launch_rows(rows, row_threads(cols))?) })?;
            Ok((cuda_output(&dev, y, x.shape()), cuda_output(&dev, norm, norm_shape)))
        }
    }
}

/// Untracked backward of L2 normalisation from its output `y` and the row norms:
/// `dx = (dy - y * sum(dy * y)) / norm` per row.
pub fn l2_normalize_backward(y: &Tensor, norm: &Tensor, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "l2_normalize_backward";
    let (rows, cols) = rows_cols(OP, y)?;
    if dy.shape() != y.shape() || norm.shape() != &y.shape()[..y.rank() - 1] {
        return Err(Error::shape(
            OP,
            format!("gradient {:?} and norm {:?} do not fit output {:?}", dy.shape(), norm.shape(), y.shape()),
        ));
    }
    match same_device(OP, &[y, norm, dy])? {
        Device::Cpu => {
            let (ys, ns, dys) = (y.cpu_data(OP)?, norm.cpu_data(OP)?, dy.cpu_data(OP)?);
            let mut dx = host_buffer(ys.len());
            dx.par_chunks_mut(cols).zip(ys.par_chunks(cols).zip(dys.par_chunks(cols))).zip(ns.par_iter()).for_each(
                |((dxr, (yr, dyr)), &n)| {
                    let dot: f64 = yr.iter().zip(dyr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    for ((out, &yv), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
                        *out = ((g as f64 - yv as f64 * dot) / n as f64) as f32;
                    }
                },
            );
            Tensor::from_vec(dx, y.shape())
        }
        Device::Cuda(dev) => {
            if rows == 0 {
                return Tensor::zeros(y.shape(), &y.device());
            }
            let f = dev.function(KernelFamily::Reduce, "l2_normalize_backward")?;
            let mut dx = dev.alloc(y.numel())?;
            let cols_i = cols as i32; // fits: checked by rows_cols
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dx).arg(cuda_slice(y)?).arg(cuda_slice(norm)?).arg(cuda_slice(dy)?).arg(&cols_i);
            // SAFETY: arguments match `l2_normalize_backward(float* dx, const float* y,
            // const float* norm, const float* dy, int cols)`; dx, y and dy hold rows*cols floats,
            // norm rows.
            launch("l2_normalize_backward", unsafe { b.launch(launch_rows(rows, row_threads(cols))?) })?;
            Ok(cuda_output(&dev, dx, y.shape()))
        }
    }
}
