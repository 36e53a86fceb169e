//! Elementwise ops: `add`/`sub`/`mul`/`div` with NumPy broadcasting, `scale` and `add_scalar`,
//! the unary activations and maths functions (GELU, QuickGELU, sigmoid, softplus, exp, log, sqrt,
//! square, neg, ReLU), and [`sum_to_shape`], which takes a broadcast gradient back to an operand's shape.
//! Kernels: `kernels/elementwise.cu`. Tests: `tests/elementwise.rs`.
//!
//! Broadcasting and reduction both go through a small "layout": the index space with size-1 dims
//! dropped and neighbouring dims merged wherever every operand is contiguous across them, so that
//! `[B, T, C] + [C]` is handled as `[B*T, C] + [C]`. The CPU reference and the CUDA kernels share it.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

mod cpu;

use super::strided::StridedWalk;
use super::{cuda_output, cuda_slice, launch, same_device};
use crate::cuda::{launch_elements, CudaDevice, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::{host_buffer, numel, Tensor};

/// Most dims a layout may have after merging (the kernels' fixed-size index arrays).
const MAX_RANK: usize = 6;
/// The CUDA kernels index with 32-bit unsigned arithmetic (cheap div/mod); larger tensors are refused.
const MAX_CUDA_ELEMENTS: usize = i32::MAX as usize;
/// Elements per rayon task on the CPU: large enough that scheduling costs nothing noticeable.
const CPU_CHUNK: usize = 1 << 14;
/// Threads per block of the `sum_to_shape` kernel (`SUM_THREADS` in the kernel file).
const SUM_THREADS: usize = 256;
/// Blocks that keep every SM of a large GPU busy; a reduction with fewer outputs splits its rows.
const SUM_BUSY_BLOCKS: usize = 1024;
/// Fewest reduced elements per thread worth a split (keeps the second pass small).
const SUM_MIN_PER_THREAD: usize = 32;

// ---------------------------------------------------------------------------------------------
// The ops

/// A binary elementwise op. The numeric codes are the kernels' `BinaryOpCode`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 4] = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div];

    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }

    fn code(self) -> i32 {
        match self {
            BinaryOp::Add => 0,
            BinaryOp::Sub => 1,
            BinaryOp::Mul => 2,
            BinaryOp::Div => 3,
        }
    }
}

/// A unary elementwise op. The numeric codes are the kernels' `UnaryOpCode`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    /// `0.5 x (1 + erf(x / sqrt 2))`, the exact form (`torch.nn.GELU()`).
    Gelu,
    /// `x sigmoid(1.702 x)` (CLIP's activation).
    QuickGelu,
    Sigmoid,
    /// `log(1 + e^x)`, and `x` above 20 (PyTorch's default beta 1, threshold 20).
    Softplus,
    Exp,
    Log,
    Sqrt,
    Square,
    Neg,
    /// `max(x, 0)`, NaN passed through (`torch.relu`); gradient `dy` where `x > 0`, else 0.
    Relu,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 10] = [
        UnaryOp::Gelu,
        UnaryOp::QuickGelu,
        UnaryOp::Sigmoid,
        UnaryOp::Softplus,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Square,
        UnaryOp::Neg,
        UnaryOp::Relu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Gelu => "gelu",
            UnaryOp::QuickGelu => "quick_gelu",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Softplus => "softplus",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Square => "square",
            UnaryOp::Neg => "neg",
            UnaryOp::Relu => "relu",
        }
    }

    fn code(self) -> i32 {
        match self {
            UnaryOp::Gelu => 0,
            UnaryOp::QuickGelu => 1,
            UnaryOp::Sigmoid => 2,
            UnaryOp::Softplus => 3,
            UnaryOp::Exp => 4,
            UnaryOp::Log => 5,
            UnaryOp::Sqrt => 6,
            UnaryOp::Square => 7,
            UnaryOp::Neg => 8,
            UnaryOp::Relu => 9,
        }
    }

    /// True when [`unary_backward`] wants the op's output `y` (its derivative is cheapest from
    /// it: sigmoid, exp, sqrt); false when it wants the input `x`.
    pub fn backward_uses_output(self) -> bool {
        matches!(self, UnaryOp::Sigmoid | UnaryOp::Exp | UnaryOp::Sqrt)
    }
}

