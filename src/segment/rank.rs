//! An annotation queue from the model's uncertainty: per image, three scores of how much a label
//! would help, computed from the Monte-Carlo draws at the model's own resolution (docs/rank.md).
//!
//! ```no_run
//! use mcs_engine::segment::rank::{ranking_order, RankBy};
//! use mcs_engine::segment::{read_image, Options, Segmenter};
//!
//! # fn main() -> mcs_engine::Result<()> {
//! let segmenter = Segmenter::load("runs/train/best")?;
//! let (a, b) = (read_image("a.png".as_ref())?, read_image("b.png".as_ref())?);
//! let items = [(&a, "one small round lesion at the center of the image"), (&b, "one large oval lesion")];
//! let scores = segmenter.rank_scores_batch(&items, &Options::default())?;
//! let first = ranking_order(&scores, RankBy::MeanEntropy)[0]; // the image to label first
//! # Ok(()) }
//! ```
//!
//! The scores of one image, with `S` draws, `p_s = sigmoid(logits_s)`, `p = mean_s p_s`, masks
//! `m_s = p_s > threshold` and `m = p > threshold`, over its `H x W` pixels at the model's size:
//! - `mean_entropy`: the mean over pixels of the binary entropy of `p` (nats, in [0, ln 2]);
//! - `expected_dice_loss`: `1 - mean_s Dice(m_s, m)`, in [0, 1], with the Dice of two empty masks
//!   taken as 1 (draws that agree there is nothing cost nothing);
//! - `foreground_uncertainty`: the entropy summed over the pixels of `m`, divided by `H x W` (the
//!   uncertainty mass inside the predicted foreground per pixel of the image: nats, in
//!   [0, mean_entropy]).
//!
//! Memory: only one batch's logits (`S x B x H x W` floats) are held, as [`Segmenter::segment_batch`].

use crate::data::Image8;
use crate::error::{Error, Result};
use crate::model::{mean_probability_and_entropy, Prediction};
use crate::tensor::Tensor;

use super::{Options, Segmenter};

/// How much a label of one image would help, by three measures (see the module's header).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankScores {
    /// Mean over pixels of the binary entropy of the mean probability (nats, in [0, ln 2]).
    pub mean_entropy: f64,
    /// `1 - E_s[Dice(draw mask s, mean mask)]`, in [0, 1]; two empty masks have Dice 1.
    pub expected_dice_loss: f64,
    /// Entropy summed over the mean mask's pixels, divided by all pixels (nats, in [0, ln 2]).
    pub foreground_uncertainty: f64,
}

/// The score a ranking sorts by (descending: the image to label first comes first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankBy {
    /// [`RankScores::mean_entropy`] (the CLI's default, docs/rank.md §2 says why).
    MeanEntropy,
    /// [`RankScores::expected_dice_loss`].
    ExpectedDiceLoss,
    /// [`RankScores::foreground_uncertainty`].
    ForegroundUncertainty,
}

impl RankBy {
    /// Every score, in the order of the CSV's columns.
    pub const ALL: [RankBy; 3] = [RankBy::MeanEntropy, RankBy::ExpectedDiceLoss, RankBy::ForegroundUncertainty];

    /// The command-line name: `mean-entropy`, `expected-dice-loss`, `foreground-uncertainty`.
    pub fn name(self) -> &'static str {
        match self {
            RankBy::MeanEntropy => "mean-entropy",
            RankBy::ExpectedDiceLoss => "expected-dice-loss",
            RankBy::ForegroundUncertainty => "foreground-uncertainty",
        }
    }

    /// The CSV column: `mean_entropy`, `expected_dice_loss`, `foreground_uncertainty`.
    pub fn column(self) -> &'static str {
        match self {
            RankBy::MeanEntropy => "mean_entropy",
            RankBy::ExpectedDiceLoss => "expected_dice_loss",
            RankBy::ForegroundUncertainty => "foreground_uncertainty",
        }
    }

    /// The score by its command-line name. Error: any other name, with the three accepted.
    pub fn parse(name: &str) -> Result<RankBy> {
        RankBy::ALL.into_iter().find(|by| by.name() == name).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown ranking score `{name}`: expected {}",
                RankBy::ALL.map(RankBy::name).join(", ")
            ))
        })
    }

    /// This score of `scores`.
    pub fn of(self, scores: &RankScores) -> f64 {
        match self {
            RankBy::MeanEntropy => scores.mean_entropy,
            RankBy::ExpectedDiceLoss => scores.expected_dice_loss,
            RankBy::ForegroundUncertainty => scores.foreground_uncertainty,
        }
    }
}

/// The indices of `scores` from the image to label first to the last: descending by `by`; ties
/// (common for the expected Dice loss, which is 0 whenever every draw gives the same mask) broken
/// by the other two scores in [`RankBy::ALL`] order, descending, then by index, so the order is
/// total and reproducible.
pub fn ranking_order(scores: &[RankScores], by: RankBy) -> Vec<usize> {
    let keys: Vec<RankBy> = std::iter::once(by).chain(RankBy::ALL.into_iter().filter(|&other| other != by)).collect();
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        keys.iter()
            .map(|key| key.of(&scores[b]).total_cmp(&key.of(&scores[a])))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    order
}

