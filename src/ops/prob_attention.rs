//! Probabilistic cross-attention of MedCLIPSeg's PVL adapters (docs/model.md §2.3), fused:
//!
//! ```text
//! S_mu    = Q K_mu^T / sqrt(C)              logits = S_mu - beta * S_sigma
//! S_sigma = sqrt((Q*Q) K_var^T / C)         A      = softmax over keys (logits)
//! V_s     = V_mu + sqrt(V_var) * eps        O      = A V_s
//! ```
//!
//! `S` Monte-Carlo samples are stacked in the leading dimension: q is `[S*B, Tq, C]`, the four
//! key/value tensors `[S*B, Tk, C]`, and row `r` belongs to sample `r / B`. The noise of sample
//! `s` is `philox::normal(seed, stream(s), (b * Tk + k) * C + c)` for batch item `b` (or with
//! `b = 0` for every item: [`ItemNoise::Shared`], inference) with
//! `stream(s) = stream_id(first_draw + s, adapter, direction)` (see [`NoiseKey`]), bit-identical on
//! every backend; in [`NoiseMode::Antithetic`] an odd draw reads its even partner's stream,
//! negated. It is never stored: the backward regenerates it. The forward saves only its output
//! and one log-sum-exp per query, from which the backward recomputes the attention weights.
//!
//! [`prob_attention`] is the fused op (CPU reference below, CUDA kernels in
//! `kernels/prob_attention.cu`); [`prob_attention_composed`] builds the same function from the
//! generic differentiable ops and exists to check the fused one. Tests: `tests/prob_attention.rs`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::matmul::cpu_gemm_serial;
use super::softmax::softmax_row_in_place;
use super::{cuda_output, cuda_slice, launch, same_device, NULL_DEVICE_PTR};
use crate::cuda::{launch_elements, CudaDevice, Kernel, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::fastmath::{self, map_in_place, zip_map_in_place};
use crate::philox::{fill_normal_from, stream_id};
pub use crate::philox::{ItemNoise, NoiseMode};
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

const OP: &str = "prob_attention";

/// Which Gaussian noise the attention draws for its value samples.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct NoiseKey {
    pub seed: u64,
    /// Draw index of sample 0; sample `s` uses draw `first_draw + s`.
    pub first_draw: u64,
    /// Monte-Carlo samples stacked in the leading dimension of every input.
    pub samples: usize,
    /// PVL adapter index.
    pub adapter: u32,
    /// 0: image->text attention, 1: text->image.
    pub direction: u32,
    /// How the draws share noise (plain: independent; antithetic: negated pairs).
    pub mode: NoiseMode,
    /// Whether the items of the batch draw their own noise or all read the same elements.
    pub items: ItemNoise,
}

impl NoiseKey {
    /// The nominal Philox stream of sample `sample` (its own draw's), whatever the mode.
    pub fn stream(&self, sample: usize) -> u64 {
        stream_id(self.first_draw + sample as u64, self.adapter, self.direction)
    }

    /// The stream sample `sample` actually reads and whether it negates it (see [`NoiseMode`]).
    pub fn source(&self, sample: usize) -> (u64, bool) {
        let (draw, negate) = self.mode.source(self.first_draw + sample as u64);
        (stream_id(draw, self.adapter, self.direction), negate)
    }
}

/// The five inputs of the attention, borrowed.
#[derive(Copy, Clone, Debug)]
pub struct ProbAttentionInputs<'a> {
    /// Queries `[S*B, Tq, C]`.
    pub q: &'a Tensor,
    /// Key means `[S*B, Tk, C]`.
    pub k_mu: &'a Tensor,
    /// Key variances `[S*B, Tk, C]` (positive).
    pub k_var: &'a Tensor,
    /// Value means `[S*B, Tk, C]`.
    pub v_mu: &'a Tensor,
    /// Value variances `[S*B, Tk, C]` (positive).
    pub v_var: &'a Tensor,
}

impl<'a> ProbAttentionInputs<'a> {
    fn all(&self) -> [&'a Tensor; 5] {
        [self.q, self.k_mu, self.k_var, self.v_mu, self.v_var]
    }
}

/// What the fused forward returns: the output and what its backward needs besides the inputs.
#[derive(Clone, Debug)]
pub struct ProbAttentionForward {
    /// `O = A V_s`, `[S*B, Tq, C]`.
    pub out: Tensor,
    /// `log(sum_k exp(logit_k))` per query, `[S*B, Tq]`.
    pub lse: Tensor,
}

/// Gradients of the five inputs; `None` for those not asked for.
#[derive(Clone, Debug, Default)]
pub struct ProbAttentionGrads {
    pub q: Option<Tensor>,
    pub k_mu: Option<Tensor>,
    pub k_var: Option<Tensor>,
    pub v_mu: Option<Tensor>,
    pub v_var: Option<Tensor>,
}

/// Sizes of one call.
#[derive(Copy, Clone, Debug)]
struct Dims {
    /// `S * B`.
    rows: usize,
    /// `B`: rows per sample.
    batch: usize,
    tq: usize,
    tk: usize,
    c: usize,
}

