//! Segmentation losses (docs/model.md §4.1): BCE with logits and soft Dice, each a scalar mean whose
//! gradient flows to the logits only (targets are data).
//! Kernels: `kernels/loss.cu`. Tests: `tests/loss.rs`.
//!
//! Soft Dice comes in two modes. [`DiceMode::Rows`] is what the official code computes: MONAI's
//! `DiceLoss(include_background=False, sigmoid=True)` applied to `[B, H, W]` tensors takes the
//! image rows for channels, drops row 0 and averages a soft Dice per remaining row (docs/model.md §4.1,
//! §10.1). [`DiceMode::Image`] is the per-image soft Dice the paper presumably meant.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::{cuda_output, cuda_slice, launch, same_device};
use crate::cuda::{launch_elements, launch_rows, KernelFamily, BLOCK};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::Tensor;

/// MONAI's `smooth_nr` and `smooth_dr`: added to the Dice numerator and denominator.
pub const DICE_SMOOTH: f32 = 1e-5;

/// Which pixels one soft Dice term covers.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DiceMode {
    /// One term per image row `1..H` (row 0 dropped), averaged over `B * (H - 1)`: the official
    /// code's behaviour.
    Rows,
    /// One term per image over all `H * W` pixels, averaged over `B`.
    Image,
}

/// `BCEWithLogitsLoss()(logits, target)`: the mean over all elements of
/// `max(x, 0) - x*y + log1p(exp(-|x|))`, a scalar. The gradient goes to `logits` only.
pub fn bce_with_logits(tape: &Tape, logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let loss = bce_with_logits_forward(logits, target)?;
    let (x, y) = (logits.clone(), target.clone());
    Ok(tape.record(loss, &[logits], move |dy| Ok(vec![Some(bce_with_logits_backward(&x, &y, dy)?)])))
}

/// Soft Dice loss of `sigmoid(logits)` against `target`, both `[B, H, W]`, smoothing
/// [`DICE_SMOOTH`] on both sides, as a scalar. The gradient goes to `logits` only.
pub fn soft_dice_loss(tape: &Tape, logits: &Tensor, target: &Tensor, mode: DiceMode) -> Result<Tensor> {
    let (loss, stats) = soft_dice_forward(logits, target, mode)?;
    let (x, y) = (logits.clone(), target.clone());
    Ok(tape.record(loss, &[logits], move |dy| Ok(vec![Some(soft_dice_backward(&x, &y, &stats, mode, dy)?)])))
}

/// Elements of `logits` and `target`, which must have the same non-empty shape.
fn paired_numel(op: &'static str, logits: &Tensor, target: &Tensor) -> Result<usize> {
    if logits.shape() != target.shape() {
        return Err(Error::shape(
            op,
            format!("logits of shape {:?} and target of shape {:?} differ", logits.shape(), target.shape()),
        ));
    }
    if logits.numel() == 0 {
        return Err(Error::shape(op, format!("cannot take the mean over empty shape {:?}", logits.shape())));
    }
    Ok(logits.numel())
}