/// The scores of every item of `[S, B, H, W]` per-draw logits (as [`Prediction::logits`]) at
/// `threshold`. Errors: logits not of rank 4, non-finite logits.
pub fn scores_from_logits(logits: &Tensor, threshold: f32) -> Result<Vec<RankScores>> {
    if logits.rank() != 4 {
        return Err(Error::shape(
            "scores_from_logits",
            format!("expected [S, B, H, W] logits, got {:?}", logits.shape()),
        ));
    }
    let (probability, uncertainty) = mean_probability_and_entropy(logits)?;
    scores_from_maps(logits, &probability, &uncertainty, threshold)
}

/// [`scores_from_logits`] of a prediction, reusing its mean probability and entropy.
pub fn scores_from_prediction(prediction: &Prediction, threshold: f32) -> Result<Vec<RankScores>> {
    scores_from_maps(&prediction.logits, &prediction.probability, &prediction.uncertainty, threshold)
}

/// The scores from the per-draw logits `[S, B, H, W]` and the mean probability and entropy
/// `[B, H, W]` computed from them.
fn scores_from_maps(
    logits: &Tensor,
    probability: &Tensor,
    uncertainty: &Tensor,
    threshold: f32,
) -> Result<Vec<RankScores>> {
    let (samples, batch) = (logits.dim(0), logits.dim(1));
    let pixels = logits.dim(2) * logits.dim(3);
    let (logits, probability, uncertainty) = (logits.to_vec()?, probability.to_vec()?, uncertainty.to_vec()?);
    if probability.len() != batch * pixels || uncertainty.len() != batch * pixels {
        return Err(Error::shape(
            "rank scores",
            format!("maps of {} values for {batch} items of {pixels} pixels", probability.len()),
        ));
    }
    (0..batch)
        .map(|b| {
            let plane = b * pixels..(b + 1) * pixels;
            let draws: Vec<&[f32]> =
                (0..samples).map(|s| &logits[(s * batch + b) * pixels..(s * batch + b + 1) * pixels]).collect();
            let scores = item_scores(&draws, &probability[plane.clone()], &uncertainty[plane], threshold);
            let finite = [scores.mean_entropy, scores.expected_dice_loss, scores.foreground_uncertainty]
                .iter()
                .all(|v| v.is_finite());
            if !finite || draws.iter().any(|d| d.iter().any(|v| v.is_nan())) {
                return Err(Error::Invalid(
                    "the model produced non-finite logits (is the input image or the checkpoint damaged?)".into(),
                ));
            }
            Ok(scores)
        })
        .collect()
}

/// The three scores of one image from its draws' logits (each `pixels` long), its mean
/// probability and the entropy of that mean (see the module's header).
fn item_scores(draws: &[&[f32]], probability: &[f32], uncertainty: &[f32], threshold: f32) -> RankScores {
    let pixels = probability.len().max(1) as f64;
    let mean_mask: Vec<bool> = probability.iter().map(|&p| p > threshold).collect();
    let mean_entropy = uncertainty.iter().map(|&u| f64::from(u)).sum::<f64>() / pixels;
    let foreground_uncertainty =
        uncertainty.iter().zip(&mean_mask).filter(|(_, &m)| m).map(|(&u, _)| f64::from(u)).sum::<f64>() / pixels;
    let mean_dice = draws
        .iter()
        .map(|logits| {
            let draw_mask = logits.iter().map(|&x| sigmoid(x) > threshold);
            dice(draw_mask, &mean_mask)
        })
        .sum::<f64>()
        / draws.len().max(1) as f64;
    RankScores { mean_entropy, expected_dice_loss: 1.0 - mean_dice, foreground_uncertainty }
}

/// `1 / (1 + e^-x)`, as the model's sigmoid.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Dice of two masks of the same length; 1 when both are empty.
fn dice(a: impl Iterator<Item = bool>, b: &[bool]) -> f64 {
    let (mut both, mut total) = (0usize, 0usize);
    for (x, &y) in a.zip(b) {
        both += usize::from(x && y);
        total += usize::from(x) + usize::from(y);
    }
    if total == 0 {
        1.0
    } else {
        2.0 * both as f64 / total as f64
    }
}

