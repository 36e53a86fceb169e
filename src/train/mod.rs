//! Training MedCLIPSeg (docs/model.md §4, §6): the loop over epochs with validation, checkpoints that
//! `--resume` continues exactly, the metrics log and the curve plot.
//!
//! Reproducibility: the shuffle and augmentation of epoch `e` are drawn from `(seed, e)`, the
//! noise and dropout of step `k` from `(seed, k)`, and the optimiser state is saved with every
//! checkpoint, so a run stopped after any epoch and resumed gives the same losses bit for bit.

pub mod checkpoint;
pub mod clip;
pub mod metrics;
pub mod plot;
pub mod resume;
pub mod schedule;
pub mod step;
pub mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use checkpoint::{load_model_folder, ModelFolder, TrainingState};
pub use metrics::EpochRecord;
pub use step::{train_step, DeviceBatch, LossValues, StepNoise};

use std::sync::Arc;

use crate::data::{self, Batch, Loader, LoaderConfig, SampleSource};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::weights::WeightStore;
use crate::model::{MedClipSeg, ModelConfig};
use crate::ops::{AdamMoments, AdamState};
use crate::tensor::Tensor;
use crate::tokenizer::PromptTokenizer;

/// Sub-folders of the output folder.
pub const LATEST: &str = "latest";
pub const BEST: &str = "best";

/// What a run trains on.
#[derive(Clone, Debug)]
pub enum DataSpec {
    /// The built-in synthetic ultrasound task, generated in memory from the run's seed.
    Synthetic { train: usize, val: usize },
    /// A folder in the official layout; `percentage` picks `Train_text_{p}.xlsx` and
    /// `Val_text_{p}.xlsx`.
    Folder { root: PathBuf, percentage: Option<u32> },
    /// A folder in the official layout, training on the listed images of its Train split only
    /// (by file name, as the prompt file lists them; each at most once) and validating on the
    /// whole Val split: how `rank --simulate` trains on a labelled subset (docs/rank.md).
    FolderSubset { root: PathBuf, train_images: Vec<String> },
}

impl DataSpec {
    fn describe(&self) -> String {
        match self {
            DataSpec::Synthetic { train, val } => format!("synthetic ({train} train, {val} val)"),
            DataSpec::Folder { root, percentage } => match percentage {
                Some(p) => format!("{} ({p} %)", root.display()),
                None => root.display().to_string(),
            },
            DataSpec::FolderSubset { root, train_images } => {
                format!("{} ({} listed training images)", root.display(), train_images.len())
            }
        }
    }
}

/// Everything a run needs.
pub struct TrainOptions {
    /// Model config with the recipe to train by (CLI overrides already applied).
    pub config: ModelConfig,
    pub tokenizer_json: Vec<u8>,
    /// Initial weights (a safetensors file with the official keys); random otherwise.
    pub initial_weights: Option<PathBuf>,
    pub data: DataSpec,
    pub seed: u64,
    pub out: PathBuf,
    /// Continue from `out/latest` instead of starting afresh.
    pub resume: bool,
    pub device: Device,
    /// Loader threads.
    pub workers: usize,
}

/// Receives the run's progress (the CLI draws bars from it; tests ignore it).
pub trait Progress {
    fn epoch_started(&mut self, _epoch: usize, _epochs: usize, _batches: usize) {}
    fn batch_done(&mut self, _losses: &LossValues, _images: usize) {}
    fn validating(&mut self, _batches: usize) {}
    fn epoch_done(&mut self, _record: &EpochRecord, _is_best: bool) {}
    /// A non-fatal finding about the data (e.g. images present but not listed).
    fn warning(&mut self, _message: &str) {}
    /// Something the user should know that is not wrong (e.g. a resume changing the recipe).
    fn note(&mut self, _message: &str) {}
}

/// Ignores all progress.
pub struct Silent;
impl Progress for Silent {}

/// How a run ended.
pub struct TrainReport {
    pub state: TrainingState,
    pub out: PathBuf,
    pub train_images: usize,
    pub val_images: usize,
    /// Trainable parameters and their element count.
    pub trainable_parameters: usize,
    /// Validation Dice of the final model with every image given another image's prompt (the
    /// text ablation; compare with the last record's `val_dice`).
    pub shifted_prompt_val_dice: f32,
}

