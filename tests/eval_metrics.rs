//! The evaluation metrics on hand-computed cases, and NSD against values the official
//! `surface_distance` code (DeepMind; what MedCLIPSeg's `utils/SurfaceDice.py` is) printed for
//! the same masks (`compute_surface_distances(gt[..., None], pred[..., None], [1, 1, 1])`, then
//! `compute_surface_dice_at_tolerance(.., 2)`; docs/model.md §7 describes what that function computes).

use mcs_engine::eval::metrics::{auroc, dice, nsd, surfel_areas, Calibration};

/// Row-major `width` x `height` mask from a predicate on (x, y).
fn mask(width: usize, height: usize, inside: impl Fn(usize, usize) -> bool) -> Vec<bool> {
    (0..height).flat_map(|y| (0..width).map(move |x| (x, y))).map(|(x, y)| inside(x, y)).collect()
}

/// `size` x `size` square with its top-left corner at (x0, y0), in a 64 x 64 image.
fn square(x0: usize, y0: usize, size: usize) -> Vec<bool> {
    mask(64, 64, |x, y| (x0..x0 + size).contains(&x) && (y0..y0 + size).contains(&y))
}

/// The official values are printed to 16 digits; our sums run in another order, so agreement is
/// to rounding of a few hundred f64 additions.
const OFFICIAL: f64 = 1e-12;

#[test]
fn both_empty_masks_score_one_and_one_empty_mask_scores_zero() {
    let empty = vec![false; 64 * 64];
    let some = square(10, 10, 5);
    assert_eq!(dice(&empty, &empty), 1.0);
    assert_eq!(nsd(&empty, &empty, 64, 64, 2.0), 1.0);
    for (p, t) in [(&empty, &some), (&some, &empty)] {
        assert_eq!(dice(p, t), 0.0);
        assert_eq!(nsd(p, t, 64, 64, 2.0), 0.0);
    }
}

#[test]
fn a_one_pixel_shift_is_within_nsd_tolerance_but_costs_dice() {
    let truth = square(10, 10, 20);
    let shifted = square(11, 10, 20);
    // 19 of 20 columns overlap: Dice = 2 * 380 / 800.
    assert!((dice(&shifted, &truth) - 0.95).abs() < 1e-15);
    // Every surfel is within 1 px of the other mask's, so NSD at 2 px is exactly 1.
    assert_eq!(nsd(&shifted, &truth, 64, 64, 2.0), 1.0);
    // At tolerance 0 the shifted column's surfels do not count any more.
    assert!(nsd(&shifted, &truth, 64, 64, 0.0) < 1.0);
}

#[test]
fn nsd_matches_the_official_surface_dice() {
    let truth = square(10, 10, 20);
    let cases: Vec<(&str, Vec<bool>, Vec<bool>, f64)> = vec![
        ("shift 2", square(12, 10, 20), truth.clone(), 1.0),
        ("shift 3", square(13, 10, 20), truth.clone(), 0.9666317693992421),
        ("shift 5", square(15, 10, 20), truth.clone(), 0.8683935021572963),
        ("40x40 around 20x20", square(10, 10, 40), square(20, 20, 20), 0.5023028483796562),
        (
            "thin lines 3 px apart",
            mask(64, 64, |x, y| y == 23 && (5..50).contains(&x)),
            mask(64, 64, |x, y| y == 20 && (5..50).contains(&x)),
            0.49999999999999994,
        ),
        (
            "ellipse against a disc (curved: every corner configuration)",
            mask(64, 64, |x, y| ((x as f64 - 33.1) / 15.2).powi(2) + ((y as f64 - 27.4) / 10.6).powi(2) <= 1.0),
            mask(64, 64, |x, y| (x as f64 - 30.3).powi(2) + (y as f64 - 28.7).powi(2) <= 12.5f64.powi(2)),
            0.9406747966362379,
        ),
        (
            "square against an L (concave corners)",
            square(8, 25, 20),
            mask(64, 64, |x, y| {
                ((5..15).contains(&x) && (5..40).contains(&y)) || ((5..45).contains(&x) && (30..40).contains(&y))
            }),
            0.60291557301803,
        ),
        (
            "bands touching the image border",
            mask(64, 64, |x, y| y < 13 && x >= 3),
            mask(64, 64, |_, y| y < 10),
            0.9667266828103068,
        ),
    ];
    for (name, predicted, truth, official) in cases {
        let ours = nsd(&predicted, &truth, 64, 64, 2.0);
        assert!((ours - official).abs() < OFFICIAL, "{name}: ours {ours}, official {official}");
    }
    // A non-square image with a hole (rows and columns must not be swapped).
    let predicted = mask(70, 40, |x, y| (12..45).contains(&x) && (7..33).contains(&y));
    let truth = mask(70, 40, |x, y| {
        (10..40).contains(&x) && (5..30).contains(&y) && !((20..30).contains(&x) && (12..20).contains(&y))
    });
    let ours = nsd(&predicted, &truth, 70, 40, 2.0);
    assert!((ours - 0.9291823905497464).abs() < OFFICIAL, "rectangle with a hole: {ours}");
}

