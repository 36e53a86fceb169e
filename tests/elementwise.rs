//! Elementwise family (kernels/elementwise.cu, src/ops/elementwise.rs): binary ops with
//! broadcasting, scalar ops, unary activations and `sum_to_shape`, each forward against an
//! independent f64 computation on every device, gradients against finite differences, GPU against
//! CPU, and shape errors that name the shapes.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::{
    add, add_scalar, add_untracked, binary, div, gelu, mul, quick_gelu, relu, scale, sigmoid, softplus, sub,
    sum_to_shape, unary, unary_backward, unary_forward, BinaryOp, UnaryOp,
};
use mcs_engine::{Device, Tape, Tensor};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Independent f64 references

fn binary_f64(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
    }
}

/// `shape` with leading 1s up to `rank`.
fn padded(shape: &[usize], rank: usize) -> Vec<usize> {
    let mut out = vec![1; rank - shape.len()];
    out.extend_from_slice(shape);
    out
}

/// Row-major coordinates of linear position `i` in `shape`.
fn coords(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut c = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        c[d] = i % shape[d];
        i /= shape[d];
    }
    c
}

/// Linear position in `shape` of the element that coordinates `c` of a larger shape broadcast
/// from (coordinate 0 along size-1 dims).
fn broadcast_source(c: &[usize], shape: &[usize]) -> usize {
    c.iter().zip(shape).fold(0, |acc, (&ci, &s)| acc * s + if s == 1 { 0 } else { ci })
}

/// NumPy-style broadcast result computed element by element in f64. Shapes must broadcast.
fn broadcast_f64(op: BinaryOp, a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let rank = a_shape.len().max(b_shape.len());
    let (pa, pb) = (padded(a_shape, rank), padded(b_shape, rank));
    let out_shape: Vec<usize> = pa.iter().zip(&pb).map(|(&x, &y)| x.max(y)).collect();
    let n: usize = out_shape.iter().product();
    let out = (0..n)
        .map(|i| {
            let c = coords(i, &out_shape);
            binary_f64(op, a[broadcast_source(&c, &pa)] as f64, b[broadcast_source(&c, &pb)] as f64) as f32
        })
        .collect();
    (out, out_shape)
}

/// Sums of `x` into `target` (broadcast rules) in f64, and the sums of |x| that bound rounding.
fn sum_to_f64(x: &[f32], x_shape: &[usize], target: &[usize]) -> (Vec<f32>, Vec<f64>) {
    let pt = padded(target, x_shape.len());
    let n_out: usize = target.iter().product();
    let (mut sums, mut abs_sums) = (vec![0.0f64; n_out], vec![0.0f64; n_out]);
    for (i, &v) in x.iter().enumerate() {
        let o = broadcast_source(&coords(i, x_shape), &pt);
        sums[o] += v as f64;
        abs_sums[o] += (v as f64).abs();
    }
    (sums.iter().map(|&s| s as f32).collect(), abs_sums)
}

fn sigmoid_f64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn unary_f64(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        UnaryOp::QuickGelu => x * sigmoid_f64(1.702 * x),
        UnaryOp::Sigmoid => sigmoid_f64(x),
        UnaryOp::Softplus => x.exp().ln_1p(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Square => x * x,
        UnaryOp::Neg => -x,
        UnaryOp::Relu => x.max(0.0),
    }
}

fn derivative_f64(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        }
        UnaryOp::QuickGelu => {
            let s = sigmoid_f64(1.702 * x);
            s + 1.702 * x * s * (1.0 - s)
        }
        UnaryOp::Sigmoid => sigmoid_f64(x) * (1.0 - sigmoid_f64(x)),
        UnaryOp::Softplus => sigmoid_f64(x),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => 1.0 / x,
        UnaryOp::Sqrt => 0.5 / x.sqrt(),
        UnaryOp::Square => 2.0 * x,
        UnaryOp::Neg => -1.0,
        // PyTorch's convention: slope 0 at x = 0 itself.
        UnaryOp::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// Inputs where each op is defined and well-conditioned.
