//! The embeddable inference API: load a model folder once, then segment images from text prompts.
//!
//! ```no_run
//! use mcs_engine::segment::{read_image, Options, Segmenter};
//!
//! # fn main() -> mcs_engine::Result<()> {
//! let segmenter = Segmenter::load("runs/train/best")?; // GPU when present, else the CPU
//! let image = read_image("case.png".as_ref())?;
//! let result = segmenter.segment(&image, "one small round polyp in the upper left", &Options::default())?;
//! println!("{}x{}: {:.1} % foreground", result.width, result.height, 100.0 * result.foreground_fraction());
//! # Ok(()) }
//! ```
//!
//! What a call computes (docs/model.md §5): the image goes through the training pre-processing (cv2-exact
//! bilinear resize to the model's size, B, G, R planes, ImageNet statistics); the model runs
//! `samples` Monte-Carlo draws in one batched pass, the deterministic part before the first
//! adapter once; each draw's logits are resized bilinearly to the input's size, then
//! `sigmoid`, mean over draws (the probability), and the binary entropy of that mean (the
//! uncertainty, in nats, at most ln 2), one band of rows at a time so that memory grows with the
//! input's pixels, not samples x pixels ([`maps`]). The mask at the input's size is, by default,
//! the model-size mask (`mean probability > threshold`) resized nearest, as the official
//! evaluation makes it ([`MaskResize::Official`]); [`MaskResize::Bilinear`] thresholds the
//! full-resolution probability instead (smoother outlines). `eval` scores exactly this mask.
//!
//! Limits (docs/limits.md): an image of more than [`Options::max_pixels`] pixels is refused
//! ([`read_image_within`] from the file's header, before decoding), and so are more samples than
//! this machine's memory holds for the model ([`Segmenter::check_options`]).
//!
//! Reproducibility: the noise is counter-based and keyed by `(seed, draw, adapter)`, not by the
//! image's place in a batch, so the same image, prompt and options give the same maps bit for
//! bit alone or in any batch, on any thread count (docs/model.md §5).
//!
//! [`Options::noise`] chooses how the draws relate: independent ([`NoiseMode::Plain`], the
//! official sampling and the default) or antithetic pairs ([`NoiseMode::Antithetic`]: draw
//! `2j + 1` uses the negated noise of draw `2j`), a variance-reduction option for few samples.

#![warn(missing_docs)]

pub mod maps;
pub mod output;
pub mod rank;
pub mod volume;

use std::path::{Path, PathBuf};

use crate::cuda::gpu_available;
use crate::data::{self, Image8};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::limits;
use crate::model::folder::{load_model_folder, CONFIG_FILE};
use crate::model::{MedClipSeg, ModelConfig, Prediction, Sampling};
use crate::tensor::Tensor;
use crate::tokenizer::PromptTokenizer;

pub use crate::limits::DEFAULT_MAX_PIXELS;
pub use crate::philox::NoiseMode;
pub use maps::{binary_entropy, full_resolution_maps, mask_at_size, MaskResize};
pub use output::{write_mask_png, write_npy, write_outputs, write_overlay, OutputFiles};

/// The device a `--device` value names: `auto` (the first GPU when one can be used, else the
/// CPU), `cpu`, `cuda` or `cuda:N`. Errors: an unknown name, or a GPU asked for that cannot be
/// used here.
pub fn select_device(spec: &str) -> Result<Device> {
    match spec {
        "auto" if gpu_available() => Device::cuda(0),
        "auto" => Ok(Device::Cpu),
        other => Device::parse(other),
    }
}

/// Reads an image file (PNG or JPEG) as `cv2.imread` does: 8-bit B, G, R. At most
/// [`DEFAULT_MAX_PIXELS`] pixels: [`read_image_within`] takes another limit. Errors name the file
/// (missing, a folder, not an image, too large, damaged).
pub fn read_image(path: &Path) -> Result<Image8> {
    read_image_within(path, DEFAULT_MAX_PIXELS)
}

/// [`read_image`] of an image of at most `max_pixels` pixels, checked from the file's header
/// before anything is decoded (see [`crate::imaging::decode_image`]).
pub fn read_image_within(path: &Path, max_pixels: u64) -> Result<Image8> {
    data::read_bgr_within(path, max_pixels)
}

/// An `image` crate RGB picture as the B, G, R bytes [`Segmenter::segment`] takes.
pub fn bgr_from_rgb(picture: &image::RgbImage) -> Image8 {
    let data = picture.pixels().flat_map(|p| [p[2], p[1], p[0]]).collect();
    Image8 { width: picture.width() as usize, height: picture.height() as usize, channels: 3, data }
}

