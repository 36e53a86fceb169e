//! A built-in synthetic dataset that a small model learns in minutes: ultrasound-like grey images
//! (speckle, depth attenuation, faint tissue layers) with one to three dark (hypoechoic) lesions
//! with a brighter rim. The lesions differ in size, shape and position; the prompt describes
//! exactly one of them, and the mask is that lesion only, so the text decides what to segment:
//!
//! `one {small|medium|large} {round|oval|irregular}-shaped lesion at the {top left|top right|bottom left|bottom right|center} of the image`
//!
//! Positions within one image are distinct and lesions never overlap, so the position words alone
//! identify the lesion. Every sample is a pure function of (seed, sample id, size).

use std::path::Path;

use super::layout::{Split, DATA_PERCENTAGES, IMAGE_FOLDER, MASK_FOLDER, PROMPTS_FOLDER};
use super::loader::{InMemoryDataset, RawSample};
use super::preprocess::Image8;
use super::prompts::{write_prompt_xlsx, PromptRow};
use super::random::{hash_words, unit_f64, Stream};
use crate::error::{Error, Result};

/// The side the lesion radii below are given for; other sizes scale them.
pub const REFERENCE_SIZE: usize = 96;
pub const DEFAULT_SIZE: usize = 96;

/// Every token a synthetic prompt can contain, split the way a BERT tokenizer splits it
/// (on spaces and punctuation, so "oval-shaped" is "oval", "-", "shaped").
pub const WORDS: &[&str] = &[
    "one",
    "small",
    "medium",
    "large",
    "round",
    "oval",
    "irregular",
    "-",
    "shaped",
    "lesion",
    "at",
    "the",
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "of",
    "image",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LesionSize {
    Small,
    Medium,
    Large,
}

impl LesionSize {
    pub const ALL: [LesionSize; 3] = [LesionSize::Small, LesionSize::Medium, LesionSize::Large];

    pub fn word(self) -> &'static str {
        match self {
            LesionSize::Small => "small",
            LesionSize::Medium => "medium",
            LesionSize::Large => "large",
        }
    }

    /// Range of the lesion's largest radius in pixels at [`REFERENCE_SIZE`].
    pub fn radius_range(self) -> (f64, f64) {
        match self {
            LesionSize::Small => (6.0, 9.0),
            LesionSize::Medium => (11.0, 14.0),
            LesionSize::Large => (16.0, 20.0),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LesionShape {
    Round,
    Oval,
    Irregular,
}

impl LesionShape {
    pub const ALL: [LesionShape; 3] = [LesionShape::Round, LesionShape::Oval, LesionShape::Irregular];

    pub fn word(self) -> &'static str {
        match self {
            LesionShape::Round => "round",
            LesionShape::Oval => "oval",
            LesionShape::Irregular => "irregular",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Position {
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
    Center,
}

impl Position {
    pub const ALL: [Position; 5] =
        [Position::TopLeft, Position::TopRight, Position::BottomLeft, Position::BottomRight, Position::Center];

    pub fn phrase(self) -> &'static str {
        match self {
            Position::TopLeft => "top left",
            Position::TopRight => "top right",
            Position::BottomLeft => "bottom left",
            Position::BottomRight => "bottom right",
            Position::Center => "center",
        }
    }

    /// Nominal centre as fractions of the image side (x, y).
    pub fn anchor(self) -> (f64, f64) {
        const NEAR: f64 = 0.245;
        const FAR: f64 = 1.0 - NEAR;
        match self {
            Position::TopLeft => (NEAR, NEAR),
            Position::TopRight => (FAR, NEAR),
            Position::BottomLeft => (NEAR, FAR),
            Position::BottomRight => (FAR, FAR),
            Position::Center => (0.5, 0.5),
        }
    }
}

/// The outline of a lesion relative to its largest radius.
#[derive(Clone, Debug, PartialEq)]
pub enum Outline {
    Round,
    /// An ellipse whose major semi-axis is the radius, tilted by `angle` radians.
    Oval {
        minor_ratio: f64,
        angle: f64,
    },
    /// `r(θ) = radius · (1 − depth · (1 − h(θ)) / 2)`, `h` a normalised sum of low harmonics
    /// `(k, weight, phase)`, so the radius swings between `radius · (1 − depth)` and `radius`.
    Irregular {
        depth: f64,
        harmonics: [(f64, f64, f64); 3],
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Lesion {
    pub size: LesionSize,
    pub shape: LesionShape,
    pub position: Position,
    /// Centre in pixels (x, y), pixel centres at +0.5.
    pub centre: (f64, f64),
    /// Largest distance from the centre to the outline, in pixels.
    pub radius: f64,
    pub outline: Outline,
}

impl Lesion {
    /// Distance from the centre relative to the outline in that direction: below 1 inside.
    pub fn relative_radius(&self, x: f64, y: f64) -> f64 {
        let (dx, dy) = (x - self.centre.0, y - self.centre.1);
        match &self.outline {
            Outline::Round => dx.hypot(dy) / self.radius,
            Outline::Oval { minor_ratio, angle } => {
                let (sin, cos) = angle.sin_cos();
                let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
                (u / self.radius).hypot(v / (self.radius * minor_ratio))
            }
            Outline::Irregular { depth, harmonics } => {
                let theta = dy.atan2(dx);
                let total: f64 = harmonics.iter().map(|h| h.1).sum();
                let h = harmonics.iter().map(|&(k, w, phase)| w * (k * theta + phase).cos()).sum::<f64>() / total;
                dx.hypot(dy) / (self.radius * (1.0 - depth * (1.0 - h) / 2.0))
            }
        }
    }

    /// Whether the pixel whose centre is at (x, y) belongs to the lesion.
    pub fn contains(&self, x: f64, y: f64) -> bool {
        self.relative_radius(x, y) <= 1.0
    }

    /// The smallest radius of the outline (rim thickness is taken relative to it).
    fn smallest_radius(&self) -> f64 {
        match &self.outline {
            Outline::Round => self.radius,
            Outline::Oval { minor_ratio, .. } => self.radius * minor_ratio,
            Outline::Irregular { depth, .. } => self.radius * (1.0 - depth),
        }
    }

    /// The prompt that describes this lesion.
    pub fn prompt(&self) -> String {
        format!(
            "one {} {}-shaped lesion at the {} of the image",
            self.size.word(),
            self.shape.word(),
            self.position.phrase()
        )
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticSample {
    pub name: String,
    /// Grey replicated into B, G, R.
    pub image: Image8,
    /// 0/1, the described lesion only.
    pub mask: Image8,
    pub prompt: String,
    pub lesions: Vec<Lesion>,
    /// Which of `lesions` the prompt and mask are about.
    pub described: usize,
}

impl SyntheticSample {
    pub fn to_raw(&self) -> RawSample {
        RawSample {
            image: self.image.clone(),
            mask: self.mask.clone(),
            prompt: self.prompt.clone(),
            name: self.name.clone(),
        }
    }
}

/// Samples with ids `0..count`.
pub fn generate(seed: u64, count: usize, size: usize) -> Vec<SyntheticSample> {
    generate_range(seed, 0, count, size)
}

/// Samples with ids `first..first + count` (the splits use disjoint id ranges).
pub fn generate_range(seed: u64, first: usize, count: usize, size: usize) -> Vec<SyntheticSample> {
    (first..first + count).map(|id| sample(seed, id, size)).collect()
}

const LAYOUT_TAG: u64 = 0x4C41_594F_5554; // "LAYOUT"
const TEXTURE_TAG: u64 = 0x0054_4558_5455_5245; // "TEXTURE"
/// Re-draws of a lesion layout before settling for a single lesion (overlaps are rare enough that
/// this never happens in practice; it only bounds the loop).
const LAYOUT_ATTEMPTS: u64 = 256;

/// One sample, a pure function of (seed, id, size).
pub fn sample(seed: u64, id: usize, size: usize) -> SyntheticSample {
    let size = size.max(8);
    let lesions = lesion_layout(seed, id as u64, size);
    let described = Stream::new(&[seed, id as u64, LAYOUT_TAG, u64::MAX]).below(lesions.len());
    let image = render(seed, id as u64, size, &lesions);
    let mut mask = Image8::zeros(size, size, 1);
    for y in 0..size {
        for x in 0..size {
            mask.data[y * size + x] = u8::from(lesions[described].contains(x as f64 + 0.5, y as f64 + 0.5));
        }
    }
    SyntheticSample {
        name: format!("synthetic_{id:06}.png"),
        image,
        mask,
        prompt: lesions[described].prompt(),
        lesions,
        described,
    }
}

fn lesion_layout(seed: u64, id: u64, size: usize) -> Vec<Lesion> {
    let scale = size as f64 / REFERENCE_SIZE as f64;
    let gap = 3.0 * scale;
    let mut first_lesion = None;
    for attempt in 0..LAYOUT_ATTEMPTS {
        let mut stream = Stream::new(&[seed, id, LAYOUT_TAG, attempt]);
        let count = 1 + stream.below(3);
        let mut positions = Position::ALL.to_vec();
        for i in (1..positions.len()).rev() {
            positions.swap(i, stream.below(i + 1));
        }
        let lesions: Vec<Lesion> = positions[..count].iter().map(|&p| draw_lesion(&mut stream, p, size)).collect();
        let apart = |a: &Lesion, b: &Lesion| {
            (a.centre.0 - b.centre.0).hypot(a.centre.1 - b.centre.1) >= a.radius + b.radius + gap
        };
        let separated = (0..count).all(|i| (i + 1..count).all(|j| apart(&lesions[i], &lesions[j])));
        if separated {
            return lesions;
        }
        first_lesion.get_or_insert_with(|| lesions[0].clone());
    }
    vec![first_lesion.expect("LAYOUT_ATTEMPTS is positive")]
}

fn draw_lesion(stream: &mut Stream, position: Position, size: usize) -> Lesion {
    let scale = size as f64 / REFERENCE_SIZE as f64;
    let lesion_size = LesionSize::ALL[stream.below(3)];
    let shape = LesionShape::ALL[stream.below(3)];
    let (low, high) = lesion_size.radius_range();
    let radius = stream.range(low, high) * scale;
    let (ax, ay) = position.anchor();
    let jitter = 2.0 * scale;
    let centre = (ax * size as f64 + stream.range(-jitter, jitter), ay * size as f64 + stream.range(-jitter, jitter));
    let outline = match shape {
        LesionShape::Round => Outline::Round,
        LesionShape::Oval => {
            Outline::Oval { minor_ratio: stream.range(0.5, 0.65), angle: stream.range(0.0, std::f64::consts::PI) }
        }
        LesionShape::Irregular => {
            let depth = stream.range(0.3, 0.4);
            let mut harmonic = |k: f64| (k, stream.range(0.5, 1.0), stream.range(0.0, std::f64::consts::TAU));
            let harmonics = [harmonic(3.0), harmonic(4.0), harmonic(5.0)];
            Outline::Irregular { depth, harmonics }
        }
    };
    Lesion { size: lesion_size, shape, position, centre, radius, outline }
}

/// Uniform in [-1, 1) for one texture cell.
fn texture_noise(seed: u64, id: u64, layer: u64, x: usize, y: usize) -> f64 {
    2.0 * unit_f64(hash_words(&[seed, id, TEXTURE_TAG, layer, x as u64, y as u64])) - 1.0
}

fn render(seed: u64, id: u64, size: usize, lesions: &[Lesion]) -> Image8 {
    let scale = size as f64 / REFERENCE_SIZE as f64;
    let mut stream = Stream::new(&[seed, id, TEXTURE_TAG]);
    let gain = stream.range(0.85, 1.1);
    let band_phase = stream.range(0.0, std::f64::consts::TAU);
    let rim_width = 1.5 * scale;
    // Speckle grains are about two pixels wide at the reference size.
    let grain = (2.0 * scale).round().max(1.0) as usize;
    let mut image = Image8::zeros(size, size, 3);
    for y in 0..size {
        let depth = y as f64 / size as f64;
        let attenuation = 45.0 + 135.0 * (-1.3 * depth).exp();
        let layers = 1.0 + 0.08 * (std::f64::consts::TAU * depth * 5.0 + band_phase).sin();
        let tissue = gain * attenuation * layers;
        for x in 0..size {
            let coarse = texture_noise(seed, id, 0, x / grain, y / grain);
            let fine = texture_noise(seed, id, 1, x, y);
            let speckle = 1.0 + 0.2 * coarse + 0.08 * fine;
            let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
            let lesion_factor = lesions
                .iter()
                .find(|l| l.contains(px, py))
                .map(|l| {
                    let rim_start = 1.0 - rim_width / l.smallest_radius();
                    if l.relative_radius(px, py) > rim_start {
                        1.35
                    } else {
                        0.22
                    }
                })
                .unwrap_or(1.0);
            let value = (tissue * speckle * lesion_factor).round().clamp(0.0, 255.0) as u8;
            let at = (y * size + x) * 3;
            image.data[at..at + 3].fill(value);
        }
    }
    image
}

/// The three splits of the synthetic dataset in memory, from disjoint sample ids.
pub struct SyntheticSplits {
    pub train: InMemoryDataset,
    pub val: InMemoryDataset,
    pub test: InMemoryDataset,
}

fn split_ranges(n_train: usize, n_val: usize, n_test: usize) -> [(Split, usize, usize); 3] {
    [(Split::Train, 0, n_train), (Split::Val, n_train, n_val), (Split::Test, n_train + n_val, n_test)]
}

pub fn synthetic_splits(
    seed: u64,
    size: usize,
    n_train: usize,
    n_val: usize,
    n_test: usize,
) -> Result<SyntheticSplits> {
    // Every sample is held twice while a split is made (generated, then as a raw sample).
    let total = n_train.saturating_add(n_val).saturating_add(n_test);
    fits_in_memory(&format!("{total} synthetic images of {size}x{size}"), total, size, 2 * SAMPLE_BYTES_PER_PIXEL)?;
    let make = |first: usize, count: usize| {
        InMemoryDataset::new(generate_range(seed, first, count, size).iter().map(SyntheticSample::to_raw).collect())
    };
    let [(_, t0, tn), (_, v0, vn), (_, s0, sn)] = split_ranges(n_train, n_val, n_test);
    Ok(SyntheticSplits { train: make(t0, tn)?, val: make(v0, vn)?, test: make(s0, sn)? })
}

/// Bytes a synthetic sample holds per pixel: its B, G, R image (3) and its mask (1).
const SAMPLE_BYTES_PER_PIXEL: u64 = 4;

/// Refuses `count` images of `size` x `size` at `bytes_per_pixel` that would not fit in this
/// machine's memory (a size or count a user typed must end in an error, not an allocation abort).
fn fits_in_memory(what: &str, count: usize, size: usize, bytes_per_pixel: u64) -> Result<()> {
    let Some(memory) = crate::limits::physical_memory() else { return Ok(()) };
    let needed = (size as u64)
        .checked_mul(size as u64)
        .and_then(|pixels| pixels.checked_mul(bytes_per_pixel))
        .and_then(|bytes| bytes.checked_mul(count as u64));
    match needed {
        Some(bytes) if bytes <= memory => Ok(()),
        _ => Err(Error::Invalid(format!(
            "{what} need {} of memory, more than this machine's {} GiB: use a smaller size or fewer images",
            needed.map_or("more than 2^64 bytes".to_string(), |b| format!("{} GiB", b >> 30)),
            memory >> 30
        ))),
    }
}

fn write_png(path: &Path, width: usize, height: usize, grey: Vec<u8>) -> Result<()> {
    let image = image::GrayImage::from_raw(width as u32, height as u32, grey)
        .ok_or_else(|| Error::Invalid(format!("{}: pixel buffer does not match {width}x{height}", path.display())))?;
    let mut encoded = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut encoded), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("{}: cannot encode PNG: {e}", path.display())))?;
    std::fs::write(path, encoded).map_err(Error::io(path))
}

/// Number of rows of a `percentage` subset (at least one when the split is not empty).
fn subset_len(total: usize, percentage: u32) -> usize {
    if total == 0 {
        0
    } else {
        (total * percentage as usize / 100).max(1)
    }
}

/// Writes the synthetic dataset in the official layout under `dir`: grey PNG images in
/// `{Train,Val,Test}_Folder/img`, 0/255 PNG masks of the same names in `label`, and
/// `Prompts_Folder/{Train,Val,Test}_text.xlsx` plus the `Train_text_{10,25,50}.xlsx` /
/// `Val_text_{10,25,50}.xlsx` subsets (the first rows of the full files).
pub fn write_official_layout(
    dir: &Path,
    seed: u64,
    size: usize,
    n_train: usize,
    n_val: usize,
    n_test: usize,
) -> Result<()> {
    let prompts = dir.join(PROMPTS_FOLDER);
    std::fs::create_dir_all(&prompts).map_err(Error::io(&prompts))?;
    for (split, first, count) in split_ranges(n_train, n_val, n_test) {
        let folder = dir.join(split.folder());
        let (images, masks) = (folder.join(IMAGE_FOLDER), folder.join(MASK_FOLDER));
        for sub in [&images, &masks] {
            std::fs::create_dir_all(sub).map_err(Error::io(sub))?;
        }
        let mut rows = Vec::with_capacity(count);
        // One image at a time: a split of large images is never held in memory whole. Per image:
        // the sample (4 bytes a pixel), its grey copy and its mask's PNG rows (2), the encoder (2).
        fits_in_memory(&format!("synthetic images of {size}x{size}"), 1, size, 8)?;
        for sample in (first..first + count).map(|id| sample(seed, id, size)) {
            let grey: Vec<u8> = sample.image.data.chunks_exact(3).map(|bgr| bgr[0]).collect();
            write_png(&images.join(&sample.name), size, size, grey)?;
            write_png(&masks.join(&sample.name), size, size, sample.mask.data.iter().map(|&m| m * 255).collect())?;
            rows.push(PromptRow {
                image: sample.name.clone(),
                description: sample.prompt.clone(),
                mask: Some(sample.name.clone()),
                location: String::new(),
            });
        }
        write_prompt_xlsx(&prompts.join(format!("{}_text.xlsx", split.name())), &rows)?;
        if split != Split::Test {
            for p in DATA_PERCENTAGES {
                let subset = &rows[..subset_len(rows.len(), p)];
                write_prompt_xlsx(&prompts.join(format!("{}_text_{p}.xlsx", split.name())), subset)?;
            }
        }
    }
    Ok(())
}
