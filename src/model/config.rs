//! Model configurations: the paper's `unimedclip-vit-b16` and a `tiny` one with the same structure
//! for tests and the demo. The presets are the JSON files in `weights/configs/`, which the PyTorch
//! reference reads too, so both sides build the same model. A config is saved next to every
//! checkpoint.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    /// Input images are square, this many pixels a side.
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_width: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub vision_mlp_dim: usize,
    /// Width of the shared image-text embedding (the ViT `proj` output and the text projection).
    pub embed_dim: usize,
    pub text_vocab_size: usize,
    /// Every prompt is padded or truncated to this many tokens.
    pub text_context_length: usize,
    pub text_width: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub text_intermediate_dim: usize,
    pub text_max_positions: usize,
    pub text_type_vocab_size: usize,
    pub text_pad_id: u32,
    pub text_proj_hidden: usize,
    pub adapter_dim: usize,
    /// Block indices (0-based) whose *input* is modified by a PVL adapter; adapter `k` sits before
    /// block `adapter_layers[k]`.
    pub adapter_layers: Vec<usize>,
    pub beta: f32,
    pub gate_init: f32,
    pub num_upscale: usize,
    pub vision_ln_eps: f32,
    pub text_ln_eps: f32,
    pub adapter_ln_eps: f32,
    pub decoder_ln_eps: f32,
    /// Parameters whose key contains one of these strings are trained; all others are frozen
    /// (the official rule: `pvl_adapters`, `mask_head`, `upscale`). A model trained from scratch
    /// lists the towers too.
    #[serde(default = "official_trainable")]
    pub trainable: Vec<String>,
    /// How `mcs-engine train` trains this model (defaults: the official recipe, docs/model.md §4, §6).
    #[serde(default)]
    pub training: TrainRecipe,
    /// VLSM-Ensemble's CNN branch, fused with the model (docs/cnn_branch.md); absent: MedCLIPSeg
    /// alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnn_branch: Option<CnnBranchConfig>,
}

/// The CNN branch (UNet-D) of VLSM-Ensemble and how it is fused with MedCLIPSeg. Every field
/// defaults to the paper's network with the engine's defaults for the choices the paper's code
/// leaves open (docs/cnn_branch.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CnnBranchConfig {
    /// Scales every channel count of the branch (64 ... 1240, and the 128 fusion channels):
    /// `max(1, floor(n * width + 0.5))`. 1 is the paper's network.
    pub width: f64,
    /// The vision block (1-based) whose output tokens feed the feature fusion; 0 picks three
    /// quarters of the tower's depth, rounded up (9 of 12).
    pub vision_layer: usize,
    /// Runs each decoder stage's 3x3 convolution twice with the same weights, as the paper's code
    /// does (`convup4(convup4(...))`). Off by default: a checkpoint of that code needs it on.
    pub repeat_decoder_conv: bool,
    /// Dropout after each encoder stage's ReLU while training.
    pub dropout: f32,
    /// Batch norm's running-average momentum and epsilon (PyTorch's defaults).
    pub bn_momentum: f32,
    pub bn_eps: f32,
}

impl Default for CnnBranchConfig {
    fn default() -> Self {
        CnnBranchConfig {
            width: 1.0,
            vision_layer: 0,
            repeat_decoder_conv: false,
            dropout: 0.1,
            bn_momentum: 0.1,
            bn_eps: 1e-5,
        }
    }
}

/// Channel counts of the paper's UNet-D, before the width factor.
pub mod unet_d {
    /// Encoder stages.
    pub const ENCODER: [usize; 4] = [64, 128, 256, 512];
    /// The 1x1 bottleneck (`upconv41`), gated by ECA.
    pub const BOTTLENECK: usize = 1240;
    /// Decoder stages, deepest first (`upconv4` ... `upconv1`).
    pub const DECODER: [usize; 4] = [546, 182, 91, 45];
    /// The vision features concatenated into the bottleneck.
    pub const FUSION: usize = 128;
    /// Four 2x2 poolings: the image side must be a multiple of this.
    pub const DOWNSAMPLING: usize = 16;
}

impl CnnBranchConfig {
    /// `base` channels scaled by the width factor.
    pub fn channels(&self, base: usize) -> usize {
        ((base as f64 * self.width + 0.5).floor() as usize).max(1)
    }