/// How a segmentation is computed.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Monte-Carlo samples (the paper uses 30); at least 1.
    pub samples: usize,
    /// Seed of the sampling noise: the same seed gives the same maps, bit for bit.
    pub seed: u64,
    /// A pixel is foreground when its mean probability is above this (the paper: 0.5).
    pub threshold: f32,
    /// How the Monte-Carlo draws share noise: [`NoiseMode::Plain`] (independent, as the
    /// official code) or [`NoiseMode::Antithetic`] (draw `2j + 1` negates the noise of draw `2j`;
    /// with an odd `samples` the last draw is unpaired). Both are unbiased estimates of the same
    /// maps; antithetic pairs can have less Monte-Carlo error at the same number of samples (see
    /// BENCHMARKS.md for what it buys on the demo checkpoint).
    pub noise: NoiseMode,
    /// The most pixels (width x height) an input image may have; larger ones are refused before
    /// any work (default [`DEFAULT_MAX_PIXELS`], 100 megapixels). Memory grows with the pixels:
    /// about 9 bytes per pixel for the maps, docs/limits.md.
    pub max_pixels: u64,
    /// How the mask reaches the input's size (default [`MaskResize::Official`]).
    pub resize: MaskResize,
}

impl Default for Options {
    /// 30 samples, seed 666 (the official scripts' seed), threshold 0.5, plain noise, at most 100
    /// megapixels, the official mask resize.
    fn default() -> Options {
        Options {
            samples: 30,
            seed: 666,
            threshold: 0.5,
            noise: NoiseMode::Plain,
            max_pixels: DEFAULT_MAX_PIXELS,
            resize: MaskResize::Official,
        }
    }
}

/// Samples of [`Options::fast`]: antithetic draws whose uncertainty map is at least as close to a
/// many-draw reference as 30 plain draws' (the official loop's) on the demo checkpoint, measured
/// with `examples/noise_error.rs` (BENCHMARKS.md, "Quality-matched latency").
pub const FAST_SAMPLES: usize = 8;

impl Options {
    /// The default options with [`FAST_SAMPLES`] antithetic draws (`predict --fast`): about the
    /// uncertainty-map error of the official 30 plain draws for a quarter of the passes. The
    /// equivalence was measured on the demo checkpoint; another checkpoint can differ
    /// (`examples/noise_error.rs` measures it).
    pub fn fast() -> Options {
        Options { samples: FAST_SAMPLES, noise: NoiseMode::Antithetic, ..Options::default() }
    }

    /// Errors: zero samples, a threshold outside [0, 1] (or not a number), a zero pixel limit.
    pub fn check(&self) -> Result<()> {
        crate::model::check_samples(self.samples)?;
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::Invalid(format!("threshold {} is not a probability in [0, 1]", self.threshold)));
        }
        if self.max_pixels == 0 {
            return Err(Error::Invalid("the image size limit (max_pixels) must be at least 1 pixel".into()));
        }
        Ok(())
    }

    /// Errors: an image with more pixels than [`Options::max_pixels`].
    fn check_size(&self, image: &Image8) -> Result<()> {
        let pixels = (image.width as u64).saturating_mul(image.height as u64);
        if pixels > self.max_pixels {
            return Err(Error::Invalid(format!(
                "image too large ({}x{}) {}",
                image.width,
                image.height,
                crate::imaging::over_pixel_limit(self.max_pixels)
            )));
        }
        Ok(())
    }
}

/// One image's result, every map `height` x `width` (the input's own size), row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Segmentation {
    /// The input image's width in pixels.
    pub width: usize,
    /// The input image's height in pixels.
    pub height: usize,
    /// The mask at the input's size, made as [`Options::resize`] says.
    pub mask: Vec<bool>,
    /// Mean foreground probability over the Monte-Carlo samples.
    pub probability: Vec<f32>,
    /// Binary entropy (nats, in [0, ln 2]) of the mean probability.
    pub uncertainty: Vec<f32>,
    /// Side of the model's square input.
    pub model_size: usize,
    /// The mean probability at the model's own resolution (`model_size` squared), before any
    /// resize: what the official evaluation thresholds and resizes (nearest) to the ground truth.
    pub model_probability: Vec<f32>,
}

impl Segmentation {
    /// Share of the pixels in the mask.
    pub fn foreground_fraction(&self) -> f64 {
        self.mask.iter().filter(|&&m| m).count() as f64 / self.mask.len().max(1) as f64
    }

    /// Mean uncertainty over the pixels (nats).
    pub fn mean_uncertainty(&self) -> f64 {
        self.uncertainty.iter().map(|&u| f64::from(u)).sum::<f64>() / self.uncertainty.len().max(1) as f64
    }

