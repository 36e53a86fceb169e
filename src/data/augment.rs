//! The only training augmentation of the official code (docs/model.md §6.2): with probability 0.5 the
//! resized image and mask are rotated together by an integer angle in [-20, 20] degrees with
//! `PIL.Image.rotate` semantics (counter-clockwise for positive angles, about the centre, nearest
//! neighbour, same canvas, black fill). It runs on the 8-bit arrays, before normalisation.

use super::preprocess::Image8;
use super::random::{below, hash_words, unit_f64};

/// The largest rotation, in degrees, either way.
pub const MAX_ROTATION_DEGREES: i32 = 20;

/// Purpose tags keep the rotation draws independent of the shuffle draws of the same epoch.
const ROTATE_COIN: u64 = 0x524F_5441_5445_3F00; // "ROTATE?"
const ROTATE_ANGLE: u64 = 0x414E_474C_4500_0000; // "ANGLE"

/// The rotation (in degrees) that sample `index` gets in `epoch`, or `None` (half of the time).
/// A pure function of its arguments, so it does not matter which worker thread loads the sample.
pub fn rotation_for(seed: u64, epoch: u64, index: usize) -> Option<i32> {
    let coin = unit_f64(hash_words(&[seed, epoch, index as u64, ROTATE_COIN]));
    if coin >= 0.5 {
        return None;
    }
    let span = (2 * MAX_ROTATION_DEGREES + 1) as u64;
    let draw = hash_words(&[seed, epoch, index as u64, ROTATE_ANGLE]);
    Some(below(draw, span) as i32 - MAX_ROTATION_DEGREES)
}

/// Python's `round(value, 15)`: round to 15 decimals, correctly (Rust's fixed-precision
/// formatting is exact, like CPython's dtoa).
fn round_15(value: f64) -> f64 {
    format!("{value:.15}").parse().unwrap_or(value)
}

/// PIL's inverse affine map for `rotate(angle)` about the centre: output pixel (x, y) reads input
/// `(a·x + b·y + c, d·x + e·y + f)`.
fn rotation_matrix(degrees: f64, width: usize, height: usize) -> [f64; 6] {
    let angle = -(degrees.rem_euclid(360.0)).to_radians();
    let (a, b) = (round_15(angle.cos()), round_15(angle.sin()));
    let (d, e) = (round_15(-angle.sin()), round_15(angle.cos()));
    let (cx, cy) = (width as f64 / 2.0, height as f64 / 2.0);
    let c = a * -cx + b * -cy + cx;
    let f = d * -cx + e * -cy + cy;
    [a, b, c, d, e, f]
}

/// PIL's `COORD` (floating-point path): truncation toward zero, every negative value outside.
fn pil_coordinate(v: f64) -> i64 {
    if v < 0.0 {
        -1
    } else {
        v as i64
    }
}

/// `PIL.Image.rotate(degrees)` with the defaults the official code uses (NEAREST, no expand,
/// centre of the canvas, black fill), for any number of channels. Follows Pillow's affine loop
/// exactly (its 16.16 fixed-point path, or the floating-point one for canvases too large for it),
/// including the running sums of the matrix steps, so pixels on a rounding edge land where Pillow
/// puts them.
pub fn rotate_nearest(image: &Image8, degrees: f64) -> Image8 {
    let turned = degrees.rem_euclid(360.0);
    if turned == 0.0 {
        return image.clone();
    }
    if turned == 180.0 {
        return rotate_half_turn(image);
    }
    let m = rotation_matrix(degrees, image.width, image.height);
    let mut out = Image8::zeros(image.width, image.height, image.channels);
    if fits_fixed_point(&m, image.width, image.height) {
        affine_fixed(image, &m, &mut out);
    } else {
        affine_float(image, &m, &mut out);
    }
    out
}

/// Pillow's `check_fixed` on the four corners: every source coordinate fits 16.16 fixed point.
fn fits_fixed_point(m: &[f64; 6], width: usize, height: usize) -> bool {
    let (w, h) = (width as f64, height as f64);
    [(0.0, 0.0), (w, h), (0.0, h), (w, 0.0)]
        .iter()
        .all(|&(x, y)| (x * m[0] + y * m[1] + m[2]).abs() < 32768.0 && (x * m[3] + y * m[4] + m[5]).abs() < 32768.0)
}

fn copy_pixel(image: &Image8, out: &mut Image8, sx: i64, sy: i64, x: usize, y: usize) {
    if sx >= 0 && sy >= 0 && (sx as usize) < image.width && (sy as usize) < image.height {
        let channels = image.channels;
        let from = (sy as usize * image.width + sx as usize) * channels;
        let to = (y * image.width + x) * channels;
        out.data[to..to + channels].copy_from_slice(&image.data[from..from + channels]);
    }
}

/// Pillow's `affine_fixed`: `FIX(v) = floor(v · 65536 + 0.5)`, coordinates `xx >> 16`.
fn affine_fixed(image: &Image8, m: &[f64; 6], out: &mut Image8) {
    let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i32;
    let (a0, a1, a3, a4) = (fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4]));
    // Pillow adds half a pixel to the translation to sample at pixel centres.
    let mut row_x = fix(m[2] + m[0] * 0.5 + m[1] * 0.5);
    let mut row_y = fix(m[5] + m[3] * 0.5 + m[4] * 0.5);
    for y in 0..image.height {
        let (mut xx, mut yy) = (row_x, row_y);
        for x in 0..image.width {
            copy_pixel(image, out, (xx >> 16) as i64, (yy >> 16) as i64, x, y);
            xx = xx.wrapping_add(a0);
            yy = yy.wrapping_add(a3);
        }
        row_x = row_x.wrapping_add(a1);
        row_y = row_y.wrapping_add(a4);
    }
}

/// Pillow's floating-point affine loop (only reached for canvases beyond 16.16 range).
fn affine_float(image: &Image8, m: &[f64; 6], out: &mut Image8) {
    let mut row_x = m[2] + m[1] * 0.5 + m[0] * 0.5;
    let mut row_y = m[5] + m[4] * 0.5 + m[3] * 0.5;
    for y in 0..image.height {
        let (mut xx, mut yy) = (row_x, row_y);
        for x in 0..image.width {
            copy_pixel(image, out, pil_coordinate(xx), pil_coordinate(yy), x, y);
            xx += m[0];
            yy += m[3];
        }
        row_x += m[1];
        row_y += m[4];
    }
}

/// PIL's fast path for 180 degrees (`transpose(ROTATE_180)`).
fn rotate_half_turn(image: &Image8) -> Image8 {
    let mut out = image.clone();
    let channels = image.channels;
    for (dst, src) in out.data.chunks_exact_mut(channels).zip(image.data.chunks_exact(channels).rev()) {
        dst.copy_from_slice(src);
    }
    out
}

/// Rotates an image and its mask by the same angle (the mask's black fill is background).
pub fn rotate_pair(image: &Image8, mask: &Image8, degrees: i32) -> (Image8, Image8) {
    (rotate_nearest(image, degrees as f64), rotate_nearest(mask, degrees as f64))
}
