//! `bench predict` and `bench forward`: inference with random weights at the model's resolution.
//!
//! `predict` times what [`Segmenter::segment_batch`](mcs_engine::Segmenter::segment_batch) does
//! for a batch of images already at the model's size, except reading the files and tokenizing:
//! the pre-processing of each 8-bit B, G, R image (`data::resize_linear`, here the identity
//! size, and `data::normalise_bgr`), the upload, [`MedClipSeg::predict`] (the deterministic part
//! before the first adapter once, the `--samples` draws stacked in the batch dimension, their
//! mean probability and entropy), the read-back of the model-resolution probability, and each
//! item's maps and mask (`segment::full_resolution_maps`; at the model's own size it resizes
//! nothing). Left out: image decoding, tokenizing (the ids are made once; the paper's tokenizer
//! does not ship here) and writing PNG/.npy files. `mcs-engine predict` adds those.
//!
//! `forward`: one inference forward pass ([`MedClipSeg::forward`] on an inference tape, one
//! sample) to the `[B, H, W]` logits, from pixels already on the device.

use mcs_engine::data::{self, Image8};
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{MedClipSeg, NoiseMode, Sampling, Trace};
use mcs_engine::segment::full_resolution_maps;
use mcs_engine::tensor::{live_tensor_bytes, peak_tensor_bytes, reset_peak_tensor_bytes};
use mcs_engine::{Result, Tape, Tensor};

use super::{prompt_ids, Report, Setup, Timing};

/// The options' seed and threshold of `Options::default()` (the official scripts' seed).
const SEED: u64 = 666;
const THRESHOLD: f32 = 0.5;

pub fn run_predict(setup: &Setup) -> Result<Report> {
    let (config, device, args) = (&setup.config, &setup.device, setup.args);
    let (batch, samples, size) = (setup.batch(1), setup.samples(), config.image_size);
    let noise = setup.noise();
    // As a Segmenter prepares its model: the frozen weights in the CPU GEMM's panels.
    let mut model = MedClipSeg::from_store(config.clone(), WeightStore::synthetic(1), device)?;
    model.pack_frozen_weights()?;
    let ids = prompt_ids(config, batch, None)?;
    let images: Vec<Image8> = (0..batch).map(|b| test_image(size, b)).collect::<Result<_>>()?;

    let (timing, peak_mib) = with_tensor_peak(|| {
        Timing::measure(device, args.warmup, args.steps, |_| {
            let mut pixels = Vec::with_capacity(batch * 3 * size * size);
            for image in &images {
                pixels.extend(data::normalise_bgr(&data::resize_linear(image, size, size)?)?);
            }
            let pixels = Tensor::from_slice(&pixels, &[batch, 3, size, size], device)?;
            let prediction = model.predict_sampled(&pixels, &ids, Sampling::inference(SEED, samples, noise))?;
            let model_probability = prediction.probability.to_vec()?;
            let mut foreground = 0usize;
            for item in 0..batch {
                let (probability, uncertainty) = full_resolution_maps(&prediction.logits, item, size, size)?;
                foreground += probability.iter().filter(|&&p| p > THRESHOLD).count();
                std::hint::black_box((&uncertainty, &model_probability));
            }
            std::hint::black_box(foreground);
            Ok(())
        })
    })?;
    let images_per_second = batch as f64 / timing.median;
    let mut fields = serde_json::Map::new();
    fields.insert("batch".into(), batch.into());
    fields.insert("samples".into(), samples.into());
    fields.insert("noise".into(), noise.to_string().into());
    timing.insert(&mut fields, "");
    fields.insert("images_per_s".into(), images_per_second.into());
    fields.insert("peak_step_tensor_mib".into(), peak_mib.into());
    let text = format!(
        "predict, batch {batch} x {samples} {noise} samples at {size} px: {} = {images_per_second:.2} images/s; step tensors \
         peak {peak_mib:.1} MiB above the model",
        timing.text()
    );
    Ok(Report { fields, text, timings: vec![("predict".into(), timing)] })
}

pub fn run_forward(setup: &Setup) -> Result<Report> {
    let (config, device, args) = (&setup.config, &setup.device, setup.args);
    let (batch, size) = (setup.batch(1), config.image_size);
    // As a Segmenter prepares its model: the frozen weights in the CPU GEMM's panels.
    let mut model = MedClipSeg::from_store(config.clone(), WeightStore::synthetic(1), device)?;
    model.pack_frozen_weights()?;
    let ids = prompt_ids(config, batch, None)?;
    let mut pixels = Vec::with_capacity(batch * 3 * size * size);
    for b in 0..batch {
        pixels.extend(data::normalise_bgr(&test_image(size, b)?)?);
    }
    let pixels = Tensor::from_slice(&pixels, &[batch, 3, size, size], device)?;

    let (timing, peak_mib) = with_tensor_peak(|| {
        Timing::measure(device, args.warmup, args.steps, |_| {
            let tape = Tape::inference();
            let sampling = Sampling::inference(SEED, 1, NoiseMode::Plain);
            let out = model.forward(&tape, &pixels, &ids, sampling, None, &mut Trace::disabled())?;
            std::hint::black_box(out.logits);
            Ok(())
        })
    })?;
    let images_per_second = batch as f64 / timing.median;
    let mut fields = serde_json::Map::new();
    fields.insert("batch".into(), batch.into());
    fields.insert("samples".into(), 1.into());
    timing.insert(&mut fields, "");
    fields.insert("images_per_s".into(), images_per_second.into());
    fields.insert("peak_step_tensor_mib".into(), peak_mib.into());
    let text = format!(
        "forward, batch {batch}, one sample at {size} px: {} = {images_per_second:.2} images/s; step tensors peak \
         {peak_mib:.1} MiB above the model",
        timing.text()
    );
    Ok(Report { fields, text, timings: vec![("forward".into(), timing)] })
}

/// Runs `f` and returns its value with the peak of live tensor bytes above what was alive
/// before it (MiB): the steps' own tensors, on whichever device they live.
fn with_tensor_peak<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    reset_peak_tensor_bytes();
    let resident = live_tensor_bytes();
    let value = f()?;
    Ok((value, (peak_tensor_bytes() - resident) as f64 / (1 << 20) as f64))
}

/// A deterministic 8-bit B, G, R picture at the model's size: a bright disc on a gradient
/// (the content does not change the cost; it only keeps the input away from a constant).
pub(super) fn test_image(size: usize, index: usize) -> Result<Image8> {
    let centre = size as f64 * (0.35 + 0.1 * (index % 3) as f64);
    let mut data = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            let d = ((x as f64 - centre).powi(2) + (y as f64 - centre).powi(2)).sqrt();
            let v = if d < size as f64 / 6.0 { 220 } else { (40 + (x + y) * 100 / (2 * size)) as u8 };
            data.extend([v, v, v]);
        }
    }
    Image8::from_raw(size, size, 3, data)
}
