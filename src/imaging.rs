//! Image files in: the header check and the size-limited decoder every reader goes through. The
//! official pre-processing (cv2-exact resize, B, G, R order, ImageNet statistics; docs/model.md
//! §6) is `data::preprocess`, the one path training, `eval` and the `Segmenter` share.

use std::path::Path;

use image::{DynamicImage, ImageError, ImageFormat, ImageReader, Limits};

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