impl Dims {
    fn inv_sqrt_c(&self) -> f32 {
        1.0 / (self.c as f32).sqrt()
    }

    fn inv_c(&self) -> f32 {
        1.0 / self.c as f32
    }

    /// Index of the first noise element of `row`: element (b, 0, 0) of a `[B, Tk, C]` draw
    /// ([`ItemNoise::ByRow`]) or element 0 ([`ItemNoise::Shared`]).
    fn noise_first(&self, row: usize, items: ItemNoise) -> u64 {
        items.first_element(row % self.batch, self.tk * self.c)
    }
}

/// Checks the shapes against each other and the sample count.
fn dims(x: &ProbAttentionInputs, noise: &NoiseKey) -> Result<Dims> {
    let shapes = || {
        format!(
            "q {:?}, k_mu {:?}, k_var {:?}, v_mu {:?}, v_var {:?}",
            x.q.shape(),
            x.k_mu.shape(),
            x.k_var.shape(),
            x.v_mu.shape(),
            x.v_var.shape()
        )
    };
    if x.all().iter().any(|t| t.rank() != 3) {
        return Err(Error::shape(OP, format!("expects rank-3 tensors [S*B, T, C], got {}", shapes())));
    }
    let [rows, tq, c] = [x.q.dim(0), x.q.dim(1), x.q.dim(2)];
    let key_shape = x.k_mu.shape();
    if [x.k_var, x.v_mu, x.v_var].iter().any(|t| t.shape() != key_shape) {
        return Err(Error::shape(OP, format!("k_mu, k_var, v_mu and v_var must have one shape, got {}", shapes())));
    }
    if key_shape[0] != rows || key_shape[2] != c {
        return Err(Error::shape(OP, format!("keys must be [{rows}, Tk, {c}] to match q, got {}", shapes())));
    }
    let tk = key_shape[1];
    if rows == 0 || tq == 0 || tk == 0 || c == 0 {
        return Err(Error::shape(OP, format!("needs non-empty tensors, got {}", shapes())));
    }
    if noise.samples == 0 || rows % noise.samples != 0 {
        return Err(Error::shape(
            OP,
            format!("{} samples do not divide the {rows} leading rows of {}", noise.samples, shapes()),
        ));
    }
    Ok(Dims { rows, batch: rows / noise.samples, tq, tk, c })
}

/// The fused probabilistic cross-attention `O = softmax(S_mu - beta S_sigma) (V_mu + sqrt(V_var) eps)`,
/// differentiable in all five inputs. See the module documentation for shapes and noise.
#[allow(clippy::too_many_arguments)]
pub fn prob_attention(
    tape: &Tape,
    q: &Tensor,
    k_mu: &Tensor,
    k_var: &Tensor,
    v_mu: &Tensor,
    v_var: &Tensor,
    beta: f32,
    noise: NoiseKey,
) -> Result<Tensor> {
    let inputs = ProbAttentionInputs { q, k_mu, k_var, v_mu, v_var };
    let ProbAttentionForward { out, lse } = prob_attention_forward(inputs, beta, noise)?;
    let saved_out = out.clone();
    let saved: [Tensor; 5] = inputs.all().map(Tensor::clone);
    let wanted = inputs.all().map(Tensor::needs_grad);
    Ok(tape.record(out, &inputs.all(), move |d_out| {
        let [q, k_mu, k_var, v_mu, v_var] = &saved;
        let inputs = ProbAttentionInputs { q, k_mu, k_var, v_mu, v_var };
        let g = prob_attention_backward(inputs, beta, noise, &saved_out, &lse, d_out, wanted)?;
        Ok(vec![g.q, g.k_mu, g.k_var, g.v_mu, g.v_var])
    }))
}

/// Untracked fused forward: the output and the per-query log-sum-exp its backward needs.
pub fn prob_attention_forward(x: ProbAttentionInputs, beta: f32, noise: NoiseKey) -> Result<ProbAttentionForward> {
    let d = dims(&x, &noise)?;
    // Per row: the S_mu and S_sigma^2 products and A V.
    super::flops::count_matrix_product(3 * d.rows, d.tq, d.c, d.tk);
    match same_device(OP, &x.all())? {
        Device::Cpu => cpu_forward(&x, d, beta, &noise),
        Device::Cuda(dev) => cuda_forward(&dev, &x, d, beta, &noise),
    }
}

