//! Dense 2-D convolutions on NHWC activations with PyTorch weight layouts, for the CNN branch of
//! VLSM-Ensemble (a UNet):
//! - `nn.Conv2d(Cin, Cout, k)` with k = 3 (zero padding 1) or k = 1, stride 1: im2col + GEMM for
//!   k = 3, a plain GEMM over pixels for k = 1;
//! - `nn.ConvTranspose2d(Cin, Cout, kernel_size=2, stride=2)`: one GEMM to every pixel's 2x2
//!   block, interleaved into place.
//!
//! The arithmetic is in the GEMMs (`ops::matmul_forward` / `ops::linear_forward`: cuBLAS on the
//! GPU, the `gemm` crate on the CPU); `kernels/conv.cu` only moves data, and every gradient is a
//! GEMM or a gather, so results are deterministic. Tests: `tests/conv.rs`.

use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use super::{
    add_untracked, column_sums, concat_forward, cuda_output, cuda_slice, kernel_int, launch, linear_forward,
    matmul_forward, narrow_forward, permute_forward, repeat_rows_forward, same_device, MatmulOpts, NULL_DEVICE_PTR,
};
use crate::cuda::{launch_elements, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

/// The most floats of im2col columns a 3x3 convolution holds at once (64 Mi floats, 256 MiB):
/// the batch is processed in chunks of whole images that fit, at least one image per chunk. The
/// backward's column gradient (for dx) and recomputed columns (for dW) are chunked the same way,
/// one after the other.
pub const CONV_COLUMN_BUDGET: usize = 64 << 20;

// ------------------------------------------------------------------------------------------------
// Shapes
// ------------------------------------------------------------------------------------------------

/// The `[B, H, W, C]` sizes of an NHWC tensor, or an error naming `what` and its shape.
fn nhwc_dims(op: &'static str, what: &str, t: &Tensor) -> Result<[usize; 4]> {
    match *t.shape() {
        [b, h, w, c] => Ok([b, h, w, c]),
        _ => Err(Error::shape(op, format!("expects an NHWC {what} [B, H, W, C], got shape {:?}", t.shape()))),
    }
}

/// Checks that `bias` is `[outputs]`.
fn check_bias(op: &'static str, bias: Option<&Tensor>, outputs: usize, weight: &Tensor) -> Result<()> {
    match bias {
        Some(b) if b.shape() != [outputs] => Err(Error::shape(
            op,
            format!("bias {:?} does not match the {outputs} output channels of weight {:?}", b.shape(), weight.shape()),
        )),
        _ => Ok(()),
    }
}

/// Checks that an output gradient has the output's shape.
fn check_dy(op: &'static str, dy: &Tensor, out_shape: &[usize]) -> Result<()> {
    if dy.shape() != out_shape {
        return Err(Error::shape(
            op,
            format!("output gradient {:?} does not match the output shape {out_shape:?}", dy.shape()),
        ));
    }
    Ok(())
}

/// The sizes of one `nn.Conv2d` on NHWC activations.
#[derive(Copy, Clone, Debug)]
struct Conv {
    batch: usize,
    height: usize,
    width: usize,
    cin: usize,
    cout: usize,
    /// Kernel size: 1 or 3.
    k: usize,
}

impl Conv {
    /// Checks `x` `[B, H, W, Cin]` against `weight` `[Cout, Cin, k, k]` with k in {1, 3}.
    fn of(op: &'static str, x: &Tensor, weight: &Tensor) -> Result<Conv> {
        let [batch, height, width, cin] = nhwc_dims(op, "input", x)?;
        let [cout, k] = match *weight.shape() {
            [cout, wc, k, k2] if wc == cin && k == k2 && (k == 1 || k == 3) => [cout, k],
            _ => {
                return Err(Error::shape(
                    op,
                    format!(
                        "weight {:?} does not fit input {:?}: expected [Cout, {cin}, k, k] with k = 1 or 3",
                        weight.shape(),
                        x.shape()
                    ),
                ))
            }
        };
        Ok(Conv { batch, height, width, cin, cout, k })
    }

    fn pixels(&self) -> usize {
        self.batch * self.height * self.width
    }

    fn in_shape(&self) -> [usize; 4] {
        [self.batch, self.height, self.width, self.cin]
    }

    fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.height, self.width, self.cout]
    }

    fn weight_shape(&self) -> [usize; 4] {
        [self.cout, self.cin, self.k, self.k]
    }

    /// No multiply-adds at all: the output is the bias alone and every gradient but the bias's is
    /// zero. Taken before any kernel or GEMM so that none runs on an empty operand.
    fn is_degenerate(&self) -> bool {
        self.pixels() == 0 || self.cin == 0 || self.cout == 0
    }

    /// Whole images per chunk so that their im2col columns fit in `max_column_floats` (at
    /// least one image, at most the batch).
    fn images_per_chunk(&self, max_column_floats: usize) -> usize {
        let per_image = (self.height * self.width * 9 * self.cin).max(1);
        (max_column_floats / per_image).clamp(1, self.batch.max(1))
    }

    /// `(first image, images)` of each chunk, in batch order.
    fn chunks(&self, max_column_floats: usize) -> Vec<(usize, usize)> {
        let per = self.images_per_chunk(max_column_floats);
        (0..self.batch).step_by(per).map(|first| (first, per.min(self.batch - first))).collect()
    }

    /// The kernels' `(images, height, width, channels)` arguments for a chunk of `images`; also
    /// checks the sizes the kernels index with `int`.
    fn kernel_args(&self, op: &'static str, images: usize) -> Result<[i32; 4]> {
        kernel_int(op, "9 * input channels", 9 * self.cin)?;
        kernel_int(op, "batch", self.batch)?;
        Ok([
            kernel_int(op, "images", images)?,
            kernel_int(op, "height", self.height)?,
            kernel_int(op, "width", self.width)?,
            kernel_int(op, "input channels", self.cin)?,
        ])
    }
}

