//! The files `mcs-engine saliency` writes per image:
//!
//! | file | what |
//! |---|---|
//! | `saliency.png` | the normalised saliency, 8-bit grey (`round(255 s)`) |
//! | `saliency.npy` | the normalised saliency, `float32`, shape `(height, width)` |
//! | `coarse_mask.png` | the kept components, 0 / 255 |
//! | `prompts.json` | SAM's prompts: `{"boxes", "points", "labels", "image_size"}` |
//!
//! `prompts.json` holds one entry per kept component, largest first: `boxes[i]` is
//! `[x0, y0, x1, y1]` (inclusive pixel coordinates, SAM's XYXY), `points[i]` its positive points
//! `[[x, y], ...]`, `labels[i]` a 1 per point, and `image_size` is `[width, height]`.

use std::path::{Path, PathBuf};

use image::GrayImage;
use serde::Serialize;

use super::Saliency;
use crate::error::{Error, Result};
use crate::model::weights::write_atomically;
use crate::segment::write_npy;

/// Where [`write_saliency_outputs`] put each file.
#[derive(Clone, Debug, PartialEq)]
pub struct SaliencyFiles {
    /// `saliency.png`.
    pub saliency_png: PathBuf,
    /// `saliency.npy`.
    pub saliency_npy: PathBuf,
    /// `coarse_mask.png`.
    pub coarse_mask_png: PathBuf,
    /// `prompts.json`.
    pub prompts_json: PathBuf,
}

impl SaliencyFiles {
    /// The file names inside `dir`.
    pub fn in_folder(dir: &Path) -> SaliencyFiles {
        SaliencyFiles {
            saliency_png: dir.join("saliency.png"),
            saliency_npy: dir.join("saliency.npy"),
            coarse_mask_png: dir.join("coarse_mask.png"),
            prompts_json: dir.join("prompts.json"),
        }
    }
}

/// The contents of `prompts.json`.
#[derive(Serialize)]
struct PromptsFile {
    boxes: Vec<[usize; 4]>,
    points: Vec<Vec<[usize; 2]>>,
    labels: Vec<Vec<u8>>,
    image_size: [usize; 2],
}

/// The text of `prompts.json` for `saliency`.
pub fn prompts_json(saliency: &Saliency) -> String {
    let file = PromptsFile {
        boxes: saliency.prompts.iter().map(|p| p.bbox).collect(),
        points: saliency.prompts.iter().map(|p| p.points.clone()).collect(),
        labels: saliency.prompts.iter().map(|p| vec![1; p.points.len()]).collect(),
        image_size: [saliency.width, saliency.height],
    };
    serde_json::to_string_pretty(&file).expect("plain numbers always serialise")
}

/// Writes the files of the module table into `dir` (created if needed).
pub fn write_saliency_outputs(dir: &Path, saliency: &Saliency) -> Result<SaliencyFiles> {
    let (w, h) = (saliency.width, saliency.height);
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let files = SaliencyFiles::in_folder(dir);
    let grey: Vec<u8> = saliency.map.iter().map(|&s| (s * 255.0).round().clamp(0.0, 255.0) as u8).collect();
    write_grey_png(&files.saliency_png, w, h, grey)?;
    write_npy(&files.saliency_npy, &saliency.map, h, w)?;
    let mask: Vec<u8> = saliency.mask.iter().map(|&m| if m { 255 } else { 0 }).collect();
    write_grey_png(&files.coarse_mask_png, w, h, mask)?;
    write_atomically(&files.prompts_json, prompts_json(saliency).as_bytes())?;
    Ok(files)
}

fn write_grey_png(path: &Path, w: usize, h: usize, pixels: Vec<u8>) -> Result<()> {
    let picture = GrayImage::from_raw(w as u32, h as u32, pixels)
        .ok_or_else(|| Error::Invalid(format!("{}: pixel buffer does not make a {w}x{h} image", path.display())))?;
    let mut encoded = Vec::new();
    image::DynamicImage::from(picture)
        .write_to(&mut std::io::Cursor::new(&mut encoded), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("{}: cannot encode PNG: {e}", path.display())))?;
    write_atomically(path, &encoded)
}
