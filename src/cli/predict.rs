//! `mcs-engine predict`: one image and prompt, or a whole split of a dataset in the official
//! layout, through [`Segmenter`]; writes the files of [`mcs_engine::segment::output`] per image.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mcs_engine::data::{self, Image8};
use mcs_engine::imaging::check_image_file;
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::MedClipSeg;
use mcs_engine::segment::{
    read_image_within, select_device, write_mask_png, write_outputs, Options, Segmenter, DEFAULT_MAX_PIXELS,
};
use mcs_engine::tokenizer::{preset_tokenizer_json, PromptTokenizer};
use mcs_engine::{Error, Result};

#[derive(clap::Args)]
pub struct PredictArgs {
    /// Input image (PNG or JPEG), or a volume: a NIfTI file (.nii, .nii.gz), a DICOM file or a
    /// DICOM series folder, segmented slice by slice into mask.nii.gz, probability.nii.gz,
    /// uncertainty.nii.gz (on the input's grid, with its affine) and overlay.png (the slice with
    /// the largest mask); see --axis, --window, --percentiles and docs/volumes.md. Without it (and without --data) a built-in picture is used: image
    /// Test_Folder/img/synthetic_002200.png of the synthetic task (`mcs-engine synth`), with its
    /// own prompt unless --prompt is given.
    #[arg(long, conflicts_with = "data")]
    image: Option<PathBuf>,
    /// What to segment, e.g. "one small round polyp in the upper left of the image" (needed with --image).
    #[arg(long)]
    prompt: Option<String>,
    /// A dataset in the official layout: predicts every image of --split with its own prompt.
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
    /// tokenizer.json), e.g. runs/train/best. Replaces --config, --weights and --tokenizer.
    /// Default, when none of those is given either: the demo checkpoint weights/demo (looked for
    /// under the current directory, then under the clone that holds this executable).
    #[arg(long, conflicts_with_all = ["config", "weights", "tokenizer"])]
    model: Option<PathBuf>,
    /// Model config: a preset name (tiny, small, unimedclip-vit-b16) or a config.json path, used
    /// with --weights, or alone for random weights (default with --weights or --tokenizer: tiny).
    #[arg(long)]
    config: Option<String>,
    /// Weights (safetensors with the official MedCLIPSeg keys). With --config or --tokenizer but
    /// without --weights, random weights are used, which exercise the whole pipeline but segment
    /// nothing meaningful.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// tokenizer.json (BERT WordPiece). Defaults to the preset's own for `tiny` and `small`.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    sampling: super::SamplingArgs,
    /// auto (the GPU when one can be used), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output folder: the maps of one image, or one sub-folder per image of a split, named by the
    /// image's file name without its extension (case_01.png -> case_01/); images whose names
    /// differ only in the extension (a.png and a.jpg) keep it instead (a.png/, a.jpg/), so no
    /// result overwrites another. An image listed twice, or names that still meet (ignoring
    /// case), are refused before any work. Naming an existing file is an error.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// With --data, how the results are laid out in --out: folders (one sub-folder of maps per
    /// image, as above) or flat (only the masks, one PNG per image named like the image with a
    /// .png extension, 255 = foreground: the folder external evaluators read; the rule above
    /// keeps names apart when stems meet).
    #[arg(long, default_value = "folders", value_parser = ["folders", "flat"], requires = "data")]
    layout: String,
    /// The most pixels (width x height) an input image may have, checked from the file's header
    /// before it is decoded (default 100 megapixels; predict holds up to about 32 bytes per
    /// pixel). At most this machine's memory / 32 bytes (docs/limits.md).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_parser = super::max_pixels, allow_negative_numbers = true)]
    max_pixels: u64,
    #[command(flatten)]
    volume: super::predict_volume::VolumeArgs,
}

