//! Building blocks shared by the towers, the adapters and the decoder: loading parameters by
//! official key, linear layers, layer norms and multi-head attention.

use std::collections::BTreeMap;

use crate::device::Device;
use crate::error::Result;
use crate::model::weights::WeightStore;
use crate::ops;
use crate::tape::Tape;
use crate::tensor::Tensor;

/// Takes parameters out of a [`WeightStore`] by key, moves them to the device, marks the
/// trainable ones, and remembers every parameter under its key (for saving and optimisers).
pub struct Loader<'a> {
    store: &'a mut WeightStore,
    device: Device,
    params: BTreeMap<String, Tensor>,
}

impl<'a> Loader<'a> {
    pub fn new(store: &'a mut WeightStore, device: &Device) -> Loader<'a> {
        Loader { store, device: device.clone(), params: BTreeMap::new() }
    }

    /// A frozen parameter (no gradient).
    pub fn frozen(&mut self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.store.take(key, shape, &self.device)?;
        self.params.insert(key.to_string(), t.clone());
        Ok(t)
    }

    /// A trainable parameter (the tape produces its gradient).
    pub fn trainable(&mut self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.store.take(key, shape, &self.device)?.into_trainable();
        self.params.insert(key.to_string(), t.clone());
        Ok(t)
    }

    pub fn param(&mut self, key: &str, shape: &[usize], trainable: bool) -> Result<Tensor> {
        if trainable {
            self.trainable(key, shape)
        } else {
            self.frozen(key, shape)
        }
    }

    pub fn into_params(self) -> BTreeMap<String, Tensor> {
        self.params
    }
}

/// `y = x W^T (+ b)` with PyTorch's `[out, in]` weight layout.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(l: &mut Loader, prefix: &str, out: usize, inp: usize, bias: bool, trainable: bool) -> Result<Linear> {
        let weight = l.param(&format!("{prefix}.weight"), &[out, inp], trainable)?;
        let bias = if bias { Some(l.param(&format!("{prefix}.bias"), &[out], trainable)?) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        ops::linear(tape, x, &self.weight, self.bias.as_ref())
    }
}

/// LayerNorm over the last dimension.
pub struct Norm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl Norm {
    pub fn load(l: &mut Loader, prefix: &str, width: usize, eps: f32, trainable: bool) -> Result<Norm> {
        Ok(Norm {
            weight: l.param(&format!("{prefix}.weight"), &[width], trainable)?,
            bias: l.param(&format!("{prefix}.bias"), &[width], trainable)?,
            eps,
        })
    }

    pub fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(tape, x, &self.weight, &self.bias, self.eps)
    }

    /// `(x + residual, LayerNorm(x + residual))` in one kernel.
    pub fn add_forward(&self, tape: &Tape, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        ops::add_layer_norm(tape, x, residual, &self.weight, &self.bias, self.eps)
    }
}

/// `[B, T, H*D]` -> `[B, H, T, D]`.
pub fn split_heads(tape: &Tape, x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, w) = (x.dim(0), x.dim(1), x.dim(2));
    let x = ops::reshape(tape, x, &[b, t, heads, w / heads])?;
    ops::permute(tape, &x, &[0, 2, 1, 3])
}

/// `[B, H, T, D]` -> `[B, T, H*D]`.
pub fn merge_heads(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let x = ops::permute(tape, x, &[0, 2, 1, 3])?;
    ops::reshape(tape, &x, &[b, t, h * d])
}

/// Multi-head scaled dot-product attention over already projected `[B, T, W]` queries, keys and
/// values, with an optional additive key mask `[B, Tk]`. Returns `[B, Tq, W]` before the output
/// projection.
pub fn multi_head_attention(
    tape: &Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let head_dim = q.dim(-1) / heads;
    let (q, k, v) = (split_heads(tape, q, heads)?, split_heads(tape, k, heads)?, split_heads(tape, v, heads)?);
    let o = ops::scaled_dot_product_attention(tape, &q, &k, &v, key_mask, 1.0 / (head_dim as f32).sqrt())?;
    merge_heads(tape, &o)
}

/// `n` copies of `x` stacked along the batch (first) dimension: `[B, ...]` -> `[n*B, ...]`.
pub fn repeat_batch(tape: &Tape, x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    ops::repeat_batch(tape, x, n)
}
