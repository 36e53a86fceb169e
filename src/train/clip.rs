//! Fine-tuning the two towers as a CLIP model on image-caption pairs with the DHN-NCE loss
//! (MedCLIP-SAMv2's first stage; docs/medclip_samv2.md): `mcs-engine finetune-clip`.
//!
//! Each step embeds a batch of images and their captions with the towers alone (no adapters,
//! [`crate::model::clip`]), L2-normalises both, and minimises [`ops::dhn_nce_loss`] with AdamW
//! (decoupled weight decay) under a linear warm-up then a cosine decay, both per step. Before the
//! first epoch and after each one, image-to-text and text-to-image recall at 1 and 5 on the
//! held-out pairs is measured; `latest/` and (best mean R@1) `best/` are model folders that
//! `predict --model`, `saliency --model` and `finetune-clip --model` read, and whose
//! `model.safetensors` `train --weights` reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::checkpoint::{write_folder_atomically, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE};
use crate::data::captions::{load_caption_images, CaptionPair};
use crate::data::epoch_order;
use crate::error::{Error, Result};
use crate::eval::retrieval::{retrieval_recall, Recall};
use crate::model::weights::{save_safetensors, write_atomically, WeightStore};
use crate::model::MedClipSeg;
use crate::ops::{self, AdamConfig, AdamState, DhnNceConfig};
use crate::tape::Tape;
use crate::tensor::Tensor;
use crate::tokenizer::PromptTokenizer;

/// Everything a fine-tuning run needs.
pub struct ClipOptions {
    pub train: Vec<CaptionPair>,
    pub val: Vec<CaptionPair>,
    /// Train the last `layers` blocks of each tower (0: every layer, embeddings included).
    pub layers: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Steps of linear warm-up (from 0 to the learning rate) before the cosine decay to 0.
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub loss: DhnNceConfig,
    pub seed: u64,
    pub out: PathBuf,
}

/// One row of `metrics.csv`: epoch 0 is the model before fine-tuning.
#[derive(Clone, Debug, Serialize)]
pub struct ClipRecord {
    pub epoch: usize,
    pub learning_rate: f64,
    /// Mean DHN-NCE loss over the epoch's steps (none for epoch 0).
    pub loss: Option<f64>,
    pub recall: Recall,
    pub seconds: f64,
}

/// Receives the run's progress (the CLI draws bars from it).
pub trait ClipProgress {
    fn epoch_started(&mut self, _epoch: usize, _epochs: usize, _batches: usize) {}
    fn batch_done(&mut self, _loss: f32) {}
    fn evaluated(&mut self, _record: &ClipRecord, _is_best: bool) {}
}

/// How a run ended: every record (epoch 0 first) and the best epoch by mean R@1.
pub struct ClipReport {
    pub records: Vec<ClipRecord>,
    pub best_epoch: usize,
    pub trainable_parameters: usize,
}

/// The learning rate at `step` (0-based) of `total`: linear warm-up over `warmup` steps, then a
/// cosine decay to 0 over the remaining ones.
pub fn warmup_cosine(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    peak * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()) / 2.0
}

/// The parameter-key parts that train when the last `layers` blocks of each tower do (0: all of
/// both towers). The heads that make the embeddings (`ln_post`, `proj`, the text projection)
/// always train.
pub fn trainable_parts(model: &MedClipSeg, layers: usize) -> Vec<String> {
    if layers == 0 {
        return vec!["vision_model.".into(), "text_model.".into()];
    }
    let c = model.config();
    let mut parts: Vec<String> =
        vec!["vision_model.ln_post".into(), "vision_model.proj".into(), "text_model.proj.".into()];
    for i in c.vision_layers.saturating_sub(layers)..c.vision_layers {
        parts.push(format!("vision_model.transformer.resblocks.{i}."));
    }
    for i in c.text_layers.saturating_sub(layers)..c.text_layers {
        parts.push(format!("text_model.transformer.encoder.layer.{i}."));
    }
    parts
}

