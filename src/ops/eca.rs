//! ECA channel attention (ECA-Net, as VLSM-Ensemble's UNet uses it) on NHWC activations:
//! global average pooling per channel, a 1D convolution across channels with PyTorch's
//! `nn.Conv1d(1, 1, k, padding=(k - 1) / 2, bias=False)` weight `[1, 1, k]` (k odd), a sigmoid,
//! and the input scaled by the resulting per-(image, channel) gate.
//!
//! Kernels: `kernels/eca.cu`. Tests: `tests/eca.rs`. Deterministic: per-(image, channel) sums
//! in a fixed order and one fixed-shape tree per weight tap, no atomics.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::{cuda_output, cuda_slice, kernel_int, launch, same_device, NULL_DEVICE_PTR};
use crate::cuda::{launch_elements, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::fastmath;
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

/// What the ECA forward computes besides its output, and what its backward reads.
#[derive(Clone, Debug)]
pub struct EcaGate {
    /// `[B, C]`: `p[b,c]`, the mean of channel `c` of image `b` over its pixels.
    pub pooled: Tensor,
    /// `[B, C]`: `g[b,c] = sigmoid(sum_j w[j] p[b, c + j - (k-1)/2])`, zero padding across channels.
    pub gate: Tensor,
}

/// ECA: `y[b,h,w,c] = x[b,h,w,c] * g[b,c]` with `g` as in [`EcaGate`]. `x` is `[B, H, W, C]`,
/// `weight` the Conv1d weight `[1, 1, k]` with k odd. Gradients reach `x` (directly and through
/// the pooled mean) and `weight`.
pub fn eca_nhwc(tape: &Tape, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (y, gate) = eca_nhwc_forward(x, weight)?;
    let (saved_x, saved_weight) = (x.clone(), weight.clone());
    let needs = [x.needs_grad(), weight.needs_grad()];
    Ok(tape.record(y, &[x, weight], move |dy| {
        let (dx, dweight) = eca_nhwc_backward(&saved_x, &saved_weight, &gate, dy, needs[0])?;
        Ok(vec![dx, needs[1].then_some(dweight)])
    }))
}

/// Sizes of one ECA: `batch` images of `pixels = H * W` positions and `channels`, `taps = k`.
#[derive(Copy, Clone, Debug)]
struct Eca {
    batch: usize,
    pixels: usize,
    channels: usize,
    taps: usize,
}

impl Eca {
    fn check(op: &'static str, x: &Tensor, weight: &Tensor) -> Result<Eca> {
        let [batch, height, width, channels] = match *x.shape() {
            [b, h, w, c] => [b, h, w, c],
            _ => {
                return Err(Error::shape(
                    op,
                    format!("expects an NHWC activation [B, H, W, C], got shape {:?}", x.shape()),
                ))
            }
        };
        let taps = match *weight.shape() {
            [1, 1, k] if k % 2 == 1 => k,
            _ => {
                return Err(Error::shape(
                    op,
                    format!(
                        "weight must be a Conv1d(1, 1, k) weight [1, 1, k] with k odd, got {:?} (input {:?})",
                        weight.shape(),
                        x.shape()
                    ),
                ))
            }
        };
        let pixels = height * width;
        kernel_int(op, "H * W", pixels)?;
        kernel_int(op, "channels", channels)?;
        kernel_int(op, "taps", taps)?;
        kernel_int(op, "B * C", batch * channels)?;
        if batch > 65_535 {
            return Err(Error::shape(op, format!("batch {batch} exceeds the 65535 images one launch covers")));
        }
        Ok(Eca { batch, pixels, channels, taps })
    }

    fn pad(self) -> usize {
        (self.taps - 1) / 2
    }

    /// `p[b, c + j - pad]` for channel `c` and tap `j`, or `None` in the zero padding.
    fn source(self, c: usize, j: usize) -> Option<usize> {
        (c + j).checked_sub(self.pad()).filter(|&s| s < self.channels)
    }
}

/// Untracked forward: the output and the pooled means and gate the backward needs.
pub fn eca_nhwc_forward(x: &Tensor, weight: &Tensor) -> Result<(Tensor, EcaGate)> {
    const OP: &str = "eca_nhwc";
    let e = Eca::check(OP, x, weight)?;
    let device = same_device(OP, &[x, weight])?;
    let bc = [e.batch, e.channels];
    if x.numel() == 0 {
        // No pixels: the mean is undefined; PyTorch's adaptive pooling returns NaN there. An empty
        // batch or no channels leave nothing to pool.
        if e.pixels == 0 && e.batch * e.channels > 0 {
            return Err(Error::shape(OP, format!("cannot average over zero pixels (input {:?})", x.shape())));
        }
        let gate = EcaGate { pooled: Tensor::zeros(&bc, &device)?, gate: Tensor::zeros(&bc, &device)? };
        return Ok((Tensor::zeros(x.shape(), &device)?, gate));
    }
    match device {
        Device::Cpu => {
            let xs = x.cpu_data(OP)?;
            let pooled = spatial_sums_cpu(e, xs, None, 1.0 / e.pixels as f64);
            let gate = gate_cpu(e, &pooled, weight.cpu_data(OP)?);
            let y = scale_cpu(e, xs, &gate, None);
            let gate = EcaGate { pooled: Tensor::from_vec(pooled, &bc)?, gate: Tensor::from_vec(gate, &bc)? };
            Ok((Tensor::from_vec(y, x.shape())?, gate))
        }
        Device::Cuda(dev) => {
            let (pixels, channels, taps, batch) = (e.pixels as i32, e.channels as i32, e.taps as i32, e.batch as i32);
            let mut pooled = dev.alloc(e.batch * e.channels)?;
            let kernel = "eca_spatial_sum";
            let f = dev.function(KernelFamily::Eca, kernel)?;
            let inv_pixels = (1.0 / e.pixels as f64) as f32;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut pooled).arg(cuda_slice(x)?).arg(&NULL_DEVICE_PTR).arg(&pixels).arg(&channels).arg(&inv_pixels);
            // SAFETY: arguments match `(float* out, const float* a, const float* m, int pixels,
            // int channels, float scale)`; x holds B*pixels*C floats, `out` B*C; m is null (not
            // read); the grid is (C/32 tiles, B) with B <= 65535 (checked).
            launch(kernel, unsafe { b.launch(spatial_sum_launch(e)) })?;

            let mut gate = dev.alloc(e.batch * e.channels)?;
            let kernel = "eca_gate";
            let f = dev.function(KernelFamily::Eca, kernel)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut gate).arg(&pooled).arg(cuda_slice(weight)?).arg(&batch).arg(&channels).arg(&taps);
            // SAFETY: arguments match `(float*, const float*, const float*, int x3)`; gate and
            // pooled hold B*C floats (pooled written above), weight k.
            launch(kernel, unsafe { b.launch(launch_elements(e.batch * e.channels)) })?;

            let mut y = dev.alloc(x.numel())?;
            let kernel = "eca_scale";
            let f = dev.function(KernelFamily::Eca, kernel)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut y).arg(cuda_slice(x)?).arg(&gate).arg(&NULL_DEVICE_PTR);
            b.arg(&batch).arg(&pixels).arg(&channels);
            // SAFETY: arguments match `(float* out, const float* a, const float* gate, const float*
            // add, int batch, int pixels, int channels)`; y and x hold B*pixels*C floats, gate B*C;
            // add is null (not read).
            launch(kernel, unsafe { b.launch(launch_elements(x.numel())) })?;
            let gate = EcaGate { pooled: cuda_output(&dev, pooled, &bc), gate: cuda_output(&dev, gate, &bc) };
            Ok((cuda_output(&dev, y, x.shape()), gate))
        }
    }
}

