//! Matrix products: batched `matmul` (transposes as GEMM flags, never copies), `linear` with a
//! PyTorch-layout `[out, in]` weight, and `column_sums` (the bias gradient; on the GPU the
//! `sum_columns` kernel of `kernels/movement.cu`, so no ones vector is uploaded).
//! CPU: the `gemm` crate (strides give transposes for free). CUDA: cuBLAS strided-batched SGEMM in
//! strict FP32, using the row-major trick. Bias pre-fill kernel: `kernels/movement.cu`.
//! Frozen weights stored in panels for the CPU: `panels.rs`. Tests: `tests/matmul.rs`.

mod panels;

pub use panels::{linear_panels, linear_panels_forward, PanelWeight, PANEL_OUTPUTS};

use std::ffi::{c_int, c_longlong, c_void};

use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use rayon::prelude::*;

use super::movement::{repeat_rows_cpu, repeat_rows_cuda, repeat_rows_forward};
use super::{cuda_output, cuda_slice, same_device};
use crate::cuda::CudaDevice;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::{host_buffer, numel, Tensor};

/// Options of [`matmul_with`]: `C = alpha * op(A) * op(B)` where `op` transposes the last two
/// dimensions when asked (as a GEMM flag: no data moves).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulOpts {
    pub transpose_a: bool,
    pub transpose_b: bool,
    pub alpha: f32,
}

impl Default for MatmulOpts {
    fn default() -> Self {
        MatmulOpts { transpose_a: false, transpose_b: false, alpha: 1.0 }
    }
}

/// `a @ b` over the last two dimensions: a `[..., M, K]`, b `[..., K, N]` with equal leading
/// (batch) dimensions, or b a 2-D `[K, N]` shared by every batch of a. Returns `[..., M, N]`.
pub fn matmul(tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_with(tape, a, b, MatmulOpts::default())
}

/// [`matmul`] with transposes and a scale: a is `[..., K, M]` when `transpose_a`, b is
/// `[..., N, K]` when `transpose_b`.
pub fn matmul_with(tape: &Tape, a: &Tensor, b: &Tensor, opts: MatmulOpts) -> Result<Tensor> {
    let y = matmul_forward(a, b, opts)?;
    let (a_saved, b_saved) = (a.clone(), b.clone());
    Ok(tape.record(y, &[a, b], move |dy| {
        let (da, db) = matmul_backward(&a_saved, &b_saved, dy, opts, a_saved.needs_grad(), b_saved.needs_grad())?;
        Ok(vec![da, db])
    }))
}

/// Untracked [`matmul_with`].
pub fn matmul_forward(a: &Tensor, b: &Tensor, opts: MatmulOpts) -> Result<Tensor> {
    let s = MatmulShape::of(a, b, opts)?;
    let mut out_shape = s.batch_dims.clone();
    out_shape.extend([s.m, s.n]);
    let g = Gemm::new(s.m, s.k, s.n, opts.transpose_a, opts.transpose_b, opts.alpha);
    let g = if s.shared_b && !opts.transpose_a {
        // a's rows of every batch are consecutive: one [batch*M, K] x [K, N] GEMM.
        Gemm { m: s.batch * s.m, ..g }
    } else {
        g.batched(s.batch, true, !s.shared_b)
    };
    gemm("matmul", a, b, g, None, &out_shape)
}

