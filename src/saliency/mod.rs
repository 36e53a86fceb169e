//! Zero-shot saliency from a text prompt with the Multi-modal Information Bottleneck (M2IB), as
//! MedCLIP-SAMv2 computes it on the CLIP vision tower, and the SAM prompts made from it.
//!
//! ```no_run
//! use mcs_engine::saliency::{SaliencyModel, SaliencyOptions};
//! use mcs_engine::segment::read_image;
//!
//! # fn main() -> mcs_engine::Result<()> {
//! let model = SaliencyModel::load("weights/demo")?; // frozen: no parameter needs a gradient
//! let image = read_image("case.png".as_ref())?;
//! let map = model.saliency(&image, "a round lesion in the upper left", &SaliencyOptions::default())?;
//! println!("{} component(s), first box {:?}", map.prompts.len(), map.prompts.first().map(|p| p.bbox));
//! # Ok(()) }
//! ```
//!
//! What a call computes (docs/saliency.md):
//! - `X`, the vision tokens `[1, T, W]` after block `L` (default `round(7/12 * depth)`, 7 of 12)
//!   of the image pre-processed as for segmentation.
//! - A bottleneck `lambda = sigmoid(alpha)`, `alpha` `[T, W]` starting at 5, applied to `C` noise
//!   copies stacked in one batch: `Z = lambda X + (1 - lambda) eps`, `eps` standard normal
//!   `[C, T, W]` drawn from `(seed, step)` (fresh noise each step, the same run twice gives the
//!   same map bit for bit).
//! - The objective `beta * mean KL - mean_c cos(f_img(Z_c), f_txt)`, `KL = 0.5 (mu^2 + sigma^2 -
//!   1 - ln sigma^2)` elementwise with `mu = lambda X`, `sigma = 1 - lambda` (the KL divergence of
//!   `N(lambda X, (1 - lambda)^2)` from `N(0, 1)`), mean over tokens and channels; `f_img` the
//!   rest of the vision tower from block `L` on, `f_txt` the prompt's text embedding. Only `alpha`
//!   is optimised, by Adam; the model is loaded frozen.
//! - The saliency: the KL summed over channels per patch token (class token dropped) with the
//!   last `lambda`, on the `g x g` patch grid, bilinearly resized to the image's own size and
//!   min-max normalised to [0, 1]. The KL does not depend on the noise, so the average over the
//!   noise copies the official code takes is the KL itself.
//! - Post-processing ([`post`]): two-cluster k-means on the saliency values, the largest
//!   8-connected components of the high cluster, and per component a box and positive points.
//!
//! Numerics: `sigma` is computed as `sigmoid(-alpha)` and `ln sigma^2` as `-2 softplus(alpha)`,
//! the same values as `1 - lambda` and its logarithm without the cancellation that makes them 0
//! and `-inf` in f32 once `alpha` passes about 17.

#![warn(missing_docs)]

pub mod output;
pub mod post;

use std::path::Path;

use crate::data::Image8;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::folder::load_frozen_model_folder;
use crate::model::{MedClipSeg, ModelConfig};
use crate::ops::{self, AdamConfig, AdamState};
use crate::segment::{model_input, select_device, DEFAULT_MAX_PIXELS};
use crate::tape::Tape;
use crate::tensor::Tensor;
use crate::tokenizer::PromptTokenizer;

pub use output::{write_saliency_outputs, SaliencyFiles};
pub use post::{component_mask, kmeans_two, largest_components, sam_prompt, Component, SamPrompt, TwoMeans};

/// The starting value of every `alpha` (lambda = sigmoid(5), about 0.993: the bottleneck starts
/// almost open), as in M2IB.
pub const ALPHA_INIT: f32 = 5.0;

/// How a saliency map is computed. [`Default`] gives MedCLIP-SAMv2's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SaliencyOptions {
    /// Vision block after which the bottleneck sits; `None`: `round(7/12 * depth)`.
    pub layer: Option<usize>,
    /// Weight of the KL term (default 0.1).
    pub beta: f32,
    /// Adam steps on `alpha` (default 10; 0 gives the map of the starting bottleneck).
    pub steps: usize,
    /// Adam's learning rate (default 1).
    pub lr: f64,
    /// Noise copies per step, stacked in one batch (default 10).
    pub copies: usize,
    /// Connected components kept in the coarse mask, largest first (default 1).
    pub components: usize,
    /// Seed of the noise (default 666, the official scripts' seed).
    pub seed: u64,
    /// The most pixels an input image may have (default [`DEFAULT_MAX_PIXELS`]).
    pub max_pixels: u64,
}