/// Grid (32-channel tiles, images) of blocks (32, SUM_THREADS_Y = 8) for `eca_spatial_sum`.
fn spatial_sum_launch(e: Eca) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (e.channels.div_ceil(32) as u32, e.batch as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// Untracked backward: `(dx, dweight)`, `dx` only when `want_dx`. With `dz = dy_gate * g (1 - g)`
/// and `dy_gate[b,c] = sum_{h,w} dy * x`:
/// `dx = dy * g[b,c] + (sum_j w[j] dz[b, c - j + pad]) / (H * W)` and
/// `dweight[j] = sum_{b,c} dz[b,c] p[b, c + j - pad]`.
pub fn eca_nhwc_backward(
    x: &Tensor,
    weight: &Tensor,
    saved: &EcaGate,
    dy: &Tensor,
    want_dx: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    const OP: &str = "eca_nhwc_backward";
    let e = Eca::check(OP, x, weight)?;
    let bc = [e.batch, e.channels];
    if dy.shape() != x.shape() || saved.pooled.shape() != bc || saved.gate.shape() != bc {
        return Err(Error::shape(
            OP,
            format!(
                "gradient {:?}, pooled {:?} and gate {:?} do not fit input {:?}",
                dy.shape(),
                saved.pooled.shape(),
                saved.gate.shape(),
                x.shape()
            ),
        ));
    }
    let device = same_device(OP, &[x, weight, &saved.pooled, &saved.gate, dy])?;
    if x.numel() == 0 {
        let dx = want_dx.then(|| Tensor::zeros(x.shape(), &device)).transpose()?;
        return Ok((dx, Tensor::zeros(weight.shape(), &device)?));
    }
    let inv_pixels = 1.0 / e.pixels as f64;
    match device {
        Device::Cpu => {
            let (xs, dys, w) = (x.cpu_data(OP)?, dy.cpu_data(OP)?, weight.cpu_data(OP)?);
            let (pooled, gate) = (saved.pooled.cpu_data(OP)?, saved.gate.cpu_data(OP)?);
            let dgate = spatial_sums_cpu(e, dys, Some(xs), 1.0);
            let dz: Vec<f64> =
                dgate.iter().zip(gate).map(|(&d, &g)| d as f64 * (g as f64 * (1.0 - g as f64))).collect();
            let dweight: Vec<f32> = (0..e.taps)
                .map(|j| {
                    let mut s = 0.0f64;
                    for (at, dz) in dz.iter().enumerate() {
                        let (b, c) = (at / e.channels, at % e.channels);
                        if let Some(src) = e.source(c, j) {
                            s += dz * pooled[b * e.channels + src] as f64;
                        }
                    }
                    s as f32
                })
                .collect();
            let dx = if want_dx {
                // dp[b,c] / (H W): p[b,c] reached z[b, d] through tap j where d + j - pad = c.
                let dpooled: Vec<f32> = (0..e.batch * e.channels)
                    .map(|at| {
                        let (b, c) = (at / e.channels, at % e.channels);
                        let mut s = 0.0f64;
                        for (j, &wj) in w.iter().enumerate() {
                            let Some(d) = (c + e.pad()).checked_sub(j).filter(|&d| d < e.channels) else { continue };
                            s += wj as f64 * dz[b * e.channels + d];
                        }
                        (s * inv_pixels) as f32
                    })
                    .collect();
                Some(Tensor::from_vec(scale_cpu(e, dys, gate, Some(&dpooled)), x.shape())?)
            } else {
                None
            };
            Ok((dx, Tensor::from_vec(dweight, weight.shape())?))
        }
        Device::Cuda(dev) => {
            let (pixels, channels, taps, batch) = (e.pixels as i32, e.channels as i32, e.taps as i32, e.batch as i32);
            let mut dgate = dev.alloc(e.batch * e.channels)?;
            let kernel = "eca_spatial_sum";
            let f = dev.function(KernelFamily::Eca, kernel)?;
            let one = 1.0f32;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dgate).arg(cuda_slice(dy)?).arg(cuda_slice(x)?).arg(&pixels).arg(&channels).arg(&one);
            // SAFETY: arguments match `(float* out, const float* a, const float* m, int pixels,
            // int channels, float scale)`; dy and x hold B*pixels*C floats, `out` B*C; the grid is
            // (C/32 tiles, B) with B <= 65535 (checked).
            launch(kernel, unsafe { b.launch(spatial_sum_launch(e)) })?;

            let mut dweight = dev.alloc(e.taps)?;
            let kernel = "eca_weight_backward";
            let f = dev.function(KernelFamily::Eca, kernel)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dweight).arg(&dgate).arg(cuda_slice(&saved.gate)?).arg(cuda_slice(&saved.pooled)?);
            b.arg(&batch).arg(&channels).arg(&taps);
            let config = LaunchConfig { grid_dim: (e.taps as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: arguments match `(float*, const float* x3, int x3)`; dweight holds k floats
            // (one block per tap), dgate, gate and pooled B*C; the block is whole warps, as
            // block_sum needs.
            launch(kernel, unsafe { b.launch(config) })?;

            let dx = if want_dx {
                let mut dpooled = dev.alloc(e.batch * e.channels)?;
                let kernel = "eca_pooled_backward";
                let f = dev.function(KernelFamily::Eca, kernel)?;
                let inv = inv_pixels as f32;
                let mut b = dev.stream().launch_builder(&f);
                b.arg(&mut dpooled).arg(&dgate).arg(cuda_slice(&saved.gate)?).arg(cuda_slice(weight)?);
                b.arg(&batch).arg(&channels).arg(&taps).arg(&inv);
                // SAFETY: arguments match `(float*, const float* x3, int x3, float)`; dpooled,
                // dgate and gate hold B*C floats, weight k.
                launch(kernel, unsafe { b.launch(launch_elements(e.batch * e.channels)) })?;

                let mut dx = dev.alloc(x.numel())?;
                let kernel = "eca_scale";
                let f = dev.function(KernelFamily::Eca, kernel)?;
                let mut b = dev.stream().launch_builder(&f);
                b.arg(&mut dx).arg(cuda_slice(dy)?).arg(cuda_slice(&saved.gate)?).arg(&dpooled);
                b.arg(&batch).arg(&pixels).arg(&channels);
                // SAFETY: arguments match `(float* out, const float* a, const float* gate, const
                // float* add, int batch, int pixels, int channels)`; dx and dy hold B*pixels*C
                // floats, gate and dpooled B*C (dpooled written above).
                launch(kernel, unsafe { b.launch(launch_elements(x.numel())) })?;
                Some(cuda_output(&dev, dx, x.shape()))
            } else {
                None
            };
            Ok((dx, cuda_output(&dev, dweight, weight.shape())))
        }
    }
}

/// CPU reference of `scale * sum_{pixels} a * (m or 1)` per (image, channel): one task per image,
/// pixels added in order in f64.
fn spatial_sums_cpu(e: Eca, a: &[f32], m: Option<&[f32]>, scale: f64) -> Vec<f32> {
    let image = e.pixels * e.channels;
    let mut out = vec![0.0f32; e.batch * e.channels];
    out.par_chunks_mut(e.channels).enumerate().for_each(|(b, out)| {
        let mut acc = vec![0.0f64; e.channels];
        for p in 0..e.pixels {
            let at = b * image + p * e.channels;
            let row = &a[at..][..e.channels];
            match m {
                Some(m) => acc.iter_mut().zip(row).zip(&m[at..]).for_each(|((s, &v), &w)| *s += v as f64 * w as f64),
                None => acc.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64),
            }
        }
        out.iter_mut().zip(&acc).for_each(|(o, s)| *o = (s * scale) as f32);
    });
    out
}

