//! The official pre-processing (docs/model.md §6), bit for bit: `cv2.imread` to BGR bytes, `cv2.resize`
//! (INTER_LINEAR in OpenCV's fixed point for images, INTER_NEAREST for masks), mask binarisation at
//! 127, and `to_tensor` + ImageNet `Normalize` applied to the B, G, R planes in that order.
//!
//! Masks follow the label rule of [`read_mask`]: the official threshold wherever it separates the
//! two values a mask holds (0/255 masks are read bit for bit as the official code reads them),
//! the lower value as background otherwise (0/1 masks), and more than two values refused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use image::{DynamicImage, ImageFormat};

use crate::error::{Error, Result};

/// ImageNet statistics; the official loader applies them to B, G, R in that order because the
/// OpenCV array is never converted to RGB (docs/model.md §10.3).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// An 8-bit image in OpenCV's memory layout: rows top to bottom, channels interleaved
/// (`channels` is 1 for grey/masks, 3 for B, G, R).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image8 {
    /// An all-zero image.
    pub fn zeros(width: usize, height: usize, channels: usize) -> Self {
        Image8 { width, height, channels, data: vec![0; width * height * channels] }
    }

    /// Wraps raw interleaved bytes; the error says what did not add up.
    pub fn from_raw(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || channels == 0 || data.len() != width * height * channels {
            return Err(Error::Invalid(format!(
                "image buffer of {} bytes does not hold {width}x{height} pixels of {channels} channel(s)",
                data.len()
            )));
        }
        Ok(Image8 { width, height, channels, data })
    }

    pub fn get(&self, x: usize, y: usize, channel: usize) -> u8 {
        self.data[(y * self.width + x) * self.channels + channel]
    }

    /// A row of interleaved samples.
    pub fn row(&self, y: usize) -> &[u8] {
        let stride = self.width * self.channels;
        &self.data[y * stride..(y + 1) * stride]
    }
}

/// Decoded through the size check of `imaging::decode_image` (the header first, the decoder held
/// to that size), so a dataset image of 20000 x 20000 is refused before it is decoded, as in predict.
fn decode(path: &Path) -> Result<DynamicImage> {
    crate::imaging::decode_image(path, crate::limits::DEFAULT_MAX_PIXELS)
}

/// `cv2.imread(path)`: three channels in B, G, R order; grey files are replicated, alpha is
/// dropped, 16-bit samples keep their high byte (what libpng's strip_16 does under OpenCV).
/// PNG is bit-exact with cv2; JPEG is decoded by the `image` crate, not libjpeg-turbo, and differs
/// from cv2 by a few levels on some pixels (chroma upsampling; the official sheets list PNGs).
pub fn read_bgr(path: &Path) -> Result<Image8> {
    read_bgr_within(path, crate::limits::DEFAULT_MAX_PIXELS)
}

/// [`read_bgr`] of an image of at most `max_pixels` pixels, checked from the file's header before
/// anything is decoded (see [`crate::imaging::decode_image`]).
pub fn read_bgr_within(path: &Path, max_pixels: u64) -> Result<Image8> {
    bgr_from(crate::imaging::decode_image(path, max_pixels)?)
}

/// A decoded file as `cv2.imread` gives it: grey replicated, alpha dropped, 16-bit samples cut to
/// their high byte, then B, G, R. An 8-bit RGB image (the common case) is reordered in place,
/// without a second copy of its pixels.
fn bgr_from(decoded: DynamicImage) -> Result<Image8> {
    use DynamicImage::{ImageLuma16, ImageLumaA16, ImageRgb16, ImageRgba16};
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    let data = match decoded {
        ImageLuma16(_) | ImageLumaA16(_) | ImageRgb16(_) | ImageRgba16(_) => {
            decoded.to_rgb16().pixels().flat_map(|p| [p[2], p[1], p[0]].map(|v| (v >> 8) as u8)).collect()
        }
        eight_bit => {
            let mut rgb = eight_bit.into_rgb8().into_raw();
            rgb.chunks_exact_mut(3).for_each(|p| p.swap(0, 2));
            rgb
        }
    };
    Image8::from_raw(width, height, 3, data)
}

