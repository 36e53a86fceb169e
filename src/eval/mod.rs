//! Evaluation of a split in the official layout (docs/model.md §7): per image, the metrics of
//! [`metrics`]; per split, their means (DSC, NSD, AUROC) and the pixel-pooled calibration (ECE,
//! Brier); the prompt-robustness sweep over the five `Test_text_<variant>.xlsx` files.
//!
//! Which maps each metric reads:
//! - DSC and NSD score the mask `predict` writes with the same options
//!   ([`crate::segment::MaskResize`]): by default the official `eval.py`'s, the mask at the
//!   model's resolution (`mean probability > threshold`) resized nearest (cv2 `INTER_NEAREST`) to
//!   the ground truth's size; the ground truth read as `cv2.imread(path, 0)` and binarised at 127.
//! - ECE and Brier describe the probability map `predict` delivers (bilinear logits at the
//!   image's own size, [`crate::segment`]); the uncertainty AUROC ranks that entropy map against
//!   the pixels where the same mask differs from the truth.
//!
//! [`evaluate_zero_shot`] scores the coarse masks of the zero-shot saliency ([`crate::saliency`])
//! the same way ([`score_saliency`] says what differs).
//!
//! Per-image values are kept at full precision (the official script rounds each to 4 decimals
//! before the mean, which moves a mean by less than 5e-5).

#![warn(missing_docs)]

pub mod bootstrap;
pub mod metrics;
pub mod report;
pub mod retrieval;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::{self, DatasetIndex, Image8};
use crate::error::{Error, Result};
use crate::saliency::{Saliency, SaliencyModel, SaliencyOptions};
use crate::segment::{Options, Segmentation, Segmenter};
use metrics::{auroc, dice, nsd, Calibration};

/// NSD tolerance of the official evaluation, in pixels.
pub const NSD_TOLERANCE: f64 = 2.0;

/// The prompt styles of the official robustness study (docs/model.md §7), in the order they are reported.
pub const PROMPT_VARIANTS: [&str; 5] =
    ["original", "contradictory", "missing_location", "overdescriptive", "underdescriptive"];

/// How a split is evaluated.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalOptions {
    /// Samples, seed and threshold of the predictions.
    pub segment: Options,
    /// Images per forward pass: memory and speed only, an image's maps are the same in any batch
    /// (with `samples` 1 and training's seed, eval reproduces training's validation Dice).
    pub batch_size: usize,
    /// NSD tolerance in pixels.
    pub tolerance: f64,
}

/// One image's scores.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageRecord {
    /// The image's file name.
    pub image: String,
    /// The image's (and its ground truth's) size.
    pub width: usize,
    /// See `width`.
    pub height: usize,
    /// Dice of the mask `predict` writes with the same options (`--resize`, default the official
    /// one: model resolution, resized nearest) against the truth.
    pub dice: f64,
    /// Normalised surface Dice at the tolerance ([`metrics::nsd`]).
    pub nsd: f64,
    /// Expected calibration error of the image's probability map ([`Calibration`]).
    pub ece: f64,
    /// Brier score of the image's probability map.
    pub brier: f64,
    /// Uncertainty-vs-error AUROC; `None` when the image has no misclassified pixel (or only
    /// misclassified ones).
    pub auroc: Option<f64>,
    /// Foreground pixels of the ground truth and of the prediction (at the ground truth's size).
    pub truth_pixels: usize,
    /// See `truth_pixels`.
    pub predicted_pixels: usize,
    /// Mean uncertainty (nats).
    pub mean_uncertainty: f64,
}

/// A split's scores.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// What was evaluated (e.g. `Test` or a prompt variant).
    pub name: String,
    /// The prompt file read.
    pub prompts: PathBuf,
    /// Images scored.
    pub images: usize,
    /// Monte-Carlo samples per image.
    pub samples: usize,
    /// Seed of the noise.
    pub seed: u64,
    /// Noise mode of the draws (`plain` or `antithetic`).
    pub noise: String,
    /// How the mask reached the image's size (`official` or `bilinear`).
    pub resize: String,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Mean Dice over images.
    pub dice: f64,
    /// Mean NSD over images.
    pub nsd: f64,
    /// ECE over all pixels of the split pooled.
    pub ece: f64,
    /// Brier score over all pixels of the split pooled.
    pub brier: f64,
    /// Mean over the images where it is defined (`auroc_images` of them); `None` if none.
    pub auroc: Option<f64>,
    /// Images with a defined AUROC.
    pub auroc_images: usize,
}

