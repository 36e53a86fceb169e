//! Per-image segmentation and calibration metrics.
//!
//! - [`dice`] and [`nsd`] follow the official evaluation (docs/model.md §7): binary masks of the ground
//!   truth's size; both empty gives 1, exactly one empty gives 0.
//! - [`nsd`] is the official *one-slice volume* surface Dice (DeepMind `surface_distance` on a
//!   `[H, W, 1]` volume with spacing 1), not a 2-D contour NSD; see its docs.
//! - [`Calibration`] accumulates the expected calibration error (equal-width bins over the
//!   foreground probability) and the Brier score; [`auroc`] scores how well a per-pixel
//!   uncertainty ranks misclassified pixels above correct ones; [`UncertaintyErrors`] pools the
//!   same question over a split in fixed-size histograms (the `eval --report` curve and AUROC).

/// Bins of the expected calibration error.
pub const ECE_BINS: usize = 15;

/// Dice of two binary masks of the same length: `2|P∩T| / (|P| + |T|)`, 1 when both are empty.
pub fn dice(predicted: &[bool], truth: &[bool]) -> f64 {
    let (mut both, mut total) = (0usize, 0usize);
    for (&p, &t) in predicted.iter().zip(truth) {
        both += usize::from(p && t);
        total += usize::from(p) + usize::from(t);
    }
    if total == 0 {
        1.0
    } else {
        2.0 * both as f64 / total as f64
    }
}

/// Normalised surface Dice at `tolerance` pixels of two `width` x `height` masks (row-major), as
/// the official evaluation computes it (docs/model.md §7).
///
/// The official code treats each mask as a one-slice volume: the 2x2x2 neighbourhoods of the
/// zero-padded slab are the cube corners of marching cubes, every corner touching a foreground
/// voxel is a surface element ("surfel") of the slab (its flat top and bottom faces included),
/// and each surfel weighs the area of its marching-cubes triangles. NSD is the surfel area of
/// each mask lying within `tolerance` (Euclidean, between corner positions) of the other mask's
/// surfels, over the total surfel area of both. In a one-slice volume the bottom and top corner
/// layers hold the same surfels with the same areas and distances, so one layer of
/// `(height + 1) x (width + 1)` corners gives the same ratio.
///
/// Both empty gives 1 and exactly one empty gives 0 (the official `eval.py` rules).
pub fn nsd(predicted: &[bool], truth: &[bool], width: usize, height: usize, tolerance: f64) -> f64 {
    let (any_p, any_t) = (predicted.iter().any(|&p| p), truth.iter().any(|&t| t));
    match (any_p, any_t) {
        (false, false) => return 1.0,
        (true, false) | (false, true) => return 0.0,
        (true, true) => {}
    }
    let areas = surfel_areas();
    let pred_corners = corner_codes(predicted, width, height);
    let truth_corners = corner_codes(truth, width, height);
    let (cw, ch) = (width + 1, height + 1);
    let to_pred = squared_distance_to_surface(&pred_corners, cw, ch);
    let to_truth = squared_distance_to_surface(&truth_corners, cw, ch);
    let within = |d2: u64| (d2 as f64).sqrt() <= tolerance;
    let (mut overlap, mut total) = (0.0f64, 0.0f64);
    for i in 0..cw * ch {
        let (tc, pc) = (truth_corners[i], pred_corners[i]);
        if tc != 0 {
            total += areas[tc as usize];
            if within(to_pred[i]) {
                overlap += areas[tc as usize];
            }
        }
        if pc != 0 {
            total += areas[pc as usize];
            if within(to_truth[i]) {
                overlap += areas[pc as usize];
            }
        }
    }
    overlap / total
}