/// `cv2.imread(path, 0)`: one channel. Colour files are converted the way OpenCV has libpng do it
/// (`png_set_rgb_to_gray` with 0.299 / 0.587, truncated to 15-bit weights, no rounding; checked
/// bit-exact against opencv-python 4.14 and 5.0). Masks are normally single-channel already.
pub fn read_grey(path: &Path) -> Result<Image8> {
    grey_from(&decode(path)?)
}

fn grey_from(decoded: &DynamicImage) -> Result<Image8> {
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    let data: Vec<u8> = match decoded {
        DynamicImage::ImageLuma8(grey) => grey.as_raw().clone(),
        DynamicImage::ImageLumaA8(grey) => grey.pixels().map(|p| p[0]).collect(),
        DynamicImage::ImageLuma16(grey) => grey.pixels().map(|p| (p[0] >> 8) as u8).collect(),
        DynamicImage::ImageLumaA16(grey) => grey.pixels().map(|p| (p[0] >> 8) as u8).collect(),
        other => other.to_rgb8().pixels().map(|p| rgb_to_grey(p[0], p[1], p[2])).collect(),
    };
    Image8::from_raw(width, height, 1, data)
}

/// libpng's `png_do_rgb_to_gray` for 8-bit samples: weights `coefficient · 32768 / 100000`
/// truncated (9797, 19234, and the remainder 3737 for blue), result truncated.
fn rgb_to_grey(r: u8, g: u8, b: u8) -> u8 {
    const RED: u32 = 29_900 * 32_768 / 100_000;
    const GREEN: u32 = 58_700 * 32_768 / 100_000;
    const BLUE: u32 = 32_768 - RED - GREEN;
    ((RED * r as u32 + GREEN * g as u32 + BLUE * b as u32) >> 15) as u8
}

/// OpenCV's `INTER_RESIZE_COEF_BITS`: interpolation weights are integers summing to 2048.
const COEF_SCALE: f32 = 2048.0;

/// `cv::saturate_cast<short>(float)`: round half to even, then clamp.
fn weight(value: f32) -> i32 {
    value.round_ties_even().clamp(i16::MIN as f32, i16::MAX as f32) as i32
}

/// One destination coordinate's two source taps and fixed-point weights.
#[derive(Clone, Copy, Debug)]
struct Tap {
    first: usize,
    second: usize,
    weight_first: i32,
    weight_second: i32,
}

/// OpenCV's source coordinate for destination `d`: `float((d + 0.5) * scale - 0.5)` with
/// `scale = 1 / (dst / src)` computed in double exactly as `cv::resize` does.
fn source_coordinate(d: usize, src_len: usize, dst_len: usize) -> (i64, f32) {
    let scale = 1.0 / (dst_len as f64 / src_len as f64);
    let position = ((d as f64 + 0.5) * scale - 0.5) as f32;
    let floor = position.floor();
    (floor as i64, position - floor)
}

/// Horizontal taps: out of range on either side, OpenCV pins the tap to the edge pixel with
/// fraction 0.
fn horizontal_taps(src_len: usize, dst_len: usize) -> Vec<Tap> {
    (0..dst_len)
        .map(|d| {
            let (mut start, mut fraction) = source_coordinate(d, src_len, dst_len);
            if start < 0 {
                start = 0;
                fraction = 0.0;
            }
            if start >= src_len as i64 - 1 {
                start = src_len as i64 - 1;
                fraction = 0.0;
            }
            let first = start as usize;
            Tap {
                first,
                second: (first + 1).min(src_len - 1),
                weight_first: weight((1.0 - fraction) * COEF_SCALE),
                weight_second: weight(fraction * COEF_SCALE),
            }
        })
        .collect()
}

