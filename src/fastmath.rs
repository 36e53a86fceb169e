//! Branch-free f32 maths for the CPU kernels: `exp`, `erf` and the activations built on them,
//! written so that a loop over a slice compiles to SIMD code (no libm calls, selects instead of
//! branches), and [`map_into`] / [`zip_map_into`], which run such loops with the widest vector
//! instructions the CPU offers (runtime detection through `pulp`; AVX2, AVX-512 or SSE2).
//!
//! Accuracy (measured against f64 over dense grids in `tests/fastmath.rs`): `exp` within 2 ulp
//! on its whole normal range, `erf` within 3e-7 absolute (about 2.5 ulp), so GELU is within a
//! few ulp of the libm formula. NaN propagates through every function, which the NaN-loss check
//! of training relies on. Results do not depend on the vector width: every lane does the same
//! IEEE operations in the same order. Polynomials are evaluated with explicit fused multiply-adds
//! (`mul_add`, correctly rounded everywhere: one instruction inside [`vectorised`] code on a CPU
//! with FMA, a libm call elsewhere), which halves their instruction count.

/// Coefficients of `erf(x) / x` as a polynomial in `x^2` on `[0, ERF_SPLIT]` (least-squares
/// fit on Chebyshev nodes, highest power first; fit error 1.3e-9). Written as fitted: the last one
/// is near 2/sqrt(pi), the series' leading term, but it is the fit's value, not that constant.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
const ERF_SMALL: [f32; 6] =
    [-6.787_303_7e-4, 5.119_888_6e-3, -2.683_752e-2, 1.128_344e-1, -3.761_262_3e-1, 1.128_379_2];
/// Coefficients of `erfc(x) e^(x^2)` as a polynomial in `t = 1 / (1 + x/2)` on
/// `[ERF_SPLIT, ERF_SATURATE]` (same fit, highest power first; fit error 1e-10).
#[allow(clippy::excessive_precision)]
const ERF_LARGE: [f32; 8] = [
    1.182_530_7e-1,
    -4.671_630_9e-1,
    5.569_583e-1,
    -9.818_785e-2,
    3.450_352_5e-1,
    2.605_257_6e-1,
    2.847_731_1e-1,
    -1.443_575_9e-4,
];
/// `1/k!` for k = 7 down to 0: the Taylor series of `e^r`, highest power first.
const EXP_TAYLOR: [f32; 8] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];
/// Where `erf` switches from the series-like fit to the `erfc` form.
const ERF_SPLIT: f32 = 0.75;
/// Beyond this `erf(x)` is 1 in f32 (`erfc(4.5)` is 2e-10, far below half an ulp of 1).
const ERF_SATURATE: f32 = 4.5;

/// `e^x`. Inputs below -104 give 0 and above 89 give infinity, as the exact function rounds.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Comparisons rather than `max`/`min`: those would turn a NaN into a bound.
    let x = if x < -104.0 { -104.0 } else { x };
    let x = if x > 89.0 { 89.0 } else { x };
    // x = n ln2 + r with |r| <= ln2 / 2; n by the round-to-nearest of adding 1.5 * 2^23.
    const ROUNDER: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    // ln2 split in two so that n * LN2_HI is exact for |n| < 512 (LN2_HI has 15 significant bits).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor series to degree 7: the first omitted term is below 5e-9 relative at |r| = ln2 / 2.
    let p = horner(&EXP_TAYLOR, r);
    // 2^n in two halves so that the subnormal results (n down to -150) come out right too.
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let half = n >> 1;
    let first = f32::from_bits(((half + 127) as u32) << 23);
    let second = f32::from_bits(((n - half + 127) as u32) << 23);
    p * first * second
}

/// The error function.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_and_gaussian(x).0
}

/// `(erf(x), e^(-x^2))`: the `erfc` form computes the Gaussian anyway, and GELU's backward
/// needs it too (the normal density at `x sqrt 2`).
#[inline(always)]
pub fn erf_and_gaussian(x: f32) -> (f32, f32) {
    let a = x.abs();
    let z = a * a;
    let small = horner(&ERF_SMALL, z) * a;
    let gaussian = exp(-z);
    // Past ERF_SATURATE the Gaussian (below 2e-9) makes the correction smaller than half an ulp
    // of 1 whatever the fit gives; clamping t keeps the polynomial on the range it was fitted on.
    let clamped = if a > ERF_SATURATE { ERF_SATURATE } else { a };
    let t = 1.0 / (1.0 + 0.5 * clamped);
    let large = 1.0 - horner(&ERF_LARGE, t) * gaussian;
    let magnitude = if a < ERF_SPLIT { small } else { large };
    // A NaN fails both comparisons above and arrives here through `large` as NaN.
    (magnitude.copysign(x), gaussian)
}