/// The rows of `t` (an NHWC tensor with `channels` channels) that belong to images
/// `first .. first + images`, as a `[pixels, channels]` matrix: a view when that is the whole
/// batch, else a copy.
fn image_rows(t: &Tensor, batch: usize, first: usize, images: usize) -> Result<Tensor> {
    let channels = t.dim(-1);
    let rows = t.numel() / channels.max(1) / batch.max(1) * images;
    let part = if first == 0 && images == batch { t.clone() } else { narrow_forward(t, 0, first, images)? };
    part.view_as(&[rows, channels])
}

// ------------------------------------------------------------------------------------------------
// Conv2d, k = 1 or 3
// ------------------------------------------------------------------------------------------------

/// `nn.Conv2d(Cin, Cout, k, padding=k/2)` with stride 1 on channels-last activations:
/// `y[b,h,w,o] = bias[o] + sum_{c,ky,kx} x[b, h+ky-k/2, w+kx-k/2, c] * weight[o,c,ky,kx]`
/// (cross-correlation as PyTorch, taps outside the image reading zero). `x` is `[B, H, W, Cin]`,
/// `weight` `[Cout, Cin, k, k]` with k = 1 or 3, `bias` `[Cout]`; the output is `[B, H, W, Cout]`.
pub fn conv2d_nhwc(tape: &Tape, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = conv2d_nhwc_forward(x, weight, bias)?;
    let c = Conv::of("conv2d_nhwc", x, weight)?;
    Ok(record_with_bias(tape, y, x, weight, bias, move |dy, x, weight| {
        let dx = weight.map(|w| conv2d_input_grad(c, dy, w, CONV_COLUMN_BUDGET)).transpose()?;
        let dw = x.map(|x| conv2d_weight_grad(c, dy, x, CONV_COLUMN_BUDGET)).transpose()?;
        Ok((dx, dw))
    }))
}