/// Untracked fused backward. `out` and `lse` come from [`prob_attention_forward`] on the same
/// inputs and noise; `wanted` says which of (q, k_mu, k_var, v_mu, v_var) need a gradient.
#[allow(clippy::too_many_arguments)]
pub fn prob_attention_backward(
    x: ProbAttentionInputs,
    beta: f32,
    noise: NoiseKey,
    out: &Tensor,
    lse: &Tensor,
    d_out: &Tensor,
    wanted: [bool; 5],
) -> Result<ProbAttentionGrads> {
    let d = dims(&x, &noise)?;
    if out.shape() != x.q.shape() || d_out.shape() != x.q.shape() || lse.shape() != [d.rows, d.tq] {
        return Err(Error::shape(
            "prob_attention_backward",
            format!(
                "out {:?} and d_out {:?} must match q {:?}, lse {:?} must be [{}, {}]",
                out.shape(),
                d_out.shape(),
                x.q.shape(),
                lse.shape(),
                d.rows,
                d.tq
            ),
        ));
    }
    if !wanted.contains(&true) {
        return Ok(ProbAttentionGrads::default());
    }
    // Per row: the two score products again, dA = dO V^T, and one product per wanted gradient
    // (two for q).
    let [q, k_mu, k_var, v_mu, v_var] = wanted;
    let products = 3 + 2 * q as usize + k_mu as usize + k_var as usize + (v_mu || v_var) as usize;
    super::flops::count_matrix_product(products * d.rows, d.tq, d.c, d.tk);
    let mut all = x.all().to_vec();
    all.extend([out, lse, d_out]);
    match same_device("prob_attention_backward", &all)? {
        Device::Cpu => cpu_backward(&x, d, beta, &noise, out, lse, d_out, wanted),
        Device::Cuda(dev) => cuda_backward(&dev, &x, d, beta, &noise, out, lse, d_out, wanted),
    }
}

// ------------------------------------------------------------------------------------------------
// CPU reference, shaped as matrix products: per row, S_mu and S_sigma^2 are two GEMMs, A V_s a
// third, and the backward's seven products run through the same GEMM. Rayon splits the rows (and
// the forward's queries); every product inside a task is single-threaded, so the result does not
// depend on the thread count.

/// Queries per forward task: enough rows for an efficient GEMM, few enough that one image's
/// attention still spreads over the cores.
const CPU_QUERY_CHUNK: usize = 48;

/// Elements `start .. start + len` of the noise under (seed, stream).
fn noise_range(seed: u64, stream: u64, start: u64, len: usize) -> Vec<f32> {
    // A plain Vec: scratch that never becomes a tensor would not return to the host pool.
    let mut eps = vec![0.0f32; len];
    fill_normal_from(seed, stream, start, &mut eps);
    eps
}

/// One row's tensors as `[T, C]` slices.
struct RowData<'a> {
    q: &'a [f32],
    k_mu: &'a [f32],
    k_var: &'a [f32],
    v_mu: &'a [f32],
    v_var: &'a [f32],
}

/// The host data of all inputs, cut into rows.
struct CpuInputs<'a> {
    q: &'a [f32],
    k_mu: &'a [f32],
    k_var: &'a [f32],
    v_mu: &'a [f32],
    v_var: &'a [f32],
    d: Dims,
}

impl<'a> CpuInputs<'a> {
    fn new(x: &ProbAttentionInputs<'a>, d: Dims) -> Result<Self> {
        Ok(CpuInputs {
            q: x.q.cpu_data(OP)?,
            k_mu: x.k_mu.cpu_data(OP)?,
            k_var: x.k_var.cpu_data(OP)?,
            v_mu: x.v_mu.cpu_data(OP)?,
            v_var: x.v_var.cpu_data(OP)?,
            d,
        })
    }

    fn row(&self, r: usize) -> RowData<'a> {
        let (qn, kn) = (self.d.tq * self.d.c, self.d.tk * self.d.c);
        RowData {
            q: &self.q[r * qn..][..qn],
            k_mu: &self.k_mu[r * kn..][..kn],
            k_var: &self.k_var[r * kn..][..kn],
            v_mu: &self.v_mu[r * kn..][..kn],
            v_var: &self.v_var[r * kn..][..kn],
        }
    }
}

/// The noise `eps` of one row, `[Tk, C]`.
fn row_noise(d: Dims, noise: &NoiseKey, row: usize) -> Vec<f32> {
    let (stream, negate) = noise.source(row / d.batch);
    let mut eps = noise_range(noise.seed, stream, d.noise_first(row, noise.items), d.tk * d.c);
    if negate {
        // Exact in floating point, so the pair is `eps` and `-eps` bit for bit.
        map_in_place(&mut eps, |e| -e);
    }
    eps
}

/// `V_s = V_mu + sqrt(V_var) * eps` of one row.
fn v_sample(x: &RowData, eps: &[f32]) -> Vec<f32> {
    let mut v = eps.to_vec();
    zip_map_in_place(&mut v, x.v_mu, x.v_var, |e, m, var| m + var.sqrt() * e);
    v
}

/// The two score products of the queries `q` (`[n, C]`, their squares `q_sq`) against every key
/// of the row: `(S_mu, S_sigma^2)`, both `[n, Tk]`.
fn scores(x: &RowData, d: Dims, q: &[f32], q_sq: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = q.len() / d.c;
    let mut s_mu = vec![0.0f32; n * d.tk];
    let mut sigma_sq = vec![0.0f32; n * d.tk];
    cpu_gemm_serial((n, d.c, d.tk), q, false, x.k_mu, true, &mut s_mu, d.inv_sqrt_c(), false);
    cpu_gemm_serial((n, d.c, d.tk), q_sq, false, x.k_var, true, &mut sigma_sq, d.inv_c(), false);
    (s_mu, sigma_sq)
}

