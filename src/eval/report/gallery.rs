//! The report's gallery: the worst-Dice images of a split as small overlays, kept in a bounded
//! heap while the evaluation runs, so that memory holds at most `limit` thumbnails and never the
//! maps of the whole split (docs/eval_report.md §5).

use std::collections::BinaryHeap;

use image::imageops::FilterType;
use image::RgbImage;

use crate::data::Image8;
use crate::error::{Error, Result};
use crate::segment::output::uncertainty_colour;

/// Longest side of a thumbnail, in pixels: larger images are reduced to it, smaller ones kept
/// at their size (the page enlarges them; enlarging the PNG would only make the file larger).
pub const THUMBNAIL_SIDE: u32 = 192;

/// Colour of the ground truth's contour.
pub const TRUTH_COLOUR: [u8; 3] = [255, 0, 255];
/// Colour of the predicted mask's contour (the colour `predict`'s overlay uses).
pub const PREDICTION_COLOUR: [u8; 3] = [0, 255, 0];
/// Colour where both contours fall on one pixel.
pub const BOTH_COLOUR: [u8; 3] = [255, 255, 255];

/// One image of the gallery.
#[derive(Clone, Debug)]
pub struct GalleryImage {
    /// The image's file name.
    pub name: String,
    /// Its prompt.
    pub prompt: String,
    /// Its Dice.
    pub dice: f64,
    /// Its mean uncertainty (nats).
    pub mean_uncertainty: f64,
    /// Its place in the split (ranks ties of Dice: the earlier image first).
    pub position: usize,
    /// The overlay, PNG-encoded.
    pub png: Vec<u8>,
    /// The overlay's size.
    pub width: u32,
    /// See `width`.
    pub height: u32,
}

impl GalleryImage {
    fn rank(&self) -> (f64, usize) {
        (self.dice, self.position)
    }
}

impl PartialEq for GalleryImage {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for GalleryImage {}

impl PartialOrd for GalleryImage {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// By Dice, then by position: the heap's top is the image that leaves first (the best kept).
impl Ord for GalleryImage {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (self.rank(), other.rank());
        a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
    }
}

/// The `limit` lowest-Dice images seen so far.
#[derive(Debug, Default)]
pub struct Gallery {
    limit: usize,
    kept: BinaryHeap<GalleryImage>,
    seen: usize,
}

/// What [`Gallery::offer`] needs of one image.
pub struct Candidate<'a> {
    /// The image's file name.
    pub name: &'a str,
    /// Its prompt.
    pub prompt: &'a str,
    /// Its Dice.
    pub dice: f64,
    /// Its mean uncertainty (nats).
    pub mean_uncertainty: f64,
    /// The image as read (B, G, R, or one grey channel).
    pub image: &'a Image8,
    /// The ground truth at the image's size (row-major).
    pub truth: &'a [bool],
    /// The uncertainty map at the image's size (nats).
    pub uncertainty: &'a [f32],
}

impl Gallery {
    /// A gallery of at most `limit` images.
    pub fn new(limit: usize) -> Gallery {
        Gallery { limit, kept: BinaryHeap::with_capacity(limit + 1), seen: 0 }
    }

    /// Images offered so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Whether an image of this Dice, offered next, would be kept.
    pub fn wants(&self, dice: f64) -> bool {
        if self.kept.len() < self.limit {
            return true;
        }
        // A later image with equal Dice ranks after every kept one.
        self.kept.peek().is_some_and(|best| dice.total_cmp(&best.dice).is_lt())
    }