pub fn run(args: &PredictArgs) -> Result<()> {
    let options = Options { max_pixels: args.max_pixels, ..args.sampling.options()? };
    if args.out.is_file() {
        return Err(Error::Invalid(format!(
            "--out {}: is a file, not a folder (the maps are written into a folder)",
            args.out.display()
        )));
    }
    if let Some(path) = args.image.as_deref().filter(|p| mcs_engine::volume::is_volume_path(p)) {
        let load = || load_segmenter(args);
        return super::predict_volume::run(path, args.prompt.as_deref(), &args.out, &options, &args.volume, load);
    }
    if let Some(path) = &args.image {
        // A too large or unreadable image is refused from its header, before the model loads.
        check_image_file(path, options.max_pixels)?;
    }
    let started = Instant::now();
    let segmenter = load_segmenter(args)?;
    segmenter.check_options(&options, 1)?;
    let loaded = started.elapsed();
    match &args.data {
        Some(root) => predict_split(&segmenter, args, root, &options),
        None => predict_one(&segmenter, args, &options, loaded),
    }
}

/// The model of `--model`; or `--config` with `--weights` (random weights without); or, when
/// none of `--model`, `--config`, `--weights`, `--tokenizer` is given, the demo checkpoint.
fn load_segmenter(args: &PredictArgs) -> Result<Segmenter> {
    let device = select_device(&args.device)?;
    let assembled = args.config.is_some() || args.weights.is_some() || args.tokenizer.is_some();
    if args.model.is_some() || !assembled {
        return Segmenter::load_on(super::model_or_demo(args.model.as_deref())?, &device);
    }
    let config = super::load_config(args.config.as_deref().unwrap_or("tiny"))?;
    let (context, pad) = (config.text_context_length, config.text_pad_id);
    let tokenizer = match (&args.tokenizer, preset_tokenizer_json(&config.name)) {
        (Some(path), _) => PromptTokenizer::load(path, context, pad)?,
        (None, Some(bytes)) => PromptTokenizer::from_bytes(bytes, context, pad)?,
        (None, None) => {
            return Err(Error::Invalid(format!(
                "config `{}` needs --tokenizer (a BERT tokenizer.json; tools/convert_checkpoint.py vocab makes one)",
                config.name
            )))
        }
    };
    let store = match &args.weights {
        Some(path) => WeightStore::load(path)?,
        None => {
            eprintln!(
                "note: --config without --weights, using random weights: the maps show the pipeline, not a segmentation"
            );
            WeightStore::synthetic(args.sampling.seed)
        }
    };
    Segmenter::new(MedClipSeg::from_store(config, store, &device)?, tokenizer)
}

fn predict_one(
    segmenter: &Segmenter,
    args: &PredictArgs,
    options: &Options,
    loaded: std::time::Duration,
) -> Result<()> {
    let (image, prompt) = match &args.image {
        Some(path) => {
            let image = read_image_within(path, options.max_pixels)?;
            let prompt = args.prompt.clone().ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: say what to segment with --prompt, e.g. --prompt \"one small round-shaped lesion at the center of the image\"",
                    path.display()
                ))
            })?;
            (image, prompt)
        }
        None => {
            let sample = builtin_sample();
            let prompt = args.prompt.clone().unwrap_or_else(|| sample.prompt.clone());
            eprintln!(
                "note: no --image given, using the synthetic task's {} with the prompt \"{prompt}\"",
                sample.name
            );
            (sample.image, prompt)
        }
    };
    let started = Instant::now();
    let result = segmenter.segment(&image, &prompt, options).map_err(|e| match &args.image {
        Some(path) => e.context(path.display().to_string()),
        None => e,
    })?;
    let ran = started.elapsed();
    write_outputs(&args.out, &image, &result)?;
    println!(
        "{}: {} samples on {} in {ran:.2?} (model load {loaded:.2?}); {}x{}, foreground {:.1}%, mean entropy {:.3} nats",
        args.out.display(),
        options.samples,
        segmenter.device().name(),
        result.width,
        result.height,
        result.foreground_fraction() * 100.0,
        result.mean_uncertainty()
    );
    Ok(())
}

