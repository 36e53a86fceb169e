//! Spatial ops of the decoder (docs/model.md §3):
//! - the ScaleBlock's depthwise `Conv2d(C, C, 3, padding=1, groups=C, bias=False)`, on NHWC
//!   activations (the decoder runs channels-last) with the PyTorch weight layout `[C, 1, 3, 3]`;
//! - `F.interpolate(mode="bilinear", align_corners=False)` on NCHW tensors (the final 56 -> 224
//!   upsampling of the logits), with PyTorch's f32 source-index rule.
//!
//! Kernels: `kernels/spatial.cu`. Tests: `tests/spatial.rs`. Every backward is deterministic: no
//! atomics on the GPU and fixed summation orders on the CPU.

use std::ops::Range;

use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use super::{cuda_output, cuda_slice, kernel_int, launch, same_device};
use crate::cuda::{launch_elements, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::fastmath;
use crate::tape::Tape;
use crate::tensor::{host_buffer, host_zeros, Tensor};

// ------------------------------------------------------------------------------------------------
// Depthwise 3x3 convolution, NHWC
// ------------------------------------------------------------------------------------------------

/// Depthwise 3x3 convolution with zero padding 1 and stride 1 on channels-last activations:
/// `y[b,h,w,c] = sum_{i,j} x[b, h+i-1, w+j-1, c] * weight[c, 0, i, j]` (cross-correlation, as
/// PyTorch). `x` is `[B, H, W, C]`, `weight` is `[C, 1, 3, 3]`; the output has the shape of `x`.
pub fn depthwise_conv3x3_nhwc(tape: &Tape, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let y = depthwise_conv3x3_nhwc_forward(x, weight)?;
    // Keep only what the backward will read alive on the tape.
    let x_for_weight_grad = weight.needs_grad().then(|| x.clone());
    let weight_for_input_grad = x.needs_grad().then(|| weight.clone());
    Ok(tape.record(y, &[x, weight], move |dy| {
        let dx = weight_for_input_grad.map(|w| depthwise_conv3x3_nhwc_backward_input(dy, &w)).transpose()?;
        let dweight = x_for_weight_grad.map(|x| depthwise_conv3x3_nhwc_backward_weight(dy, &x)).transpose()?;
        Ok(vec![dx, dweight])
    }))
}

/// Sizes of an NHWC activation.
#[derive(Copy, Clone, Debug)]
struct Nhwc {
    batch: usize,
    height: usize,
    width: usize,
    channels: usize,
}

impl Nhwc {
    fn of(op: &'static str, t: &Tensor) -> Result<Nhwc> {
        match *t.shape() {
            [batch, height, width, channels] => Ok(Nhwc { batch, height, width, channels }),
            _ => Err(Error::shape(op, format!("expects an NHWC activation [B, H, W, C], got shape {:?}", t.shape()))),
        }
    }

    /// The kernels' `(batch, height, width, channels)` arguments.
    fn kernel_args(self, op: &'static str) -> Result<[i32; 4]> {
        Ok([
            kernel_int(op, "batch", self.batch)?,
            kernel_int(op, "height", self.height)?,
            kernel_int(op, "width", self.width)?,
            kernel_int(op, "channels", self.channels)?,
        ])
    }
}

/// Checks that `weight` is the `[C, 1, 3, 3]` depthwise kernel for an activation of `act_shape`.
fn check_depthwise_weight(op: &'static str, act: Nhwc, act_shape: &[usize], weight: &Tensor) -> Result<()> {
    if weight.shape() != [act.channels, 1, 3, 3] {
        return Err(Error::shape(
            op,
            format!(
                "weight of shape {:?} does not fit activation {act_shape:?}: expected [{}, 1, 3, 3]",
                weight.shape(),
                act.channels
            ),
        ));
    }
    Ok(())
}

/// Untracked depthwise 3x3 forward (CPU reference or CUDA kernel).
pub fn depthwise_conv3x3_nhwc_forward(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    const OP: &str = "depthwise_conv3x3_nhwc";
    let dims = Nhwc::of(OP, x)?;
    check_depthwise_weight(OP, dims, x.shape(), weight)?;
    depthwise_dispatch(OP, "depthwise3x3_nhwc_forward", dims, x, weight, TapDirection::Forward)
}

/// Untracked gradient of the input: the same stencil with the kernel mirrored,
/// `dx[b,h,w,c] = sum_{i,j} dy[b, h+1-i, w+1-j, c] * weight[c, 0, i, j]`.
pub fn depthwise_conv3x3_nhwc_backward_input(dy: &Tensor, weight: &Tensor) -> Result<Tensor> {
    const OP: &str = "depthwise_conv3x3_nhwc_backward_input";
    let dims = Nhwc::of(OP, dy)?;
    check_depthwise_weight(OP, dims, dy.shape(), weight)?;
    depthwise_dispatch(OP, "depthwise3x3_nhwc_backward_input", dims, dy, weight, TapDirection::Mirrored)
}

/// Whether tap `(i, j)` reads the pixel at offset `(i-1, j-1)` (forward) or `(1-i, 1-j)` (the
/// input gradient, a correlation with the mirrored kernel).
#[derive(Copy, Clone)]
enum TapDirection {
    Forward,
    Mirrored,
}

impl TapDirection {
    /// Row or column offset read by tap index `k` in `0..3`.
    fn offset(self, k: usize) -> isize {
        match self {
            TapDirection::Forward => k as isize - 1,
            TapDirection::Mirrored => 1 - k as isize,
        }
    }
}

fn depthwise_dispatch(
    op: &'static str,
    kernel: &'static str,
    dims: Nhwc,
    input: &Tensor,
    weight: &Tensor,
    direction: TapDirection,
) -> Result<Tensor> {
    let device = same_device(op, &[input, weight])?;
    if input.numel() == 0 {
        return Tensor::zeros(input.shape(), &device);
    }
    match device {
        Device::Cpu => {
            let out = depthwise_cpu(dims, input.cpu_data(op)?, weight.cpu_data(op)?, direction);
            Tensor::from_vec(out, input.shape())
        }
        Device::Cuda(dev) => {
            let f = dev.function(KernelFamily::Spatial, kernel)?;
            let mut out = dev.alloc(input.numel())?;
            let [b, h, w, c] = dims.kernel_args(op)?;
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut out).arg(cuda_slice(input)?).arg(cuda_slice(weight)?);
            builder.arg(&b).arg(&h).arg(&w).arg(&c);
            // SAFETY: arguments match `(float*, const float*, const float*, int, int, int, int)`;
            // `out` and `input` hold B*H*W*C floats and `weight` holds C*9 (shapes checked above).
            launch(kernel, unsafe { builder.launch(launch_elements(input.numel())) })?;
            Ok(cuda_output(&dev, out, input.shape()))
        }
    }
}