impl Default for SaliencyOptions {
    fn default() -> SaliencyOptions {
        SaliencyOptions {
            layer: None,
            beta: 0.1,
            steps: 10,
            lr: 1.0,
            copies: 10,
            components: 1,
            seed: 666,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

impl SaliencyOptions {
    /// Errors: a negative or non-finite beta, a learning rate that is not finite and above 0,
    /// no noise copies, no components, a zero pixel limit, a layer outside `0..depth` (the
    /// bottleneck needs at least one block after it for the patch tokens to reach the class
    /// token).
    pub fn check(&self, depth: usize) -> Result<()> {
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(Error::Invalid(format!("beta {} is not a finite number of at least 0", self.beta)));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Invalid(format!("the learning rate {} is not a finite number above 0", self.lr)));
        }
        if self.copies == 0 {
            return Err(Error::Invalid("at least one noise copy is needed".into()));
        }
        if self.components == 0 {
            return Err(Error::Invalid("at least one connected component must be kept".into()));
        }
        if self.max_pixels == 0 {
            return Err(Error::Invalid("the image size limit (max_pixels) must be at least 1 pixel".into()));
        }
        let layer = self.layer_for(depth);
        if layer >= depth {
            return Err(Error::Invalid(format!(
                "layer {layer} is outside 0..{depth}: the vision tower has {depth} blocks and the bottleneck needs one after it"
            )));
        }
        Ok(())
    }

    /// The bottleneck's block for a tower of `depth` blocks.
    pub fn layer_for(&self, depth: usize) -> usize {
        self.layer.unwrap_or_else(|| default_layer(depth))
    }
}

/// `round(7/12 * depth)` (halves up): block 7 of ViT-B's 12, as MedCLIP-SAMv2.
pub fn default_layer(depth: usize) -> usize {
    (7 * depth + 6) / 12
}

/// One image's saliency and what was made from it; every map `height` x `width` (the image's own
/// size), row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Saliency {
    /// The image's width in pixels.
    pub width: usize,
    /// The image's height in pixels.
    pub height: usize,
    /// The saliency, min-max normalised to [0, 1] (all zeros for a constant map).
    pub map: Vec<f32>,
    /// The raw saliency per patch (KL summed over channels, nats), `grid` x `grid`, row-major.
    pub patch_kl: Vec<f32>,
    /// Patches per side.
    pub grid: usize,
    /// The coarse mask: the kept components.
    pub mask: Vec<bool>,
    /// One prompt per kept component, largest component first.
    pub prompts: Vec<SamPrompt>,
    /// The objective after each Adam step (its value at the step's `alpha`, before the update).
    pub objective: Vec<f32>,
}

impl Saliency {
    /// Share of the pixels in the coarse mask.
    pub fn foreground_fraction(&self) -> f64 {
        self.mask.iter().filter(|&&m| m).count() as f64 / self.mask.len().max(1) as f64
    }
}

/// The M2IB objective `beta * mean KL - mean_c cos(f_img(Z_c), f_txt)` for bottleneck logits
/// `alpha` `[T, W]`, tokens `x` `[1, T, W]` after block `layer`, noise `[C, T, W]` and a text
/// embedding `[1, E]` (not yet normalised). A scalar `[1]`; differentiable in `alpha` (and in
/// whatever else needs a gradient).
#[allow(clippy::too_many_arguments)]
pub fn m2ib_objective(
    model: &MedClipSeg,
    tape: &Tape,
    x: &Tensor,
    alpha: &Tensor,
    noise: &Tensor,
    text: &Tensor,
    layer: usize,
    beta: f32,
) -> Result<Tensor> {
    let fits = x.rank() == 3
        && x.dim(0) == 1
        && alpha.shape() == &x.shape()[1..]
        && noise.rank() == 3
        && noise.shape()[1..] == x.shape()[1..];
    if !fits {
        return Err(Error::shape(
            "m2ib_objective",
            format!(
                "tokens must be [1, T, W], alpha [T, W] and noise [C, T, W]; got tokens {:?}, alpha {:?}, noise {:?}",
                x.shape(),
                alpha.shape(),
                noise.shape()
            ),
        ));
    }
    let (lambda, sigma) = bottleneck(tape, alpha)?;
    let mu = ops::mul(tape, &lambda, x)?;
    let z = ops::add(tape, &mu, &ops::mul(tape, &sigma, noise)?)?;
    let kl = ops::mean_all(tape, &kl_elements(tape, alpha, &mu, &sigma)?)?;
    let image = ops::l2_normalize_last(tape, &model.image_embedding_from(tape, &z, layer)?)?;
    let text = ops::l2_normalize_last(tape, text)?;
    let cosine = ops::sum_last(tape, &ops::mul(tape, &image, &text)?)?;
    let kl = ops::scale(tape, &kl, beta)?;
    let objective = ops::sub(tape, &kl, &ops::mean_all(tape, &cosine)?)?;
    ops::reshape(tape, &objective, &[1])
}