    /// Offers the next image of the split: when it is among the `limit` worst so far, its
    /// predicted mask (at the image's size) is asked of `predicted` and its overlay made and
    /// kept; otherwise neither is made.
    pub fn offer(&mut self, candidate: &Candidate, predicted: impl FnOnce() -> Result<Vec<bool>>) -> Result<()> {
        let position = self.seen;
        self.seen += 1;
        if !self.wants(candidate.dice) {
            return Ok(());
        }
        let (png, width, height) = overlay_png(candidate, &predicted()?)?;
        self.kept.push(GalleryImage {
            name: candidate.name.to_string(),
            prompt: candidate.prompt.to_string(),
            dice: candidate.dice,
            mean_uncertainty: candidate.mean_uncertainty,
            position,
            png,
            width,
            height,
        });
        if self.kept.len() > self.limit {
            self.kept.pop();
        }
        Ok(())
    }

    /// The kept images, worst Dice first.
    pub fn worst_first(&self) -> Vec<GalleryImage> {
        self.kept.clone().into_sorted_vec()
    }
}

/// The thumbnail size of a `width` x `height` image: longest side at most [`THUMBNAIL_SIDE`],
/// aspect kept, at least one pixel each way.
pub fn thumbnail_size(width: usize, height: usize) -> (u32, u32) {
    let scale = (f64::from(THUMBNAIL_SIDE) / width.max(height).max(1) as f64).min(1.0);
    let side = |n: usize| ((n as f64 * scale).round() as u32).max(1);
    (side(width), side(height))
}

/// The overlay of one image as a PNG: the image in RGB with the uncertainty's colour blended
/// in (as `predict`'s `overlay.png`), reduced to the thumbnail size, then the contours of the
/// ground truth and the prediction drawn one thumbnail pixel wide.
fn overlay_png(candidate: &Candidate, predicted: &[bool]) -> Result<(Vec<u8>, u32, u32)> {
    let image = candidate.image;
    let (w, h) = (image.width, image.height);
    if candidate.truth.len() != w * h || predicted.len() != w * h || candidate.uncertainty.len() != w * h {
        return Err(Error::Invalid(format!(
            "{}: the maps for the report's gallery do not have the image's {w}x{h} pixels",
            candidate.name
        )));
    }
    let mut blended = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let base: [f32; 3] = match image.channels {
                3 => [2, 1, 0].map(|c| f32::from(image.get(x, y, c))),
                _ => [f32::from(image.get(x, y, 0)); 3],
            };
            let u = candidate.uncertainty[y * w + x];
            let alpha = 0.6 * (u / std::f32::consts::LN_2).clamp(0.0, 1.0);
            let colour = uncertainty_colour(u);
            blended.extend((0..3).map(|i| ((1.0 - alpha) * base[i] + alpha * f32::from(colour[i])).round() as u8));
        }
    }
    let full = RgbImage::from_raw(w as u32, h as u32, blended)
        .ok_or_else(|| Error::Invalid(format!("{}: cannot make the gallery overlay", candidate.name)))?;
    let (tw, th) = thumbnail_size(w, h);
    let mut small = image::imageops::resize(&full, tw, th, FilterType::Triangle);
    let truth = nearest(candidate.truth, w, h, tw, th);
    let prediction = nearest(predicted, w, h, tw, th);
    let (truth_edge, prediction_edge) = (contour(&truth, tw, th), contour(&prediction, tw, th));
    for (i, pixel) in small.pixels_mut().enumerate() {
        let colour = match (truth_edge[i], prediction_edge[i]) {
            (true, true) => BOTH_COLOUR,
            (true, false) => TRUTH_COLOUR,
            (false, true) => PREDICTION_COLOUR,
            (false, false) => continue,
        };
        pixel.0 = colour;
    }
    let mut png = Vec::new();
    small
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("{}: cannot encode the gallery overlay: {e}", candidate.name)))?;
    Ok((png, tw, th))
}

/// A mask resampled nearest (pixel centres) from `w` x `h` to `tw` x `th`.
fn nearest(mask: &[bool], w: usize, h: usize, tw: u32, th: u32) -> Vec<bool> {
    let (tw, th) = (tw as usize, th as usize);
    let mut out = Vec::with_capacity(tw * th);
    for ty in 0..th {
        let y = ((ty * 2 + 1) * h / (th * 2)).min(h - 1);
        for tx in 0..tw {
            let x = ((tx * 2 + 1) * w / (tw * 2)).min(w - 1);
            out.push(mask[y * w + x]);
        }
    }
    out
}

