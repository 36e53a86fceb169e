//! `mcs-engine saliency`: zero-shot M2IB saliency of one image and prompt, or of a whole split,
//! through [`SaliencyModel`]; writes the files of [`mcs_engine::saliency::output`] per image.

use std::path::{Path, PathBuf};
use std::time::Instant;

use mcs_engine::imaging::check_image_file;
use mcs_engine::saliency::{write_saliency_outputs, SaliencyModel, SaliencyOptions};
use mcs_engine::segment::{read_image_within, select_device, DEFAULT_MAX_PIXELS};
use mcs_engine::{Error, Result};

/// The bottleneck and post-processing flags `saliency` and `eval --zero-shot` share (the seed is
/// each command's own `--seed`).
#[derive(clap::Args)]
pub struct BottleneckArgs {
    /// Vision block after which the bottleneck sits (0 to depth - 1). Default: round(7/12 x
    /// depth), block 7 of ViT-B/16's 12.
    #[arg(long, allow_negative_numbers = true)]
    layer: Option<usize>,
    /// Weight of the KL term of the objective beta x KL - cosine (a finite number, at least 0).
    #[arg(long, default_value_t = 0.1, value_parser = non_negative, allow_negative_numbers = true)]
    beta: f32,
    /// Adam steps on the bottleneck (0: the map of the starting bottleneck).
    #[arg(long, default_value_t = 10, value_parser = super::whole(0, usize::MAX), allow_negative_numbers = true)]
    steps: usize,
    /// Adam's learning rate (a finite number above 0).
    #[arg(long, default_value_t = 1.0, value_parser = super::positive::<f64>, allow_negative_numbers = true)]
    lr: f64,
    /// Noise copies per step, stacked in one batch (at least 1).
    #[arg(long, default_value_t = 10, value_parser = super::count(), allow_negative_numbers = true)]
    copies: usize,
    /// Connected components of the k-means foreground kept in the coarse mask, largest first
    /// (at least 1); each gives one box and its points in prompts.json.
    #[arg(long, default_value_t = 1, value_parser = super::count(), allow_negative_numbers = true)]
    components: usize,
}