/// Trains (or continues) a run as `options` say; returns after the last epoch. Each epoch ends
/// with `out/latest` (and, when validation Dice improved, `out/best`) written atomically,
/// `metrics.csv` and `curves.png`; an error (bad data, a non-finite loss) leaves the last good
/// checkpoint in place.
///
/// Before the first step: the output folder is checked writable, a dataset folder passes the
/// dataset check ([`data::check_split`]) of its training and validation splits, and a resume
/// matches its checkpoint ([`resume`]).
pub fn train(options: &TrainOptions, progress: &mut dyn Progress) -> Result<TrainReport> {
    check_output_folder(&options.out)?;
    let (mut model, mut optimizer, mut state) = start_or_resume(options, progress)?;
    let config = model.config().clone();
    let recipe = config.training.clone();
    let tokenizer =
        PromptTokenizer::from_bytes(&options.tokenizer_json, config.text_context_length, config.text_pad_id)?;
    let (train_set, val_set) = open_data(&options.data, config.image_size, options.seed, progress)?;
    if train_set.is_empty() || val_set.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: needs at least one training and one validation image (found {} and {})",
            options.data.describe(),
            train_set.len(),
            val_set.len()
        )));
    }
    let identity = run_identity(&options.data, recipe.batch_size, train_set.len(), val_set.len())?;
    if options.resume {
        for note in resume::compare_identity(&state, &identity, &options.out.join(LATEST))? {
            progress.note(&note);
        }
    }
    identity.record(&mut state);
    let trainable_parameters = model.trainable_parameters().map(|(_, t)| t.numel()).sum();
    let train_loader = Loader::new(
        train_set.clone(),
        LoaderConfig::train(recipe.batch_size, config.image_size, options.seed, options.workers),
    )?;

    for epoch in state.epochs_done..recipe.epochs {
        let lr = schedule::cosine_learning_rate(epoch, recipe.epochs, recipe.learning_rate, recipe.min_learning_rate);
        let batches = train_set.len().div_ceil(recipe.batch_size);
        progress.epoch_started(epoch + 1, recipe.epochs, batches);
        let started = Instant::now();
        let mut sums = LossValues::default();
        let mut images = 0usize;
        for (i, batch) in train_loader.epoch(epoch as u64).enumerate() {
            let batch = upload(&batch?, &tokenizer, config.image_size, &options.device)?;
            let noise = StepNoise::for_step(options.seed, state.steps, recipe.text_dropout);
            let losses = train_step(&mut model, &mut optimizer, &batch, &recipe, noise, lr)
                .map_err(Error::within(format!("epoch {}, batch {}", epoch + 1, i + 1)))?;
            state.steps += 1;
            images += batch.len();
            for (sum, value) in [
                (&mut sums.total, losses.total),
                (&mut sums.bce, losses.bce),
                (&mut sums.dice, losses.dice),
                (&mut sums.softcon, losses.softcon),
            ] {
                *sum += value * batch.len() as f32;
            }
            progress.batch_done(&losses, batch.len());
        }
        let train_seconds = started.elapsed().as_secs_f32();

        progress.validating(val_set.len().div_ceil(recipe.batch_size));
        let val_dice =
            validation_dice(&model, val_set.clone(), &tokenizer, recipe.batch_size, options.seed, options.workers)?;
        let per_image = |sum: f32| sum / images.max(1) as f32;
        let record = EpochRecord {
            epoch: epoch + 1,
            learning_rate: lr,
            loss: per_image(sums.total),
            bce: per_image(sums.bce),
            dice: per_image(sums.dice),
            softcon: per_image(sums.softcon),
            val_dice,
            train_seconds,
            images_per_second: images as f32 / train_seconds.max(1e-6),
        };
        let is_best = state.records.is_empty() || val_dice > state.best_val_dice;
        if is_best {
            state.best_val_dice = val_dice;
            state.best_epoch = epoch + 1;
        }
        state.epochs_done = epoch + 1;
        state.records.push(record.clone());
        save_epoch(options, &model, &optimizer, &state, is_best)?;
        progress.epoch_done(&record, is_best);
    }
    let shifted: Source = Arc::new(validate::ShiftedPrompts(val_set.clone()));
    let shifted_prompt_val_dice =
        validation_dice(&model, shifted, &tokenizer, recipe.batch_size, options.seed, options.workers)?;
    Ok(TrainReport {
        shifted_prompt_val_dice,
        state,
        out: options.out.clone(),
        train_images: train_set.len(),
        val_images: val_set.len(),
        trainable_parameters,
    })
}