/// Everything [`evaluate`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// Per image, in index order.
    pub records: Vec<ImageRecord>,
    /// The split's means and pooled calibration.
    pub summary: Summary,
}

/// Scores one prediction against its ground truth (`truth`: one channel, 0/1, the image's size);
/// also returns the image's calibration accumulator, for pooling over a split.
pub fn score(
    name: &str,
    segmentation: &Segmentation,
    truth: &Image8,
    options: &EvalOptions,
) -> Result<(ImageRecord, Calibration)> {
    let (w, h) = (segmentation.width, segmentation.height);
    if (truth.width, truth.height, truth.channels) != (w, h, 1) {
        return Err(Error::Invalid(format!(
            "{name}: the ground truth is {}x{} with {} channel(s), the prediction {w}x{h}",
            truth.width, truth.height, truth.channels
        )));
    }
    let truth_mask: Vec<bool> = truth.data.iter().map(|&v| v != 0).collect();
    // The mask `predict` writes with the same options (`Options::resize`).
    let at_truth_size = &segmentation.mask;
    let mut calibration = Calibration::new();
    calibration.add(&segmentation.probability, &truth_mask);
    let wrong: Vec<bool> = at_truth_size.iter().zip(&truth_mask).map(|(&p, &t)| p != t).collect();
    let record = ImageRecord {
        image: name.to_string(),
        width: w,
        height: h,
        dice: dice(at_truth_size, &truth_mask),
        nsd: nsd(at_truth_size, &truth_mask, w, h, options.tolerance),
        ece: calibration.ece(),
        brier: calibration.brier(),
        auroc: auroc(&segmentation.uncertainty, &wrong),
        truth_pixels: truth_mask.iter().filter(|&&t| t).count(),
        predicted_pixels: at_truth_size.iter().filter(|&&p| p).count(),
        mean_uncertainty: segmentation.mean_uncertainty(),
    };
    Ok((record, calibration))
}

/// Scores a zero-shot saliency ([`crate::saliency`]) against its ground truth (one channel, 0/1,
/// the image's size), as [`score`] scores a segmentation, with these differences:
/// - DSC and NSD read the coarse mask (the kept components), which is already at the image's
///   size (the saliency is resized before its k-means), so no nearest resize is involved;
/// - ECE and Brier read the min-max normalised saliency as the foreground probability (it is no
///   calibrated probability: these say how far a relative saliency is from one);
/// - there is no uncertainty map, so the AUROC is `None` and the mean uncertainty 0.
pub fn score_saliency(
    name: &str,
    saliency: &Saliency,
    truth: &Image8,
    tolerance: f64,
) -> Result<(ImageRecord, Calibration)> {
    let (w, h) = (saliency.width, saliency.height);
    if (truth.width, truth.height, truth.channels) != (w, h, 1) {
        return Err(Error::Invalid(format!(
            "{name}: the ground truth is {}x{} with {} channel(s), the saliency {w}x{h}",
            truth.width, truth.height, truth.channels
        )));
    }
    let truth_mask: Vec<bool> = truth.data.iter().map(|&v| v != 0).collect();
    let mut calibration = Calibration::new();
    calibration.add(&saliency.map, &truth_mask);
    let record = ImageRecord {
        image: name.to_string(),
        width: w,
        height: h,
        dice: dice(&saliency.mask, &truth_mask),
        nsd: nsd(&saliency.mask, &truth_mask, w, h, tolerance),
        ece: calibration.ece(),
        brier: calibration.brier(),
        auroc: None,
        truth_pixels: truth_mask.iter().filter(|&&t| t).count(),
        predicted_pixels: saliency.mask.iter().filter(|&&p| p).count(),
        mean_uncertainty: 0.0,
    };
    Ok((record, calibration))
}

