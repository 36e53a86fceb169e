//! `mcs-engine synth`: writes the built-in synthetic ultrasound task to disk in the official
//! layout (PNG images and masks, xlsx prompt files), the same images `train` generates in memory.

use std::path::PathBuf;
use std::time::Instant;

use mcs_engine::data::{existing_layout_parts, write_official_layout};
use mcs_engine::{Error, Result};

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Folder to write {Train,Val,Test}_Folder/{img,label} and Prompts_Folder/*.xlsx into.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the images (train uses the same generator with its --seed).
    #[arg(long, default_value_t = 666, allow_negative_numbers = true)]
    seed: u64,
    /// Side of the square images in pixels (at least 96).
    #[arg(long, default_value_t = 96, value_parser = super::whole(96, usize::MAX), allow_negative_numbers = true)]
    size: usize,
    #[arg(long, default_value_t = 2000)]
    train: usize,
    #[arg(long, default_value_t = 200)]
    val: usize,
    #[arg(long, default_value_t = 200)]
    test: usize,
    /// Write into --out even when it already holds a dataset (its files of the same names are
    /// replaced).
    #[arg(long)]
    force: bool,
}

pub fn run(args: &SynthArgs) -> Result<()> {
    let existing = existing_layout_parts(&args.out);
    if !existing.is_empty() && !args.force {
        return Err(Error::Invalid(format!(
            "{}: already holds a dataset ({}); pass --force to write over it, or choose another --out",
            args.out.display(),
            existing.join(", ")
        )));
    }
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
