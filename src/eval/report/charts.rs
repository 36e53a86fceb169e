//! The report's charts as inline SVG, drawn with plotters' SVG backend (docs/eval_report.md).
//!
//! plotters measures text through its font layer, which in this crate is `ab_glyph` (for the
//! training curves' PNG) and needs a font file registered at run time. An SVG's text is set by
//! the browser, so the backend here is wrapped and the wrapper estimates text sizes from the
//! character count instead: the charts need no font file on the machine that writes them.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
// The style traits are named in full below, not imported: imported, their `stroke_width` would
// clash with `Color::stroke_width` on plotters' colours.
use plotters_backend::{BackendColor, BackendCoord, DrawingBackend, DrawingErrorKind};

use crate::error::{Error, Result};
use crate::eval::metrics::{ErrorCurvePoint, ReliabilityBin};

/// Width of a character relative to the font size, for layout only (a typical sans-serif
/// average; the browser sets the real text).
const CHARACTER_WIDTH: f64 = 0.58;

/// plotters' SVG backend, measuring text without a font file.
struct BrowserTextSvg<'a>(SVGBackend<'a>);

type Failure = DrawingErrorKind<std::io::Error>;

impl DrawingBackend for BrowserTextSvg<'_> {
    type ErrorType = std::io::Error;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }

    fn ensure_prepared(&mut self) -> std::result::Result<(), Failure> {
        self.0.ensure_prepared()
    }

    fn present(&mut self) -> std::result::Result<(), Failure> {
        self.0.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> std::result::Result<(), Failure> {
        self.0.draw_pixel(point, color)
    }

    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> std::result::Result<(), Failure> {
        self.0.draw_line(from, to, style)
    }

    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), Failure> {
        self.0.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> std::result::Result<(), Failure> {
        self.0.draw_path(path, style)
    }

    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), Failure> {
        self.0.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> std::result::Result<(), Failure> {
        self.0.fill_polygon(vert, style)
    }

    fn draw_text<S: plotters_backend::BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> std::result::Result<(), Failure> {
        self.0.draw_text(text, style, pos)
    }

    fn estimate_text_size<S: plotters_backend::BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> std::result::Result<(u32, u32), Failure> {
        // The SVG backend writes `font-size` as the style's size / 1.24 (plotters' convention).
        let font_px = style.size() / 1.24;
        let width = text.chars().count() as f64 * CHARACTER_WIDTH * font_px;
        Ok((width.ceil() as u32, font_px.ceil() as u32))
    }
}

/// Draws into a fresh SVG document of `width` x `height` and returns its text (without an XML
/// declaration, ready to inline in HTML).
fn svg(
    what: &str,
    (width, height): (u32, u32),
    draw: impl FnOnce(DrawingArea<BrowserTextSvg, plotters::coord::Shift>) -> DrawResult,
) -> Result<String> {
    let mut text = String::new();
    {
        let root = BrowserTextSvg(SVGBackend::with_string(&mut text, (width, height))).into_drawing_area();
        draw(root).map_err(|e| Error::Invalid(format!("cannot draw the {what}: {e}")))?;
    }
    Ok(text)
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

const LABELS: (&str, u32) = ("sans-serif", 15);
const AXIS_NAMES: (&str, u32) = ("sans-serif", 17);
const BAR: RGBColor = RGBColor(120, 160, 220);
const LINE: RGBColor = RGBColor(20, 60, 160);
const REFERENCE: RGBColor = RGBColor(130, 130, 130);
const ORACLE: RGBColor = RGBColor(30, 140, 60);

/// The reliability diagram of `bins`: on top, per non-empty bin, a bar up to the observed
/// foreground frequency across the bin's range and a dot at (mean predicted probability,
/// observed frequency), with the diagonal of perfect calibration; below, the bin's pixel count
/// on a log scale.
pub fn reliability_diagram(bins: &[ReliabilityBin]) -> Result<String> {
    svg("reliability diagram", (560, 560), |root| {
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(400);
        let mut chart = ChartBuilder::on(&top)
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc("predicted foreground probability")
            .y_desc("observed foreground frequency")
            .label_style(LABELS)
            .axis_desc_style(AXIS_NAMES)
            .draw()?;
        let filled: Vec<&ReliabilityBin> = bins.iter().filter(|b| b.pixels > 0).collect();
        chart.draw_series(
            filled
                .iter()
                .map(|b| Rectangle::new([(b.lower, 0.0), (b.upper, b.observed_frequency)], BAR.mix(0.6).filled())),
        )?;
        chart.draw_series(DashedLineSeries::new([(0.0, 0.0), (1.0, 1.0)], 6, 4, REFERENCE.stroke_width(2)))?;
        chart.draw_series(
            filled.iter().map(|b| Circle::new((b.mean_probability, b.observed_frequency), 4, LINE.filled())),
        )?;
        legend(
            &top,
            (82, 24),
            &[
                ("perfect calibration", Sample::Dashed(REFERENCE)),
                ("bin: mean probability, observed", Sample::Dot(LINE)),
                ("foreground share of the bin", Sample::Bar(BAR.mix(0.6).to_rgba())),
            ],
        )?;

        let most = filled.iter().map(|b| b.pixels).max().unwrap_or(1).max(10) as f64;
        let mut counts = ChartBuilder::on(&bottom)
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..1f64, (0.8f64..most * 2.0).log_scale())?;
        counts
            .configure_mesh()
            .x_desc("predicted foreground probability")
            .y_desc("pixels")
            .y_labels(4)
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style(LABELS)
            .axis_desc_style(AXIS_NAMES)
            .draw()?;
        counts.draw_series(
            filled.iter().map(|b| Rectangle::new([(b.lower, 0.8), (b.upper, b.pixels as f64)], BAR.filled())),
        )?;
        root.present()?;
        Ok(())
    })
}

