//! `eval --report`: one self-contained HTML page of an evaluation (docs/eval_report.md).
//!
//! The page holds the summary with 95 % bootstrap intervals ([`super::bootstrap`]), the
//! reliability diagram with its ECE, the uncertainty–error curve with its pooled AUROC, Dice
//! against mean uncertainty per image, a gallery of the worst images and, after a prompt sweep,
//! one row per prompt style. Charts are inline SVG ([`charts`]) and the gallery's overlays
//! base64 PNG ([`gallery`]): the file loads nothing, runs no script and opens from disk.
//!
//! What is pooled over the split is gathered while the evaluation runs, by a
//! [`ReportCollector`] observing [`super::evaluate_observed`], in fixed-size accumulators: the
//! 15 calibration bins, the 1000 uncertainty bins split by correct and misclassified pixels
//! ([`UncertaintyErrors`]) and at most `--report-images` thumbnails.

pub mod charts;
pub mod gallery;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::bootstrap::{self, Interval};
use super::metrics::{Calibration, UncertaintyErrors, ECE_BINS, UNCERTAINTY_BINS};
use super::{EvalOptions, Evaluation, ImageRecord, Scored, Summary};
use crate::error::Result;
use gallery::{Candidate, Gallery, GalleryImage, BOTH_COLOUR, PREDICTION_COLOUR, TRUTH_COLOUR};

/// Gallery images of a report unless asked otherwise (`--report-images`).
pub const DEFAULT_GALLERY_IMAGES: usize = 24;

/// The pooled accumulators and the gallery of one evaluated set, fed image by image.
#[derive(Debug)]
pub struct ReportCollector {
    calibration: Calibration,
    errors: UncertaintyErrors,
    gallery: Gallery,
}

impl ReportCollector {
    /// An empty collector whose gallery keeps at most `gallery_images` images.
    pub fn new(gallery_images: usize) -> ReportCollector {
        ReportCollector {
            calibration: Calibration::new(),
            errors: UncertaintyErrors::new(),
            gallery: Gallery::new(gallery_images),
        }
    }

    /// Takes in one scored image: its calibration bins, its pixels' uncertainty and correctness
    /// (misclassified as in [`super::score`]: the delivered mask differs from the truth), and,
    /// when it is among the worst so far, its overlay.
    pub fn observe(&mut self, scored: &Scored) -> Result<()> {
        let segmentation = scored.segmentation;
        self.calibration.merge(scored.calibration);
        let truth: Vec<bool> = scored.truth.data.iter().map(|&v| v != 0).collect();
        let wrong: Vec<bool> = segmentation.mask.iter().zip(&truth).map(|(&p, &t)| p != t).collect();
        self.errors.add(&segmentation.uncertainty, &wrong);
        let candidate = Candidate {
            name: &scored.item.name,
            prompt: &scored.item.prompt,
            dice: scored.record.dice,
            mean_uncertainty: scored.record.mean_uncertainty,
            image: scored.image,
            truth: &truth,
            uncertainty: &segmentation.uncertainty,
        };
        // The contour drawn is the mask Dice scored (the one `predict` writes with these options).
        self.gallery.offer(&candidate, || Ok(segmentation.mask.clone()))
    }

    /// The pooled calibration bins.
    pub fn calibration(&self) -> &Calibration {
        &self.calibration
    }

    /// The pooled uncertainty histogram.
    pub fn uncertainty_errors(&self) -> &UncertaintyErrors {
        &self.errors
    }

    /// The gallery.
    pub fn gallery(&self) -> &Gallery {
        &self.gallery
    }
}

/// What the report says about how the evaluation ran.
#[derive(Clone, Debug)]
pub struct ReportSettings {
    /// The model folder.
    pub model: PathBuf,
    /// The dataset folder.
    pub data: PathBuf,
    /// The split evaluated.
    pub split: String,
    /// The device it ran on.
    pub device: String,
    /// Samples, seed, noise, threshold, batch size, NSD tolerance.
    pub options: EvalOptions,
}

