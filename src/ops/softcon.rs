//! The soft patch-level contrastive loss L_SoftCon (docs/model.md §4.2) as one fused op.
//! Kernels: `kernels/softcon.cu`. Tests: `tests/softcon.rs`.
//!
//! With `z` the projected patch tokens `[B, N, E]` (CLS removed) and `t` the raw text embeddings
//! `[B, E]`:
//! ```text
//! P_b   = (1/N) sum_n z_bn / ||z_bn||            mean of unit patch tokens, NOT re-normalised
//! A     = P t^T / tau                            image->text logits; the text->image ones are A^T
//! Y     = softmax_row(S / ||S||_row), S = t t^T / tau      soft targets, no gradient through them
//! L_i2t = -(1/B) sum_ij Y_ij log softmax_row(A)_ij
//! L_t2i = -(1/B) sum_ij (Y^T)_ij log softmax_row(A^T)_ij
//! loss  = (L_i2t + L_t2i) / 2
//! ```
//! The forward also produces `d loss / d A`, which depends on forward quantities only, so the
//! backward is two small products with it (to `P` and `t`) and the chain through the mean and the
//! normalisation of every patch token.

use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use super::{cuda_output, cuda_slice, launch, same_device};
use crate::cuda::{launch_elements, launch_rows, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

/// `L_SoftCon` of `patch_tokens` `[B, N, E]` and `text` `[B, E]` at `temperature` (> 0), a
/// scalar. Gradients flow to both inputs through the logits; the soft targets are constants.
pub fn soft_contrastive_loss(tape: &Tape, patch_tokens: &Tensor, text: &Tensor, temperature: f32) -> Result<Tensor> {
    let (loss, saved) = soft_contrastive_forward(patch_tokens, text, temperature)?;
    let (z, t) = (patch_tokens.clone(), text.clone());
    Ok(tape.record(loss, &[patch_tokens, text], move |dy| {
        let (dz, dt) = soft_contrastive_backward(&z, &t, &saved, temperature, dy)?;
        Ok(vec![Some(dz), Some(dt)])
    }))
}

/// What the forward keeps for the backward.
pub struct SoftConSaved {
    /// `||z_bn||`, `[B, N]`.
    pub patch_norms: Tensor,
    /// `P`, `[B, E]`.
    pub patch_mean: Tensor,
    /// `d loss / d A` for the image->text logits `A`, `[B, B]`.
    pub logit_grad: Tensor,
}

/// Batch, tokens per image and width, after checking the shapes and the temperature.
fn dims(op: &'static str, patch_tokens: &Tensor, text: &Tensor, temperature: f32) -> Result<(usize, usize, usize)> {
    let &[batch, tokens, width] = patch_tokens.shape() else {
        return Err(Error::shape(op, format!("patch tokens must be [B, N, E], got {:?}", patch_tokens.shape())));
    };
    if text.shape() != [batch, width] {
        return Err(Error::shape(
            op,
            format!("text {:?} does not fit patch tokens {:?} (expected [B, E])", text.shape(), patch_tokens.shape()),
        ));
    }
    if batch == 0 || tokens == 0 || width == 0 {
        return Err(Error::shape(op, format!("needs non-empty patch tokens, got {:?}", patch_tokens.shape())));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::Invalid(format!("{op}: temperature must be finite and > 0, got {temperature}")));
    }
    for value in [batch * batch * 2 + batch * 3, batch * tokens, width] {
        i32::try_from(value)
            .map_err(|_| Error::shape(op, format!("size {value} exceeds the kernels' 32-bit limit")))?;
    }
    Ok((batch, tokens, width))
}

/// Threads per row of `width` columns.
fn row_threads(width: usize) -> u32 {
    (width.div_ceil(4).next_power_of_two() as u32).clamp(32, 1024)
}

