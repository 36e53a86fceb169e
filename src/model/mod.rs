//! MedCLIPSeg: the two CLIP towers run in lock-step with PVL adapters between their layers, and a
//! decoder that turns image tokens and the text embedding into segmentation logits (docs/model.md §1-§3, §5).

pub mod adapter;
pub mod clip;
pub mod cnn;
pub mod config;
pub mod decoder;
pub mod folder;
pub mod layers;
pub mod text;
pub mod vision;
pub mod weights;

use std::collections::BTreeMap;
use std::path::Path;

pub use crate::philox::{ItemNoise, NoiseMode};
pub use adapter::{check_samples, Sampling};
pub use config::{CnnBranchConfig, DiceModeName, ModelConfig, TrainRecipe};
use layers::{repeat_batch, Loader, Param};
use text::TextDropout;
use weights::WeightStore;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops;
use crate::tape::Tape;
use crate::tensor::Tensor;

/// Keys the official checkpoints carry that the model does not use.
pub const UNUSED_KEYS: &[&str] = &["logit_scale"];

pub struct MedClipSeg {
    config: ModelConfig,
    device: Device,
    vision: vision::VisionTower,
    text: text::TextTower,
    adapters: Vec<adapter::PvlAdapter>,
    decoder: decoder::Decoder,
    /// VLSM-Ensemble's CNN branch, when the config has one.
    cnn: Option<cnn::CnnBranch>,
    /// Every parameter by key: clones of the layers' handles, for reading and saving. Dropped
    /// while parameters are updated in place (see [`MedClipSeg::update_parameters`]).
    catalogue: BTreeMap<String, Tensor>,
    /// Whether [`MedClipSeg::pack_frozen_weights`] moved weights into panels (such a model is
    /// for inference: its catalogue holds those weights in panel layout).
    panels: bool,
}

/// Named intermediate tensors of one forward pass, recorded only when enabled (parity tests and
/// debugging); the names are those of the PyTorch reference's fixtures.
#[derive(Default)]
pub struct Trace {
    enabled: bool,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Trace {
    pub fn enabled() -> Trace {
        Trace { enabled: true, tensors: BTreeMap::new() }
    }

    pub fn disabled() -> Trace {
        Trace::default()
    }

    fn put(&mut self, name: impl FnOnce() -> String, tensor: &Tensor) {
        if self.enabled {
            self.tensors.insert(name(), tensor.clone());
        }
    }
}

/// What makes a forward pass a training pass: dropout masks drawn from the run's seed and the
/// step, and batch statistics in the CNN branch's batch norms (whose running averages the pass
/// returns in [`ForwardOutput::running_statistics`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainingPass {
    pub seed: u64,
    /// The step's noise draw (keys the dropout masks).
    pub step: u64,
    /// The text tower's dropout probability (0: none).
    pub text_dropout: f32,
}

/// Everything one forward pass produces (the batch is `samples * B`, sample-major).
pub struct ForwardOutput {
    /// `[S*B, H, W]` segmentation logits (with a CNN branch: the fused logits).
    pub logits: Tensor,
    /// `[S*B, H, W]` MedCLIPSeg's own logits before the fusion, when there is a CNN branch.
    pub vlm_logits: Option<Tensor>,
    /// The CNN branch's batch-norm running statistics after a training pass, by key (see
    /// [`MedClipSeg::set_running_statistics`]); empty otherwise.
    pub running_statistics: Vec<(String, Tensor)>,
    /// `[S*B, Tv, E]` projected image tokens (the contrastive loss uses the patches).
    pub image_tokens: Tensor,
    /// `[S*B, E]` unnormalised text embedding.
    pub text_embedding: Tensor,
}

/// The Monte-Carlo prediction for a batch (docs/model.md §5).
pub struct Prediction {
    /// `[S, B, H, W]` logits of every draw.
    pub logits: Tensor,
    /// `[B, H, W]` mean foreground probability over the draws.
    pub probability: Tensor,
    /// `[B, H, W]` binary entropy (nats) of the mean probability.
    pub uncertainty: Tensor,
}