/// The gradient of a scalar loss must itself be a one-element tensor.
fn check_scalar_grad(op: &'static str, dy: &Tensor) -> Result<()> {
    if dy.numel() != 1 {
        return Err(Error::shape(op, format!("gradient of a scalar loss must be a scalar, got {:?}", dy.shape())));
    }
    Ok(())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// PyTorch's numerically stable BCE-with-logits term.
fn bce_term(x: f64, y: f64) -> f64 {
    x.max(0.0) - x * y + (-x.abs()).exp().ln_1p()
}

/// Elements per CPU chunk: chunk sums are added in order, so the result does not depend on how
/// rayon schedules the chunks.
const CPU_CHUNK: usize = 1 << 14;
/// Most blocks of the first pass of the GPU BCE mean (the second pass is one block).
const BCE_MAX_BLOCKS: usize = 1024;

/// Untracked BCE-with-logits mean (CPU: f64 accumulation; GPU: two deterministic passes).
pub fn bce_with_logits_forward(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    const OP: &str = "bce_with_logits";
    let n = paired_numel(OP, logits, target)?;
    match same_device(OP, &[logits, target])? {
        Device::Cpu => {
            let (xs, ys) = (logits.cpu_data(OP)?, target.cpu_data(OP)?);
            let chunk_sums: Vec<f64> = xs
                .par_chunks(CPU_CHUNK)
                .zip(ys.par_chunks(CPU_CHUNK))
                .map(|(xc, yc)| xc.iter().zip(yc).map(|(&x, &y)| bce_term(x as f64, y as f64)).sum())
                .collect();
            Tensor::from_vec(vec![(chunk_sums.iter().sum::<f64>() / n as f64) as f32], &[])
        }
        Device::Cuda(dev) => {
            let blocks = n.div_ceil(BLOCK as usize).clamp(1, BCE_MAX_BLOCKS);
            let mut partial = dev.alloc(blocks)?;
            let n_i = n as i64;
            let f = dev.function(KernelFamily::Loss, "bce_partial")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut partial).arg(cuda_slice(logits)?).arg(cuda_slice(target)?).arg(&n_i);
            let config =
                LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: arguments match `bce_partial(float* partial, const float* x, const float* y,
            // long n)`; x and y hold n floats, partial one per block of the grid.
            launch("bce_partial", unsafe { b.launch(config) })?;
            super::reduce::scaled_sum_cuda(&dev, &partial, blocks, 1.0 / n as f64)
        }
    }
}

/// Untracked gradient of the BCE mean with respect to the logits: `dy * (sigmoid(x) - y) / n`.
pub fn bce_with_logits_backward(logits: &Tensor, target: &Tensor, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "bce_with_logits_backward";
    let n = paired_numel(OP, logits, target)?;
    check_scalar_grad(OP, dy)?;
    match same_device(OP, &[logits, target, dy])? {
        Device::Cpu => {
            let g = dy.cpu_data(OP)?[0] as f64 / n as f64;
            let dx = logits
                .cpu_data(OP)?
                .par_iter()
                .zip(target.cpu_data(OP)?.par_iter())
                .map(|(&x, &y)| (g * (sigmoid(x as f64) - y as f64)) as f32)
                .collect();
            Tensor::from_vec(dx, logits.shape())
        }
        Device::Cuda(dev) => {
            let mut dx = dev.alloc(n)?;
            let (n_i, inv_n) = (n as i64, (1.0 / n as f64) as f32);
            let f = dev.function(KernelFamily::Loss, "bce_backward")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dx).arg(cuda_slice(logits)?).arg(cuda_slice(target)?).arg(cuda_slice(dy)?).arg(&n_i).arg(&inv_n);
            // SAFETY: arguments match `bce_backward(float* dx, const float* x, const float* y,
            // const float* dy, long n, float inv_n)`; dx, x and y hold n floats, dy one.
            launch("bce_backward", unsafe { b.launch(launch_elements(n)) })?;
            Ok(cuda_output(&dev, dx, logits.shape()))
        }
    }
}

/// The per-term sums a soft Dice forward saves for its backward, each `[B, terms per image]`.
pub struct DiceStats {
    /// `2 * sum(p * y) + smooth` of each term.
    pub numerator: Tensor,
    /// `sum(p) + sum(y) + smooth` of each term.
    pub denominator: Tensor,
}

/// How the pixels of `[B, H, W]` split into Dice terms: each image holds `skip + per_image`
/// consecutive slabs of `len` pixels and the first `skip` slabs are dropped.
#[derive(Copy, Clone, Debug)]
struct DiceTerms {
    images: usize,
    per_image: usize,
    skip: usize,
    len: usize,
}