// ---------------------------------------------------------------------------------------------
// Differentiable ops

/// `a + b` with broadcasting.
pub fn add(tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(tape, BinaryOp::Add, a, b)
}

/// `a - b` with broadcasting.
pub fn sub(tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(tape, BinaryOp::Sub, a, b)
}

/// `a * b` with broadcasting.
pub fn mul(tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(tape, BinaryOp::Mul, a, b)
}

/// `a / b` with broadcasting.
pub fn div(tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(tape, BinaryOp::Div, a, b)
}

/// `a op b` with NumPy broadcasting; each operand's gradient is summed back to its shape.
pub fn binary(tape: &Tape, op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let y = binary_forward(op, a, b)?;
    let saved = BinarySaved::new(op, a, b, [a.needs_grad(), b.needs_grad()]);
    Ok(tape.record(y, &[a, b], move |dy| Ok(saved.gradients(dy)?.into())))
}

/// `x * alpha`.
pub fn scale(tape: &Tape, x: &Tensor, alpha: f32) -> Result<Tensor> {
    let y = scale_forward(x, alpha)?;
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(scale_forward(dy, alpha)?)])))
}

/// `x + c`.
pub fn add_scalar(tape: &Tape, x: &Tensor, c: f32) -> Result<Tensor> {
    let y = add_scalar_forward(x, c)?;
    Ok(tape.record(y, &[x], |dy| Ok(vec![Some(dy.clone())])))
}

/// `op(x)` elementwise.
pub fn unary(tape: &Tape, op: UnaryOp, x: &Tensor) -> Result<Tensor> {
    let y = unary_forward(op, x)?;
    let saved = if op.backward_uses_output() { y.clone() } else { x.clone() };
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(unary_backward(op, &saved, dy)?)])))
}

/// Exact (erf) GELU, as `torch.nn.GELU()`.
pub fn gelu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, UnaryOp::Gelu, x)
}

/// `x * sigmoid(1.702 x)`.
pub fn quick_gelu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, UnaryOp::QuickGelu, x)
}

pub fn sigmoid(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, UnaryOp::Sigmoid, x)
}

/// `log(1 + e^x)` (`x` above 20), as `torch.nn.functional.softplus` with its defaults.
pub fn softplus(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, UnaryOp::Softplus, x)
}

pub fn exp(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, UnaryOp::Exp, x)
}

/// Natural logarithm.
pub fn log(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, UnaryOp::Log, x)
}

pub fn sqrt(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, UnaryOp::Sqrt, x)
}

pub fn square(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, UnaryOp::Square, x)
}

pub fn neg(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, UnaryOp::Neg, x)
}

/// `max(x, 0)` (`torch.relu`: NaN stays NaN). The gradient is `dy` where `x > 0` and 0 elsewhere,
/// 0 at `x = 0` included, as PyTorch's.
pub fn relu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    unary(tape, UnaryOp::Relu, x)
}

// ---------------------------------------------------------------------------------------------
// Binary backward

/// What a binary op's backward needs: both shapes, and an operand's values only when a wanted
/// gradient reads them (add and sub keep no activations alive).
struct BinarySaved {
    op: BinaryOp,
    shapes: [Vec<usize>; 2],
    a: Option<Tensor>,
    b: Option<Tensor>,
    wanted: [bool; 2],
}

impl BinarySaved {
    fn new(op: BinaryOp, a: &Tensor, b: &Tensor, wanted: [bool; 2]) -> BinarySaved {
        let keep_a = matches!(op, BinaryOp::Mul | BinaryOp::Div) && wanted[1];
        let keep_b = match op {
            BinaryOp::Mul => wanted[0],
            BinaryOp::Div => wanted[0] || wanted[1],
            BinaryOp::Add | BinaryOp::Sub => false,
        };
        BinarySaved {
            op,
            shapes: [a.shape().to_vec(), b.shape().to_vec()],
            a: keep_a.then(|| a.clone()),
            b: keep_b.then(|| b.clone()),
            wanted,
        }
    }

