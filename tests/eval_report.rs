//! `mcs-engine eval --report` end to end on a small synthetic test split (`synth`) with the demo
//! checkpoint: the page has every section, every embedded picture decodes, every inline SVG is
//! well-formed XML, nothing outside the file is referenced, and the numbers it shows are
//! summary.json's and Test.csv's (docs/eval_report.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use base64::Engine as _;

/// The binary under test: `MCS_ENGINE_BIN` when set (a packed GPU kit), else cargo's.
fn binary() -> PathBuf {
    std::env::var_os("MCS_ENGINE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_mcs-engine").into(), Into::into)
}

/// The repository root: `MCS_ROOT` when set (a GPU kit copied to another machine), else the
/// source tree cargo built from.
fn repository() -> PathBuf {
    match std::env::var_os("MCS_ROOT") {
        Some(root) if !root.is_empty() => root.into(),
        _ => env!("CARGO_MANIFEST_DIR").into(),
    }
}

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Outcome {
    let out = Command::new(binary()).args(args).output().unwrap();
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-eval-report-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const TEST_IMAGES: usize = 6;
const GALLERY: usize = 4;
const SIDE: usize = 96;

/// Six synthetic test images of 96 px, with the five prompt-style files a sweep needs (copies
/// of the split's prompts: the sweep's machinery is what is tested, not the styles).
fn dataset() -> &'static PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        let data = scratch("data");
        let synth =
            run(&["synth", "--out", s(&data), "--train", "0", "--val", "0", "--test", &TEST_IMAGES.to_string()]);
        assert!(synth.ok, "synth failed: {}", synth.stderr);
        let prompts = data.join("Prompts_Folder");
        for style in mcs_engine::eval::PROMPT_VARIANTS {
            std::fs::copy(prompts.join("Test_text.xlsx"), prompts.join(format!("Test_text_{style}.xlsx"))).unwrap();
        }
        data
    })
}

fn demo_model() -> PathBuf {
    repository().join("weights/demo")
}

/// `eval --report` with 2 samples and a gallery of 4, plus `extra`; the page and summary.json.
fn report(name: &str, extra: &[&str]) -> (String, serde_json::Value, PathBuf) {
    let out = scratch(name);
    let model = demo_model();
    let mut args = vec![
        "eval",
        "--model",
        s(&model),
        "--data",
        s(dataset()),
        "--samples",
        "2",
        "--report",
        "--report-images",
        "4",
        "--device",
        "cpu",
        "--out",
        s(&out),
    ];
    args.extend_from_slice(extra);
    let outcome = run(&args);
    assert!(outcome.ok, "eval --report failed: {}", outcome.stderr);
    assert!(outcome.stdout.contains("report.html"), "{}", outcome.stdout);
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    let summary = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    (page, summary, out)
}

/// The text of `<section id="{id}">` ... `</section>`.
fn section<'a>(page: &'a str, id: &str) -> &'a str {
    let start = page.find(&format!("<section id=\"{id}\">")).unwrap_or_else(|| panic!("no section {id}"));
    let end = page[start..].find("</section>").unwrap_or_else(|| panic!("section {id} is not closed"));
    &page[start..start + end]
}

/// Every value of `attribute="..."` in `text`.
fn attribute_values<'a>(text: &'a str, attribute: &str) -> Vec<&'a str> {
    let key = format!(" {attribute}=\"");
    text.match_indices(&key)
        .map(|(at, _)| {
            let rest = &text[at + key.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect()
}

/// `data-key` -> `data-value` of the cells of `text`.
fn keyed_values(text: &str) -> HashMap<String, String> {
    let keys = attribute_values(text, "data-key");
    let values = attribute_values(text, "data-value");
    assert_eq!(keys.len(), values.len(), "every keyed cell has a value");
    keys.into_iter().map(String::from).zip(values.into_iter().map(String::from)).collect()
}

/// Checks an inline SVG chart is well-formed XML: every element closed in order, attributes
/// quoted, entities known (quick-xml checks end names against start names).
fn assert_well_formed(svg: &str) {
    let mut reader = quick_xml::Reader::from_str(svg);
    let mut depth = 0i64;
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Start(_)) => depth += 1,
            Ok(quick_xml::events::Event::End(_)) => depth -= 1,
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(quick_xml::events::Event::GeneralRef(reference)) => {
                let known = ["amp", "lt", "gt", "quot", "apos"].iter().any(|&name| &*reference == name);
                assert!(known || reference.resolve_char_ref().is_ok_and(|c| c.is_some()), "unknown entity in an SVG");
            }
            Ok(_) => {}
            Err(e) => panic!("an inline SVG is not well-formed at {}: {e}", reader.buffer_position()),
        }
    }
    assert_eq!(depth, 0, "an inline SVG leaves elements open");
}

/// Per-image Dice of Test.csv by image name.
fn csv_dice(path: &Path) -> Vec<(String, f64)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let dice = header.iter().position(|&c| c == "dice").unwrap();
    lines
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            (cells[0].to_string(), cells[dice].parse().unwrap())
        })
        .collect()
}