/// The `[C, 1, 3, 3]` weight regrouped tap-major, `[9][C]`, so the inner loops run over
/// contiguous channels of both the activation and the weight.
fn weight_by_tap(weight: &[f32], channels: usize) -> Vec<f32> {
    let mut by_tap = vec![0.0f32; 9 * channels];
    for c in 0..channels {
        for tap in 0..9 {
            by_tap[tap * channels + c] = weight[c * 9 + tap];
        }
    }
    by_tap
}

/// The image row `h + offset`, or `None` when it falls in the padding.
fn shifted(index: usize, offset: isize, size: usize) -> Option<usize> {
    index.checked_add_signed(offset).filter(|&i| i < size)
}

/// CPU reference of the stencil; one image row per rayon task. Taps are accumulated in the order
/// (0,0), (0,1), ..., (2,2), the order the CUDA kernel uses.
fn depthwise_cpu(dims: Nhwc, input: &[f32], weight: &[f32], direction: TapDirection) -> Vec<f32> {
    let Nhwc { height, width, channels, .. } = dims;
    let taps = weight_by_tap(weight, channels);
    let mut out = host_buffer(input.len());
    out.par_chunks_mut(width * channels).enumerate().for_each(|(row, out_row)| {
        let h = row % height;
        let image_first_row = row - h;
        // The channel loops run at the CPU's vector width (the crate is built for baseline x86-64).
        fastmath::vectorised(
            #[inline(always)]
            || {
                for w in 0..width {
                    let out_pixel = &mut out_row[w * channels..][..channels];
                    out_pixel.fill(0.0);
                    for i in 0..3 {
                        let Some(hh) = shifted(h, direction.offset(i), height) else { continue };
                        for j in 0..3 {
                            let Some(ww) = shifted(w, direction.offset(j), width) else { continue };
                            let in_pixel = &input[((image_first_row + hh) * width + ww) * channels..][..channels];
                            let tap = &taps[(i * 3 + j) * channels..][..channels];
                            for ((o, &v), &k) in out_pixel.iter_mut().zip(in_pixel).zip(tap) {
                                *o += v * k;
                            }
                        }
                    }
                }
            },
        );
    });
    out
}

