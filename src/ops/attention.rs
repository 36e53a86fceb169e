//! Scaled dot-product attention composed from batched GEMMs and the masked row softmax (with
//! optional dropout on the probabilities); its gradient comes from theirs. For inference on the
//! CPU, [`attention_heads_inference`] does the same per head in one pass, reading the heads where
//! the projections wrote them. Tests: `tests/attention.rs`.

use rayon::prelude::*;

use super::dropout::{dropout, DropoutKey};
use super::matmul::{cpu_gemm_views, matmul, matmul_with, MatmulOpts, MatrixView};
use super::softmax::{softmax_last, softmax_row_in_place};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::Tensor;

/// `softmax(scale * q k^T + mask) v` per batch and head.
///
/// q `[B, H, Tq, D]`, k `[B, H, Tk, D]`, v `[B, H, Tk, Dv]` -> `[B, H, Tq, Dv]`. `mask`, when
/// given, is an additive key mask `[B, Tk]` (0 to keep a key, a large negative value such as
/// -1e30 to drop a padding key) shared by every head and query of its batch; it gets no gradient.
/// The scale is the GEMM's alpha, so the scores are never rescaled in a separate pass.
pub fn scaled_dot_product_attention(
    tape: &Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
) -> Result<Tensor> {
    scaled_dot_product_attention_with_dropout(tape, q, k, v, mask, scale, None)
}

/// [`scaled_dot_product_attention`] with dropout `(p, key)` applied to the softmax probabilities
/// before they weight the values, as BERT's attention does in training. The mask element of
/// probability `[b, h, i, j]` is its row-major index in the `[B, H, Tq, Tk]` probabilities.
pub fn scaled_dot_product_attention_with_dropout(
    tape: &Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
    dropout_on_probabilities: Option<(f32, DropoutKey)>,
) -> Result<Tensor> {
    check_shapes(q, k, v, mask)?;
    let scores = matmul_with(tape, q, k, MatmulOpts { transpose_b: true, alpha: scale, ..MatmulOpts::default() })?;
    // Scores rows are laid out [B, H * Tq] x Tk, so a [B, Tk] mask row covers H * Tq
    // consecutive rows: exactly softmax_last's grouped mask.
    let probabilities = softmax_last(tape, &scores, mask)?;
    let probabilities = match dropout_on_probabilities {
        Some((p, key)) => dropout(tape, &probabilities, p, key)?,
        None => probabilities,
    };
    matmul(tape, &probabilities, v)
}

fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<()> {
    let describe = || {
        let mask = mask.map_or("none".to_string(), |m| format!("{:?}", m.shape()));
        format!("q {:?}, k {:?}, v {:?}, mask {mask}", q.shape(), k.shape(), v.shape())
    };
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(Error::shape("attention", format!("expects [B, H, T, D] tensors, got {}", describe())));
    }
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    let fits = qs[..2] == ks[..2] && ks[..3] == vs[..3] && qs[3] == ks[3] && ks[2] > 0;
    if !fits {
        return Err(Error::shape(
            "attention",
            format!("needs q [B, H, Tq, D], k [B, H, Tk, D], v [B, H, Tk, Dv] with Tk > 0; got {}", describe()),
        ));
    }
    if let Some(m) = mask {
        if m.shape() != [ks[0], ks[2]] {
            return Err(Error::shape(
                "attention",
                format!("mask must be [B, Tk] = [{}, {}]; got {}", ks[0], ks[2], describe()),
            ));
        }
    }
    Ok(())
}

/// One operand of [`attention_heads_inference`]: the `width` columns from `offset` of every row of
/// a `[B, T, C]` tensor, `heads` blocks of `width / heads` columns (a fused QKV projection gives
/// all three operands from one tensor).
#[derive(Clone, Copy)]
pub struct HeadColumns<'a> {
    pub tensor: &'a Tensor,
    pub offset: usize,
    pub width: usize,
}

impl HeadColumns<'_> {
    fn check(&self, name: &str, batch: usize, heads: usize) -> Result<(usize, usize)> {
        let t = self.tensor;
        let fits = t.rank() == 3
            && t.dim(0) == batch
            && self.width.is_multiple_of(heads)
            && self.offset + self.width <= t.dim(2)
            && matches!(t.device(), Device::Cpu);
        if !fits {
            return Err(Error::shape(
                "attention",
                format!(
                    "{name}: columns {}..{} of a CPU [B = {batch}, T, C] tensor in {heads} heads, got shape {:?} on {}",
                    self.offset,
                    self.offset + self.width,
                    t.shape(),
                    t.device().name()
                ),
            ));
        }
        Ok((t.dim(1), t.dim(2)))
    }
}

