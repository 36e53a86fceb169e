//! Percentile bootstrap intervals of a mean over images (the `eval --report` summary,
//! docs/eval_report.md §2).
//!
//! A resample draws `n` of the `n` per-image values with replacement and takes their mean; the
//! interval is the 2.5th and 97.5th percentiles of [`RESAMPLES`] such means. The draws come from
//! the counter-based Philox generator ([`crate::philox`]) keyed by a fixed seed, so an interval
//! is a pure function of the values: the same split gives the same interval on every run and
//! machine. The interval describes the spread over *images* only (the Monte-Carlo noise of the
//! model's draws is held fixed by the evaluation's seed).

use crate::philox::philox4x32_10;

/// Resamples per interval.
pub const RESAMPLES: usize = 2000;

/// Seed of the resampling (any fixed value; fixed so reports repeat).
pub const SEED: u64 = 0x5EED_B007;

/// Coverage of the interval.
pub const CONFIDENCE: f64 = 0.95;

/// A two-sided interval around a mean.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    /// The mean of the values themselves.
    pub mean: f64,
    /// Lower end.
    pub low: f64,
    /// Upper end.
    pub high: f64,
}

/// The [`CONFIDENCE`] percentile-bootstrap interval of the mean of `values` over [`RESAMPLES`]
/// resamples drawn with [`SEED`]; `None` for no values. One value gives a zero-width interval.
pub fn mean_interval(values: &[f64]) -> Option<Interval> {
    mean_interval_with(values, RESAMPLES, CONFIDENCE, SEED)
}

/// [`mean_interval`] with its settings spelled out. Percentiles interpolate linearly between
/// the sorted resample means (NumPy's default `linear` method).
pub fn mean_interval_with(values: &[f64], resamples: usize, confidence: f64, seed: u64) -> Option<Interval> {
    if values.is_empty() || resamples == 0 {
        return None;
    }
    let n = values.len();
    let mut means: Vec<f64> = (0..resamples)
        .map(|r| {
            let sum: f64 = (0..n).map(|i| values[draw_index(seed, r, i, n)]).sum();
            sum / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - confidence) / 2.0;
    Some(Interval {
        mean: values.iter().sum::<f64>() / n as f64,
        low: percentile(&means, tail),
        high: percentile(&means, 1.0 - tail),
    })
}

/// The image drawn as the `i`-th of resample `r`: uniform over `0..n` (Lemire's multiply-shift
/// of a 32-bit Philox word; its bias, under `n / 2^32`, is far below the resampling noise).
fn draw_index(seed: u64, r: usize, i: usize, n: usize) -> usize {
    let key = [seed as u32, (seed >> 32) as u32];
    let word = philox4x32_10([i as u32, ((i as u64) >> 32) as u32, r as u32, 0xB007], key)[0];
    ((u64::from(word) * n as u64) >> 32) as usize
}

/// The `q` quantile (0 ..= 1) of sorted values, linear between neighbours.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let position = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (below, above) = (position.floor() as usize, position.ceil() as usize);
    let weight = position - below as f64;
    sorted[below] + weight * (sorted[above] - sorted[below])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_interpolates_like_numpy() {
        // numpy.percentile([1, 2, 3, 4], 25) = 1.75, 97.5 -> 3.925.
        let sorted = [1.0, 2.0, 3.0, 4.0];
        assert!((percentile(&sorted, 0.25) - 1.75).abs() < 1e-12);
        assert!((percentile(&sorted, 0.975) - 3.925).abs() < 1e-12);
        assert_eq!(percentile(&[5.0], 0.3), 5.0);
    }

    #[test]
    fn draws_cover_every_index_evenly() {
        let n = 7;
        let mut counts = [0usize; 7];
        for r in 0..2000 {
            for i in 0..n {
                counts[draw_index(SEED, r, i, n)] += 1;
            }
        }
        // 14000 draws, 2000 expected per index; a binomial standard deviation is about 41, so
        // 5 standard deviations (205) would only fail on a broken generator.
        for c in counts {
            assert!(c.abs_diff(2000) < 205, "{counts:?}");
        }
    }

    #[test]
    fn interval_brackets_the_mean_and_matches_the_normal_width() {
        // 200 values 0, 1, ..., 199: standard error of the mean = sd / sqrt(n) ≈ 57.7 / 14.1
        // ≈ 4.08, so a 95 % interval is about ±8.0 around 99.5.
        let values: Vec<f64> = (0..200).map(f64::from).collect();
        let interval = mean_interval(&values).unwrap();
        assert_eq!(interval.mean, 99.5);
        assert!(interval.low < 99.5 && interval.high > 99.5);
        let half_width = (interval.high - interval.low) / 2.0;
        // Resampling noise of a 2000-resample percentile interval is a few percent of its width.
        assert!((half_width - 8.0).abs() < 1.0, "{interval:?}");
        // A fixed seed: the same values give the same interval.
        assert_eq!(mean_interval(&values), Some(interval));
        assert_eq!(mean_interval(&[]), None);
        let single = mean_interval(&[0.25]).unwrap();
        assert_eq!((single.low, single.high), (0.25, 0.25));
    }
}