fn domain(op: UnaryOp) -> (f32, f32) {
    match op {
        UnaryOp::Exp => (-20.0, 20.0),
        UnaryOp::Log => (1e-3, 100.0),
        UnaryOp::Sqrt => (1e-3, 100.0), // away from 0, where the slope is infinite
        UnaryOp::Softplus => (-30.0, 30.0),
        _ => (-8.0, 8.0),
    }
}

// ulp(1) = 1.19e-7. Comparing with the f64 value rounded to f32 adds half an ulp.
/// `(atol, rtol)` for the forward pass against f64 on `domain(op)`.
fn forward_tolerance(op: UnaryOp) -> (f32, f32) {
    match op {
        // One correctly rounded IEEE operation (sqrt with --prec-sqrt on the GPU): bit-exact.
        UnaryOp::Square | UnaryOp::Neg | UnaryOp::Sqrt => (0.0, 0.0),
        // A select between x and 0: exact.
        UnaryOp::Relu => (0.0, 0.0),
        // CUDA's expf is within 2 ulp and logf within 1; glibc's within 1: 3 ulp in all.
        UnaryOp::Exp | UnaryOp::Log => (0.0, 3.6e-7),
        // expf (2 ulp) then one add and one divide (0.5 ulp each), plus the final half ulp.
        UnaryOp::Sigmoid => (0.0, 5e-7),
        // expf (2 ulp) through log1p, which does not amplify relative error, log1pf (1 ulp).
        UnaryOp::Softplus => (0.0, 6e-7),
        // Rounding of 1.702 and of 1.702*x moves the sigmoid's argument by up to |z|*1.2e-7 with
        // |z| <= 13.6, which is that much relative error in the sigmoid's left tail.
        UnaryOp::QuickGelu => (0.0, 2.5e-6),
        // 1 + erf(x/sqrt2) carries erff's 2-ulp absolute error (~2.4e-7) even where it is tiny
        // (x << 0), times 0.5|x| <= 4: ~1e-6 absolute; otherwise a few ulp relative.
        UnaryOp::Gelu => (1e-6, 5e-7),
    }
}

/// `(atol, rtol)` for `dy * op'(x)` against f64, with |dy| <= 1.
fn backward_tolerance(op: UnaryOp) -> (f32, f32) {
    match op {
        // 2*dy is exact, then one rounded multiply; negation is exact.
        UnaryOp::Square | UnaryOp::Neg => (0.0, 0.0),
        // A select between dy and 0: exact.
        UnaryOp::Relu => (0.0, 0.0),
        // One divide; for sqrt, the saved y itself is correctly rounded (half an ulp more).
        UnaryOp::Log | UnaryOp::Sqrt => (0.0, 2.5e-7),
        // dy * y with y within 3 ulp.
        UnaryOp::Exp => (0.0, 5e-7),
        // z / (z + 1) with z = expf(x) within 2 ulp, times dy.
        UnaryOp::Softplus => (0.0, 6e-7),
        // (1 - y) y from a y that is off by 3 ulp near 1: absolute, not relative, accuracy.
        UnaryOp::Sigmoid => (5e-7, 5e-7),
        // Absolute errors of the sigmoid / erf terms (a few 1e-7) times |x| <= 8 and the slope.
        UnaryOp::QuickGelu => (4e-6, 2e-6),
        UnaryOp::Gelu => (2e-6, 1e-6),
    }
}

/// Divisors bounded away from zero: magnitudes in [0.25, 2], alternating signs.
fn divisors(seed: u64, n: usize) -> Vec<f32> {
    random_vec(seed, n, 0.25, 2.0).into_iter().enumerate().map(|(i, v)| if i % 2 == 0 { v } else { -v }).collect()
}

fn operands(op: BinaryOp, seed: u64, a_shape: &[usize], b_shape: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let a = random_vec(seed, a_shape.iter().product(), -4.0, 4.0);
    let n_b = b_shape.iter().product();
    let b = if op == BinaryOp::Div { divisors(seed + 1, n_b) } else { random_vec(seed + 1, n_b, -4.0, 4.0) };
    (a, b)
}