/// Untracked gradient of the weight:
/// `dweight[c, 0, i, j] = sum_{b,h,w} dy[b,h,w,c] * x[b, h+i-1, w+j-1, c]`.
pub fn depthwise_conv3x3_nhwc_backward_weight(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "depthwise_conv3x3_nhwc_backward_weight";
    let dims = Nhwc::of(OP, x)?;
    if dy.shape() != x.shape() {
        return Err(Error::shape(OP, format!("gradient {:?} differs from input {:?}", dy.shape(), x.shape())));
    }
    let weight_shape = [dims.channels, 1, 3, 3];
    let device = same_device(OP, &[dy, x])?;
    if x.numel() == 0 {
        return Tensor::zeros(&weight_shape, &device);
    }
    match device {
        Device::Cpu => {
            let dweight = depthwise_weight_grad_cpu(dims, dy.cpu_data(OP)?, x.cpu_data(OP)?);
            Tensor::from_vec(dweight, &weight_shape)
        }
        Device::Cuda(dev) => {
            let rows = dims.batch * dims.height;
            let (rows_per_chunk, chunks) = weight_grad_chunks(rows, dims.channels);
            let [b, h, w, c] = dims.kernel_args(OP)?;
            let rows_per_chunk_i = kernel_int(OP, "rows per chunk", rows_per_chunk)?;
            let chunks_i = kernel_int(OP, "chunks", chunks)?;
            let len = 9 * dims.channels;
            let len_i = kernel_int(OP, "9 * channels", len)?;

            let partial_kernel = "depthwise3x3_nhwc_weight_partial";
            let f = dev.function(KernelFamily::Spatial, partial_kernel)?;
            let mut partial = dev.alloc(chunks * len)?;
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut partial).arg(cuda_slice(x)?).arg(cuda_slice(dy)?);
            builder.arg(&b).arg(&h).arg(&w).arg(&c).arg(&rows_per_chunk_i).arg(&chunks_i);
            // SAFETY: arguments match `(float*, const float*, const float*, int x6)`; `x` and `dy`
            // hold B*H*W*C floats, `partial` holds chunks*C*9 and the kernel writes all of it
            // (chunks * rows_per_chunk >= B*H, so every chunk index names a thread).
            launch(partial_kernel, unsafe { builder.launch(launch_elements(chunks * dims.channels)) })?;

            let sum_kernel = "sum_chunk_partials";
            let f = dev.function(KernelFamily::Spatial, sum_kernel)?;
            let mut dweight = dev.alloc(len)?;
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut dweight).arg(&partial).arg(&len_i).arg(&chunks_i);
            // SAFETY: arguments match `(float*, const float*, int, int)`; `partial` holds
            // chunks*len floats written above (same stream), `dweight` holds len.
            launch(sum_kernel, unsafe { builder.launch(launch_elements(len)) })?;
            Ok(cuda_output(&dev, dweight, &weight_shape))
        }
    }
}

/// Threads the weight-gradient kernel aims for: about the resident-thread capacity of an H100
/// (132 SMs x 2048), so the per-(chunk, channel) sums fill the GPU without needlessly many partials.
const WEIGHT_GRAD_THREADS: usize = 1 << 18;

/// `(rows_per_chunk, chunks)` covering `rows >= 1` image rows with about
/// `WEIGHT_GRAD_THREADS / channels` chunks.
fn weight_grad_chunks(rows: usize, channels: usize) -> (usize, usize) {
    let wanted = (WEIGHT_GRAD_THREADS / channels.max(1)).clamp(1, rows);
    let rows_per_chunk = rows.div_ceil(wanted);
    (rows_per_chunk, rows.div_ceil(rows_per_chunk))
}