/// The mask's contour: pixels of the mask with a 4-neighbour outside the mask or the image.
fn contour(mask: &[bool], w: u32, h: u32) -> Vec<bool> {
    let (w, h) = (w as isize, h as isize);
    let inside = |x: isize, y: isize| x >= 0 && y >= 0 && x < w && y < h && mask[(y * w + x) as usize];
    let mut edge = Vec::with_capacity(mask.len());
    for y in 0..h {
        for x in 0..w {
            edge.push(
                inside(x, y) && [(1, 0), (-1, 0), (0, 1), (0, -1)].iter().any(|&(dx, dy)| !inside(x + dx, y + dy)),
            );
        }
    }
    edge
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate<'a>(name: &'a str, dice: f64, image: &'a Image8, truth: &'a [bool], u: &'a [f32]) -> Candidate<'a> {
        Candidate { name, prompt: "p", dice, mean_uncertainty: 0.1, image, truth, uncertainty: u }
    }

    #[test]
    fn keeps_the_worst_images_in_order() {
        let image = Image8::from_raw(4, 4, 3, vec![100; 48]).unwrap();
        let truth = vec![false; 16];
        let mut predicted = vec![false; 16];
        predicted[5] = true;
        let u = vec![0.3; 16];
        let mut gallery = Gallery::new(3);
        for (i, dice) in [0.9, 0.2, 0.5, 0.2, 0.95, 0.1].into_iter().enumerate() {
            let name = format!("img{i}");
            gallery.offer(&candidate(&name, dice, &image, &truth, &u), || Ok(predicted.clone())).unwrap();
        }
        let kept: Vec<(String, f64)> = gallery.worst_first().into_iter().map(|g| (g.name, g.dice)).collect();
        // Equal Dice: the earlier image first, and a later tie does not push an earlier one out.
        assert_eq!(kept, [("img5".into(), 0.1), ("img1".into(), 0.2), ("img3".into(), 0.2)]);
        assert_eq!(gallery.seen(), 6);
        assert!(!gallery.wants(0.2) && gallery.wants(0.15));
    }

    #[test]
    fn overlay_draws_both_contours_at_the_thumbnail_size() {
        // A 12 x 8 grey image: truth the left half, prediction the right half.
        let (w, h) = (12, 8);
        let image = Image8::from_raw(w, h, 1, vec![50; w * h]).unwrap();
        let truth: Vec<bool> = (0..w * h).map(|i| i % w < 6).collect();
        let predicted: Vec<bool> = (0..w * h).map(|i| i % w >= 6).collect();
        let u = vec![0.0; w * h];
        let (png, tw, th) = overlay_png(&candidate("a", 0.0, &image, &truth, &u), &predicted).unwrap();
        assert_eq!((tw, th), (12, 8));
        let picture = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(picture.dimensions(), (12, 8));
        let count = |c: [u8; 3]| picture.pixels().filter(|p| p.0 == c).count();
        // Each half's contour: the outer frame of a 6 x 8 block, 2 x 6 + 2 x 6 pixels.
        assert_eq!(count(TRUTH_COLOUR), 24);
        assert_eq!(count(PREDICTION_COLOUR), 24);
        // No uncertainty: the inside is the grey image itself.
        assert_eq!(picture.get_pixel(2, 3).0, [50, 50, 50]);
    }

    #[test]
    fn thumbnails_are_reduced_never_enlarged() {
        assert_eq!(thumbnail_size(96, 96), (96, 96));
        assert_eq!(thumbnail_size(768, 512), (192, 128));
        assert_eq!(thumbnail_size(5000, 10), (192, 1));
    }
}