/// Untracked forward: the scalar loss and what the backward needs.
pub fn soft_contrastive_forward(
    patch_tokens: &Tensor,
    text: &Tensor,
    temperature: f32,
) -> Result<(Tensor, SoftConSaved)> {
    const OP: &str = "soft_contrastive_loss";
    let (batch, tokens, width) = dims(OP, patch_tokens, text, temperature)?;
    let inv_tau = 1.0 / temperature;
    match same_device(OP, &[patch_tokens, text])? {
        Device::Cpu => {
            let (zs, ts) = (patch_tokens.cpu_data(OP)?, text.cpu_data(OP)?);
            let (norms, mean) = cpu_patch_mean(zs, tokens, width);
            let t64: Vec<f64> = ts.iter().map(|&v| v as f64).collect();
            let (loss, grad) = cpu_pairs(&mean, &t64, batch, width, inv_tau as f64);
            let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let saved = SoftConSaved {
                patch_norms: Tensor::from_vec(to_f32(&norms), &[batch, tokens])?,
                patch_mean: Tensor::from_vec(to_f32(&mean), &[batch, width])?,
                logit_grad: Tensor::from_vec(to_f32(&grad), &[batch, batch])?,
            };
            Ok((Tensor::from_vec(vec![loss as f32], &[])?, saved))
        }
        Device::Cuda(dev) => {
            let (b_i, n_i, e_i) = (batch as i32, tokens as i32, width as i32); // fit: checked by dims
            let (mut mean, mut norms) = (dev.alloc(batch * width)?, dev.alloc(batch * tokens)?);
            let f = dev.function(KernelFamily::Softcon, "softcon_patch_mean")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut mean).arg(&mut norms).arg(cuda_slice(patch_tokens)?).arg(&n_i).arg(&e_i);
            // SAFETY: arguments match `softcon_patch_mean(float* mean, float* norms, const float* z,
            // int tokens, int width)`; z holds batch*tokens*width floats, mean batch*width, norms
            // batch*tokens; one block per image.
            launch("softcon_patch_mean", unsafe { b.launch(launch_rows(batch, 256)?) })?;

            let pairs = batch * batch;
            let (mut loss, mut grad) = (dev.alloc(1)?, dev.alloc(pairs)?);
            let mut scratch = dev.alloc(2 * pairs + 3 * batch)?;
            let f = dev.function(KernelFamily::Softcon, "softcon_pairs")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut loss).arg(&mut grad).arg(&mut scratch).arg(&mean).arg(cuda_slice(text)?);
            b.arg(&b_i).arg(&e_i).arg(&inv_tau);
            let threads = (pairs.next_power_of_two() as u32).clamp(32, 1024);
            // SAFETY: arguments match `softcon_pairs(float* loss, float* grad, float* scratch,
            // const float* mean, const float* text, int batch, int width, float inv_tau)`; mean and
            // text hold batch*width floats, grad batch^2, scratch 2*batch^2 + 3*batch, loss one.
            launch("softcon_pairs", unsafe { b.launch(launch_rows(1, threads)?) })?;
            let saved = SoftConSaved {
                patch_norms: cuda_output(&dev, norms, &[batch, tokens]),
                patch_mean: cuda_output(&dev, mean, &[batch, width]),
                logit_grad: cuda_output(&dev, grad, &[batch, batch]),
            };
            Ok((cuda_output(&dev, loss, &[]), saved))
        }
    }
}

/// Patch norms `[B*N]` and means of unit patch tokens `[B*E]`, in f64.
fn cpu_patch_mean(z: &[f32], tokens: usize, width: usize) -> (Vec<f64>, Vec<f64>) {
    let per_image: Vec<(Vec<f64>, Vec<f64>)> = z
        .par_chunks(tokens * width)
        .map(|image| {
            let mut mean = vec![0.0f64; width];
            let norms: Vec<f64> = image
                .chunks(width)
                .map(|row| {
                    let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                    mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64 / norm);
                    norm
                })
                .collect();
            mean.iter_mut().for_each(|m| *m /= tokens as f64);
            (norms, mean)
        })
        .collect();
    let norms = per_image.iter().flat_map(|(n, _)| n.iter().copied()).collect();
    let mean = per_image.iter().flat_map(|(_, m)| m.iter().copied()).collect();
    (norms, mean)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    max + values.map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// The soft targets `Y = softmax_row(S / ||S||_row)` for `S = t t^T / tau` (`[B*B]`, f64).
fn soft_targets(text: &[f64], batch: usize, width: usize, inv_tau: f64) -> Vec<f64> {
    let row = |i: usize| &text[i * width..][..width];
    let mut targets = Vec::with_capacity(batch * batch);
    for i in 0..batch {
        let sims: Vec<f64> = (0..batch).map(|j| dot(row(i), row(j)) * inv_tau).collect();
        let norm = dot(&sims, &sims).sqrt();
        let lse = log_sum_exp(sims.iter().map(|s| s / norm));
        targets.extend(sims.iter().map(|s| (s / norm - lse).exp()));
    }
    targets
}

/// The loss and `d loss / d A` (`[B*B]`) from the patch means and text embeddings, in f64.
fn cpu_pairs(mean: &[f64], text: &[f64], batch: usize, width: usize, inv_tau: f64) -> (f64, Vec<f64>) {
    let logits: Vec<f64> = (0..batch * batch)
        .map(|k| dot(&mean[(k / batch) * width..][..width], &text[(k % batch) * width..][..width]) * inv_tau)
        .collect();
    let targets = soft_targets(text, batch, width, inv_tau);
    let at = |i: usize, j: usize| logits[i * batch + j];
    let lse_row: Vec<f64> = (0..batch).map(|i| log_sum_exp((0..batch).map(|j| at(i, j)))).collect();
    let lse_col: Vec<f64> = (0..batch).map(|j| log_sum_exp((0..batch).map(|i| at(i, j)))).collect();
    let col_sum: Vec<f64> = (0..batch).map(|j| (0..batch).map(|i| targets[i * batch + j]).sum()).collect();
    let half_inv_batch = 0.5 / batch as f64;
    let mut loss = 0.0;
    let mut grad = vec![0.0; batch * batch];
    for i in 0..batch {
        for j in 0..batch {
            let (a, y) = (at(i, j), targets[i * batch + j]);
            loss -= y * ((a - lse_row[i]) + (a - lse_col[j]));
            grad[i * batch + j] =
                half_inv_batch * (((a - lse_row[i]).exp() - y) + ((a - lse_col[j]).exp() * col_sum[j] - y));
        }
    }
    (loss * half_inv_batch, grad)
}

