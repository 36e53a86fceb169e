//! The DHN-NCE loss (decoupled hard-negative NCE) with which MedCLIP-SAMv2 fine-tunes the CLIP
//! towers on image–caption pairs, as one fused op.
//! Kernels: `kernels/dhn_nce.cu`. Tests: `tests/dhn_nce.rs`.
//!
//! With image embeddings `v` and text embeddings `t`, both `[B, D]` and already L2-normalised by
//! the caller, `S = v t^T / tau`, and `beta1`, `beta2` the image and text hardness:
//! ```text
//! L    = L_vt + L_tv
//! L_vt = -(1/B) sum_i [ S_ii - log sum_{j != i} w_ij exp(S_ij) ]
//! w_ij = (B - 1) exp(beta1 S_ij) / sum_{k != i} exp(beta1 S_ik)
//! ```
//! and `L_tv` the same over the columns of `S` (the rows of `S^T`) with `beta2`. The positive pair
//! is not in the denominator ("decoupled"). Written out, the weighted sum is a difference of two
//! off-diagonal log-sum-exps, which is what the kernels compute (each max-subtracted, so stable
//! for any temperature):
//! ```text
//! log sum_{j != i} w_ij exp(S_ij) = log(B - 1) + LSE_{j != i}((1 + beta) S_ij) - LSE_{j != i}(beta S_ij)
//! ```
//! The similarity GEMM and the two input-gradient GEMMs go through [`matmul_forward`] (cuBLAS on
//! the GPU); the log-sum-exps, the loss and `dL/dS` are the family's kernels.

use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use super::{cuda_output, cuda_slice, kernel_int, launch, matmul_forward, same_device, MatmulOpts};
use crate::cuda::{launch_elements, launch_rows, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

/// Temperature and hardness of [`dhn_nce_loss`].
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct DhnNceConfig {
    /// `tau`: the similarities are divided by it. Must be finite and > 0.
    pub temperature: f32,
    /// `beta1`, the hardness of the image->text negatives: 0 weighs every negative alike, larger
    /// values weigh the negatives most similar to the image more. Must be finite.
    pub beta_image: f32,
    /// `beta2`, the same for the text->image direction. Must be finite.
    pub beta_text: f32,
}

impl Default for DhnNceConfig {
    /// MedCLIP-SAMv2's values: `tau = 0.6`, `beta1 = beta2 = 0.15`.
    fn default() -> Self {
        DhnNceConfig { temperature: 0.6, beta_image: 0.15, beta_text: 0.15 }
    }
}

/// What the forward keeps for the backward.
#[derive(Clone, Debug)]
pub struct DhnNceSaved {
    /// `S = v t^T / tau`, `[B, B]`.
    pub similarity: Tensor,
    /// The off-diagonal log-sum-exps, `[4, B]`: per row `i` of `S`, `LSE_{j != i}((1 + beta1) S_ij)`
    /// then `LSE_{j != i}(beta1 S_ij)`; per column `j`, `LSE_{i != j}((1 + beta2) S_ij)` then
    /// `LSE_{i != j}(beta2 S_ij)`.
    pub log_sum_exps: Tensor,
}

/// The DHN-NCE loss `L_vt + L_tv` (module docs) of `image` and `text` embeddings, both `[B, D]`
/// with `B >= 2`, as a scalar `[]` tensor. The op does not normalise its inputs: pass unit rows.
///
/// Gradients flow to both inputs through `S`, and through the hard-negative weights `w` as well:
/// they depend on `S` and are differentiated like everything else, not held constant.
pub fn dhn_nce_loss(tape: &Tape, image: &Tensor, text: &Tensor, config: DhnNceConfig) -> Result<Tensor> {
    let (loss, saved) = dhn_nce_forward(image, text, config)?;
    let (v, t) = (image.clone(), text.clone());
    Ok(tape.record(loss, &[image, text], move |dy| {
        let (dv, dt) = dhn_nce_backward(&v, &t, &saved, config, dy)?;
        Ok(vec![Some(dv), Some(dt)])
    }))
}

/// Batch and width after checking the shapes and the configuration.
fn dims(op: &'static str, image: &Tensor, text: &Tensor, config: DhnNceConfig) -> Result<(usize, usize)> {
    let &[batch, width] = image.shape() else {
        return Err(Error::shape(op, format!("image embeddings must be [B, D], got {:?}", image.shape())));
    };
    if text.shape() != image.shape() {
        return Err(Error::shape(
            op,
            format!(
                "text embeddings {:?} must have the shape of the image embeddings {:?}",
                text.shape(),
                image.shape()
            ),
        ));
    }
    if batch < 2 {
        return Err(Error::shape(
            op,
            format!("needs a batch of at least 2 pairs (each pair's negatives are the others), got batch size {batch}"),
        ));
    }
    if width == 0 {
        return Err(Error::shape(op, format!("needs non-empty embeddings, got {:?}", image.shape())));
    }
    let DhnNceConfig { temperature, beta_image, beta_text } = config;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::Invalid(format!("{op}: temperature must be finite and > 0, got {temperature}")));
    }
    if !(beta_image.is_finite() && beta_text.is_finite()) {
        return Err(Error::Invalid(format!(
            "{op}: beta_image and beta_text must be finite, got {beta_image} and {beta_text}"
        )));
    }
    // The kernels index the [4, B] statistics with `int` offsets.
    kernel_int(op, "4 * batch", 4 * batch)?;
    Ok((batch, width))
}

