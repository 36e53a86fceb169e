//! Image files in and out: decoding, the official pre-processing (docs/model.md §6: OpenCV-style bilinear
//! resize, BGR channel order, ImageNet mean/std), and writing result maps as PNGs.

use std::path::Path;

use image::{DynamicImage, GrayImage, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// Bytes per pixel the decoder may hold for its output: 16-bit RGBA, the widest PNG or JPEG
/// layout, takes 8.
const DECODED_BYTES_PER_PIXEL: u64 = 8;

/// What the decoder may allocate beyond its output: PNG's inflate window and row buffers, JPEG's
/// MCU rows and tables are well under this for any image that passes the pixel limit.
const DECODER_WORKSPACE_BYTES: u64 = 64 << 20;

/// Decodes a PNG or JPEG file of at most `max_pixels` pixels. The size comes from the header
/// first, so a too large image is refused before a pixel is decoded, and the decoder is then held
/// to the memory of an image of that size, so a file whose data disagree with its header cannot
/// make it allocate more. Errors name the file: missing or unreadable, a folder, not an image,
/// too large (with its width x height), damaged or truncated.
pub fn decode_image(path: &Path, max_pixels: u64) -> Result<DynamicImage> {
    decode_image_and_format(path, max_pixels).map(|(image, _)| image)
}

/// [`decode_image`], with the format the file's first bytes showed (PNG or JPEG).
pub fn decode_image_and_format(path: &Path, max_pixels: u64) -> Result<(DynamicImage, ImageFormat)> {
    let (width, height) = check_image_file(path, max_pixels)?;
    let pixels = u64::from(width) * u64::from(height);
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    let budget = pixels.saturating_mul(DECODED_BYTES_PER_PIXEL).saturating_add(DECODER_WORKSPACE_BYTES);
    limits.max_alloc = Some(budget);
    let mut reader = open_image(path)?;
    let format = reader.format().ok_or_else(|| not_an_image(path, "its format is unknown"))?;
    reader.limits(limits);
    let image = reader.decode().map_err(|e| match e {
        ImageError::Limits(limit) => {
            let why = format!("for the decoder's memory limit of {} MiB: {limit}", budget >> 20);
            too_large(path, width, height, &why)
        }
        other => Error::Invalid(format!(
            "{}: not a readable PNG or JPEG image (damaged or truncated): {other}",
            path.display()
        )),
    })?;
    Ok((image, format))
}

/// An image file's width and height from its header, checked to be at most `max_pixels` pixels
/// (nothing is decoded). Errors as [`decode_image`], but for damaged pixel data.
pub fn check_image_file(path: &Path, max_pixels: u64) -> Result<(u32, u32)> {
    let (width, height) = image_size(path)?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(too_large(path, width, height, &over_pixel_limit(max_pixels)));
    }
    Ok((width, height))
}

/// An image file's width and height from its header alone (nothing is decoded).
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    open_image(path)?.into_dimensions().map_err(|e| match e {
        // A decoder sizes its row buffers from the header: a row wider than the workspace stops
        // here, before the size is known.
        ImageError::Limits(limit) => Error::Invalid(format!(
            "{}: image too large: reading its header alone needs more than the decoder's {} MiB ({limit})",
            path.display(),
            DECODER_WORKSPACE_BYTES >> 20
        )),
        other => not_an_image(path, &other.to_string()),
    })
}

/// A reader of `path` with its format guessed from the first bytes, allowed the decoder's
/// workspace only: reading the header decompresses what precedes the pixels (a PNG's colour
/// profile), which must not be a way around the limits. Errors: a folder, a missing or unreadable
/// file, a file that is neither PNG nor JPEG.
fn open_image(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    if path.is_dir() {
        return Err(Error::Invalid(format!("{}: is a folder, not an image", path.display())));
    }
    let mut reader =
        ImageReader::open(path).map_err(Error::io(path))?.with_guessed_format().map_err(Error::io(path))?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(DECODER_WORKSPACE_BYTES);
    reader.limits(limits);
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => Ok(reader),
        _ => Err(not_an_image(path, "its first bytes are neither PNG's nor JPEG's")),
    }
}

fn not_an_image(path: &Path, detail: &str) -> Error {
    Error::Invalid(format!("{}: not a readable PNG or JPEG image: {detail}", path.display()))
}

/// Why an image over `max_pixels` is refused, and how to raise the limit.
pub(crate) fn over_pixel_limit(max_pixels: u64) -> String {
    format!("over the limit of {max_pixels} pixels (--max-pixels or Options::max_pixels raises it)")
}

fn too_large(path: &Path, width: u32, height: u32, why: &str) -> Error {
    Error::Invalid(format!("{}: image too large ({width}x{height}) {why}", path.display()))
}

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