    fn gradients(&self, dy: &Tensor) -> Result<[Option<Tensor>; 2]> {
        // `new` kept every operand that the wanted gradients below read.
        let a = || self.a.as_ref().expect("BinarySaved keeps `a` when a gradient reads it");
        let b = || self.b.as_ref().expect("BinarySaved keeps `b` when a gradient reads it");
        let [want_a, want_b] = self.wanted;
        let [a_shape, b_shape] = &self.shapes;
        let grad = |wanted: bool, f: &dyn Fn() -> Result<Tensor>| if wanted { f().map(Some) } else { Ok(None) };
        match self.op {
            BinaryOp::Add => {
                Ok([grad(want_a, &|| sum_to_shape(dy, a_shape))?, grad(want_b, &|| sum_to_shape(dy, b_shape))?])
            }
            BinaryOp::Sub => Ok([
                grad(want_a, &|| sum_to_shape(dy, a_shape))?,
                // Negate after reducing: the reduced tensor is the smaller one.
                grad(want_b, &|| unary_forward(UnaryOp::Neg, &sum_to_shape(dy, b_shape)?))?,
            ]),
            BinaryOp::Mul => Ok([
                grad(want_a, &|| sum_to_shape(&binary_forward(BinaryOp::Mul, dy, b())?, a_shape))?,
                grad(want_b, &|| sum_to_shape(&binary_forward(BinaryOp::Mul, dy, a())?, b_shape))?,
            ]),
            BinaryOp::Div => {
                // d/da = 1/b, d/db = -a/b^2 = -(dy/b) * a / b.
                let dy_over_b = binary_forward(BinaryOp::Div, dy, b())?;
                let grad_b = || {
                    let t = binary_forward(BinaryOp::Mul, &dy_over_b, a())?;
                    let t = binary_forward(BinaryOp::Div, &t, b())?;
                    unary_forward(UnaryOp::Neg, &sum_to_shape(&t, b_shape)?)
                };
                Ok([grad(want_a, &|| sum_to_shape(&dy_over_b, a_shape))?, grad(want_b, &grad_b)?])
            }
        }
    }
}

/// Untracked gradients of `op(a, b)` given the output gradient `dy`: `[d a, d b]`, each summed
/// back to its operand's shape, `None` where `wanted` is false.
pub fn binary_backward(
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    wanted: [bool; 2],
) -> Result<[Option<Tensor>; 2]> {
    BinarySaved::new(op, a, b, wanted).gradients(dy)
}

// ---------------------------------------------------------------------------------------------
// Layouts shared by the CPU reference and the kernels

/// The shape `a` and `b` broadcast to (NumPy rules: align from the right; a missing or size-1
/// dim takes the other's size), or an error naming `op` and both shapes.
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let dim = |shape: &[usize], d: usize| {
        let missing = rank - shape.len();
        if d < missing {
            1
        } else {
            shape[d - missing]
        }
    };
    (0..rank)
        .map(|d| match (dim(a, d), dim(b, d)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            (x, y) => Err(Error::shape(
                op,
                format!("cannot broadcast shapes {a:?} and {b:?} (sizes {x} and {y} meet at dim {d} of the result)"),
            )),
        })
        .collect()
}

/// Element strides of a contiguous tensor of `shape` when indexed by coordinates of `space`
/// (aligned from the right), 0 along the dims where it is broadcast.
fn strides_in(shape: &[usize], space: &[usize]) -> Vec<usize> {
    let missing = space.len() - shape.len();
    let mut strides = vec![0; space.len()];
    let mut step = 1;
    for (d, &size) in shape.iter().enumerate().rev() {
        if size != 1 {
            strides[d + missing] = step;
        }
        step *= size;
    }
    strides
}