/// Threads per row of `batch` similarities: about four per thread, at least a warp, at most 1024.
fn row_threads(batch: usize) -> u32 {
    (batch.div_ceil(4).next_power_of_two() as u32).clamp(32, 1024)
}

/// Untracked forward: the scalar loss and what [`dhn_nce_backward`] needs.
pub fn dhn_nce_forward(image: &Tensor, text: &Tensor, config: DhnNceConfig) -> Result<(Tensor, DhnNceSaved)> {
    const OP: &str = "dhn_nce_loss";
    let (batch, _) = dims(OP, image, text, config)?;
    let device = same_device(OP, &[image, text])?;
    let opts = MatmulOpts { transpose_b: true, alpha: 1.0 / config.temperature, ..Default::default() };
    let similarity = matmul_forward(image, text, opts)?;
    match device {
        Device::Cpu => {
            let (lse, loss) = cpu_log_sum_exps(similarity.cpu_data(OP)?, batch, config);
            let log_sum_exps = Tensor::from_vec(lse, &[4, batch])?;
            Ok((Tensor::from_vec(vec![loss as f32], &[])?, DhnNceSaved { similarity, log_sum_exps }))
        }
        Device::Cuda(dev) => {
            let batch_i = batch as i32; // fits: dims checked 4 * batch
            let log_negatives = ((batch - 1) as f64).ln() as f32;
            let (mut lse, mut terms) = (dev.alloc(4 * batch)?, dev.alloc(2 * batch)?);
            let f = dev.function(KernelFamily::DhnNce, "dhn_nce_log_sum_exps")?;
            for (direction, beta) in [(0i32, config.beta_image), (1, config.beta_text)] {
                let mut b = dev.stream().launch_builder(&f);
                b.arg(&mut lse).arg(&mut terms).arg(cuda_slice(&similarity)?);
                b.arg(&batch_i).arg(&direction).arg(&beta).arg(&log_negatives);
                // SAFETY: arguments match `dhn_nce_log_sum_exps(float* lse, float* terms,
                // const float* sim, int batch, int direction, float beta, float log_negatives)`;
                // sim holds batch^2 floats, lse 4*batch, terms 2*batch, and the grid has one block
                // per row (index < batch) of the direction's view.
                launch("dhn_nce_log_sum_exps", unsafe { b.launch(launch_rows(batch, row_threads(batch))?) })?;
            }
            let (count, scale) = (2 * batch_i, 1.0f32 / batch as f32);
            let mut loss = dev.alloc(1)?;
            let f = dev.function(KernelFamily::DhnNce, "dhn_nce_sum")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut loss).arg(&terms).arg(&count).arg(&scale);
            // SAFETY: arguments match `dhn_nce_sum(float* loss, const float* terms, int count,
            // float scale)`; terms holds count = 2*batch floats (both directions written above),
            // loss one; a single block.
            launch("dhn_nce_sum", unsafe { b.launch(launch_rows(1, row_threads(2 * batch))?) })?;
            let log_sum_exps = cuda_output(&dev, lse, &[4, batch]);
            Ok((cuda_output(&dev, loss, &[]), DhnNceSaved { similarity, log_sum_exps }))
        }
    }
}