/// Untracked gradients of [`matmul_with`] for `a` and `b` (each only when asked for).
pub fn matmul_backward(
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    opts: MatmulOpts,
    need_a: bool,
    need_b: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let s = MatmulShape::of(a, b, opts)?;
    let mut out_shape = s.batch_dims.clone();
    out_shape.extend([s.m, s.n]);
    if dy.shape() != out_shape {
        return Err(Error::shape(
            "matmul_backward",
            format!("gradient {:?} does not match the product's shape {out_shape:?}", dy.shape()),
        ));
    }
    let (ta, tb, alpha) = (opts.transpose_a, opts.transpose_b, opts.alpha);
    let (m, k, n) = (s.m, s.k, s.n);
    // With C = alpha op(A) op(B): d op(A) = alpha dC op(B)^T and d op(B) = alpha op(A)^T dC,
    // transposed back when the operand is stored transposed. Each row below is one GEMM over the
    // stored operands: (lhs, transpose lhs, rhs, transpose rhs, m, k, n).
    let da = if need_a {
        let (lhs, tl, rhs, tr, gm, gk, gn) = match (ta, tb) {
            (false, false) => (dy, false, b, true, m, n, k),
            (false, true) => (dy, false, b, false, m, n, k),
            (true, false) => (b, false, dy, true, k, n, m),
            (true, true) => (b, true, dy, true, k, n, m),
        };
        let g = Gemm::new(gm, gk, gn, tl, tr, alpha);
        let g = if s.shared_b && !ta {
            // dC and dA are [batch*M, .] blocks of consecutive rows: fold the batch into M.
            Gemm { m: s.batch * gm, ..g }
        } else {
            let (lhs_batched, rhs_batched) = if ta { (!s.shared_b, true) } else { (true, !s.shared_b) };
            g.batched(s.batch, lhs_batched, rhs_batched)
        };
        Some(gemm("matmul_backward", lhs, rhs, g, None, a.shape())?)
    } else {
        None
    };
    let db = if need_b {
        let (lhs, tl, rhs, tr, gm, gk, gn) = match (ta, tb) {
            (false, false) => (a, true, dy, false, k, m, n),
            (false, true) => (dy, true, a, false, n, m, k),
            (true, false) => (a, false, dy, false, k, m, n),
            (true, true) => (dy, true, a, true, n, m, k),
        };
        let g = Gemm::new(gm, gk, gn, tl, tr, alpha);
        let g = match (s.shared_b, ta) {
            // Shared b: its gradient sums over the batch. Without transpose_a both operands are
            // [batch*M, .] row blocks, so the sum is the inner dimension of one GEMM.
            (true, false) => Gemm { k: s.batch * gk, ..g },
            (true, true) => g.batched(s.batch, true, true).summed_over_batches(),
            (false, _) => g.batched(s.batch, true, true),
        };
        Some(gemm("matmul_backward", lhs, rhs, g, None, b.shape())?)
    } else {
        None
    };
    Ok((da, db))
}

/// `x @ weight^T + bias`: x `[..., in]`, weight `[out, in]` (PyTorch layout, read transposed by
/// the GEMM), bias `[out]`. Returns `[..., out]`. The bias is the GEMM's starting value, so no
/// elementwise pass is needed.
pub fn linear(tape: &Tape, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = linear_forward(x, weight, bias)?;
    // Save only what the backward needs: dX needs W, dW needs X. A frozen layer (no weight
    // gradient) therefore keeps its weight, which exists anyway, and not its input activation.
    let (need_x, need_w) = (x.needs_grad(), weight.needs_grad());
    let x_shape = x.shape().to_vec();
    let x_saved = need_w.then(|| x.clone());
    let w_saved = need_x.then(|| weight.clone());
    let w_shape = weight.shape().to_vec();
    let has_bias = bias.is_some();
    let bias_needs_grad = bias.is_some_and(|b| b.needs_grad());
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    Ok(tape.record(y, &inputs, move |dy| {
        let dx = w_saved.as_ref().map(|w| linear_backward_input(dy, w, &x_shape)).transpose()?;
        let dw = x_saved.as_ref().map(|x| linear_backward_weight(dy, x, &w_shape)).transpose()?;
        let db = bias_needs_grad.then(|| column_sums(dy)).transpose()?;
        // One gradient per recorded input: the bias is an input only when given.
        Ok(if has_bias { vec![dx, dw, db] } else { vec![dx, dw] })
    }))
}

/// dX = dY W (`[rows, out] x [out, in]`) for an input of shape `x_shape`.
fn linear_backward_input(dy: &Tensor, weight: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
    let (outputs, inputs) = (weight.dim(0), weight.dim(1));
    let rows = dy.numel() / outputs.max(1);
    gemm("linear_backward", dy, weight, Gemm::new(rows, outputs, inputs, false, false, 1.0), None, x_shape)
}

/// dW = dY^T X (`[out, rows] x [rows, in]`).
fn linear_backward_weight(dy: &Tensor, x: &Tensor, w_shape: &[usize]) -> Result<Tensor> {
    let (outputs, inputs) = (w_shape[0], w_shape[1]);
    let rows = x.numel() / inputs.max(1);
    gemm("linear_backward", dy, x, Gemm::new(outputs, rows, inputs, true, false, 1.0), None, w_shape)
}