/// `1 / (1 + e^-x)`, taking exp of a non-positive argument only (no overflow in either tail).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = exp(-x.abs());
    let r = 1.0 / (1.0 + e);
    if x >= 0.0 {
        r
    } else {
        e * r
    }
}

/// `ln(1 + e)` for `e` in `[0, 1]` (the range softplus needs), through
/// `ln(1 + e) = 2 atanh(s)` with `s = e / (2 + e)` in `[0, 1/3]`: the odd series of atanh to
/// `s^17` leaves a relative error below `(1/9)^9 / 19`, 2.7e-10.
#[inline(always)]
pub fn ln_1p_unit(e: f32) -> f32 {
    let s = e / (2.0 + e);
    let z = s * s;
    // 2s plus a correction below a tenth of it: the rounding of s dominates the result's error.
    let correction = z
        * (1.0 / 3.0
            + z * (1.0 / 5.0
                + z * (1.0 / 7.0
                    + z * (1.0 / 9.0 + z * (1.0 / 11.0 + z * (1.0 / 13.0 + z * (1.0 / 15.0 + z * (1.0 / 17.0))))))));
    let two_s = 2.0 * s;
    two_s + two_s * correction
}

/// Polynomial with coefficients highest power first.
#[inline(always)]
fn horner<const N: usize>(coefficients: &[f32; N], x: f32) -> f32 {
    let mut acc = coefficients[0];
    for &c in &coefficients[1..] {
        acc = acc.mul_add(x, c);
    }
    acc
}

/// `out[i] = f(xs[i])`, vectorised for the running CPU.
#[inline(always)]
pub fn map_into(out: &mut [f32], xs: &[f32], f: impl Fn(f32) -> f32) {
    assert_eq!(out.len(), xs.len(), "map_into: output and input lengths differ");
    zip_map_into(out, xs, xs, |x, _| f(x));
}

/// `out[i] = f(xs[i], ys[i])`, vectorised for the running CPU.
///
/// The loop runs over a multiple of [`BLOCK`] elements and the rest goes through the same loop
/// padded to one whole block: left to itself the compiler hands up to 31 elements (four
/// unrolled vectors) to a scalar remainder loop, which for rows of ~150 elements (attention)
/// costs more than the vector part.
#[inline(always)]
pub fn zip_map_into(out: &mut [f32], xs: &[f32], ys: &[f32], f: impl Fn(f32, f32) -> f32) {
    assert!(out.len() == xs.len() && xs.len() == ys.len(), "zip_map_into: lengths differ");
    vectorised(
        #[inline(always)]
        || {
            let body = out.len() - out.len() % BLOCK;
            let (out_body, out_tail) = out.split_at_mut(body);
            for ((o, &x), &y) in out_body.iter_mut().zip(&xs[..body]).zip(&ys[..body]) {
                *o = f(x, y);
            }
            if !out_tail.is_empty() {
                let n = out_tail.len();
                let (mut x, mut y, mut o) = ([0.0f32; BLOCK], [0.0f32; BLOCK], [0.0f32; BLOCK]);
                x[..n].copy_from_slice(&xs[body..]);
                y[..n].copy_from_slice(&ys[body..]);
                for ((o, &x), &y) in o.iter_mut().zip(&x).zip(&y) {
                    *o = f(x, y);
                }
                out_tail.copy_from_slice(&o[..n]);
            }
        },
    );
}

/// `values[i] = f(values[i])`, vectorised for the running CPU (blocks as [`zip_map_into`]).
#[inline(always)]
pub fn map_in_place(values: &mut [f32], f: impl Fn(f32) -> f32) {
    vectorised(
        #[inline(always)]
        || {
            let body = values.len() - values.len() % BLOCK;
            let (head, tail) = values.split_at_mut(body);
            for v in head.iter_mut() {
                *v = f(*v);
            }
            if !tail.is_empty() {
                let n = tail.len();
                let mut padded = [0.0f32; BLOCK];
                padded[..n].copy_from_slice(tail);
                for v in padded.iter_mut() {
                    *v = f(*v);
                }
                tail.copy_from_slice(&padded[..n]);
            }
        },
    );
}

/// `values[i] = f(values[i], xs[i], ys[i])`, vectorised for the running CPU (blocks as
/// [`zip_map_into`]).
#[inline(always)]
pub fn zip_map_in_place(values: &mut [f32], xs: &[f32], ys: &[f32], f: impl Fn(f32, f32, f32) -> f32) {
    assert!(values.len() == xs.len() && xs.len() == ys.len(), "zip_map_in_place: lengths differ");
    vectorised(
        #[inline(always)]
        || {
            let body = values.len() - values.len() % BLOCK;
            let (head, tail) = values.split_at_mut(body);
            for ((v, &x), &y) in head.iter_mut().zip(&xs[..body]).zip(&ys[..body]) {
                *v = f(*v, x, y);
            }
            if !tail.is_empty() {
                let n = tail.len();
                let (mut v, mut x, mut y) = ([0.0f32; BLOCK], [0.0f32; BLOCK], [0.0f32; BLOCK]);
                v[..n].copy_from_slice(tail);
                x[..n].copy_from_slice(&xs[body..]);
                y[..n].copy_from_slice(&ys[body..]);
                for ((v, &x), &y) in v.iter_mut().zip(&x).zip(&y) {
                    *v = f(*v, x, y);
                }
                tail.copy_from_slice(&v[..n]);
            }
        },
    );
}

