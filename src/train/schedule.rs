//! The learning-rate schedule of the official recipe (docs/model.md §6): `CosineAnnealingLR(T_max = epochs,
//! eta_min)` stepped once per epoch, so epoch `e` (0-based) trains at
//! `min + (start - min) * (1 + cos(pi * e / epochs)) / 2`.

/// Learning rate of epoch `epoch` (0-based) out of `epochs`.
pub fn cosine_learning_rate(epoch: usize, epochs: usize, start: f32, min: f32) -> f32 {
    let progress = epoch as f64 / epochs.max(1) as f64;
    let cosine = (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0;
    (min as f64 + (start as f64 - min as f64) * cosine) as f32
}

#[cfg(test)]
mod tests {
    use super::cosine_learning_rate;

    #[test]
    fn starts_at_the_start_rate_and_halves_the_gap_midway() {
        assert_eq!(cosine_learning_rate(0, 100, 3e-4, 1e-4), 3e-4);
        // Midway the cosine is 0: exactly halfway between the two rates (f32 rounding only).
        assert!((cosine_learning_rate(50, 100, 3e-4, 1e-4) - 2e-4).abs() < 1e-9);
        let last = cosine_learning_rate(99, 100, 3e-4, 1e-4);
        assert!(last > 1e-4 && last < 1.001e-4, "last epoch's rate {last} should be just above the minimum");
    }
}
