//! `mcs-engine`: command-line front end. Every failure is printed as one sentence naming what was
//! at fault, with a non-zero exit status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use mcs_engine::cuda::{kernels::KernelFamily, nvrtc_available, unavailable_reason};
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{MedClipSeg, ModelConfig};
use mcs_engine::tokenizer::{preset_tokenizer_json, PromptTokenizer};
use mcs_engine::train::load_model_folder;
use mcs_engine::{data, imaging, Device, Result, Tensor};

#[derive(Parser)]
#[command(
    name = "mcs-engine",
    version,
    about = "Train and run MedCLIPSeg: text-prompted medical image segmentation with per-pixel uncertainty"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

mod cli;

#[derive(Subcommand)]
enum Command {
    /// Train MedCLIPSeg: on a dataset in the official layout (--data), or with no arguments on
    /// the built-in synthetic ultrasound task. Writes best/ and latest/ checkpoints (folders that
    /// `predict --model` reads), metrics.csv and curves.png.
    Train(cli::train::TrainArgs),
    /// Time one case end to end with random weights (now: `train`, one optimisation step).
    Bench(cli::bench::BenchArgs),
    /// Write the built-in synthetic dataset in the official layout (images, masks, xlsx prompts).
    Synth(cli::synth::SynthArgs),
    /// Segment an image from a text prompt: writes the binary mask, the mean foreground
    /// probability and the uncertainty (entropy of the mean over Monte-Carlo samples) as PNGs.
    Predict(PredictArgs),
    /// Show the devices, how the CUDA kernels are built, and the model presets.
    Info,
}

#[derive(clap::Args)]
struct PredictArgs {
    /// Input image (PNG or JPEG). Without it a built-in synthetic picture is used.
    #[arg(long)]
    image: Option<PathBuf>,
    /// What to segment, e.g. "one small round polyp in the upper left of the image".
    #[arg(long, default_value = "a small bright circle in the upper left of the image")]
    prompt: String,
    /// A model folder as `mcs-engine train` writes it (config.json, model.safetensors,
    /// tokenizer.json), e.g. runs/train/best. Replaces --config, --weights and --tokenizer.
    #[arg(long, conflicts_with_all = ["weights", "tokenizer"])]
    model: Option<PathBuf>,
    /// Model config: a preset name (tiny, small, unimedclip-vit-b16) or a config.json path.
    #[arg(long, default_value = "tiny")]
    config: String,
    /// Weights (safetensors with the official MedCLIPSeg keys). Without it random weights are
    /// used, which exercises the whole pipeline but segments nothing meaningful.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// tokenizer.json (BERT WordPiece). Defaults to weights/tiny/tokenizer.json for `tiny`.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Monte-Carlo samples (the paper uses 30).
    #[arg(long, default_value_t = 30)]
    samples: usize,
    /// Seed of the sampling noise: the same seed gives the same maps, bit for bit.
    #[arg(long, default_value_t = 666)]
    seed: u64,
    /// auto (the GPU when one can be used), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Folder for mask.png, probability.png and uncertainty.png.
    #[arg(long, default_value = "out")]
    out: PathBuf,
}