/// The checked shape of one `linear`.
struct LinearShape {
    rows: usize,
    inputs: usize,
    outputs: usize,
    out_shape: Vec<usize>,
}

impl LinearShape {
    fn of(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<LinearShape> {
        if weight.rank() != 2 {
            return Err(Error::shape("linear", format!("weight must be [out, in], got shape {:?}", weight.shape())));
        }
        let (outputs, inputs) = (weight.shape()[0], weight.shape()[1]);
        LinearShape::with_dims(x, outputs, inputs, bias, &format!("{:?}", weight.shape()))
    }

    /// The shape of `x W^T + bias` for a weight of `outputs x inputs`, which errors name as
    /// `weight` (its shape, and how it is stored when that is not `[out, in]`).
    fn with_dims(
        x: &Tensor,
        outputs: usize,
        inputs: usize,
        bias: Option<&Tensor>,
        weight: &str,
    ) -> Result<LinearShape> {
        if x.rank() == 0 || x.dim(-1) != inputs {
            return Err(Error::shape(
                "linear",
                format!("input {:?} does not end in {inputs}, the in-features of weight {weight}", x.shape()),
            ));
        }
        if let Some(b) = bias {
            if b.shape() != [outputs] {
                return Err(Error::shape(
                    "linear",
                    format!("bias {:?} does not match the {outputs} out-features of weight {weight}", b.shape()),
                ));
            }
        }
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("rank checked above") = outputs;
        Ok(LinearShape { rows: numel(&x.shape()[..x.rank() - 1]), inputs, outputs, out_shape })
    }
}

/// Untracked [`linear`].
pub fn linear_forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let s = LinearShape::of(x, weight, bias)?;
    let g = Gemm::new(s.rows, s.inputs, s.outputs, false, true, 1.0);
    gemm("linear", x, weight, g, bias, &s.out_shape)
}

/// Untracked gradients of [`linear`] for x, weight and bias (each only when asked for).
pub fn linear_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let s = LinearShape::of(x, weight, None)?;
    if dy.shape() != s.out_shape {
        return Err(Error::shape(
            "linear_backward",
            format!("gradient {:?} does not match the output shape {:?}", dy.shape(), s.out_shape),
        ));
    }
    let dx = need_x.then(|| linear_backward_input(dy, weight, x.shape())).transpose()?;
    let dw = need_weight.then(|| linear_backward_weight(dy, x, weight.shape())).transpose()?;
    let db = need_bias.then(|| column_sums(dy)).transpose()?;
    Ok((dx, dw, db))
}

/// Sums of `x` over every dimension but the last: `[..., C] -> [C]` (the gradient of a bias or
/// of rows repeated down a matrix). See [`super::movement::sum_columns_forward`].
pub fn column_sums(x: &Tensor) -> Result<Tensor> {
    super::movement::sum_columns_forward(x)
}

/// The dimensions of one matmul after its shapes were checked.
struct MatmulShape {
    batch_dims: Vec<usize>,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    /// b is 2-D and shared by every batch of a.
    shared_b: bool,
}

impl MatmulShape {
    fn of(a: &Tensor, b: &Tensor, opts: MatmulOpts) -> Result<MatmulShape> {
        let describe =
            |t: &Tensor, transposed: bool| format!("{:?}{}", t.shape(), if transposed { " (transposed)" } else { "" });
        let (da, db) = (describe(a, opts.transpose_a), describe(b, opts.transpose_b));
        if a.rank() < 2 || b.rank() < 2 {
            return Err(Error::shape("matmul", format!("needs matrices (rank >= 2), got a {da} and b {db}")));
        }
        let (ra, rb) = (a.rank(), b.rank());
        let shared_b = rb == 2 && ra > 2;
        if !shared_b && a.shape()[..ra - 2] != b.shape()[..rb - 2] {
            return Err(Error::shape(
                "matmul",
                format!("batch dimensions of a {da} and b {db} differ (b must match them or be 2-D)"),
            ));
        }
        let (a_rows, a_cols) = (a.shape()[ra - 2], a.shape()[ra - 1]);
        let (b_rows, b_cols) = (b.shape()[rb - 2], b.shape()[rb - 1]);
        let (m, ka) = if opts.transpose_a { (a_cols, a_rows) } else { (a_rows, a_cols) };
        let (kb, n) = if opts.transpose_b { (b_cols, b_rows) } else { (b_rows, b_cols) };
        if ka != kb {
            return Err(Error::shape("matmul", format!("inner dimensions of a {da} and b {db} differ ({ka} vs {kb})")));
        }
        let batch_dims = a.shape()[..ra - 2].to_vec();
        Ok(MatmulShape { batch: numel(&batch_dims), batch_dims, m, k: ka, n, shared_b })
    }
}

