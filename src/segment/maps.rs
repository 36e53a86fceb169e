//! From the model's per-sample logits to maps at the input's own resolution.
//!
//! Order matters: each draw's *logits* are resized bilinearly (PyTorch's `F.interpolate`,
//! `align_corners=False`), then `sigmoid`, then the mean over draws, then the entropy. Resizing
//! the thresholded mask or the probability instead would give blocky or differently shaped
//! maps; nearest-neighbour resizing is kept only for the mask, where the official evaluation uses
//! it ([`MaskResize::Official`], docs/model.md §7).

use crate::data::{self, Image8};
use crate::error::{Error, Result};
use crate::model::mean_probability_and_entropy;
use crate::ops;
use crate::tape::Tape;
use crate::tensor::Tensor;

/// How a segmentation's mask reaches the input's size: `predict` writes it and `eval` scores it,
/// so both read one definition.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum MaskResize {
    /// Threshold the mean probability at the model's resolution, then resize that mask
    /// nearest-neighbour (cv2's `INTER_NEAREST`) to the input's size: what the official
    /// evaluation scores, so the paper's figures are reproduced.
    #[default]
    Official,
    /// Threshold the full-resolution probability (each draw's logits resized bilinearly before
    /// the sigmoid and the mean): smoother outlines on inputs larger than the model's size.
    Bilinear,
}

impl MaskResize {
    /// Every choice, in the order the command line lists them.
    pub const ALL: [MaskResize; 2] = [MaskResize::Official, MaskResize::Bilinear];

    /// The name `--resize` takes.
    pub fn name(self) -> &'static str {
        match self {
            MaskResize::Official => "official",
            MaskResize::Bilinear => "bilinear",
        }
    }
}

impl std::fmt::Display for MaskResize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for MaskResize {
    type Err = Error;

    /// `official` or `bilinear`; anything else is an error that lists the choices.
    fn from_str(text: &str) -> Result<MaskResize> {
        MaskResize::ALL.into_iter().find(|mode| mode.name() == text).ok_or_else(|| {
            let names: Vec<&str> = MaskResize::ALL.iter().map(|m| m.name()).collect();
            Error::Invalid(format!("unknown mask resize `{text}`: expected one of {}", names.join(", ")))
        })
    }
}

/// The mask of [`MaskResize::Official`]: `model_probability > threshold` at the model's
/// `side` x `side`, resized nearest-neighbour to `width` x `height`.
pub fn mask_at_size(
    model_probability: &[f32],
    side: usize,
    threshold: f32,
    width: usize,
    height: usize,
) -> Result<Vec<bool>> {
    let bytes = model_probability.iter().map(|&p| u8::from(p > threshold)).collect();
    let small = Image8::from_raw(side, side, 1, bytes)?;
    Ok(data::resize_nearest(&small, width, height)?.data.into_iter().map(|v| v != 0).collect())
}

/// Binary entropy (nats) of a foreground probability, as the official code writes it:
/// `-(p ln(p + 1e-8) + (1 - p) ln(1 - p + 1e-8))`.
pub fn binary_entropy(p: f32) -> f32 {
    let q = 1.0 - p;
    -(p * (p + 1e-8).ln() + q * (q + 1e-8).ln())
}

/// Floats of resized logits (`samples x rows x width`) one band holds. The maps are made one band
/// of rows at a time so that memory grows with the input's pixels, not samples x pixels (a 5000 x
/// 5000 input at 30 samples would otherwise hold 3 GB of resized logits and as much again for
/// their sigmoids). 4 Mi floats keep a band's few temporaries near 64 MiB while a band still has
/// enough rows to keep every core busy.
const BAND_FLOATS: usize = 1 << 22;

/// Mean probability and uncertainty of batch item `item`, `height` x `width`, from the
/// `[S, B, h, w]` logits of every draw. Memory: the two maps plus one band of at most
/// [`BAND_FLOATS`] resized logits (and its temporaries), whatever the number of draws. Errors: an
/// item past the batch, a zero-sized target, maps too large to allocate. Non-finite model output
/// is refused once, where it is made ([`crate::model::MedClipSeg::predict_sampled`]): finite logits
/// give finite maps.
pub fn full_resolution_maps(logits: &Tensor, item: usize, width: usize, height: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let rows = (BAND_FLOATS / logits.dim(0).max(1) / width.max(1)).max(1);
    maps_in_bands(logits, item, width, height, rows)
}

