//! CPU kernels of the elementwise family and the scalar definitions they vectorise.
//!
//! Each unary op is one scalar function below (used by [`UnaryOp::apply`] too, so the scalar
//! and the vector paths agree bit for bit); a kernel runs it over rayon chunks, each chunk one
//! SIMD loop (`fastmath::map_into`). The op is chosen outside the loop so that every loop body
//! is a single monomorphised function the compiler can vectorise.

use rayon::prelude::*;

use super::{BinaryOp, Broadcast, UnaryOp, CPU_CHUNK};
use crate::fastmath::{self, map_into, zip_map_into};
use crate::ops::strided::StridedWalk;
use crate::tensor::host_buffer;

const SQRT1_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`, the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;
const QUICK_GELU_SLOPE: f32 = 1.702;
const SOFTPLUS_THRESHOLD: f32 = 20.0;

/// `0.5 x (1 + erf(x / sqrt 2))`, the exact form (`torch.nn.GELU()`).
#[inline(always)]
pub(super) fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + fastmath::erf(x * SQRT1_2))
}

/// `dy * (Phi(x) + x phi(x))`, the normal CDF and density from one erf evaluation (its
/// Gaussian `e^(-x^2 / 2)` is the density's exponential).
#[inline(always)]
pub(super) fn gelu_backward(x: f32, dy: f32) -> f32 {
    let (erf, gaussian) = fastmath::erf_and_gaussian(x * SQRT1_2);
    let cdf = 0.5 * (1.0 + erf);
    let pdf = gaussian * INV_SQRT_2PI;
    dy * (cdf + x * pdf)
}

#[inline(always)]
pub(super) fn quick_gelu(x: f32) -> f32 {
    x * fastmath::sigmoid(QUICK_GELU_SLOPE * x)
}

#[inline(always)]
pub(super) fn quick_gelu_backward(x: f32, dy: f32) -> f32 {
    let s = fastmath::sigmoid(QUICK_GELU_SLOPE * x);
    // Bracketed so that a huge |x| meets s * (1 - s) = 0 before it can overflow to inf * 0.
    dy * (s + x * (QUICK_GELU_SLOPE * s * (1.0 - s)))
}

/// `log(1 + e^x)`, and `x` above 20 (PyTorch's default beta 1, threshold 20): above the
/// threshold softplus(x) equals x in f32 (and exp(x) could overflow).
///
/// Computed as `max(x, 0) + ln(1 + e^-|x|)`, the same function with the logarithm's argument in
/// `[1, 2]`, where a short series is exact to f32 and vectorises.
#[inline(always)]
pub(super) fn softplus(x: f32) -> f32 {
    let soft = if x > 0.0 { x } else { 0.0 } + fastmath::ln_1p_unit(fastmath::exp(-x.abs()));
    if x > SOFTPLUS_THRESHOLD {
        x
    } else {
        soft
    }
}

#[inline(always)]
pub(super) fn softplus_backward(x: f32, dy: f32) -> f32 {
    let z = fastmath::exp(x);
    let soft = dy * z / (z + 1.0);
    if x > SOFTPLUS_THRESHOLD {
        dy
    } else {
        soft
    }
}

impl UnaryOp {
    /// The op on one value (formulas follow PyTorch's, as the kernels do).
    pub fn apply(self, x: f32) -> f32 {
        match self {
            UnaryOp::Gelu => gelu(x),
            UnaryOp::QuickGelu => quick_gelu(x),
            UnaryOp::Sigmoid => fastmath::sigmoid(x),
            UnaryOp::Softplus => softplus(x),
            UnaryOp::Exp => fastmath::exp(x),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Square => x * x,
            UnaryOp::Neg => -x,
            UnaryOp::Relu => relu(x),
        }
    }

    /// `dy * op'(x)`, given the saved value (`y` or `x`, see [`UnaryOp::backward_uses_output`]).
    pub(super) fn derivative_times(self, saved: f32, dy: f32) -> f32 {
        match self {
            UnaryOp::Gelu => gelu_backward(saved, dy),
            UnaryOp::QuickGelu => quick_gelu_backward(saved, dy),
            UnaryOp::Sigmoid => sigmoid_backward(saved, dy),
            UnaryOp::Softplus => softplus_backward(saved, dy),
            UnaryOp::Exp => dy * saved,
            UnaryOp::Log => dy / saved,
            UnaryOp::Sqrt => dy / (2.0 * saved),
            UnaryOp::Square => dy * 2.0 * saved,
            UnaryOp::Neg => -dy,
            UnaryOp::Relu => relu_backward(saved, dy),
        }
    }
}

/// `max(x, 0)` with NaN passed through, as `torch.relu` (and the kernel's `OP_RELU`).
#[inline(always)]
fn relu(x: f32) -> f32 {
    if x > 0.0 || x.is_nan() {
        x
    } else {
        0.0
    }
}

/// PyTorch's `threshold_backward`: 0 where `x <= 0`, `dy` elsewhere (a select, so an infinite `dy`
/// does not become NaN where the gradient is 0).
#[inline(always)]
fn relu_backward(x: f32, dy: f32) -> f32 {
    if x <= 0.0 {
        0.0
    } else {
        dy
    }
}

#[inline(always)]
fn sigmoid_backward(y: f32, dy: f32) -> f32 {
    dy * (1.0 - y) * y
}