impl MedClipSeg {
    /// Builds the model from a weight store holding every key of the config (docs/model.md §9).
    pub fn from_store(config: ModelConfig, mut store: WeightStore, device: &Device) -> Result<MedClipSeg> {
        config.validate()?;
        let mut l = Loader::new(&mut store, &config, device);
        let vision = vision::VisionTower::load(&mut l, &config)?;
        let text = text::TextTower::load(&mut l, &config)?;
        let adapters = (0..config.adapter_layers.len())
            .map(|k| adapter::PvlAdapter::load(&mut l, &config, k))
            .collect::<Result<Vec<_>>>()?;
        let decoder = decoder::Decoder::load(&mut l, &config)?;
        let cnn = match &config.cnn_branch {
            Some(cnn) => Some(cnn::CnnBranch::load(&mut l, &config, cnn)?),
            None => None,
        };
        store.finish(UNUSED_KEYS)?;
        let mut model = MedClipSeg {
            config,
            device: device.clone(),
            vision,
            text,
            adapters,
            decoder,
            cnn,
            catalogue: BTreeMap::new(),
            panels: false,
        };
        model.rebuild_catalogue();
        Ok(model)
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut all = self.vision.params_mut();
        all.extend(self.text.params_mut());
        for adapter in &mut self.adapters {
            all.extend(adapter.params_mut());
        }
        all.extend(self.decoder.params_mut());
        if let Some(cnn) = &mut self.cnn {
            all.extend(cnn.params_mut());
        }
        all
    }

    /// Replaces batch-norm running statistics by key with those a training pass returned
    /// ([`ForwardOutput::running_statistics`]). Fails, naming the key, for a key the model does
    /// not hold or a tensor of another shape.
    pub fn set_running_statistics(&mut self, updates: Vec<(String, Tensor)>) -> Result<()> {
        if updates.is_empty() {
            return Ok(());
        }
        self.catalogue.clear();
        let result = (|| {
            let mut params = self.params_mut();
            for (key, value) in updates {
                let param = params
                    .iter_mut()
                    .find(|p| p.key == key && !p.value.needs_grad())
                    .ok_or_else(|| Error::Invalid(format!("the model has no running statistic `{key}` to update")))?;
                if param.value.shape() != value.shape() {
                    return Err(Error::shape(
                        "set_running_statistics",
                        format!("`{key}` has shape {:?}, the update {:?}", param.value.shape(), value.shape()),
                    ));
                }
                param.value = value;
            }
            Ok(())
        })();
        self.rebuild_catalogue();
        result
    }

    /// Stores the frozen towers' projection weights in the CPU GEMM's panels
    /// (`ops::PanelWeight`, docs/architecture.md §5): an inference pass on one image no longer
    /// repacks them on every call, and the outputs stay bit for bit the same. Only for models
    /// that run inference: the panels replace the `[out, in]` weights, so such a model cannot be
    /// saved or trained. Nothing moves on a GPU or for trainable weights.
    pub fn pack_frozen_weights(&mut self) -> Result<()> {
        // The catalogue's clones would keep every `[out, in]` weight alive beside its panels.
        self.catalogue.clear();
        let mut moved = false;
        for block in &mut self.vision.blocks {
            for linear in block.linears_mut() {
                moved |= linear.store_in_panels()?;
            }
        }
        for layer in &mut self.text.layers {
            for linear in layer.linears_mut() {
                moved |= linear.store_in_panels()?;
            }
        }
        self.panels |= moved;
        self.rebuild_catalogue();
        Ok(())
    }

    /// Whether some weights are in panels ([`MedClipSeg::pack_frozen_weights`]).
    pub fn has_weights_in_panels(&self) -> bool {
        self.panels
    }

    fn rebuild_catalogue(&mut self) {
        let catalogue = self.params_mut().into_iter().map(|p| (p.key.clone(), p.value.clone())).collect();
        self.catalogue = catalogue;
    }

    /// Calls `update` with every trainable parameter (in key order) as the only handle to its
    /// storage, so the update can write in place. Fails, naming the key, when something else
    /// (a live tape, a caller's clone) still holds a parameter.
    pub fn update_parameters(&mut self, update: impl FnOnce(&mut [(&str, &mut Tensor)]) -> Result<()>) -> Result<()> {
        self.catalogue.clear();
        let result = (|| {
            let mut trainable: Vec<&mut Param> =
                self.params_mut().into_iter().filter(|p| p.value.needs_grad()).collect();
            trainable.sort_by(|a, b| a.key.cmp(&b.key));
            for p in trainable.iter_mut() {
                if p.value.storage_mut().is_none() {
                    return Err(Error::Invalid(format!(
                        "parameter `{}` cannot be updated in place: another handle (a live tape or a clone) still holds it",
                        p.key
                    )));
                }
            }
            let mut view: Vec<(&str, &mut Tensor)> =
                trainable.into_iter().map(|p| (p.key.as_str(), &mut p.value)).collect();
            update(&mut view)
        })();
        self.rebuild_catalogue();
        result
    }