/// CPU reference of the weight gradient: per image row, a `[9][C]` partial sum (in parallel);
/// then the partials added in row order, so the result does not depend on thread scheduling.
fn depthwise_weight_grad_cpu(dims: Nhwc, dy: &[f32], x: &[f32]) -> Vec<f32> {
    let Nhwc { batch, height, width, channels } = dims;
    // Scratch, not a tensor: a pooled buffer would not find its way back to the pool.
    let mut partials = vec![0.0f32; batch * height * 9 * channels];
    partials.par_chunks_mut(9 * channels).enumerate().for_each(|(row, partial)| {
        let h = row % height;
        let image_first_row = row - h;
        fastmath::vectorised(
            #[inline(always)]
            || {
                for i in 0..3 {
                    let Some(hh) = shifted(h, i as isize - 1, height) else { continue };
                    for j in 0..3 {
                        let acc = &mut partial[(i * 3 + j) * channels..][..channels];
                        for w in 0..width {
                            let Some(ww) = shifted(w, j as isize - 1, width) else { continue };
                            let g = &dy[(row * width + w) * channels..][..channels];
                            let xs = &x[((image_first_row + hh) * width + ww) * channels..][..channels];
                            for ((a, &gv), &xv) in acc.iter_mut().zip(g).zip(xs) {
                                *a += gv * xv;
                            }
                        }
                    }
                }
            },
        );
    });
    let mut by_tap = vec![0.0f32; 9 * channels];
    fastmath::vectorised(
        #[inline(always)]
        || {
            for partial in partials.chunks(9 * channels) {
                by_tap.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
            }
        },
    );
    // [9][C] -> the PyTorch layout [C][1][3][3].
    let mut dweight = vec![0.0f32; 9 * channels];
    for tap in 0..9 {
        for c in 0..channels {
            dweight[c * 9 + tap] = by_tap[tap * channels + c];
        }
    }
    dweight
}

// ------------------------------------------------------------------------------------------------
// Bilinear resize, align_corners=False, NCHW
// ------------------------------------------------------------------------------------------------

/// `F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)` for `x` of shape
/// `[N, C, H, W]`; the output is `[N, C, out_h, out_w]`. Up- and downsampling (no antialiasing,
/// like PyTorch's default).
pub fn resize_bilinear_nchw(tape: &Tape, x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let y = resize_bilinear_nchw_forward(x, out_h, out_w)?;
    let (in_h, in_w) = (x.dim(2), x.dim(3));
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(resize_bilinear_nchw_backward(dy, in_h, in_w)?)])))
}

/// How one output index samples the input along one axis: `y = l0 * x[i0] + l1 * x[i1]`.
#[derive(Copy, Clone, Debug)]
struct Taps {
    i0: usize,
    i1: usize,
    l0: f32,
    l1: f32,
}

/// PyTorch's `in / out` as f32 (`area_pixel_compute_scale` without a user scale factor). The GPU
/// launchers pass this same value so both backends sample identical positions.
fn axis_scale(in_size: usize, out_size: usize) -> f32 {
    in_size as f32 / out_size as f32
}

/// PyTorch's `area_pixel_compute_source_index` (align_corners=False) followed by
/// `guard_index_and_lambda`, in f32 and in the same operation order:
/// `src = max(scale * (dst + 0.5) - 0.5, 0)`, `i0 = min(floor(src), in-1)`,
/// `i1 = min(i0 + 1, in-1)`, `l1 = clamp(src - i0, 0, 1)`, `l0 = 1 - l1`.
fn bilinear_taps(dst: usize, in_size: usize, scale: f32) -> Taps {
    let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(in_size - 1);
    let i1 = if i0 + 1 < in_size { i0 + 1 } else { i0 };
    let l1 = (src - i0 as f32).clamp(0.0, 1.0);
    Taps { i0, i1, l0: 1.0 - l1, l1 }
}

fn axis_taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = axis_scale(in_size, out_size);
    (0..out_size).map(|dst| bilinear_taps(dst, in_size, scale)).collect()
}

/// Sizes of one bilinear resize: `planes = N * C` images of `in_h x in_w` to `out_h x out_w`.
#[derive(Copy, Clone, Debug)]
struct Resize {
    planes: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
}

