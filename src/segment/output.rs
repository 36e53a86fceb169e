//! A segmentation on disk: PNG pictures for people, raw `.npy` arrays for programs.
//!
//! | file | holds |
//! |---|---|
//! | `mask.png` | the binary mask, 0 / 255 |
//! | `probability.png`, `probability.npy` | the mean foreground probability (PNG: `p · 255`; npy: float32) |
//! | `uncertainty.png`, `uncertainty.npy` | the entropy of the mean, nats (PNG: colour-mapped on the fixed scale 0 .. ln 2, so maps of different images compare; npy: float32) |
//! | `overlay.png` | the image with the uncertainty blended in and the mask's contour drawn on top |
//!
//! The `.npy` files are NumPy format 1.0, little-endian `<f4`, C order, shape `(height, width)`.

use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};

use super::Segmentation;
use crate::data::Image8;
use crate::error::{Error, Result};
use crate::model::weights::write_atomically;

/// The files [`write_outputs`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputFiles {
    /// `mask.png`.
    pub mask_png: PathBuf,
    /// `probability.png`.
    pub probability_png: PathBuf,
    /// `probability.npy`.
    pub probability_npy: PathBuf,
    /// `uncertainty.png`.
    pub uncertainty_png: PathBuf,
    /// `uncertainty.npy`.
    pub uncertainty_npy: PathBuf,
    /// `overlay.png`.
    pub overlay_png: PathBuf,
}

impl OutputFiles {
    /// The file names inside `dir`.
    pub fn in_folder(dir: &Path) -> OutputFiles {
        OutputFiles {
            mask_png: dir.join("mask.png"),
            probability_png: dir.join("probability.png"),
            probability_npy: dir.join("probability.npy"),
            uncertainty_png: dir.join("uncertainty.png"),
            uncertainty_npy: dir.join("uncertainty.npy"),
            overlay_png: dir.join("overlay.png"),
        }
    }

    /// Every path, in the order of the module table.
    pub fn all(&self) -> [&Path; 6] {
        [
            &self.mask_png,
            &self.probability_png,
            &self.probability_npy,
            &self.uncertainty_png,
            &self.uncertainty_npy,
            &self.overlay_png,
        ]
    }
}

/// Writes every file of the module table into `dir` (created if needed). `image` is the input the
/// segmentation was made from (for the overlay); it must have the segmentation's size.
pub fn write_outputs(dir: &Path, image: &Image8, segmentation: &Segmentation) -> Result<OutputFiles> {
    let (w, h) = check_image_fits(dir, image, segmentation)?;
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let files = OutputFiles::in_folder(dir);
    write_mask_png(&files.mask_png, segmentation)?;
    let probability: Vec<u8> =
        segmentation.probability.iter().map(|&p| (p * 255.0).round().clamp(0.0, 255.0) as u8).collect();
    write_png(&files.probability_png, grey(&files.probability_png, w, h, probability)?.into())?;
    write_npy(&files.probability_npy, &segmentation.probability, h, w)?;
    let colours: Vec<u8> = segmentation.uncertainty.iter().flat_map(|&u| uncertainty_colour(u)).collect();
    write_png(&files.uncertainty_png, rgb(&files.uncertainty_png, w, h, colours)?.into())?;
    write_npy(&files.uncertainty_npy, &segmentation.uncertainty, h, w)?;
    write_png(&files.overlay_png, rgb(&files.overlay_png, w, h, overlay(image, segmentation))?.into())?;
    Ok(files)
}

/// Writes the mask alone as a grey PNG, 255 for foreground and 0 elsewhere (what the official
/// evaluation and most external evaluators read: `cv2.imread(path, 0)`, foreground `>= 127`).
pub fn write_mask_png(path: &Path, segmentation: &Segmentation) -> Result<()> {
    let mask: Vec<u8> = segmentation.mask.iter().map(|&m| if m { 255 } else { 0 }).collect();
    write_png(path, grey(path, segmentation.width, segmentation.height, mask)?.into())
}

/// Writes only `overlay.png`'s picture (the image, the uncertainty blended in, the mask's
/// contour) to `path`: what a volume's output shows for its slice with the largest mask.
pub fn write_overlay(path: &Path, image: &Image8, segmentation: &Segmentation) -> Result<()> {
    let (w, h) = check_image_fits(path, image, segmentation)?;
    write_png(path, rgb(path, w, h, overlay(image, segmentation))?.into())
}

/// The segmentation's `(width, height)`, or an error naming `target` when `image` (the input the
/// overlay draws on) has another size.
fn check_image_fits(target: &Path, image: &Image8, segmentation: &Segmentation) -> Result<(usize, usize)> {
    let (w, h) = (segmentation.width, segmentation.height);
    if (image.width, image.height) != (w, h) {
        return Err(Error::Invalid(format!(
            "{}: the image is {}x{} but its segmentation {w}x{h}",
            target.display(),
            image.width,
            image.height
        )));
    }
    Ok((w, h))
}

fn grey(path: &Path, w: usize, h: usize, pixels: Vec<u8>) -> Result<GrayImage> {
    GrayImage::from_raw(w as u32, h as u32, pixels)
        .ok_or_else(|| Error::Invalid(format!("{}: pixel buffer does not make a {w}x{h} image", path.display())))
}