/// The logits `S_mu - beta S_sigma` (`[n, Tk]`) of the queries `q` against every key of the row.
fn logits(x: &RowData, d: Dims, q: &[f32], q_sq: &[f32], beta: f32) -> Vec<f32> {
    let (mut logits, sigma_sq) = scores(x, d, q, q_sq);
    zip_map_in_place(&mut logits, &sigma_sq, &sigma_sq, move |mu, s2, _| mu - beta * s2.sqrt());
    logits
}

fn squares(values: &[f32]) -> Vec<f32> {
    values.iter().map(|v| v * v).collect()
}

/// Turns each `[Tk]` row of logits into attention weights in place and returns its log-sum-exp.
fn softmax_rows(logits: &mut [f32], tk: usize) -> Vec<f32> {
    logits
        .chunks_mut(tk)
        .map(|row| {
            let (max, sum) = softmax_row_in_place(row);
            max + sum.ln()
        })
        .collect()
}

fn cpu_forward(x: &ProbAttentionInputs, d: Dims, beta: f32, noise: &NoiseKey) -> Result<ProbAttentionForward> {
    let data = CpuInputs::new(x, d)?;
    let v_samples: Vec<Vec<f32>> =
        (0..d.rows).into_par_iter().map(|r| v_sample(&data.row(r), &row_noise(d, noise, r))).collect();
    let chunk = CPU_QUERY_CHUNK.min(d.tq);
    let chunks_per_row = d.tq.div_ceil(chunk);
    let mut out = host_buffer(d.rows * d.tq * d.c);
    // Every element of lse is written (copy_from_slice below), so it starts unzeroed.
    let mut lse = host_buffer(d.rows * d.tq);
    // Task t covers queries [j * chunk, ..) of row r, with (r, j) = (t / chunks_per_row, t % ..);
    // out and lse are cut the same way, row by row.
    let out_chunks = out.chunks_mut(d.tq * d.c).flat_map(|row| row.chunks_mut(chunk * d.c));
    let lse_chunks = lse.chunks_mut(d.tq).flat_map(|row| row.chunks_mut(chunk));
    let tasks: Vec<(&mut [f32], &mut [f32])> = out_chunks.zip(lse_chunks).collect();
    tasks.into_par_iter().enumerate().for_each(|(t, (out_c, lse_c))| {
        let (r, j) = (t / chunks_per_row, t % chunks_per_row);
        let x = data.row(r);
        let q = &x.q[j * chunk * d.c..][..out_c.len()];
        let mut weights = logits(&x, d, q, &squares(q), beta);
        lse_c.copy_from_slice(&softmax_rows(&mut weights, d.tk));
        cpu_gemm_serial((lse_c.len(), d.tk, d.c), &weights, false, &v_samples[r], false, out_c, 1.0, false);
    });
    Ok(ProbAttentionForward {
        out: Tensor::from_vec(out, &[d.rows, d.tq, d.c])?,
        lse: Tensor::from_vec(lse, &[d.rows, d.tq])?,
    })
}

/// One row's slices of the five input gradients (empty for those not wanted).
struct RowGrads<'a> {
    q: &'a mut [f32],
    k_mu: &'a mut [f32],
    k_var: &'a mut [f32],
    v_mu: &'a mut [f32],
    v_var: &'a mut [f32],
}

/// One row's backward. With g = A (dA - delta) the logit gradient, delta_i = dO_i . O_i and
/// h = g / S_sigma (0 where S_sigma = 0, where sqrt has no derivative):
///
/// ```text
/// dA     = dO V_s^T                 dQ     = g K_mu / sqrt(C) - (beta / C) Q * (h K_var)
/// dK_mu  = g^T Q / sqrt(C)          dK_var = -(beta / 2C) h^T (Q * Q)
/// dV_mu  = A^T dO                   dV_var = dV_mu * eps / (2 sqrt(V_var))
/// ```
#[allow(clippy::too_many_arguments)]
fn cpu_row_backward(
    x: &RowData,
    d: Dims,
    beta: f32,
    eps: &[f32],
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    grads: RowGrads,
) {
    let (c, tq, tk) = (d.c, d.tq, d.tk);
    let v_s = v_sample(x, eps);
    let q_sq = squares(x.q);
    let (mut a, mut sigma) = scores(x, d, x.q, &q_sq);
    map_in_place(&mut sigma, f32::sqrt);
    // The forward's weights again, from the saved log-sum-exp: exp(S_mu - beta S_sigma - lse).
    for ((a_row, s_row), &l) in a.chunks_mut(tk).zip(sigma.chunks(tk)).zip(lse) {
        zip_map_in_place(a_row, s_row, s_row, move |mu, s, _| fastmath::exp(mu - beta * s - l));
    }
    let mut g = vec![0.0f32; tq * tk];
    cpu_gemm_serial((tq, c, tk), d_out, false, &v_s, true, &mut g, 1.0, false);
    for ((g_row, a_row), i) in g.chunks_mut(tk).zip(a.chunks(tk)).zip(0..tq) {
        let delta = fastmath::zip_sum(&d_out[i * c..][..c], &out[i * c..][..c], |p, q| p * q);
        zip_map_in_place(g_row, a_row, a_row, move |da, a, _| a * (da - delta));
    }
    // h = g / S_sigma, in S_sigma's buffer (S_sigma is not needed after this).
    let h = &mut sigma;
    zip_map_in_place(h, &g, &g, |s, g, _| if s > 0.0 { g / s } else { 0.0 });

    if !grads.q.is_empty() {
        let mut from_var = vec![0.0f32; tq * c];
        cpu_gemm_serial((tq, tk, c), &g, false, x.k_mu, false, grads.q, d.inv_sqrt_c(), false);
        cpu_gemm_serial((tq, tk, c), h, false, x.k_var, false, &mut from_var, beta * d.inv_c(), false);
        zip_map_in_place(grads.q, &from_var, x.q, |m, v, q| m - q * v);
    }
    if !grads.k_mu.is_empty() {
        cpu_gemm_serial((tk, tq, c), &g, true, x.q, false, grads.k_mu, d.inv_sqrt_c(), false);
    }
    if !grads.k_var.is_empty() {
        cpu_gemm_serial((tk, tq, c), h, true, &q_sq, false, grads.k_var, -0.5 * beta * d.inv_c(), false);
    }
    if !grads.v_mu.is_empty() || !grads.v_var.is_empty() {
        let mut scratch = Vec::new();
        let dv: &mut [f32] = if grads.v_mu.is_empty() {
            scratch.resize(tk * c, 0.0);
            &mut scratch
        } else {
            grads.v_mu
        };
        cpu_gemm_serial((tk, tq, c), &a, true, d_out, false, dv, 1.0, false);
        if !grads.v_var.is_empty() {
            grads.v_var.copy_from_slice(eps);
            zip_map_in_place(grads.v_var, dv, x.v_var, |e, dv, var| dv * e / (2.0 * var.sqrt()));
        }
    }
}

