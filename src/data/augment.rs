//! The only training augmentation of the official code (spec §6.2): with probability 0.5 the
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

/// PIL's `COORD`: truncation toward zero, with every negative value mapped to -1 (outside).
fn pil_coordinate(v: f64) -> i64 {
    if v < 0.0 {
        -1
    } else {
        v as i64
    }
}

/// `PIL.Image.rotate(degrees)` with the defaults the official code uses (NEAREST, no expand,
/// centre of the canvas, black fill), for any number of channels. Follows PIL's affine loop
/// exactly, including its running sums of the matrix steps, so pixels on a rounding edge land
/// where PIL puts them.
pub fn rotate_nearest(image: &Image8, degrees: f64) -> Image8 {
    let turned = degrees.rem_euclid(360.0);
    if turned == 0.0 {
        return image.clone();
    }
    if turned == 180.0 {
        return rotate_half_turn(image);
    }
    let (width, height, channels) = (image.width, image.height, image.channels);
    let m = rotation_matrix(degrees, width, height);
    // PIL adds half a pixel to the translation to sample at pixel centres.
    let mut row_x = m[2] + m[1] * 0.5 + m[0] * 0.5;
    let mut row_y = m[5] + m[4] * 0.5 + m[3] * 0.5;
    let mut out = Image8::zeros(width, height, channels);
    for y in 0..height {
        let (mut xx, mut yy) = (row_x, row_y);
        for x in 0..width {
            let (sx, sy) = (pil_coordinate(xx), pil_coordinate(yy));
            if sx >= 0 && sy >= 0 && (sx as usize) < width && (sy as usize) < height {
                let from = (sy as usize * width + sx as usize) * channels;
                let to = (y * width + x) * channels;
                out.data[to..to + channels].copy_from_slice(&image.data[from..from + channels]);
            }
            xx += m[0];
            yy += m[3];
        }
        row_x += m[1];
        row_y += m[4];
    }
    out
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