// The literals are the official table as printed (6 digits), one of which happens to be 1/√2.
#[allow(clippy::approx_constant)]
#[test]
fn surfel_areas_are_the_official_table_entries() {
    // surface_distance's table for the 16 planar corner configurations (one per count and
    // adjacency; rounded to 6 digits there).
    let a = surfel_areas();
    for (code, expected) in
        [(0b0001, 0.216506), (0b0011, 0.707107), (0b1001, 0.433013), (0b0111, 1.149519), (0b1111, 1.0)]
    {
        assert!((a[code] - expected).abs() < 5e-7, "code {code:04b}: {}", a[code]);
    }
    assert_eq!(a[0], 0.0);
}

#[test]
fn calibration_of_a_calibrated_and_a_miscalibrated_map() {
    // Calibrated: ten pixels at p = 0.3 of which three are foreground, ten at p = 0.8 of which
    // eight are: every bin's frequency equals its mean probability.
    let probability: Vec<f32> = [vec![0.3f32; 10], vec![0.8f32; 10]].concat();
    let truth: Vec<bool> = (0..20).map(|i| i < 3 || (10..18).contains(&i)).collect();
    let mut calibrated = Calibration::new();
    calibrated.add(&probability, &truth);
    // f32 probabilities (0.3 is 0.30000001...) leave a gap of about 1e-8.
    assert!(calibrated.ece() < 1e-7, "{}", calibrated.ece());
    // Brier: (3 * 0.7² + 7 * 0.3² + 8 * 0.2² + 2 * 0.8²) / 20 = 3.7 / 20 (calibrated is not
    // the same as sharp).
    assert!((calibrated.brier() - 0.185).abs() < 1e-7, "{}", calibrated.brier());

    // Over-confident: all pixels at p = 0.9, half foreground: ECE = |0.5 - 0.9| = 0.4,
    // Brier = (0.1² + 0.9²) / 2 = 0.41.
    let mut overconfident = Calibration::new();
    overconfident.add(&[0.9; 8], &[true, false, true, false, true, false, true, false]);
    assert!((overconfident.ece() - 0.4).abs() < 1e-7);
    assert!((overconfident.brier() - 0.41).abs() < 1e-7);

    // Pooled: the bins add (0.3 and 0.8 are in other bins than 0.9): ECE = 8/28 * 0.4.
    calibrated.merge(&overconfident);
    assert_eq!(calibrated.pixels(), 28);
    assert!((calibrated.ece() - 8.0 / 28.0 * 0.4).abs() < 1e-7);
    // p = 1 belongs to the last bin, p = 0 to the first.
    let mut edges = Calibration::new();
    edges.add(&[1.0, 0.0], &[true, false]);
    assert_eq!(edges.ece(), 0.0);
    assert_eq!(edges.brier(), 0.0);
}

#[test]
fn auroc_of_a_hand_case() {
    // Positives scored 0.9, 0.4 and 0.6; negatives 0.1, 0.4, 0.5. Pairs (pos > neg): 0.9 beats
    // all three, 0.6 beats all three, 0.4 beats 0.1 and ties 0.4 (one half): 7.5 of 9.
    let scores = [0.9f32, 0.1, 0.4, 0.4, 0.6, 0.5];
    let positives = [true, false, true, false, true, false];
    assert!((auroc(&scores, &positives).unwrap() - 7.5 / 9.0).abs() < 1e-12);
    // Perfect and reversed rankings.
    assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), Some(1.0));
    assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &[true, true, false, false]), Some(0.0));
    // Undefined without both classes.
    assert_eq!(auroc(&[0.1, 0.2], &[false, false]), None);
    assert_eq!(auroc(&[0.1, 0.2], &[true, true]), None);
}