/// Vertical taps: unlike the horizontal ones the fraction is kept and only the row indices are
/// clipped into the image (this is why upscaled border rows can differ from a textbook bilinear).
fn vertical_taps(src_len: usize, dst_len: usize) -> Vec<Tap> {
    let clip = |row: i64| row.clamp(0, src_len as i64 - 1) as usize;
    (0..dst_len)
        .map(|d| {
            let (start, fraction) = source_coordinate(d, src_len, dst_len);
            Tap {
                first: clip(start),
                second: clip(start + 1),
                weight_first: weight((1.0 - fraction) * COEF_SCALE),
                weight_second: weight(fraction * COEF_SCALE),
            }
        })
        .collect()
}

/// The horizontal pass of one source row: `a0 * p0 + a1 * p1` per output sample (exact in i32).
fn horizontal_pass(row: &[u8], channels: usize, taps: &[Tap], out: &mut [i32]) {
    for (x, tap) in taps.iter().enumerate() {
        for c in 0..channels {
            let p0 = row[tap.first * channels + c] as i32;
            let p1 = row[tap.second * channels + c] as i32;
            out[x * channels + c] = p0 * tap.weight_first + p1 * tap.weight_second;
        }
    }
}

/// The vertical pass as OpenCV's SIMD code does it (`VResizeLinearVec_32s8u`):
/// `((b0·(S0>>4))>>16 + (b1·(S1>>4))>>16 + 2) >> 2`. This is not the textbook
/// `(S0·b0 + S1·b1 + 2^21) >> 22` of its scalar path; opencv-python 4.14 and 5.0 on x86-64 give this
/// result for every sample of a row, row tails included (checked against both).
fn vertical_pass(s0: i32, s1: i32, b0: i32, b1: i32) -> u8 {
    let high_product = |s: i32, b: i32| ((s >> 4).clamp(i16::MIN as i32, i16::MAX as i32) * b) >> 16;
    ((high_product(s0, b0) + high_product(s1, b1) + 2) >> 2).clamp(0, 255) as u8
}

/// `cv2.resize(src, (width, height), interpolation=INTER_LINEAR)` on 8-bit data, bit-exact with
/// OpenCV's fixed-point path (docs/model.md §6). Equal sizes return a copy, as `cv::resize` does.
pub fn resize_linear(src: &Image8, width: usize, height: usize) -> Result<Image8> {
    check_resize(src, width, height)?;
    if (src.width, src.height) == (width, height) {
        return Ok(src.clone());
    }
    let channels = src.channels;
    let columns = horizontal_taps(src.width, width);
    let rows = vertical_taps(src.height, height);
    let row_len = width * channels;
    let mut first = vec![0i32; row_len];
    let mut second = vec![0i32; row_len];
    let mut out = Image8::zeros(width, height, channels);
    for (y, tap) in rows.iter().enumerate() {
        horizontal_pass(src.row(tap.first), channels, &columns, &mut first);
        horizontal_pass(src.row(tap.second), channels, &columns, &mut second);
        let dst = &mut out.data[y * row_len..(y + 1) * row_len];
        for (x, value) in dst.iter_mut().enumerate() {
            *value = vertical_pass(first[x], second[x], tap.weight_first, tap.weight_second);
        }
    }
    Ok(out)
}