/// `buffer` cut into `rows` equal slices; an empty buffer gives `rows` empty slices.
fn row_slices(buffer: &mut [f32], rows: usize) -> std::vec::IntoIter<&mut [f32]> {
    let len = buffer.len() / rows;
    let mut slices: Vec<&mut [f32]> = if len == 0 { Vec::new() } else { buffer.chunks_mut(len).collect() };
    slices.resize_with(rows, || &mut []);
    slices.into_iter()
}

#[allow(clippy::too_many_arguments)]
fn cpu_backward(
    x: &ProbAttentionInputs,
    d: Dims,
    beta: f32,
    noise: &NoiseKey,
    out: &Tensor,
    lse: &Tensor,
    d_out: &Tensor,
    wanted: [bool; 5],
) -> Result<ProbAttentionGrads> {
    let data = CpuInputs::new(x, d)?;
    let (out, lse, d_out) = (out.cpu_data(OP)?, lse.cpu_data(OP)?, d_out.cpu_data(OP)?);
    let (qn, kn) = (d.tq * d.c, d.tk * d.c);
    // Each row's gradients are written straight into the result buffers (every element of a
    // wanted one: they come from the pool unzeroed); an unwanted one is empty.
    let row_lengths = [qn, kn, kn, kn, kn];
    let mut buffers: [Vec<f32>; 5] =
        std::array::from_fn(|i| if wanted[i] { host_buffer(d.rows * row_lengths[i]) } else { Vec::new() });
    {
        let [q, k_mu, k_var, v_mu, v_var] = buffers.each_mut().map(|buffer| row_slices(buffer, d.rows));
        let rows: Vec<RowGrads> = q
            .zip(k_mu)
            .zip(k_var)
            .zip(v_mu)
            .zip(v_var)
            .map(|((((q, k_mu), k_var), v_mu), v_var)| RowGrads { q, k_mu, k_var, v_mu, v_var })
            .collect();
        rows.into_par_iter().enumerate().for_each(|(r, grads)| {
            let eps = row_noise(d, noise, r);
            let (o, l, g) = (&out[r * qn..][..qn], &lse[r * d.tq..][..d.tq], &d_out[r * qn..][..qn]);
            cpu_row_backward(&data.row(r), d, beta, &eps, o, l, g, grads);
        });
    }
    let [q, k_mu, k_var, v_mu, v_var] = buffers;
    let tensor = |buffer: Vec<f32>, shape: &[usize]| -> Result<Option<Tensor>> {
        if buffer.is_empty() {
            return Ok(None);
        }
        Tensor::from_vec(buffer, shape).map(Some)
    };
    let (q_shape, k_shape) = (x.q.shape(), x.k_mu.shape());
    Ok(ProbAttentionGrads {
        q: tensor(q, q_shape)?,
        k_mu: tensor(k_mu, k_shape)?,
        k_var: tensor(k_var, k_shape)?,
        v_mu: tensor(v_mu, k_shape)?,
        v_var: tensor(v_var, k_shape)?,
    })
}

// ------------------------------------------------------------------------------------------------
// CUDA launchers for kernels/prob_attention.cu.

// The tile sizes: PA_THREADS, PA_WARPS, PA_TQ, PA_TK (forward and dQ: queries per block, keys per
// staged tile), PA_KV_TK, PA_KV_TQ (dK/dV: keys per block, queries per staged tile), which build.rs
// reads from the #defines of the kernel file, so they are written in one place.
include!(concat!(env!("OUT_DIR"), "/prob_attention_tiles.rs"));