/// The marching-cubes surface area of one cube corner layer, by which of the four pixels around
/// the corner are foreground (bit 0: up-left, 1: up-right, 2: down-left, 3: down-right).
///
/// Derived from the marching-cubes triangles with vertices at edge midpoints of a unit cube whose
/// foreground corners all lie on one face (the only cases a one-slice volume has):
/// - one corner: the triangle cutting it off, vertices at distance 1/2 along its three edges:
///   area `√3/8`;
/// - two adjacent corners: a 1 x `√2/2` rectangle across the cube: `√2/2`;
/// - two diagonal corners: two separate corner triangles (marching cubes' separated case):
///   `2 · √3/8`;
/// - three corners: a pentagon of three triangles, one flat half-face (1/2) and two slanted ones
///   (`√3/4` and `√3/8`): `1/2 + 3√3/8`;
/// - four corners: the square halfway through the cube: 1.
///
/// These match the area table of the official code for every planar configuration (checked
/// against `surface_distance.lookup_tables` for all 32 codes of the two corner layers).
pub fn surfel_areas() -> [f64; 16] {
    let corner = 3f64.sqrt() / 8.0;
    let mut areas = [0.0; 16];
    for (code, area) in areas.iter_mut().enumerate() {
        let diagonal = code == 0b1001 || code == 0b0110;
        *area = match code.count_ones() {
            0 => 0.0,
            1 => corner,
            2 if diagonal => 2.0 * corner,
            2 => 2f64.sqrt() / 2.0,
            3 => 0.5 + 3.0 * corner,
            _ => 1.0,
        };
    }
    areas
}

/// The 4-bit neighbourhood code of every corner of the `(height + 1) x (width + 1)` corner grid
/// (corner `(i, j)` sits between pixel rows `i - 1, i` and columns `j - 1, j`; outside is
/// background, as the official zero padding makes it).
fn corner_codes(mask: &[bool], width: usize, height: usize) -> Vec<u8> {
    let at = |y: isize, x: isize| -> bool {
        y >= 0 && x >= 0 && (y as usize) < height && (x as usize) < width && mask[y as usize * width + x as usize]
    };
    let mut codes = Vec::with_capacity((width + 1) * (height + 1));
    for i in 0..=height as isize {
        for j in 0..=width as isize {
            let code = u8::from(at(i - 1, j - 1))
                | (u8::from(at(i - 1, j)) << 1)
                | (u8::from(at(i, j - 1)) << 2)
                | (u8::from(at(i, j)) << 3);
            codes.push(code);
        }
    }
    codes
}

/// Exact squared Euclidean distance from every grid point to the nearest point whose code is
/// non-zero (Felzenszwalb & Huttenlocher's separable transform: columns, then rows).
fn squared_distance_to_surface(codes: &[u8], width: usize, height: usize) -> Vec<u64> {
    const FAR: u64 = u64::MAX / 4;
    let mut grid: Vec<u64> = codes.iter().map(|&c| if c != 0 { 0 } else { FAR }).collect();
    let mut line = vec![0u64; width.max(height)];
    let mut out = vec![0u64; width.max(height)];
    for x in 0..width {
        for y in 0..height {
            line[y] = grid[y * width + x];
        }
        lower_envelope(&line[..height], &mut out[..height]);
        for y in 0..height {
            grid[y * width + x] = out[y];
        }
    }
    for y in 0..height {
        let row = &mut grid[y * width..(y + 1) * width];
        line[..width].copy_from_slice(row);
        lower_envelope(&line[..width], &mut out[..width]);
        row.copy_from_slice(&out[..width]);
    }
    grid
}

/// One dimension of the distance transform: `out[q] = min_p (q - p)² + f[p]`, exact in
/// integers (values at or above `FAR` stand for "no surface on this line").
fn lower_envelope(f: &[u64], out: &mut [u64]) {
    let n = f.len();
    let finite: Vec<usize> = (0..n).filter(|&p| f[p] < u64::MAX / 4).collect();
    if finite.is_empty() {
        out.copy_from_slice(f);
        return;
    }
    // Parabola p's value at q is (q - p)² + f[p]; the envelope is found with the classic stack of
    // parabolas and the abscissae where each starts to win, in f64 (exact for these magnitudes).
    let value = |p: usize, q: usize| -> u64 {
        let d = q.abs_diff(p) as u64;
        d * d + f[p]
    };
    let intersect = |p: usize, r: usize| -> f64 {
        let (pf, rf) = (p as f64, r as f64);
        ((f[r] as f64 + rf * rf) - (f[p] as f64 + pf * pf)) / (2.0 * (rf - pf))
    };
    let mut stack: Vec<usize> = Vec::with_capacity(finite.len());
    let mut starts: Vec<f64> = Vec::with_capacity(finite.len());
    for &r in &finite {
        loop {
            match stack.last() {
                Some(&p) if intersect(p, r) <= *starts.last().unwrap_or(&f64::NEG_INFINITY) => {
                    stack.pop();
                    starts.pop();
                }
                _ => break,
            }
        }
        let start = stack.last().map_or(f64::NEG_INFINITY, |&p| intersect(p, r));
        stack.push(r);
        starts.push(start);
    }
    let mut k = 0;
    for (q, slot) in out.iter_mut().enumerate() {
        while k + 1 < stack.len() && starts[k + 1] <= q as f64 {
            k += 1;
        }
        *slot = value(stack[k], q);
    }
}

