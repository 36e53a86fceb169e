//! 2x2 max pooling with stride 2, `nn.MaxPool2d(2)`, on NHWC activations (the UNet encoder's
//! downsampling). Kernels: `kernels/pool.cu`. Tests: `tests/pool.rs`.
//!
//! Which element of a window is its maximum follows PyTorch exactly: the window is scanned in
//! row-major order and an element replaces the best so far when it is greater or NaN, so the first
//! maximum wins ties (and alone gets the gradient) and a NaN wins over any number. The backward
//! recomputes that choice from `x` (no index tensor is kept) and is a gather: every input element
//! decides whether it was chosen.

use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use super::{cuda_output, cuda_slice, kernel_int, launch, same_device};
use crate::cuda::{launch_elements, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

/// `nn.MaxPool2d(2)` on `x` of shape `[B, H, W, C]`: the output is `[B, H/2, W/2, C]` (floor: an
/// odd last row or column is dropped and gets zero gradient). A window holding a NaN outputs NaN.
pub fn max_pool2x2_nhwc(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let y = max_pool2x2_nhwc_forward(x)?;
    let saved = x.clone();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(max_pool2x2_nhwc_backward(&saved, dy)?)])))
}

/// `[B, H, W, C]` of an NHWC activation.
fn nhwc(op: &'static str, x: &Tensor) -> Result<[usize; 4]> {
    match *x.shape() {
        [b, h, w, c] => {
            kernel_int(op, "height", h)?;
            kernel_int(op, "width", w)?;
            kernel_int(op, "channels", c)?;
            kernel_int(op, "batch", b)?;
            Ok([b, h, w, c])
        }
        _ => Err(Error::shape(op, format!("expects an NHWC activation [B, H, W, C], got shape {:?}", x.shape()))),
    }
}

/// Offset, from the image's first element, of the element window `(oh, ow)` chooses in channel
/// `c` (see the module doc for the rule).
#[inline(always)]
fn window_choice(image: &[f32], oh: usize, ow: usize, width: usize, channels: usize, c: usize) -> usize {
    let top = ((2 * oh) * width + 2 * ow) * channels + c;
    let offsets = [top, top + channels, top + width * channels, top + width * channels + channels];
    let mut best = offsets[0];
    for &at in &offsets[1..] {
        let v = image[at];
        if v > image[best] || v.is_nan() {
            best = at;
        }
    }
    best
}

/// Untracked forward.
pub fn max_pool2x2_nhwc_forward(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "max_pool2x2_nhwc";
    let [batch, height, width, channels] = nhwc(OP, x)?;
    let out_shape = [batch, height / 2, width / 2, channels];
    let n: usize = out_shape.iter().product();
    let device = same_device(OP, &[x])?;
    if n == 0 {
        return Tensor::zeros(&out_shape, &device);
    }
    match device {
        Device::Cpu => {
            let xs = x.cpu_data(OP)?;
            let (out_h, out_w) = (height / 2, width / 2);
            let mut y = host_buffer(n);
            let image_len = height * width * channels;
            y.par_chunks_mut(out_w * channels).enumerate().for_each(|(row, yr)| {
                let (b, oh) = (row / out_h, row % out_h);
                let image = &xs[b * image_len..][..image_len];
                for ow in 0..out_w {
                    for c in 0..channels {
                        yr[ow * channels + c] = image[window_choice(image, oh, ow, width, channels, c)];
                    }
                }
            });
            Tensor::from_vec(y, &out_shape)
        }
        Device::Cuda(dev) => {
            let [b, h, w, c] = [batch, height, width, channels].map(|v| v as i32); // fit: nhwc()
            let mut y = dev.alloc(n)?;
            let kernel = "max_pool2x2_nhwc_forward";
            let f = dev.function(KernelFamily::Pool, kernel)?;
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut y).arg(cuda_slice(x)?).arg(&b).arg(&h).arg(&w).arg(&c);
            // SAFETY: arguments match `(float*, const float*, int x4)`; x holds B*H*W*C floats and
            // y B*(H/2)*(W/2)*C, which is what the kernel indexes.
            launch(kernel, unsafe { builder.launch(launch_elements(n)) })?;
            Ok(cuda_output(&dev, y, &out_shape))
        }
    }
}

/// Untracked backward: `dx` of the shape of `x`, holding `dy` of each window at the element the
/// window chose and 0 elsewhere (including an odd last row or column).
pub fn max_pool2x2_nhwc_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "max_pool2x2_nhwc_backward";
    let [batch, height, width, channels] = nhwc(OP, x)?;
    let (out_h, out_w) = (height / 2, width / 2);
    if dy.shape() != [batch, out_h, out_w, channels] {
        return Err(Error::shape(
            OP,
            format!(
                "gradient {:?} does not fit input {:?} (expected [{batch}, {out_h}, {out_w}, {channels}])",
                dy.shape(),
                x.shape()
            ),
        ));
    }
    let device = same_device(OP, &[x, dy])?;
    if x.numel() == 0 {
        return Tensor::zeros(x.shape(), &device);
    }
    match device {
        Device::Cpu => {
            let (xs, dys) = (x.cpu_data(OP)?, dy.cpu_data(OP)?);
            let mut dx = host_buffer(xs.len());
            let image_len = height * width * channels;
            // One task per image row; rows past 2 * out_h are all zero.
            dx.par_chunks_mut(width * channels).enumerate().for_each(|(row, dxr)| {
                dxr.fill(0.0);
                let (b, h) = (row / height, row % height);
                if h >= 2 * out_h {
                    return;
                }
                let image = &xs[b * image_len..][..image_len];
                let row_start = h * width * channels;
                for ow in 0..out_w {
                    for c in 0..channels {
                        let chosen = window_choice(image, h / 2, ow, width, channels, c);
                        if chosen / (width * channels) == h {
                            dxr[chosen - row_start] = dys[((b * out_h + h / 2) * out_w + ow) * channels + c];
                        }
                    }
                }
            });
            Tensor::from_vec(dx, x.shape())
        }
        Device::Cuda(dev) => {
            let [b, h, w, c] = [batch, height, width, channels].map(|v| v as i32); // fit: nhwc()
            let mut dx = dev.alloc(x.numel())?;
            let kernel = "max_pool2x2_nhwc_backward";
            let f = dev.function(KernelFamily::Pool, kernel)?;
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut dx).arg(cuda_slice(x)?).arg(cuda_slice(dy)?).arg(&b).arg(&h).arg(&w).arg(&c);
            // SAFETY: arguments match `(float*, const float*, const float*, int x4)`; dx and x hold
            // B*H*W*C floats, dy B*(H/2)*(W/2)*C (checked above); the kernel writes every dx.
            launch(kernel, unsafe { builder.launch(launch_elements(x.numel())) })?;
            Ok(cuda_output(&dev, dx, x.shape()))
        }
    }
}