// What the kernels assume of those sizes; changing a #define so that one fails stops the build.
const _: () = {
    let threads = PA_THREADS as usize;
    assert!(PA_WARPS * 32 == threads, "PA_WARPS must be PA_THREADS / 32");
    assert!(PA_TQ.is_multiple_of(PA_WARPS) && PA_TQ <= threads, "each warp takes PA_TQ / PA_WARPS whole queries");
    assert!(
        threads.is_multiple_of(PA_TK) && (PA_TQ * PA_TK).is_multiple_of(threads),
        "the scores tile is a whole number of passes"
    );
    assert!(PA_KV_TK.is_multiple_of(PA_WARPS), "each warp takes PA_KV_TK / PA_WARPS whole keys");
    assert!(PA_KV_TQ * PA_KV_TK == threads, "dK/dV takes one (query, key) pair per thread");
};

/// The kernels spread C over the 32 lanes of a warp, at most 8 columns per lane.
const MAX_CUDA_CHANNELS: usize = 256;

/// The kernel variant for C channels: index 0..4 for columns per lane 1, 2, 4 or 8 (a variant
/// covers C up to `32 << index`).
fn variant(c: usize) -> Result<usize> {
    match c {
        1..=32 => Ok(0),
        33..=64 => Ok(1),
        65..=128 => Ok(2),
        129..=MAX_CUDA_CHANNELS => Ok(3),
        _ => {
            Err(Error::shape(OP, format!("the CUDA kernels support at most {MAX_CUDA_CHANNELS} channels, got C = {c}")))
        }
    }
}

const fn forward_shared_bytes(c: usize) -> usize {
    4 * ((PA_TQ + 2 * PA_TK) * (c + 1) + PA_TQ * PA_TK + 3 * PA_TQ)
}

const fn dq_shared_bytes(c: usize) -> usize {
    4 * ((2 * PA_TQ + 3 * PA_TK) * (c + 1) + 2 * PA_TQ * PA_TK + 2 * PA_TQ)
}

const fn dkv_shared_bytes(c: usize) -> usize {
    4 * ((3 * PA_KV_TK + 2 * PA_KV_TQ) * (c + 1) + 3 * PA_KV_TQ * PA_KV_TK + 2 * PA_KV_TQ)
}

/// One kernel per variant; each is opted in once to the shared memory of its largest C (the
/// formulas grow with C), so no launch changes a function attribute.
macro_rules! variants {
    ($stem:literal, $bytes:ident) => {
        [
            Kernel::with_shared_memory(KernelFamily::ProbAttention, concat!($stem, "_c1"), $bytes(32)),
            Kernel::with_shared_memory(KernelFamily::ProbAttention, concat!($stem, "_c2"), $bytes(64)),
            Kernel::with_shared_memory(KernelFamily::ProbAttention, concat!($stem, "_c4"), $bytes(128)),
            Kernel::with_shared_memory(KernelFamily::ProbAttention, concat!($stem, "_c8"), $bytes(256)),
        ]
    };
}
static FORWARD: [Kernel; 4] = variants!("prob_attention_forward", forward_shared_bytes);
static BACKWARD_DQ: [Kernel; 4] = variants!("prob_attention_backward_dq", dq_shared_bytes);
static BACKWARD_DKV: [Kernel; 4] = variants!("prob_attention_backward_dkv", dkv_shared_bytes);
static DELTA: Kernel = Kernel::new(KernelFamily::ProbAttention, "prob_attention_delta");