/// One row-major (batched) GEMM: for each batch i, `C_i = alpha * op(A_i) op(B_i)` with op(A_i)
/// `[m, k]` (stored `[k, m]` when `trans_a`), op(B_i) `[k, n]` (stored `[n, k]` when `trans_b`),
/// C_i `[m, n]`. A_i starts at `i * stride_a` (0: one A shared by every batch), likewise B.
#[derive(Clone, Copy, Debug)]
struct Gemm {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    stride_a: usize,
    stride_b: usize,
    alpha: f32,
    /// Accumulate every batch's product into one `[m, n]` output.
    sum_batches: bool,
}

impl Gemm {
    fn new(m: usize, k: usize, n: usize, trans_a: bool, trans_b: bool, alpha: f32) -> Gemm {
        Gemm { batch: 1, m, k, n, trans_a, trans_b, stride_a: 0, stride_b: 0, alpha, sum_batches: false }
    }

    /// `batch` products; an operand that is not `batched` is shared (stride 0).
    fn batched(self, batch: usize, a_batched: bool, b_batched: bool) -> Gemm {
        Gemm {
            batch,
            stride_a: if a_batched { self.m * self.k } else { 0 },
            stride_b: if b_batched { self.k * self.n } else { 0 },
            ..self
        }
    }

    fn summed_over_batches(self) -> Gemm {
        Gemm { sum_batches: true, ..self }
    }

    /// Whether any multiply-add happens: false when k, m, n or the batch is 0.
    fn has_product(&self) -> bool {
        self.m > 0 && self.n > 0 && self.k > 0 && self.batch > 0
    }

    fn outputs(&self) -> usize {
        if self.sum_batches {
            1
        } else {
            self.batch
        }
    }

    /// Floats each operand must hold for every batch's matrix to lie inside it.
    fn extent(&self, stride: usize, matrix: usize) -> usize {
        if self.batch == 0 || matrix == 0 {
            0
        } else {
            (self.batch - 1) * stride + matrix
        }
    }
}

/// Runs `g` on `a` and `b`, starting from `bias_rows` (a `[n]` row repeated down every output
/// matrix) when given, else from zero. Returns a tensor of `out_shape`.
fn gemm(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    g: Gemm,
    bias_rows: Option<&Tensor>,
    out_shape: &[usize],
) -> Result<Tensor> {
    // The plans above are built from checked shapes; this guards the unsafe pointer arithmetic
    // of both backends against a wrong plan rather than a wrong user input.
    let fits = a.numel() >= g.extent(g.stride_a, g.m * g.k)
        && b.numel() >= g.extent(g.stride_b, g.k * g.n)
        && numel(out_shape) == g.outputs() * g.m * g.n
        && bias_rows.is_none_or(|r| r.numel() == g.n);
    if !fits {
        return Err(Error::shape(
            op,
            format!("internal GEMM plan {g:?} does not fit a {:?}, b {:?}, out {out_shape:?}", a.shape(), b.shape()),
        ));
    }
    let mut inputs = vec![a, b];
    inputs.extend(bias_rows);
    let device = same_device(op, &inputs)?;
    super::flops::count_matrix_product(g.batch, g.m, g.k, g.n);
    if !g.has_product() {
        // An empty inner dimension (or no output at all): C is its starting value, and no GEMM
        // runs (cuBLAS would otherwise be called on an output it may leave unwritten).
        return match bias_rows {
            Some(row) => repeat_rows_forward(row, g.outputs() * g.m)?.view_as(out_shape),
            None => Tensor::zeros(out_shape, &device),
        };
    }
    match device {
        Device::Cpu => {
            let rows = g.outputs() * g.m;
            let mut c = match bias_rows {
                Some(r) => repeat_rows_cpu(r.cpu_data(op)?, rows),
                // Not read by the GEMM (read_c is false without a bias): every element is written.
                None => host_buffer(rows * g.n),
            };
            cpu_gemm(a.cpu_data(op)?, b.cpu_data(op)?, &mut c, g, bias_rows.is_some());
            Tensor::from_vec(c, out_shape)
        }
        Device::Cuda(dev) => {
            let rows = g.outputs() * g.m;
            let (mut c, beta) = match bias_rows {
                Some(r) => (repeat_rows_cuda(&dev, cuda_slice(r)?, rows, g.n)?, 1.0),
                // beta = 0: cuBLAS does not read C, so it may start uninitialised.
                None => (dev.alloc(rows * g.n)?, 0.0),
            };
            cuda_gemm(&dev, cuda_slice(a)?, cuda_slice(b)?, &mut c, g, beta)?;
            Ok(cuda_output(&dev, c, out_shape))
        }
    }
}