/// `lambda = sigmoid(alpha)` and `sigma = 1 - lambda`, the latter as `sigmoid(-alpha)`.
fn bottleneck(tape: &Tape, alpha: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((ops::sigmoid(tape, alpha)?, ops::sigmoid(tape, &ops::neg(tape, alpha)?)?))
}

/// `0.5 (mu^2 + sigma^2 - 1 - ln sigma^2)` elementwise, with `ln sigma^2 = -2 softplus(alpha)`.
fn kl_elements(tape: &Tape, alpha: &Tensor, mu: &Tensor, sigma: &Tensor) -> Result<Tensor> {
    let squares = ops::add(tape, &ops::square(tape, mu)?, &ops::square(tape, sigma)?)?;
    let log_term = ops::scale(tape, &ops::softplus(tape, alpha)?, 2.0)?;
    let sum = ops::add(tape, &squares, &log_term)?;
    ops::add_scalar(tape, &ops::scale(tape, &sum, 0.5)?, -0.5)
}

/// A frozen CLIP model (the towers of a MedCLIPSeg checkpoint) with its tokenizer: no parameter
/// needs a gradient, so the objective's backward reaches `alpha` only.
pub struct SaliencyModel {
    model: MedClipSeg,
    tokenizer: PromptTokenizer,
}

impl SaliencyModel {
    /// Loads a model folder (`config.json`, `model.safetensors`, `tokenizer.json`) onto the GPU
    /// when one can be used, else the CPU, frozen whatever the config's `trainable` list says.
    pub fn load(model_dir: impl AsRef<Path>) -> Result<SaliencyModel> {
        Self::load_on(model_dir, &select_device("auto")?)
    }

    /// [`SaliencyModel::load`] onto `device`. Errors name the file at fault.
    pub fn load_on(model_dir: impl AsRef<Path>, device: &Device) -> Result<SaliencyModel> {
        let dir = model_dir.as_ref();
        let folder = load_frozen_model_folder(dir, device).map_err(|e| match e {
            Error::Weights(detail) => Error::Weights(format!(
                "{detail} (the weights do not fit {})",
                dir.join(crate::model::folder::CONFIG_FILE).display()
            )),
            other => other,
        })?;
        Self::new(folder.model, folder.tokenizer)
    }

    /// Wraps a model already in memory. Errors: a model with a parameter that needs a gradient
    /// (load it with an empty `trainable` list), a tokenizer that does not fit its config.
    pub fn new(model: MedClipSeg, tokenizer: PromptTokenizer) -> Result<SaliencyModel> {
        if let Some((key, _)) = model.trainable_parameters().next() {
            return Err(Error::Invalid(format!(
                "the saliency model must be frozen, but parameter `{key}` is trainable (load it with an empty `trainable` list)"
            )));
        }
        let config = model.config();
        if tokenizer.vocab_size() != config.text_vocab_size || tokenizer.context_length() != config.text_context_length
        {
            return Err(Error::Invalid(format!(
                "the tokenizer ({} tokens, context {}) does not fit config `{}` (text_vocab_size {}, text_context_length {})",
                tokenizer.vocab_size(),
                tokenizer.context_length(),
                config.name,
                config.text_vocab_size,
                config.text_context_length
            )));
        }
        Ok(SaliencyModel { model, tokenizer })
    }