/// Runs `a op b` on every device and compares with the f64 reference.
fn check_binary_against_f64(op: BinaryOp, a_shape: &[usize], b_shape: &[usize], seed: u64) {
    let (a, b) = operands(op, seed, a_shape, b_shape);
    let (want, want_shape) = broadcast_f64(op, &a, a_shape, &b, b_shape);
    for device in devices() {
        let at = Tensor::from_slice(&a, a_shape, &device).unwrap();
        let bt = Tensor::from_slice(&b, b_shape, &device).unwrap();
        let y = binary(&Tape::inference(), op, &at, &bt).unwrap();
        let what = format!("{a_shape:?} {} {b_shape:?} on {}", op.name(), device.name());
        assert_eq!(y.shape(), &want_shape[..], "{what}: shape");
        // One IEEE operation on f32 inputs: the f64 result rounded to f32 is the correctly
        // rounded f32 result, which CPU and GPU (--prec-div) both produce. Bit-exact.
        assert_close(&what, &y.to_vec().unwrap(), &want, 0.0, 0.0);
    }
}

/// Largest per-output |got - want| allowed for a sum of f32 values: 4e-6 * sum|x|. The GPU adds
/// at most ~64 terms in sequence per output in these tests (about 32 per thread, then tree
/// levels and the second pass), and gamma_64 = 64 * 6e-8 = 3.8e-6; the CPU sums in f64.
fn check_sum_against_f64(x_shape: &[usize], target: &[usize], seed: u64) {
    let x = random_vec(seed, x_shape.iter().product(), -1.0, 1.0);
    let (want, abs_sums) = sum_to_f64(&x, x_shape, target);
    let atol = 4e-6 * abs_sums.iter().cloned().fold(0.0, f64::max) as f32;
    for device in devices() {
        let xt = Tensor::from_slice(&x, x_shape, &device).unwrap();
        let y = sum_to_shape(&xt, target).unwrap();
        let what = format!("sum_to_shape {x_shape:?} -> {target:?} on {}", device.name());
        assert_eq!(y.shape(), target, "{what}: shape");
        assert_close(&what, &y.to_vec().unwrap(), &want, atol, 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Forward against f64

/// Broadcast pairs from the model (bias, scalar gate, outer sums) and corner cases.
const BROADCAST_CASES: &[(&[usize], &[usize])] = &[
    (&[2, 3, 5], &[5]),                         // [B, T, C] + [C]
    (&[2, 3, 5], &[]),                          // [B, T, C] * scalar
    (&[2, 1, 5], &[1, 3, 1]),                   // [B, 1, C] - [1, T, 1]
    (&[], &[]),                                 // two rank-0 scalars
    (&[], &[4, 3]),                             // scalar on the left
    (&[1], &[]),                                // [1] with []
    (&[4, 1], &[3]),                            // column with row
    (&[7, 300], &[7, 1]),                       // inner broadcast, a size that is no multiple of 32
    (&[1, 37, 1], &[5, 1, 33]),                 // both broadcast
    (&[3, 1, 2, 1, 4], &[1, 5, 1, 6, 1]),       // rank 5, nothing merges
    (&[2, 1, 3, 1, 2, 1], &[1, 2, 1, 3, 1, 2]), // rank 6 alternating: the most dims supported
    (&[6, 4, 5], &[6, 4, 5]),                   // equal shapes (the fast path)
];

#[test]
fn binary_ops_broadcast_like_numpy() {
    for op in BinaryOp::ALL {
        for (i, (a_shape, b_shape)) in BROADCAST_CASES.iter().enumerate() {
            check_binary_against_f64(op, a_shape, b_shape, 100 + i as u64);
            check_binary_against_f64(op, b_shape, a_shape, 200 + i as u64);
        }
    }
}

#[test]
fn sum_to_shape_matches_f64() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[2, 3, 5], &[5]),       // bias gradient
        (&[2, 3, 5], &[]),        // scalar gate gradient
        (&[2, 3, 5], &[1]),       // gate stored as [1]
        (&[2, 3, 5], &[2, 1, 5]), // middle dim
        (&[2, 3, 5], &[1, 3, 1]), // outer and inner dims
        (&[2, 3, 5], &[3, 5]),    // leading dim only
        (&[2, 3, 5], &[2, 3, 1]), // innermost dim (row sums)
        (&[7, 300], &[7, 1]),
        (&[300, 7], &[7]),
        (&[1, 7], &[7]),          // only size-1 dims differ: a view
        (&[2, 3, 5], &[2, 3, 5]), // nothing to sum
        (&[64, 200, 3], &[64, 1, 3]),
        (&[3000, 300], &[300]), // column sums split across blocks on the GPU
        (&[1000, 1200], &[]),   // 1.2M elements to one scalar: split, then a second pass
    ];
    for (i, (x_shape, target)) in cases.iter().enumerate() {
        check_sum_against_f64(x_shape, target, 300 + i as u64);
    }
}

