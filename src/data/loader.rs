//! Batches for training and evaluation: a per-epoch shuffle that is a pure function of
//! (seed, epoch) (`drop_last = false`, as the official `DataLoader`), loading and augmentation on
//! worker threads, and batches yielded in the same order whatever the number of workers.
//!
//! Worker `w` of `W` builds batches `w, w + W, w + 2W, ...` and hands them over through its own
//! bounded channel; the consumer takes batch `b` from channel `b % W`. So the order is fixed, at
//! most `W · prefetch` finished batches wait in memory, and nothing can deadlock.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::augment::{rotate_pair, rotation_for};
use super::layout::DatasetIndex;
use super::preprocess::{load_pair, mask_to_f32, normalise_bgr, resize_linear, resize_nearest, Image8};
use super::random::{below, hash_words};
use crate::error::{Error, Result};

/// One sample before augmentation and normalisation: a `size` x `size` B, G, R image and its 0/1
/// mask of the same size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSample {
    pub image: Image8,
    pub mask: Image8,
    pub prompt: String,
    pub name: String,
}

/// Where samples come from: files on disk ([`DatasetIndex`]) or memory ([`InMemoryDataset`]).
pub trait SampleSource: Send + Sync {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sample `index`, resized to `size` x `size`.
    fn load(&self, index: usize, size: usize) -> Result<RawSample>;
}

fn out_of_range(index: usize, len: usize) -> Error {
    Error::Invalid(format!("sample index {index} is out of range for a dataset of {len} samples"))
}

impl SampleSource for DatasetIndex {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn load(&self, index: usize, size: usize) -> Result<RawSample> {
        let item = self.items.get(index).ok_or_else(|| out_of_range(index, self.items.len()))?;
        let (image, mask) = load_pair(&item.image_path, &item.mask_path, size)?;
        Ok(RawSample { image, mask, prompt: item.prompt.clone(), name: item.name.clone() })
    }
}

/// Samples held in memory (the synthetic dataset): BGR images of any size with 0/1 masks of the
/// same size, resized on load like files are (bilinear image, nearest mask).
#[derive(Clone, Debug, Default)]
pub struct InMemoryDataset {
    samples: Vec<RawSample>,
}

impl InMemoryDataset {
    /// Checks that every image has 3 channels and a 0/1 single-channel mask of its own size.
    pub fn new(samples: Vec<RawSample>) -> Result<Self> {
        for sample in &samples {
            let (image, mask) = (&sample.image, &sample.mask);
            if image.channels != 3 || mask.channels != 1 || (image.width, image.height) != (mask.width, mask.height) {
                return Err(Error::Invalid(format!(
                    "in-memory sample {}: image {}x{}x{} and mask {}x{}x{} do not pair (need 3 and 1 channels, same size)",
                    sample.name, image.width, image.height, image.channels, mask.width, mask.height, mask.channels
                )));
            }
            if mask.data.iter().any(|&v| v > 1) {
                return Err(Error::Invalid(format!("in-memory sample {}: mask values must be 0 or 1", sample.name)));
            }
        }
        Ok(InMemoryDataset { samples })
    }

    pub fn samples(&self) -> &[RawSample] {
        &self.samples
    }
}

impl SampleSource for InMemoryDataset {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn load(&self, index: usize, size: usize) -> Result<RawSample> {
        let sample = self.samples.get(index).ok_or_else(|| out_of_range(index, self.samples.len()))?;
        Ok(RawSample {
            image: resize_linear(&sample.image, size, size)?,
            mask: resize_nearest(&sample.mask, size, size)?,
            prompt: sample.prompt.clone(),
            name: sample.name.clone(),
        })
    }
}

/// How batches are made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Side of the square network input (224 for the paper).
    pub image_size: usize,
    /// Reshuffle every epoch (training).
    pub shuffle: bool,
    /// Random rotation (training only).
    pub augment: bool,
    pub seed: u64,
    /// Loader threads; 0 loads on the caller's thread.
    pub workers: usize,
    /// Finished batches each worker may hold ahead of the consumer.
    pub prefetch: usize,
}

impl LoaderConfig {
    /// Training: shuffled and augmented.
    pub fn train(batch_size: usize, image_size: usize, seed: u64, workers: usize) -> Self {
        LoaderConfig { batch_size, image_size, shuffle: true, augment: true, seed, workers, prefetch: 2 }
    }

    /// Validation and test: in index order, no augmentation.
    pub fn eval(batch_size: usize, image_size: usize, workers: usize) -> Self {
        LoaderConfig { batch_size, image_size, shuffle: false, augment: false, seed: 0, workers, prefetch: 2 }
    }
}

/// A batch in the layout the model takes.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[B, 3, S, S]`, normalised B, G, R planes.
    pub pixels: Vec<f32>,
    /// `[B, S, S]`, 0 or 1.
    pub masks: Vec<f32>,
    pub prompts: Vec<String>,
    /// Image file names (or synthetic names), to name predictions.
    pub names: Vec<String>,
    /// Positions of the samples in their source.
    pub indices: Vec<usize>,
    pub image_size: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

