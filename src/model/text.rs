//! The BiomedBERT text tower (docs/model.md §1.2) with Hugging Face `BertModel` semantics: word + token
//! type + position embeddings and LayerNorm, post-LN layers with exact-erf GELU, an additive pad
//! mask on keys, and the projected `[CLS]` token as the text embedding.

use super::config::ModelConfig;
use super::layers::{multi_head_attention, Linear, Loader, Norm, Param};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops;
use crate::tape::Tape;
use crate::tensor::Tensor;

pub struct TextTower {
    context: usize,
    width: usize,
    pad_id: u32,
    word_embeddings: Param,
    position_embeddings: Param,
    token_type_embeddings: Param,
    embeddings_norm: Norm,
    pub layers: Vec<BertLayer>,
    proj_hidden: Param,
    proj_out: Param,
}

pub struct BertLayer {
    heads: usize,
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
}

const PREFIX: &str = "text_model.transformer";

/// Training-mode dropout of the text tower (HF `BertModel` in `train()`, docs/model.md §1.3): on the
/// embeddings, the attention probabilities, and both sub-layer outputs before their residual
/// LayerNorm. Masks are Philox draws keyed by the training step, so a step is reproducible and
/// the backward regenerates them instead of storing them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TextDropout {
    pub p: f32,
    pub seed: u64,
    pub step: u64,
}

/// Where in the tower a dropout mask is drawn (part of its Philox stream).
#[derive(Clone, Copy)]
enum DropoutSite {
    Embeddings = 0,
    AttentionProbabilities = 1,
    AttentionOutput = 2,
    FeedForwardOutput = 3,
}

impl TextDropout {
    fn key(&self, layer: usize, site: DropoutSite) -> ops::DropoutKey {
        ops::DropoutKey { seed: self.seed, stream: ops::dropout_stream_id(self.step, layer as u32, site as u32) }
    }

    fn apply(&self, tape: &Tape, x: &Tensor, layer: usize, site: DropoutSite) -> Result<Tensor> {
        ops::dropout(tape, x, self.p, self.key(layer, site))
    }
}

fn maybe_dropout(
    tape: &Tape,
    x: Tensor,
    dropout: Option<&TextDropout>,
    layer: usize,
    site: DropoutSite,
) -> Result<Tensor> {
    match dropout {
        Some(d) => d.apply(tape, &x, layer, site),
        None => Ok(x),
    }
}

