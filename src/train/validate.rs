//! Validation as the official code does it (docs/model.md §5, §6): one stochastic pass (draw 0), the mean
//! probability thresholded at 0.5, Dice per image (both empty counts as 1), averaged.

use std::sync::Arc;

use super::step::DeviceBatch;
use crate::data::{RawSample, SampleSource};
use crate::error::Result;
use crate::model::MedClipSeg;

/// A dataset whose sample `i` carries the prompt of sample `i + 1` (cyclically): the text
/// ablation. A model that reads the prompt loses Dice on it; one that ignores the text does not.
pub struct ShiftedPrompts(pub Arc<dyn SampleSource>);

impl SampleSource for ShiftedPrompts {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn load(&self, index: usize, size: usize) -> Result<RawSample> {
        let mut sample = self.0.load(index, size)?;
        let donor = self.0.load((index + 1) % self.0.len().max(1), size)?;
        sample.prompt = donor.prompt;
        Ok(sample)
    }
}

/// Dice of the binary masks `predicted` and `truth` (same length); 1 when both are empty.
pub fn dice(predicted: &[bool], truth: &[bool]) -> f32 {
    let (mut both, mut total) = (0usize, 0usize);
    for (&p, &t) in predicted.iter().zip(truth) {
        both += (p && t) as usize;
        total += p as usize + t as usize;
    }
    if total == 0 {
        1.0
    } else {
        2.0 * both as f32 / total as f32
    }
}

/// Per-image Dice of one batch's thresholded one-sample prediction (noise draw 0 of `seed`, as
/// `predict --samples 1` draws it).
pub fn batch_dice(model: &MedClipSeg, batch: &DeviceBatch, seed: u64, threshold: f32) -> Result<Vec<f32>> {
    let prediction = model.predict(&batch.pixels, &batch.ids, seed, 1)?;
    let probability = prediction.probability.to_vec()?;
    let masks = batch.masks.to_vec()?;
    let pixels = masks.len() / batch.len().max(1);
    Ok(probability
        .chunks(pixels)
        .zip(masks.chunks(pixels))
        .map(|(p, m)| {
            let predicted: Vec<bool> = p.iter().map(|&v| v > threshold).collect();
            let truth: Vec<bool> = m.iter().map(|&v| v > 0.5).collect();
            dice(&predicted, &truth)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::dice;

    #[test]
    fn dice_of_hand_made_masks() {
        assert_eq!(dice(&[false; 4], &[false; 4]), 1.0);
        assert_eq!(dice(&[true, false], &[false, false]), 0.0);
        // |P∩T| = 1, |P| + |T| = 3.
        assert!((dice(&[true, true, false], &[true, false, false]) - 2.0 / 3.0).abs() < 1e-7);
    }
}