/// `eval --zero-shot`: the saliency coarse mask of every item of `index` scored by
/// [`score_saliency`], in index order, one image at a time; `progress` hears the number of images
/// done. The summary's `samples` is the number of noise copies, `noise` is `m2ib` and
/// `batch_size` 1. Errors name the file at fault.
pub fn evaluate_zero_shot(
    model: &SaliencyModel,
    name: &str,
    prompts: &Path,
    index: &DatasetIndex,
    options: &SaliencyOptions,
    tolerance: f64,
    progress: &mut dyn FnMut(usize),
) -> Result<Evaluation> {
    options.check(model.config().vision_layers)?;
    if index.is_empty() {
        return Err(Error::Invalid(format!("{}: lists no images", prompts.display())));
    }
    let mut records = Vec::with_capacity(index.len());
    let mut pooled = Calibration::new();
    for item in &index.items {
        let (image, truth) = read_pair(item)?;
        let saliency = model
            .saliency(&image, &item.prompt, options)
            .map_err(Error::within(item.image_path.display().to_string()))?;
        let (record, calibration) = score_saliency(&item.name, &saliency, &truth, tolerance)?;
        pooled.merge(&calibration);
        records.push(record);
        progress(records.len());
    }
    let segment = Options { samples: options.copies, seed: options.seed, ..Options::default() };
    let eval_options = EvalOptions { segment, batch_size: 1, tolerance };
    let mut summary = summarise(name, prompts, &records, &pooled, &eval_options);
    summary.noise = "m2ib".to_string();
    Ok(Evaluation { records, summary })
}

/// An item's image and ground truth, checked to have one size.
fn read_pair(item: &data::Item) -> Result<(Image8, Image8)> {
    let image = data::read_bgr(&item.image_path)?;
    let truth = read_truth(&item.mask_path)?;
    if (image.width, image.height) != (truth.width, truth.height) {
        return Err(Error::Invalid(format!(
            "{} is {}x{} but its mask {} is {}x{}",
            item.image_path.display(),
            image.width,
            image.height,
            item.mask_path.display(),
            truth.width,
            truth.height
        )));
    }
    Ok((image, truth))
}

/// Reads a ground-truth mask as training does ([`data::read_mask`]): for 0/255 masks what the
/// official evaluation reads (grey, `>= 127` is foreground); 0/1 masks with the lower value as
/// background; more than two values refused.
pub fn read_truth(path: &Path) -> Result<Image8> {
    data::read_mask(path)
}

/// Predicts and scores every item of `index` in batches of `options.batch_size`, in index order;
/// `progress` hears the number of images done after each batch.
///
/// Errors name the file at fault (an unreadable image or mask, an image and mask of different
/// sizes) or, for model errors, the images of the batch.
pub fn evaluate(
    segmenter: &Segmenter,
    name: &str,
    prompts: &Path,
    index: &DatasetIndex,
    options: &EvalOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Evaluation> {
    evaluate_observed(segmenter, name, prompts, index, options, progress, &mut |_| Ok(()))
}

/// One image as [`evaluate_observed`] shows it to its observer, right after scoring: its maps
/// are dropped once the observer returns, so an observer keeps only what it needs.
pub struct Scored<'a> {
    /// The item of the index.
    pub item: &'a data::Item,
    /// The image as read (B, G, R).
    pub image: &'a Image8,
    /// The ground truth (one channel, 0/1).
    pub truth: &'a Image8,
    /// The prediction.
    pub segmentation: &'a Segmentation,
    /// The image's scores.
    pub record: &'a ImageRecord,
    /// The image's calibration accumulator.
    pub calibration: &'a Calibration,
    /// The options of the evaluation.
    pub options: &'a EvalOptions,
}