/// `cv2.resize(..., interpolation=INTER_NEAREST)`: destination x reads source
/// `floor(x · (1 / (dst/src)))` (no half-pixel offset), clamped to the last pixel.
pub fn resize_nearest(src: &Image8, width: usize, height: usize) -> Result<Image8> {
    check_resize(src, width, height)?;
    let source_index = |d: usize, src_len: usize, dst_len: usize| {
        let scale = 1.0 / (dst_len as f64 / src_len as f64);
        ((d as f64 * scale).floor() as usize).min(src_len - 1)
    };
    let columns: Vec<usize> = (0..width).map(|x| source_index(x, src.width, width)).collect();
    let mut out = Image8::zeros(width, height, src.channels);
    for y in 0..height {
        let source_row = src.row(source_index(y, src.height, height));
        for (x, &sx) in columns.iter().enumerate() {
            for c in 0..src.channels {
                out.data[(y * width + x) * src.channels + c] = source_row[sx * src.channels + c];
            }
        }
    }
    Ok(out)
}

fn check_resize(src: &Image8, width: usize, height: usize) -> Result<()> {
    if src.width == 0 || src.height == 0 || width == 0 || height == 0 {
        return Err(Error::Invalid(format!("cannot resize a {}x{} image to {width}x{height}", src.width, src.height)));
    }
    Ok(())
}

/// The official mask rule: `mask[mask < 127] = 0; mask[mask >= 127] = 1`.
pub fn binarise_mask(mask: &mut Image8) {
    mask.data.iter_mut().for_each(|v| *v = u8::from(*v >= OFFICIAL_MASK_THRESHOLD));
}

/// The official foreground threshold on the 8-bit grey value of a mask.
const OFFICIAL_MASK_THRESHOLD: u8 = 127;

/// Distinct values a refusal lists; the rest are counted.
const LISTED_MASK_VALUES: usize = 8;

/// Reads a mask as a 0/1 image of its file's size, by the label rule:
///
/// - one value, or two on either side of the official threshold (0/255): `cv2.imread(path, 0)`
///   and `>= 127`, exactly the official reading;
/// - two values on the same side (0/1, or 0/76 from a red-on-black colour mask): the lower is
///   background, the higher foreground, with a note on stderr once per dataset (the official
///   code would read them as all background);
/// - more than two values: refused, naming the file and the values found. JPEG masks are the
///   exception and keep the official threshold: lossy compression smears every edge into many
///   values (Kvasir-SEG ships its masks so).
///
/// 16-bit masks are judged on their 16-bit values (a 0/1 label map keeps its two values),
/// thresholded officially at the high byte.
pub fn read_mask(path: &Path) -> Result<Image8> {
    let (decoded, format) = crate::imaging::decode_image_and_format(path, crate::limits::DEFAULT_MAX_PIXELS)?;
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    let (samples, threshold): (Vec<u16>, u16) = match &decoded {
        DynamicImage::ImageLuma16(grey) => {
            (grey.pixels().map(|p| p[0]).collect(), u16::from(OFFICIAL_MASK_THRESHOLD) << 8)
        }
        DynamicImage::ImageLumaA16(grey) => {
            (grey.pixels().map(|p| p[0]).collect(), u16::from(OFFICIAL_MASK_THRESHOLD) << 8)
        }
        other => (grey_from(other)?.data.into_iter().map(u16::from).collect(), u16::from(OFFICIAL_MASK_THRESHOLD)),
    };
    let values = distinct_values(&samples, LISTED_MASK_VALUES + 1);
    let lossy = format == ImageFormat::Jpeg;
    let cut = match values.as_slice() {
        [low, high] if (*low >= threshold) == (*high >= threshold) => {
            note_two_value_masks(path, *low, *high);
            *high
        }
        [_, _, _, ..] if !lossy => return Err(too_many_values(path, &samples)),
        _ => threshold,
    };
    Image8::from_raw(width, height, 1, samples.iter().map(|&v| u8::from(v >= cut)).collect())
}

/// The distinct values of `samples`, ascending, stopping once `enough` are found. A linear search
/// in the few values found so far: masks hold two, so this costs a comparison or two a pixel.
fn distinct_values(samples: &[u16], enough: usize) -> Vec<u16> {
    let mut seen: Vec<u16> = Vec::with_capacity(enough);
    for &v in samples {
        if !seen.contains(&v) {
            seen.push(v);
            if seen.len() >= enough {
                break;
            }
        }
    }
    seen.sort_unstable();
    seen
}