/// The model with exactly the parameters `parts` names trainable, on copies of its weights (the
/// optimiser updates them in place; the caller's model keeps its own).
fn with_trainable(model: &MedClipSeg, parts: Vec<String>) -> Result<MedClipSeg> {
    let mut config = model.config().clone();
    config.trainable = parts;
    let copies = model
        .parameters()
        .iter()
        .map(|(key, t)| Ok((key.clone(), Tensor::from_vec(t.to_vec()?, t.shape())?)))
        .collect::<Result<_>>()?;
    let store = WeightStore::from_tensors("the model being fine-tuned", copies);
    MedClipSeg::from_store(config, store, model.device())
}

/// Image and text embeddings `[n, embed]` of `pairs`, L2-normalised, on the inference tape.
fn embed_all(
    model: &MedClipSeg,
    tokenizer: &PromptTokenizer,
    pairs: &[CaptionPair],
    batch: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut images, mut texts) = (Vec::new(), Vec::new());
    let size = model.config().image_size;
    let indices: Vec<usize> = (0..pairs.len()).collect();
    for chunk in indices.chunks(batch.max(1)) {
        let (pixels, ids) = batch_inputs(model, tokenizer, pairs, chunk, size)?;
        let tape = Tape::inference();
        let (image, text) = normalised_embeddings(model, &tape, &pixels, &ids)?;
        images.extend(image.to_vec()?);
        texts.extend(text.to_vec()?);
    }
    Ok((images, texts))
}

fn batch_inputs(
    model: &MedClipSeg,
    tokenizer: &PromptTokenizer,
    pairs: &[CaptionPair],
    indices: &[usize],
    size: usize,
) -> Result<(Tensor, Vec<u32>)> {
    let pixels = load_caption_images(pairs, indices, size)?;
    let pixels = Tensor::from_slice(&pixels, &[indices.len(), 3, size, size], model.device())?;
    let mut ids = Vec::with_capacity(indices.len() * tokenizer.context_length());
    for &i in indices {
        ids.extend(
            tokenizer
                .encode(&pairs[i].caption)
                .map_err(Error::within(format!("{}: caption", pairs[i].image.display())))?,
        );
    }
    Ok((pixels, ids))
}

fn normalised_embeddings(model: &MedClipSeg, tape: &Tape, pixels: &Tensor, ids: &[u32]) -> Result<(Tensor, Tensor)> {
    let image = ops::l2_normalize_last(tape, &model.image_embedding(tape, pixels)?)?;
    let text = ops::l2_normalize_last(tape, &model.text_embedding(tape, ids)?)?;
    Ok((image, text))
}

/// Recall of `model` on `pairs`.
pub fn recall(model: &MedClipSeg, tokenizer: &PromptTokenizer, pairs: &[CaptionPair], batch: usize) -> Result<Recall> {
    let (images, texts) = embed_all(model, tokenizer, pairs, batch)?;
    let captions: Vec<String> = pairs.iter().map(|p| p.caption.clone()).collect();
    Ok(retrieval_recall(&images, &texts, &captions, model.config().embed_dim))
}