/// A launch of `kernel`, one block per (row, tile of `tile` along `len`), with `shared` bytes of
/// dynamic shared memory (within what the kernel was opted in to when it was loaded).
fn tiled_launch(kernel: &Kernel, d: Dims, len: usize, tile: usize, shared: usize) -> Result<LaunchConfig> {
    let tiles = len.div_ceil(tile);
    if d.rows > i32::MAX as usize || tiles > 65_535 {
        return Err(Error::shape(OP, format!("{} rows x {tiles} tiles exceed the CUDA grid", d.rows)));
    }
    if shared > kernel.max_dynamic_shared_bytes().max(48 * 1024) {
        return Err(Error::shape(
            OP,
            format!(
                "`{}` needs {shared} bytes of shared memory, above the {} it was granted",
                kernel.name(),
                kernel.max_dynamic_shared_bytes()
            ),
        ));
    }
    Ok(LaunchConfig {
        grid_dim: (d.rows as u32, tiles as u32, 1),
        block_dim: (PA_THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    })
}

/// The Philox stream of sample 0 and the step between consecutive samples' streams, so that a
/// kernel finds sample s's stream as `first + s * stride` (stream ids are linear in the draw).
fn stream_first_and_stride(noise: &NoiseKey) -> (u64, u64) {
    let first = noise.stream(0);
    let stride = if noise.samples > 1 { noise.stream(1) - first } else { 0 };
    debug_assert_eq!(noise.stream(noise.samples - 1), first + (noise.samples as u64 - 1) * stride);
    (first, stride)
}

/// The scalar arguments every attention kernel ends with, in kernel order.
struct ScalarArgs {
    batch: i32,
    tq: i32,
    tk: i32,
    c: i32,
    beta: f32,
    seed: u64,
    stream_first: u64,
    stream_stride: u64,
    /// [`NoiseMode::negate_bit`]: the kernels map a nominal stream to the one it reads with it.
    negate_bit: u64,
    /// Elements between consecutive batch items' noise: `Tk * C`, or 0 for [`ItemNoise::Shared`].
    item_noise_stride: u64,
}

impl ScalarArgs {
    fn new(d: Dims, beta: f32, noise: &NoiseKey) -> Result<Self> {
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| Error::shape(OP, format!("size {v} exceeds the kernels' 32-bit indexing")))
        };
        // Elements of one row are indexed with 32-bit ints inside the kernels.
        int(d.tq.max(d.tk) * (d.c + 1))?;
        let (stream_first, stream_stride) = stream_first_and_stride(noise);
        let negate_bit = noise.mode.negate_bit();
        debug_assert!((0..noise.samples).all(|s| {
            let nominal = noise.stream(s);
            noise.source(s) == (nominal & !negate_bit, nominal & negate_bit != 0)
        }));
        Ok(ScalarArgs {
            batch: int(d.batch)?,
            tq: int(d.tq)?,
            tk: int(d.tk)?,
            c: int(d.c)?,
            beta,
            seed: noise.seed,
            stream_first,
            stream_stride,
            negate_bit,
            item_noise_stride: d.noise_first(1, noise.items),
        })
    }

    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(&self.batch).arg(&self.tq).arg(&self.tk).arg(&self.c).arg(&self.beta);
        b.arg(&self.seed).arg(&self.stream_first).arg(&self.stream_stride).arg(&self.negate_bit);
        b.arg(&self.item_noise_stride);
    }
}

fn cuda_forward(
    dev: &std::sync::Arc<CudaDevice>,
    x: &ProbAttentionInputs,
    d: Dims,
    beta: f32,
    noise: &NoiseKey,
) -> Result<ProbAttentionForward> {
    let kernel = &FORWARD[variant(d.c)?];
    let f = kernel.function(dev)?;
    let cfg = tiled_launch(kernel, d, d.tq, PA_TQ, forward_shared_bytes(d.c))?;
    let scalars = ScalarArgs::new(d, beta, noise)?;
    let mut out = dev.alloc(d.rows * d.tq * d.c)?;
    let mut lse = dev.alloc(d.rows * d.tq)?;
    let mut b = dev.stream().launch_builder(f);
    b.arg(&mut out).arg(&mut lse);
    for t in x.all() {
        b.arg(cuda_slice(t)?);
    }
    scalars.push(&mut b);
    // SAFETY: arguments match `prob_attention_forward_cN(float* out, float* lse, const float* q,
    // k_mu, k_var, v_mu, v_var, int batch, int Tq, int Tk, int C, float beta, u64 seed, u64
    // stream_first, u64 stream_stride, u64 negate_bit, u64 item_noise_stride)`; `dims` checked q
    // is [rows, Tq, C] and the others [rows, Tk, C]; out holds rows*Tq*C and lse rows*Tq floats, every element written once.
    // The grid covers every (row, query tile); the shared memory size is the kernel's formula.
    launch(kernel.name(), unsafe { b.launch(cfg) })?;
    Ok(ProbAttentionForward {
        out: cuda_output(dev, out, &[d.rows, d.tq, d.c]),
        lse: cuda_output(dev, lse, &[d.rows, d.tq]),
    })
}