    /// The frozen model.
    pub fn model(&self) -> &MedClipSeg {
        &self.model
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Where the model runs.
    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// The saliency of what `prompt` describes in `image` (8-bit B, G, R, or one grey channel),
    /// its coarse mask and SAM prompts (see the module docs).
    ///
    /// Errors: invalid options, an empty prompt, an image with no pixels, 2 or 4+ channels or
    /// more than [`SaliencyOptions::max_pixels`] pixels, a non-finite saliency (a damaged image
    /// or checkpoint), device failures.
    pub fn saliency(&self, image: &Image8, prompt: &str, options: &SaliencyOptions) -> Result<Saliency> {
        let config = self.config();
        options.check(config.vision_layers)?;
        let pixels = (image.width as u64).saturating_mul(image.height as u64);
        if pixels > options.max_pixels {
            return Err(Error::Invalid(format!(
                "image too large ({}x{}) {}",
                image.width,
                image.height,
                crate::imaging::over_pixel_limit(options.max_pixels)
            )));
        }
        let ids = self.tokenizer.encode(prompt)?;
        let size = config.image_size;
        let input = Tensor::from_slice(&model_input(image, size)?, &[1, 3, size, size], self.device())?;
        let (alpha, objective) = optimise_bottleneck(&self.model, &input, &ids, options)?;
        let layer = options.layer_for(config.vision_layers);
        let grid = config.grid();
        let patch_kl = self.patch_kl(&input, &alpha, layer)?;
        let map = upsample_normalised(&patch_kl, image.width, image.height)?;
        let kmeans = kmeans_two(&map)?;
        let kept = largest_components(&kmeans.high_cluster, image.width, image.height, options.components)?;
        let prompts = kept.iter().map(|c| sam_prompt(c, &map, image.width)).collect::<Result<Vec<_>>>()?;
        let mask = component_mask(&kept, map.len());
        Ok(Saliency {
            width: image.width,
            height: image.height,
            map,
            patch_kl: patch_kl.to_vec()?,
            grid,
            mask,
            prompts,
            objective,
        })
    }

    /// The KL summed over channels per patch token, `[1, 1, g, g]`.
    fn patch_kl(&self, input: &Tensor, alpha: &Tensor, layer: usize) -> Result<Tensor> {
        let tape = Tape::inference();
        let x = self.model.vision_tokens_after(&tape, input, layer)?;
        let alpha = alpha.detach();
        let (lambda, sigma) = bottleneck(&tape, &alpha)?;
        let mu = ops::mul(&tape, &lambda, &x)?;
        let kl = kl_elements(&tape, &alpha, &mu, &sigma)?; // [1, T, W]
        let per_token = ops::sum_last(&tape, &kl)?; // [1, T]
        let patches = ops::narrow(&tape, &per_token, 1, 1, x.dim(1) - 1)?;
        let grid = self.config().grid();
        ops::reshape(&tape, &patches, &[1, 1, grid, grid])
    }
}

/// The bottleneck's optimisation for one image: Adam on `alpha` for `options.steps` steps, each
/// a forward and backward pass of `options.copies` noise copies through the vision tower from the
/// bottleneck's layer on. `input` is the normalised `[1, 3, S, S]` image, `ids` the prompt's token
/// ids; `model` must be frozen. Returns the final `alpha` `[T, W]` and the objective at each step.
/// (Public for `bench saliency`, which times it with random weights.)
pub fn optimise_bottleneck(
    model: &MedClipSeg,
    input: &Tensor,
    ids: &[u32],
    options: &SaliencyOptions,
) -> Result<(Tensor, Vec<f32>)> {
    let layer = options.layer_for(model.config().vision_layers);
    let frozen = Tape::inference();
    let x = model.vision_tokens_after(&frozen, input, layer)?;
    let text = model.text_embedding(&frozen, ids)?;
    let (t, w) = (x.dim(1), x.dim(2));
    let mut alpha = Tensor::full(ALPHA_INIT, &[t, w], model.device())?.into_trainable();
    let mut state = AdamState::new(&[&alpha])?;
    let mut objective = Vec::with_capacity(options.steps);
    for step in 0..options.steps {
        let noise = ops::normal_noise(model.device(), &[options.copies, t, w], options.seed, step as u64)?;
        let grad = {
            let tape = Tape::new();
            let loss = m2ib_objective(model, &tape, &x, &alpha, &noise, &text, layer, options.beta)?;
            objective.push(loss.to_scalar()?);
            let grads = tape.backward(&loss)?;
            grads.get(&alpha).cloned().ok_or_else(|| {
                Error::Invalid("the M2IB objective did not reach the bottleneck (no gradient for alpha)".into())
            })?
        };
        if let Some(last) = objective.last().filter(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "the M2IB objective is {last} at step {step} (is the input image or the checkpoint damaged?)"
            )));
        }
        ops::adam_step(&mut [&mut alpha], &[&grad], &mut state, options.lr, AdamConfig::default())?;
    }
    Ok((alpha, objective))
}

/// The `[1, 1, g, g]` patch map resized bilinearly to `width` x `height` (on its device) and
/// min-max normalised to [0, 1] (a constant map gives zeros). Errors: a non-finite value.
fn upsample_normalised(patch_kl: &Tensor, width: usize, height: usize) -> Result<Vec<f32>> {
    let mut map = ops::resize_bilinear_nchw_forward(patch_kl, height, width)?.to_vec()?;
    min_max_normalise(&mut map)?;
    Ok(map)
}

/// Rescales `values` to [0, 1] by their minimum and maximum; all equal gives all zeros. Errors: a
/// non-finite value.
pub fn min_max_normalise(values: &mut [f32]) -> Result<()> {
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::Invalid(
            "the saliency map holds non-finite values (is the input image or the checkpoint damaged?)".into(),
        ));
    }
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let range = max - min;
    if values.is_empty() || range <= 0.0 || !range.is_finite() {
        values.iter_mut().for_each(|v| *v = 0.0);
        return Ok(());
    }
    values.iter_mut().for_each(|v| *v = ((*v - min) / range).clamp(0.0, 1.0));
    Ok(())
}