/// Records `y = op(x, weight) + bias` on the tape. Only what the backward reads stays alive: x for
/// the weight gradient, the weight for the input gradient. `grads(dy, x, weight)` returns
/// `(dx, dweight)`, each asked for by passing the operand it needs; the bias gradient is the
/// column sums of `dy`.
fn record_with_bias(
    tape: &Tape,
    y: Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    grads: impl FnOnce(&Tensor, Option<&Tensor>, Option<&Tensor>) -> Result<(Option<Tensor>, Option<Tensor>)> + 'static,
) -> Tensor {
    let x_for_weight_grad = weight.needs_grad().then(|| x.clone());
    let weight_for_input_grad = x.needs_grad().then(|| weight.clone());
    let bias_needs_grad = bias.is_some_and(|b| b.needs_grad());
    let has_bias = bias.is_some();
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    tape.record(y, &inputs, move |dy| {
        let (dx, dw) = grads(dy, x_for_weight_grad.as_ref(), weight_for_input_grad.as_ref())?;
        let db = bias_needs_grad.then(|| column_sums(dy)).transpose()?;
        // One gradient per recorded input: the bias is an input only when given.
        Ok(if has_bias { vec![dx, dw, db] } else { vec![dx, dw] })
    })
}

/// Untracked [`conv2d_nhwc`].
pub fn conv2d_nhwc_forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    conv2d_nhwc_forward_chunked(x, weight, bias, CONV_COLUMN_BUDGET)
}

/// [`conv2d_nhwc_forward`] with the im2col columns of a 3x3 convolution limited to
/// `max_column_floats` at a time instead of [`CONV_COLUMN_BUDGET`] (whole images per chunk, at
/// least one). Every output row is the same dot products whatever the chunking (only the GEMM
/// library's blocking for another row count could move last bits); small budgets exist to test
/// the chunked path on small shapes.
pub fn conv2d_nhwc_forward_chunked(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    max_column_floats: usize,
) -> Result<Tensor> {
    const OP: &str = "conv2d_nhwc";
    let c = Conv::of(OP, x, weight)?;
    check_bias(OP, bias, c.cout, weight)?;
    let device = same_device(OP, &[x, weight].into_iter().chain(bias).collect::<Vec<_>>())?;
    if c.is_degenerate() {
        return match bias {
            Some(b) if c.pixels() > 0 => repeat_rows_forward(b, c.pixels())?.view_as(&c.out_shape()),
            _ => Tensor::zeros(&c.out_shape(), &device),
        };
    }
    if c.k == 1 {
        return linear_forward(x, &weight.view_as(&[c.cout, c.cin])?, bias);
    }
    let w_rows = weight_taps_last(weight)?;
    let mut pieces = Vec::new();
    for (first, images) in c.chunks(max_column_floats) {
        let cols = im2col(OP, c, x, first, images)?;
        let y = linear_forward(&cols, &w_rows, bias)?;
        pieces.push(y.view_as(&[images, c.height, c.width, c.cout])?);
    }
    match pieces.len() {
        1 => Ok(pieces.pop().expect("one piece")),
        _ => concat_forward(&pieces.iter().collect::<Vec<_>>(), 0),
    }
}

/// Untracked gradients of [`conv2d_nhwc`] for x, weight and bias (each only when asked for),
/// given the output gradient `dy` `[B, H, W, Cout]`.
pub fn conv2d_nhwc_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    conv2d_nhwc_backward_chunked(x, weight, dy, need_x, need_weight, need_bias, CONV_COLUMN_BUDGET)
}

/// [`conv2d_nhwc_backward`] with the column buffers limited to `max_column_floats` (as
/// [`conv2d_nhwc_forward_chunked`]). The weight gradient is then a sum of per-chunk GEMMs, added
/// in batch order.
pub fn conv2d_nhwc_backward_chunked(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    max_column_floats: usize,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "conv2d_nhwc_backward";
    let c = Conv::of(OP, x, weight)?;
    check_dy(OP, dy, &c.out_shape())?;
    same_device(OP, &[x, weight, dy])?;
    let dx = need_x.then(|| conv2d_input_grad(c, dy, weight, max_column_floats)).transpose()?;
    let dw = need_weight.then(|| conv2d_weight_grad(c, dy, x, max_column_floats)).transpose()?;
    let db = need_bias.then(|| column_sums(dy)).transpose()?;
    Ok((dx, dw, db))
}

