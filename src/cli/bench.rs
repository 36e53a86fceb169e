//! `mcs-engine bench`: end-to-end timings with random weights. For now the training step (what
//! `tools/bench_reference.py train` compares against PyTorch); the predict cases belong to the
//! performance harness.

use std::time::Instant;

use mcs_engine::data::{synthetic_splits, Loader, LoaderConfig};
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::MedClipSeg;
use mcs_engine::tensor::{live_tensor_bytes, peak_tensor_bytes, reset_peak_tensor_bytes};
use mcs_engine::tokenizer::{preset_tokenizer_json, PromptTokenizer};
use mcs_engine::train::step::{losses, new_optimizer, train_step, DeviceBatch, StepNoise};
use mcs_engine::{Error, Result, Tape};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to time: `train` (one optimisation step: forward, losses, backward, Adam).
    #[arg(value_parser = ["train"])]
    case: String,
    /// Model config: a preset or a config.json path.
    #[arg(long, default_value = "small")]
    config: String,
    /// Images per step (default: the config's recipe).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Timed steps (the median and spread are over these).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first (allocator and caches warm up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// CPU threads (rayon pool; 0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.threads)
            .build_global()
            .map_err(|e| Error::Invalid(format!("cannot size the thread pool to {}: {e}", args.threads)))?;
    }
    let config = super::load_config(&args.config)?;
    let device = super::parse_device(&args.device)?;
    let mut recipe = config.training.clone();
    let batch_size = args.batch_size.unwrap_or(recipe.batch_size);
    recipe.batch_size = batch_size;
    let size = config.image_size;
    let mut model = MedClipSeg::from_store(config.clone(), WeightStore::synthetic(1), &device)?;
    let mut optimizer = new_optimizer(&model)?;

    // One real batch of the synthetic task, reused every step.
    let splits = synthetic_splits(1, size, batch_size, 0, 0)?;
    let loader = Loader::new(std::sync::Arc::new(splits.train), LoaderConfig::eval(batch_size, size, 0))?;
    let batch = loader.epoch(0).next().expect("one batch")?;
    let ids = match preset_tokenizer_json(&config.name) {
        Some(json) => {
            let tokenizer = PromptTokenizer::from_bytes(json, config.text_context_length, config.text_pad_id)?;
            tokenizer.encode_batch(&batch.prompts.iter().map(String::as_str).collect::<Vec<_>>())?
        }
        // No tokenizer ships with this config (the paper's BiomedBERT vocabulary): a 14-token
        // prompt of arbitrary ids, padded, has the same cost.
        None => (0..batch_size * config.text_context_length)
            .map(|i| {
                if i % config.text_context_length < 14 {
                    (i * 7919 % (config.text_vocab_size - 1)) as u32 + 1
                } else {
                    config.text_pad_id
                }
            })
            .collect(),
    };
    let batch = DeviceBatch::new(&batch.pixels, &batch.masks, ids, size, &device)?;

    // What the tape keeps for the backward of one step: the growth of live tensor bytes over the
    // forward pass and the losses.
    let before = live_tensor_bytes();
    let tape = Tape::new();
    let kept = losses(&model, &tape, &batch, &recipe, StepNoise::for_step(1, 0, recipe.text_dropout))?;
    let tape_mib = (live_tensor_bytes() - before) as f64 / (1 << 20) as f64;
    drop((kept, tape));

    let mut times = Vec::with_capacity(args.steps);
    reset_peak_tensor_bytes();
    let resident = live_tensor_bytes();
    for step in 0..args.warmup + args.steps {
        let noise = StepNoise::for_step(1, step as u64, recipe.text_dropout);
        device.synchronize()?;
        let started = Instant::now();
        train_step(&mut model, &mut optimizer, &batch, &recipe, noise, 1e-4)?;
        device.synchronize()?;
        if step >= args.warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let (min, max) = (times[0], times[times.len() - 1]);
    let images_per_second = batch_size as f64 / median;
    let threads = rayon::current_num_threads();
    let peak_mib = (peak_tensor_bytes() - resident) as f64 / (1 << 20) as f64;
    if args.json {
        let report = serde_json::json!({
            "case": "train", "config": config.name, "device": device.name(), "threads": threads,
            "batch": batch_size, "steps": args.steps, "median_s": median, "min_s": min, "max_s": max,
            "images_per_s": images_per_second, "peak_step_tensor_mib": peak_mib, "tape_mib": tape_mib,
        });
        println!("{report}");
    } else {
        println!(
            "train step, {} on {} ({threads} threads), batch {batch_size}: median {:.1} ms (min {:.1}, max {:.1}) over {} steps = {images_per_second:.1} images/s; the tape keeps {tape_mib:.1} MiB for the backward, step tensors peak {peak_mib:.1} MiB above the model",
            config.name,
            device.name(),
            median * 1e3,
            min * 1e3,
            max * 1e3,
            args.steps
        );
    }
    Ok(())
}