/// Queries per task of [`attention_heads_inference`]: a task's score block (these queries by
/// every key of one head) stays in L2, and one image's queries still make several tasks.
const QUERIES_PER_TASK: usize = 64;

/// `softmax(scale q k^T + mask) v` for every batch item and head, untracked, on the CPU: what
/// [`scaled_dot_product_attention`] computes between `split_heads` and `merge_heads`, without
/// their copies or the `[B, H, Tq, Tk]` scores and probabilities. q, k and v are column blocks
/// of `[B, T, C]` tensors; the result is `[B, Tq, v.width]`, heads side by side. `mask` is an
/// additive key mask `[B, Tk]`.
///
/// A task takes a block of queries of one batch item through every head: per head, the scores
/// (one product), the masked softmax of each row (the same row function as `softmax_last`) and
/// the weighted values (a second product), written straight into the output's head columns.
/// Blocks depend on Tq alone, so a row's result does not depend on the batch or thread count.
pub fn attention_heads_inference(
    q: HeadColumns,
    k: HeadColumns,
    v: HeadColumns,
    heads: usize,
    mask: Option<&Tensor>,
    scale: f32,
) -> Result<Tensor> {
    let batch = q.tensor.dim(0);
    if heads == 0 || q.width != k.width {
        return Err(Error::shape(
            "attention",
            format!("needs at least one head and as many query as key columns ({} vs {})", q.width, k.width),
        ));
    }
    let (tq, q_stride) = q.check("q", batch, heads)?;
    let (tk, k_stride) = k.check("k", batch, heads)?;
    let (tv, v_stride) = v.check("v", batch, heads)?;
    if tk != tv || tk == 0 {
        return Err(Error::shape("attention", format!("k has {tk} tokens and v {tv}: they must match and be > 0")));
    }
    let mask = match mask {
        Some(m) if m.shape() != [batch, tk] || !matches!(m.device(), Device::Cpu) => {
            return Err(Error::shape(
                "attention",
                format!("mask must be a CPU [B, Tk] = [{batch}, {tk}], got {:?}", m.shape()),
            ))
        }
        Some(m) => Some(m.cpu_data("attention")?),
        None => None,
    };
    let (d, dv) = (q.width / heads, v.width / heads);
    let (qs, ks, vs) =
        (q.tensor.cpu_data("attention")?, k.tensor.cpu_data("attention")?, v.tensor.cpu_data("attention")?);
    super::flops::count_matrix_product(2 * batch * heads, tq, d, tk);
    let mut out = crate::tensor::host_buffer(batch * tq * v.width);
    let blocks_per_item = tq.div_ceil(QUERIES_PER_TASK).max(1);
    let block_rows = tq.div_ceil(blocks_per_item).max(1);
    let item_len = tq * v.width;
    let tasks: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut(item_len.max(1))
        .enumerate()
        .flat_map(|(b, item)| {
            item.chunks_mut(block_rows * v.width).enumerate().map(move |(j, o)| (b, j * block_rows, o))
        })
        .collect();
    tasks.into_par_iter().for_each(|(b, first, out_block)| {
        let rows = out_block.len() / v.width;
        let mut scores = vec![0.0f32; rows * tk];
        for h in 0..heads {
            let queries = MatrixView {
                data: &qs[(b * tq + first) * q_stride + q.offset + h * d..],
                rows,
                cols: d,
                row_stride: q_stride,
                col_stride: 1,
            };
            // k^T: element (c, j) is key j's column c.
            let keys_t = MatrixView {
                data: &ks[b * tk * k_stride + k.offset + h * d..],
                rows: d,
                cols: tk,
                row_stride: 1,
                col_stride: k_stride,
            };
            cpu_gemm_views(queries, keys_t, &mut scores, tk, scale);
            for row in scores.chunks_mut(tk) {
                if let Some(m) = mask {
                    row.iter_mut().zip(&m[b * tk..][..tk]).for_each(|(s, a)| *s += a);
                }
                softmax_row_in_place(row);
            }
            let probabilities = MatrixView { data: &scores, rows, cols: tk, row_stride: tk, col_stride: 1 };
            let values = MatrixView {
                data: &vs[b * tk * v_stride + v.offset + h * dv..],
                rows: tk,
                cols: dv,
                row_stride: v_stride,
                col_stride: 1,
            };
            cpu_gemm_views(probabilities, values, &mut out_block[h * dv..], v.width, 1.0);
        }
    });
    Tensor::from_vec(out, &[batch, tq, v.width])
}