/// The uncertainty–error curve (error rate among the most uncertain fraction of the pixels),
/// with two references: ranking at random (the split's error rate at every fraction) and the
/// best possible ranking (every misclassified pixel first).
pub fn uncertainty_error_curve(curve: &[ErrorCurvePoint]) -> Result<String> {
    svg("uncertainty-error curve", (560, 420), |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)?;
        chart
            .configure_mesh()
            .x_desc("fraction of pixels, most uncertain first")
            .y_desc("error rate among them")
            .label_style(LABELS)
            .axis_desc_style(AXIS_NAMES)
            .draw()?;
        let overall = curve.last().map_or(0.0, |p| p.error_rate);
        chart.draw_series(LineSeries::new([(0.0, overall), (1.0, overall)], REFERENCE.stroke_width(2)))?;
        chart.draw_series(DashedLineSeries::new(oracle(overall), 6, 4, ORACLE.stroke_width(2)))?;
        chart.draw_series(LineSeries::new(curve.iter().map(|p| (p.fraction, p.error_rate)), LINE.stroke_width(2)))?;
        let entries = [
            ("uncertainty ranking", Sample::Line(LINE)),
            ("errors first (best possible)", Sample::Dashed(ORACLE)),
            ("random ranking", Sample::Line(REFERENCE)),
        ];
        let width = legend_width(&entries) as i32;
        legend(&root, (560 - 24 - width, 24), &entries)?;
        root.present()?;
        Ok(())
    })
}

/// How a legend entry's sample is drawn.
#[derive(Clone, Copy)]
enum Sample {
    Line(RGBColor),
    Dashed(RGBColor),
    Dot(RGBColor),
    Bar(RGBAColor),
}

const LEGEND_ROW: i32 = 20;

/// Width of a legend box: the longest label, as [`BrowserTextSvg`] measures it, plus the sample.
fn legend_width(entries: &[(&str, Sample)]) -> u32 {
    let longest = entries.iter().map(|(text, _)| text.chars().count()).max().unwrap_or(0);
    (longest as f64 * CHARACTER_WIDTH * f64::from(LABELS.1) / 1.24).ceil() as u32 + 46
}

/// A legend box with its top left corner at `at` (pixels of `area`). plotters' own series
/// legend measures its text through the font layer, which [`BrowserTextSvg`] cannot replace,
/// so the box is drawn from plain elements.
fn legend(
    area: &DrawingArea<BrowserTextSvg, plotters::coord::Shift>,
    (x, y): (i32, i32),
    entries: &[(&str, Sample)],
) -> DrawResult {
    let (w, h) = (legend_width(entries) as i32, LEGEND_ROW * entries.len() as i32 + 8);
    area.draw(&Rectangle::new([(x, y), (x + w, y + h)], WHITE.mix(0.9).filled()))?;
    area.draw(&Rectangle::new([(x, y), (x + w, y + h)], REFERENCE.stroke_width(1)))?;
    let text = TextStyle::from(LABELS).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (label, sample)) in entries.iter().enumerate() {
        let mid = y + 4 + LEGEND_ROW * i as i32 + LEGEND_ROW / 2;
        let (x0, x1) = (x + 8, x + 32);
        match *sample {
            Sample::Line(c) => area.draw(&PathElement::new([(x0, mid), (x1, mid)], c.stroke_width(2)))?,
            Sample::Dashed(c) => {
                for start in [x0, x0 + 10, x0 + 20] {
                    area.draw(&PathElement::new([(start, mid), ((start + 6).min(x1), mid)], c.stroke_width(2)))?;
                }
            }
            Sample::Dot(c) => area.draw(&Circle::new(((x0 + x1) / 2, mid), 4, c.filled()))?,
            Sample::Bar(c) => area.draw(&Rectangle::new([(x0 + 4, mid - 6), (x1 - 4, mid + 6)], c.filled()))?,
        }
        area.draw(&Text::new(label.to_string(), (x1 + 6, mid), text.clone()))?;
    }
    Ok(())
}

/// The best possible curve for an overall error rate `e`: every pixel taken is wrong up to the
/// fraction `e`, after which the error rate falls as `e / fraction`.
fn oracle(e: f64) -> Vec<(f64, f64)> {
    let mut points = vec![(0.0, 1.0)];
    if e > 0.0 {
        points.push((e, 1.0));
        points.extend((1..=200).map(|i| e + (1.0 - e) * f64::from(i) / 200.0).map(|f| (f, e / f)));
    } else {
        points.extend([(0.0, 0.0), (1.0, 0.0)]);
    }
    points
}

/// Per-image Dice against the image's mean uncertainty, one dot per image.
pub fn dice_against_uncertainty(points: &[(f64, f64)]) -> Result<String> {
    svg("Dice-uncertainty scatter", (560, 420), |root| {
        root.fill(&WHITE)?;
        let most = points.iter().map(|p| p.0).fold(0.0f64, f64::max);
        let x_max = if most > 0.0 { most * 1.08 } else { std::f64::consts::LN_2 };
        let mut chart = ChartBuilder::on(&root)
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_max, 0f64..1.02f64)?;
        chart
            .configure_mesh()
            .x_desc("mean uncertainty of the image (nats)")
            .y_desc("Dice")
            .x_label_formatter(&|v| format!("{v:.3}"))
            .label_style(LABELS)
            .axis_desc_style(AXIS_NAMES)
            .draw()?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, LINE.mix(0.7).filled())))?;
        root.present()?;
        Ok(())
    })
}
