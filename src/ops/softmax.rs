//! Row softmax (with an optional additive mask) and log-softmax over the last dimension.
//! Kernels: `kernels/softmax.cu`. Tests: `tests/softmax.rs`.

use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use super::{cuda_output, cuda_slice, launch, same_device, NULL_DEVICE_PTR};
use crate::cuda::{launch_rows, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::fastmath::{self, map_in_place, map_into, zip_map_into};
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

/// Threads per row: enough to keep a warp busy on short rows without idling on long ones.
fn row_threads(cols: usize) -> u32 {
    (cols.next_power_of_two() as u32).clamp(32, 1024)
}

/// `softmax(x + mask)` over the last dimension. `mask`, when given, has shape `[groups, cols]`
/// and is added to consecutive blocks of `rows / groups` rows (an attention padding mask of shape
/// `[batch, keys]` over scores laid out `[batch, heads, queries, keys]`). The mask gets no gradient.
pub fn softmax_last(tape: &Tape, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let y = softmax_forward(x, mask)?;
    let saved = y.clone();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(softmax_backward(&saved, dy)?)])))
}

/// `log(softmax(x))` over the last dimension, computed stably.
pub fn log_softmax_last(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let y = log_softmax_forward(x)?;
    let saved = y.clone();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(log_softmax_backward(&saved, dy)?)])))
}

fn rows_cols(op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
    // A launch always has at least one block, so empty tensors are refused rather than launched.
    if x.rank() == 0 || x.numel() == 0 {
        return Err(Error::shape(op, format!("needs a non-empty tensor of rank >= 1, got shape {:?}", x.shape())));
    }
    let cols = x.dim(-1);
    Ok((x.numel() / cols, cols))
}

/// Softmax of one row in place on the CPU; returns the row's max and the sum of its shifted
/// exponentials, from which a caller gets the log-sum-exp (`max + ln(sum)`).
pub(crate) fn softmax_row_in_place(row: &mut [f32]) -> (f32, f32) {
    let max = fastmath::max(row);
    map_in_place(row, move |v| fastmath::exp(v - max));
    // The denominator in f64, as the other CPU references accumulate: the most accurate order
    // keeps the CPU path nearest the exact maths that both sides approximate.
    let sum = fastmath::sum_f64(row) as f32;
    let inv = 1.0 / sum;
    map_in_place(row, move |v| v * inv);
    (max, sum)
}

/// Untracked softmax forward (CPU reference or CUDA kernel).
pub fn softmax_forward(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (rows, cols) = rows_cols("softmax", x)?;
    let rows_per_mask_row = match mask {
        None => rows,
        Some(m) => {
            let groups = if m.rank() == 0 { 0 } else { m.numel() / m.dim(-1) };
            if m.rank() == 0 || m.dim(-1) != cols || groups == 0 || rows % groups != 0 {
                return Err(Error::shape(
                    "softmax",
                    format!("mask of shape {:?} does not fit scores of shape {:?}", m.shape(), x.shape()),
                ));
            }
            rows / groups
        }
    };
    let mut inputs = vec![x];
    inputs.extend(mask);
    match same_device("softmax", &inputs)? {
        Device::Cpu => {
            let xs = x.cpu_data("softmax")?;
            let ms = mask.map(|m| m.cpu_data("softmax")).transpose()?;
            let mut y = host_buffer(xs.len());
            y.par_chunks_mut(cols).zip(xs.par_chunks(cols)).enumerate().for_each(|(row, (yr, xr))| {
                match ms {
                    Some(m) => zip_map_into(yr, xr, &m[(row / rows_per_mask_row) * cols..][..cols], |v, a| v + a),
                    None => yr.copy_from_slice(xr),
                }
                softmax_row_in_place(yr);
            });
            Tensor::from_vec(y, x.shape())
        }
        Device::Cuda(dev) => {
            let f = dev.function(KernelFamily::Softmax, "softmax_forward")?;
            let mut y = dev.alloc(x.numel())?;
            let (cols_i, per_i) = (cols as i32, rows_per_mask_row as i32);
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut y).arg(cuda_slice(x)?);
            match mask {
                Some(m) => b.arg(cuda_slice(m)?),
                None => b.arg(&NULL_DEVICE_PTR),
            };
            b.arg(&cols_i).arg(&per_i);
            // SAFETY: arguments match `softmax_forward(float*, const float*, const float*, int, int)`;
            // y and x hold rows*cols floats, the mask (or null) holds rows/rows_per_mask_row*cols.
            launch("softmax_forward", unsafe { b.launch(launch_rows(rows, row_threads(cols))?) })?;
            Ok(cuda_output(&dev, y, x.shape()))
        }
    }
}