#[test]
fn report_is_self_contained_and_shows_summary_json() {
    let (page, summary, out) = report("plain", &[]);
    let summary = &summary[0];
    assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
    for id in ["settings", "summary", "reliability", "uncertainty-error", "dice-uncertainty", "gallery", "prompt-sweep"]
    {
        section(&page, id);
    }

    // Nothing outside the file: no URL at all, every src/href a data: URI or an in-page anchor,
    // no script.
    assert!(!page.contains("http://") && !page.contains("https://"), "the page names a URL");
    assert!(!page.contains("<script"), "the page holds a script");
    for value in attribute_values(&page, "src").into_iter().chain(attribute_values(&page, "href")) {
        assert!(value.starts_with("data:") || value.starts_with('#'), "reference to {value}");
    }

    // Every embedded picture decodes: base64 PNGs with the image crate, SVGs as XML.
    let pictures: Vec<&str> = attribute_values(&page, "src");
    assert_eq!(pictures.len(), GALLERY);
    for uri in &pictures {
        let encoded = uri.strip_prefix("data:image/png;base64,").unwrap_or_else(|| panic!("not a PNG data URI"));
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
        let picture = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
        // Synthetic images are 96 px, under the thumbnail side, so kept at their size.
        assert_eq!((picture.width(), picture.height()), (SIDE as u32, SIDE as u32));
    }
    assert_eq!(page.matches("<svg").count(), 3, "three charts");
    assert_eq!(page.matches("</svg>").count(), 3);
    let mut rest = page.as_str();
    while let Some(start) = rest.find("<svg") {
        let end = rest[start..].find("</svg>").unwrap() + start + "</svg>".len();
        assert_well_formed(&rest[start..end]);
        rest = &rest[end..];
    }

    // The summary table's numbers are summary.json's, exactly, and shown rounded.
    let cells = keyed_values(section(&page, "summary"));
    for key in ["images", "dice", "nsd", "ece", "brier", "auroc"] {
        let shown: f64 = cells[key].parse().unwrap_or_else(|_| panic!("{key}: {}", cells[key]));
        assert_eq!(shown, summary[key].as_f64().unwrap(), "{key}");
    }
    let dice = summary["dice"].as_f64().unwrap();
    assert!(section(&page, "summary").contains(&format!(">{:.2} %</td>", 100.0 * dice)));
    // The bootstrap interval of the mean Dice brackets it and lies within the per-image range.
    let interval = section(&page, "summary").split("data-interval=\"dice\">[").nth(1).unwrap();
    let ends: Vec<f64> = interval
        .split(']')
        .next()
        .unwrap()
        .split(',')
        .map(|t| t.trim().trim_end_matches(" %").parse().unwrap())
        .collect();
    let per_image = csv_dice(&out.join("Test.csv"));
    let lowest = per_image.iter().map(|d| d.1).fold(1.0, f64::min) * 100.0;
    // Shown to 2 decimals of a percent: allow that rounding.
    assert!(
        lowest - 0.005 <= ends[0] && ends[0] <= 100.0 * dice + 0.005 && 100.0 * dice - 0.005 <= ends[1],
        "{ends:?}"
    );

    // The reliability diagram pools every pixel of the split, and its ECE is the summary's.
    let reliability = section(&page, "reliability");
    assert_eq!(keyed_values(reliability)["ece"].parse::<f64>().unwrap(), summary["ece"].as_f64().unwrap());
    assert!(reliability.contains(&format!("over {} pixels", TEST_IMAGES * SIDE * SIDE)), "pixel count");
    let pooled: f64 = cells["auroc_pooled"].parse().unwrap();
    assert!((0.0..=1.0).contains(&pooled));

    // The gallery: the 4 lowest-Dice images of Test.csv, worst first, "4 of 6".
    let gallery = section(&page, "gallery");
    assert!(gallery.contains(&format!("data-gallery-shown=\"{GALLERY}\" data-gallery-total=\"{TEST_IMAGES}\"")));
    let mut expected = per_image.clone();
    expected.sort_by(|a, b| a.1.total_cmp(&b.1));
    let shown: Vec<&str> = attribute_values(gallery, "alt");
    let expected_names: Vec<&str> = expected.iter().take(GALLERY).map(|e| e.0.as_str()).collect();
    assert_eq!(shown, expected_names);

    assert!(section(&page, "prompt-sweep").contains("Not run"));
}

#[test]
fn report_with_a_prompt_sweep_has_one_row_per_style() {
    let (page, summaries, _) = report("sweep", &["--prompt-sweep"]);
    let sweep = section(&page, "prompt-sweep");
    let summaries = summaries.as_array().unwrap();
    assert_eq!(summaries.len(), 5);
    for summary in summaries {
        let style = summary["name"].as_str().unwrap();
        let row_start = sweep.find(&format!("<tr data-style=\"{style}\">")).unwrap_or_else(|| panic!("no row {style}"));
        let row = &sweep[row_start..row_start + sweep[row_start..].find("</tr>").unwrap()];
        let cells = keyed_values(row);
        for key in ["dice", "nsd"] {
            assert_eq!(cells[key].parse::<f64>().unwrap(), summary[key].as_f64().unwrap(), "{style} {key}");
        }
    }
    // The detailed sections describe the first style.
    let cells = keyed_values(section(&page, "summary"));
    assert_eq!(cells["dice"].parse::<f64>().unwrap(), summaries[0]["dice"].as_f64().unwrap());
}

#[test]
fn report_is_refused_where_it_makes_no_sense() {
    let out = scratch("refused");
    let zero_shot = run(&["eval", "--data", s(dataset()), "--zero-shot", "--report", "--out", s(&out)]);
    assert!(!zero_shot.ok);
    assert!(zero_shot.stderr.contains("--report is not available with --zero-shot"), "{}", zero_shot.stderr);
    let images_alone = run(&["eval", "--data", s(dataset()), "--report-images", "3", "--out", s(&out)]);
    assert!(!images_alone.ok);
    assert!(images_alone.stderr.contains("--report"), "{}", images_alone.stderr);
    assert!(!out.join("report.html").exists());
}
