//! The two towers on their own, as a CLIP model: no adapters, no decoder. MedCLIP-SAMv2 fine-tunes
//! them on image-caption pairs and reads saliency from them; both need the image and text
//! embeddings, and the saliency needs the vision tower split at a block.
//!
//! The image embedding is the class token after `ln_post` and `proj` (what the decoder's tokens
//! hold at position 0); the text embedding is the text tower's pooled projection, the one
//! MedCLIPSeg's decoder uses. Neither is normalised here.

use super::MedClipSeg;
use crate::error::{Error, Result};
use crate::ops;
use crate::tape::Tape;
use crate::tensor::Tensor;

impl MedClipSeg {
    fn check_pixels(&self, pixels: &Tensor) -> Result<()> {
        let size = self.config.image_size;
        if pixels.rank() != 4 || pixels.dim(1) != 3 || pixels.dim(2) != size || pixels.dim(3) != size {
            return Err(Error::shape(
                "CLIP towers",
                format!("pixels must be [B, 3, {size}, {size}], got {:?}", pixels.shape()),
            ));
        }
        Ok(())
    }

    /// The vision tower's tokens `[B, 1 + patches, width]` after its first `blocks` blocks
    /// (0: the embedded patches after `ln_pre`), without adapters.
    pub fn vision_tokens_after(&self, tape: &Tape, pixels: &Tensor, blocks: usize) -> Result<Tensor> {
        self.check_pixels(pixels)?;
        if blocks > self.vision.blocks.len() {
            return Err(Error::Invalid(format!(
                "the vision tower has {} blocks, not {blocks}",
                self.vision.blocks.len()
            )));
        }
        let mut x = self.vision.embed(tape, pixels)?;
        for block in &self.vision.blocks[..blocks] {
            x = block.forward(tape, &{ x })?;
        }
        Ok(x)
    }

    /// The image embedding `[B, embed]` from tokens that have been through the first `from`
    /// blocks: the remaining blocks, then the class token's projection.
    pub fn image_embedding_from(&self, tape: &Tape, tokens: &Tensor, from: usize) -> Result<Tensor> {
        let blocks = self.vision.blocks.get(from..).ok_or_else(|| {
            Error::Invalid(format!("the vision tower has {} blocks, not {from}", self.vision.blocks.len()))
        })?;
        let mut x = tokens.clone();
        for block in blocks {
            x = block.forward(tape, &{ x })?;
        }
        let class = ops::narrow(tape, &x, 1, 0, 1)?;
        let embedding = self.vision.project(tape, &class)?;
        ops::reshape(tape, &embedding, &[x.dim(0), self.config.embed_dim])
    }

    /// The image embedding `[B, embed]` of normalised pixels `[B, 3, S, S]`.
    pub fn image_embedding(&self, tape: &Tape, pixels: &Tensor) -> Result<Tensor> {
        let tokens = self.vision_tokens_after(tape, pixels, 0)?;
        self.image_embedding_from(tape, &tokens, 0)
    }

    /// The text embedding `[B, embed]` of `B * context` token ids, the text tower alone (no
    /// dropout).
    pub fn text_embedding(&self, tape: &Tape, ids: &[u32]) -> Result<Tensor> {
        let context = self.config.text_context_length;
        if ids.is_empty() || !ids.len().is_multiple_of(context) {
            return Err(Error::shape(
                "CLIP towers",
                format!("{} token ids are not a whole number of {context}-token prompts", ids.len()),
            ));
        }
        let batch = ids.len() / context;
        let mut x = self.text.embed(tape, ids, batch, None)?;
        let mask = self.text.pad_mask(ids, batch, &self.device)?;
        for (i, layer) in self.text.layers.iter().enumerate() {
            x = layer.forward(tape, &{ x }, &mask, None, i)?;
        }
        self.text.pool(tape, &x)
    }
}