/// `dims` with size-1 dims dropped and each dim merged into its left neighbour when every
/// operand's strides continue across the two. Returns the merged dims and each operand's
/// strides; an index space of one element becomes a single dim of size 1.
fn merge_dims<const K: usize>(dims: &[usize], strides: [&[usize]; K]) -> (Vec<usize>, [Vec<usize>; K]) {
    let mut merged: Vec<usize> = Vec::new();
    let mut merged_strides: [Vec<usize>; K] = std::array::from_fn(|_| Vec::new());
    for (d, &size) in dims.iter().enumerate() {
        if size == 1 {
            continue;
        }
        let continues = |k: usize| merged_strides[k].last() == Some(&(strides[k][d] * size));
        if !merged.is_empty() && (0..K).all(continues) {
            *merged.last_mut().expect("checked non-empty") *= size;
            for (k, s) in merged_strides.iter_mut().enumerate() {
                *s.last_mut().expect("same length as `merged`") = strides[k][d];
            }
        } else {
            merged.push(size);
            for (k, s) in merged_strides.iter_mut().enumerate() {
                s.push(strides[k][d]);
            }
        }
    }
    if merged.is_empty() {
        merged.push(1);
        merged_strides.iter_mut().for_each(|s| s.push(0));
    }
    (merged, merged_strides)
}

/// `a op b` as an index space over the output with each operand's strides.
struct Broadcast {
    out_shape: Vec<usize>,
    dims: Vec<usize>,
    strides: [Vec<usize>; 2],
}

fn plan_broadcast(op: &'static str, a: &[usize], b: &[usize]) -> Result<Broadcast> {
    let out_shape = broadcast_shape(op, a, b)?;
    let (dims, strides) = merge_dims(&out_shape, [&strides_in(a, &out_shape), &strides_in(b, &out_shape)]);
    if dims.len() > MAX_RANK {
        return Err(Error::shape(
            op,
            format!(
                "broadcasting {a:?} with {b:?} needs {} dims even after merging contiguous ones; at most {MAX_RANK} are supported",
                dims.len()
            ),
        ));
    }
    Ok(Broadcast { out_shape, dims, strides })
}

/// A sum of `x` to a smaller shape, as kept dims (they index the output) and reduced dims. When
/// x's last (merged) dim is kept it becomes `inner`, contiguous in both x and the output, and is
/// not listed in `kept_dims`; otherwise `inner` is 1. The output is `[outer_outputs, inner]`.
struct Reduction {
    kept_dims: Vec<usize>,
    kept_strides: Vec<usize>,
    reduced_dims: Vec<usize>,
    reduced_strides: Vec<usize>,
    inner: usize,
    outer_outputs: usize,
    reduced: usize,
}

/// `target` must already be known to broadcast to `x_shape`.
fn plan_reduction(x_shape: &[usize], target: &[usize]) -> Result<Reduction> {
    let (dims, [x_strides, out_strides]) =
        merge_dims(x_shape, [&strides_in(x_shape, x_shape), &strides_in(target, x_shape)]);
    if dims.len() > MAX_RANK {
        return Err(Error::shape(
            "sum_to_shape",
            format!(
                "summing {x_shape:?} to {target:?} needs {} dims even after merging contiguous ones; at most {MAX_RANK} are supported",
                dims.len()
            ),
        ));
    }
    let last = dims.len() - 1;
    let inner = if out_strides[last] != 0 { dims[last] } else { 1 };
    let mut plan = Reduction {
        kept_dims: Vec::new(),
        kept_strides: Vec::new(),
        reduced_dims: Vec::new(),
        reduced_strides: Vec::new(),
        inner,
        outer_outputs: 1,
        reduced: 1,
    };
    for d in 0..dims.len() {
        if out_strides[d] == 0 {
            plan.reduced_dims.push(dims[d]);
            plan.reduced_strides.push(x_strides[d]);
            plan.reduced *= dims[d];
        } else if d != last {
            plan.kept_dims.push(dims[d]);
            plan.kept_strides.push(x_strides[d]);
            plan.outer_outputs *= dims[d];
        }
    }
    Ok(plan)
}