/// Refuses an `--out` that names a file, or a folder that cannot be written (a probe file is
/// written and removed), before any work that a late failure would waste.
fn check_output_folder(out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: exists and is not a folder; --out names the folder for checkpoints, metrics.csv and curves.png",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    let probe = out.join(format!(".write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"probe")
        .map_err(|e| Error::Invalid(format!("{}: cannot write in the output folder: {e}", out.display())))?;
    std::fs::remove_file(&probe).map_err(Error::io(&probe))
}

/// The identity of a run on `data` (see [`resume::RunIdentity`]).
fn run_identity(
    data: &DataSpec,
    batch_size: usize,
    train_images: usize,
    val_images: usize,
) -> Result<resume::RunIdentity> {
    let (data_path, data_percentage) = match data {
        DataSpec::Synthetic { .. } => ("synthetic".to_string(), 100),
        DataSpec::Folder { root, percentage } => {
            let real = root.canonicalize().map_err(Error::io(root))?;
            (real.display().to_string(), percentage.unwrap_or(100))
        }
        // A subset is told apart from the whole split by its image count (`train_images`).
        DataSpec::FolderSubset { root, .. } => {
            let real = root.canonicalize().map_err(Error::io(root))?;
            (real.display().to_string(), 100)
        }
    };
    Ok(resume::RunIdentity { data_path, data_percentage, train_images, val_images, batch_size })
}

/// A fresh model (given or random weights) and optimiser, or those of `out/latest`.
fn start_or_resume(
    options: &TrainOptions,
    progress: &mut dyn Progress,
) -> Result<(MedClipSeg, AdamState, TrainingState)> {
    let latest = options.out.join(LATEST);
    if options.resume {
        let folder = load_model_folder(&latest, &options.device)
            .map_err(Error::within(format!("cannot resume from {}", latest.display())))?;
        for note in resume::compare_configs(&folder.config, &options.config, &latest)? {
            progress.note(&note);
        }
        let mut model = folder.model;
        // The run's recipe (epochs may have been extended on the command line) replaces the saved one.
        model.set_training_recipe(options.config.training.clone());
        let (tensors, state) = checkpoint::load_training_state(&latest)?;
        if state.seed != options.seed {
            return Err(Error::Invalid(format!(
                "{}: the run was started with seed {}, not {}; pass --seed {} to resume it",
                latest.display(),
                state.seed,
                options.seed,
                state.seed
            )));
        }
        let optimizer = optimizer_from_tensors(&model, tensors, &latest)?;
        return Ok((model, optimizer, state));
    }
    if latest.exists() {
        return Err(Error::Invalid(format!(
            "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
            latest.display()
        )));
    }
    let store = match &options.initial_weights {
        // A branch added to a checkpoint without one starts from random weights.
        Some(path) if options.config.cnn_branch.is_some() => {
            WeightStore::load(path)?.with_random_part(&format!("{}.", crate::model::cnn::PREFIX), options.seed)
        }
        Some(path) => WeightStore::load(path)?,
        None => WeightStore::synthetic(options.seed),
    };
    let model = MedClipSeg::from_store(options.config.clone(), store, &options.device)?;
    let optimizer = step::new_optimizer(&model)?;
    let state = TrainingState {
        epochs_done: 0,
        steps: 0,
        seed: options.seed,
        best_val_dice: 0.0,
        best_epoch: 0,
        data: options.data.describe(),
        records: Vec::new(),
        data_path: None,
        data_percentage: None,
        train_images: None,
        val_images: None,
        batch_size: None,
    };
    Ok((model, optimizer, state))
}

fn optimizer_tensors(model: &MedClipSeg, optimizer: &AdamState) -> Result<Vec<(String, Tensor)>> {
    let keys: Vec<&String> = model.trainable_parameters().map(|(k, _)| k).collect();
    let moments = optimizer.moments();
    if moments.len() != keys.len() {
        return Err(Error::Invalid(format!(
            "optimiser holds {} moments for {} trainable parameters",
            moments.len(),
            keys.len()
        )));
    }
    // The step count is exact in f32 far beyond any run (2^24 steps).
    let mut out = vec![("step".to_string(), Tensor::scalar(optimizer.step_count() as f32, &Device::Cpu)?)];
    for (key, moment) in keys.iter().zip(moments) {
        out.push((format!("m.{key}"), moment.m.clone()));
        out.push((format!("v.{key}"), moment.v.clone()));
    }
    Ok(out)
}

