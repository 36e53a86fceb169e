//! Segment one image with a model folder that `mcs-engine train` wrote, through the library:
//!
//! ```sh
//! cargo run --release --example segment -- runs/train/best case.png "one small round lesion at the center" out/
//! ```
//!
//! Loads the model once (GPU when present, else the CPU), segments with 30 Monte-Carlo samples,
//! prints a one-line summary and writes mask, probability, uncertainty and overlay files into the
//! output folder. `tests/segment.rs` runs [`run`] on a freshly trained model.

use std::path::Path;
use std::process::ExitCode;

use mcs_engine::segment::{read_image, write_outputs, Options, Segmentation, Segmenter};
use mcs_engine::Result;

/// Loads `model`, segments `image` for `prompt` and writes the maps into `out`.
pub fn run(model: &Path, image: &Path, prompt: &str, out: &Path) -> Result<Segmentation> {
    let segmenter = Segmenter::load(model)?;
    let picture = read_image(image)?;
    let result = segmenter.segment(&picture, prompt, &Options::default())?;
    write_outputs(out, &picture, &result)?;
    println!(
        "{}: {}x{}, {:.1} % foreground, mean uncertainty {:.3} nats (on {}); maps in {}",
        image.display(),
        result.width,
        result.height,
        100.0 * result.foreground_fraction(),
        result.mean_uncertainty(),
        segmenter.device().name(),
        out.display()
    );
    Ok(result)
}

// The test that runs `run` includes this file as a module, where `main` is not called.
#[cfg_attr(test, allow(dead_code))]
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image, prompt, rest @ ..] = args.as_slice() else {
        eprintln!("usage: segment MODEL_DIR IMAGE PROMPT [OUT_DIR]");
        return ExitCode::FAILURE;
    };
    let out = rest.first().map_or("out", String::as_str);
    match run(Path::new(model), Path::new(image), prompt, Path::new(out)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
