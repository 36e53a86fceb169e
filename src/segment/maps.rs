//! From the model's per-sample logits to maps at the input's own resolution.
//!
//! Order matters: each draw's *logits* are resized bilinearly (PyTorch's `F.interpolate`,
//! `align_corners=False`), then `sigmoid`, then the mean over draws, then the entropy. Resizing
//! the thresholded mask or the probability instead would give blocky or differently shaped
//! maps; nearest-neighbour resizing is kept only where the official evaluation uses it
//! (`eval::evaluate`, spec §7).

use crate::error::{Error, Result};
use crate::model::mean_probability_and_entropy;
use crate::ops;
use crate::tape::Tape;
use crate::tensor::Tensor;

/// Binary entropy (nats) of a foreground probability, as the official code writes it:
/// `-(p ln(p + 1e-8) + (1 - p) ln(1 - p + 1e-8))`.
pub fn binary_entropy(p: f32) -> f32 {
    let q = 1.0 - p;
    -(p * (p + 1e-8).ln() + q * (q + 1e-8).ln())
}

/// Mean probability and uncertainty of batch item `item`, `height` x `width`, from the
/// `[S, B, h, w]` logits of every draw. Errors: an item past the batch, a zero-sized target.
pub fn full_resolution_maps(logits: &Tensor, item: usize, width: usize, height: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    if logits.rank() != 4 || item >= logits.dim(1) {
        return Err(Error::shape("full_resolution_maps", format!("item {item} of logits {:?}", logits.shape())));
    }
    if width == 0 || height == 0 {
        return Err(Error::Invalid(format!("cannot make {width}x{height} maps")));
    }
    let tape = Tape::inference();
    let (samples, h, w) = (logits.dim(0), logits.dim(2), logits.dim(3));
    let own = ops::narrow(&tape, logits, 1, item, 1)?; // [S, 1, h, w]
    let resized = if (h, w) == (height, width) { own } else { ops::resize_bilinear_nchw(&tape, &own, height, width)? };
    let resized = ops::reshape(&tape, &resized, &[samples, 1, height, width])?;
    let (probability, uncertainty) = mean_probability_and_entropy(&resized)?;
    let probability = probability.to_vec()?;
    if probability.iter().any(|p| !p.is_finite()) {
        return Err(Error::Invalid(
            "the model produced non-finite probabilities (is the input image or the checkpoint damaged?)".into(),
        ));
    }
    Ok((probability, uncertainty.to_vec()?))
}