    /// The mask at the model's resolution (`model_probability > threshold`).
    pub fn model_mask(&self, threshold: f32) -> Vec<bool> {
        self.model_probability.iter().map(|&p| p > threshold).collect()
    }
}

/// A loaded model with its tokenizer, ready to segment. Load once, call [`Segmenter::segment`]
/// or [`Segmenter::segment_batch`] from as many threads as you like (`Segmenter` is `Send +
/// Sync`; calls share the weights and never mutate them).
pub struct Segmenter {
    model: MedClipSeg,
    tokenizer: PromptTokenizer,
    origin: Option<PathBuf>,
}

impl Segmenter {
    /// Loads a model folder as `mcs-engine train` writes it (`config.json`, `model.safetensors`,
    /// `tokenizer.json`) onto the GPU when one can be used, else the CPU.
    ///
    /// Errors name the file at fault: a missing folder or file, a config that does not parse,
    /// weights that do not match the config (the key and both shapes), a tokenizer whose
    /// vocabulary size differs from the config's.
    pub fn load(model_dir: impl AsRef<Path>) -> Result<Segmenter> {
        Self::load_on(model_dir, &select_device("auto")?)
    }

    /// [`Segmenter::load`] onto the given device.
    pub fn load_on(model_dir: impl AsRef<Path>, device: &Device) -> Result<Segmenter> {
        let dir = model_dir.as_ref();
        let folder = load_model_folder(dir, device).map_err(|e| match e {
            // The weight loader names the weights file and the key; add the config they missed.
            Error::Weights(detail) => {
                Error::Weights(format!("{detail} (the weights do not fit {})", dir.join(CONFIG_FILE).display()))
            }
            other => other,
        })?;
        let mut model = folder.model;
        // As in Segmenter::new: a segmenter only runs inference.
        model.pack_frozen_weights()?;
        Ok(Segmenter { model, tokenizer: folder.tokenizer, origin: Some(dir.to_path_buf()) })
    }