/// Running expected calibration error and Brier score over pixels.
///
/// ECE uses [`ECE_BINS`] equal-width bins of the foreground probability `p` (bin `k` holds
/// `k/15 <= p < (k+1)/15`, the last one also `p = 1`): `Σ_k (n_k / N) · |mean(y)_k - mean(p)_k|`.
/// For a binary map this is the reliability-diagram gap of the foreground probability (not the
/// top-label confidence), so a pixel at `p = 0.3` is calibrated when 30 % of such pixels are
/// foreground. Brier is `mean((p - y)²)`. Accumulators add, so one can be kept per image and one
/// for a whole split (pixels pooled).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Calibration {
    count: [u64; ECE_BINS],
    sum_probability: [f64; ECE_BINS],
    sum_truth: [f64; ECE_BINS],
    squared_error: f64,
}

impl Calibration {
    /// An empty accumulator.
    pub fn new() -> Calibration {
        Calibration::default()
    }

    /// Adds pixels with foreground probabilities `probability` (clamped to [0, 1]) and truth.
    pub fn add(&mut self, probability: &[f32], truth: &[bool]) {
        for (&p, &t) in probability.iter().zip(truth) {
            let p = f64::from(p).clamp(0.0, 1.0);
            let y = if t { 1.0 } else { 0.0 };
            let bin = ((p * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
            self.count[bin] += 1;
            self.sum_probability[bin] += p;
            self.sum_truth[bin] += y;
            self.squared_error += (p - y) * (p - y);
        }
    }

    /// Adds another accumulator's pixels.
    pub fn merge(&mut self, other: &Calibration) {
        for k in 0..ECE_BINS {
            self.count[k] += other.count[k];
            self.sum_probability[k] += other.sum_probability[k];
            self.sum_truth[k] += other.sum_truth[k];
        }
        self.squared_error += other.squared_error;
    }

    /// Pixels added so far.
    pub fn pixels(&self) -> u64 {
        self.count.iter().sum()
    }

    /// Expected calibration error (0 with no pixels).
    pub fn ece(&self) -> f64 {
        let n = self.pixels();
        if n == 0 {
            return 0.0;
        }
        (0..ECE_BINS)
            .filter(|&k| self.count[k] > 0)
            .map(|k| {
                let c = self.count[k] as f64;
                (c / n as f64) * (self.sum_truth[k] / c - self.sum_probability[k] / c).abs()
            })
            .sum()
    }

    /// Brier score (0 with no pixels).
    pub fn brier(&self) -> f64 {
        match self.pixels() {
            0 => 0.0,
            n => self.squared_error / n as f64,
        }
    }

    /// The [`ECE_BINS`] bins of the reliability diagram, in probability order, empty ones
    /// included (with means of 0).
    pub fn bins(&self) -> Vec<ReliabilityBin> {
        (0..ECE_BINS)
            .map(|k| {
                let n = self.count[k];
                let mean = |sum: f64| if n == 0 { 0.0 } else { sum / n as f64 };
                ReliabilityBin {
                    lower: k as f64 / ECE_BINS as f64,
                    upper: (k + 1) as f64 / ECE_BINS as f64,
                    pixels: n,
                    mean_probability: mean(self.sum_probability[k]),
                    observed_frequency: mean(self.sum_truth[k]),
                }
            })
            .collect()
    }
}

/// One bin of [`Calibration::bins`]: its probability range, its pixels, their mean predicted
/// foreground probability and the fraction of them that are foreground.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReliabilityBin {
    /// Lowest probability of the bin (included).
    pub lower: f64,
    /// Highest probability of the bin (excluded, but for the last bin).
    pub upper: f64,
    /// Pixels in the bin.
    pub pixels: u64,
    /// Mean predicted probability of those pixels.
    pub mean_probability: f64,
    /// Fraction of those pixels that are foreground.
    pub observed_frequency: f64,
}

/// Bins of [`UncertaintyErrors`].
pub const UNCERTAINTY_BINS: usize = 1000;

/// Pixels counted by uncertainty and by whether they are misclassified, in [`UNCERTAINTY_BINS`]
/// fixed bins, so that a whole split can be pooled in constant memory (docs/eval_report.md §3).
///
/// The uncertainty (binary entropy, 0 ..= ln 2 nats) is binned on a quadratic scale: bin `k`
/// holds `ln2·(k/B)² <= u < ln2·((k+1)/B)²`. Most pixels of a trained model sit near 0, where
/// the bins are finest (the first is 6.9e-7 nats wide, about `p < 4e-8` or `p > 1 - 4e-8`); the
/// widest, at ln 2, is 1.4e-3 nats. Values outside the range go to the end bins.
///
/// Two pixels of one bin count as tied: [`UncertaintyErrors::auroc`] is exact up to that, and
/// [`UncertaintyErrors::auroc_tie_bound`] says by how much the exact value can differ.
#[derive(Clone, Debug, PartialEq)]
pub struct UncertaintyErrors {
    correct: Vec<u64>,
    wrong: Vec<u64>,
}

impl Default for UncertaintyErrors {
    fn default() -> UncertaintyErrors {
        UncertaintyErrors { correct: vec![0; UNCERTAINTY_BINS], wrong: vec![0; UNCERTAINTY_BINS] }
    }
}

/// One point of [`UncertaintyErrors::error_curve`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErrorCurvePoint {
    /// Fraction of the pixels taken, most uncertain first.
    pub fraction: f64,
    /// Fraction of the pixels taken that are misclassified.
    pub error_rate: f64,
    /// The uncertainty above which the pixels taken lie (the lower edge of the last bin taken).
    pub uncertainty: f64,
}

