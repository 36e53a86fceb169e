//! The segmentation decoder (docs/model.md §3), run channels-last (NHWC): normalised patch tokens are
//! upscaled by ScaleBlocks (2x2 stride-2 transposed conv, GELU, depthwise 3x3 conv,
//! LayerNorm2d as a last-dim LayerNorm), the normalised text embedding goes through the MLP mask
//! head, their per-pixel dot product gives low-resolution logits, bilinearly resized to the image.

use super::config::ModelConfig;
use super::layers::{Linear, Loader, Norm, Param};
use crate::error::Result;
use crate::ops;
use crate::tape::Tape;
use crate::tensor::Tensor;

pub struct Decoder {
    grid: usize,
    image_size: usize,
    embed: usize,
    upscale: Vec<ScaleBlock>,
    mask_head: [Linear; 3],
}

pub struct ScaleBlock {
    /// `ConvTranspose2d(E, E, 2, stride=2)` weight `[in, out, 2, 2]` and bias.
    up_weight: Param,
    up_bias: Param,
    depthwise: Param,
    norm: Norm,
}

/// The decoder's outputs, with the intermediates the parity fixtures record.
pub struct DecoderOutput {
    /// `[B, S, S, E]` upscaled patch features (NHWC).
    pub features: Tensor,
    /// `[B, E]` mask-head query.
    pub query: Tensor,
    /// `[B, 1, S, S]`.
    pub logits_lowres: Tensor,
    /// `[B, H, W]`.
    pub logits: Tensor,
}

impl Decoder {
    pub fn load(l: &mut Loader, c: &ModelConfig) -> Result<Decoder> {
        let e = c.embed_dim;
        let upscale = (0..c.num_upscale)
            .map(|i| {
                let p = format!("upscale.{i}");
                Ok(ScaleBlock {
                    up_weight: l.param(&format!("{p}.conv1.weight"), &[e, e, 2, 2])?,
                    up_bias: l.param(&format!("{p}.conv1.bias"), &[e])?,
                    depthwise: l.param(&format!("{p}.conv2.weight"), &[e, 1, 3, 3])?,
                    norm: Norm::load(l, &format!("{p}.norm"), e, c.decoder_ln_eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = |l: &mut Loader, i: usize| Linear::load(l, &format!("mask_head.{i}"), e, e, true);
        Ok(Decoder {
            grid: c.grid(),
            image_size: c.image_size,
            embed: e,
            upscale,
            mask_head: [head(l, 0)?, head(l, 2)?, head(l, 4)?],
        })
    }

    /// Image tokens `[B, 1 + g*g, E]` and text embedding `[B, E]` -> logits.
    pub fn forward(&self, tape: &Tape, image_tokens: &Tensor, text_embedding: &Tensor) -> Result<DecoderOutput> {
        let (b, g, e) = (image_tokens.dim(0), self.grid, self.embed);
        let patches = ops::narrow(tape, image_tokens, 1, 1, g * g)?;
        let patches = ops::l2_normalize_last(tape, &patches)?;
        let mut features = ops::reshape(tape, &patches, &[b, g, g, e])?;
        for block in &self.upscale {
            features = block.forward(tape, &features)?;
        }
        let side = features.dim(1);

        let mut query = ops::l2_normalize_last(tape, text_embedding)?;
        for (i, layer) in self.mask_head.iter().enumerate() {
            query = layer.forward(tape, &query)?;
            if i < 2 {
                query = ops::gelu(tape, &query)?;
            }
        }

        let flat = ops::reshape(tape, &features, &[b, side * side, e])?;
        let column = ops::reshape(tape, &query, &[b, e, 1])?;
        let logits_lowres = ops::reshape(tape, &ops::matmul(tape, &flat, &column)?, &[b, 1, side, side])?;
        let logits = ops::resize_bilinear_nchw(tape, &logits_lowres, self.image_size, self.image_size)?;
        let logits = ops::reshape(tape, &logits, &[b, self.image_size, self.image_size])?;
        Ok(DecoderOutput { features, query, logits_lowres, logits })
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut all = Vec::new();
        for block in &mut self.upscale {
            all.extend([&mut block.up_weight, &mut block.up_bias, &mut block.depthwise]);
            all.extend(block.norm.params_mut());
        }
        for layer in &mut self.mask_head {
            all.extend(layer.params_mut());
        }
        all
    }
}

impl ScaleBlock {
    /// `[B, h, w, E]` -> `[B, 2h, 2w, E]`.
    fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        // Each step takes the previous activation by value (`&{ y }` moves it into a temporary
        // dropped at the end of the statement): a shadowed `let y` would stay alive to the end of
        // the function, and at 30 samples of the paper config every one of these is 184 MiB.
        // In training the tape keeps what its backward needs either way.
        let y = ops::conv_transpose2x2_nhwc(tape, x, &self.up_weight.value, Some(&self.up_bias.value))?;
        let y = ops::gelu(tape, &{ y })?;
        let y = ops::depthwise_conv3x3_nhwc(tape, &{ y }, &self.depthwise.value)?;
        self.norm.forward(tape, &{ y })
    }
}
