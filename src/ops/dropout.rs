//! Dropout whose mask is a pure function of (seed, stream, element index), drawn from the
//! Philox4x32-10 generator of [`crate::philox`]. Nothing is stored for the backward: it
//! regenerates the mask from the key. Kernel: `kernels/dropout.cu`. Tests: `tests/dropout.rs`.
//!
//! Element `i` is kept when `uniform(word i)` ≥ p, where word i is lane `i % 4` of the Philox
//! block `i / 4` (the same words [`crate::philox::normal_block`] turns into normals) and
//! [`uniform`] maps 32 bits to an odd multiple of 2^-24. A kept element becomes `x / (1 - p)`
//! (one multiplication by `1 / (1 - p)` rounded to f32), a dropped
//! one `x * 0`. The mask is integer arithmetic, one exact int-to-float conversion and one exact
//! comparison, and the output one correctly rounded product, so CPU and GPU agree bit for bit.

use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use super::{cuda_output, cuda_slice, launch, same_device};
use crate::cuda::{launch_elements, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::philox::{philox4x32_10, uniform};
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

/// Which Philox draws a dropout uses: the model seed and a stream id from [`dropout_stream_id`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub stream: u64,
}

/// Set in every dropout stream id and in no [`crate::philox::stream_id`] (whose draw field is
/// below 2^48, so its top 16 bits are zero): dropout masks never reuse the words of the
/// probabilistic attentions' noise.
const DROPOUT_STREAM_TAG: u64 = 1 << 63;
const SITE_BITS: u32 = 8;
const LAYER_BITS: u32 = 16;
const STEP_BITS: u32 = 63 - LAYER_BITS - SITE_BITS;

/// The stream of one dropout site: `2^63 | (step << 24) | (layer << 8) | site`, with `step` taken
/// modulo 2^39, the encoder `layer` below 2^16 and the `site` within a layer (hidden states,
/// attention probabilities, ...) below 2^8. The top bit keeps it apart from
/// [`crate::philox::stream_id`]'s space. Training passes its step's noise draw, `2^40 + step`,
/// whose low 39 bits are the step itself: distinct for 2^39 steps.
pub fn dropout_stream_id(step: u64, layer: u32, site: u32) -> u64 {
    // Wider layer or site fields would collide with their neighbours; models come nowhere near
    // (a dozen layers, a handful of sites).
    debug_assert!(layer < (1 << LAYER_BITS) && site < (1 << SITE_BITS), "dropout_stream_id fields out of range");
    let step = step & ((1 << STEP_BITS) - 1);
    DROPOUT_STREAM_TAG | (step << (LAYER_BITS + SITE_BITS)) | (u64::from(layer) << SITE_BITS) | u64::from(site)
}

/// The four Philox words of elements `4 * block .. 4 * block + 4` under `key`: the counter is
/// (block, stream) and the Philox key the seed, as `philox_words` in kernels/philox.cuh.
fn dropout_words(key: DropoutKey, block: u64) -> [u32; 4] {
    let counter = [block as u32, (block >> 32) as u32, key.stream as u32, (key.stream >> 32) as u32];
    philox4x32_10(counter, [key.seed as u32, (key.seed >> 32) as u32])
}

/// Whether dropout with probability `p` under `key` keeps element `index`.
pub fn dropout_keeps(key: DropoutKey, p: f32, index: u64) -> bool {
    uniform(dropout_words(key, index / 4)[(index % 4) as usize]) >= p
}

/// `x` with each element dropped with probability `p` and the survivors scaled by `1 / (1 - p)`.
/// `p` must lie in [0, 1); `p = 0` returns `x` itself and records nothing on the tape.
pub fn dropout(tape: &Tape, x: &Tensor, p: f32, key: DropoutKey) -> Result<Tensor> {
    check_probability(p)?;
    if p == 0.0 {
        return Ok(x.clone());
    }
    let y = dropout_forward(x, p, key)?;
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(dropout_backward(dy, p, key)?)])))
}

fn check_probability(p: f32) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("dropout: probability must lie in [0, 1), got {p}")))
    }
}

/// Untracked dropout forward.
pub fn dropout_forward(x: &Tensor, p: f32, key: DropoutKey) -> Result<Tensor> {
    check_probability(p)?;
    apply_mask("dropout", x, p, key)
}

/// Untracked dropout backward: `dy` through the same mask and scale, regenerated from `key`.
pub fn dropout_backward(dy: &Tensor, p: f32, key: DropoutKey) -> Result<Tensor> {
    check_probability(p)?;
    apply_mask("dropout_backward", dy, p, key)
}

/// The scale of a kept element, `1 / (1 - p)` rounded to f32 once.
fn keep_scale(p: f32) -> f32 {
    (1.0 / (1.0 - f64::from(p))) as f32
}

/// Philox blocks (4 elements each) per rayon task.
const BLOCKS_PER_TASK: usize = 4096;

/// `y[i] = x[i] * (keeps(i) ? scale : 0)`.
fn apply_mask(op: &'static str, x: &Tensor, p: f32, key: DropoutKey) -> Result<Tensor> {
    let scale = keep_scale(p);
    let n = x.numel();
    match same_device(op, &[x])? {
        Device::Cpu => {
            let xs = x.cpu_data(op)?;
            let mut y = host_buffer(n);
            y.par_chunks_mut(4 * BLOCKS_PER_TASK).zip(xs.par_chunks(4 * BLOCKS_PER_TASK)).enumerate().for_each(
                |(task, (yc, xc))| {
                    let first_block = (task * BLOCKS_PER_TASK) as u64;
                    for (offset, (yq, xq)) in yc.chunks_mut(4).zip(xc.chunks(4)).enumerate() {
                        let words = dropout_words(key, first_block + offset as u64);
                        for ((out, &v), &word) in yq.iter_mut().zip(xq).zip(&words) {
                            *out = v * if uniform(word) >= p { scale } else { 0.0 };
                        }
                    }
                },
            );
            Tensor::from_vec(y, x.shape())
        }
        Device::Cuda(dev) => {
            let mut y = dev.alloc(n)?;
            if n > 0 {
                let f = dev.function(KernelFamily::Dropout, "dropout_apply")?;
                let n_u64 = n as u64;
                let mut b = dev.stream().launch_builder(&f);
                b.arg(&mut y).arg(cuda_slice(x)?).arg(&n_u64).arg(&p).arg(&scale).arg(&key.seed).arg(&key.stream);
                // SAFETY: arguments match `dropout_apply(float* y, const float* x,
                // unsigned long long n, float p, float scale, unsigned long long seed,
                // unsigned long long stream)`; x and y hold n floats and the kernel touches only
                // elements 0..n. One thread per Philox block of 4 elements.
                launch("dropout_apply", unsafe { b.launch(launch_elements(n.div_ceil(4))) })?;
            }
            Ok(cuda_output(&dev, y, x.shape()))
        }
    }
}