/// The page: `evaluations` are the sets evaluated, in order; the first is the one `collector`
/// observed, shown in detail. `sweep` says whether they are the prompt styles of a sweep.
pub fn render(
    settings: &ReportSettings,
    evaluations: &[Evaluation],
    collector: &ReportCollector,
    sweep: bool,
) -> Result<String> {
    let Some(detailed) = evaluations.first() else {
        return Err(crate::Error::Invalid("the report needs at least one evaluated set".into()));
    };
    let summary = &detailed.summary;
    let mut page = String::new();
    page.push_str(&head(&format!("mcs-engine evaluation: {}", summary.name)));
    let _ = write!(
        page,
        "<h1>Evaluation of {} on {}</h1>\n<p class=\"lead\">{} images, {} Monte-Carlo samples each. \
         Written by mcs-engine {} (<code>eval --report</code>); \
         docs/eval_report.md explains every chart.{}</p>\n",
        escape(&settings.model.display().to_string()),
        escape(&summary.name),
        summary.images,
        summary.samples,
        env!("CARGO_PKG_VERSION"),
        if sweep {
            " The charts and the gallery describe the first prompt style, <code>original</code>; \
             the prompt-sweep table compares all five."
        } else {
            ""
        }
    );
    page.push_str(NAV);
    page.push_str(&settings_section(settings, summary));
    page.push_str(&summary_section(detailed, collector, settings.options.tolerance));
    page.push_str(&reliability_section(summary, collector)?);
    page.push_str(&uncertainty_error_section(summary, collector)?);
    page.push_str(&scatter_section(&detailed.records)?);
    page.push_str(&gallery_section(collector));
    page.push_str(&sweep_section(evaluations, sweep));
    page.push_str("</body>\n</html>\n");
    Ok(page)
}

/// Writes the page to `path` through a temporary file and a rename (a crash never leaves half
/// a report over an earlier one).
pub fn write_report(path: &Path, page: &str) -> Result<()> {
    crate::files::write_atomically(path, page.as_bytes())
}

const NAV: &str = "<nav><a href=\"#settings\">settings</a> · <a href=\"#summary\">summary</a> · \
<a href=\"#reliability\">reliability</a> · <a href=\"#uncertainty-error\">uncertainty–error</a> · \
<a href=\"#dice-uncertainty\">Dice–uncertainty</a> · <a href=\"#gallery\">gallery</a> · \
<a href=\"#prompt-sweep\">prompt sweep</a></nav>\n";

fn head(title: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n",
        escape(title)
    )
}