impl DiceTerms {
    fn of(op: &'static str, logits: &Tensor, target: &Tensor, mode: DiceMode) -> Result<DiceTerms> {
        paired_numel(op, logits, target)?;
        let &[images, height, width] = logits.shape() else {
            return Err(Error::shape(op, format!("needs logits of shape [B, H, W], got {:?}", logits.shape())));
        };
        let terms = match mode {
            DiceMode::Rows if height < 2 => {
                return Err(Error::shape(
                    op,
                    format!(
                        "row-wise Dice drops row 0 and needs H >= 2, got shape {:?} (H = {height})",
                        logits.shape()
                    ),
                ))
            }
            DiceMode::Rows => DiceTerms { images, per_image: height - 1, skip: 1, len: width },
            DiceMode::Image => DiceTerms { images, per_image: 1, skip: 0, len: height * width },
        };
        for value in [terms.per_image + terms.skip, terms.len, terms.count()] {
            i32::try_from(value)
                .map_err(|_| Error::shape(op, format!("size {value} exceeds the kernels' 32-bit limit")))?;
        }
        Ok(terms)
    }

    fn count(&self) -> usize {
        self.images * self.per_image
    }

    /// Index of the first pixel of term `t`.
    fn start(&self, t: usize) -> usize {
        ((t / self.per_image) * (self.per_image + self.skip) + t % self.per_image + self.skip) * self.len
    }

    /// The term pixel `i` belongs to, or `None` for a pixel of a dropped slab.
    fn term_of(&self, i: usize) -> Option<usize> {
        let image_len = (self.per_image + self.skip) * self.len;
        let slab = (i % image_len) / self.len;
        (slab >= self.skip).then(|| (i / image_len) * self.per_image + slab - self.skip)
    }

    fn stats_shape(&self) -> [usize; 2] {
        [self.images, self.per_image]
    }

    fn kernel_args(&self) -> (i32, i32, i32) {
        // All three fit: checked by `of`.
        (self.per_image as i32, self.skip as i32, self.len as i32)
    }
}

/// Threads per Dice term: enough to keep a warp busy on short rows without idling on long ones.
fn term_threads(len: usize) -> u32 {
    (len.div_ceil(4).next_power_of_two() as u32).clamp(32, 1024)
}

/// Untracked soft Dice forward: the scalar loss and the sums its backward needs.
pub fn soft_dice_forward(logits: &Tensor, target: &Tensor, mode: DiceMode) -> Result<(Tensor, DiceStats)> {
    const OP: &str = "soft_dice_loss";
    let terms = DiceTerms::of(OP, logits, target, mode)?;
    let count = terms.count();
    let smooth = DICE_SMOOTH as f64;
    match same_device(OP, &[logits, target])? {
        Device::Cpu => {
            let (xs, ys) = (logits.cpu_data(OP)?, target.cpu_data(OP)?);
            let sums: Vec<(f64, f64)> = (0..count)
                .into_par_iter()
                .map(|t| {
                    let range = terms.start(t)..terms.start(t) + terms.len;
                    let (mut overlap, mut total) = (0.0f64, 0.0f64);
                    for (&x, &y) in xs[range.clone()].iter().zip(&ys[range]) {
                        let p = sigmoid(x as f64);
                        overlap += p * y as f64;
                        total += p + y as f64;
                    }
                    (2.0 * overlap + smooth, total + smooth)
                })
                .collect();
            let loss = sums.iter().map(|(num, den)| 1.0 - num / den).sum::<f64>() / count as f64;
            let stats = DiceStats {
                numerator: Tensor::from_vec(sums.iter().map(|s| s.0 as f32).collect(), &terms.stats_shape())?,
                denominator: Tensor::from_vec(sums.iter().map(|s| s.1 as f32).collect(), &terms.stats_shape())?,
            };
            Ok((Tensor::from_vec(vec![loss as f32], &[])?, stats))
        }
        Device::Cuda(dev) => {
            let (mut dice, mut num, mut den) = (dev.alloc(count)?, dev.alloc(count)?, dev.alloc(count)?);
            let (per_image, skip, len) = terms.kernel_args();
            let f = dev.function(KernelFamily::Loss, "dice_groups_forward")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dice).arg(&mut num).arg(&mut den).arg(cuda_slice(logits)?).arg(cuda_slice(target)?);
            b.arg(&per_image).arg(&skip).arg(&len).arg(&DICE_SMOOTH);
            // SAFETY: arguments match `dice_groups_forward(float* dice, float* numerator,
            // float* denominator, const float* x, const float* y, int groups_per_image, int skip,
            // int len, float smooth)`; x and y hold images * (per_image + skip) * len floats, the
            // three outputs one per term (= block).
            launch("dice_groups_forward", unsafe { b.launch(launch_rows(count, term_threads(terms.len))?) })?;
            let loss = super::reduce::scaled_sum_cuda(&dev, &dice, count, 1.0 / count as f64)?;
            let shape = terms.stats_shape();
            let stats =
                DiceStats { numerator: cuda_output(&dev, num, &shape), denominator: cuda_output(&dev, den, &shape) };
            Ok((loss, stats))
        }
    }
}