/// CPU reference of the gate: the channel convolution in f64, then the sigmoid.
fn gate_cpu(e: Eca, pooled: &[f32], weight: &[f32]) -> Vec<f32> {
    (0..e.batch * e.channels)
        .map(|at| {
            let (b, c) = (at / e.channels, at % e.channels);
            let z: f64 = (0..e.taps)
                .filter_map(|j| e.source(c, j).map(|s| weight[j] as f64 * pooled[b * e.channels + s] as f64))
                .sum();
            fastmath::sigmoid(z as f32)
        })
        .collect()
}

/// `a * gate[b,c] (+ add[b,c])` over `[B, pixels, C]`, one task per image.
fn scale_cpu(e: Eca, a: &[f32], gate: &[f32], add: Option<&[f32]>) -> Vec<f32> {
    let image = e.pixels * e.channels;
    let mut out = host_buffer(a.len());
    out.par_chunks_mut(image).zip(a.par_chunks(image)).enumerate().for_each(|(b, (out, a))| {
        let g = &gate[b * e.channels..][..e.channels];
        for (o_row, a_row) in out.chunks_mut(e.channels).zip(a.chunks(e.channels)) {
            match add {
                Some(add) => {
                    let add = &add[b * e.channels..][..e.channels];
                    for c in 0..e.channels {
                        o_row[c] = a_row[c] * g[c] + add[c];
                    }
                }
                None => o_row.iter_mut().zip(a_row).zip(g).for_each(|((o, &v), &gc)| *o = v * gc),
            }
        }
    });
    out
}
