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
    /// How `mcs-engine train` trains this model (defaults: the official recipe, spec §4, §6).
    #[serde(default)]
    pub training: TrainRecipe,
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
        config.validate().map_err(|e| Error::Invalid(format!("{origin}: {e}")))?;
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
    /// adapters and the decoder take, spec §9), `None` when it overflows 64 bits.
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
        sum(&[vision, text, times(self.adapter_layers.len(), adapter), decoder])
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