impl UncertaintyErrors {
    /// An empty accumulator.
    pub fn new() -> UncertaintyErrors {
        UncertaintyErrors::default()
    }

    /// The bin of an uncertainty in nats (NaN goes to bin 0).
    pub fn bin(uncertainty: f32) -> usize {
        let t = (f64::from(uncertainty) / std::f64::consts::LN_2).clamp(0.0, 1.0);
        if t.is_nan() {
            return 0;
        }
        ((t.sqrt() * UNCERTAINTY_BINS as f64) as usize).min(UNCERTAINTY_BINS - 1)
    }

    /// The lowest uncertainty (nats) of bin `k`.
    pub fn bin_lower_edge(k: usize) -> f64 {
        let t = k as f64 / UNCERTAINTY_BINS as f64;
        std::f64::consts::LN_2 * t * t
    }

    /// Adds pixels: their uncertainties and whether each is misclassified.
    pub fn add(&mut self, uncertainty: &[f32], wrong: &[bool]) {
        for (&u, &w) in uncertainty.iter().zip(wrong) {
            let k = Self::bin(u);
            if w {
                self.wrong[k] += 1;
            } else {
                self.correct[k] += 1;
            }
        }
    }

    /// Adds another accumulator's pixels.
    pub fn merge(&mut self, other: &UncertaintyErrors) {
        for k in 0..UNCERTAINTY_BINS {
            self.correct[k] += other.correct[k];
            self.wrong[k] += other.wrong[k];
        }
    }

    /// Pixels added so far.
    pub fn pixels(&self) -> u64 {
        self.correct.iter().sum::<u64>() + self.wrong_pixels()
    }

    /// Misclassified pixels added so far.
    pub fn wrong_pixels(&self) -> u64 {
        self.wrong.iter().sum()
    }

    /// AUROC of the uncertainty as a score for "this pixel is misclassified", over every pixel
    /// added (the Mann–Whitney statistic, pixels of one bin counted as ties, one half). `None`
    /// without a misclassified or without a correct pixel.
    pub fn auroc(&self) -> Option<f64> {
        let (wrong, correct) = (self.wrong_pixels() as f64, (self.pixels() - self.wrong_pixels()) as f64);
        if wrong == 0.0 || correct == 0.0 {
            return None;
        }
        // For each bin: its wrong pixels beat every correct pixel of the lower bins and tie with
        // the correct pixels of their own bin.
        let (mut below, mut wins) = (0.0f64, 0.0f64);
        for k in 0..UNCERTAINTY_BINS {
            let (w, c) = (self.wrong[k] as f64, self.correct[k] as f64);
            wins += w * (below + 0.5 * c);
            below += c;
        }
        Some(wins / (wrong * correct))
    }

