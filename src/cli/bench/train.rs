//! `bench train`: one optimisation step (forward with one Monte-Carlo sample per image, the
//! recipe's losses, backward, Adam) on one real batch of the synthetic task, reused every step;
//! what `tools/bench_reference.py train` compares against PyTorch.

use mcs_engine::data::{synthetic_splits, Loader, LoaderConfig};
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::MedClipSeg;
use mcs_engine::tensor::{live_tensor_bytes, peak_tensor_bytes, reset_peak_tensor_bytes};
use mcs_engine::train::step::{losses, new_optimizer, train_step, DeviceBatch, StepNoise};
use mcs_engine::{Error, Result, Tape};

use super::{prompt_ids, Report, Setup, Timing};

pub fn run(setup: &Setup) -> Result<Report> {
    let (config, device, args) = (&setup.config, &setup.device, setup.args);
    let mut recipe = config.training.clone();
    let batch_size = setup.batch(recipe.batch_size);
    recipe.batch_size = batch_size;
    let size = config.image_size;
    let mut model = MedClipSeg::from_store(config.clone(), WeightStore::synthetic(1), device)?;
    let mut optimizer = new_optimizer(&model)?;

    let splits = synthetic_splits(1, size, batch_size, 0, 0)?;
    let loader = Loader::new(std::sync::Arc::new(splits.train), LoaderConfig::eval(batch_size, size, 0))?;
    let batch = loader.epoch(0).next().ok_or_else(|| Error::Invalid("the synthetic split is empty".into()))??;
    let ids = prompt_ids(config, batch_size, Some(&batch.prompts))?;
    let batch = DeviceBatch::new(&batch.pixels, &batch.masks, ids, size, device)?;

    // What the tape keeps for the backward of one step: the growth of live tensor bytes over the
    // forward pass and the losses.
    let before = live_tensor_bytes();
    let tape = Tape::new();
    let kept = losses(&model, &tape, &batch, &recipe, StepNoise::for_step(1, 0, recipe.text_dropout))?;
    let tape_mib = (live_tensor_bytes() - before) as f64 / (1 << 20) as f64;
    drop((kept, tape));

    reset_peak_tensor_bytes();
    let resident = live_tensor_bytes();
    let timing = Timing::measure(device, args.warmup, args.steps, |step| {
        let noise = StepNoise::for_step(1, step as u64, recipe.text_dropout);
        train_step(&mut model, &mut optimizer, &batch, &recipe, noise, 1e-4).map(drop)
    })?;
    let images_per_second = batch_size as f64 / timing.median;
    let peak_mib = (peak_tensor_bytes() - resident) as f64 / (1 << 20) as f64;
    let mut fields = serde_json::Map::new();
    fields.insert("batch".into(), batch_size.into());
    timing.insert(&mut fields, "");
    fields.insert("images_per_s".into(), images_per_second.into());
    fields.insert("peak_step_tensor_mib".into(), peak_mib.into());
    fields.insert("tape_mib".into(), tape_mib.into());
    let text = format!(
        "train step, batch {batch_size}: {} = {images_per_second:.1} images/s; the tape keeps {tape_mib:.1} MiB for \
         the backward, step tensors peak {peak_mib:.1} MiB above the model",
        timing.text()
    );
    Ok(Report { fields, text, timings: vec![("train step".into(), timing)] })
}
