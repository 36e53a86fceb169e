//! Image files in and out: decoding, the official pre-processing (spec §6: OpenCV-style bilinear
//! resize, BGR channel order, ImageNet mean/std), and writing result maps as PNGs.

use std::path::Path;

use image::{GrayImage, RgbImage};

use crate::error::{Error, Result};

/// ImageNet statistics applied to the B, G, R channels in that order (the official loader never
/// converts OpenCV's BGR array to RGB).
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Decodes a PNG or JPEG file; the error names the file.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    let decoded = image::load_from_memory(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: not a readable PNG or JPEG image: {e}", path.display())))?;
    Ok(decoded.to_rgb8())
}

/// Resizes to `size` x `size` like `cv2.resize(INTER_LINEAR)` (half-pixel centres, no
/// anti-aliasing, rounded back to 8 bits) and returns the normalised `[3, size, size]` planes in
/// B, G, R order.
pub fn preprocess(image: &RgbImage, size: usize) -> Vec<f32> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut out = vec![0.0f32; 3 * size * size];
    let source = |x: usize, y: usize, c: usize| image.get_pixel(x as u32, y as u32)[c] as f32;
    let axis = |dst: usize, src_len: usize| -> (usize, usize, f32) {
        let pos = ((dst as f32 + 0.5) * src_len as f32 / size as f32 - 0.5).max(0.0);
        let i0 = (pos.floor() as usize).min(src_len - 1);
        (i0, (i0 + 1).min(src_len - 1), pos - i0 as f32)
    };
    for y in 0..size {
        let (y0, y1, fy) = axis(y, h);
        for x in 0..size {
            let (x0, x1, fx) = axis(x, w);
            for (plane, rgb_channel) in [2usize, 1, 0].into_iter().enumerate() {
                let top = source(x0, y0, rgb_channel) * (1.0 - fx) + source(x1, y0, rgb_channel) * fx;
                let bottom = source(x0, y1, rgb_channel) * (1.0 - fx) + source(x1, y1, rgb_channel) * fx;
                let value = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0);
                out[(plane * size + y) * size + x] = (value / 255.0 - MEAN[plane]) / STD[plane];
            }
        }
    }
    out
}

/// Writes a `height` x `width` map as an 8-bit grey PNG, `to_byte` mapping each value.
pub fn write_gray_png(
    path: &Path,
    values: &[f32],
    width: usize,
    height: usize,
    to_byte: impl Fn(f32) -> u8,
) -> Result<()> {
    let pixels: Vec<u8> = values.iter().map(|&v| to_byte(v)).collect();
    let image = GrayImage::from_raw(width as u32, height as u32, pixels).ok_or_else(|| {
        Error::Invalid(format!("{}: {} values do not make a {width}x{height} image", path.display(), values.len()))
    })?;
    let mut encoded = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut encoded), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("{}: cannot encode PNG: {e}", path.display())))?;
    crate::model::weights::write_atomically(path, &encoded)
}

/// Nearest-neighbour resize of a `h` x `w` map to `out_h` x `out_w` (how the official evaluation
/// brings 224x224 predictions back to the original image size).
pub fn resize_nearest(values: &[f32], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(out_w * out_h);
    for y in 0..out_h {
        let sy = (y * h / out_h).min(h - 1);
        for x in 0..out_w {
            out.push(values[sy * w + (x * w / out_w).min(w - 1)]);
        }
    }
    out
}

/// A built-in test picture: a bright disc on a dark, gently graded background, so that `predict`
/// runs with no input at all.
pub fn synthetic_picture(size: u32) -> RgbImage {
    let centre = size as f32 * 0.4;
    let radius = size as f32 * 0.2;
    RgbImage::from_fn(size, size, |x, y| {
        let d = ((x as f32 - centre).powi(2) + (y as f32 - centre * 1.2).powi(2)).sqrt();
        let shade = (40.0 + 40.0 * y as f32 / size as f32) as u8;
        if d < radius {
            image::Rgb([220, 200, 180])
        } else {
            image::Rgb([shade, shade, shade + 10])
        }
    })
}