/// The `[Cout, Cin, 3, 3]` weight as `[Cout, 9*Cin]` rows in the im2col column order
/// `(ky, kx, c)` (a copy of the weight, small beside the activations).
fn weight_taps_last(weight: &Tensor) -> Result<Tensor> {
    let (cout, cin) = (weight.dim(0), weight.dim(1));
    permute_forward(weight, &[0, 2, 3, 1])?.view_as(&[cout, 9 * cin])
}

/// dx = dy W: for k = 1 one GEMM; for k = 3, per chunk of images, the column gradient
/// `dcols = dy_chunk [P, Cout] x W [Cout, 9 Cin]` gathered back onto the pixels by col2im.
fn conv2d_input_grad(c: Conv, dy: &Tensor, weight: &Tensor, max_column_floats: usize) -> Result<Tensor> {
    const OP: &str = "conv2d_nhwc_backward";
    let device = same_device(OP, &[dy, weight])?;
    if c.is_degenerate() {
        return Tensor::zeros(&c.in_shape(), &device);
    }
    if c.k == 1 {
        let dy_rows = dy.view_as(&[c.pixels(), c.cout])?;
        let dx = matmul_forward(&dy_rows, &weight.view_as(&[c.cout, c.cin])?, MatmulOpts::default())?;
        return dx.view_as(&c.in_shape());
    }
    let w_rows = weight_taps_last(weight)?;
    let dcols = |first: usize, images: usize| {
        matmul_forward(&image_rows(dy, c.batch, first, images)?, &w_rows, MatmulOpts::default())
    };
    let image_len = c.height * c.width * c.cin;
    match device {
        Device::Cpu => {
            let mut dx = host_buffer(c.pixels() * c.cin);
            for (first, images) in c.chunks(max_column_floats) {
                let out = &mut dx[first * image_len..][..images * image_len];
                col2im_cpu(c, dcols(first, images)?.cpu_data(OP)?, out);
            }
            Tensor::from_vec(dx, &c.in_shape())
        }
        Device::Cuda(dev) => {
            const KERNEL: &str = "col2im3x3_nhwc";
            let f = dev.function(KernelFamily::Conv, KERNEL)?;
            let mut dx = dev.alloc(c.pixels() * c.cin)?;
            for (first, images) in c.chunks(max_column_floats) {
                let dcols = dcols(first, images)?;
                let [n, h, w, ch] = c.kernel_args(OP, images)?;
                let first_i = first as i32; // first < batch, which kernel_args checked
                let mut builder = dev.stream().launch_builder(&f);
                builder.arg(&mut dx).arg(cuda_slice(&dcols)?).arg(&first_i);
                builder.arg(&n).arg(&h).arg(&w).arg(&ch);
                // SAFETY: arguments match `(float*, const float*, int x5)`; `dcols` holds
                // images*H*W rows of 9*Cin floats, and `dx` holds B*H*W*Cin floats, of which the
                // kernel writes images first .. first+images (within B by `chunks`).
                launch(KERNEL, unsafe { builder.launch(launch_elements(images * image_len)) })?;
            }
            // The chunks cover every image, so every element of dx was written.
            Ok(cuda_output(&dev, dx, &c.in_shape()))
        }
    }
}

/// dW = dy^T x over all pixels: for k = 1 one GEMM; for k = 3, per chunk of images,
/// `dy_chunk^T [Cout, P] x cols [P, 9 Cin]`, the chunks' products added in batch order, then
/// reordered to PyTorch's `[Cout, Cin, 3, 3]`.
fn conv2d_weight_grad(c: Conv, dy: &Tensor, x: &Tensor, max_column_floats: usize) -> Result<Tensor> {
    const OP: &str = "conv2d_nhwc_backward";
    let device = same_device(OP, &[dy, x])?;
    if c.is_degenerate() {
        return Tensor::zeros(&c.weight_shape(), &device);
    }
    let transpose_dy = MatmulOpts { transpose_a: true, ..Default::default() };
    if c.k == 1 {
        let (dy_rows, x_rows) = (dy.view_as(&[c.pixels(), c.cout])?, x.view_as(&[c.pixels(), c.cin])?);
        return matmul_forward(&dy_rows, &x_rows, transpose_dy)?.view_as(&c.weight_shape());
    }
    let mut sum: Option<Tensor> = None;
    for (first, images) in c.chunks(max_column_floats) {
        let cols = im2col(OP, c, x, first, images)?;
        let part = matmul_forward(&image_rows(dy, c.batch, first, images)?, &cols, transpose_dy)?;
        sum = Some(match sum {
            None => part,
            Some(acc) => add_untracked(&acc, &part)?,
        });
    }
    let sum = sum.expect("a non-degenerate convolution has at least one chunk");
    permute_forward(&sum.view_as(&[c.cout, 3, 3, c.cin])?, &[0, 3, 1, 2])
}