#[allow(clippy::too_many_arguments)]
fn cuda_backward(
    dev: &std::sync::Arc<CudaDevice>,
    x: &ProbAttentionInputs,
    d: Dims,
    beta: f32,
    noise: &NoiseKey,
    out: &Tensor,
    lse: &Tensor,
    d_out: &Tensor,
    wanted: [bool; 5],
) -> Result<ProbAttentionGrads> {
    let which = variant(d.c)?;
    let scalars = ScalarArgs::new(d, beta, noise)?;
    let query_rows = d.rows * d.tq;

    // delta = rowsum(dO * O), one warp per query row.
    let mut delta = dev.alloc(query_rows)?;
    {
        let f = DELTA.function(dev)?;
        let (rows_i, c_i) = (query_rows as i64, scalars.c);
        let mut b = dev.stream().launch_builder(f);
        b.arg(&mut delta).arg(cuda_slice(d_out)?).arg(cuda_slice(out)?).arg(&rows_i).arg(&c_i);
        // SAFETY: arguments match `prob_attention_delta(float*, const float*, const float*, long long,
        // int)`; d_out and out hold query_rows*C floats, delta query_rows. Warps grid-stride.
        launch("prob_attention_delta", unsafe { b.launch(launch_elements(query_rows * 32)) })?;
    }

    let mut grads = ProbAttentionGrads::default();
    if wanted[0] {
        let kernel = &BACKWARD_DQ[which];
        let f = kernel.function(dev)?;
        let cfg = tiled_launch(kernel, d, d.tq, PA_TQ, dq_shared_bytes(d.c))?;
        let mut dq = dev.alloc(query_rows * d.c)?;
        let mut b = dev.stream().launch_builder(f);
        b.arg(&mut dq).arg(cuda_slice(d_out)?).arg(cuda_slice(lse)?).arg(&delta);
        for t in x.all() {
            b.arg(cuda_slice(t)?);
        }
        scalars.push(&mut b);
        // SAFETY: arguments match `prob_attention_backward_dq_cN(float* dq, const float* d_out,
        // lse, delta, q, k_mu, k_var, v_mu, v_var, <scalars>)`; dq and d_out hold rows*Tq*C
        // floats, lse and delta rows*Tq, the inputs their checked shapes. Every dq element is
        // written by the block of its (row, query tile).
        launch(kernel.name(), unsafe { b.launch(cfg) })?;
        grads.q = Some(cuda_output(dev, dq, x.q.shape()));
    }
    if wanted[1..].contains(&true) {
        let kernel = &BACKWARD_DKV[which];
        let f = kernel.function(dev)?;
        let cfg = tiled_launch(kernel, d, d.tk, PA_KV_TK, dkv_shared_bytes(d.c))?;
        let key_len = d.rows * d.tk * d.c;
        let mut outputs: Vec<Option<CudaSlice<f32>>> = wanted[1..]
            .iter()
            .map(|&w| if w { dev.alloc(key_len).map(Some) } else { Ok(None) })
            .collect::<Result<_>>()?;
        let mut b = dev.stream().launch_builder(f);
        for slot in outputs.iter_mut() {
            match slot {
                Some(buf) => b.arg(buf),
                None => b.arg(&NULL_DEVICE_PTR),
            };
        }
        b.arg(cuda_slice(d_out)?).arg(cuda_slice(lse)?).arg(&delta);
        for t in x.all() {
            b.arg(cuda_slice(t)?);
        }
        scalars.push(&mut b);
        // SAFETY: arguments match `prob_attention_backward_dkv_cN(float* dk_mu, dk_var, dv_mu,
        // dv_var (each null or rows*Tk*C floats), const float* d_out, lse, delta, q, k_mu, k_var,
        // v_mu, v_var, <scalars>)`; the kernel skips null outputs and writes every element of the
        // others from the block of its (row, key tile).
        launch(kernel.name(), unsafe { b.launch(cfg) })?;
        drop(b);
        let shape = x.k_mu.shape();
        let [k_mu, k_var, v_mu, v_var] = <[Option<CudaSlice<f32>>; 4]>::try_from(outputs)
            .unwrap_or_else(|_| unreachable!("one slot per key/value input"))
            .map(|slot| slot.map(|buf| cuda_output(dev, buf, shape)));
        (grads.k_mu, grads.k_var, grads.v_mu, grads.v_var) = (k_mu, k_var, v_mu, v_var);
    }
    Ok(grads)
}

// ------------------------------------------------------------------------------------------------
// The composed version: generic differentiable ops only, for testing the fused op.

/// The same function as [`prob_attention`] built from `matmul_with`, elementwise ops,
/// `softmax_last` and `normal_noise`: slow (it materialises scores, weights and the V sample) but
/// plainly the formula of docs/model.md §2.3, and differentiable through the tape.
#[allow(clippy::too_many_arguments)]
pub fn prob_attention_composed(
    tape: &Tape,
    q: &Tensor,
    k_mu: &Tensor,
    k_var: &Tensor,
    v_mu: &Tensor,
    v_var: &Tensor,
    beta: f32,
    noise: NoiseKey,
) -> Result<Tensor> {
    use super::{
        add, concat_forward, matmul, matmul_with, mul, neg, normal_noise, scale, softmax_last, sqrt, sub, MatmulOpts,
    };
    let x = ProbAttentionInputs { q, k_mu, k_var, v_mu, v_var };
    let d = dims(&x, &noise)?;
    let device = same_device(OP, &x.all())?;
    let transposed_keys = |alpha: f32| MatmulOpts { transpose_a: false, transpose_b: true, alpha };

    let s_mu = matmul_with(tape, q, k_mu, transposed_keys(d.inv_sqrt_c()))?;
    let s_var = matmul_with(tape, &mul(tape, q, q)?, k_var, transposed_keys(d.inv_c()))?;
    let s_sigma = sqrt(tape, &s_var)?;
    let weights = softmax_last(tape, &sub(tape, &s_mu, &scale(tape, &s_sigma, beta)?)?, None)?;

    let per_sample: Vec<Tensor> = (0..noise.samples)
        .map(|s| {
            let (stream, negate) = noise.source(s);
            let eps = normal_noise(&device, &[d.batch, d.tk, d.c], noise.seed, stream)?;
            if negate {
                neg(tape, &eps)
            } else {
                Ok(eps)
            }
        })
        .collect::<Result<_>>()?;
    let eps = concat_forward(&per_sample.iter().collect::<Vec<_>>(), 0)?;
    let v_sample = add(tape, v_mu, &mul(tape, &sqrt(tape, v_var)?, &eps)?)?;
    matmul(tape, &weights, &v_sample)
}