impl TextTower {
    pub fn load(l: &mut Loader, c: &ModelConfig) -> Result<TextTower> {
        let (w, eps) = (c.text_width, c.text_ln_eps);
        let layers = (0..c.text_layers)
            .map(|i| {
                let p = format!("{PREFIX}.encoder.layer.{i}");
                Ok(BertLayer {
                    heads: c.text_heads,
                    query: Linear::load(l, &format!("{p}.attention.self.query"), w, w, true)?,
                    key: Linear::load(l, &format!("{p}.attention.self.key"), w, w, true)?,
                    value: Linear::load(l, &format!("{p}.attention.self.value"), w, w, true)?,
                    attention_out: Linear::load(l, &format!("{p}.attention.output.dense"), w, w, true)?,
                    attention_norm: Norm::load(l, &format!("{p}.attention.output.LayerNorm"), w, eps)?,
                    intermediate: Linear::load(
                        l,
                        &format!("{p}.intermediate.dense"),
                        c.text_intermediate_dim,
                        w,
                        true,
                    )?,
                    output: Linear::load(l, &format!("{p}.output.dense"), w, c.text_intermediate_dim, true)?,
                    output_norm: Norm::load(l, &format!("{p}.output.LayerNorm"), w, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TextTower {
            context: c.text_context_length,
            width: w,
            pad_id: c.text_pad_id,
            word_embeddings: l
                .param(&format!("{PREFIX}.embeddings.word_embeddings.weight"), &[c.text_vocab_size, w])?,
            position_embeddings: l
                .param(&format!("{PREFIX}.embeddings.position_embeddings.weight"), &[c.text_max_positions, w])?,
            token_type_embeddings: l
                .param(&format!("{PREFIX}.embeddings.token_type_embeddings.weight"), &[c.text_type_vocab_size, w])?,
            embeddings_norm: Norm::load(l, &format!("{PREFIX}.embeddings.LayerNorm"), w, eps)?,
            layers,
            proj_hidden: l.param("text_model.proj.0.weight", &[c.text_proj_hidden, w])?,
            proj_out: l.param("text_model.proj.2.weight", &[c.embed_dim, c.text_proj_hidden])?,
        })
    }

    /// Checks token ids `[B * context]` against the vocabulary and context length.
    pub fn check_ids(&self, ids: &[u32], batch: usize) -> Result<()> {
        if ids.len() != batch * self.context {
            return Err(Error::shape(
                "text tower",
                format!("{} token ids for a batch of {batch} at context length {}", ids.len(), self.context),
            ));
        }
        let vocab = self.word_embeddings.value.dim(0);
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!("token id {bad} is outside the vocabulary of {vocab} entries")));
        }
        Ok(())
    }

    /// `[B, L, width]` embeddings after LayerNorm (and dropout when training):
    /// `(word + token_type[0]) + position`, HF order.
    pub fn embed(&self, tape: &Tape, ids: &[u32], batch: usize, dropout: Option<&TextDropout>) -> Result<Tensor> {
        self.check_ids(ids, batch)?;
        let words = ops::index_select_rows(tape, &self.word_embeddings.value, ids)?;
        let words = ops::reshape(tape, &words, &[batch, self.context, self.width])?;
        let token_type = ops::narrow(tape, &self.token_type_embeddings.value, 0, 0, 1)?;
        let positions = ops::narrow(tape, &self.position_embeddings.value, 0, 0, self.context)?;
        let x = ops::add(tape, &words, &token_type)?;
        let x = ops::add(tape, &x, &positions)?;
        let x = self.embeddings_norm.forward(tape, &x)?;
        maybe_dropout(tape, x, dropout, 0, DropoutSite::Embeddings)
    }

    /// Additive key mask `[B, L]`: 0 for tokens, the most negative f32 for padding (HF's
    /// `(1 - mask) * finfo(float32).min`).
    pub fn pad_mask(&self, ids: &[u32], batch: usize, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = ids.iter().map(|&id| if id == self.pad_id { f32::MIN } else { 0.0 }).collect();
        Tensor::from_slice(&mask, &[batch, self.context], device)
    }

    /// Projected `[CLS]` token: `[B, L, width]` -> `[B, embed]` (not normalised).
    pub fn pool(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        let cls = ops::narrow(tape, x, 1, 0, 1)?;
        let cls = ops::reshape(tape, &cls, &[x.dim(0), self.width])?;
        let h = ops::linear(tape, &cls, &self.proj_hidden.value, None)?;
        let h = ops::gelu(tape, &h)?;
        ops::linear(tape, &h, &self.proj_out.value, None)
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut all = vec![&mut self.word_embeddings, &mut self.position_embeddings, &mut self.token_type_embeddings];
        all.extend(self.embeddings_norm.params_mut());
        for layer in &mut self.layers {
            all.extend(layer.params_mut());
        }
        all.push(&mut self.proj_hidden);
        all.push(&mut self.proj_out);
        all
    }
}

impl BertLayer {
    /// The layer's projections (what inference stores in panels).
    pub fn linears_mut(&mut self) -> [&mut Linear; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attention_out,
            &mut self.intermediate,
            &mut self.output,
        ]
    }

    /// Post-LN: `x1 = LN(x + Attn(x))`, `x2 = LN(x1 + FFN(x1))`, with HF's training-mode
    /// dropout when `dropout` is given (layer `index` keys its masks).
    pub fn forward(
        &self,
        tape: &Tape,
        x: &Tensor,
        key_mask: &Tensor,
        dropout: Option<&TextDropout>,
        index: usize,
    ) -> Result<Tensor> {
        let q = self.query.forward(tape, x)?;
        let k = self.key.forward(tape, x)?;
        let v = self.value.forward(tape, x)?;
        let probability_dropout = dropout.map(|d| (d.p, d.key(index, DropoutSite::AttentionProbabilities)));
        let attn = multi_head_attention(tape, &q, &k, &v, self.heads, Some(key_mask), probability_dropout)?;
        let attn = self.attention_out.forward(tape, &attn)?;
        let attn = maybe_dropout(tape, attn, dropout, index, DropoutSite::AttentionOutput)?;
        let (_, x1) = self.attention_norm.add_forward(tape, &attn, x)?;
        let h = self.intermediate.forward(tape, &x1)?;
        let h = ops::gelu(tape, &h)?;
        let h = self.output.forward(tape, &h)?;
        let h = maybe_dropout(tape, h, dropout, index, DropoutSite::FeedForwardOutput)?;
        let (_, x2) = self.output_norm.add_forward(tape, &h, &x1)?;
        Ok(x2)
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut all = Vec::new();
        for linear in [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attention_out,
            &mut self.intermediate,
            &mut self.output,
        ] {
            all.extend(linear.params_mut());
        }
        all.extend(self.attention_norm.params_mut());
        all.extend(self.output_norm.params_mut());
        all
    }
}
