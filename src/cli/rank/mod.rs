//! `mcs-engine rank`: an annotation queue. Predicts every image of a folder (or a dataset split)
//! with Monte-Carlo sampling and writes a CSV of the images ordered by how much a label would
//! help ([`mcs_engine::segment::rank`], docs/rank.md). `--simulate` runs the experiment that tells
//! whether the order helps ([`simulate`]).

mod simulate;

use std::path::{Path, PathBuf};
use std::time::Instant;

use mcs_engine::data::{self, PromptedImage};
use mcs_engine::segment::rank::{ranking_order, RankBy, RankScores};
use mcs_engine::segment::{read_image_within, select_device, Options, Segmenter, DEFAULT_MAX_PIXELS};
use mcs_engine::{Error, Result};

/// The Monte-Carlo samples of `rank` when `--samples` is not given (the paper's 30).
const DEFAULT_SAMPLES: usize = 30;

#[derive(clap::Args)]
pub struct RankArgs {
    /// A folder of unlabelled images (PNG or JPEG), ranked with the prompts of --prompts. Every
    /// image in it needs a prompt.
    #[arg(long, conflicts_with_all = ["data", "simulate"], requires = "prompts")]
    images: Option<PathBuf>,
    /// Prompt file (xlsx, csv or json with Image and Description columns): the prompts of
    /// --images, or, with --data, a file to use instead of the split's own prompt file.
    #[arg(long, conflicts_with = "simulate")]
    prompts: Option<PathBuf>,
    /// A dataset in the official layout: ranks the images of --split with the split's prompt file
    /// (images its prompt file does not list are skipped with a note; masks are not needed). With
    /// --simulate: the labelled dataset the experiment runs on (default: the synthetic task).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The split of --data to rank: Train, Val or Test.
    #[arg(long, default_value = "Train", value_parser = ["Train", "Val", "Test"])]
    split: String,
    /// The model folder to rank with, as `mcs-engine train` writes it (e.g. runs/train/best).
    /// Default: the demo checkpoint weights/demo.
    #[arg(long, conflicts_with = "simulate")]
    model: Option<PathBuf>,
    /// The score the CSV is sorted by, highest first (docs/rank.md): mean-entropy (the mean
    /// uncertainty over the image), expected-dice-loss (how much the Monte-Carlo draws' masks
    /// disagree with the predicted mask) or foreground-uncertainty (the uncertainty inside the
    /// predicted mask). Ties are broken by the other two scores, then by image name.
    #[arg(
        long,
        default_value = "mean-entropy",
        value_parser = ["mean-entropy", "expected-dice-loss", "foreground-uncertainty"]
    )]
    by: String,
    /// Monte-Carlo samples per image, in one batched pass (default 30, as the paper; 10 with
    /// --simulate, where the pool is ranked once per seed). At most what memory holds
    /// (docs/limits.md).
    #[arg(long, value_parser = super::count(), allow_negative_numbers = true)]
    samples: Option<usize>,
    /// Seed of the sampling noise (with --simulate: the first seed; seed k of the run is this + k).
    #[arg(long, default_value_t = 666, allow_negative_numbers = true)]
    seed: u64,
    /// How the Monte-Carlo draws share noise: plain (independent, as the official code) or
    /// antithetic (draw 2j+1 negates the noise of draw 2j).
    #[arg(long, default_value = "plain", value_parser = ["plain", "antithetic"])]
    noise: String,
    /// A pixel is in a mask when its probability is above this (a probability, 0 to 1).
    #[arg(long, default_value_t = 0.5, value_parser = super::probability, allow_negative_numbers = true)]
    threshold: f32,
    /// Images per forward pass (each pass holds samples x images logits).
    #[arg(long, default_value_t = 4, value_parser = super::count(), allow_negative_numbers = true)]
    batch_size: usize,
    /// auto (the GPU when one can be used), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// The most pixels (width x height) an input image may have, checked from its header.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_parser = super::max_pixels, allow_negative_numbers = true)]
    max_pixels: u64,
    /// Where to write: the ranking CSV (default rank.csv), or with --simulate a new folder for the
    /// runs, simulation.csv and simulation.json (default runs/rank-simulation).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    simulation: simulate::SimulationArgs,
}

pub fn run(args: &RankArgs) -> Result<()> {
    if args.simulation.simulate {
        return simulate::run(args);
    }
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("rank.csv"));
    if out.is_dir() {
        return Err(Error::Invalid(format!("--out {}: is a folder; name the CSV file to write", out.display())));
    }
    let options = sampling_options(args, DEFAULT_SAMPLES)?;
    let by = RankBy::parse(&args.by)?;
    let images = images_to_rank(args)?;
    for image in &images {
        mcs_engine::imaging::check_image_file(&image.image_path, options.max_pixels)?;
    }
    let device = select_device(&args.device)?;
    let segmenter = Segmenter::load_on(super::model_or_demo(args.model.as_deref())?, &device)?;
    segmenter.check_options(&options, args.batch_size.min(images.len()))?;
    let started = Instant::now();
    let bar = super::images_bar("rank", images.len());
    let scores = score_images(&segmenter, &images, &options, args.batch_size, &|done| bar.set_position(done as u64));
    bar.finish_and_clear();
    let scores = scores?;
    let order = ranking_order(&scores, by);
    write_ranking_csv(&out, &images, &scores, &order)?;
    print_top(&images, &scores, &order, 10);
    println!(
        "{}: {} images ranked by {} ({} samples each on {}) in {:.2?}",
        out.display(),
        images.len(),
        by.name(),
        options.samples,
        segmenter.device().name(),
        started.elapsed()
    );
    Ok(())
}