/// Row-major strides (row step, column step) of op(X) for X stored `[rows, cols]` untransposed,
/// or stored `[cols, rows]` when `transposed`.
fn op_strides(rows: usize, cols: usize, transposed: bool) -> (isize, isize) {
    if transposed {
        (1, rows as isize)
    } else {
        (cols as isize, 1)
    }
}

/// CPU GEMM with the `gemm` crate. `c` already holds the starting values when `accumulate`.
fn cpu_gemm(a: &[f32], b: &[f32], c: &mut [f32], g: Gemm, accumulate: bool) {
    if !g.has_product() {
        return; // c already holds its starting values (zeros or bias rows)
    }
    let matrix = g.m * g.n;
    if g.sum_batches {
        for i in 0..g.batch {
            row_independent(&a[i * g.stride_a..], &b[i * g.stride_b..], c, g, accumulate || i > 0, true);
        }
    } else if g.batch >= rayon::current_num_threads() {
        // Many small products (attention heads): one thread per product.
        c.par_chunks_mut(matrix).enumerate().for_each(|(i, c_mat)| {
            row_independent(&a[i * g.stride_a..], &b[i * g.stride_b..], c_mat, g, accumulate, false)
        });
    } else {
        for (i, c_mat) in c.chunks_mut(matrix).enumerate() {
            row_independent(&a[i * g.stride_a..], &b[i * g.stride_b..], c_mat, g, accumulate, true);
        }
    }
}

/// The fewest rows the `gemm` crate is given for a product `n` columns wide.
///
/// The crate picks its algorithm by shape: a single row goes through a matrix-vector kernel,
/// products of at most 16 x 16 outputs through dot-product ("horizontal") kernels, and products
/// within 64 x 64 use k-blocks of 512 where larger ones use blocks that depend on k alone. Each
/// computes a row's dot products in another order, so a row of a product with few rows (a pooled
/// embedding: one row per image and draw) would change in the last bits with the number of rows,
/// that is with the batch: an image's maps would depend on what else is in the batch. With at
/// least this many rows every product takes the general blocked path, where an element is one
/// fixed-order sum over k whatever the number of rows (docs/model.md §5).
fn row_independent_min_rows(n: usize) -> usize {
    // > 64 leaves the small-size branch; m * n > 256 the horizontal kernels; m > 1 the gemv one.
    65usize.max(256 / n.max(1) + 1)
}

/// One product as [`gemm_threaded`] (or [`gemm_one`] on this thread when not `threaded`), its
/// rows computed alike whatever their number: a product with fewer rows than
/// [`row_independent_min_rows`] runs on a zero-padded copy of op(A) and its rows are copied back.
fn row_independent(a_mat: &[f32], b_mat: &[f32], c_mat: &mut [f32], g: Gemm, read_c: bool, threaded: bool) {
    let rows = row_independent_min_rows(g.n);
    let product = |a: &[f32], c: &mut [f32], g: Gemm| {
        if threaded {
            gemm_threaded(a, b_mat, c, g, read_c)
        } else {
            gemm_one(a, b_mat, c, g, read_c, gemm::Parallelism::None)
        }
    };
    if g.m >= rows {
        return product(a_mat, c_mat, g);
    }
    // op(A) as a row-major [rows, k] block, zeros below row m.
    let (a_rs, a_cs) = op_strides(g.m, g.k, g.trans_a);
    let mut padded_a = vec![0.0f32; rows * g.k];
    for (r, row) in padded_a.chunks_mut(g.k).take(g.m).enumerate() {
        for (c, value) in row.iter_mut().enumerate() {
            *value = a_mat[r * a_rs as usize + c * a_cs as usize];
        }
    }
    let mut padded_c = vec![0.0f32; rows * g.n];
    if read_c {
        padded_c[..g.m * g.n].copy_from_slice(&c_mat[..g.m * g.n]);
    }
    product(&padded_a, &mut padded_c, Gemm { m: rows, trans_a: false, ..g });
    c_mat[..g.m * g.n].copy_from_slice(&padded_c[..g.m * g.n]);
}