/// `LSE_{j != i}(scale * S_ij)` over row `i` of a view of `S`, in f64 with the maximum subtracted.
fn off_diagonal_lse(entry: impl Fn(usize) -> f64, batch: usize, i: usize, scale: f64) -> f64 {
    let others = || (0..batch).filter(move |&j| j != i).map(|j| scale * entry(j));
    let max = others().fold(f64::NEG_INFINITY, f64::max);
    max + others().map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// CPU reference of the forward kernels: the `[4, B]` log-sum-exps (rounded to f32, as saved)
/// and the loss, both computed in f64 from the f32 similarities. The terms are added in index
/// order, so the result does not depend on the thread count.
fn cpu_log_sum_exps(sim: &[f32], batch: usize, config: DhnNceConfig) -> (Vec<f32>, f64) {
    let log_negatives = ((batch - 1) as f64).ln();
    let per_row: Vec<(f64, f64, f64)> = (0..2 * batch)
        .into_par_iter()
        .map(|k| {
            let (direction, i) = (k / batch, k % batch);
            // Entry (i, j) of the direction's view of S lies at sim[i * row_stride + j * col_stride].
            let (beta, row_stride, col_stride) =
                if direction == 0 { (config.beta_image, batch, 1) } else { (config.beta_text, 1, batch) };
            let (beta, entry) = (beta as f64, |j: usize| sim[i * row_stride + j * col_stride] as f64);
            let sharp = off_diagonal_lse(entry, batch, i, 1.0 + beta);
            let smooth = off_diagonal_lse(entry, batch, i, beta);
            (sharp, smooth, -(sim[i * (batch + 1)] as f64) + log_negatives + (sharp - smooth))
        })
        .collect();
    let mut lse = vec![0.0f32; 4 * batch];
    for (k, &(sharp, smooth, _)) in per_row.iter().enumerate() {
        let (direction, i) = (k / batch, k % batch);
        lse[2 * direction * batch + i] = sharp as f32;
        lse[(2 * direction + 1) * batch + i] = smooth as f32;
    }
    let loss = per_row.iter().map(|&(_, _, term)| term).sum::<f64>() / batch as f64;
    (lse, loss)
}

/// Untracked backward: the gradients of `image` and `text` for the scalar output gradient `dy`,
/// from the saved similarities and log-sum-exps. Differentiates through the hard-negative
/// weights (they are functions of `S`, not constants).
pub fn dhn_nce_backward(
    image: &Tensor,
    text: &Tensor,
    saved: &DhnNceSaved,
    config: DhnNceConfig,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "dhn_nce_backward";
    let (batch, _) = dims(OP, image, text, config)?;
    if dy.numel() != 1 {
        return Err(Error::shape(OP, format!("gradient of a scalar loss must be a scalar, got {:?}", dy.shape())));
    }
    if saved.similarity.shape() != [batch, batch] || saved.log_sum_exps.shape() != [4, batch] {
        return Err(Error::shape(
            OP,
            format!(
                "saved similarity {:?} and log-sum-exps {:?} do not fit embeddings {:?} (expected [{batch}, {batch}] and [4, {batch}])",
                saved.similarity.shape(),
                saved.log_sum_exps.shape(),
                image.shape()
            ),
        ));
    }
    let dsim = match same_device(OP, &[image, text, &saved.similarity, &saved.log_sum_exps, dy])? {
        Device::Cpu => {
            let dy = dy.cpu_data(OP)?[0];
            let sim = saved.similarity.cpu_data(OP)?;
            let lse = saved.log_sum_exps.cpu_data(OP)?;
            Tensor::from_vec(cpu_similarity_grad(sim, lse, batch, config, dy), &[batch, batch])?
        }
        Device::Cuda(dev) => {
            let batch_i = batch as i32; // fits: dims checked 4 * batch
            let mut dsim = dev.alloc(batch * batch)?;
            let f = dev.function(KernelFamily::DhnNce, "dhn_nce_backward")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dsim).arg(cuda_slice(&saved.similarity)?).arg(cuda_slice(&saved.log_sum_exps)?);
            b.arg(cuda_slice(dy)?).arg(&batch_i).arg(&config.beta_image).arg(&config.beta_text);
            // SAFETY: arguments match `dhn_nce_backward(float* dsim, const float* sim,
            // const float* lse, const float* dy, int batch, float beta_image, float beta_text)`;
            // dsim and sim hold batch^2 floats, lse 4*batch, dy one (shapes checked above); the
            // kernel's grid-stride loop covers the batch^2 entries with long indices.
            launch("dhn_nce_backward", unsafe { b.launch(launch_elements(batch * batch)) })?;
            cuda_output(&dev, dsim, &[batch, batch])
        }
    };
    // S = v t^T / tau, so dv = dS t / tau and dt = dS^T v / tau.
    let alpha = 1.0 / config.temperature;
    let d_image = matmul_forward(&dsim, text, MatmulOpts { alpha, ..Default::default() })?;
    let d_text = matmul_forward(&dsim, image, MatmulOpts { transpose_a: true, alpha, ..Default::default() })?;
    Ok((d_image, d_text))
}

/// CPU reference of `dhn_nce_backward`'s kernel: `dL/dS` scaled by `dy`, each entry in f64.
fn cpu_similarity_grad(sim: &[f32], lse: &[f32], batch: usize, config: DhnNceConfig, dy: f32) -> Vec<f32> {
    let g = dy as f64 / batch as f64;
    let (b1, b2) = (config.beta_image as f64, config.beta_text as f64);
    let stat = |which: usize, i: usize| lse[which * batch + i] as f64;
    let mut dsim = host_buffer(batch * batch); // every entry is written below
    dsim.par_chunks_mut(batch).enumerate().for_each(|(i, out)| {
        for (j, o) in out.iter_mut().enumerate() {
            if i == j {
                *o = (-2.0 * g) as f32;
                continue;
            }
            let s = sim[i * batch + j] as f64;
            let image_to_text = (1.0 + b1) * ((1.0 + b1) * s - stat(0, i)).exp() - b1 * (b1 * s - stat(1, i)).exp();
            let text_to_image = (1.0 + b2) * ((1.0 + b2) * s - stat(2, j)).exp() - b2 * (b2 * s - stat(3, j)).exp();
            *o = (g * (image_to_text + text_to_image)) as f32;
        }
    });
    dsim
}
