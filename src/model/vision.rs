//! The CLIP ViT image tower (docs/model.md §1.1): patch embedding, class token, positional embedding,
//! `ln_pre`, pre-LN blocks with QuickGELU MLPs, and `ln_post` + `proj` applied to every token.

use super::config::ModelConfig;
use super::layers::{multi_head_self_attention, Linear, Loader, Norm, Param};
use crate::error::Result;
use crate::ops;
use crate::tape::Tape;
use crate::tensor::Tensor;

pub struct VisionTower {
    patch: usize,
    width: usize,
    /// `conv1.weight` `[W, 3, P, P]`, used as `[W, 3*P*P]`: a stride-P conv is a GEMM on patches.
    conv1: Param,
    class_embedding: Param,
    positional_embedding: Param,
    ln_pre: Norm,
    pub blocks: Vec<VisionBlock>,
    ln_post: Norm,
    proj: Param,
}

pub struct VisionBlock {
    heads: usize,
    /// Packed `[3W, W]` query/key/value projection of `nn.MultiheadAttention`.
    in_proj: Linear,
    out_proj: Linear,
    ln_1: Norm,
    ln_2: Norm,
    c_fc: Linear,
    c_proj: Linear,
}

impl VisionTower {
    pub fn load(l: &mut Loader, c: &ModelConfig) -> Result<VisionTower> {
        let (w, p, eps) = (c.vision_width, c.patch_size, c.vision_ln_eps);
        let conv1 = l.param("vision_model.conv1.weight", &[w, 3, p, p])?;
        let blocks = (0..c.vision_layers)
            .map(|i| {
                let prefix = format!("vision_model.transformer.resblocks.{i}");
                Ok(VisionBlock {
                    heads: c.vision_heads,
                    in_proj: Linear::new(
                        l.param(&format!("{prefix}.attn.in_proj_weight"), &[3 * w, w])?,
                        Some(l.param(&format!("{prefix}.attn.in_proj_bias"), &[3 * w])?),
                    ),
                    out_proj: Linear::load(l, &format!("{prefix}.attn.out_proj"), w, w, true)?,
                    ln_1: Norm::load(l, &format!("{prefix}.ln_1"), w, eps)?,
                    ln_2: Norm::load(l, &format!("{prefix}.ln_2"), w, eps)?,
                    c_fc: Linear::load(l, &format!("{prefix}.mlp.c_fc"), c.vision_mlp_dim, w, true)?,
                    c_proj: Linear::load(l, &format!("{prefix}.mlp.c_proj"), w, c.vision_mlp_dim, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTower {
            patch: p,
            width: w,
            conv1,
            class_embedding: l.param("vision_model.class_embedding", &[w])?,
            positional_embedding: l.param("vision_model.positional_embedding", &[c.vision_tokens(), w])?,
            ln_pre: Norm::load(l, "vision_model.ln_pre", w, eps)?,
            blocks,
            ln_post: Norm::load(l, "vision_model.ln_post", w, eps)?,
            proj: l.param("vision_model.proj", &[w, c.embed_dim])?,
        })
    }

    /// `[B, 3, H, W]` normalised pixels -> `[B, 1 + patches, width]` tokens after `ln_pre`.
    pub fn embed(&self, tape: &Tape, pixels: &Tensor) -> Result<Tensor> {
        let (b, p, w) = (pixels.dim(0), self.patch, self.width);
        let g = pixels.dim(2) / p;
        let x = ops::reshape(tape, pixels, &[b, 3, g, p, g, p])?;
        let x = ops::permute(tape, &x, &[0, 2, 4, 1, 3, 5])?; // [B, g, g, 3, P, P]
        let x = ops::reshape(tape, &x, &[b * g * g, 3 * p * p])?;
        let patch_weight = ops::reshape(tape, &self.conv1.value, &[w, 3 * p * p])?;
        let x = ops::linear(tape, &x, &patch_weight, None)?;
        let x = ops::reshape(tape, &x, &[b, g * g, w])?;
        let class = ops::reshape(tape, &self.class_embedding.value, &[1, 1, w])?;
        let classes: Vec<&Tensor> = std::iter::repeat_n(&class, b).collect();
        let class = ops::concat(tape, &classes, 0)?;
        let x = ops::concat(tape, &[&class, &x], 1)?;
        let x = ops::add(tape, &x, &self.positional_embedding.value)?;
        self.ln_pre.forward(tape, &x)
    }

    /// Final tokens `[B, T, width]` -> image tokens `[B, T, embed]` (`ln_post` and `proj` on all).
    pub fn project(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        let x = self.ln_post.forward(tape, x)?;
        ops::matmul(tape, &x, &self.proj.value)
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut all = vec![&mut self.conv1, &mut self.class_embedding, &mut self.positional_embedding];
        all.extend(self.ln_pre.params_mut());
        for block in &mut self.blocks {
            all.extend(block.params_mut());
        }
        all.extend(self.ln_post.params_mut());
        all.push(&mut self.proj);
        all
    }
}

impl VisionBlock {
    /// The block's projections (what inference stores in panels).
    pub fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [&mut self.in_proj, &mut self.out_proj, &mut self.c_fc, &mut self.c_proj]
    }

    /// `x + Attn(LN1(x))`, then `+ MLP(LN2(.))` with QuickGELU.
    pub fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        let h = self.ln_1.forward(tape, x)?;
        let qkv = self.in_proj.forward(tape, &h)?;
        let attn = multi_head_self_attention(tape, &qkv, self.heads)?;
        let attn = self.out_proj.forward(tape, &attn)?;
        let (x, h) = self.ln_2.add_forward(tape, x, &attn)?;
        // The MLP's hidden activations are moved into each next op (dropped as soon as it is
        // done, see decoder::ScaleBlock::forward): the largest tensors of an inference block.
        let m = self.c_fc.forward(tape, &{ h })?;
        let m = ops::quick_gelu(tape, &{ m })?;
        let m = self.c_proj.forward(tape, &{ m })?;
        ops::add(tape, &x, &m)
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut all = self.in_proj.params_mut();
        all.extend(self.out_proj.params_mut());
        all.extend(self.ln_1.params_mut());
        all.extend(self.ln_2.params_mut());
        all.extend(self.c_fc.params_mut());
        all.extend(self.c_proj.params_mut());
        all
    }
}