/// Products with fewer rows than this have their columns split between the threads (below).
const SPLIT_MAX_ROWS: usize = 1024;
/// Columns a thread gets at least from a split: narrower blocks pay more in packing than the
/// second thread brings.
const SPLIT_MIN_COLUMNS: usize = 128;

/// One product on all rayon threads. The `gemm` crate's own threading parallelises a product
/// with few rows (a layer on one image's ~200 tokens) poorly: on 2 threads a 197x3072x768 layer
/// ran at 94 GFLOP/s, one thread alone at 89; split into one block of output columns per
/// thread, each a single-threaded product, it ran at 163 (the 197x768x3072 one 166 -> 233; with
/// thousands of rows, as 30 stacked samples give, the crate's own threading is as good). Every
/// element is still one dot product over all of k in the crate's k-blocks, which depend on k
/// alone, so the split changes no bit (tested in tests/matmul.rs across thread counts).
fn gemm_threaded(a_mat: &[f32], b_mat: &[f32], c_mat: &mut [f32], g: Gemm, read_c: bool) {
    let threads = rayon::current_num_threads();
    if threads < 2 || g.m >= SPLIT_MAX_ROWS || g.n < 2 * SPLIT_MIN_COLUMNS {
        return gemm_one(a_mat, b_mat, c_mat, g, read_c, gemm::Parallelism::Rayon(0));
    }
    // Whole 16-float vectors per block, so that every block starts on a vector boundary.
    let width = g.n.div_ceil(threads).max(SPLIT_MIN_COLUMNS).next_multiple_of(16);
    let (b_rs, b_cs) = op_strides(g.k, g.n, g.trans_b);
    check_operand_lengths(a_mat, b_mat, c_mat, g);
    let c_base = SharedOutput(c_mat.as_mut_ptr());
    (0..g.n.div_ceil(width)).into_par_iter().for_each(|block| {
        let first = block * width;
        let cols = width.min(g.n - first);
        let c_block = &c_base;
        // SAFETY: the blocks cover disjoint column ranges [first, first + cols) of the [m, n]
        // row-major c_mat (checked long enough above), so no two threads write one element and
        // nothing else touches c_mat while they run; op(B)'s columns from `first` start at
        // element first * b_cs and stay within b_mat by the same check.
        unsafe {
            gemm_raw(
                (g.m, g.k, cols),
                c_block.0.add(first),
                read_c,
                a_mat,
                g,
                b_mat.as_ptr().add(first * b_cs as usize),
                (b_rs, b_cs),
                gemm::Parallelism::None,
            )
        }
    });
}

/// The output pointer shared by the column blocks of [`gemm_threaded`].
struct SharedOutput(*mut f32);
// SAFETY: each thread writes its own column block only (see gemm_threaded).
unsafe impl Sync for SharedOutput {}

/// One product `C = alpha op(A) op(B)` (plus C when `read_c`) of the plan's shape on host
/// slices; `a_mat` and `b_mat` start at this product's operands.
fn gemm_one(a_mat: &[f32], b_mat: &[f32], c_mat: &mut [f32], g: Gemm, read_c: bool, parallelism: gemm::Parallelism) {
    check_operand_lengths(a_mat, b_mat, c_mat, g);
    // SAFETY: the check above (and, for batched plans, `gemm`'s check of the whole operands) make
    // every element op(A)[r][c] = a_mat[r*a_rs + c*a_cs] in bounds, likewise for B; c_mat is an
    // [m, n] row-major block of its own.
    unsafe {
        gemm_raw(
            (g.m, g.k, g.n),
            c_mat.as_mut_ptr(),
            read_c,
            a_mat,
            g,
            b_mat.as_ptr(),
            op_strides(g.k, g.n, g.trans_b),
            parallelism,
        )
    }
}

/// Guards the pointer arithmetic of one product: each operand holds at least its matrix.
fn check_operand_lengths(a_mat: &[f32], b_mat: &[f32], c_mat: &[f32], g: Gemm) {
    assert!(
        a_mat.len() >= g.m * g.k && b_mat.len() >= g.k * g.n && c_mat.len() >= g.m * g.n,
        "internal GEMM operands too short for {g:?}"
    );
}