impl Resize {
    fn check(op: &'static str, shape: &[usize], in_hw: (usize, usize), out_hw: (usize, usize)) -> Result<Resize> {
        let (in_h, in_w) = in_hw;
        let (out_h, out_w) = out_hw;
        if in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 {
            return Err(Error::shape(
                op,
                format!(
                    "cannot resize {in_h}x{in_w} to {out_h}x{out_w} (tensor of shape {shape:?}): \
                     sizes must be positive"
                ),
            ));
        }
        Ok(Resize { planes: shape[0] * shape[1], in_h, in_w, out_h, out_w })
    }

    /// The kernels' `(planes, in_h, in_w, out_h, out_w)` arguments.
    fn kernel_args(self, op: &'static str) -> Result<[i32; 5]> {
        Ok([
            kernel_int(op, "N * C", self.planes)?,
            kernel_int(op, "input height", self.in_h)?,
            kernel_int(op, "input width", self.in_w)?,
            kernel_int(op, "output height", self.out_h)?,
            kernel_int(op, "output width", self.out_w)?,
        ])
    }
}

fn nchw_rank(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    if t.rank() != 4 {
        return Err(Error::shape(op, format!("expects an NCHW {what} [N, C, H, W], got shape {:?}", t.shape())));
    }
    Ok(())
}

/// Untracked bilinear resize forward.
pub fn resize_bilinear_nchw_forward(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    resize_bilinear_rows_forward(x, out_h, out_w, 0..out_h)
}

/// Rows `rows` of [`resize_bilinear_nchw_forward`]`(x, out_h, out_w)`, shape `[N, C, rows.len(),
/// out_w]`, bit for bit the same values: a resize to a large size can be made (and consumed) one
/// band of rows at a time. Errors: as the full resize, or a band that is empty or ends past
/// `out_h`.
pub fn resize_bilinear_rows_forward(x: &Tensor, out_h: usize, out_w: usize, rows: Range<usize>) -> Result<Tensor> {
    const OP: &str = "resize_bilinear_nchw";
    nchw_rank(OP, "input", x)?;
    let r = Resize::check(OP, x.shape(), (x.dim(2), x.dim(3)), (out_h, out_w))?;
    if rows.is_empty() || rows.end > out_h {
        return Err(Error::shape(OP, format!("rows {rows:?} are not a band of the {out_h} output rows")));
    }
    let out_shape = [x.dim(0), x.dim(1), rows.len(), out_w];
    match same_device(OP, &[x])? {
        Device::Cpu => Tensor::from_vec(resize_forward_cpu(r, rows, x.cpu_data(OP)?), &out_shape),
        Device::Cuda(dev) => {
            const KERNEL: &str = "resize_bilinear_nchw_forward";
            let f = dev.function(KernelFamily::Spatial, KERNEL)?;
            let out_len: usize = out_shape.iter().product();
            let mut out = dev.alloc(out_len)?;
            let [planes, in_h, in_w, _, out_w_arg] = r.kernel_args(OP)?;
            // Both fit: the band lies inside out_h, which kernel_args checked.
            let (band, first_row) = (rows.len() as i32, rows.start as i32);
            let (scale_h, scale_w) = (axis_scale(r.in_h, r.out_h), axis_scale(r.in_w, r.out_w));
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut out).arg(cuda_slice(x)?);
            builder.arg(&planes).arg(&in_h).arg(&in_w).arg(&band).arg(&out_w_arg);
            builder.arg(&scale_h).arg(&scale_w).arg(&first_row);
            // SAFETY: arguments match `(float*, const float*, int x5, float, float, int)`; the
            // source holds planes*in_h*in_w floats, `out` planes*band*out_w, as `out_shape` says.
            launch(KERNEL, unsafe { builder.launch(launch_elements(out_len)) })?;
            Ok(cuda_output(&dev, out, &out_shape))
        }
    }
}

/// Untracked bilinear resize backward: the gradient of the `[N, C, in_h, in_w]` input given the
/// gradient `dy` of the `[N, C, out_h, out_w]` output. Each input pixel receives, from every output
/// that read it, that output's gradient times the weight it was read with.
pub fn resize_bilinear_nchw_backward(dy: &Tensor, in_h: usize, in_w: usize) -> Result<Tensor> {
    const OP: &str = "resize_bilinear_nchw_backward";
    nchw_rank(OP, "output gradient", dy)?;
    let r = Resize::check(OP, dy.shape(), (in_h, in_w), (dy.dim(2), dy.dim(3)))?;
    let in_shape = [dy.dim(0), dy.dim(1), in_h, in_w];
    resize_dispatch(OP, "resize_bilinear_nchw_backward", r, dy, &in_shape, resize_backward_cpu)
}