impl Segmenter {
    /// The [`RankScores`] of many image–prompt pairs in one Monte-Carlo pass (`options.samples`
    /// draws, at the model's resolution; `options.threshold` makes the masks). The draws are
    /// those [`Segmenter::segment_batch`] makes of the same items and options.
    ///
    /// Errors as [`Segmenter::segment_batch`], naming the item (0-based) at fault when there are
    /// several.
    pub fn rank_scores_batch(&self, items: &[(&Image8, &str)], options: &Options) -> Result<Vec<RankScores>> {
        match self.predict_items(items, options)? {
            Some(prediction) => scores_from_prediction(&prediction, options.threshold),
            None => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A logit far enough from 0 that its sigmoid is 0 or 1 to f32 rounding's width.
    const ON: f32 = 30.0;
    const OFF: f32 = -30.0;

    fn tensor(values: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(values, shape).unwrap()
    }

    #[test]
    fn hand_built_draws_give_the_hand_computed_scores() {
        // Three draws of one 2x2 image. Pixel 0 is on in every draw, pixel 1 in draws 0 and 1,
        // pixel 2 in draw 0 only, pixel 3 never. Mean probabilities: 1, 2/3, 1/3, 0, so the mean
        // mask (> 0.5) is {0, 1}.
        let draws = [[ON, ON, ON, OFF], [ON, ON, OFF, OFF], [ON, OFF, OFF, OFF]];
        let logits = tensor(draws.concat(), &[3, 1, 2, 2]);
        let scores = scores_from_logits(&logits, 0.5).unwrap();
        assert_eq!(scores.len(), 1);
        // Dice with the mean mask {0, 1}: draw 0 {0,1,2}: 2*2/(3+2) = 0.8; draw 1 {0,1}: 1;
        // draw 2 {0}: 2*1/(1+2) = 2/3. Expected loss 1 - (0.8 + 1 + 2/3) / 3.
        let want_loss = 1.0 - (0.8 + 1.0 + 2.0 / 3.0) / 3.0;
        // Entropies of 1, 2/3, 1/3, 0 (the 1e-8 inside the logs moves them by < 1e-7).
        let h = |p: f64| if p <= 0.0 || p >= 1.0 { 0.0 } else { -(p * p.ln() + (1.0 - p) * (1.0 - p).ln()) };
        let entropies = [h(1.0), h(2.0 / 3.0), h(1.0 / 3.0), h(0.0)];
        let want_mean = entropies.iter().sum::<f64>() / 4.0;
        let want_foreground = (entropies[0] + entropies[1]) / 4.0;
        // f32 maps: a few ulps of ln 2 (1e-7); the Dice loss is exact up to f64 rounding.
        let s = scores[0];
        assert!((s.expected_dice_loss - want_loss).abs() < 1e-12, "{s:?} vs {want_loss}");
        assert!((s.mean_entropy - want_mean).abs() < 1e-6, "{s:?} vs {want_mean}");
        assert!((s.foreground_uncertainty - want_foreground).abs() < 1e-6, "{s:?} vs {want_foreground}");
    }

    #[test]
    fn items_of_a_batch_are_scored_from_their_own_draws() {
        // Two items, two draws, 1x2 pixels, sample-major [S, B, H, W]. Item 0: draws agree on
        // {0}. Item 1: draw 0 marks {0, 1}, draw 1 marks nothing, mean 0.5 is not above the
        // threshold, so the mean mask is empty: Dice 0 and 1, loss 0.5.
        let logits = tensor(vec![ON, OFF, ON, ON, ON, OFF, OFF, OFF], &[2, 2, 1, 2]);
        let scores = scores_from_logits(&logits, 0.5).unwrap();
        assert_eq!(scores[0].expected_dice_loss, 0.0);
        assert!(scores[0].mean_entropy < 1e-6, "{:?}", scores[0]);
        assert!((scores[1].expected_dice_loss - 0.5).abs() < 1e-12, "{:?}", scores[1]);
        // Both pixels of item 1 sit at p = 0.5: entropy ln 2 each, none of it in the (empty) mask.
        assert!((scores[1].mean_entropy - std::f64::consts::LN_2).abs() < 1e-6, "{:?}", scores[1]);
        assert_eq!(scores[1].foreground_uncertainty, 0.0);
    }

    #[test]
    fn two_empty_masks_have_dice_one() {
        let logits = tensor(vec![OFF; 8], &[2, 1, 2, 2]);
        let scores = scores_from_logits(&logits, 0.5).unwrap();
        assert_eq!(scores[0].expected_dice_loss, 0.0);
    }

    #[test]
    fn the_order_is_descending_by_the_chosen_score_with_ties_broken_by_the_others() {
        let s = |mean_entropy, expected_dice_loss, foreground_uncertainty| RankScores {
            mean_entropy,
            expected_dice_loss,
            foreground_uncertainty,
        };
        let scores = [s(0.1, 0.0, 0.05), s(0.3, 0.0, 0.01), s(0.2, 0.5, 0.0), s(0.3, 0.0, 0.01)];
        assert_eq!(ranking_order(&scores, RankBy::ExpectedDiceLoss), [2, 1, 3, 0]);
        assert_eq!(ranking_order(&scores, RankBy::MeanEntropy), [1, 3, 2, 0]);
        assert_eq!(ranking_order(&scores, RankBy::ForegroundUncertainty), [0, 1, 3, 2]);
    }

    #[test]
    fn names_parse_back_and_unknown_ones_are_refused() {
        for by in RankBy::ALL {
            assert_eq!(RankBy::parse(by.name()).unwrap(), by);
        }
        let message = RankBy::parse("entropy").unwrap_err().to_string();
        assert!(message.contains("`entropy`") && message.contains("expected-dice-loss"), "{message}");
    }
}