/// `C = alpha op(A) op(B)` (plus C when `read_c`) for an `[m, n]` block of C with row stride
/// `g.n`, op(A) laid out as the plan says, op(B)'s `n` columns from `b` with strides `b_strides`.
///
/// # Safety
/// `c` must be valid for writes of the `m` rows of `n` elements at row stride `g.n`, `b` for
/// reads of op(B) under `b_strides`, and no other thread may touch that part of C meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    (m, k, n): (usize, usize, usize),
    c: *mut f32,
    read_c: bool,
    a_mat: &[f32],
    g: Gemm,
    b: *const f32,
    b_strides: (isize, isize),
    parallelism: gemm::Parallelism,
) {
    let a_strides = op_strides(g.m, g.k, g.trans_a);
    // SAFETY: the caller's contract.
    unsafe {
        crate_gemm((m, k, n), (c, g.n), read_c, (a_mat.as_ptr(), a_strides), (b, b_strides), g.alpha, parallelism)
    }
}

/// The one call into the `gemm` crate: row-major `C = alpha A B` (plus C when `read_c`), A's
/// element `(r, i)` at `a + r * a_rs + i * a_cs`, B's `(i, j)` at `b + i * b_rs + j * b_cs`, C's
/// `(r, j)` at `c + r * c_row_stride + j`.
///
/// # Safety
/// A and B must be valid for reads of every element so addressed, C for writes of its `m x n`
/// elements, and no other thread may touch those elements of C meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn crate_gemm(
    (m, k, n): (usize, usize, usize),
    (c, c_row_stride): (*mut f32, usize),
    read_c: bool,
    (a, (a_rs, a_cs)): (*const f32, (isize, isize)),
    (b, (b_rs, b_cs)): (*const f32, (isize, isize)),
    alpha: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract; the crate takes (column, row) stride pairs and computes
    // dst = 1 * dst (when read) + alpha * lhs * rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_row_stride as isize,
            read_c,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A single-threaded row-major product on host slices for CPU kernels that run their own rayon
/// tasks (the probabilistic attention): `c = alpha op(a) op(b)`, plus `c` when `accumulate`.
/// `a` is `[m, k]` (stored `[k, m]` when `trans_a`), `b` is `[k, n]` (stored `[n, k]` when
/// `trans_b`), `c` is `[m, n]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cpu_gemm_serial(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    c: &mut [f32],
    alpha: f32,
    accumulate: bool,
) {
    if k == 0 || m == 0 || n == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    gemm_one(a, b, c, Gemm::new(m, k, n, trans_a, trans_b, alpha), accumulate, gemm::Parallelism::None);
}

/// A matrix inside a host slice: element `(r, c)` at `r * row_stride + c * col_stride`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatrixView<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatrixView<'_> {
    /// The first element and the (row, column) strides, as [`crate_gemm`] takes an operand.
    fn raw(&self) -> (*const f32, (isize, isize)) {
        (self.data.as_ptr(), (self.row_stride as isize, self.col_stride as isize))
    }

    /// Whether every element lies inside `data`.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// A single-threaded product over strided views, for CPU kernels that run their own rayon
/// tasks: `c = alpha a b`, where c's element `(r, j)` is `c[r * c_row_stride + j]` (the heads of
/// an attention read and written in place inside `[T, heads * D]` rows).
pub(crate) fn cpu_gemm_views(a: MatrixView, b: MatrixView, c: &mut [f32], c_row_stride: usize, alpha: f32) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && a.fits() && b.fits() && (m == 0 || n == 0 || (m - 1) * c_row_stride + n <= c.len()),
        "internal: strided GEMM views do not fit ({m}x{k} by {}x{n} into {} floats)",
        b.rows,
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in 0..m {
            c[row * c_row_stride..][..n].fill(0.0);
        }
        return;
    }
    // SAFETY: the assert above keeps every element the crate reads inside a.data and b.data and
    // every element it writes inside c, which this function borrows mutably.
    unsafe {
        crate_gemm((m, k, n), (c.as_mut_ptr(), c_row_stride), false, a.raw(), b.raw(), alpha, gemm::Parallelism::None)
    }
}