/// [`evaluate`] that also shows every scored image to `observe`, in index order (e.g. the
/// `eval --report` accumulators, [`report::ReportCollector`]); an error of `observe` ends the
/// evaluation with that error.
pub fn evaluate_observed(
    segmenter: &Segmenter,
    name: &str,
    prompts: &Path,
    index: &DatasetIndex,
    options: &EvalOptions,
    progress: &mut dyn FnMut(usize),
    observe: &mut dyn FnMut(&Scored) -> Result<()>,
) -> Result<Evaluation> {
    options.segment.check()?;
    if options.batch_size == 0 {
        return Err(Error::Invalid("the evaluation batch size must be at least 1".into()));
    }
    if index.is_empty() {
        return Err(Error::Invalid(format!("{}: lists no images", prompts.display())));
    }
    let mut records = Vec::with_capacity(index.len());
    let mut pooled = Calibration::new();
    for chunk in index.items.chunks(options.batch_size) {
        let mut images = Vec::with_capacity(chunk.len());
        let mut truths = Vec::with_capacity(chunk.len());
        for item in chunk {
            let (image, truth) = read_pair(item)?;
            images.push(image);
            truths.push(truth);
        }
        let requests: Vec<(&Image8, &str)> =
            images.iter().zip(chunk).map(|(image, item)| (image, item.prompt.as_str())).collect();
        let results = segmenter.segment_batch(&requests, &options.segment).map_err(|e| {
            let names: Vec<&str> = chunk.iter().map(|item| item.name.as_str()).collect();
            e.context(names.join(", "))
        })?;
        for (((item, segmentation), truth), image) in chunk.iter().zip(&results).zip(&truths).zip(&images) {
            let (record, calibration) = score(&item.name, segmentation, truth, options)?;
            observe(&Scored { item, image, truth, segmentation, record: &record, calibration: &calibration, options })?;
            pooled.merge(&calibration);
            records.push(record);
        }
        progress(records.len());
    }
    let summary = summarise(name, prompts, &records, &pooled, options);
    Ok(Evaluation { records, summary })
}

fn summarise(
    name: &str,
    prompts: &Path,
    records: &[ImageRecord],
    pooled: &Calibration,
    options: &EvalOptions,
) -> Summary {
    let mean = |f: &dyn Fn(&ImageRecord) -> f64| records.iter().map(f).sum::<f64>() / records.len().max(1) as f64;
    let aurocs: Vec<f64> = records.iter().filter_map(|r| r.auroc).collect();
    Summary {
        name: name.to_string(),
        prompts: prompts.to_path_buf(),
        images: records.len(),
        samples: options.segment.samples,
        seed: options.segment.seed,
        noise: options.segment.noise.name().to_string(),
        resize: options.segment.resize.name().to_string(),
        batch_size: options.batch_size,
        dice: mean(&|r| r.dice),
        nsd: mean(&|r| r.nsd),
        ece: pooled.ece(),
        brier: pooled.brier(),
        auroc: (!aurocs.is_empty()).then(|| aurocs.iter().sum::<f64>() / aurocs.len() as f64),
        auroc_images: aurocs.len(),
    }
}

/// The five prompt-variant files of a dataset, `Prompts_Folder/Test_text_<variant>.xlsx`, in
/// [`PROMPT_VARIANTS`] order. Errors: any missing, all of them named in one message.
pub fn prompt_variant_files(root: &Path) -> Result<Vec<(&'static str, PathBuf)>> {
    let folder = root.join(data::layout::PROMPTS_FOLDER);
    let files: Vec<(&'static str, PathBuf)> =
        PROMPT_VARIANTS.iter().map(|&v| (v, folder.join(format!("Test_text_{v}.xlsx")))).collect();
    let missing: Vec<String> =
        files.iter().filter(|(_, path)| !path.is_file()).map(|(_, path)| path.display().to_string()).collect();
    if !missing.is_empty() {
        return Err(Error::Invalid(format!(
            "--prompt-sweep needs all five prompt variants; missing: {}",
            missing.join(", ")
        )));
    }
    Ok(files)
}

/// Writes the per-image scores as CSV (one header row; an undefined AUROC is an empty cell).
pub fn write_records_csv(path: &Path, records: &[ImageRecord]) -> Result<()> {
    let mut text =
        String::from("image,width,height,dice,nsd,ece,brier,auroc,truth_pixels,predicted_pixels,mean_uncertainty\n");
    for r in records {
        let auroc = r.auroc.map(|a| format!("{a:.6}")).unwrap_or_default();
        text.push_str(&format!(
            "{},{},{},{:.6},{:.6},{:.6},{:.6},{auroc},{},{},{:.6}\n",
            csv_field(&r.image),
            r.width,
            r.height,
            r.dice,
            r.nsd,
            r.ece,
            r.brier,
            r.truth_pixels,
            r.predicted_pixels,
            r.mean_uncertainty
        ));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    }
    crate::model::weights::write_atomically(path, text.as_bytes())
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}