/// Elements per unrolled vector iteration of the map loops (4 AVX2 or 2 AVX-512 vectors).
const BLOCK: usize = 32;

/// Lanes of the reductions below: eight running partial results, so the loop vectorises
/// (AVX2 width) while the order of operations, and so the result, is fixed for every CPU.
const LANES: usize = 8;

/// Sum of `f(xs[i], ys[i])` (pass `|x, _| x` over one slice twice for a plain sum) in a fixed
/// order: eight interleaved partial sums, then those added pairwise, then the tail.
#[inline(always)]
pub fn zip_sum(xs: &[f32], ys: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    assert_eq!(xs.len(), ys.len(), "zip_sum: lengths differ");
    vectorised(
        #[inline(always)]
        || {
            let mut acc = [0.0f32; LANES];
            let (xc, yc) = (xs.chunks_exact(LANES), ys.chunks_exact(LANES));
            let (xt, yt) = (xc.remainder(), yc.remainder());
            for (x, y) in xc.zip(yc) {
                for k in 0..LANES {
                    acc[k] += f(x[k], y[k]);
                }
            }
            let mut total = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
            for (&x, &y) in xt.iter().zip(yt) {
                total += f(x, y);
            }
            total
        },
    )
}

/// Sum of a slice in the fixed order of [`zip_sum`].
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    zip_sum(xs, xs, |x, _| x)
}

/// Largest element (negative infinity for an empty slice); a NaN anywhere gives NaN.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    vectorised(
        #[inline(always)]
        || {
            let mut acc = [f32::NEG_INFINITY; LANES];
            let chunks = xs.chunks_exact(LANES);
            let tail = chunks.remainder();
            // `if a > b` keeps a NaN in `a` only when it arrives first; NaN is caught at the end.
            let mut nan = false;
            for x in chunks {
                for k in 0..LANES {
                    nan |= x[k].is_nan();
                    acc[k] = if x[k] > acc[k] { x[k] } else { acc[k] };
                }
            }
            let mut best = acc.iter().copied().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
            for &x in tail {
                nan |= x.is_nan();
                best = if x > best { x } else { best };
            }
            if nan {
                f32::NAN
            } else {
                best
            }
        },
    )
}

/// Runs `f` compiled for the widest vector instructions the CPU offers (AVX-512 or AVX2 + FMA
/// where present), so that the loops inside it auto-vectorise at that width. `f` must be inlined into
/// pulp's target-feature function for that: [`Inlined`] carries it into `with_simd`, which is
/// `#[inline(always)]` (a closure handed to `dispatch` directly is not always inlined, and then
/// runs as baseline SSE2 code).
#[inline(always)]
pub fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(Inlined(f))
}

struct Inlined<F>(F);

impl<R, F: FnOnce() -> R> pulp::WithSimd for Inlined<F> {
    type Output = R;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> R {
        (self.0)()
    }
}

/// Sum in f64 of `f(a[i], b[i], c[i])` in a fixed order (eight interleaved partial sums, added
/// pairwise, then the tail): the accuracy of an f64 accumulation at the speed of a vector loop.
#[inline(always)]
pub fn zip3_sum_f64(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f64) -> f64 {
    assert!(a.len() == b.len() && b.len() == c.len(), "zip3_sum_f64: lengths differ");
    vectorised(
        #[inline(always)]
        || {
            let mut acc = [0.0f64; LANES];
            let (ac, bc, cc) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
            let (at, bt, ct) = (ac.remainder(), bc.remainder(), cc.remainder());
            for ((x, y), z) in ac.zip(bc).zip(cc) {
                for k in 0..LANES {
                    acc[k] += f(x[k], y[k], z[k]);
                }
            }
            let mut total = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
            for ((&x, &y), &z) in at.iter().zip(bt).zip(ct) {
                total += f(x, y, z);
            }
            total
        },
    )
}

/// f64 sum of `f(a[i], b[i])` in the order of [`zip3_sum_f64`].
#[inline(always)]
pub fn zip_sum_f64(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    zip3_sum_f64(a, b, b, |x, y, _| f(x, y))
}

/// f64 sum of a slice in the order of [`zip3_sum_f64`].
#[inline(always)]
pub fn sum_f64(xs: &[f32]) -> f64 {
    zip3_sum_f64(xs, xs, xs, |x, _, _| x as f64)
}