/// Fine-tunes `model` as `options` say; returns after the last epoch, with `latest/` and `best/`
/// written after each epoch (atomically), `metrics.csv` and `curves.png`. A non-finite loss stops
/// the run before it updates anything, leaving the last good checkpoints.
pub fn finetune(
    model: &MedClipSeg,
    tokenizer: &PromptTokenizer,
    tokenizer_json: &[u8],
    options: &ClipOptions,
    progress: &mut dyn ClipProgress,
) -> Result<ClipReport> {
    let o = options;
    if o.train.len() < 2 || o.val.is_empty() {
        return Err(Error::Invalid(format!(
            "fine-tuning needs at least two training pairs (a batch needs a negative) and one held-out pair; got {} and {}",
            o.train.len(),
            o.val.len()
        )));
    }
    if o.batch_size < 2 {
        return Err(Error::Invalid(
            "--batch-size must be at least 2: DHN-NCE contrasts each pair with the others".into(),
        ));
    }
    std::fs::create_dir_all(&o.out).map_err(Error::io(&o.out))?;
    let original_trainable = model.config().trainable.clone();
    let mut model = with_trainable(model, trainable_parts(model, o.layers))?;
    let trainable_parameters = model.trainable_parameters().map(|(_, t)| t.numel()).sum();
    let params: Vec<&Tensor> = model.trainable_parameters().map(|(_, t)| t).collect();
    let mut optimizer = AdamState::new(&params)?;
    let adam = AdamConfig { weight_decay: o.weight_decay, ..AdamConfig::default() };
    let size = model.config().image_size;
    // A last batch of one pair has no negative: it is left out of that epoch (the order changes
    // every epoch, so no pair is left out every time).
    let batches_per_epoch = o.train.len() / o.batch_size + usize::from(o.train.len() % o.batch_size >= 2);
    let total_steps = batches_per_epoch * o.epochs;

    let started = Instant::now();
    let before = recall(&model, tokenizer, &o.val, o.batch_size)?;
    let mut records = vec![ClipRecord {
        epoch: 0,
        learning_rate: 0.0,
        loss: None,
        recall: before,
        seconds: started.elapsed().as_secs_f64(),
    }];
    progress.evaluated(&records[0], true);
    let mut best = (mean_r1(&before), 0);
    save(&o.out.join("best"), &model, &original_trainable, tokenizer_json)?;
    let mut step = 0usize;
    for epoch in 0..o.epochs {
        progress.epoch_started(epoch + 1, o.epochs, batches_per_epoch);
        let started = Instant::now();
        let (mut loss_sum, mut steps) = (0.0f64, 0usize);
        let mut lr = 0.0;
        for chunk in epoch_order(o.train.len(), o.seed, epoch as u64, true).chunks(o.batch_size) {
            if chunk.len() < 2 {
                continue;
            }
            let (pixels, ids) = batch_inputs(&model, tokenizer, &o.train, chunk, size)?;
            let tape = Tape::new();
            let (image, text) = normalised_embeddings(&model, &tape, &pixels, &ids)?;
            let loss = ops::dhn_nce_loss(&tape, &image, &text, o.loss)?;
            let value = loss.to_scalar()?;
            if !value.is_finite() {
                return Err(Error::Invalid(format!(
                    "epoch {}, step {}: the DHN-NCE loss became {value}; lower the learning rate or check the data",
                    epoch + 1,
                    steps + 1
                )));
            }
            let grads = tape.backward(&loss)?;
            drop((loss, image, text));
            lr = warmup_cosine(step, total_steps, o.warmup_steps, o.learning_rate);
            model.update_parameters(|params| {
                let grad_list = params
                    .iter()
                    .map(|(key, t)| {
                        grads.get(t).ok_or_else(|| Error::Invalid(format!("parameter `{key}` received no gradient")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut tensors: Vec<&mut Tensor> = params.iter_mut().map(|(_, t)| &mut **t).collect();
                ops::adam_step(&mut tensors, &grad_list, &mut optimizer, lr, adam)
            })?;
            step += 1;
            steps += 1;
            loss_sum += f64::from(value);
            progress.batch_done(value);
        }
        let recall = recall(&model, tokenizer, &o.val, o.batch_size)?;
        let record = ClipRecord {
            epoch: epoch + 1,
            learning_rate: lr,
            loss: Some(loss_sum / steps.max(1) as f64),
            recall,
            seconds: started.elapsed().as_secs_f64(),
        };
        let is_best = mean_r1(&recall) > best.0;
        save(&o.out.join("latest"), &model, &original_trainable, tokenizer_json)?;
        if is_best {
            best = (mean_r1(&recall), epoch + 1);
            save(&o.out.join("best"), &model, &original_trainable, tokenizer_json)?;
        }
        records.push(record);
        write_metrics(&o.out, &records)?;
        progress.evaluated(records.last().expect("just pushed"), is_best);
    }
    write_metrics(&o.out, &records)?;
    Ok(ClipReport { records, best_epoch: best.1, trainable_parameters })
}

fn mean_r1(r: &Recall) -> f64 {
    (r.image_to_text_r1 + r.text_to_image_r1) / 2.0
}

/// A model folder (`model.safetensors`, `config.json`, `tokenizer.json`), written atomically. The
/// config keeps the model's own trainable parts, so a later `train` trains what it trained before.
fn save(dir: &Path, model: &MedClipSeg, trainable: &[String], tokenizer_json: &[u8]) -> Result<()> {
    let mut config = model.config().clone();
    config.trainable = trainable.to_vec();
    write_folder_atomically(dir, |tmp| {
        let params: Vec<(String, Tensor)> = model.parameters().iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        let metadata = HashMap::from([("format".to_string(), "mcs-engine".to_string())]);
        save_safetensors(&tmp.join(MODEL_FILE), &params, metadata)?;
        config.save(&tmp.join(CONFIG_FILE))?;
        write_atomically(&tmp.join(TOKENIZER_FILE), tokenizer_json)
    })
}

/// `metrics.csv` and `curves.png` (loss, and the mean R@1 of both directions, per epoch).
fn write_metrics(out: &Path, records: &[ClipRecord]) -> Result<()> {
    let mut csv = String::from("epoch,learning_rate,loss,i2t_r1,i2t_r5,t2i_r1,t2i_r5,seconds\n");
    for r in records {
        let loss = r.loss.map_or(String::new(), |l| format!("{l:.6}"));
        let m = &r.recall;
        csv.push_str(&format!(
            "{},{:e},{loss},{:.4},{:.4},{:.4},{:.4},{:.2}\n",
            r.epoch,
            r.learning_rate,
            m.image_to_text_r1,
            m.image_to_text_r5,
            m.text_to_image_r1,
            m.text_to_image_r5,
            r.seconds
        ));
    }
    write_atomically(&out.join("metrics.csv"), csv.as_bytes())?;
    let loss: Vec<(f64, f64)> = records.iter().filter_map(|r| r.loss.map(|l| (r.epoch as f64, l))).collect();
    let r1: Vec<(f64, f64)> = records.iter().map(|r| (r.epoch as f64, mean_r1(&r.recall))).collect();
    super::plot::write_panels(
        &out.join("curves.png"),
        [("DHN-NCE loss", loss), ("held-out R@1 (mean of both directions)", r1)],
        Some(1.0),
    )
}

/// Splits `pairs` into training and held-out pairs: a seeded shuffle, the last `fraction` held
/// out (at least one pair, at most all but two).
pub fn split_pairs(pairs: Vec<CaptionPair>, fraction: f64, seed: u64) -> Result<(Vec<CaptionPair>, Vec<CaptionPair>)> {
    if pairs.len() < 3 {
        return Err(Error::Invalid(format!(
            "{} image-caption pairs cannot give two to train on and one to hold out",
            pairs.len()
        )));
    }
    let held = ((pairs.len() as f64 * fraction).round() as usize).clamp(1, pairs.len() - 2);
    let order = epoch_order(pairs.len(), seed, u64::MAX, true);
    let mut slots: Vec<Option<CaptionPair>> = pairs.into_iter().map(Some).collect();
    let mut shuffled: Vec<CaptionPair> = order.iter().map(|&i| slots[i].take().expect("a permutation")).collect();
    let val = shuffled.split_off(shuffled.len() - held);
    Ok((shuffled, val))
}

/// Where a run's files go, for the CLI's summary.
pub fn describe_outputs(out: &Path) -> String {
    format!("{0}/best and {0}/latest (model folders), {0}/metrics.csv, {0}/curves.png", out.display())
}

#[cfg(test)]
mod tests {
    use super::warmup_cosine;

    #[test]
    fn warm_up_rises_linearly_then_the_cosine_falls_to_zero() {
        assert!((warmup_cosine(0, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((warmup_cosine(9, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(55, 100, 10, 1.0) - 0.5).abs() < 1e-12);
        assert!(warmup_cosine(99, 100, 10, 1.0) < 1e-3);
        assert!((warmup_cosine(0, 10, 0, 2.0) - 2.0).abs() < 1e-12, "no warm-up starts at the peak");
    }
}
