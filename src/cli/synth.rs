//! `mcs-engine synth`: writes the built-in synthetic ultrasound task to disk in the official
//! layout (PNG images and masks, xlsx prompt files), the same images `train` generates in memory.

use std::path::PathBuf;
use std::time::Instant;

use mcs_engine::data::write_official_layout;
use mcs_engine::Result;

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Folder to write {Train,Val,Test}_Folder/{img,label} and Prompts_Folder/*.xlsx into.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the images (train uses the same generator with its --seed).
    #[arg(long, default_value_t = 666)]
    seed: u64,
    /// Side of the square images in pixels (at least 96).
    #[arg(long, default_value_t = 96)]
    size: usize,
    #[arg(long, default_value_t = 2000)]
    train: usize,
    #[arg(long, default_value_t = 200)]
    val: usize,
    #[arg(long, default_value_t = 200)]
    test: usize,
}

pub fn run(args: &SynthArgs) -> Result<()> {
    let started = Instant::now();
    write_official_layout(&args.out, args.seed, args.size, args.train, args.val, args.test)?;
    let s = args.size;
    println!(
        "{}: {} train, {} val, {} test synthetic images of {s}x{s} written in {:.1?}",
        args.out.display(),
        args.train,
        args.val,
        args.test,
        started.elapsed()
    );
    Ok(())
}