fn optimizer_from_tensors(
    model: &MedClipSeg,
    mut tensors: BTreeMap<String, Tensor>,
    origin: &Path,
) -> Result<AdamState> {
    let mut take = |name: String, like: &Tensor| -> Result<Tensor> {
        let t = tensors
            .remove(&name)
            .ok_or_else(|| Error::Invalid(format!("{}: optimiser state lacks `{name}`", origin.display())))?;
        if t.shape() != like.shape() {
            return Err(Error::Invalid(format!(
                "{}: optimiser `{name}` has shape {:?}, expected {:?}",
                origin.display(),
                t.shape(),
                like.shape()
            )));
        }
        t.to_device(&like.device())
    };
    let step = take("step".into(), &Tensor::scalar(0.0, &Device::Cpu)?)?.to_scalar()? as u64;
    let mut moments = Vec::new();
    for (key, param) in model.trainable_parameters() {
        moments.push(AdamMoments { m: take(format!("m.{key}"), param)?, v: take(format!("v.{key}"), param)? });
    }
    AdamState::from_moments(moments, step)
}

fn save_epoch(
    options: &TrainOptions,
    model: &MedClipSeg,
    optimizer: &AdamState,
    state: &TrainingState,
    is_best: bool,
) -> Result<()> {
    let contents = checkpoint::CheckpointContents {
        model,
        tokenizer_json: &options.tokenizer_json,
        optimizer: optimizer_tensors(model, optimizer)?,
        state,
    };
    checkpoint::save_checkpoint(&options.out.join(LATEST), &contents)?;
    if is_best {
        checkpoint::save_checkpoint(&options.out.join(BEST), &contents)?;
    }
    metrics::write_csv(&options.out.join("metrics.csv"), &state.records)?;
    plot::write_curves(&options.out.join("curves.png"), &state.records)
}

/// Tokenises the prompts and uploads a loader batch.
fn upload(batch: &Batch, tokenizer: &PromptTokenizer, image_size: usize, device: &Device) -> Result<DeviceBatch> {
    let mut ids = Vec::with_capacity(batch.prompts.len() * tokenizer.context_length());
    for (prompt, name) in batch.prompts.iter().zip(&batch.names) {
        ids.extend(tokenizer.encode(prompt).map_err(Error::within(name.to_string()))?);
    }
    DeviceBatch::new(&batch.pixels, &batch.masks, ids, image_size, device)
}

/// Mean per-image validation Dice over `set`, in index order, batches of `batch_size`, noise draw
/// 0 of `seed` (what `eval --samples 1` with the same seed and batch size reproduces).
pub fn validation_dice(
    model: &MedClipSeg,
    set: Arc<dyn SampleSource>,
    tokenizer: &PromptTokenizer,
    batch_size: usize,
    seed: u64,
    workers: usize,
) -> Result<f32> {
    let image_size = model.config().image_size;
    let loader = Loader::new(set, LoaderConfig::eval(batch_size, image_size, workers))?;
    let mut scores = Vec::with_capacity(loader.len());
    for batch in loader.epoch(0) {
        let batch = upload(&batch?, tokenizer, image_size, model.device())?;
        scores.extend(validate::batch_dice(model, &batch, seed, 0.5)?);
    }
    Ok(scores.iter().sum::<f32>() / scores.len().max(1) as f32)
}

type Source = Arc<dyn SampleSource>;