/// Untracked backward: the gradients of `patch_tokens` and `text` for a scalar output gradient.
pub fn soft_contrastive_backward(
    patch_tokens: &Tensor,
    text: &Tensor,
    saved: &SoftConSaved,
    temperature: f32,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "soft_contrastive_backward";
    let (batch, tokens, width) = dims(OP, patch_tokens, text, temperature)?;
    if dy.numel() != 1 {
        return Err(Error::shape(OP, format!("gradient of a scalar loss must be a scalar, got {:?}", dy.shape())));
    }
    if saved.patch_norms.shape() != [batch, tokens]
        || saved.patch_mean.shape() != [batch, width]
        || saved.logit_grad.shape() != [batch, batch]
    {
        return Err(Error::shape(
            OP,
            format!(
                "saved tensors {:?}, {:?}, {:?} do not fit patch tokens {:?}",
                saved.patch_norms.shape(),
                saved.patch_mean.shape(),
                saved.logit_grad.shape(),
                patch_tokens.shape()
            ),
        ));
    }
    let inv_tau = 1.0 / temperature;
    let all = [patch_tokens, text, &saved.patch_norms, &saved.patch_mean, &saved.logit_grad, dy];
    match same_device(OP, &all)? {
        Device::Cpu => {
            let scale = dy.cpu_data(OP)?[0] as f64 * inv_tau as f64;
            let grad = saved.logit_grad.cpu_data(OP)?;
            let (mean, ts) = (saved.patch_mean.cpu_data(OP)?, text.cpu_data(OP)?);
            let g = |i: usize, j: usize| grad[i * batch + j] as f64;
            let mut d_mean = vec![0.0f64; batch * width];
            let mut d_text = vec![0.0f32; batch * width];
            for r in 0..batch {
                for c in 0..width {
                    d_mean[r * width + c] = scale * (0..batch).map(|k| g(r, k) * ts[k * width + c] as f64).sum::<f64>();
                    d_text[r * width + c] =
                        (scale * (0..batch).map(|k| g(k, r) * mean[k * width + c] as f64).sum::<f64>()) as f32;
                }
            }
            let (zs, norms) = (patch_tokens.cpu_data(OP)?, saved.patch_norms.cpu_data(OP)?);
            let mut dz = host_buffer(zs.len()); // every element is written below
            dz.par_chunks_mut(width).zip(zs.par_chunks(width)).enumerate().for_each(|(row, (out, zr))| {
                let norm = norms[row] as f64;
                let g = &d_mean[(row / tokens) * width..][..width];
                let u_dot_g = zr.iter().zip(g).map(|(&z, &gv)| z as f64 * gv).sum::<f64>() / norm;
                let scale = 1.0 / (tokens as f64 * norm);
                for ((o, &z), &gv) in out.iter_mut().zip(zr).zip(g) {
                    *o = ((gv - z as f64 / norm * u_dot_g) * scale) as f32;
                }
            });
            Ok((Tensor::from_vec(dz, patch_tokens.shape())?, Tensor::from_vec(d_text, text.shape())?))
        }
        Device::Cuda(dev) => {
            let (b_i, n_i, e_i) = (batch as i32, tokens as i32, width as i32); // fit: checked by dims
            let (mut d_mean, mut d_text) = (dev.alloc(batch * width)?, dev.alloc(batch * width)?);
            let f = dev.function(KernelFamily::Softcon, "softcon_backward_mean_text")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut d_mean).arg(&mut d_text).arg(cuda_slice(&saved.logit_grad)?);
            b.arg(cuda_slice(&saved.patch_mean)?).arg(cuda_slice(text)?).arg(cuda_slice(dy)?);
            b.arg(&b_i).arg(&e_i).arg(&inv_tau);
            // SAFETY: arguments match `softcon_backward_mean_text(float* d_mean, float* d_text,
            // const float* grad, const float* mean, const float* text, const float* dy, int batch,
            // int width, float inv_tau)`; grad holds batch^2 floats, the others batch*width, dy one
            // (shapes checked above).
            launch("softcon_backward_mean_text", unsafe { b.launch(launch_elements(batch * width)) })?;

            let mut dz = dev.alloc(patch_tokens.numel())?;
            let f = dev.function(KernelFamily::Softcon, "softcon_backward_patches")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dz).arg(cuda_slice(patch_tokens)?).arg(cuda_slice(&saved.patch_norms)?).arg(&d_mean);
            b.arg(&n_i).arg(&e_i);
            // SAFETY: arguments match `softcon_backward_patches(float* dz, const float* z,
            // const float* norms, const float* d_mean, int tokens, int width)`; dz and z hold
            // batch*tokens*width floats, norms batch*tokens, d_mean batch*width; one block per token.
            launch("softcon_backward_patches", unsafe { b.launch(launch_rows(batch * tokens, row_threads(width))?) })?;
            Ok((cuda_output(&dev, dz, patch_tokens.shape()), cuda_output(&dev, d_text, text.shape())))
        }
    }
}