#[test]
fn scale_and_add_scalar_match_f64() {
    let x = random_vec(11, 1000, -5.0, 5.0);
    let (alpha, c) = (-1.7f32, 3.25f32);
    let scaled: Vec<f32> = x.iter().map(|&v| (v as f64 * alpha as f64) as f32).collect();
    let shifted: Vec<f32> = x.iter().map(|&v| (v as f64 + c as f64) as f32).collect();
    for device in devices() {
        let xt = Tensor::from_slice(&x, &[10, 100], &device).unwrap();
        let tape = Tape::inference();
        // One rounded IEEE operation each: bit-exact against the rounded f64 value.
        assert_close("scale", &scale(&tape, &xt, alpha).unwrap().to_vec().unwrap(), &scaled, 0.0, 0.0);
        assert_close("add_scalar", &add_scalar(&tape, &xt, c).unwrap().to_vec().unwrap(), &shifted, 0.0, 0.0);
    }
}

/// Forward and backward of `op` on `x` against f64, on every device.
fn check_unary_against_f64(op: UnaryOp, x: &[f32], seed: u64) {
    let dy = random_vec(seed, x.len(), -1.0, 1.0);
    let want_y: Vec<f32> = x.iter().map(|&v| unary_f64(op, v as f64) as f32).collect();
    let want_dx: Vec<f32> =
        x.iter().zip(&dy).map(|(&v, &g)| (g as f64 * derivative_f64(op, v as f64)) as f32).collect();
    let (fa, fr) = forward_tolerance(op);
    let (ba, br) = backward_tolerance(op);
    for device in devices() {
        let xt = Tensor::from_slice(x, &[x.len()], &device).unwrap();
        let dyt = Tensor::from_slice(&dy, &[x.len()], &device).unwrap();
        let y = unary_forward(op, &xt).unwrap();
        let saved = if op.backward_uses_output() { &y } else { &xt };
        let dx = unary_backward(op, saved, &dyt).unwrap();
        let on = device.name();
        assert_close(&format!("{} forward on {on}", op.name()), &y.to_vec().unwrap(), &want_y, fa, fr);
        assert_close(&format!("{} backward on {on}", op.name()), &dx.to_vec().unwrap(), &want_dx, ba, br);
    }
}

#[test]
fn unary_ops_match_f64_over_their_domains() {
    for (i, op) in UnaryOp::ALL.into_iter().enumerate() {
        let (lo, hi) = domain(op);
        let x = random_vec(40 + i as u64, 5000, lo, hi);
        check_unary_against_f64(op, &x, 60 + i as u64);
    }
}