fn predict_split(segmenter: &Segmenter, args: &PredictArgs, root: &Path, options: &Options) -> Result<()> {
    let outputs = super::open_split_outputs(root, &args.split, args.prompts.as_deref(), options.max_pixels)?;
    let (split, index, folders) = (outputs.split, outputs.index, outputs.folders);
    let bar = super::images_bar("predict", index.len());
    let started = Instant::now();
    let mut written = 0;
    for (item, folder) in index.items.iter().zip(&folders) {
        bar.set_message(item.name.clone());
        let image: Image8 = read_image_within(&item.image_path, options.max_pixels)?;
        let result = segmenter
            .segment(&image, &item.prompt, options)
            .map_err(Error::within(item.image_path.display().to_string()))?;
        if args.layout == "flat" {
            std::fs::create_dir_all(&args.out).map_err(Error::io(&args.out))?;
            write_mask_png(&args.out.join(format!("{folder}.png")), &result)?;
        } else {
            write_outputs(&args.out.join(folder), &image, &result)?;
        }
        written += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "{}: {written} images of {} ({} samples each on {}) in {:.2?}",
        args.out.display(),
        split.folder(),
        options.samples,
        segmenter.device().name(),
        started.elapsed()
    );
    Ok(())
}

/// The picture `predict` uses without `--image`: the first test image of the synthetic task as
/// `mcs-engine synth` writes it with its defaults (seed 666, 96 px, test ids from 2200), which the
/// demo checkpoint never saw in training.
fn builtin_sample() -> data::synthetic::SyntheticSample {
    data::synthetic::sample(666, 2200, 96)
}

/// The sub-folder of each image, by the rule of `--out`: the file name without its extension; for
/// names whose stems meet (ignoring case, as some file systems do), the whole file name. Errors:
/// an image listed more than once, or folders that still meet (`a.png` beside `a.png.jpg`).
pub(super) fn output_folder_names(names: &[&str]) -> Result<Vec<String>> {
    let mut listed = HashSet::new();
    if let Some(twice) = names.iter().find(|name| !listed.insert(**name)) {
        return Err(Error::Invalid(format!(
            "image '{twice}' is listed more than once: predict writes one result folder per image (list it once)"
        )));
    }
    let stem =
        |name: &str| Path::new(name).file_stem().map_or_else(|| name.to_string(), |s| s.to_string_lossy().into_owned());
    let mut by_stem: HashMap<String, usize> = HashMap::new();
    for name in names {
        *by_stem.entry(stem(name).to_lowercase()).or_default() += 1;
    }
    let folders: Vec<String> = names
        .iter()
        .map(|name| if by_stem[&stem(name).to_lowercase()] > 1 { name.to_string() } else { stem(name) })
        .collect();
    let mut first: HashMap<String, &str> = HashMap::new();
    for (name, folder) in names.iter().zip(&folders) {
        if let Some(other) = first.insert(folder.to_lowercase(), name) {
            return Err(Error::Invalid(format!(
                "images '{other}' and '{name}' would share the output folder '{folder}': rename one"
            )));
        }
    }
    Ok(folders)
}

#[cfg(test)]
mod tests {
    use super::output_folder_names;

    #[test]
    fn folders_drop_the_extension_unless_stems_meet() {
        let folders = output_folder_names(&["b.png", "a.png", "a.JPG", "c"]).unwrap();
        assert_eq!(folders, ["b", "a.png", "a.JPG", "c"]);
    }

    #[test]
    fn an_image_listed_twice_or_folders_that_still_meet_are_refused() {
        let twice = output_folder_names(&["a.png", "b.png", "a.png"]).unwrap_err().to_string();
        assert!(twice.contains("'a.png' is listed more than once"), "{twice}");
        let meet = output_folder_names(&["a.png", "a.jpg", "a.png.jpg"]).unwrap_err().to_string();
        assert!(meet.contains("images 'a.png' and 'a.png.jpg' would share the output folder 'a.png'"), "{meet}");
    }
}