    /// How far the exact AUROC (with the uncertainties unbinned) can lie from [`Self::auroc`]:
    /// the pairs tied by the binning count one half, and their true share lies between 0 and 1.
    pub fn auroc_tie_bound(&self) -> Option<f64> {
        let (wrong, correct) = (self.wrong_pixels() as f64, (self.pixels() - self.wrong_pixels()) as f64);
        if wrong == 0.0 || correct == 0.0 {
            return None;
        }
        let tied: f64 = (0..UNCERTAINTY_BINS).map(|k| self.wrong[k] as f64 * self.correct[k] as f64).sum();
        Some(0.5 * tied / (wrong * correct))
    }

    /// The uncertainty–error curve: pixels ranked by uncertainty, most uncertain first; for each
    /// non-empty bin, taken whole, the fraction of pixels taken so far and their error rate. Ends
    /// at fraction 1 with the split's error rate; empty without pixels.
    pub fn error_curve(&self) -> Vec<ErrorCurvePoint> {
        let total = self.pixels() as f64;
        let (mut taken, mut wrong) = (0u64, 0u64);
        let mut curve = Vec::new();
        for k in (0..UNCERTAINTY_BINS).rev() {
            if self.correct[k] + self.wrong[k] == 0 {
                continue;
            }
            taken += self.correct[k] + self.wrong[k];
            wrong += self.wrong[k];
            curve.push(ErrorCurvePoint {
                fraction: taken as f64 / total,
                error_rate: wrong as f64 / taken as f64,
                uncertainty: Self::bin_lower_edge(k),
            });
        }
        curve
    }
}