#[test]
fn activations_stay_finite_and_saturate_at_extremes() {
    let x = [-3e38f32, -1e4, -100.0, -88.0, -20.5, 0.0, 20.0, 20.5, 88.0, 100.0, 1e4, 3e38];
    let big = x.len() - 1;
    for device in devices() {
        let xt = Tensor::from_slice(&x, &[x.len()], &device).unwrap();
        let ones = Tensor::full(1.0, &[x.len()], &device).unwrap();
        for op in [UnaryOp::Gelu, UnaryOp::QuickGelu, UnaryOp::Sigmoid, UnaryOp::Softplus, UnaryOp::Relu] {
            let y = unary_forward(op, &xt).unwrap().to_vec().unwrap();
            let saved = if op.backward_uses_output() {
                Tensor::from_slice(&y, &[x.len()], &device).unwrap()
            } else {
                xt.clone()
            };
            let dx = unary_backward(op, &saved, &ones).unwrap().to_vec().unwrap();
            let what = format!("{} on {}", op.name(), device.name());
            assert!(y.iter().chain(&dx).all(|v| v.is_finite()), "{what}: y {y:?}, dy/dx {dx:?}");
            // Far left every activation is 0 with slope 0; far right GELUs and softplus are x with
            // slope 1 and the sigmoid is 1 with slope 0.
            assert_eq!((y[0], y[1]), (0.0, 0.0), "{what}: left tail {y:?}");
            assert_eq!((dx[0], dx[1]), (0.0, 0.0), "{what}: left slope {dx:?}");
            let (right, slope) = if op == UnaryOp::Sigmoid { ((1.0, 1.0), 0.0) } else { ((x[big - 1], x[big]), 1.0) };
            assert_eq!((y[big - 1], y[big]), right, "{what}: right tail {y:?}");
            assert_eq!((dx[big - 1], dx[big]), (slope, slope), "{what}: right slope {dx:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random broadcast pairs: a full shape whose last dim takes sizes that are no multiple of
    /// 32 or 256, and two operands made from it by dropping leading dims and setting dims to 1.
    #[test]
    fn binary_ops_match_f64_on_random_broadcasts(
        lead in prop::collection::vec(1usize..6, 0..=3),
        last in 1usize..300,
        masks in (any::<u8>(), any::<u8>()),
        drops in (0usize..=4, 0usize..=4),
        seed in any::<u64>(),
    ) {
        let mut full = lead;
        full.push(last);
        let make = |mask: u8, drop: usize| -> Vec<usize> {
            full.iter().enumerate().skip(drop.min(full.len())).map(|(d, &s)| if (mask >> d) & 1 == 1 { 1 } else { s }).collect()
        };
        let (a_shape, b_shape) = (make(masks.0, drops.0), make(masks.1, drops.1));
        for op in BinaryOp::ALL {
            check_binary_against_f64(op, &a_shape, &b_shape, seed);
        }
    }

    #[test]
    fn sum_to_shape_matches_f64_on_random_shapes(
        x_shape in prop::collection::vec(1usize..40, 0..=4),
        mask in any::<u8>(),
        drop in 0usize..=4,
        seed in any::<u64>(),
    ) {
        prop_assume!(x_shape.iter().product::<usize>() <= 200_000);
        let target: Vec<usize> = x_shape
            .iter()
            .enumerate()
            .skip(drop.min(x_shape.len()))
            .map(|(d, &s)| if (mask >> d) & 1 == 1 { 1 } else { s })
            .collect();
        check_sum_against_f64(&x_shape, &target, seed);
    }

    #[test]
    fn unary_ops_match_f64_on_random_values(len in 1usize..3000, seed in any::<u64>(), which in 0usize..UnaryOp::ALL.len()) {
        let op = UnaryOp::ALL[which];
        let (lo, hi) = domain(op);
        check_unary_against_f64(op, &random_vec(seed, len, lo, hi), seed ^ 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Gradients against finite differences

// Finite differences in f32 with eps 1e-2 on O(1) values: truncation error O(eps^2 f''') ~ 1e-4
// (exp up to e^2 adds a factor 7), rounding error ~ 1e-7 / eps ~ 1e-5 per output summed over the
// few outputs a broadcast operand feeds. 2e-3 absolute + 1e-2 relative sits well above both.
const FD_EPS: f32 = 1e-2;
const FD_ATOL: f32 = 2e-3;
const FD_RTOL: f32 = 1e-2;

#[test]
fn binary_gradients_match_finite_differences_with_broadcasting() {
    let cases: &[(&[usize], &[usize])] =
        &[(&[2, 3, 4], &[4]), (&[2, 1, 4], &[1, 3, 1]), (&[2, 3], &[]), (&[3], &[2, 3]), (&[2, 3], &[2, 3])];
    for op in BinaryOp::ALL {
        for (i, (a_shape, b_shape)) in cases.iter().enumerate() {
            let (a, b) = operands(op, 500 + i as u64, a_shape, b_shape);
            let name = format!("{a_shape:?} {} {b_shape:?}", op.name());
            let inputs = [(a, a_shape.to_vec()), (b, b_shape.to_vec())];
            check_gradients(&name, &inputs, &[], FD_EPS, FD_ATOL, FD_RTOL, |tape, p| binary(tape, op, &p[0], &p[1]));
            // One operand frozen: it gets no gradient and the other's is unchanged.
            for frozen in [0, 1] {
                check_gradients(&name, &inputs, &[frozen], FD_EPS, FD_ATOL, FD_RTOL, |tape, p| {
                    binary(tape, op, &p[0], &p[1])
                });
            }
        }
    }
}

#[test]
fn named_binary_ops_and_reused_inputs_accumulate_gradients() {
    let x = random_vec(21, 12, 0.5, 2.0);
    // Divisors in [0.5, 2] with both signs: near 0 the quotient's curvature defeats finite differences.
    let w: Vec<f32> = divisors(22, 4).into_iter().map(|v| v.signum() * (0.5 + v.abs() * 0.75)).collect();
    // (x * w + x) / w - x * x: x feeds four ops and w two, so gradients add up across entries.
    check_gradients("composite", &[(x, vec![3, 4]), (w, vec![4])], &[], FD_EPS, FD_ATOL, FD_RTOL, |tape, p| {
        let (x, w) = (&p[0], &p[1]);
        let t = add(tape, &mul(tape, x, w)?, x)?;
        sub(tape, &div(tape, &t, w)?, &mul(tape, x, x)?)
    });
}

#[test]
fn unary_gradients_match_finite_differences() {
    for (i, op) in UnaryOp::ALL.into_iter().enumerate() {
        let mut x = match op {
            UnaryOp::Log | UnaryOp::Sqrt => random_vec(70 + i as u64, 20, 0.5, 3.0),
            UnaryOp::Exp => random_vec(70 + i as u64, 20, -2.0, 2.0),
            _ => random_vec(70 + i as u64, 20, -3.0, 3.0),
        };
        if op == UnaryOp::Softplus {
            x.extend([25.0, -25.0]); // both sides of the threshold branch
        }
        if op == UnaryOp::Relu {
            // Central differences straddling the kink at 0 would see half a slope: keep every
            // probe point at least 0.1 (10 eps) away from it, on both sides.
            x.iter_mut().for_each(|v| *v = v.signum() * (v.abs() + 0.1));
        }
        let shape = vec![x.len()];
        check_gradients(op.name(), &[(x, shape)], &[], FD_EPS, FD_ATOL, FD_RTOL, |tape, p| unary(tape, op, &p[0]));
    }
    // The named wrappers reach the same ops.
    let x = random_vec(80, 6, -2.0, 2.0);
    for (name, f) in [
        ("gelu", gelu as fn(&Tape, &Tensor) -> mcs_engine::Result<Tensor>),
        ("quick_gelu", quick_gelu),
        ("sigmoid", sigmoid),
        ("softplus", softplus),
    ] {
        check_gradients(name, &[(x.clone(), vec![2, 3])], &[], FD_EPS, FD_ATOL, FD_RTOL, |tape, p| f(tape, &p[0]));
    }
    let away_from_zero = vec![-1.5, -0.3, 0.2, 0.7, -2.0, 1.1];
    check_gradients("relu", &[(away_from_zero, vec![2, 3])], &[], FD_EPS, FD_ATOL, FD_RTOL, |tape, p| {
        relu(tape, &p[0])
    });
}

/// ReLU at its edge cases, as PyTorch: slope 0 at exactly 0 (both signs of zero), NaN in gives NaN
/// out, and an infinite upstream gradient where the slope is 0 gives 0, not NaN (a select, not a
/// product).
#[test]
fn relu_at_zero_nan_and_infinities_follows_pytorch() {
    let x = [0.0f32, -0.0, f32::NAN, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY];
    let dy = [5.0f32, 5.0, 5.0, f32::INFINITY, f32::INFINITY, 2.0, 2.0];
    for device in devices() {
        let tape = Tape::new();
        let xt = Tensor::from_slice(&x, &[x.len()], &device).unwrap().into_trainable();
        let y = relu(&tape, &xt).unwrap();
        let out = y.to_vec().unwrap();
        let grads = tape.backward_from(&y, Tensor::from_slice(&dy, &[dy.len()], &device).unwrap()).unwrap();
        let dx = grads.get(&xt).unwrap().to_vec().unwrap();
        let on = device.name();
        assert!(out[2].is_nan(), "relu(NaN) must be NaN on {on}: {out:?}");
        let finite_part = [out[0], out[1], out[3], out[4], out[5], out[6]];
        assert_eq!(finite_part, [0.0, 0.0, 1.0, 0.0, f32::INFINITY, 0.0], "relu forward on {on}");
        // PyTorch's threshold_backward passes dy where !(x <= 0), which includes NaN.
        assert_eq!(dx, [0.0, 0.0, 5.0, f32::INFINITY, 0.0, 2.0, 0.0], "relu backward on {on}");
    }
}

#[test]
fn scalar_op_gradients_match_finite_differences() {
    let x = random_vec(90, 10, -2.0, 2.0);
    check_gradients("scale", &[(x.clone(), vec![2, 5])], &[], FD_EPS, FD_ATOL, FD_RTOL, |tape, p| {
        scale(tape, &p[0], -1.7)
    });
    check_gradients("add_scalar", &[(x, vec![2, 5])], &[], FD_EPS, FD_ATOL, FD_RTOL, |tape, p| {
        add_scalar(tape, &p[0], 3.25)
    });
}

#[test]
fn ops_on_frozen_inputs_record_nothing() {
    let tape = Tape::new();
    let a = Tensor::ones(&[2, 3], &Device::Cpu).unwrap();
    let y = mul(&tape, &a, &a).unwrap();
    let y = gelu(&tape, &y).unwrap();
    let y = scale(&tape, &y, 2.0).unwrap();
    assert!(tape.is_empty() && !y.needs_grad(), "frozen inputs must leave the tape empty");
}

// ---------------------------------------------------------------------------------------------
// Errors

#[test]
fn shapes_that_do_not_broadcast_are_named_in_the_error() {
    let a = Tensor::zeros(&[2, 3], &Device::Cpu).unwrap();
    let b = Tensor::zeros(&[4], &Device::Cpu).unwrap();
    for op in BinaryOp::ALL {
        let err = binary(&Tape::inference(), op, &a, &b).unwrap_err().to_string();
        assert!(err.contains(op.name()) && err.contains("[2, 3]") && err.contains("[4]"), "unexpected message: {err}");
    }
}

#[test]
fn more_than_six_unmergeable_dims_are_refused_with_the_shapes() {
    let a = Tensor::zeros(&[2, 1, 2, 1, 2, 1, 2], &Device::Cpu).unwrap();
    let b = Tensor::zeros(&[1, 2, 1, 2, 1, 2, 1], &Device::Cpu).unwrap();
    let err = add(&Tape::inference(), &a, &b).unwrap_err().to_string();
    assert!(err.contains("[2, 1, 2, 1, 2, 1, 2]") && err.contains("at most 6"), "unexpected message: {err}");
    // Rank 7 that merges down to fewer dims is fine.
    let c = Tensor::ones(&[2, 2, 2, 2, 2, 2, 3], &Device::Cpu).unwrap();
    let d = Tensor::ones(&[3], &Device::Cpu).unwrap();
    assert_eq!(add(&Tape::inference(), &c, &d).unwrap().to_vec().unwrap(), vec![2.0; 192]);
}

#[test]
fn sum_to_shape_errors_name_both_shapes() {
    let x = Tensor::zeros(&[2, 3], &Device::Cpu).unwrap();
    for target in [&[4][..], &[2, 2], &[1, 2, 3]] {
        let err = sum_to_shape(&x, target).unwrap_err().to_string();
        assert!(err.contains("[2, 3]") && err.contains(&format!("{target:?}")), "unexpected message: {err}");
    }
}

#[test]
fn untracked_helpers_check_their_shapes() {
    let a = Tensor::zeros(&[2, 3], &Device::Cpu).unwrap();
    let b = Tensor::zeros(&[3], &Device::Cpu).unwrap();
    let err = add_untracked(&a, &b).unwrap_err().to_string();
    assert!(err.contains("[2, 3]") && err.contains("[3]"), "unexpected message: {err}");
    let err = unary_backward(UnaryOp::Gelu, &a, &b).unwrap_err().to_string();
    assert!(err.contains("gelu") && err.contains("[2, 3]") && err.contains("[3]"), "unexpected message: {err}");
}

// ---------------------------------------------------------------------------------------------
// GPU against CPU

#[test]
fn gpu_binary_forward_and_backward_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let cases: &[(&[usize], &[usize])] =
        &[(&[4, 197, 768], &[768]), (&[4, 1, 33], &[1, 197, 1]), (&[8, 50, 64], &[]), (&[300, 129], &[300, 129])];
    for op in BinaryOp::ALL {
        for (i, (a_shape, b_shape)) in cases.iter().enumerate() {
            let (a, b) = operands(op, 700 + i as u64, a_shape, b_shape);
            let run = |device: &Device| {
                let tape = Tape::new();
                let at = Tensor::from_slice(&a, a_shape, device).unwrap().into_trainable();
                let bt = Tensor::from_slice(&b, b_shape, device).unwrap().into_trainable();
                let y = binary(&tape, op, &at, &bt).unwrap();
                let dy = random_tensor(9, y.shape(), -1.0, 1.0, device);
                let out = y.to_vec().unwrap();
                let grads = tape.backward_from(&y, dy).unwrap();
                (out, grads.get(&at).unwrap().to_vec().unwrap(), grads.get(&bt).unwrap().to_vec().unwrap())
            };
            let (g, c) = (run(&gpu), run(&Device::Cpu));
            let what = format!("{a_shape:?} {} {b_shape:?} gpu vs cpu", op.name());
            // Forward: the same correctly rounded operation on both.
            assert_close(&format!("{what}: y"), &g.0, &c.0, 0.0, 0.0);
            // Gradients of broadcast operands sum up to ~800 products: the GPU sums in f32 in a
            // different order than the CPU's f64, ~1e-6 relative to the magnitudes summed.
            assert_close(&format!("{what}: da"), &g.1, &c.1, 1e-4, 1e-5);
            assert_close(&format!("{what}: db"), &g.2, &c.2, 1e-4, 1e-5);
        }
    }
}

#[test]
fn gpu_unary_and_sum_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let x = random_vec(31, 100_003, -10.0, 10.0);
    let dy = random_vec(32, 100_003, -1.0, 1.0);
    for op in UnaryOp::ALL {
        let xs: Vec<f32> = match op {
            UnaryOp::Log | UnaryOp::Sqrt => x.iter().map(|v| v.abs() + 1e-3).collect(),
            _ => x.clone(),
        };
        let run = |device: &Device| {
            let tape = Tape::new();
            let xt = Tensor::from_slice(&xs, &[xs.len()], device).unwrap().into_trainable();
            let y = unary(&tape, op, &xt).unwrap();
            let out = y.to_vec().unwrap();
            let grads = tape.backward_from(&y, Tensor::from_slice(&dy, &[dy.len()], device).unwrap()).unwrap();
            (out, grads.get(&xt).unwrap().to_vec().unwrap())
        };
        let (g, c) = (run(&gpu), run(&Device::Cpu));
        // CUDA's and glibc's expf/logf/erff/log1pf differ by up to ~2 ulp: twice the f64 tolerances.
        let ((fa, fr), (ba, br)) = (forward_tolerance(op), backward_tolerance(op));
        assert_close(&format!("{} forward gpu vs cpu", op.name()), &g.0, &c.0, 2.0 * fa, 2.0 * fr + 2.5e-7);
        assert_close(&format!("{} backward gpu vs cpu", op.name()), &g.1, &c.1, 2.0 * ba, 2.0 * br + 2.5e-7);
    }
    for (x_shape, target) in [(&[2000, 600][..], &[][..]), (&[1576, 768], &[768]), (&[4, 197, 768], &[4, 1, 768])] {
        let xt = random_tensor(33, x_shape, -1.0, 1.0, &Device::Cpu);
        let c = sum_to_shape(&xt, target).unwrap().to_vec().unwrap();
        let g = sum_to_shape(&xt.to_device(&gpu).unwrap(), target).unwrap().to_vec().unwrap();
        // |sum| of up to 1.2M values in [-1, 1]: f32 tree/split sums stay within ~1e-6 * sum|x|.
        let atol = 4e-6 * x_shape.iter().product::<usize>() as f32 / target.iter().product::<usize>() as f32;
        assert_close(&format!("sum_to_shape {x_shape:?} -> {target:?} gpu vs cpu"), &g, &c, atol, 0.0);
    }
}