/// Runs a resize kernel `(float* out, const float* src, int planes, int in_h, int in_w, int out_h,
/// int out_w, float scale_h, float scale_w)` or its CPU reference `cpu(r, src) -> out`.
fn resize_dispatch(
    op: &'static str,
    kernel: &'static str,
    r: Resize,
    src: &Tensor,
    out_shape: &[usize],
    cpu: fn(Resize, &[f32]) -> Vec<f32>,
) -> Result<Tensor> {
    let device = same_device(op, &[src])?;
    let out_len: usize = out_shape.iter().product();
    if out_len == 0 {
        return Tensor::zeros(out_shape, &device);
    }
    match device {
        Device::Cpu => Tensor::from_vec(cpu(r, src.cpu_data(op)?), out_shape),
        Device::Cuda(dev) => {
            let f = dev.function(KernelFamily::Spatial, kernel)?;
            let mut out = dev.alloc(out_len)?;
            let [planes, in_h, in_w, out_h, out_w] = r.kernel_args(op)?;
            let (scale_h, scale_w) = (axis_scale(r.in_h, r.out_h), axis_scale(r.in_w, r.out_w));
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut out).arg(cuda_slice(src)?);
            builder.arg(&planes).arg(&in_h).arg(&in_w).arg(&out_h).arg(&out_w).arg(&scale_h).arg(&scale_w);
            // SAFETY: arguments match `(float*, const float*, int x5, float, float)`; the source
            // holds planes*H*W floats of its own side, `out` the other side's, as `r` says.
            launch(kernel, unsafe { builder.launch(launch_elements(out_len)) })?;
            Ok(cuda_output(&dev, out, out_shape))
        }
    }
}

/// CPU reference forward of the output rows `band`, one `(n, c)` plane per rayon task:
/// `y = l0y * (l0x * x[y0,x0] + l1x * x[y0,x1]) + l1y * (l0x * x[y1,x0] + l1x * x[y1,x1])`.
fn resize_forward_cpu(r: Resize, band: Range<usize>, x: &[f32]) -> Vec<f32> {
    let (rows, cols) = (axis_taps(r.in_h, r.out_h), axis_taps(r.in_w, r.out_w));
    let rows = &rows[band];
    let mut y = host_buffer(r.planes * rows.len() * r.out_w);
    y.par_chunks_mut(rows.len() * r.out_w).zip(x.par_chunks(r.in_h * r.in_w)).for_each(|(y_plane, x_plane)| {
        for (y_row, ty) in y_plane.chunks_mut(r.out_w).zip(rows) {
            let row0 = &x_plane[ty.i0 * r.in_w..][..r.in_w];
            let row1 = &x_plane[ty.i1 * r.in_w..][..r.in_w];
            for (out, tx) in y_row.iter_mut().zip(&cols) {
                *out = ty.l0 * (tx.l0 * row0[tx.i0] + tx.l1 * row0[tx.i1])
                    + ty.l1 * (tx.l0 * row1[tx.i0] + tx.l1 * row1[tx.i1]);
            }
        }
    });
    y
}

/// CPU reference backward, one plane per rayon task: each output's gradient is scattered to the
/// four input pixels it read, with the weights it read them with.
fn resize_backward_cpu(r: Resize, dy: &[f32]) -> Vec<f32> {
    let (rows, cols) = (axis_taps(r.in_h, r.out_h), axis_taps(r.in_w, r.out_w));
    let mut dx = host_zeros(r.planes * r.in_h * r.in_w);
    dx.par_chunks_mut(r.in_h * r.in_w).zip(dy.par_chunks(r.out_h * r.out_w)).for_each(|(dx_plane, dy_plane)| {
        for (dy_row, ty) in dy_plane.chunks(r.out_w).zip(&rows) {
            for (&g, tx) in dy_row.iter().zip(&cols) {
                for (iy, wy) in [(ty.i0, ty.l0), (ty.i1, ty.l1)] {
                    for (ix, wx) in [(tx.i0, tx.l0), (tx.i1, tx.l1)] {
                        dx_plane[iy * r.in_w + ix] += wy * wx * g;
                    }
                }
            }
        }
    });
    dx
}