const SHUFFLE_TAG: u64 = 0x5348_5546_464C_4500; // "SHUFFLE"

/// The sample order of one epoch: identity without shuffling, otherwise a Fisher–Yates shuffle
/// whose every swap is drawn from (seed, epoch, position).
pub fn epoch_order(len: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        for i in (1..len).rev() {
            let j = below(hash_words(&[seed, epoch, SHUFFLE_TAG, i as u64]), i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// Augments (when a rotation is given) and normalises one sample: `([3·S·S] pixels, [S·S] mask)`.
pub fn prepare_sample(sample: &RawSample, rotation: Option<i32>) -> Result<(Vec<f32>, Vec<f32>)> {
    match rotation {
        Some(degrees) => {
            let (image, mask) = rotate_pair(&sample.image, &sample.mask, degrees);
            Ok((normalise_bgr(&image)?, mask_to_f32(&mask)))
        }
        None => Ok((normalise_bgr(&sample.image)?, mask_to_f32(&sample.mask))),
    }
}

/// Loads, augments and stacks the samples `indices` of `epoch`.
pub fn load_batch(source: &dyn SampleSource, config: &LoaderConfig, epoch: u64, indices: &[usize]) -> Result<Batch> {
    let size = config.image_size;
    let mut batch = Batch {
        pixels: Vec::with_capacity(indices.len() * 3 * size * size),
        masks: Vec::with_capacity(indices.len() * size * size),
        prompts: Vec::with_capacity(indices.len()),
        names: Vec::with_capacity(indices.len()),
        indices: indices.to_vec(),
        image_size: size,
    };
    for &index in indices {
        let sample = source.load(index, size)?;
        let rotation = if config.augment { rotation_for(config.seed, epoch, index) } else { None };
        let (pixels, mask) = prepare_sample(&sample, rotation)?;
        batch.pixels.extend_from_slice(&pixels);
        batch.masks.extend_from_slice(&mask);
        batch.prompts.push(sample.prompt);
        batch.names.push(sample.name);
    }
    Ok(batch)
}

/// Makes the batches of each epoch from one source.
#[derive(Clone)]
pub struct Loader {
    source: Arc<dyn SampleSource>,
    config: LoaderConfig,
}

impl Loader {
    pub fn new(source: Arc<dyn SampleSource>, config: LoaderConfig) -> Result<Self> {
        if config.batch_size == 0 || config.image_size == 0 {
            return Err(Error::Invalid(format!(
                "loader: batch size ({}) and image size ({}) must be positive",
                config.batch_size, config.image_size
            )));
        }
        Ok(Loader { source, config })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    pub fn source(&self) -> &Arc<dyn SampleSource> {
        &self.source
    }

    /// Number of samples in the source.
    pub fn len(&self) -> usize {
        self.source.len()
    }

    pub fn is_empty(&self) -> bool {
        self.source.is_empty()
    }

    /// Batches per epoch; the last one may be short (`drop_last = false`).
    pub fn batches_per_epoch(&self) -> usize {
        self.source.len().div_ceil(self.config.batch_size)
    }

    /// The sample indices of every batch of `epoch`, in order.
    pub fn epoch_plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        epoch_order(self.source.len(), self.config.seed, epoch, self.config.shuffle)
            .chunks(self.config.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// The batches of `epoch`, loaded by `config.workers` threads (or inline with 0 workers).
    pub fn epoch(&self, epoch: u64) -> Batches {
        let plan = Arc::new(self.epoch_plan(epoch));
        let workers = self.config.workers.min(plan.len());
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for worker in 0..workers {
            let (sender, receiver) = sync_channel(self.config.prefetch.max(1));
            let (source, config, plan) = (Arc::clone(&self.source), self.config.clone(), Arc::clone(&plan));
            handles.push(std::thread::spawn(move || {
                for indices in plan.iter().skip(worker).step_by(workers) {
                    let batch = load_batch(source.as_ref(), &config, epoch, indices);
                    if sender.send(batch).is_err() {
                        break; // the consumer stopped early
                    }
                }
            }));
            receivers.push(receiver);
        }
        Batches { loader: self.clone(), epoch, plan, next: 0, receivers, handles }
    }
}

/// Iterator over one epoch's batches; dropping it stops the workers.
pub struct Batches {
    loader: Loader,
    epoch: u64,
    plan: Arc<Vec<Vec<usize>>>,
    next: usize,
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let b = self.next;
        if b >= self.plan.len() {
            return None;
        }
        self.next += 1;
        if self.receivers.is_empty() {
            return Some(load_batch(self.loader.source.as_ref(), &self.loader.config, self.epoch, &self.plan[b]));
        }
        let worker = b % self.receivers.len();
        Some(self.receivers[worker].recv().unwrap_or_else(|_| {
            Err(Error::Invalid(format!("data loader worker {worker} stopped before batch {b} (it panicked)")))
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.plan.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Batches {}

impl Drop for Batches {
    fn drop(&mut self) {
        // Closing the channels first makes any worker blocked on a full channel give up.
        self.receivers.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}