/// Offset of row-major position `index` of `dims` in an operand with `strides`.
fn offset_of(mut index: usize, dims: &[usize], strides: &[usize]) -> usize {
    let mut offset = 0;
    for (&size, &stride) in dims.iter().zip(strides).rev() {
        offset += (index % size) * stride;
        index /= size;
    }
    offset
}

/// Mirrors `BroadcastLayout` in kernels/elementwise.cu.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
struct BroadcastLayout {
    rank: u32,
    dims: [u32; MAX_RANK],
    a_strides: [u32; MAX_RANK],
    b_strides: [u32; MAX_RANK],
}

// SAFETY: a #[repr(C)] struct of u32s with no padding, laid out exactly like the kernel's
// `BroadcastLayout`; it is passed by value.
unsafe impl DeviceRepr for BroadcastLayout {}

/// Mirrors `ReduceLayout` in kernels/elementwise.cu.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
struct ReduceLayout {
    kept_rank: u32,
    kept_dims: [u32; MAX_RANK],
    kept_strides: [u32; MAX_RANK],
    reduced_rank: u32,
    reduced_dims: [u32; MAX_RANK],
    reduced_strides: [u32; MAX_RANK],
    inner: u32,
    outer_outputs: u32,
    reduced: u32,
}

// SAFETY: as for `BroadcastLayout`: #[repr(C)], u32 fields only, same layout as the kernel's.
unsafe impl DeviceRepr for ReduceLayout {}

/// Copies `values` into the front of a kernel array. Every value is below 2^31: tensors are
/// checked against `MAX_CUDA_ELEMENTS` first, and dims, strides and counts never exceed numel.
fn fill_u32(array: &mut [u32; MAX_RANK], values: &[usize]) {
    for (slot, &v) in array.iter_mut().zip(values) {
        *slot = v as u32;
    }
}

impl BroadcastLayout {
    fn new(plan: &Broadcast) -> Self {
        let mut layout = BroadcastLayout { rank: plan.dims.len() as u32, ..Default::default() };
        fill_u32(&mut layout.dims, &plan.dims);
        fill_u32(&mut layout.a_strides, &plan.strides[0]);
        fill_u32(&mut layout.b_strides, &plan.strides[1]);
        layout
    }
}

impl ReduceLayout {
    fn new(plan: &Reduction) -> Self {
        let mut layout = ReduceLayout {
            kept_rank: plan.kept_dims.len() as u32,
            reduced_rank: plan.reduced_dims.len() as u32,
            inner: plan.inner as u32,
            outer_outputs: plan.outer_outputs as u32,
            reduced: plan.reduced as u32,
            ..Default::default()
        };
        fill_u32(&mut layout.kept_dims, &plan.kept_dims);
        fill_u32(&mut layout.kept_strides, &plan.kept_strides);
        fill_u32(&mut layout.reduced_dims, &plan.reduced_dims);
        fill_u32(&mut layout.reduced_strides, &plan.reduced_strides);
        layout
    }
}

/// The element count of `shape` as the kernels' 32-bit count, or an error naming `op`.
fn cuda_len(op: &'static str, shape: &[usize]) -> Result<u32> {
    let n = numel(shape);
    if n > MAX_CUDA_ELEMENTS {
        return Err(Error::shape(
            op,
            format!("shape {shape:?} has {n} elements; the CUDA elementwise kernels take at most {MAX_CUDA_ELEMENTS}"),
        ));
    }
    Ok(n as u32)
}

// ---------------------------------------------------------------------------------------------
// Untracked forward and backward functions