/// `op(x)` for every element.
pub(super) fn unary_forward(op: UnaryOp, xs: &[f32]) -> Vec<f32> {
    let mut out = host_buffer(xs.len());
    out.par_chunks_mut(CPU_CHUNK).zip(xs.par_chunks(CPU_CHUNK)).for_each(|(o, x)| match op {
        UnaryOp::Gelu => map_into(o, x, gelu),
        UnaryOp::QuickGelu => map_into(o, x, quick_gelu),
        UnaryOp::Sigmoid => map_into(o, x, fastmath::sigmoid),
        UnaryOp::Softplus => map_into(o, x, softplus),
        UnaryOp::Exp => map_into(o, x, fastmath::exp),
        UnaryOp::Log => map_into(o, x, f32::ln),
        UnaryOp::Sqrt => map_into(o, x, f32::sqrt),
        UnaryOp::Square => map_into(o, x, |v| v * v),
        UnaryOp::Neg => map_into(o, x, |v| -v),
        UnaryOp::Relu => map_into(o, x, relu),
    });
    out
}

/// `dy * op'(saved)` for every element.
pub(super) fn unary_backward(op: UnaryOp, saved: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut out = host_buffer(dy.len());
    let chunks = out.par_chunks_mut(CPU_CHUNK).zip(saved.par_chunks(CPU_CHUNK).zip(dy.par_chunks(CPU_CHUNK)));
    chunks.for_each(|(o, (s, g))| match op {
        UnaryOp::Gelu => zip_map_into(o, s, g, gelu_backward),
        UnaryOp::QuickGelu => zip_map_into(o, s, g, quick_gelu_backward),
        UnaryOp::Sigmoid => zip_map_into(o, s, g, sigmoid_backward),
        UnaryOp::Softplus => zip_map_into(o, s, g, softplus_backward),
        UnaryOp::Relu => zip_map_into(o, s, g, relu_backward),
        other => zip_map_into(o, s, g, move |v, d| other.derivative_times(v, d)),
    });
    out
}

/// `a op b` over a broadcast plan. The innermost (merged) dim is walked as rows: a row whose
/// operands are contiguous or constant along it runs as one SIMD loop.
pub(super) fn binary(op: BinaryOp, xs: &[f32], ys: &[f32], plan: &Broadcast, out_len: usize) -> Vec<f32> {
    let mut out = host_buffer(out_len);
    if plan.dims.len() == 1 {
        // One merged dim (equal shapes, or a broadcast scalar): split the run itself.
        let strides = [plan.strides[0][0], plan.strides[1][0]];
        out.par_chunks_mut(CPU_CHUNK).enumerate().for_each(|(task, o)| {
            let start = task * CPU_CHUNK;
            let x = Operand::along(xs, start * strides[0], strides[0], o.len());
            let y = Operand::along(ys, start * strides[1], strides[1], o.len());
            binary_run(op, o, x, y);
        });
        return out;
    }
    let last = plan.dims.len() - 1;
    let row_len = plan.dims[last];
    let inner_strides = [plan.strides[0][last], plan.strides[1][last]];
    let outer_dims = &plan.dims[..last];
    let outer_strides = [&plan.strides[0][..last], &plan.strides[1][..last]];
    let rows_per_task = (CPU_CHUNK / row_len.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * row_len).enumerate().for_each(|(task, block)| {
        let mut walk = StridedWalk::new(outer_dims, outer_strides, task * rows_per_task);
        for row in block.chunks_mut(row_len) {
            let [ia, ib] = walk.offsets;
            let x = Operand::along(xs, ia, inner_strides[0], row_len);
            let y = Operand::along(ys, ib, inner_strides[1], row_len);
            binary_run(op, row, x, y);
            walk.advance();
        }
    });
    out
}

/// One operand of a row: contiguous values, one value repeated, or a strided run.
#[derive(Clone, Copy)]
enum Operand<'a> {
    Run(&'a [f32]),
    Constant(f32),
    Strided { values: &'a [f32], start: usize, stride: usize },
}

impl<'a> Operand<'a> {
    fn along(values: &'a [f32], start: usize, stride: usize, len: usize) -> Operand<'a> {
        match stride {
            0 => Operand::Constant(values[start]),
            1 => Operand::Run(&values[start..start + len]),
            _ => Operand::Strided { values, start, stride },
        }
    }

    fn get(&self, j: usize) -> f32 {
        match *self {
            Operand::Run(v) => v[j],
            Operand::Constant(c) => c,
            Operand::Strided { values, start, stride } => values[start + j * stride],
        }
    }
}

fn binary_run(op: BinaryOp, out: &mut [f32], x: Operand, y: Operand) {
    match op {
        BinaryOp::Add => run_with(out, x, y, |a, b| a + b),
        BinaryOp::Sub => run_with(out, x, y, |a, b| a - b),
        BinaryOp::Mul => run_with(out, x, y, |a, b| a * b),
        BinaryOp::Div => run_with(out, x, y, |a, b| a / b),
    }
}

#[inline(always)]
fn run_with(out: &mut [f32], x: Operand, y: Operand, f: impl Fn(f32, f32) -> f32 + Copy) {
    match (x, y) {
        (Operand::Run(a), Operand::Run(b)) => zip_map_into(out, a, b, f),
        (Operand::Run(a), Operand::Constant(c)) => map_into(out, a, move |v| f(v, c)),
        (Operand::Constant(c), Operand::Run(b)) => map_into(out, b, move |v| f(c, v)),
        _ => out.iter_mut().enumerate().for_each(|(j, o)| *o = f(x.get(j), y.get(j))),
    }
}