fn rgb(path: &Path, w: usize, h: usize, pixels: Vec<u8>) -> Result<RgbImage> {
    RgbImage::from_raw(w as u32, h as u32, pixels)
        .ok_or_else(|| Error::Invalid(format!("{}: pixel buffer does not make a {w}x{h} image", path.display())))
}

fn write_png(path: &Path, picture: image::DynamicImage) -> Result<()> {
    let mut encoded = Vec::new();
    picture
        .write_to(&mut std::io::Cursor::new(&mut encoded), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("{}: cannot encode PNG: {e}", path.display())))?;
    write_atomically(path, &encoded)
}

/// Writes `values` as a NumPy `.npy` file (format 1.0, `<f4`, C order, shape `(rows, cols)`).
/// Errors: a value count that is not `rows * cols`, or the file cannot be written.
pub fn write_npy(path: &Path, values: &[f32], rows: usize, cols: usize) -> Result<()> {
    if values.len() != rows * cols {
        return Err(Error::Invalid(format!(
            "{}: {} values do not make a {rows}x{cols} array",
            path.display(),
            values.len()
        )));
    }
    write_atomically(path, &npy_bytes(values, rows, cols))
}

/// The bytes of a format-1.0 `.npy` file: magic, version, a little-endian u16 header length, a
/// Python-literal header padded with spaces and ended by a newline so that the data starts on a
/// 64-byte boundary (what NumPy itself writes), then the raw little-endian floats.
fn npy_bytes(values: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    const MAGIC: &[u8] = b"\x93NUMPY\x01\x00";
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let unpadded = MAGIC.len() + 2 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + header.len() + values.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Colour stops of the uncertainty map, from certain (black) through purple, blue, cyan, green,
/// yellow and red to fully uncertain (white): a spectral ramp in the spirit of the official
/// `nipy_spectral` pictures (presentation only, docs/model.md §10.13).
const STOPS: [(f32, [f32; 3]); 8] = [
    (0.0, [0.0, 0.0, 0.0]),
    (0.14, [100.0, 0.0, 150.0]),
    (0.28, [0.0, 40.0, 220.0]),
    (0.42, [0.0, 170.0, 210.0]),
    (0.57, [0.0, 180.0, 60.0]),
    (0.71, [230.0, 220.0, 0.0]),
    (0.86, [240.0, 50.0, 0.0]),
    (1.0, [255.0, 255.0, 255.0]),
];

/// RGB colour of an uncertainty in nats, on the fixed scale 0 .. ln 2.
pub fn uncertainty_colour(nats: f32) -> [u8; 3] {
    let t = (nats / std::f32::consts::LN_2).clamp(0.0, 1.0);
    let k = STOPS.iter().position(|&(at, _)| at >= t).unwrap_or(STOPS.len() - 1).max(1);
    let ((t0, c0), (t1, c1)) = (STOPS[k - 1], STOPS[k]);
    let f = ((t - t0) / (t1 - t0)).clamp(0.0, 1.0);
    [0, 1, 2].map(|i| (c0[i] + f * (c1[i] - c0[i])).round() as u8)
}

/// The image in RGB with the uncertainty's colour blended in (opacity up to 0.6 where the model is
/// most uncertain, none where it is sure) and the mask's contour (mask pixels with a 4-neighbour
/// outside the mask or the image) in green.
fn overlay(image: &Image8, segmentation: &Segmentation) -> Vec<u8> {
    let (w, h) = (segmentation.width, segmentation.height);
    let inside = |x: isize, y: isize| {
        x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h && segmentation.mask[y as usize * w + x as usize]
    };
    let mut out = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (xi, yi) = (x as isize, y as isize);
            let contour =
                inside(xi, yi) && [(1, 0), (-1, 0), (0, 1), (0, -1)].iter().any(|&(dx, dy)| !inside(xi + dx, yi + dy));
            if contour {
                out.extend_from_slice(&[0, 255, 0]);
                continue;
            }
            let base: [f32; 3] = match image.channels {
                3 => [2, 1, 0].map(|c| f32::from(image.get(x, y, c))),
                _ => [f32::from(image.get(x, y, 0)); 3],
            };
            let u = segmentation.uncertainty[y * w + x];
            let alpha = 0.6 * (u / std::f32::consts::LN_2).clamp(0.0, 1.0);
            let colour = uncertainty_colour(u);
            out.extend((0..3).map(|i| ((1.0 - alpha) * base[i] + alpha * f32::from(colour[i])).round() as u8));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_what_numpy_writes() {
        let bytes = npy_bytes(&[1.0, -2.5, 0.0, 3.0, 4.0, 5.0], 2, 3);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        // The data starts on a 64-byte boundary and the header ends with a newline.
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"), "{header}");
        assert!(header.ends_with('\n'));
        let data = &bytes[10 + header_len..];
        assert_eq!(data.len(), 24);
        assert_eq!(f32::from_le_bytes(data[4..8].try_into().unwrap()), -2.5);
    }

    #[test]
    fn colour_map_runs_from_black_to_white() {
        assert_eq!(uncertainty_colour(0.0), [0, 0, 0]);
        assert_eq!(uncertainty_colour(std::f32::consts::LN_2), [255, 255, 255]);
        assert_eq!(uncertainty_colour(f32::NAN.max(0.0)), [0, 0, 0]);
    }
}