    /// Wraps a model and tokenizer already in memory (e.g. random weights for a demo). Errors: a
    /// tokenizer whose vocabulary or context length does not fit the model's config.
    pub fn new(mut model: MedClipSeg, tokenizer: PromptTokenizer) -> Result<Segmenter> {
        let config = model.config();
        if tokenizer.vocab_size() != config.text_vocab_size {
            return Err(Error::Invalid(format!(
                "the tokenizer has {} tokens but config `{}` expects text_vocab_size {}",
                tokenizer.vocab_size(),
                config.name,
                config.text_vocab_size
            )));
        }
        if tokenizer.context_length() != config.text_context_length {
            return Err(Error::Invalid(format!(
                "the tokenizer pads to {} tokens but config `{}` expects text_context_length {}",
                tokenizer.context_length(),
                config.name,
                config.text_context_length
            )));
        }
        // A segmenter only runs inference: the frozen towers' weights go into the CPU GEMM's
        // panels once here instead of being repacked by every call (same results).
        model.pack_frozen_weights()?;
        Ok(Segmenter { model, tokenizer, origin: None })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Where the model runs.
    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// The folder the model was loaded from (`None` for [`Segmenter::new`]).
    pub fn origin(&self) -> Option<&Path> {
        self.origin.as_deref()
    }

    /// Checks `options` for a pass of `images` images before any work: [`Options::check`], and
    /// at most as many samples as this machine's memory holds for this model
    /// ([`limits::max_samples`]: samples x images x [`limits::sample_bytes`] within its memory).
    pub fn check_options(&self, options: &Options, images: usize) -> Result<()> {
        options.check()?;
        let most = limits::max_samples(self.config(), images);
        if options.samples as u64 <= most {
            return Ok(());
        }
        let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
        let per_sample = limits::sample_bytes(self.config()).unwrap_or(u64::MAX);
        Err(Error::Invalid(format!(
            "{} Monte-Carlo samples (--samples) of {} image(s) do not fit in this machine's {:.1} GiB of memory: \
             config `{}` needs about {:.1} MiB per sample and image ({} times its largest activation), so at most \
             {most} samples fit (docs/limits.md)",
            options.samples,
            images.max(1),
            mib(limits::physical_memory().unwrap_or(0)) / 1024.0,
            self.config().name,
            mib(per_sample),
            limits::SAMPLE_ACTIVATION_COPIES
        )))
    }

    /// Segments what `prompt` describes in `image` (8-bit B, G, R as [`read_image`] gives, or one
    /// grey channel). Equal to item 0 of a [`Segmenter::segment_batch`] call.
    ///
    /// Errors: an empty prompt, an image with no pixels, 2 or 4+ channels or more than
    /// [`Options::max_pixels`] pixels, invalid options or more samples than memory holds
    /// ([`Segmenter::check_options`]), non-finite model output (a damaged image or checkpoint),
    /// device failures.
    pub fn segment(&self, image: &Image8, prompt: &str, options: &Options) -> Result<Segmentation> {
        let mut results = self.segment_batch(&[(image, prompt)], options)?;
        Ok(results.remove(0))
    }

    /// Segments many image–prompt pairs in one pass (images of any sizes; each result at its own
    /// image's size).
    ///
    /// Every item equals [`Segmenter::segment`] of its image and prompt bit for bit, whatever its
    /// position and whatever else the batch holds (the noise is keyed by the draw, not by the
    /// batch row: docs/model.md §5). Errors as [`Segmenter::segment`], naming the item (0-based)
    /// at fault when there are several.
    pub fn segment_batch(&self, items: &[(&Image8, &str)], options: &Options) -> Result<Vec<Segmentation>> {
        let Some(prediction) = self.predict_items(items, options)? else { return Ok(Vec::new()) };
        let size = self.config().image_size;
        let model_probability = prediction.probability.to_vec()?;
        let plane = size * size;
        items
            .iter()
            .enumerate()
            .map(|(b, (image, _))| {
                let (probability, uncertainty) =
                    full_resolution_maps(&prediction.logits, b, image.width, image.height)?;
                let model_probability = model_probability[b * plane..(b + 1) * plane].to_vec();
                let mask = match options.resize {
                    MaskResize::Bilinear => probability.iter().map(|&p| p > options.threshold).collect(),
                    MaskResize::Official => {
                        mask_at_size(&model_probability, size, options.threshold, image.width, image.height)?
                    }
                };
                Ok(Segmentation {
                    width: image.width,
                    height: image.height,
                    mask,
                    probability,
                    uncertainty,
                    model_size: size,
                    model_probability,
                })
            })
            .collect()
    }
}

impl Segmenter {
    /// The Monte-Carlo prediction of a batch of image–prompt pairs at the model's resolution
    /// (`None` for no items), after every check of [`Segmenter::segment_batch`]: the options, each
    /// image's size and channels, each prompt. What `segment_batch` and the ranking scores
    /// ([`rank`]) both start from, so that they see the same draws.
    pub(crate) fn predict_items(&self, items: &[(&Image8, &str)], options: &Options) -> Result<Option<Prediction>> {
        self.check_options(options, items.len())?;
        if items.is_empty() {
            return Ok(None);
        }
        // A batch says which item failed; a single call has nothing to add.
        let at = |i: usize| move |e: Error| if items.len() > 1 { e.context(format!("item {i}")) } else { e };
        for (i, (image, _)) in items.iter().enumerate() {
            options.check_size(image).map_err(at(i))?;
        }
        let size = self.config().image_size;
        let mut pixels = Vec::with_capacity(items.len() * 3 * size * size);
        let mut ids = Vec::with_capacity(items.len() * self.tokenizer.context_length());
        for (i, (image, prompt)) in items.iter().enumerate() {
            pixels.extend(model_input(image, size).map_err(at(i))?);
            ids.extend(self.tokenizer.encode(prompt).map_err(at(i))?);
        }
        let pixels = Tensor::from_slice(&pixels, &[items.len(), 3, size, size], self.device())?;
        let sampling = Sampling::inference(options.seed, options.samples, options.noise);
        Ok(Some(self.model.predict_sampled(&pixels, &ids, sampling)?))
    }
}

/// The training pre-processing of one image: `[3, size, size]` normalised B, G, R planes (also
/// the saliency's input, [`crate::saliency`]).
pub(crate) fn model_input(image: &Image8, size: usize) -> Result<Vec<f32>> {
    let bgr = match image.channels {
        3 => std::borrow::Cow::Borrowed(image),
        // One grey channel, replicated as cv2.imread does for a grey file.
        1 => std::borrow::Cow::Owned(Image8::from_raw(
            image.width,
            image.height,
            3,
            image.data.iter().flat_map(|&v| [v; 3]).collect(),
        )?),
        n => {
            return Err(Error::Invalid(format!(
                "expected a B, G, R image (3 channels) or a grey one (1 channel), got {n} channels"
            )))
        }
    };
    if bgr.width == 0 || bgr.height == 0 || bgr.data.len() != bgr.width * bgr.height * 3 {
        return Err(Error::Invalid(format!(
            "image buffer of {} bytes does not hold {}x{} B, G, R pixels",
            bgr.data.len(),
            bgr.width,
            bgr.height
        )));
    }
    data::normalise_bgr(&data::resize_linear(&bgr, size, size)?)
}
