//! Scaled dot-product attention composed from batched GEMMs and the masked row softmax; its
//! gradient comes from theirs. Tests: `tests/attention.rs`.

use super::matmul::{matmul, matmul_with, MatmulOpts};
use super::softmax::softmax_last;
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
    check_shapes(q, k, v, mask)?;
    let scores = matmul_with(tape, q, k, MatmulOpts { transpose_b: true, alpha: scale, ..MatmulOpts::default() })?;
    // Scores rows are laid out [B, H * Tq] x Tk, so a [B, Tk] mask row covers H * Tq
    // consecutive rows: exactly softmax_last's grouped mask.
    let probabilities = softmax_last(tape, &scores, mask)?;
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