/// Untracked `a op b` with broadcasting.
pub fn binary_forward(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let plan = plan_broadcast(op.name(), a.shape(), b.shape())?;
    let device = same_device(op.name(), &[a, b])?;
    if numel(&plan.out_shape) == 0 {
        return Tensor::zeros(&plan.out_shape, &device);
    }
    let same_shape = a.shape() == b.shape();
    match device {
        Device::Cpu => {
            let (xs, ys) = (a.cpu_data(op.name())?, b.cpu_data(op.name())?);
            let out = cpu::binary(op, xs, ys, &plan, numel(&plan.out_shape));
            Tensor::from_vec(out, &plan.out_shape)
        }
        Device::Cuda(dev) => cuda_binary(&dev, op, a, b, &plan, same_shape),
    }
}

fn cuda_binary(
    dev: &Arc<CudaDevice>,
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    plan: &Broadcast,
    same_shape: bool,
) -> Result<Tensor> {
    let n = cuda_len(op.name(), &plan.out_shape)?;
    let code = op.code();
    let mut out = dev.alloc(n as usize)?;
    if same_shape {
        let f = dev.function(KernelFamily::Elementwise, "binary_same")?;
        let mut builder = dev.stream().launch_builder(&f);
        builder.arg(&mut out).arg(cuda_slice(a)?).arg(cuda_slice(b)?).arg(&code).arg(&n);
        // SAFETY: arguments match `binary_same(float*, const float*, const float*, int, unsigned)`;
        // out, a and b all hold n floats.
        launch("binary_same", unsafe { builder.launch(launch_elements(n as usize)) })?;
    } else {
        let layout = BroadcastLayout::new(plan);
        let f = dev.function(KernelFamily::Elementwise, "binary_broadcast")?;
        let mut builder = dev.stream().launch_builder(&f);
        builder.arg(&mut out).arg(cuda_slice(a)?).arg(cuda_slice(b)?).arg(&code).arg(&layout).arg(&n);
        // SAFETY: arguments match `binary_broadcast(float*, const float*, const float*, int,
        // BroadcastLayout, unsigned)`; out holds n floats and the layout's strides address only
        // elements inside a and b (it was built from their shapes).
        launch("binary_broadcast", unsafe { builder.launch(launch_elements(n as usize)) })?;
    }
    Ok(cuda_output(dev, out, &plan.out_shape))
}

/// Untracked `a + b` for equal shapes (the tape accumulates gradients with it).
pub fn add_untracked(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Err(Error::shape("add_untracked", format!("shapes differ: {:?} and {:?}", a.shape(), b.shape())));
    }
    binary_forward(BinaryOp::Add, a, b)
}

/// Untracked `x * alpha`.
pub fn scale_forward(x: &Tensor, alpha: f32) -> Result<Tensor> {
    affine_forward("scale", x, alpha, 0.0)
}

/// Untracked `x + c`.
pub fn add_scalar_forward(x: &Tensor, c: f32) -> Result<Tensor> {
    affine_forward("add_scalar", x, 1.0, c)
}

/// `x * alpha + beta`; exact rounding of the one operation for `beta = 0` or `alpha = 1`.
fn affine_forward(op: &'static str, x: &Tensor, alpha: f32, beta: f32) -> Result<Tensor> {
    match same_device(op, &[x])? {
        Device::Cpu => {
            let xs = x.cpu_data(op)?;
            let y = xs.par_iter().with_min_len(CPU_CHUNK).map(|&v| v * alpha + beta).collect();
            Tensor::from_vec(y, x.shape())
        }
        Device::Cuda(dev) => {
            let n = cuda_len(op, x.shape())?;
            let f = dev.function(KernelFamily::Elementwise, "affine_forward")?;
            let mut y = dev.alloc(n as usize)?;
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut y).arg(cuda_slice(x)?).arg(&alpha).arg(&beta).arg(&n);
            // SAFETY: arguments match `affine_forward(float*, const float*, float, float, unsigned)`;
            // y and x hold n floats.
            launch("affine_forward", unsafe { builder.launch(launch_elements(n as usize)) })?;
            Ok(cuda_output(&dev, y, x.shape()))
        }
    }
}