    /// Loads `weights` (safetensors with the official keys) for `config` onto `device`.
    pub fn load(config: ModelConfig, weights: &Path, device: &Device) -> Result<MedClipSeg> {
        Self::from_store(config, WeightStore::load(weights)?, device)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Replaces the training recipe carried in the config (a resumed run may train longer).
    pub fn set_training_recipe(&mut self, recipe: TrainRecipe) {
        self.config.training = recipe;
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every parameter by official key (trainable ones report `needs_grad`).
    pub fn parameters(&self) -> &BTreeMap<String, Tensor> {
        &self.catalogue
    }

    /// The trainable parameters by key.
    pub fn trainable_parameters(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.catalogue.iter().filter(|(_, t)| t.needs_grad())
    }

    /// Runs both towers with the adapters, then the decoder. `pixels` is `[B, 3, H, W]`
    /// (normalised), `ids` holds `B * context` token ids. The batch is stacked `sampling.samples`
    /// times at the first adapter (everything before it is deterministic and computed once).
    /// `training` makes it a training pass ([`TrainingPass`]).
    ///
    /// With a CNN branch, the chosen vision block's tokens and the text embedding are averaged
    /// over the Monte-Carlo samples, the branch runs once per image, and its logits are fused
    /// with each sample's MedCLIPSeg logits (with one sample, as in training, that is the
    /// sample's own tokens).
    pub fn forward(
        &self,
        tape: &Tape,
        pixels: &Tensor,
        ids: &[u32],
        sampling: Sampling,
        training: Option<&TrainingPass>,
        trace: &mut Trace,
    ) -> Result<ForwardOutput> {
        let text_dropout = training.filter(|t| t.text_dropout > 0.0).map(|t| TextDropout {
            p: t.text_dropout,
            seed: t.seed,
            step: t.step,
        });
        let text_dropout = text_dropout.as_ref();
        let c = &self.config;
        if pixels.rank() != 4 || pixels.dim(1) != 3 || pixels.dim(2) != c.image_size || pixels.dim(3) != c.image_size {
            return Err(Error::shape(
                "MedCLIPSeg",
                format!("pixels must be [B, 3, {0}, {0}], got {1:?}", c.image_size, pixels.shape()),
            ));
        }
        check_samples(sampling.samples)?;
        let batch = pixels.dim(0);
        let mut image = self.vision.embed(tape, pixels)?;
        let mut text = self.text.embed(tape, ids, batch, text_dropout)?;
        let mut mask = self.text.pad_mask(ids, batch, &self.device)?;
        trace.put(|| "act.vision.embed".into(), &image);
        trace.put(|| "act.text.embed".into(), &text);

        let mut stacked = sampling.samples == 1;
        let mut cnn_tokens = None;
        for (i, (vision_block, text_layer)) in self.vision.blocks.iter().zip(&self.text.layers).enumerate() {
            if let Some(k) = c.adapter_layers.iter().position(|&layer| layer == i) {
                if !stacked {
                    image = repeat_batch(tape, &image, sampling.samples)?;
                    text = repeat_batch(tape, &text, sampling.samples)?;
                    mask = repeat_batch(tape, &mask, sampling.samples)?;
                    stacked = true;
                }
                let out = self.adapters[k].forward(tape, &image, &text, sampling)?;
                trace.put(|| format!("act.adapter.{k}.dv"), &out.dv);
                trace.put(|| format!("act.adapter.{k}.dt"), &out.dt);
                trace.put(|| format!("act.adapter.{k}.v_prime"), &out.v_prime);
                trace.put(|| format!("act.adapter.{k}.t_prime"), &out.t_prime);
                text = ops::add(tape, &text, &out.dt)?;
                image = ops::add(tape, &image, &out.dv)?;
            }
            image = vision_block.forward(tape, &image)?;
            text = text_layer.forward(tape, &text, &mask, text_dropout, i)?;
            if self.cnn.as_ref().is_some_and(|cnn| cnn.vision_layer() == i + 1) {
                cnn_tokens = Some(image.clone());
            }
            trace.put(|| format!("act.vision.block.{i}"), &image);
            trace.put(|| format!("act.text.block.{i}"), &text);
        }
        if !stacked {
            image = repeat_batch(tape, &image, sampling.samples)?;
            text = repeat_batch(tape, &text, sampling.samples)?;
        }

        let image_tokens = self.vision.project(tape, &image)?;
        let text_embedding = self.text.pool(tape, &text)?;
        trace.put(|| "act.vision.tokens".into(), &image_tokens);
        trace.put(|| "act.text.embedding".into(), &text_embedding);
        let decoded = self.decoder.forward(tape, &image_tokens, &text_embedding)?;
        trace.put(|| "act.decoder.features_nhwc".into(), &decoded.features);
        trace.put(|| "act.decoder.query".into(), &decoded.query);
        trace.put(|| "act.logits_lowres".into(), &decoded.logits_lowres);
        trace.put(|| "act.logits".into(), &decoded.logits);
        let Some(cnn) = &self.cnn else {
            return Ok(ForwardOutput {
                logits: decoded.logits,
                vlm_logits: None,
                running_statistics: Vec::new(),
                image_tokens,
                text_embedding,
            });
        };
        let tokens =
            cnn_tokens.ok_or_else(|| Error::Invalid("the CNN branch's vision layer was not reached".into()))?;
        let per_image = |t: &Tensor| -> Result<Tensor> {
            // Stacking happens at the first adapter: a block before it may still be per image.
            if t.dim(0) == batch {
                Ok(t.clone())
            } else {
                mean_over_samples(tape, t, sampling.samples)
            }
        };
        let branch = cnn.forward(tape, pixels, &per_image(&tokens)?, &per_image(&text_embedding)?, training, trace)?;
        let cnn_logits = repeat_batch(tape, &branch.logits, sampling.samples)?;
        let logits = cnn.fuse(tape, &decoded.logits, &cnn_logits)?;
        trace.put(|| "act.cnn.fused".into(), &logits);
        Ok(ForwardOutput {
            logits,
            vlm_logits: Some(decoded.logits),
            running_statistics: branch.running_statistics,
            image_tokens,
            text_embedding,
        })
    }

    /// `samples` stochastic passes (draws `0..samples`, all in one batched pass), their mean
    /// probability and its binary entropy (docs/model.md §5), with independent (plain) draws, every
    /// image's the same whatever its batch ([`Sampling::inference`]).
    pub fn predict(&self, pixels: &Tensor, ids: &[u32], seed: u64, samples: usize) -> Result<Prediction> {
        self.predict_sampled(pixels, ids, Sampling::inference(seed, samples, NoiseMode::Plain))
    }

    /// [`MedClipSeg::predict`] with any draws and noise mode (`sampling.samples` passes, draws
    /// `sampling.first_draw ..`).
    pub fn predict_sampled(&self, pixels: &Tensor, ids: &[u32], sampling: Sampling) -> Result<Prediction> {
        let samples = sampling.samples;
        let tape = Tape::inference();
        let out = self.forward(&tape, pixels, ids, sampling, None, &mut Trace::disabled())?;
        let (b, h, w) = (pixels.dim(0), self.config.image_size, self.config.image_size);
        let logits = ops::reshape(&tape, &out.logits, &[samples, b, h, w])?;
        let (probability, uncertainty) = mean_probability_and_entropy(&logits)?;
        // The one check of the model's output: a NaN anywhere makes the sum NaN, and finite
        // probabilities give finite maps at any size (segment::maps checks nothing again).
        if ops::sum_all_forward(&probability)?.to_scalar()?.is_nan() {
            return Err(Error::Invalid(
                "the model produced non-finite probabilities (is the input image or the checkpoint damaged?)".into(),
            ));
        }
        Ok(Prediction { logits, probability, uncertainty })
    }
}

/// `[S*B, ...]` (sample-major) -> `[B, ...]`, the mean over the `samples` copies.
fn mean_over_samples(tape: &Tape, x: &Tensor, samples: usize) -> Result<Tensor> {
    let rest: Vec<usize> = x.shape()[1..].to_vec();
    let per_sample = x.numel() / samples;
    let flat = ops::reshape(tape, x, &[samples, per_sample])?;
    let by_element = ops::permute(tape, &flat, &[1, 0])?;
    let mut shape = vec![x.dim(0) / samples];
    shape.extend(rest);
    ops::reshape(tape, &ops::mean_last(tape, &by_element)?, &shape)
}

/// Mean of `sigmoid(logits)` over the leading sample axis of `[S, B, H, W]`, and the binary
/// entropy `-(p ln(p + 1e-8) + (1 - p) ln(1 - p + 1e-8))` of that mean (natural log, as the
/// official code).
pub fn mean_probability_and_entropy(logits: &Tensor) -> Result<(Tensor, Tensor)> {
    let tape = Tape::inference();
    let samples = logits.dim(0);
    let rest: Vec<usize> = logits.shape()[1..].to_vec();
    let p = ops::sigmoid(&tape, logits)?;
    let flat = ops::reshape(&tape, &p, &[samples, rest.iter().product()])?;
    let by_pixel = ops::permute(&tape, &flat, &[1, 0])?;
    let mean = ops::reshape(&tape, &ops::mean_last(&tape, &by_pixel)?, &rest)?;
    let q = ops::add_scalar(&tape, &ops::neg(&tape, &mean)?, 1.0)?;
    let term = |x: &Tensor| -> Result<Tensor> {
        let log = ops::log(&tape, &ops::add_scalar(&tape, x, 1e-8)?)?;
        ops::mul(&tape, x, &log)
    };
    let entropy = ops::neg(&tape, &ops::add(&tape, &term(&mean)?, &term(&q)?)?)?;
    Ok((mean, entropy))
}