impl BottleneckArgs {
    /// The options with `seed`.
    pub fn options(&self, seed: u64) -> SaliencyOptions {
        SaliencyOptions {
            layer: self.layer,
            beta: self.beta,
            steps: self.steps,
            lr: self.lr,
            copies: self.copies,
            components: self.components,
            seed,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// clap parser of a finite number of at least 0.
fn non_negative(text: &str) -> std::result::Result<f32, String> {
    let value: f32 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{text} is not a finite number of at least 0"));
    }
    Ok(value)
}

#[derive(clap::Args)]
pub struct SaliencyArgs {
    /// Input image (PNG or JPEG); needs --prompt.
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    image: Option<PathBuf>,
    /// What to find, e.g. "one small round polyp in the upper left of the image" (with --image).
    #[arg(long, conflicts_with = "data")]
    prompt: Option<String>,
    /// A dataset in the official layout: every image of --split with its own prompt.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The split of --data: Train, Val or Test.
    #[arg(long, default_value = "Test", value_parser = ["Train", "Val", "Test"], requires = "data")]
    split: String,
    /// Prompt file (xlsx, csv or json with Image and Description columns) instead of the split's
    /// Prompts_Folder/<Split>_text.xlsx.
    #[arg(long, requires = "data")]
    prompts: Option<PathBuf>,
    /// A model folder as `mcs-engine train` writes it (config.json, model.safetensors,
    /// tokenizer.json); only its two towers are used, frozen. Default: the demo checkpoint
    /// weights/demo (looked for under the current directory, then under the clone that holds this
    /// executable).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    bottleneck: BottleneckArgs,
    /// Seed of the bottleneck's noise: the same seed gives the same maps, bit for bit.
    #[arg(long, default_value_t = 666, allow_negative_numbers = true)]
    seed: u64,
    /// auto (the GPU when one can be used), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output folder: the files of one image, or one sub-folder per image of a split, named as
    /// `predict --out` names them. Naming an existing file is an error.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// The most pixels (width x height) an input image may have, checked from the file's header
    /// before it is decoded (default 100 megapixels).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_parser = super::max_pixels, allow_negative_numbers = true)]
    max_pixels: u64,
}

pub fn run(args: &SaliencyArgs) -> Result<()> {
    let options = SaliencyOptions { max_pixels: args.max_pixels, ..args.bottleneck.options(args.seed) };
    if args.out.is_file() {
        return Err(Error::Invalid(format!(
            "--out {}: is a file, not a folder (the maps are written into a folder)",
            args.out.display()
        )));
    }
    // Refused before the model loads: a missing or empty prompt, an unreadable or too large image.
    if let Some(path) = &args.image {
        match args.prompt.as_deref().map(str::trim) {
            None => {
                return Err(Error::Invalid(format!(
                    "{}: say what to find with --prompt, e.g. --prompt \"one small round-shaped lesion at the center of the image\"",
                    path.display()
                )))
            }
            Some("") => return Err(Error::Invalid("--prompt is empty: say what to find in the image".into())),
            Some(_) => {}
        }
        check_image_file(path, options.max_pixels)?;
    }
    let started = Instant::now();
    let model = SaliencyModel::load_on(super::model_or_demo(args.model.as_deref())?, &select_device(&args.device)?)?;
    options.check(model.config().vision_layers).map_err(Error::within("--layer"))?;
    let loaded = started.elapsed();
    match (&args.data, &args.image) {
        (Some(root), _) => saliency_split(&model, args, root, &options),
        (None, Some(path)) => saliency_one(&model, args, path, &options, loaded),
        (None, None) => Err(Error::Invalid("give --image and --prompt, or --data".into())),
    }
}

fn saliency_one(
    model: &SaliencyModel,
    args: &SaliencyArgs,
    path: &Path,
    options: &SaliencyOptions,
    loaded: std::time::Duration,
) -> Result<()> {
    let image = read_image_within(path, options.max_pixels)?;
    let prompt = args.prompt.as_deref().unwrap_or_default();
    let started = Instant::now();
    let result = model.saliency(&image, prompt, options).map_err(Error::within(path.display().to_string()))?;
    let ran = started.elapsed();
    write_saliency_outputs(&args.out, &result)?;
    println!(
        "{}: {} steps x {} copies on {} in {ran:.2?} (model load {loaded:.2?}); {}x{}, coarse mask {:.1}%, {} box(es)",
        args.out.display(),
        options.steps,
        options.copies,
        model.device().name(),
        result.width,
        result.height,
        result.foreground_fraction() * 100.0,
        result.prompts.len()
    );
    Ok(())
}

fn saliency_split(model: &SaliencyModel, args: &SaliencyArgs, root: &Path, options: &SaliencyOptions) -> Result<()> {
    let outputs = super::open_split_outputs(root, &args.split, args.prompts.as_deref(), options.max_pixels)?;
    let (split, index, folders) = (outputs.split, outputs.index, outputs.folders);
    let bar = super::images_bar("saliency", index.len());
    let started = Instant::now();
    for (item, folder) in index.items.iter().zip(&folders) {
        bar.set_message(item.name.clone());
        let image = read_image_within(&item.image_path, options.max_pixels)?;
        let result = model
            .saliency(&image, &item.prompt, options)
            .map_err(Error::within(item.image_path.display().to_string()))?;
        write_saliency_outputs(&args.out.join(folder), &result)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "{}: {} images of {} ({} steps x {} copies each on {}) in {:.2?}",
        args.out.display(),
        index.len(),
        split.folder(),
        options.steps,
        options.copies,
        model.device().name(),
        started.elapsed()
    );
    Ok(())
}