/// The im2col columns of images `first .. first + images` of `x`: `[images*H*W, 9*Cin]`, row p
/// holding the 3x3 neighbourhood of output pixel p in `(ky, kx, c)` order, zeros in the padding.
fn im2col(op: &'static str, c: Conv, x: &Tensor, first: usize, images: usize) -> Result<Tensor> {
    let rows = images * c.height * c.width;
    let shape = [rows, 9 * c.cin];
    match x.device() {
        Device::Cpu => {
            let image_len = c.height * c.width * c.cin;
            let x_images = &x.cpu_data(op)?[first * image_len..][..images * image_len];
            Tensor::from_vec(im2col_cpu(c, x_images), &shape)
        }
        Device::Cuda(dev) => {
            const KERNEL: &str = "im2col3x3_nhwc";
            let f = dev.function(KernelFamily::Conv, KERNEL)?;
            let mut cols = dev.alloc(rows * 9 * c.cin)?;
            let [n, h, w, ch] = c.kernel_args(op, images)?;
            let first_i = first as i32; // first < batch, which kernel_args checked
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut cols).arg(cuda_slice(x)?).arg(&first_i);
            builder.arg(&n).arg(&h).arg(&w).arg(&ch);
            // SAFETY: arguments match `(float*, const float*, int x5)`; `x` holds B*H*W*Cin
            // floats and the kernel reads images first .. first+images (within B by `chunks`);
            // `cols` holds images*H*W*9*Cin floats, all written.
            launch(KERNEL, unsafe { builder.launch(launch_elements(rows * 9 * c.cin)) })?;
            Ok(cuda_output(&dev, cols, &shape))
        }
    }
}

/// CPU im2col of the images in `x` (whole images of `c`'s size), one output image row per task.
fn im2col_cpu(c: Conv, x: &[f32]) -> Vec<f32> {
    let Conv { height, width, cin, .. } = c;
    let row_len = 9 * cin;
    let mut cols = host_buffer(x.len() * 9);
    cols.par_chunks_mut(width * row_len).enumerate().for_each(|(row, out_row)| {
        let h = row % height;
        let image_first_row = row - h;
        for (w, out_pixel) in out_row.chunks_mut(row_len).enumerate() {
            for (tap, out) in out_pixel.chunks_mut(cin).enumerate() {
                match (shifted(h, tap / 3, height), shifted(w, tap % 3, width)) {
                    (Some(hh), Some(ww)) => {
                        out.copy_from_slice(&x[((image_first_row + hh) * width + ww) * cin..][..cin]);
                    }
                    _ => out.fill(0.0),
                }
            }
        }
    });
    cols
}

/// CPU col2im: `dx` (the images of `dcols`) gathers, per element, the nine column entries that
/// copied it in `(ky, kx)` order (the kernel's order), one image row per task.
fn col2im_cpu(c: Conv, dcols: &[f32], dx: &mut [f32]) {
    let Conv { height, width, cin, .. } = c;
    let row_len = 9 * cin;
    dx.par_chunks_mut(width * cin).enumerate().for_each(|(row, dx_row)| {
        let h = row % height;
        let image_first_row = row - h;
        for (w, out) in dx_row.chunks_mut(cin).enumerate() {
            out.fill(0.0);
            for tap in 0..9 {
                // The output pixel whose tap (ky, kx) read (h, w) is (h + 1 - ky, w + 1 - kx).
                let (Some(hh), Some(ww)) = (mirrored(h, tap / 3, height), mirrored(w, tap % 3, width)) else {
                    continue;
                };
                let src = &dcols[((image_first_row + hh) * width + ww) * row_len + tap * cin..][..cin];
                out.iter_mut().zip(src).for_each(|(o, &s)| *o += s);
            }
        }
    });
}