/// The training and validation sets of `spec`.
fn open_data(spec: &DataSpec, image_size: usize, seed: u64, progress: &mut dyn Progress) -> Result<(Source, Source)> {
    match spec {
        DataSpec::Synthetic { train, val } => {
            let splits = data::synthetic_splits(seed, image_size, *train, *val, 0)?;
            Ok((Arc::new(splits.train), Arc::new(splits.val)))
        }
        DataSpec::Folder { root, percentage } => {
            check_dataset(root, *percentage, progress)?;
            let mut open = |split: data::Split| -> Result<Source> {
                let (index, unlisted) = data::open_split(root, split, *percentage, None)?;
                if unlisted > 0 {
                    progress.warning(&format!(
                        "{}: {unlisted} image(s) in {}/img are not listed in its prompt file and are not used",
                        root.display(),
                        split.folder()
                    ));
                }
                Ok(Arc::new(index))
            };
            Ok((open(data::Split::Train)?, open(data::Split::Val)?))
        }
        DataSpec::FolderSubset { root, train_images } => {
            check_dataset(root, None, progress)?;
            let (train, _) = data::open_split(root, data::Split::Train, None, None)?;
            let (val, _) = data::open_split(root, data::Split::Val, None, None)?;
            let prompt_file = data::prompt_file_path(root, data::Split::Train, None)?;
            Ok((Arc::new(listed_items(train, train_images, &prompt_file)?), Arc::new(val)))
        }
    }
}

/// The items of `index` named in `names`, in the index's order. Errors name the prompt file: a
/// name it does not list, or a name given twice.
fn listed_items(index: data::DatasetIndex, names: &[String], prompt_file: &Path) -> Result<data::DatasetIndex> {
    let mut wanted = std::collections::HashSet::with_capacity(names.len());
    if let Some(twice) = names.iter().find(|name| !wanted.insert(name.as_str())) {
        return Err(Error::Invalid(format!("training subset: image '{twice}' is listed more than once")));
    }
    // An image the prompt file itself lists twice stays twice, as in a whole-split run.
    let items: Vec<data::Item> = index.items.into_iter().filter(|item| wanted.contains(item.name.as_str())).collect();
    let present: std::collections::HashSet<&str> = items.iter().map(|item| item.name.as_str()).collect();
    if let Some(missing) = names.iter().find(|name| !present.contains(name.as_str())) {
        return Err(Error::Invalid(format!(
            "training subset: image '{missing}' is not listed in {}",
            prompt_file.display()
        )));
    }
    Ok(data::DatasetIndex { items })
}

/// The dataset check of the training and validation splits: any problem stops the run before its
/// first step (naming the first one); a split whose masks hold no foreground is warned about.
fn check_dataset(root: &Path, percentage: Option<u32>, progress: &mut dyn Progress) -> Result<()> {
    let checks = [data::Split::Train, data::Split::Val].map(|split| data::check_split(root, split, percentage));
    let problems: Vec<&String> = checks.iter().flat_map(|c| &c.problems).collect();
    if let Some(first) = problems.first() {
        return Err(Error::Invalid(format!(
            "{}: the dataset check found {} problem(s), the first: {first} (`mcs-engine check --data {}` lists them)",
            root.display(),
            problems.len(),
            root.display()
        )));
    }
    for check in checks.iter().filter(|c| c.foreground_pixels == 0) {
        progress.warning(&format!(
            "{}: no mask of {} has any foreground pixel: the model can only learn to mark nothing",
            root.display(),
            check.split.folder()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(names: &[&str]) -> data::DatasetIndex {
        let item = |name: &&str| data::Item {
            name: name.to_string(),
            image_path: PathBuf::from(name),
            mask_path: PathBuf::from(name),
            prompt: format!("prompt of {name}"),
        };
        data::DatasetIndex { items: names.iter().map(item).collect() }
    }

    #[test]
    fn a_subset_keeps_the_listed_items_in_the_index_order() {
        let names = ["b.png".to_string(), "d.png".to_string()];
        let subset = listed_items(index(&["a.png", "b.png", "c.png", "d.png"]), &names, Path::new("p.xlsx")).unwrap();
        let kept: Vec<&str> = subset.items.iter().map(|item| item.name.as_str()).collect();
        assert_eq!(kept, ["b.png", "d.png"]);
    }

    #[test]
    fn a_subset_naming_an_unlisted_image_or_one_twice_is_refused() {
        let all = || index(&["a.png", "b.png"]);
        let missing = listed_items(all(), &["z.png".to_string()], Path::new("p.xlsx")).unwrap_err().to_string();
        assert!(missing.contains("'z.png' is not listed in p.xlsx"), "{missing}");
        let twice = listed_items(all(), &["a.png".to_string(), "a.png".to_string()], Path::new("p.xlsx"))
            .unwrap_err()
            .to_string();
        assert!(twice.contains("'a.png' is listed more than once"), "{twice}");
    }
}