const STYLE: &str = "body { font-family: sans-serif; margin: 1.5em auto; max-width: 1140px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; } th { background: #f2f2f2; }
.lead, .note { color: #444; } .note { font-size: 0.92em; max-width: 60em; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; } .charts > div { max-width: 30em; }
svg { max-width: 100%; height: auto; border: 1px solid #e4e4e4; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 0.8em; }
figure { margin: 0; } figure img { image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 0.82em; max-width: 196px; overflow-wrap: anywhere; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #888; vertical-align: middle; }
nav { margin: 0.5em 0 1em; }
";

/// `text` safe inside HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn settings_section(settings: &ReportSettings, summary: &Summary) -> String {
    let o = &settings.options;
    let rows: [(&str, String); 13] = [
        ("model", settings.model.display().to_string()),
        ("data", settings.data.display().to_string()),
        ("split", settings.split.clone()),
        ("prompt file", summary.prompts.display().to_string()),
        ("Monte-Carlo samples", o.segment.samples.to_string()),
        ("seed", o.segment.seed.to_string()),
        ("noise", o.segment.noise.name().to_string()),
        ("mask resize", o.segment.resize.name().to_string()),
        ("threshold", o.segment.threshold.to_string()),
        ("batch size", o.batch_size.to_string()),
        ("NSD tolerance (px)", o.tolerance.to_string()),
        ("device", settings.device.clone()),
        ("engine", format!("mcs-engine {}", env!("CARGO_PKG_VERSION"))),
    ];
    let mut out = String::from("<section id=\"settings\">\n<h2>Run settings</h2>\n<table>\n");
    for (key, value) in rows {
        let _ = writeln!(out, "<tr><th>{key}</th><td>{}</td></tr>", escape(&value));
    }
    out.push_str("</table>\n</section>\n");
    out
}

/// `12.34 %` of a fraction.
fn percent(v: f64) -> String {
    format!("{:.2} %", 100.0 * v)
}

fn interval_text(interval: Option<Interval>) -> String {
    interval.map_or_else(|| "–".to_string(), |i| format!("[{}, {}]", percent(i.low), percent(i.high)))
}

/// One summary row: the shown value carries the exact number in `data-value` (and its
/// summary.json key in `data-key`), so a script can read the page.
fn value_cell(key: &str, value: f64, shown: &str) -> String {
    format!("<td class=\"num\" data-key=\"{key}\" data-value=\"{value:?}\">{shown}</td>")
}

fn summary_section(evaluation: &Evaluation, collector: &ReportCollector, tolerance: f64) -> String {
    let s = &evaluation.summary;
    let dice: Vec<f64> = evaluation.records.iter().map(|r| r.dice).collect();
    let nsd: Vec<f64> = evaluation.records.iter().map(|r| r.nsd).collect();
    let errors = collector.uncertainty_errors();
    let mut out = String::from(
        "<section id=\"summary\">\n<h2>Summary</h2>\n<table>\n\
         <tr><th>metric</th><th>value</th><th>95 % interval</th><th>what</th></tr>\n",
    );
    let _ = writeln!(
        out,
        "<tr><th>images</th>{}<td></td><td>scored images of the set</td></tr>",
        value_cell("images", s.images as f64, &s.images.to_string())
    );
    let _ = writeln!(
        out,
        "<tr><th>DSC</th>{}<td class=\"num\" data-interval=\"dice\">{}</td><td>mean Dice over images</td></tr>",
        value_cell("dice", s.dice, &percent(s.dice)),
        interval_text(bootstrap::mean_interval(&dice))
    );
    let _ = writeln!(
        out,
        "<tr><th>NSD</th>{}<td class=\"num\" data-interval=\"nsd\">{}</td><td>mean normalised surface Dice at {} px</td></tr>",
        value_cell("nsd", s.nsd, &percent(s.nsd)),
        interval_text(bootstrap::mean_interval(&nsd)),
        tolerance
    );
    let _ = writeln!(
        out,
        "<tr><th>ECE</th>{}<td></td><td>expected calibration error, {ECE_BINS} bins, all pixels of the set pooled</td></tr>",
        value_cell("ece", s.ece, &format!("{:.4}", s.ece))
    );
    let _ = writeln!(
        out,
        "<tr><th>Brier</th>{}<td></td><td>mean squared error of the probability, all pixels pooled</td></tr>",
        value_cell("brier", s.brier, &format!("{:.4}", s.brier))
    );
    let auroc = match s.auroc {
        Some(a) => value_cell("auroc", a, &format!("{a:.4}")),
        None => "<td class=\"num\" data-key=\"auroc\" data-value=\"null\">–</td>".to_string(),
    };
    let _ = writeln!(
        out,
        "<tr><th>AUROC (per-image mean)</th>{auroc}<td></td><td>uncertainty as a score for misclassified pixels, \
         computed per image and averaged over the {} images where it is defined (summary.json's <code>auroc</code>)</td></tr>",
        s.auroc_images
    );
    let pooled = match (errors.auroc(), errors.auroc_tie_bound()) {
        (Some(a), Some(bound)) => format!(
            "<td class=\"num\" data-key=\"auroc_pooled\" data-value=\"{a:?}\">{a:.4}</td><td class=\"num\">± {bound:.1e} (binning)</td>"
        ),
        _ => "<td class=\"num\" data-key=\"auroc_pooled\" data-value=\"null\">–</td><td></td>".to_string(),
    };
    let _ = writeln!(
        out,
        "<tr><th>AUROC (pooled)</th>{pooled}<td>the same question over all pixels of the set at once \
         (<a href=\"#uncertainty-error\">below</a>); not in summary.json</td></tr>"
    );
    out.push_str("</table>\n");
    let _ = writeln!(
        out,
        "<p class=\"note\">Intervals: percentile bootstrap over images — {} resamples of the {} per-image values drawn \
         with replacement (fixed seed {:#x}, so the interval repeats), the 2.5th and 97.5th percentiles of the \
         resampled means. They describe how the mean would move with another sample of images from the same \
         source; the model's Monte-Carlo noise is held fixed by the evaluation's seed. ECE, Brier and AUROC are \
         pooled or averaged over pixels and carry no interval here.</p>",
        bootstrap::RESAMPLES,
        s.images,
        bootstrap::SEED
    );
    out.push_str("</section>\n");
    out
}

fn reliability_section(summary: &Summary, collector: &ReportCollector) -> Result<String> {
    let bins = collector.calibration().bins();
    let mut out = String::from("<section id=\"reliability\">\n<h2>Reliability diagram</h2>\n<div class=\"charts\">\n");
    out.push_str(&inline_svg(&charts::reliability_diagram(&bins)?));
    out.push_str("<div>\n<table>\n<tr><th>probability bin</th><th>pixels</th><th>mean probability</th><th>observed frequency</th></tr>\n");
    for b in &bins {
        let (p, o) = if b.pixels == 0 {
            ("–".to_string(), "–".to_string())
        } else {
            (format!("{:.4}", b.mean_probability), format!("{:.4}", b.observed_frequency))
        };
        let _ = writeln!(
            out,
            "<tr><td>{:.3} – {:.3}</td><td class=\"num\">{}</td><td class=\"num\">{p}</td><td class=\"num\">{o}</td></tr>",
            b.lower, b.upper, b.pixels
        );
    }
    let _ = write!(
        out,
        "</table>\n<p>ECE <strong data-key=\"ece\" data-value=\"{:?}\">{:.4}</strong> over {} pixels.</p>\n</div>\n</div>\n",
        summary.ece,
        summary.ece,
        collector.calibration().pixels()
    );
    let _ = writeln!(
        out,
        "<p class=\"note\">Every pixel of the set, pooled, in {ECE_BINS} equal-width bins of the predicted foreground \
         probability (the bins of eval's ECE). Bars: the fraction of a bin's pixels that are foreground; dots: at \
         the bin's mean probability; a calibrated model's dots lie on the diagonal. Lower panel: pixels per bin \
         (log scale). ECE is the pixel-weighted mean of |observed − mean probability| over the bins.</p>"
    );
    out.push_str("</section>\n");
    Ok(out)
}

fn uncertainty_error_section(summary: &Summary, collector: &ReportCollector) -> Result<String> {
    let errors = collector.uncertainty_errors();
    let curve = errors.error_curve();
    let mut out =
        String::from("<section id=\"uncertainty-error\">\n<h2>Uncertainty–error curve</h2>\n<div class=\"charts\">\n");
    out.push_str(&inline_svg(&charts::uncertainty_error_curve(&curve)?));
    let pooled = errors
        .auroc()
        .map_or_else(|| "undefined (no misclassified or no correct pixel)".to_string(), |a| format!("{a:.4}"));
    let bound = errors
        .auroc_tie_bound()
        .map_or_else(String::new, |b| format!(" (exact to ± {b:.1e}: pixels of one bin count as ties)"));
    let per_image = summary.auroc.map_or_else(|| "undefined".to_string(), |a| format!("{a:.4}"));
    let mut ranked = String::new();
    for f in [0.01, 0.05, 0.10] {
        // A point far past `f` means the pixels around `f` share one bin and are not ranked.
        if let Some(p) = curve.iter().find(|p| p.fraction >= f).filter(|p| p.fraction <= 2.0 * f) {
            let _ = write!(ranked, "<br>top {}: error rate {}", percent(p.fraction), percent(p.error_rate));
        }
    }
    let lowest_bin_share = match curve.as_slice() {
        [.., before, last] if last.uncertainty == 0.0 => last.fraction - before.fraction,
        [only] if only.uncertainty == 0.0 => 1.0,
        _ => 0.0,
    };
    if lowest_bin_share > 0.0 {
        let _ = write!(
            ranked,
            "<br>the least uncertain {} of the pixels share the lowest bin (below {:.1e} nats) and are not ranked \
             among themselves",
            percent(lowest_bin_share),
            UncertaintyErrors::bin_lower_edge(1)
        );
    }
    let _ = write!(
        out,
        "<div>\n<p>Pooled AUROC <strong>{pooled}</strong>{bound}.</p>\n<p>Per-image mean AUROC {per_image} \
         (over {} images; the summary's AUROC).</p>\n<p>{} misclassified of {} pixels (error rate {}).</p>\n\
         <p>Most uncertain pixels first, at bin edges:{ranked}</p>\n</div>\n</div>\n",
        summary.auroc_images,
        errors.wrong_pixels(),
        errors.pixels(),
        curve.last().map_or_else(|| "–".to_string(), |p| percent(p.error_rate)),
    );
    let _ = writeln!(
        out,
        "<p class=\"note\">A pixel is misclassified when its mask value (probability &gt; threshold, at the image's \
         size) differs from the ground truth. Pixels of the whole set are ranked by uncertainty, most uncertain \
         first; the curve gives the error rate among the top fraction. Useful uncertainty puts errors first: the \
         curve starts high and falls to the set's error rate at fraction 1 (grey: a random ranking; green: every \
         error first). Pooled AUROC: the probability that a random misclassified pixel of the set is more \
         uncertain than a random correct one. Per-image AUROC: the same within each image, then averaged, so \
         each image weighs the same and images without errors drop out. The pooled curve and AUROC keep no \
         pixel list: uncertainties go to {UNCERTAINTY_BINS} bins on a quadratic scale (6.9e-7 nats wide at 0, 1.4e-3 nats at ln 2), split \
         by correct and misclassified; the curve is drawn at bin edges.</p>"
    );
    out.push_str("</section>\n");
    Ok(out)
}

/// Pearson correlation of `(x, y)` points; `None` for fewer than two or a constant coordinate.
fn pearson(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for &(x, y) in points {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

fn scatter_section(records: &[ImageRecord]) -> Result<String> {
    let points: Vec<(f64, f64)> = records.iter().map(|r| (r.mean_uncertainty, r.dice)).collect();
    let mut out = String::from(
        "<section id=\"dice-uncertainty\">\n<h2>Dice against mean uncertainty</h2>\n<div class=\"charts\">\n",
    );
    out.push_str(&inline_svg(&charts::dice_against_uncertainty(&points)?));
    let r = pearson(&points).map_or_else(|| "undefined".to_string(), |r| format!("{r:.3}"));
    let _ = writeln!(out, "<p>Pearson correlation over {} images: <strong>{r}</strong>.</p>\n</div>", points.len());
    out.push_str(
        "<p class=\"note\">One dot per image: its Dice against the mean of its uncertainty map (nats). An \
         uncertainty that flags bad segmentations gives a falling cloud (negative correlation): the images to \
         review first are on the right.</p>\n</section>\n",
    );
    Ok(out)
}

fn swatch(colour: [u8; 3]) -> String {
    format!("<span class=\"swatch\" style=\"background: rgb({}, {}, {})\"></span>", colour[0], colour[1], colour[2])
}

fn gallery_section(collector: &ReportCollector) -> String {
    let gallery = collector.gallery();
    let shown = gallery.worst_first();
    let mut out = String::from("<section id=\"gallery\">\n<h2>Gallery, worst Dice first</h2>\n");
    let _ = writeln!(
        out,
        "<p data-gallery-shown=\"{}\" data-gallery-total=\"{}\">{} of {} images shown, the lowest Dice first. \
         {} ground truth, {} prediction (the mask Dice scored), {} both; the uncertainty blended in as in \
         <code>predict</code>'s overlay.png (black: certain, to white: ln 2).</p>",
        shown.len(),
        gallery.seen(),
        shown.len(),
        gallery.seen(),
        swatch(TRUTH_COLOUR),
        swatch(PREDICTION_COLOUR),
        swatch(BOTH_COLOUR)
    );
    out.push_str("<div class=\"gallery\">\n");
    for image in &shown {
        out.push_str(&figure(image));
    }
    out.push_str("</div>\n</section>\n");
    out
}

/// One gallery image, shown with its longest side [`gallery::THUMBNAIL_SIDE`] (small images
/// enlarged by the browser, pixels kept sharp).
fn figure(image: &GalleryImage) -> String {
    let data = base64::engine::general_purpose::STANDARD.encode(&image.png);
    let scale = f64::from(gallery::THUMBNAIL_SIDE) / f64::from(image.width.max(image.height));
    let shown = |n: u32| ((f64::from(n) * scale).round() as u32).max(1);
    format!(
        "<figure><img src=\"data:image/png;base64,{data}\" width=\"{}\" height=\"{}\" alt=\"{}\">\
         <figcaption><strong>{}</strong><br>Dice {:.4} · mean uncertainty {:.4}<br><q>{}</q></figcaption></figure>\n",
        shown(image.width),
        shown(image.height),
        escape(&image.name),
        escape(&image.name),
        image.dice,
        image.mean_uncertainty,
        escape(&image.prompt)
    )
}

fn sweep_section(evaluations: &[Evaluation], sweep: bool) -> String {
    let mut out = String::from("<section id=\"prompt-sweep\">\n<h2>Prompt sweep</h2>\n");
    if !sweep {
        out.push_str(
            "<p>Not run: <code>eval --prompt-sweep --report</code> adds one row per prompt style.</p>\n</section>\n",
        );
        return out;
    }
    out.push_str(
        "<table>\n<tr><th>prompt style</th><th>images</th><th>DSC</th><th>DSC 95 %</th><th>NSD</th><th>NSD 95 %</th>\
         <th>ECE</th><th>Brier</th><th>AUROC (per-image mean)</th></tr>\n",
    );
    for e in evaluations {
        let s = &e.summary;
        let dice: Vec<f64> = e.records.iter().map(|r| r.dice).collect();
        let nsd: Vec<f64> = e.records.iter().map(|r| r.nsd).collect();
        let auroc = s.auroc.map_or_else(|| "–".to_string(), |a| format!("{a:.4}"));
        let _ = writeln!(
            out,
            "<tr data-style=\"{}\"><th>{}</th><td class=\"num\">{}</td>{}<td class=\"num\">{}</td>{}<td class=\"num\">{}</td>\
             <td class=\"num\">{:.4}</td><td class=\"num\">{:.4}</td><td class=\"num\">{auroc}</td></tr>",
            escape(&s.name),
            escape(&s.name),
            s.images,
            value_cell("dice", s.dice, &percent(s.dice)),
            interval_text(bootstrap::mean_interval(&dice)),
            value_cell("nsd", s.nsd, &percent(s.nsd)),
            interval_text(bootstrap::mean_interval(&nsd)),
            s.ece,
            s.brier
        );
    }
    out.push_str(
        "</table>\n<p class=\"note\">The test split evaluated once per prompt file \
         <code>Prompts_Folder/Test_text_&lt;style&gt;.xlsx</code>, with the same seed and settings; intervals as in \
         the summary.</p>\n</section>\n",
    );
    out
}

/// A plotters SVG document as an element of the HTML page: the namespace declaration goes
/// (the HTML parser puts `<svg>` in the SVG namespace itself), so the page names no URL.
fn inline_svg(svg: &str) -> String {
    svg.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1)
}