/// Untracked softmax backward: `dx = y * (dy - sum(dy * y))` per row.
pub fn softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    row_backward("softmax_backward", y, dy, |yr, dyr, dxr| {
        let dot = fastmath::zip_sum(yr, dyr, |a, b| a * b);
        zip_map_into(dxr, yr, dyr, move |yv, g| yv * (g - dot));
    })
}

/// Untracked log-softmax forward.
pub fn log_softmax_forward(x: &Tensor) -> Result<Tensor> {
    let (rows, cols) = rows_cols("log_softmax", x)?;
    match same_device("log_softmax", &[x])? {
        Device::Cpu => {
            let xs = x.cpu_data("log_softmax")?;
            let mut y = host_buffer(xs.len());
            y.par_chunks_mut(cols).zip(xs.par_chunks(cols)).for_each(|(yr, xr)| {
                let max = fastmath::max(xr);
                map_into(yr, xr, move |v| fastmath::exp(v - max));
                let shift = max + fastmath::sum(yr).ln();
                map_into(yr, xr, move |v| v - shift);
            });
            Tensor::from_vec(y, x.shape())
        }
        Device::Cuda(dev) => {
            let f = dev.function(KernelFamily::Softmax, "log_softmax_forward")?;
            let mut y = dev.alloc(x.numel())?;
            let cols_i = cols as i32;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut y).arg(cuda_slice(x)?).arg(&cols_i);
            // SAFETY: arguments match `log_softmax_forward(float*, const float*, int)`; both
            // buffers hold rows*cols floats.
            launch("log_softmax_forward", unsafe { b.launch(launch_rows(rows, row_threads(cols))?) })?;
            Ok(cuda_output(&dev, y, x.shape()))
        }
    }
}

/// Untracked log-softmax backward: `dx = dy - exp(y) * sum(dy)` per row.
pub fn log_softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    row_backward("log_softmax_backward", y, dy, |yr, dyr, dxr| {
        let sum = fastmath::sum(dyr);
        zip_map_into(dxr, yr, dyr, move |yv, g| g - fastmath::exp(yv) * sum);
    })
}

/// Shared shape checks and dispatch of the two backward kernels, which take `(dx, y, dy, cols)`.
fn row_backward(
    kernel: &'static str,
    y: &Tensor,
    dy: &Tensor,
    cpu_row: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Result<Tensor> {
    if y.shape() != dy.shape() {
        return Err(Error::shape(kernel, format!("gradient {:?} differs from output {:?}", dy.shape(), y.shape())));
    }
    let (rows, cols) = rows_cols(kernel, y)?;
    match same_device(kernel, &[y, dy])? {
        Device::Cpu => {
            let (ys, dys) = (y.cpu_data(kernel)?, dy.cpu_data(kernel)?);
            let mut dx = host_buffer(ys.len());
            dx.par_chunks_mut(cols)
                .zip(ys.par_chunks(cols).zip(dys.par_chunks(cols)))
                .for_each(|(dxr, (yr, dyr))| cpu_row(yr, dyr, dxr));
            Tensor::from_vec(dx, y.shape())
        }
        Device::Cuda(dev) => {
            let f = dev.function(KernelFamily::Softmax, kernel)?;
            let mut dx = dev.alloc(y.numel())?;
            let cols_i = cols as i32;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dx).arg(cuda_slice(y)?).arg(cuda_slice(dy)?).arg(&cols_i);
            // SAFETY: arguments match `{softmax,log_softmax}_backward(float*, const float*,
            // const float*, int)`; all three buffers hold rows*cols floats.
            launch(kernel, unsafe { b.launch(launch_rows(rows, row_threads(cols))?) })?;
            Ok(cuda_output(&dev, dx, y.shape()))
        }
    }
}
