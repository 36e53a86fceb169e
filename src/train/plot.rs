//! `curves.png`: the training loss and the validation Dice per epoch, side by side.
//!
//! Rendered into memory and written atomically. Text needs a TrueType font; plotters is built
//! without system font libraries, so one is looked for in the usual places at run time, and
//! without one the curves are drawn without labels rather than not at all.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use super::metrics::EpochRecord;
use crate::error::{Error, Result};
use crate::model::weights::write_atomically;

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 420;

/// Fonts tried in order; `MCS_PLOT_FONT` overrides.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a font with plotters once; false when none could be found.
fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let from_env = std::env::var("MCS_PLOT_FONT").ok();
        let paths = from_env.iter().map(String::as_str).chain(FONT_CANDIDATES.iter().copied());
        for path in paths {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps registered fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// (x, value) points of one curve.
type Curve = Vec<(f64, f64)>;

/// Draws the curves of `records` to `path` (PNG): the training loss and the validation Dice.
pub fn write_curves(path: &Path, records: &[EpochRecord]) -> Result<()> {
    write_panels(
        path,
        [
            ("training loss", records.iter().map(|r| (r.epoch as f64, r.loss as f64)).collect()),
            ("validation Dice", records.iter().map(|r| (r.epoch as f64, r.val_dice as f64)).collect()),
        ],
        Some(1.0),
    )
}

/// Two curves side by side, against the epoch, as a PNG at `path`: the left one scaled to its
/// largest value, the right one to `right_max` (or its largest value).
pub fn write_panels(path: &Path, panels: [(&str, Curve); 2], right_max: Option<f64>) -> Result<()> {
    let mut pixels = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut pixels, panels, right_max)
        .map_err(|e| Error::Invalid(format!("{}: cannot draw the curves: {e}", path.display())))?;
    let image = image::RgbImage::from_raw(WIDTH, HEIGHT, pixels).expect("the buffer has the image's size");
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("{}: cannot encode PNG: {e}", path.display())))?;
    write_atomically(path, &png)
}

fn draw(
    pixels: &mut [u8],
    panels: [(&str, Curve); 2],
    right_max: Option<f64>,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let labels = font_available();
    let root = BitMapBackend::with_buffer(pixels, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    let epochs = panels.iter().flat_map(|(_, c)| c.iter().map(|p| p.0)).fold(1.0f64, f64::max);
    let largest = |curve: &Curve| curve.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.05;
    let [(left_title, left_curve), (right_title, right_curve)] = panels;
    let right_top = right_max.unwrap_or_else(|| largest(&right_curve));
    let areas = [
        (&left, left_title, largest(&left_curve), left_curve, RED),
        (&right, right_title, right_top, right_curve, BLUE),
    ];
    for (area, title, y_max, points, colour) in areas {
        let mut builder = ChartBuilder::on(area);
        builder.margin(12);
        if labels {
            builder.caption(title, ("sans-serif", 20)).x_label_area_size(34).y_label_area_size(48);
        }
        let mut chart = builder.build_cartesian_2d(0.0..epochs, 0.0..y_max)?;
        let mut mesh = chart.configure_mesh();
        if labels {
            mesh.x_desc("epoch").label_style(("sans-serif", 13));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw()?;
        chart.draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    root.present()?;
    Ok(())
}