/// [`full_resolution_maps`] made `band_rows` output rows at a time. Every pixel goes through the
/// same ops as a whole-image pass (resize, sigmoid, mean over the draws, entropy), each of which
/// computes a pixel from that pixel's own values alone, so the maps are bit for bit those of one
/// pass over the whole image, whatever `band_rows` is.
fn maps_in_bands(
    logits: &Tensor,
    item: usize,
    width: usize,
    height: usize,
    band_rows: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if logits.rank() != 4 || item >= logits.dim(1) {
        return Err(Error::shape("full_resolution_maps", format!("item {item} of logits {:?}", logits.shape())));
    }
    if width == 0 || height == 0 {
        return Err(Error::Invalid(format!("cannot make {width}x{height} maps")));
    }
    let tape = Tape::inference();
    let (h, w) = (logits.dim(2), logits.dim(3));
    let own = ops::narrow(&tape, logits, 1, item, 1)?; // [S, 1, h, w]
    let mut probability = map_buffer(width, height)?;
    let mut uncertainty = map_buffer(width, height)?;
    for start in (0..height).step_by(band_rows) {
        let rows = start..(start + band_rows).min(height);
        let band = if (h, w) == (height, width) {
            ops::narrow_forward(&own, 2, start, rows.len())?
        } else {
            ops::resize_bilinear_rows_forward(&own, height, width, rows)?
        };
        let (p, u) = mean_probability_and_entropy(&band)?;
        probability.extend(p.to_vec()?);
        uncertainty.extend(u.to_vec()?);
    }
    Ok((probability, uncertainty))
}

/// An empty map with room for `width x height` values, or an error naming the size when the
/// memory cannot be had (instead of the allocation abort a plain `Vec::with_capacity` would give).
fn map_buffer(width: usize, height: usize) -> Result<Vec<f32>> {
    let mut map = Vec::new();
    width
        .checked_mul(height)
        .ok_or(())
        .and_then(|n| map.try_reserve_exact(n).map_err(drop))
        .map_err(|()| Error::Invalid(format!("{width}x{height} maps do not fit in memory")))?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The maps as they were made before the bands: every draw resized whole, then one pass.
    fn whole_image_maps(logits: &Tensor, item: usize, width: usize, height: usize) -> (Vec<u32>, Vec<u32>) {
        let tape = Tape::inference();
        let (samples, h, w) = (logits.dim(0), logits.dim(2), logits.dim(3));
        let own = ops::narrow(&tape, logits, 1, item, 1).unwrap();
        let resized = if (h, w) == (height, width) {
            own
        } else {
            ops::resize_bilinear_nchw(&tape, &own, height, width).unwrap()
        };
        let resized = ops::reshape(&tape, &resized, &[samples, 1, height, width]).unwrap();
        let (p, u) = mean_probability_and_entropy(&resized).unwrap();
        (bits(&p.to_vec().unwrap()), bits(&u.to_vec().unwrap()))
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    fn logits(samples: usize, batch: usize, h: usize, w: usize) -> Tensor {
        let mut values = vec![0.0f32; samples * batch * h * w];
        crate::philox::fill_normal(5, 9, &mut values);
        // Logits of a few units, as a model gives: every sigmoid in (0, 1) and well off 0.5.
        values.iter_mut().for_each(|v| *v *= 4.0);
        Tensor::from_vec(values, &[samples, batch, h, w]).unwrap()
    }

    #[test]
    fn bands_give_the_whole_image_maps_bit_for_bit() {
        let x = logits(5, 2, 8, 8);
        // Up, down, odd ratios, and the model's own size (no resize); bands of one row, of a few
        // rows that leave a short last band, and one band for everything.
        for (width, height) in [(37, 23), (5, 3), (8, 8), (61, 64)] {
            let want = whole_image_maps(&x, 1, width, height);
            for band_rows in [1, 3, 7, height] {
                let (p, u) = maps_in_bands(&x, 1, width, height, band_rows).unwrap();
                assert!(
                    (bits(&p), bits(&u)) == want,
                    "{width}x{height} in bands of {band_rows} rows differs from one pass"
                );
            }
        }
    }

    #[test]
    fn maps_too_large_for_memory_are_an_error() {
        let message = map_buffer(usize::MAX / 2, 3).unwrap_err().to_string();
        assert!(message.contains("do not fit in memory"), "{message}");
    }
}