/// The segmenter's options from the sampling flags (`default_samples` when --samples is not given).
fn sampling_options(args: &RankArgs, default_samples: usize) -> Result<Options> {
    let sampling = Options {
        samples: args.samples.unwrap_or(default_samples),
        seed: args.seed,
        threshold: args.threshold,
        noise: args.noise.parse()?,
        ..Options::default()
    };
    let options = Options { max_pixels: args.max_pixels, ..sampling };
    options.check()?;
    Ok(options)
}

/// The images of `--images` with `--prompts` (every image needs a prompt), or of `--data`'s
/// split (unlisted images skipped with a note). Errors name the folder or file at fault.
fn images_to_rank(args: &RankArgs) -> Result<Vec<PromptedImage>> {
    let (folder, prompt_file, every_image_needs_a_prompt) = match (&args.images, &args.data) {
        (Some(folder), _) => {
            let prompts = args.prompts.clone().expect("clap requires --prompts with --images");
            (folder.clone(), prompts, true)
        }
        (None, Some(root)) => {
            let split = super::parse_split(&args.split)?;
            let prompts = match &args.prompts {
                Some(path) => path.clone(),
                None => data::prompt_file_path(root, split, None)?,
            };
            (root.join(split.folder()).join(data::layout::IMAGE_FOLDER), prompts, false)
        }
        (None, None) => {
            return Err(Error::Invalid(
                "say what to rank: --images DIR --prompts FILE, or --data DIR [--split Train] (or --simulate)".into(),
            ))
        }
    };
    let (images, unlisted) = data::open_prompted_images(&folder, &prompt_file)?;
    if let Some(first) = unlisted.first() {
        if every_image_needs_a_prompt {
            return Err(Error::Invalid(format!(
                "{}: no prompt for this image in {} ({} image(s) of {} have none); add a row for each",
                folder.join(first).display(),
                prompt_file.display(),
                unlisted.len(),
                folder.display()
            )));
        }
        eprintln!("note: {} image(s) in {} have no prompt and are skipped", unlisted.len(), folder.display());
    }
    Ok(images)
}

/// The scores of every image, `batch_size` images per pass, in the order given; `done` hears the
/// number of images scored so far. Only one batch's images and logits are held at a time. An
/// error names the image at fault (a failing batch is retried image by image to find it).
fn score_images(
    segmenter: &Segmenter,
    images: &[PromptedImage],
    options: &Options,
    batch_size: usize,
    done: &dyn Fn(usize),
) -> Result<Vec<RankScores>> {
    let mut scores = Vec::with_capacity(images.len());
    for batch in images.chunks(batch_size.max(1)) {
        let pictures = batch
            .iter()
            .map(|image| read_image_within(&image.image_path, options.max_pixels))
            .collect::<Result<Vec<_>>>()?;
        let items: Vec<_> =
            pictures.iter().zip(batch).map(|(picture, image)| (picture, image.prompt.as_str())).collect();
        match segmenter.rank_scores_batch(&items, options) {
            Ok(batch_scores) => scores.extend(batch_scores),
            Err(e) => return Err(name_the_failing_image(segmenter, batch, &items, options, e)),
        }
        done(scores.len());
    }
    Ok(scores)
}

/// The error of the first image of a failed batch that fails alone, named by its file; the
/// batch's own error (naming its files) when each image passes alone.
fn name_the_failing_image(
    segmenter: &Segmenter,
    batch: &[PromptedImage],
    items: &[(&data::Image8, &str)],
    options: &Options,
    batch_error: Error,
) -> Error {
    for (image, item) in batch.iter().zip(items) {
        if let Err(e) = segmenter.rank_scores_batch(std::slice::from_ref(item), options) {
            return Error::Invalid(format!("{}: {e}", image.image_path.display()));
        }
    }
    let names: Vec<&str> = batch.iter().map(|image| image.name.as_str()).collect();
    Error::Invalid(format!("the batch of {}: {batch_error}", names.join(", ")))
}

/// Writes the ranking as CSV (atomically): `rank, image, mean_entropy, expected_dice_loss,
/// foreground_uncertainty, prompt`, one row per image in `order` (rank 1 first).
fn write_ranking_csv(path: &Path, images: &[PromptedImage], scores: &[RankScores], order: &[usize]) -> Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let failed = |e: csv::Error| Error::Invalid(format!("{}: cannot format the CSV: {e}", path.display()));
    let mut header = vec!["rank", "image"];
    header.extend(RankBy::ALL.map(RankBy::column));
    header.push("prompt");
    writer.write_record(&header).map_err(failed)?;
    for (rank, &i) in order.iter().enumerate() {
        let mut row = vec![(rank + 1).to_string(), images[i].name.clone()];
        row.extend(RankBy::ALL.map(|by| format!("{:.6}", by.of(&scores[i]))));
        row.push(images[i].prompt.clone());
        writer.write_record(&row).map_err(failed)?;
    }
    let bytes = writer.into_inner().map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    mcs_engine::files::write_atomically(path, &bytes)
}

/// The first `count` rows of the ranking as a table on stdout.
fn print_top(images: &[PromptedImage], scores: &[RankScores], order: &[usize], count: usize) {
    println!(
        "{:>5}  {:<32} {:>12} {:>18} {:>22}",
        "rank", "image", "mean_entropy", "expected_dice_loss", "foreground_uncertainty"
    );
    for (rank, &i) in order.iter().enumerate().take(count) {
        let s = &scores[i];
        println!(
            "{:>5}  {:<32} {:>12.4} {:>18.4} {:>22.4}",
            rank + 1,
            images[i].name,
            s.mean_entropy,
            s.expected_dice_loss,
            s.foreground_uncertainty
        );
    }
    if order.len() > count {
        println!("  ... {} more in the CSV", order.len() - count);
    }
}