/// Untracked gradient of the soft Dice loss with respect to the logits, from the forward's sums:
/// `dy / terms * (num - 2*y*den) / den^2 * p * (1 - p)` in kept terms, 0 in dropped rows.
pub fn soft_dice_backward(
    logits: &Tensor,
    target: &Tensor,
    stats: &DiceStats,
    mode: DiceMode,
    dy: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "soft_dice_backward";
    let terms = DiceTerms::of(OP, logits, target, mode)?;
    check_scalar_grad(OP, dy)?;
    let want = terms.stats_shape();
    if stats.numerator.shape() != want || stats.denominator.shape() != want {
        return Err(Error::shape(
            OP,
            format!(
                "saved sums {:?} / {:?} do not fit {} terms of logits {:?}",
                stats.numerator.shape(),
                stats.denominator.shape(),
                terms.count(),
                logits.shape()
            ),
        ));
    }
    let n = logits.numel();
    let inv_terms = 1.0 / terms.count() as f64;
    match same_device(OP, &[logits, target, &stats.numerator, &stats.denominator, dy])? {
        Device::Cpu => {
            let (xs, ys) = (logits.cpu_data(OP)?, target.cpu_data(OP)?);
            let (num, den) = (stats.numerator.cpu_data(OP)?, stats.denominator.cpu_data(OP)?);
            let g = dy.cpu_data(OP)?[0] as f64 * inv_terms;
            let dx = (0..n)
                .into_par_iter()
                .map(|i| match terms.term_of(i) {
                    None => 0.0,
                    Some(t) => {
                        let (nu, de) = (num[t] as f64, den[t] as f64);
                        let p = sigmoid(xs[i] as f64);
                        (g * (nu - 2.0 * ys[i] as f64 * de) / (de * de) * p * (1.0 - p)) as f32
                    }
                })
                .collect();
            Tensor::from_vec(dx, logits.shape())
        }
        Device::Cuda(dev) => {
            let mut dx = dev.alloc(n)?;
            let (per_image, skip, len) = terms.kernel_args();
            let (n_i, inv_f) = (n as i64, inv_terms as f32);
            let f = dev.function(KernelFamily::Loss, "dice_groups_backward")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&mut dx).arg(cuda_slice(logits)?).arg(cuda_slice(target)?);
            b.arg(cuda_slice(&stats.numerator)?).arg(cuda_slice(&stats.denominator)?).arg(cuda_slice(dy)?);
            b.arg(&n_i).arg(&per_image).arg(&skip).arg(&len).arg(&inv_f);
            // SAFETY: arguments match `dice_groups_backward(float* dx, const float* x,
            // const float* y, const float* numerator, const float* denominator, const float* dy,
            // long n, int groups_per_image, int skip, int len, float inv_groups)`; dx, x and y hold
            // n floats, the sums one per term (shapes checked above), dy one.
            launch("dice_groups_backward", unsafe { b.launch(launch_elements(n)) })?;
            Ok(cuda_output(&dev, dx, logits.shape()))
        }
    }
}
