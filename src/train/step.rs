//! One optimisation step: the forward pass on the tape, the three losses of the official recipe
//! (docs/model.md §4), the backward pass, and Adam on the trainable parameters in place.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::{DiceModeName, MedClipSeg, Sampling, Trace, TrainRecipe, TrainingPass};
use crate::ops::{self, AdamConfig, AdamState, DiceMode, ItemNoise, NoiseMode};
use crate::tape::Tape;
use crate::tensor::Tensor;

/// A batch on the device: normalised pixels `[B, 3, S, S]`, binary masks `[B, S, S]`, and
/// `B * context` token ids.
pub struct DeviceBatch {
    pub pixels: Tensor,
    pub masks: Tensor,
    pub ids: Vec<u32>,
}

impl DeviceBatch {
    /// Uploads host data (the loader's output) to `device`.
    pub fn new(
        pixels: &[f32],
        masks: &[f32],
        ids: Vec<u32>,
        image_size: usize,
        device: &Device,
    ) -> Result<DeviceBatch> {
        let batch = masks.len() / (image_size * image_size).max(1);
        Ok(DeviceBatch {
            pixels: Tensor::from_slice(pixels, &[batch, 3, image_size, image_size], device)?,
            masks: Tensor::from_slice(masks, &[batch, image_size, image_size], device)?,
            ids,
        })
    }

    pub fn len(&self) -> usize {
        self.masks.dim(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The loss terms of one step, as numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossValues {
    pub total: f32,
    pub bce: f32,
    pub dice: f32,
    pub softcon: f32,
}

/// The randomness of one step: the noise draw of every probabilistic attention, and the text
/// tower's dropout (off when `text_dropout` is 0).
#[derive(Clone, Copy, Debug)]
pub struct StepNoise {
    pub seed: u64,
    pub draw: u64,
    pub text_dropout: f32,
}

/// Training draws live far above the draws `0..N` of inference, so a training step never reuses
/// the noise that validation and `predict` see.
pub const TRAIN_DRAW_BASE: u64 = 1 << 40;

impl StepNoise {
    /// The noise of training step `step` (0-based, counted over the whole run).
    pub fn for_step(seed: u64, step: u64, text_dropout: f32) -> StepNoise {
        StepNoise { seed, draw: TRAIN_DRAW_BASE + step, text_dropout }
    }
}

/// The loss of one training pass and what else the pass produced.
pub struct StepLosses {
    /// The weighted total, on the tape.
    pub total: Tensor,
    pub values: LossValues,
    /// The CNN branch's batch-norm running statistics after the pass (empty without a branch).
    pub running_statistics: Vec<(String, Tensor)>,
}

/// `dice_weight * Dice + bce_weight * BCE + softcon_weight * SoftCon` on the tape, with the
/// value of each term. With a CNN branch, Dice and BCE score the fused logits.
pub fn losses(
    model: &MedClipSeg,
    tape: &Tape,
    batch: &DeviceBatch,
    recipe: &TrainRecipe,
    noise: StepNoise,
) -> Result<StepLosses> {
    // Training draws independent noise: one sample per step, nothing to pair.
    let sampling = Sampling {
        seed: noise.seed,
        first_draw: noise.draw,
        samples: 1,
        mode: NoiseMode::Plain,
        items: ItemNoise::ByRow,
    };
    let training = TrainingPass { seed: noise.seed, step: noise.draw, text_dropout: noise.text_dropout };
    let out = model.forward(tape, &batch.pixels, &batch.ids, sampling, Some(&training), &mut Trace::disabled())?;
    let mode = match recipe.dice_mode {
        DiceModeName::Rows => DiceMode::Rows,
        DiceModeName::Image => DiceMode::Image,
    };
    let bce = ops::bce_with_logits(tape, &out.logits, &batch.masks)?;
    let dice = ops::soft_dice_loss(tape, &out.logits, &batch.masks, mode)?;
    let patches = ops::narrow(tape, &out.image_tokens, 1, 1, out.image_tokens.dim(1) - 1)?;
    let softcon = ops::soft_contrastive_loss(tape, &patches, &out.text_embedding, recipe.temperature)?;
    let weighted = |t: &Tensor, w: f32| ops::scale(tape, t, w);
    let total = ops::add(tape, &weighted(&dice, recipe.dice_weight)?, &weighted(&bce, recipe.bce_weight)?)?;
    let total = ops::add(tape, &total, &weighted(&softcon, recipe.softcon_weight)?)?;
    let values = LossValues {
        total: total.to_scalar()?,
        bce: bce.to_scalar()?,
        dice: dice.to_scalar()?,
        softcon: softcon.to_scalar()?,
    };
    Ok(StepLosses { total, values, running_statistics: out.running_statistics })
}

/// Adam moments for every trainable parameter of `model`, in key order.
pub fn new_optimizer(model: &MedClipSeg) -> Result<AdamState> {
    let params: Vec<&Tensor> = model.trainable_parameters().map(|(_, t)| t).collect();
    AdamState::new(&params)
}

/// One step: losses, gradients, and an in-place Adam update at learning rate `lr`. A non-finite
/// loss stops before anything is updated, so the parameters stay those of the last good step.
pub fn train_step(
    model: &mut MedClipSeg,
    optimizer: &mut AdamState,
    batch: &DeviceBatch,
    recipe: &TrainRecipe,
    noise: StepNoise,
    lr: f32,
) -> Result<LossValues> {
    let tape = Tape::new();
    let StepLosses { total, values, running_statistics } = losses(model, &tape, batch, recipe, noise)?;
    if !values.total.is_finite() {
        return Err(Error::Invalid(format!(
            "the training loss became non-finite ({}: BCE {}, Dice {}, SoftCon {}); lower the learning rate or check the data",
            values.total, values.bce, values.dice, values.softcon
        )));
    }
    let grads = tape.backward(&total)?;
    drop(total);
    model.update_parameters(|params| {
        let mut grad_list = Vec::with_capacity(params.len());
        for (key, tensor) in params.iter() {
            let grad = grads.get(tensor).ok_or_else(|| {
                Error::Invalid(format!("parameter `{key}` received no gradient (is it used by the forward pass?)"))
            })?;
            grad_list.push(grad);
        }
        let mut tensors: Vec<&mut Tensor> = params.iter_mut().map(|(_, t)| &mut **t).collect();
        ops::adam_step(&mut tensors, &grad_list, optimizer, f64::from(lr), AdamConfig::default())
    })?;
    model.set_running_statistics(running_statistics)?;
    Ok(values)
}