/// `index + k - 1` (the position tap k reads), or `None` in the padding.
fn shifted(index: usize, k: usize, size: usize) -> Option<usize> {
    (index + k).checked_sub(1).filter(|&i| i < size)
}

/// `index + 1 - k` (the output position whose tap k read `index`), or `None` outside.
fn mirrored(index: usize, k: usize, size: usize) -> Option<usize> {
    (index + 1).checked_sub(k).filter(|&i| i < size)
}

// ------------------------------------------------------------------------------------------------
// ConvTranspose2d, kernel 2, stride 2
// ------------------------------------------------------------------------------------------------

/// The sizes of one `nn.ConvTranspose2d(Cin, Cout, 2, stride=2)` on NHWC activations.
#[derive(Copy, Clone, Debug)]
struct Transpose {
    batch: usize,
    height: usize,
    width: usize,
    cin: usize,
    cout: usize,
}

impl Transpose {
    /// Checks `x` `[B, H, W, Cin]` against `weight` `[Cin, Cout, 2, 2]`.
    fn of(op: &'static str, x: &Tensor, weight: &Tensor) -> Result<Transpose> {
        let [batch, height, width, cin] = nhwc_dims(op, "input", x)?;
        let cout = match *weight.shape() {
            [wc, cout, 2, 2] if wc == cin => cout,
            _ => {
                return Err(Error::shape(
                    op,
                    format!(
                        "weight {:?} does not fit input {:?}: expected [{cin}, Cout, 2, 2]",
                        weight.shape(),
                        x.shape()
                    ),
                ))
            }
        };
        Ok(Transpose { batch, height, width, cin, cout })
    }

    fn pixels(&self) -> usize {
        self.batch * self.height * self.width
    }

    fn out_shape(&self) -> [usize; 4] {
        [self.batch, 2 * self.height, 2 * self.width, self.cout]
    }

    /// The kernels' `(batch, height, width, channels)` arguments, with the sizes they index
    /// with `int` checked.
    fn kernel_args(&self, op: &'static str) -> Result<[i32; 4]> {
        kernel_int(op, "2 * height", 2 * self.height)?;
        kernel_int(op, "2 * width", 2 * self.width)?;
        kernel_int(op, "4 * output channels", 4 * self.cout)?;
        Ok([
            kernel_int(op, "batch", self.batch)?,
            kernel_int(op, "height", self.height)?,
            kernel_int(op, "width", self.width)?,
            kernel_int(op, "output channels", self.cout)?,
        ])
    }
}

/// The `[Cin, Cout, 2, 2]` weight as `[Cin, 4*Cout]` with columns in `(di, dj, o)` order, so a
/// product row holds a pixel's 2x2 output block as two contiguous runs of `2*Cout` per output row.
fn weight_blocks_last(weight: &Tensor) -> Result<Tensor> {
    let (cin, cout) = (weight.dim(0), weight.dim(1));
    permute_forward(weight, &[0, 2, 3, 1])?.view_as(&[cin, 4 * cout])
}

/// `nn.ConvTranspose2d(Cin, Cout, kernel_size=2, stride=2)` on channels-last activations:
/// `y[b, 2i+di, 2j+dj, o] = bias[o] + sum_c x[b,i,j,c] * weight[c,o,di,dj]`. `x` is
/// `[B, H, W, Cin]`, `weight` `[Cin, Cout, 2, 2]` (PyTorch's layout), `bias` `[Cout]`; the output
/// is `[B, 2H, 2W, Cout]`. The same numbers as the decoder's ScaleBlock upsampling (the same GEMM,
/// then the bias added to each element).
pub fn conv_transpose2x2_nhwc(tape: &Tape, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = conv_transpose2x2_nhwc_forward(x, weight, bias)?;
    let t = Transpose::of("conv_transpose2x2_nhwc", x, weight)?;
    Ok(record_with_bias(tape, y, x, weight, bias, move |dy, x, weight| transpose_grads(t, dy, x, weight)))
}