    /// The vision block (1-based) that feeds the fusion, for a tower of `layers` blocks.
    pub fn resolved_vision_layer(&self, layers: usize) -> usize {
        if self.vision_layer == 0 {
            (3 * layers).div_ceil(4).max(1)
        } else {
            self.vision_layer
        }
    }

    /// ECA's 1-D kernel size for `channels` (ECA-Net's rule, 5 for the paper's 1240):
    /// `t = floor((log2 C + 1) / 2)`, made odd by adding one.
    pub fn eca_kernel(channels: usize) -> usize {
        let t = (((channels as f64).log2() + 1.0) / 2.0).floor() as usize;
        if t % 2 == 1 {
            t
        } else {
            t + 1
        }
    }

    /// Parameters (and batch-norm statistics) of the branch for a model with `vision_width`-wide
    /// tokens and an `embed_dim` text embedding, `None` on overflow.
    pub fn parameter_count(&self, vision_width: usize, embed_dim: usize) -> Option<u64> {
        let c = |n: usize| self.channels(n) as u64;
        let conv = |i: u64, o: u64, k: u64| i.checked_mul(o)?.checked_mul(k * k)?.checked_add(o);
        let bn = |ch: u64| ch.checked_mul(4);
        let mut total = 0u64;
        let mut add = |part: Option<u64>| -> Option<()> {
            total = total.checked_add(part?)?;
            Some(())
        };
        let mut inp = 3;
        for base in unet_d::ENCODER {
            add(conv(inp, c(base), 3))?;
            add(conv(c(base), c(base), 3))?;
            add(bn(c(base)))?;
            inp = c(base);
        }
        let fusion = c(unet_d::FUSION);
        let bottleneck = c(unet_d::BOTTLENECK);
        add(conv(fusion + inp, bottleneck, 1))?;
        add(Some(Self::eca_kernel(bottleneck as usize) as u64))?;
        let mut inp = bottleneck;
        for (k, base) in unet_d::DECODER.into_iter().enumerate() {
            add(conv(inp, c(base), 2))?;
            add(conv(c(base), c(base), 3))?;
            add(bn(c(base)))?;
            inp = c(base) + if k < 3 { c(unet_d::ENCODER[2 - k]) } else { 0 };
        }
        add(conv(inp, 1, 1))?;
        add(conv(2, 1, 1))?;
        let linear = |i: usize, o: u64| (i as u64).checked_mul(o)?.checked_add(o);
        add(linear(vision_width, fusion))?;
        add(linear(embed_dim, fusion))?;
        add(linear(embed_dim, fusion))?;
        Some(total)
    }