/// Untracked `op(x)`.
pub fn unary_forward(op: UnaryOp, x: &Tensor) -> Result<Tensor> {
    match same_device(op.name(), &[x])? {
        Device::Cpu => {
            let xs = x.cpu_data(op.name())?;
            Tensor::from_vec(cpu::unary_forward(op, xs), x.shape())
        }
        Device::Cuda(dev) => {
            let n = cuda_len(op.name(), x.shape())?;
            let code = op.code();
            let f = dev.function(KernelFamily::Elementwise, "unary_forward")?;
            let mut y = dev.alloc(n as usize)?;
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut y).arg(cuda_slice(x)?).arg(&code).arg(&n);
            // SAFETY: arguments match `unary_forward(float*, const float*, int, unsigned)`; y and
            // x hold n floats.
            launch("unary_forward", unsafe { builder.launch(launch_elements(n as usize)) })?;
            Ok(cuda_output(&dev, y, x.shape()))
        }
    }
}

/// Untracked gradient of `op` at the input: `dy * op'(x)`. `saved` is the op's output `y` when
/// [`UnaryOp::backward_uses_output`] says so, its input `x` otherwise.
pub fn unary_backward(op: UnaryOp, saved: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if saved.shape() != dy.shape() {
        return Err(Error::shape(
            op.name(),
            format!("gradient of shape {:?} differs from the saved tensor's {:?}", dy.shape(), saved.shape()),
        ));
    }
    match same_device(op.name(), &[saved, dy])? {
        Device::Cpu => {
            let (ss, dys) = (saved.cpu_data(op.name())?, dy.cpu_data(op.name())?);
            let dx = cpu::unary_backward(op, ss, dys);
            Tensor::from_vec(dx, dy.shape())
        }
        Device::Cuda(dev) => {
            let n = cuda_len(op.name(), dy.shape())?;
            let code = op.code();
            let f = dev.function(KernelFamily::Elementwise, "unary_backward")?;
            let mut dx = dev.alloc(n as usize)?;
            let mut builder = dev.stream().launch_builder(&f);
            builder.arg(&mut dx).arg(cuda_slice(saved)?).arg(cuda_slice(dy)?).arg(&code).arg(&n);
            // SAFETY: arguments match `unary_backward(float*, const float*, const float*, int,
            // unsigned)`; all three buffers hold n floats.
            launch("unary_backward", unsafe { builder.launch(launch_elements(n as usize)) })?;
            Ok(cuda_output(&dev, dx, dy.shape()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sum to shape

/// Untracked: sums `x` over the dims where `shape` (aligned from the right, missing dims counting
/// as 1) has size 1 and `x` does not, giving a tensor of `shape`. This is how a gradient of a
/// broadcast result returns to the operand: `[rows, C] -> [C]` for a bias, `[B, T, C] -> []` or
/// `[1]` for a scalar gate.
pub fn sum_to_shape(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let fits = shape.len() <= x.rank()
        && shape.iter().rev().zip(x.shape().iter().rev()).all(|(&target, &source)| target == source || target == 1);
    if !fits {
        return Err(Error::shape(
            "sum_to_shape",
            format!(
                "cannot sum shape {:?} to shape {shape:?}: aligned from the right, each target dim must be 1 or equal the source's",
                x.shape()
            ),
        ));
    }
    if numel(shape) == x.numel() {
        return x.view_as(shape); // only size-1 dims differ: nothing to add up
    }
    if x.numel() == 0 {
        return Tensor::zeros(shape, &x.device()); // a sum over no elements
    }
    let plan = plan_reduction(x.shape(), shape)?;
    match x.device() {
        Device::Cpu => {
            let xs = x.cpu_data("sum_to_shape")?;
            Tensor::from_vec(cpu_sum(xs, &plan), shape)
        }
        Device::Cuda(dev) => {
            cuda_len("sum_to_shape", x.shape())?;
            let out = cuda_sum(&dev, cuda_slice(x)?, &plan)?;
            Ok(cuda_output(&dev, out, shape))
        }
    }
}

/// CPU reference: each output row (of `inner` contiguous values) adds up the matching rows of x
/// in f64, so the reference is at least as accurate as any GPU summation order.
fn cpu_sum(xs: &[f32], plan: &Reduction) -> Vec<f32> {
    let mut out = host_buffer(plan.outer_outputs * plan.inner);
    out.par_chunks_mut(plan.inner).enumerate().for_each(|(outer, row)| {
        let base = offset_of(outer, &plan.kept_dims, &plan.kept_strides);
        let mut acc = vec![0.0f64; plan.inner];
        let mut walk = StridedWalk::new(&plan.reduced_dims, [&plan.reduced_strides], 0);
        for _ in 0..plan.reduced {
            let source = &xs[base + walk.offsets[0]..][..plan.inner];
            acc.iter_mut().zip(source).for_each(|(a, &v)| *a += v as f64);
            walk.advance();
        }
        row.iter_mut().zip(acc).for_each(|(o, a)| *o = a as f32);
    });
    out
}

/// Block shape of the sum kernel for a reduction: `(columns, rows)` of threads. A warp spans up
/// to 32 adjacent output columns; with one column the whole block walks the reduced elements.
fn sum_block(plan: &Reduction) -> (usize, usize) {
    let columns = plan.inner.next_power_of_two().min(32);
    (columns, SUM_THREADS / columns)
}

/// Splits of the reduced elements across blocks: with few outputs one block each would leave
/// most of the GPU idle, so their rows are shared out and a second pass adds the partial sums.
fn sum_splits(plan: &Reduction) -> usize {
    let (columns, rows) = sum_block(plan);
    let blocks = plan.outer_outputs * plan.inner.div_ceil(columns);
    let for_occupancy = SUM_BUSY_BLOCKS.div_ceil(blocks);
    let for_work = plan.reduced.div_ceil(rows * SUM_MIN_PER_THREAD);
    for_occupancy.min(for_work).clamp(1, 65_535)
}

fn cuda_sum(dev: &Arc<CudaDevice>, x: &CudaSlice<f32>, plan: &Reduction) -> Result<CudaSlice<f32>> {
    let outputs = plan.outer_outputs * plan.inner;
    let splits = sum_splits(plan);
    if splits == 1 {
        return launch_sum(dev, x, plan, 1);
    }
    let partial = launch_sum(dev, x, plan, splits)?;
    // The partial sums are laid out [splits, outputs]: a column sum, done in one more pass.
    let second = plan_reduction(&[splits, outputs], &[outputs])?;
    launch_sum(dev, &partial, &second, 1)
}

/// One launch of the sum kernel; returns `splits * outputs` sums (split-major).
fn launch_sum(dev: &Arc<CudaDevice>, x: &CudaSlice<f32>, plan: &Reduction, splits: usize) -> Result<CudaSlice<f32>> {
    let (columns, rows) = sum_block(plan);
    let blocks = plan.outer_outputs * plan.inner.div_ceil(columns);
    let layout = ReduceLayout::new(plan);
    let f = dev.function(KernelFamily::Elementwise, "sum_to_shape")?;
    let mut out = dev.alloc(splits * plan.outer_outputs * plan.inner)?;
    let config = LaunchConfig {
        grid_dim: (blocks as u32, splits as u32, 1),
        block_dim: (columns as u32, rows as u32, 1),
        shared_mem_bytes: 0,
    };
    let mut builder = dev.stream().launch_builder(&f);
    builder.arg(&mut out).arg(x).arg(&layout);
    // SAFETY: arguments match `sum_to_shape(float*, const float*, ReduceLayout)`; the layout
    // addresses only elements of x (built from its shape), out holds gridDim.y * outer_outputs *
    // inner floats, and the block has SUM_THREADS threads with a power-of-two row count.
    launch("sum_to_shape", unsafe { builder.launch(config) })?;
    Ok(out)
}
