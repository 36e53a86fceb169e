//! `mcs-engine`: command-line front end. Every failure is printed as one sentence naming what was
//! at fault, with a non-zero exit status.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mcs_engine::cuda::{kernels::KernelFamily, nvrtc_available, unavailable_reason};
use mcs_engine::model::ModelConfig;
use mcs_engine::{Device, Result};

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
    /// Time one case with random weights and report median, spread, images/s and peak RSS:
    /// `train` (one optimisation step), `predict` (Monte-Carlo inference), `forward` (one pass),
    /// `attention` (the probabilistic attention op alone, forward and backward), `saliency` (the
    /// M2IB bottleneck of one image).
    Bench(cli::bench::BenchArgs),
    /// Write the built-in synthetic dataset in the official layout (images, masks, xlsx prompts).
    Synth(cli::synth::SynthArgs),
    /// Convert image and label volumes (NIfTI or DICOM, one per patient) into the official 2-D
    /// layout for `train --data`: PNG slices that hold foreground (plus a share of empty ones),
    /// prompts from a template, splits by patient (docs/volumes.md).
    Convert(cli::convert::ConvertArgs),
    /// Check a dataset in the official layout: every image's header decodes, every mask exists,
    /// decodes, has its image's size and at most two values, every prompt row names files inside
    /// its split. Prints a table per split and the first problems; fails when anything does.
    Check(cli::check::CheckArgs),
    /// Segment an image (or every image of a dataset split) from a text prompt: writes the binary
    /// mask, the mean foreground probability and the uncertainty (entropy of the mean over
    /// Monte-Carlo samples) as PNGs and .npy arrays, and an overlay, at the input's own size. A
    /// NIfTI or DICOM volume is segmented slice by slice into NIfTI maps on its own grid.
    Predict(cli::predict::PredictArgs),
    /// Score a model folder on a dataset split: DSC, NSD (2 px), ECE, Brier and uncertainty
    /// AUROC per image (CSV) and per split (table, JSON); --prompt-sweep over the prompt styles;
    /// --zero-shot scores the coarse masks of `saliency` instead of the segmenter's.
    Eval(cli::eval::EvalArgs),
    /// Fine-tune the vision and text towers on image-caption pairs with the DHN-NCE loss
    /// (MedCLIP-SAMv2's first stage), with retrieval recall before and after.
    FinetuneClip(cli::finetune_clip::FinetuneClipArgs),
    /// Zero-shot saliency of a text prompt with the Multi-modal Information Bottleneck (M2IB, as
    /// MedCLIP-SAMv2) on the frozen CLIP towers: writes the saliency map (PNG, .npy), a coarse
    /// mask (k-means, largest connected components) and SAM's box and point prompts
    /// (prompts.json) per image. SAM itself is not run.
    Saliency(cli::saliency::SaliencyArgs),
    /// Rank unlabelled images for annotation by the model's Monte-Carlo uncertainty: writes a CSV
    /// (expected Dice loss, mean entropy, foreground uncertainty per image, best first);
    /// --simulate measures on a labelled dataset whether labelling the ranked images beats random.
    Rank(cli::rank::RankArgs),
    /// Show the devices, how the CUDA kernels are built, and the model presets.
    Info,
}

fn main() -> ExitCode {
    quit_quietly_on_closed_pipe();
    cli::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => cli::train::run(&args),
        Command::Synth(args) => cli::synth::run(&args),
        Command::Check(args) => cli::check::run(&args),
        Command::Convert(args) => cli::convert::run(&args),
        Command::Bench(args) => cli::bench::run(&args),
        Command::Predict(args) => cli::predict::run(&args),
        Command::Eval(args) => cli::eval::run(&args),
        Command::FinetuneClip(args) => cli::finetune_clip::run(&args),
        Command::Saliency(args) => cli::saliency::run(&args),
        Command::Rank(args) => cli::rank::run(&args),
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

/// `mcs-engine info | head -1` must end quietly when the reader goes away, as command-line tools
/// do, instead of panicking in `println!` on the broken pipe (Rust ignores SIGPIPE by default).
fn quit_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread is started; no
    // handler runs Rust code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn info() -> Result<()> {
    match unavailable_reason() {
        None => {
            let device = Device::cuda(0)?;
            let Device::Cuda(gpu) = &device else { unreachable!("Device::cuda gives a CUDA device") };
            println!("GPU: available ({}: {})", device.name(), gpu.name()?);
            if device.is_emulated() {
                println!(
                    "     this is the emulated GPU (tools/emulated_gpu.sh, docs/emulated_gpu.md): the CUDA code runs \
                     on the CPU with the GPU's semantics and checks, for correctness; its timings are no GPU figures"
                );
            }
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