    fn validate(&self, image_size: usize, vision_layers: usize) -> std::result::Result<(), String> {
        if !(self.width.is_finite() && self.width > 0.0 && self.width <= 4.0) {
            return Err(format!("cnn_branch.width {} is outside (0, 4]", self.width));
        }
        if !image_size.is_multiple_of(unet_d::DOWNSAMPLING) {
            return Err(format!(
                "the CNN branch pools four times, so image_size {image_size} must be a multiple of {}",
                unet_d::DOWNSAMPLING
            ));
        }
        if self.vision_layer > vision_layers {
            return Err(format!(
                "cnn_branch.vision_layer {} is outside 1..={vision_layers} (0 picks one)",
                self.vision_layer
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("cnn_branch.dropout {} is outside [0, 1)", self.dropout));
        }
        if !(self.bn_momentum > 0.0 && self.bn_momentum <= 1.0) {
            return Err(format!("cnn_branch.bn_momentum {} is outside (0, 1]", self.bn_momentum));
        }
        if !(self.bn_eps > 0.0 && self.bn_eps.is_finite()) {
            return Err(format!("cnn_branch.bn_eps {} must be positive", self.bn_eps));
        }
        Ok(())
    }
}

/// The training recipe saved with a model: optimiser schedule, loss weights and the text tower's
/// dropout. Every field defaults to the official value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainRecipe {
    pub epochs: usize,
    pub batch_size: usize,
    /// Adam's learning rate at the first epoch; cosine-annealed per epoch down to the minimum.
    pub learning_rate: f32,
    pub min_learning_rate: f32,
    pub dice_weight: f32,
    pub bce_weight: f32,
    pub softcon_weight: f32,
    /// τ of the soft patch-contrastive loss.
    pub temperature: f32,
    /// `rows`: the official MONAI-on-[B,H,W] row-wise soft Dice (parity); `image`: per-image.
    pub dice_mode: DiceModeName,
    /// Dropout of the text tower's hidden states and attention probabilities while training
    /// (the official code leaves BERT's p = 0.1 on although BERT is frozen).
    pub text_dropout: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiceModeName {
    Rows,
    Image,
}

impl Default for TrainRecipe {
    fn default() -> Self {
        TrainRecipe {
            epochs: 100,
            batch_size: 24,
            learning_rate: 3e-4,
            min_learning_rate: 1e-4,
            dice_weight: 0.5,
            bce_weight: 0.5,
            softcon_weight: 0.1,
            temperature: 0.2,
            dice_mode: DiceModeName::Rows,
            text_dropout: 0.1,
        }
    }
}

fn official_trainable() -> Vec<String> {
    ["pvl_adapters", "mask_head", "upscale"].map(String::from).to_vec()
}

const PRESETS: &[(&str, &str)] = &[
    ("unimedclip-vit-b16", include_str!("../../weights/configs/unimedclip-vit-b16.json")),
    ("tiny", include_str!("../../weights/configs/tiny.json")),
    ("small", include_str!("../../weights/configs/small.json")),
];

impl ModelConfig {
    /// Names accepted by [`ModelConfig::preset`].
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|(name, _)| *name).collect()
    }

    /// A built-in configuration by name.
    pub fn preset(name: &str) -> Result<ModelConfig> {
        let (_, json) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            Error::Invalid(format!("unknown model config `{name}`; known: {}", Self::preset_names().join(", ")))
        })?;
        Self::from_json(json, &format!("built-in config `{name}`"))
    }

    /// The paper's configuration: UniMedCLIP ViT-B/16 at 224 with BiomedBERT-base.
    pub fn unimedclip_vit_b16() -> ModelConfig {
        Self::preset("unimedclip-vit-b16").expect("the built-in paper config parses (tested)")
    }

    /// A small model with the paper's structure, for tests and the demo.
    pub fn tiny() -> ModelConfig {
        Self::preset("tiny").expect("the built-in tiny config parses (tested)")
    }

    /// Reads a config file (JSON), or a preset name when `spec` is not a file.
    pub fn load(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        Self::from_json(&text, &path.display().to_string())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("a config always serialises");
        crate::model::weights::write_atomically(path, json.as_bytes())
    }

    fn from_json(json: &str, origin: &str) -> Result<ModelConfig> {
        let config: ModelConfig =
            serde_json::from_str(json).map_err(|e| Error::Invalid(format!("{origin}: invalid model config: {e}")))?;
        config.validate().map_err(Error::within(origin))?;
        Ok(config)
    }

    /// Checks the relations the model relies on.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Invalid(format!("model config `{}`: {msg}", self.name)));
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return fail(format!("image_size {} is not a multiple of patch_size {}", self.image_size, self.patch_size));
        }
        if self.vision_heads == 0 || !self.vision_width.is_multiple_of(self.vision_heads) {
            return fail(format!(
                "vision_width {} is not divisible by vision_heads {}",
                self.vision_width, self.vision_heads
            ));
        }
        if self.text_heads == 0 || !self.text_width.is_multiple_of(self.text_heads) {
            return fail(format!("text_width {} is not divisible by text_heads {}", self.text_width, self.text_heads));
        }
        if self.vision_layers != self.text_layers {
            return fail(format!(
                "the towers run in lock-step, so vision_layers ({}) must equal text_layers ({})",
                self.vision_layers, self.text_layers
            ));
        }
        if self.text_context_length > self.text_max_positions || self.text_context_length < 2 {
            return fail(format!(
                "text_context_length {} must be in 2..={} (text_max_positions)",
                self.text_context_length, self.text_max_positions
            ));
        }
        if let Some(&bad) = self.adapter_layers.iter().find(|&&l| l == 0 || l >= self.vision_layers) {
            return fail(format!("adapter layer {bad} is outside 1..{}", self.vision_layers));
        }
        if self.adapter_layers.windows(2).any(|w| w[0] >= w[1]) {
            return fail(format!("adapter_layers {:?} must be strictly increasing", self.adapter_layers));
        }
        let t = &self.training;
        if t.epochs == 0 || t.batch_size == 0 {
            return fail(format!(
                "training needs at least one epoch and a batch of one (got {} and {})",
                t.epochs, t.batch_size
            ));
        }
        if !(t.learning_rate > 0.0 && t.min_learning_rate >= 0.0 && t.min_learning_rate <= t.learning_rate) {
            return fail(format!(
                "learning rates must satisfy 0 <= min ({}) <= start ({}), start > 0",
                t.min_learning_rate, t.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&t.text_dropout) {
            return fail(format!("text_dropout {} is outside [0, 1)", t.text_dropout));
        }
        if t.temperature.is_nan() || t.temperature <= 0.0 {
            return fail(format!("temperature {} must be positive", t.temperature));
        }
        // Doubling per block, checked: a shift would wrap (or panic) long before it could be
        // compared with the image size.
        let upscaled = (0..self.num_upscale).try_fold(self.grid(), |side, _| side.checked_mul(2));
        if upscaled.is_none_or(|side| side > self.image_size) {
            return fail(format!(
                "{} upscale blocks take the {}-patch grid past the image size",
                self.num_upscale,
                self.grid()
            ));
        }
        if let Some(cnn) = &self.cnn_branch {
            cnn.validate(self.image_size, self.vision_layers).or_else(fail)?;
        }
        self.check_memory().or_else(fail)
    }

    /// Errors (as a sentence) when the model cannot fit in this machine's memory, checked before
    /// anything is allocated: its parameters three times over (the file, the decoded weights and
    /// the model's own copy live together while loading) or one Monte-Carlo sample's pass
    /// ([`crate::limits::sample_bytes`]). Every size is computed with checked arithmetic, so an
    /// absurd depth, width or context length is refused, never wrapped around.
    fn check_memory(&self) -> std::result::Result<(), String> {
        let memory = crate::limits::physical_memory();
        let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
        let parameters = self.parameter_count().ok_or("the parameter count overflows 64 bits")?;
        let loading = parameters.checked_mul(3 * 4).ok_or("the parameter count overflows 64 bits")?;
        if memory.is_some_and(|memory| loading > memory) {
            return Err(format!(
                "{parameters} parameters need {:.1} GiB while loading (3 copies of 4 bytes each), more than this \
                 machine's {:.1} GiB of memory",
                gib(loading),
                gib(memory.unwrap_or(0))
            ));
        }
        let sample = crate::limits::sample_bytes(self).ok_or("one sample's activations overflow 64 bits")?;
        if memory.is_some_and(|memory| sample > memory) {
            return Err(format!(
                "one Monte-Carlo sample's pass needs about {:.1} GiB, more than this machine's {:.1} GiB of memory",
                gib(sample),
                gib(memory.unwrap_or(0))
            ));
        }
        Ok(())
    }

    /// Elements of the largest activation one Monte-Carlo sample of one image has in a pass: the
    /// decoder's features, a tower's MLP or attention scores, or the logits. `None` on overflow.
    pub fn sample_activation_elements(&self) -> Option<u64> {
        let n = |dims: &[u64]| dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let grid = (self.image_size / self.patch_size.max(1)) as u64;
        let tokens = n(&[grid, grid])?.checked_add(1)?;
        let side = (0..self.num_upscale).try_fold(grid, |side, _| side.checked_mul(2))?;
        let ctx = self.text_context_length as u64;
        // The CNN branch is left out: it runs once per image whatever the number of samples, and
        // its largest buffer, a convolution's columns, is capped (ops::CONV_COLUMN_BUDGET).
        [
            n(&[side, side, self.embed_dim as u64]),
            n(&[tokens, self.vision_mlp_dim as u64]),
            n(&[self.vision_heads as u64, tokens, tokens]),
            n(&[ctx, self.text_intermediate_dim as u64]),
            n(&[self.text_heads as u64, ctx, ctx]),
            n(&[3, self.image_size as u64, self.image_size as u64]),
        ]
        .into_iter()
        .try_fold(0u64, |largest, elements| Some(largest.max(elements?)))
    }

    /// The number of parameters the model loads for this config (every weight the towers, the
    /// adapters and the decoder take, docs/model.md §9), `None` when it overflows 64 bits.
    pub fn parameter_count(&self) -> Option<u64> {
        let n = |dims: &[u64]| dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let sum = |parts: &[Option<u64>]| parts.iter().try_fold(0u64, |acc, &part| acc.checked_add(part?));
        let times = |count: usize, each: Option<u64>| each?.checked_mul(count as u64);
        let (w, t, e, a) =
            (self.vision_width as u64, self.text_width as u64, self.embed_dim as u64, self.adapter_dim as u64);
        let (p, mlp, inter, hidden) = (
            self.patch_size as u64,
            self.vision_mlp_dim as u64,
            self.text_intermediate_dim as u64,
            self.text_proj_hidden as u64,
        );
        let grid = (self.image_size / self.patch_size.max(1)) as u64;
        let tokens = n(&[grid, grid]).and_then(|g| g.checked_add(1));
        // Attention in/out projections with biases, two LayerNorms, the MLP with biases.
        let vision_block = sum(&[n(&[4, w, w]), n(&[2, mlp, w]), Some(mlp), n(&[9, w])]);
        let vision = sum(&[
            n(&[w, 3, p, p]),
            tokens.and_then(|tokens| n(&[tokens.checked_add(1)?, w])), // positions, class embedding
            n(&[4, w]),                                                // ln_pre, ln_post
            n(&[w, e]),
            times(self.vision_layers, vision_block),
        ]);
        // Query, key, value and output with biases, two LayerNorms, the feed-forward with biases.
        let text_layer = sum(&[n(&[4, t, t]), n(&[2, inter, t]), Some(inter), n(&[9, t])]);
        let table_rows = sum(&[
            Some(self.text_vocab_size as u64),
            Some(self.text_max_positions as u64),
            Some(self.text_type_vocab_size as u64),
        ]);
        let text = sum(&[
            table_rows.and_then(|rows| n(&[rows, t])),
            n(&[2, t]),
            times(self.text_layers, text_layer),
            n(&[hidden, t]),
            n(&[e, hidden]),
        ]);
        // Per direction: q and out projections (d x d), k and v (2d x d), biases, two norms, a gate.
        let cross_attention = sum(&[n(&[6, a, a]), n(&[10, a]), Some(1)]);
        let adapter = sum(&[n(&[2, a, w]), n(&[2, a, t]), times(2, cross_attention)]);
        // Transposed conv with bias, depthwise 3x3, LayerNorm; then the three-layer mask head.
        let scale_block = sum(&[n(&[4, e, e]), n(&[12, e])]);
        let decoder = sum(&[times(self.num_upscale, scale_block), n(&[3, e, e]), n(&[3, e])]);
        let cnn = match &self.cnn_branch {
            Some(cnn) => cnn.parameter_count(self.vision_width, self.embed_dim),
            None => Some(0),
        };
        sum(&[vision, text, times(self.adapter_layers.len(), adapter), decoder, cnn])
    }

    /// Adds the CNN branch (keeping the settings of one the config already has), with `width` when
    /// given, and makes it trainable: on its own with `freeze_vlm`, else beside the config's
    /// trainable parts. Returns the branch's settings for further changes.
    pub fn add_cnn_branch(&mut self, width: Option<f64>, freeze_vlm: bool) -> &mut CnnBranchConfig {
        let part = format!("{}.", crate::model::cnn::PREFIX);
        if freeze_vlm {
            self.trainable = vec![part];
        } else if !self.trainable.contains(&part) {
            self.trainable.push(part);
        }
        let cnn = self.cnn_branch.get_or_insert_with(Default::default);
        if let Some(width) = width {
            cnn.width = width;
        }
        cnn
    }

    /// True when the parameter `key` is trained under this config.
    pub fn is_trainable(&self, key: &str) -> bool {
        self.trainable.iter().any(|part| key.contains(part.as_str()))
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Image tokens: one per patch plus the class token.
    pub fn vision_tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// Side of the decoder's feature map before the final bilinear resize.
    pub fn decoder_size(&self) -> usize {
        self.grid() << self.num_upscale
    }
}
