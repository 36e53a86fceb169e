//! Building blocks shared by the towers, the adapters and the decoder: loading parameters by
//! official key, linear layers, layer norms and multi-head attention.

use crate::device::Device;
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::weights::WeightStore;
use crate::ops;
use crate::tape::Tape;
use crate::tensor::Tensor;

/// One parameter of the model under its official key. The layer that uses it is its only owner,
/// so an optimiser can update it in place between steps ([`Tensor::storage_mut`]).
pub struct Param {
    pub key: String,
    pub value: Tensor,
}

/// Takes parameters out of a [`WeightStore`] by key, moves them to the device, and marks as
/// trainable exactly those the config's `trainable` list names.
pub struct Loader<'a> {
    store: &'a mut WeightStore,
    device: Device,
    config: &'a ModelConfig,
}

impl<'a> Loader<'a> {
    pub fn new(store: &'a mut WeightStore, config: &'a ModelConfig, device: &Device) -> Loader<'a> {
        Loader { store, device: device.clone(), config }
    }

    /// The parameter `key`, checked to have `shape`; trainable when the config says so.
    pub fn param(&mut self, key: &str, shape: &[usize]) -> Result<Param> {
        let value = self.store.take(key, shape, &self.device)?;
        // A tensor handed over from another model may still be marked trainable: the config
        // alone decides.
        let value = value.with_needs_grad(self.config.is_trainable(key));
        Ok(Param { key: key.to_string(), value })
    }

    /// The state `key` (batch norm's running statistics), checked to have `shape`; saved with the
    /// parameters but never trained, whatever the config's `trainable` list says.
    pub fn buffer(&mut self, key: &str, shape: &[usize]) -> Result<Param> {
        let value = self.store.take(key, shape, &self.device)?.with_needs_grad(false);
        Ok(Param { key: key.to_string(), value })
    }
}

/// `y = x W^T (+ b)` with PyTorch's `[out, in]` weight layout.
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    /// The weight in the CPU GEMM's panels once [`Linear::store_in_panels`] ran; `weight.value`
    /// then holds the same storage (`[panels, in, 64]`), not a second copy.
    panels: Option<ops::PanelWeight>,
}

impl Linear {
    pub fn new(weight: Param, bias: Option<Param>) -> Linear {
        Linear { weight, bias, panels: None }
    }

    pub fn load(l: &mut Loader, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = l.param(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias { Some(l.param(&format!("{prefix}.bias"), &[out])?) } else { None };
        Ok(Linear::new(weight, bias))
    }

    pub fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(|b| &b.value);
        match &self.panels {
            Some(panels) => ops::linear_panels(tape, x, panels, bias),
            None => ops::linear(tape, x, &self.weight.value, bias),
        }
    }

    /// Stores a frozen CPU weight in panels (`ops::PanelWeight`), for inference; a trainable or
    /// GPU weight stays as it is. Returns whether it moved.
    pub fn store_in_panels(&mut self) -> Result<bool> {
        if self.panels.is_some() || self.weight.value.needs_grad() {
            return Ok(self.panels.is_some());
        }
        let Some(panels) = ops::PanelWeight::pack(&self.weight.value)? else { return Ok(false) };
        self.weight.value = panels.tensor().clone();
        self.panels = Some(panels);
        Ok(true)
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        std::iter::once(&mut self.weight).chain(self.bias.as_mut()).collect()
    }
}

/// LayerNorm over the last dimension.
pub struct Norm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f32,
}

impl Norm {
    pub fn load(l: &mut Loader, prefix: &str, width: usize, eps: f32) -> Result<Norm> {
        Ok(Norm {
            weight: l.param(&format!("{prefix}.weight"), &[width])?,
            bias: l.param(&format!("{prefix}.bias"), &[width])?,
            eps,
        })
    }

    pub fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(tape, x, &self.weight.value, &self.bias.value, self.eps)
    }

    /// `(x + residual, LayerNorm(x + residual))` in one kernel.
    pub fn add_forward(&self, tape: &Tape, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        ops::add_layer_norm(tape, x, residual, &self.weight.value, &self.bias.value, self.eps)
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        vec![&mut self.weight, &mut self.bias]
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
/// values, with an optional additive key mask `[B, Tk]` and optional dropout of the attention
/// probabilities. Returns `[B, Tq, W]` before the output projection.
pub fn multi_head_attention(
    tape: &Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<&Tensor>,
    dropout: Option<(f32, ops::DropoutKey)>,
) -> Result<Tensor> {
    let scale = 1.0 / ((q.dim(-1) / heads) as f32).sqrt();
    if takes_inference_attention(tape, &[q, k, v], dropout.is_some()) {
        let columns = |t| ops::HeadColumns { tensor: t, offset: 0, width: t.dim(-1) };
        return ops::attention_heads_inference(columns(q), columns(k), columns(v), heads, key_mask, scale);
    }
    let (q, k, v) = (split_heads(tape, q, heads)?, split_heads(tape, k, heads)?, split_heads(tape, v, heads)?);
    let o = ops::scaled_dot_product_attention_with_dropout(tape, &q, &k, &v, key_mask, scale, dropout)?;
    merge_heads(tape, &o)
}

/// [`multi_head_attention`] of the queries, keys and values a fused `[B, T, 3W]` projection
/// wrote side by side (`nn.MultiheadAttention`'s `in_proj`), without a key mask or dropout.
pub fn multi_head_self_attention(tape: &Tape, qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let w = qkv.dim(-1) / 3;
    if takes_inference_attention(tape, &[qkv], false) {
        let columns = |i: usize| ops::HeadColumns { tensor: qkv, offset: i * w, width: w };
        let scale = 1.0 / ((w / heads) as f32).sqrt();
        return ops::attention_heads_inference(columns(0), columns(1), columns(2), heads, None, scale);
    }
    let q = ops::narrow(tape, qkv, 2, 0, w)?;
    let k = ops::narrow(tape, qkv, 2, w, w)?;
    let v = ops::narrow(tape, qkv, 2, 2 * w, w)?;
    multi_head_attention(tape, &q, &k, &v, heads, None, None)
}

/// Whether attention takes the fused CPU inference op ([`ops::attention_heads_inference`]): every
/// operand on the CPU, no dropout, and no gradient wanted of them (the op records nothing). The
/// GPU and training keep the composed op, whose backward the tape knows.
fn takes_inference_attention(tape: &Tape, operands: &[&Tensor], dropout: bool) -> bool {
    let wants_gradient = tape.is_recording() && operands.iter().any(|t| t.needs_grad());
    !dropout && !wants_gradient && operands.iter().all(|t| matches!(t.device(), Device::Cpu))
}

/// `n` copies of `x` stacked along the batch (first) dimension: `[B, ...]` -> `[n*B, ...]`.
pub fn repeat_batch(tape: &Tape, x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    ops::repeat_batch(tape, x, n)
}