/// The refusal of a mask with more than two values: how many, and the lowest few.
fn too_many_values(path: &Path, samples: &[u16]) -> Error {
    let mut present = vec![false; 1 << 16];
    samples.iter().for_each(|&v| present[v as usize] = true);
    let values: Vec<usize> = (0..present.len()).filter(|&v| present[v]).collect();
    let count = values.len();
    let listed: Vec<String> = values.iter().take(LISTED_MASK_VALUES).map(usize::to_string).collect();
    let more = if count > LISTED_MASK_VALUES { ", ..." } else { "" };
    Error::Invalid(format!(
        "{}: the mask holds {count} distinct values ({}{more}); a mask must hold two, background and foreground \
         (e.g. 0 and 255, or 0 and 1)",
        path.display(),
        listed.join(", ")
    ))
}

/// Datasets already told that their masks store two low (or two high) values.
static NOTED_DATASETS: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// Says once per dataset (the folder above `<Split>_Folder/label`) how its two-value masks are
/// read. Printed here rather than returned because masks are read on loader threads, far below any
/// caller that could pass a note on; it is the one line the library writes itself.
fn note_two_value_masks(path: &Path, low: u16, high: u16) {
    let dataset = path.ancestors().nth(3).or_else(|| path.parent()).unwrap_or(path).to_path_buf();
    let mut noted = NOTED_DATASETS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if noted.get_or_insert_with(HashSet::new).insert(dataset.clone()) {
        eprintln!(
            "note: masks under {} store {low} and {high}, not 0 and 255 (e.g. {}): reading {low} as background and \
             {high} as foreground",
            dataset.display(),
            path.display()
        );
    }
}

/// `to_tensor` then `Normalize(IMAGENET_MEAN, IMAGENET_STD)` on a 3-channel B, G, R image, in
/// f32 exactly as torch computes it; returns `[3, height, width]` planes in B, G, R order.
pub fn normalise_bgr(image: &Image8) -> Result<Vec<f32>> {
    if image.channels != 3 {
        return Err(Error::Invalid(format!(
            "normalisation expects a 3-channel BGR image, got {} channel(s)",
            image.channels
        )));
    }
    let plane = image.width * image.height;
    let mut out = vec![0.0f32; 3 * plane];
    for (pixel, bgr) in image.data.chunks_exact(3).enumerate() {
        for (channel, &value) in bgr.iter().enumerate() {
            out[channel * plane + pixel] = (value as f32 / 255.0 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel];
        }
    }
    Ok(out)
}

/// A mask of 0/1 bytes as the f32 target the loss takes.
pub fn mask_to_f32(mask: &Image8) -> Vec<f32> {
    mask.data.iter().map(|&v| v as f32).collect()
}

/// Reads one image/mask pair as the official `__getitem__` does, up to (not including) the
/// augmentation: BGR image and 0/1 mask (by the label rule of [`read_mask`]), both `size` x
/// `size`. The image and its mask must have the same size on disk.
pub fn load_pair(image_path: &Path, mask_path: &Path, size: usize) -> Result<(Image8, Image8)> {
    let image = read_bgr(image_path)?;
    let mask = read_mask(mask_path)?;
    if (image.width, image.height) != (mask.width, mask.height) {
        return Err(Error::Invalid(format!(
            "{} is {}x{} but its mask {} is {}x{}",
            image_path.display(),
            image.width,
            image.height,
            mask_path.display(),
            mask.width,
            mask.height
        )));
    }
    // Nearest resizing only picks values, so binarising before it (in read_mask) gives the
    // official resize-then-binarise result.
    let image = resize_linear(&image, size, size)?;
    let mask = resize_nearest(&mask, size, size)?;
    Ok((image, mask))
}