fn main() -> ExitCode {
    cli::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => cli::train::run(&args),
        Command::Synth(args) => cli::synth::run(&args),
        Command::Bench(args) => cli::bench::run(&args),
        Command::Predict(args) => predict(&args),
        Command::Info => info(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn predict(args: &PredictArgs) -> Result<()> {
    let PredictArgs { image, prompt, model: model_dir, config, weights, tokenizer, samples, seed, device, out } = args;
    let (samples, seed) = (*samples, *seed);
    let device = cli::parse_device(device)?;
    let started = Instant::now();
    let folder = model_dir.as_deref().map(|dir| load_model_folder(dir, &device)).transpose()?;
    let config = match &folder {
        Some(f) => f.config.clone(),
        None => cli::load_config(config)?,
    };
    let tokenizer = match (&folder, tokenizer, preset_tokenizer_json(&config.name)) {
        (Some(f), _, _) => {
            PromptTokenizer::from_bytes(&f.tokenizer_json, config.text_context_length, config.text_pad_id)?
        }
        (None, Some(path), _) => PromptTokenizer::load(path, config.text_context_length, config.text_pad_id)?,
        (None, None, Some(bytes)) => {
            PromptTokenizer::from_bytes(bytes, config.text_context_length, config.text_pad_id)?
        }
        (None, None, None) => {
            return Err(mcs_engine::Error::Invalid(format!(
                "config `{}` needs --tokenizer (a BERT tokenizer.json; tools/convert_checkpoint.py vocab makes one)",
                config.name
            )))
        }
    };
    let ids = tokenizer.encode(prompt)?;

    let size = config.image_size;
    // A given image goes through the training pre-processing (cv2-exact resize, BGR, ImageNet).
    let (planes, w, h) = match image {
        Some(path) => {
            let bgr = data::read_bgr(path)?;
            (data::normalise_bgr(&data::resize_linear(&bgr, size, size)?)?, bgr.width, bgr.height)
        }
        None => {
            let picture = imaging::synthetic_picture(config.image_size as u32 * 2);
            (imaging::preprocess(&picture, size), picture.width() as usize, picture.height() as usize)
        }
    };
    let pixels = Tensor::from_slice(&planes, &[1, 3, size, size], &device)?;

    let model = match folder {
        Some(f) => f.model,
        None => {
            let store = match weights {
                Some(path) => WeightStore::load(path)?,
                None => {
                    eprintln!(
                        "note: no --model or --weights given, using random weights: the maps show the pipeline, not a segmentation"
                    );
                    WeightStore::synthetic(seed)
                }
            };
            MedClipSeg::from_store(config, store, &device)?
        }
    };
    let loaded = started.elapsed();
    let started = Instant::now();
    let prediction = model.predict(&pixels, &ids, seed, samples)?;
    let probability = prediction.probability.to_vec()?;
    let uncertainty = prediction.uncertainty.to_vec()?;
    let ran = started.elapsed();

    let back = |map: &[f32]| imaging::resize_nearest(map, size, size, w, h);
    let (probability, uncertainty) = (back(&probability), back(&uncertainty));
    std::fs::create_dir_all(out).map_err(mcs_engine::Error::io(out))?;
    imaging::write_gray_png(&out.join("mask.png"), &probability, w, h, |p| if p > 0.5 { 255 } else { 0 })?;
    imaging::write_gray_png(&out.join("probability.png"), &probability, w, h, |p| (p * 255.0).round() as u8)?;
    // Entropy of a Bernoulli is at most ln 2: scale so that full uncertainty is white.
    imaging::write_gray_png(&out.join("uncertainty.png"), &uncertainty, w, h, |u| {
        (u / std::f32::consts::LN_2 * 255.0).round().clamp(0.0, 255.0) as u8
    })?;
    let foreground = probability.iter().filter(|&&p| p > 0.5).count() as f32 / probability.len() as f32;
    let mean_entropy = uncertainty.iter().sum::<f32>() / uncertainty.len() as f32;
    println!(
        "{}: {samples} samples on {} in {:.2?} (model load {:.2?}); foreground {:.1}%, mean entropy {mean_entropy:.3} nats",
        out.display(),
        device.name(),
        ran,
        loaded,
        foreground * 100.0
    );
    Ok(())
}

fn info() -> Result<()> {
    match unavailable_reason() {
        None => {
            let device = Device::cuda(0)?;
            println!("GPU: available ({})", device.name());
        }
        Some(reason) => println!("GPU: not available ({reason}); the CPU backend runs everything"),
    }
    if mcs_engine::cuda::sync_launches() {
        println!("{}=1: every launch is synchronised (debugging; slow)", mcs_engine::cuda::SYNC_LAUNCHES_VAR);
    }
    let prebuilt = KernelFamily::ALL.iter().filter(|f| f.prebuilt_ptx().is_some()).count();
    println!(
        "kernels: {} families, {prebuilt} with nvcc-built sm_90 PTX; NVRTC {}",
        KernelFamily::ALL.len(),
        if nvrtc_available() { "available" } else { "not found" }
    );
    for name in ModelConfig::preset_names() {
        let c = ModelConfig::preset(name)?;
        println!(
            "config {name}: {}px images, ViT width {} with {} heads and {} layers, text {} tokens, adapters before blocks {:?}",
            c.image_size, c.vision_width, c.vision_heads, c.vision_layers, c.text_context_length, c.adapter_layers
        );
    }
    Ok(())
}
