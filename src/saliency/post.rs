//! From a saliency map to SAM's inputs: a two-cluster k-means on the saliency values picks the
//! salient pixels (MedCLIP-SAMv2's default post-processing), the largest 8-connected components of
//! them are kept, and each kept component gives a box and positive points.

use serde::Serialize;

use crate::error::{Error, Result};

/// Lloyd iterations of [`kmeans_two`] at most. In one dimension with two centres the assignment
/// is a threshold at the centres' midpoint that moves monotonically, so it settles in a handful
/// of iterations; the cap only bounds a pathological input.
const MAX_ITERATIONS: usize = 100;

/// Positive points per component: what MedCLIP-SAMv2 hands SAM.
pub const POINTS_PER_COMPONENT: usize = 10;

/// The result of [`kmeans_two`].
#[derive(Clone, Debug, PartialEq)]
pub struct TwoMeans {
    /// The lower centre after the last iteration.
    pub low: f32,
    /// The higher centre after the last iteration.
    pub high: f32,
    /// Per value: in the cluster of the higher centre.
    pub high_cluster: Vec<bool>,
    /// Lloyd iterations run (0 when the values are all equal or there are none).
    pub iterations: usize,
}

/// k-means with k = 2 on scalar values: centres start at the minimum and the maximum, then Lloyd
/// iterations (assign each value to the nearer centre, a tie to the lower one; move each centre
/// to the mean of its values, in f64) until no assignment changes.
///
/// All values equal (or none): both centres are that value and no value is in the high cluster,
/// so a constant saliency map marks nothing. Errors: a non-finite value.
pub fn kmeans_two(values: &[f32]) -> Result<TwoMeans> {
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!("k-means: the saliency map holds a non-finite value ({bad})")));
    }
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut assigned = vec![false; values.len()];
    if values.is_empty() || min == max {
        let centre = if values.is_empty() { 0.0 } else { min };
        return Ok(TwoMeans { low: centre, high: centre, high_cluster: assigned, iterations: 0 });
    }
    let (mut low, mut high) = (f64::from(min), f64::from(max));
    let mut iterations = 0;
    loop {
        iterations += 1;
        let mut changed = false;
        let (mut sums, mut counts) = ([0.0f64; 2], [0usize; 2]);
        for (v, slot) in values.iter().zip(assigned.iter_mut()) {
            let v = f64::from(*v);
            let to_high = (v - high).abs() < (v - low).abs();
            changed |= to_high != *slot;
            *slot = to_high;
            sums[usize::from(to_high)] += v;
            counts[usize::from(to_high)] += 1;
        }
        // An emptied cluster keeps its centre (it cannot happen from min/max starts, whose own
        // values always stay nearest to them, but the update must not divide by zero).
        if counts[0] > 0 {
            low = sums[0] / counts[0] as f64;
        }
        if counts[1] > 0 {
            high = sums[1] / counts[1] as f64;
        }
        if !changed || iterations >= MAX_ITERATIONS {
            break;
        }
    }
    Ok(TwoMeans { low: low as f32, high: high as f32, high_cluster: assigned, iterations })
}

/// One 8-connected component of a mask.
#[derive(Clone, Debug, PartialEq)]
pub struct Component {
    /// Its pixels as row-major indices (`y * width + x`), ascending.
    pub pixels: Vec<usize>,
    /// Bounding box `[x0, y0, x1, y1]`, inclusive pixel coordinates.
    pub bbox: [usize; 4],
}

/// The `keep` largest 8-connected components of a `width` x `height` mask (row-major), largest
/// first; components of equal size in the row-major order of their first pixel. Errors: a mask
/// that is not `width * height` long.
pub fn largest_components(mask: &[bool], width: usize, height: usize, keep: usize) -> Result<Vec<Component>> {
    if width.checked_mul(height) != Some(mask.len()) {
        return Err(Error::shape(
            "largest_components",
            format!("a mask of {} pixels is not {width}x{height}", mask.len()),
        ));
    }
    let mut seen = vec![false; mask.len()];
    let mut components = Vec::new();
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut pixels = Vec::new();
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        while let Some(i) = stack.pop() {
            pixels.push(i);
            let (x, y) = (i % width, i / width);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let n = ny * width + nx;
                    if mask[n] && !seen[n] {
                        seen[n] = true;
                        stack.push(n);
                    }
                }
            }
        }
        pixels.sort_unstable();
        components.push(Component { pixels, bbox: [x0, y0, x1, y1] });
    }
    // Stable sort: equal sizes stay in the order they were found, that of their first pixel.
    components.sort_by_key(|c| std::cmp::Reverse(c.pixels.len()));
    components.truncate(keep);
    Ok(components)
}

/// SAM's prompt for one component.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SamPrompt {
    /// `[x0, y0, x1, y1]`, inclusive pixel coordinates (SAM's XYXY).
    pub bbox: [usize; 4],
    /// Positive points `[x, y]`: the component's most salient pixels, most salient first.
    pub points: Vec<[usize; 2]>,
}

/// The box of `component` and its [`POINTS_PER_COMPONENT`] most salient pixels (fewer when it is
/// smaller), equal saliencies in row-major order. `saliency` is the `width`-wide map the component
/// was found in. Errors: a component pixel outside the map.
pub fn sam_prompt(component: &Component, saliency: &[f32], width: usize) -> Result<SamPrompt> {
    if let Some(&outside) = component.pixels.iter().find(|&&i| i >= saliency.len()) {
        return Err(Error::shape(
            "sam_prompt",
            format!("component pixel {outside} is outside a map of {} pixels", saliency.len()),
        ));
    }
    let mut ranked = component.pixels.clone();
    ranked.sort_by(|&a, &b| saliency[b].total_cmp(&saliency[a]).then(a.cmp(&b)));
    let points = ranked.iter().take(POINTS_PER_COMPONENT).map(|&i| [i % width.max(1), i / width.max(1)]).collect();
    Ok(SamPrompt { bbox: component.bbox, points })
}

/// The coarse mask of `components` (their union) over `len` pixels.
pub fn component_mask(components: &[Component], len: usize) -> Vec<bool> {
    let mut mask = vec![false; len];
    for component in components {
        for &i in &component.pixels {
            if let Some(m) = mask.get_mut(i) {
                *m = true;
            }
        }
    }
    mask
}