/// Untracked [`conv_transpose2x2_nhwc`]: the GEMM `x [B*H*W, Cin] x W [Cin, 4*Cout]`, then the
/// interleave of each product row into its 2x2 output block, adding the bias.
pub fn conv_transpose2x2_nhwc_forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "conv_transpose2x2_nhwc";
    let t = Transpose::of(OP, x, weight)?;
    check_bias(OP, bias, t.cout, weight)?;
    let device = same_device(OP, &[x, weight].into_iter().chain(bias).collect::<Vec<_>>())?;
    let out_shape = t.out_shape();
    if t.pixels() == 0 || t.cout == 0 {
        return Tensor::zeros(&out_shape, &device);
    }
    let z = matmul_forward(&x.view_as(&[t.pixels(), t.cin])?, &weight_blocks_last(weight)?, MatmulOpts::default())?;
    match device {
        Device::Cpu => {
            let bias = bias.map(|b| b.cpu_data(OP)).transpose()?;
            Tensor::from_vec(interleave_cpu(t, z.cpu_data(OP)?, bias), &out_shape)
        }
        Device::Cuda(dev) => {
            const KERNEL: &str = "interleave2x2_nhwc";
            let [b, h, w, ch] = t.kernel_args(OP)?;
            let n = 4 * t.pixels() * t.cout;
            let f = dev.function(KernelFamily::Conv, KERNEL)?;
            let mut y = dev.alloc(n)?;
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut y).arg(cuda_slice(&z)?);
            match bias {
                Some(bias) => builder.arg(cuda_slice(bias)?),
                None => builder.arg(&NULL_DEVICE_PTR),
            };
            builder.arg(&b).arg(&h).arg(&w).arg(&ch);
            // SAFETY: arguments match `(float*, const float*, const float*, int x4)`; `z` holds
            // B*H*W rows of 4*Cout floats, `y` B*2H*2W*Cout (the same count), all written; the
            // bias is null or a [Cout] buffer (checked above).
            launch(KERNEL, unsafe { builder.launch(launch_elements(n)) })?;
            Ok(cuda_output(&dev, y, &out_shape))
        }
    }
}

/// Untracked gradients of [`conv_transpose2x2_nhwc`] for x, weight and bias (each only when asked
/// for), given the output gradient `dy` `[B, 2H, 2W, Cout]`.
pub fn conv_transpose2x2_nhwc_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "conv_transpose2x2_nhwc_backward";
    let t = Transpose::of(OP, x, weight)?;
    check_dy(OP, dy, &t.out_shape())?;
    same_device(OP, &[x, weight, dy])?;
    let (dx, dw) = transpose_grads(t, dy, need_weight.then_some(x), need_x.then_some(weight))?;
    let db = need_bias.then(|| column_sums(dy)).transpose()?;
    Ok((dx, dw, db))
}