fn to_c_int(value: usize, what: &str) -> Result<c_int> {
    c_int::try_from(value)
        .map_err(|_| Error::shape("matmul", format!("{what} = {value} exceeds cuBLAS's 32-bit limit")))
}

fn blas_op(transposed: bool) -> blas_sys::cublasOperation_t {
    if transposed {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// cuBLAS strided-batched SGEMM in strict FP32. cuBLAS is column-major, and a row-major `[r, c]`
/// matrix is a column-major `[c, r]` one, so the row-major `C = op(A) op(B)` is computed as the
/// column-major `C^T = op(B)^T op(A)^T`: the operands swap places and keep their transpose flags.
fn cuda_gemm(
    dev: &CudaDevice,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    c: &mut CudaSlice<f32>,
    g: Gemm,
    beta: f32,
) -> Result<()> {
    if !g.has_product() {
        // `gemm` returns before calling this; with k = 0 and beta = 0, C would stay unwritten.
        return Err(Error::shape("matmul", format!("internal: empty GEMM {g:?} reached cuBLAS")));
    }
    let (m, n, k) = (to_c_int(g.n, "n")?, to_c_int(g.m, "m")?, to_c_int(g.k, "k")?);
    // Leading dimensions of the stored matrices seen column-major (at least 1, as cuBLAS asks).
    // cuBLAS's first operand is the engine's b and its second the engine's a (operands swap), so
    // cuBLAS's `lda` is b's leading dimension and `ldb` is a's: the labels name the engine's.
    let lda = to_c_int(if g.trans_b { g.k } else { g.n }.max(1), "the leading dimension of b")?;
    let ldb = to_c_int(if g.trans_a { g.m } else { g.k }.max(1), "the leading dimension of a")?;
    let ldc = m;
    let stream = dev.stream();
    let (a_ptr, _a_guard) = a.device_ptr(stream);
    let (b_ptr, _b_guard) = b.device_ptr(stream);
    let (c_ptr, _c_guard) = c.device_ptr_mut(stream);
    let float = std::mem::size_of::<f32>() as u64;
    let call = |offset_a: usize, offset_b: usize, offset_c: usize, batch: usize, beta: f32| -> Result<()> {
        let batch = to_c_int(batch, "batch")?;
        // SAFETY: the handle is bound to `stream`, which orders this call after the writes of
        // a, b and c (the guards above); `gemm` checked that a and b hold every batch's matrix
        // at the given strides and that c holds outputs()*m*n floats, which the offsets and
        // strides below stay inside. alpha and beta are host values read during the call.
        unsafe {
            blas_result::gemm_strided_batched_ex(
                *dev.blas().handle(),
                blas_op(g.trans_b),
                blas_op(g.trans_a),
                m,
                n,
                k,
                (&g.alpha) as *const f32 as *const c_void,
                (b_ptr + offset_b as u64 * float) as *const c_void,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                lda,
                g.stride_b as c_longlong,
                (a_ptr + offset_a as u64 * float) as *const c_void,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                ldb,
                g.stride_a as c_longlong,
                (&beta) as *const f32 as *const c_void,
                (c_ptr + offset_c as u64 * float) as *mut c_void,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                ldc,
                (g.m * g.n) as c_longlong,
                batch,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(Error::blas(format!("running an SGEMM of {g:?}")))?;
        crate::cuda::after_launch("cuBLAS SGEMM")
    };
    if g.sum_batches {
        // One product at a time into the same C (batches of one call could race on it).
        for i in 0..g.batch {
            call(i * g.stride_a, i * g.stride_b, 0, 1, if i == 0 { beta } else { 1.0 })?;
        }
        Ok(())
    } else {
        call(0, 0, 0, g.batch, beta)
    }
}

#[cfg(test)]
mod tests {
    use super::Gemm;

    /// The early return in `gemm` (no cuBLAS call, output = starting value) covers exactly the
    /// plans with nothing to multiply.
    #[test]
    fn only_plans_with_an_inner_product_reach_the_backends() {
        assert!(Gemm::new(2, 3, 4, false, false, 1.0).has_product());
        for (m, k, n) in [(2, 0, 4), (0, 3, 4), (2, 3, 0)] {
            assert!(!Gemm::new(m, k, n, false, true, 1.0).has_product(), "{m}x{k}x{n}");
        }
        assert!(!Gemm::new(2, 3, 4, false, false, 1.0).batched(0, true, true).has_product());
    }
}
