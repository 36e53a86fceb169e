//! Image-caption pairs for fine-tuning the towers as a CLIP model (`mcs-engine finetune-clip`):
//! a CSV with `image` and `caption` columns (MedPix style; image paths relative to the CSV's
//! folder), or one split of a dataset in the official layout, whose prompts serve as captions.
//!
//! Every problem is found when the pairs are read, before any training: a missing column, an
//! empty caption, an image path that leaves the CSV's folder or names no file; each error names
//! the file and the row.

use std::path::{Component, Path, PathBuf};

use super::layout::{open_split, Split};
use super::preprocess::{normalise_bgr, read_bgr, resize_linear};
use crate::error::{Error, Result};

/// One image and its caption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptionPair {
    pub image: PathBuf,
    pub caption: String,
}

/// The CSV is read whole; a caption file larger than this is refused before it is read.
const MAX_CSV_BYTES: u64 = 256 << 20;

/// Reads `image,caption` pairs from a CSV with a header row naming (in any order, any case) an
/// `image` and a `caption` column; other columns are ignored. Image paths are relative to the CSV's
/// folder and may not leave it.
pub fn read_caption_csv(path: &Path) -> Result<Vec<CaptionPair>> {
    let invalid = |detail: String| Error::Invalid(format!("{}: {detail}", path.display()));
    let size = std::fs::metadata(path).map_err(Error::io(path))?.len();
    if size > MAX_CSV_BYTES {
        return Err(invalid(format!("{size} bytes is more than a caption file may hold ({MAX_CSV_BYTES})")));
    }
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_path(path).map_err(|e| invalid(e.to_string()))?;
    let headers = reader.headers().map_err(|e| invalid(e.to_string()))?.clone();
    let column = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let (Some(image_column), Some(caption_column)) = (column("image"), column("caption")) else {
        let found: Vec<&str> = headers.iter().collect();
        return Err(invalid(format!("needs an `image` and a `caption` column; the header has {found:?}")));
    };
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut pairs = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let row = i + 2; // 1-based, after the header
        let record = record.map_err(|e| invalid(format!("row {row}: {e}")))?;
        let image = record.get(image_column).unwrap_or("").trim();
        let caption = record.get(caption_column).unwrap_or("").trim();
        if image.is_empty() && caption.is_empty() {
            continue; // blank lines at the end of exported sheets
        }
        if caption.is_empty() {
            return Err(invalid(format!("row {row}: image `{image}` has an empty caption")));
        }
        let relative = Path::new(image);
        if image.is_empty() || !relative.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(invalid(format!(
                "row {row}: image `{image}` must be a path inside the CSV's folder (no `..`, not absolute)"
            )));
        }
        let image_path = folder.join(relative);
        if !image_path.is_file() {
            return Err(invalid(format!("row {row}: image `{}` does not exist", image_path.display())));
        }
        pairs.push(CaptionPair { image: image_path, caption: caption.to_string() });
    }
    if pairs.is_empty() {
        return Err(invalid("holds no image-caption pairs".to_string()));
    }
    Ok(pairs)
}

/// The pairs of one split of a dataset in the official layout: each image with its prompt.
pub fn caption_pairs_of_split(root: &Path, split: Split) -> Result<Vec<CaptionPair>> {
    let (index, _) = open_split(root, split, None, None)?;
    let pairs: Vec<CaptionPair> =
        index.items.into_iter().map(|item| CaptionPair { image: item.image_path, caption: item.prompt }).collect();
    if let Some(empty) = pairs.iter().find(|p| p.caption.trim().is_empty()) {
        return Err(Error::Invalid(format!("{}: empty prompt (caption)", empty.image.display())));
    }
    Ok(pairs)
}

/// The normalised `[n, 3, size, size]` pixels of `pairs[indices]` (the official pre-processing:
/// B, G, R, bilinear resize, ImageNet normalisation), decoded in parallel.
pub fn load_caption_images(pairs: &[CaptionPair], indices: &[usize], size: usize) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let images: Vec<Vec<f32>> = indices
        .par_iter()
        .map(|&i| {
            let image = read_bgr(&pairs[i].image)?;
            normalise_bgr(&resize_linear(&image, size, size)?)
        })
        .collect::<Result<_>>()?;
    Ok(images.concat())
}