/// Area under the ROC curve of `scores` for predicting `positives` (the Mann–Whitney statistic,
/// ties counted one half). `None` when there are no positives or no negatives, where it is
/// undefined (e.g. an image without a single misclassified pixel).
pub fn auroc(scores: &[f32], positives: &[bool]) -> Option<f64> {
    let n = scores.len().min(positives.len());
    let n_pos = positives[..n].iter().filter(|&&p| p).count();
    let n_neg = n - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum = 0.0f64;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mid_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mid_rank * order[i..=j].iter().filter(|&&k| positives[k]).count() as f64;
        i = j + 1;
    }
    let (p, q) = (n_pos as f64, n_neg as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * q))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed-form areas agree with triangle areas computed from the marching-cubes vertices.
    #[test]
    fn surfel_areas_match_their_triangles() {
        fn triangle(a: [f64; 3], b: [f64; 3], c: [f64; 3]) -> f64 {
            let (u, v) = ([b[0] - a[0], b[1] - a[1], b[2] - a[2]], [c[0] - a[0], c[1] - a[1], c[2] - a[2]]);
            let cross = [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]];
            (cross.iter().map(|x| x * x).sum::<f64>()).sqrt() / 2.0
        }
        let areas = surfel_areas();
        // Foreground corners on face z = 1 at (0,0), (1,0), (0,1); the pentagon's vertices.
        let (a, b, c, d, e) = ([0.0, 0.0, 0.5], [1.0, 0.0, 0.5], [1.0, 0.5, 1.0], [0.5, 1.0, 1.0], [0.0, 1.0, 0.5]);
        let pentagon = triangle(a, b, e) + triangle(b, c, e) + triangle(c, d, e);
        assert!((areas[0b0111] - pentagon).abs() < 1e-12);
        let corner = triangle([0.5, 0.0, 1.0], [0.0, 0.5, 1.0], [0.0, 0.0, 0.5]);
        assert!((areas[0b0001] - corner).abs() < 1e-12);
        let rectangle = 2.0 * triangle([0.0, 0.5, 1.0], [0.0, 0.0, 0.5], [1.0, 0.0, 0.5]);
        assert!((areas[0b0011] - rectangle).abs() < 1e-12);
    }

    #[test]
    fn binned_auroc_is_exact_when_no_two_pixels_share_a_bin() {
        // Uncertainties spread over distinct bins (bin k starts at ln2·(k/1000)², so these
        // values, 0.06 apart, are tens of bins apart).
        let u: Vec<f32> = (0..10).map(|i| 0.05 + 0.06 * i as f32).collect();
        let wrong = [false, true, false, false, true, false, true, true, false, true];
        let mut pooled = UncertaintyErrors::new();
        pooled.add(&u, &wrong);
        let exact = auroc(&u, &wrong).unwrap();
        assert!((pooled.auroc().unwrap() - exact).abs() < 1e-12);
        assert_eq!(pooled.auroc_tie_bound(), Some(0.0));
    }

    #[test]
    fn binned_auroc_stays_within_its_tie_bound() {
        // Pairs 1e-6 nats apart share a bin near ln 2 (bins there are 1.4e-3 wide).
        let u: Vec<f32> = (0..40).map(|i| 0.6 + (i % 4) as f32 * 1e-6 + (i / 4) as f32 * 0.002).collect();
        let wrong: Vec<bool> = (0..40).map(|i| i % 4 == 3 || i % 7 == 0).collect();
        let mut pooled = UncertaintyErrors::new();
        // Two halves merged give what one accumulator of all pixels gives.
        pooled.add(&u[..17], &wrong[..17]);
        let mut second = UncertaintyErrors::new();
        second.add(&u[17..], &wrong[17..]);
        pooled.merge(&second);
        let (binned, bound) = (pooled.auroc().unwrap(), pooled.auroc_tie_bound().unwrap());
        let exact = auroc(&u, &wrong).unwrap();
        assert!(bound > 0.0);
        assert!((binned - exact).abs() <= bound + 1e-12, "{binned} vs {exact} ± {bound}");
    }

    #[test]
    fn error_curve_runs_from_the_most_uncertain_bin_to_the_whole_set() {
        let u = [0.69, 0.69, 0.3, 0.0, 0.0, 0.0];
        let wrong = [true, false, true, false, false, true];
        let mut pooled = UncertaintyErrors::new();
        pooled.add(&u, &wrong);
        let curve = pooled.error_curve();
        assert_eq!(curve.len(), 3);
        assert_eq!((curve[0].fraction, curve[0].error_rate), (2.0 / 6.0, 0.5));
        assert_eq!((curve[1].fraction, curve[1].error_rate), (3.0 / 6.0, 2.0 / 3.0));
        assert_eq!((curve[2].fraction, curve[2].error_rate), (1.0, 0.5));
        assert!(curve[0].uncertainty > curve[1].uncertainty && curve[2].uncertainty == 0.0);
        assert_eq!(UncertaintyErrors::bin(f32::NAN), 0);
        assert_eq!(UncertaintyErrors::bin(5.0), UNCERTAINTY_BINS - 1);
    }

    #[test]
    fn reliability_bins_rebuild_the_ece() {
        let p = [0.01f32, 0.02, 0.5, 0.55, 0.97, 1.0, 0.3];
        let t = [false, true, true, false, true, true, false];
        let mut c = Calibration::new();
        c.add(&p, &t);
        let bins = c.bins();
        assert_eq!(bins.len(), ECE_BINS);
        assert_eq!(bins.iter().map(|b| b.pixels).sum::<u64>(), 7);
        let ece: f64 =
            bins.iter().map(|b| b.pixels as f64 / 7.0 * (b.observed_frequency - b.mean_probability).abs()).sum();
        assert!((ece - c.ece()).abs() < 1e-12);
        // p = 1 goes to the last bin, p = 0.01 and 0.02 to the first.
        assert_eq!(bins[0].pixels, 2);
        assert_eq!(bins[0].observed_frequency, 0.5);
        assert_eq!(bins[ECE_BINS - 1].pixels, 2);
    }

    #[test]
    fn distance_transform_is_exact_on_a_small_grid() {
        // Surface points at (0, 0) and (4, 3) on a 6 x 5 grid; compare with brute force.
        let (w, h) = (6, 5);
        let mut codes = vec![0u8; w * h];
        codes[0] = 1;
        codes[3 * w + 4] = 1;
        let d = squared_distance_to_surface(&codes, w, h);
        for y in 0..h {
            for x in 0..w {
                let brute = [(0usize, 0usize), (4, 3)]
                    .iter()
                    .map(|&(px, py)| (x.abs_diff(px).pow(2) + y.abs_diff(py).pow(2)) as u64)
                    .min()
                    .unwrap();
                assert_eq!(d[y * w + x], brute, "at ({x}, {y})");
            }
        }
    }
}