/// `(dx, dW)` of the transposed convolution, each when its operand is given (`x` for dW, `weight`
/// for dx): the output gradient de-interleaved once into `dz [B*H*W, 4*Cout]`, then
/// `dx = dz W^T` and `dW = x^T dz`, reordered to `[Cin, Cout, 2, 2]`.
fn transpose_grads(
    t: Transpose,
    dy: &Tensor,
    x: Option<&Tensor>,
    weight: Option<&Tensor>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "conv_transpose2x2_nhwc_backward";
    if x.is_none() && weight.is_none() {
        return Ok((None, None));
    }
    let device = dy.device();
    let (in_shape, weight_shape) = ([t.batch, t.height, t.width, t.cin], [t.cin, t.cout, 2, 2]);
    if t.pixels() == 0 || t.cout == 0 || t.cin == 0 {
        let dx = weight.map(|_| Tensor::zeros(&in_shape, &device)).transpose()?;
        let dw = x.map(|_| Tensor::zeros(&weight_shape, &device)).transpose()?;
        return Ok((dx, dw));
    }
    let dz = deinterleave(OP, t, dy)?;
    let dx = weight
        .map(|w| {
            let opts = MatmulOpts { transpose_b: true, ..Default::default() };
            matmul_forward(&dz, &weight_blocks_last(w)?, opts)?.view_as(&in_shape)
        })
        .transpose()?;
    let dw = x
        .map(|x| {
            let opts = MatmulOpts { transpose_a: true, ..Default::default() };
            let blocks = matmul_forward(&x.view_as(&[t.pixels(), t.cin])?, &dz, opts)?;
            permute_forward(&blocks.view_as(&[t.cin, 2, 2, t.cout])?, &[0, 3, 1, 2])
        })
        .transpose()?;
    Ok((dx, dw))
}

/// `dz[(b,i,j), (di,dj,o)] = dy[b, 2i+di, 2j+dj, o]`: the output gradient in the GEMM's layout.
fn deinterleave(op: &'static str, t: Transpose, dy: &Tensor) -> Result<Tensor> {
    let shape = [t.pixels(), 4 * t.cout];
    match dy.device() {
        Device::Cpu => Tensor::from_vec(deinterleave_cpu(t, dy.cpu_data(op)?), &shape),
        Device::Cuda(dev) => {
            const KERNEL: &str = "deinterleave2x2_nhwc";
            let [b, h, w, ch] = t.kernel_args(op)?;
            let n = 4 * t.pixels() * t.cout;
            let f = dev.function(KernelFamily::Conv, KERNEL)?;
            let mut dz = dev.alloc(n)?;
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut dz).arg(cuda_slice(dy)?).arg(&b).arg(&h).arg(&w).arg(&ch);
            // SAFETY: arguments match `(float*, const float*, int x4)`; `dy` holds B*2H*2W*Cout
            // floats (checked against the output shape) and `dz` the same count, all written.
            launch(KERNEL, unsafe { builder.launch(launch_elements(n)) })?;
            Ok(cuda_output(&dev, dz, &shape))
        }
    }
}

/// CPU interleave, one output row per task: each output pixel copies its run of `Cout` values
/// from the product row of its input pixel and adds the bias (as `z + bias`, the GPU's order).
fn interleave_cpu(t: Transpose, z: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let Transpose { height, width, cout, .. } = t;
    let mut y = host_buffer(4 * t.pixels() * cout);
    y.par_chunks_mut(2 * width * cout).enumerate().for_each(|(out_row, y_row)| {
        let (b, oh) = (out_row / (2 * height), out_row % (2 * height));
        for (ow, out) in y_row.chunks_mut(cout).enumerate() {
            let in_pixel = (b * height + oh / 2) * width + ow / 2;
            let block = (oh % 2) * 2 + ow % 2;
            let src = &z[(in_pixel * 4 + block) * cout..][..cout];
            match bias {
                Some(bias) => out.iter_mut().zip(src).zip(bias).for_each(|((o, &v), &b)| *o = v + b),
                None => out.copy_from_slice(src),
            }
        }
    });
    y
}

/// CPU de-interleave, one input pixel (a `4*Cout` row of dz) per task.
fn deinterleave_cpu(t: Transpose, dy: &[f32]) -> Vec<f32> {
    let Transpose { height, width, cout, .. } = t;
    let mut dz = host_buffer(4 * t.pixels() * cout);
    dz.par_chunks_mut(4 * cout).enumerate().for_each(|(in_pixel, dz_row)| {
        let (row, j) = (in_pixel / width, in_pixel % width);
        let (b, i) = (row / height, row % height);
        for (block, out) in dz_row.chunks_mut(cout).enumerate() {
            let (oh, ow) = (2 * i + block / 2, 2 * j + block % 2);
            out.copy_from_slice(&dy[((b * 2 * height + oh) * 2 * width + ow) * cout..][..cout]);
        }
    });
    dz
}
