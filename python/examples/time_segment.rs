//! The Rust side of python/bench_segment.py: times `Segmenter::segment` called from Rust, the
//! baseline the Python binding's overhead is measured against (docs/python.md §7).
//!
//! ```sh
//! cargo run --release -p mcs-engine-python --example time_segment -- MODEL IMAGE PROMPT SAMPLES CALLS
//! ```
//!
//! Loads MODEL on the CPU once, reads IMAGE as `predict` does, makes one untimed warm-up call,
//! then prints the seconds of each of CALLS calls (seed 666, plain noise, threshold 0.5), one per
//! line, so that the script takes the same statistics of both sides.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use mcs_engine::segment::{read_image, Options, Segmenter};
use mcs_engine::{Device, Result};

fn run(model: &Path, image: &Path, prompt: &str, samples: usize, calls: usize) -> Result<Vec<f64>> {
    let segmenter = Segmenter::load_on(model, &Device::Cpu)?;
    let picture = read_image(image)?;
    let options = Options { samples, ..Options::default() };
    segmenter.segment(&picture, prompt, &options)?;
    let mut seconds = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        std::hint::black_box(segmenter.segment(&picture, prompt, &options)?);
        seconds.push(started.elapsed().as_secs_f64());
    }
    Ok(seconds)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image, prompt, samples, calls] = args.as_slice() else {
        eprintln!("usage: time_segment MODEL IMAGE PROMPT SAMPLES CALLS");
        return ExitCode::FAILURE;
    };
    let (Ok(samples), Ok(calls)) = (samples.parse(), calls.parse()) else {
        eprintln!("SAMPLES and CALLS must be whole numbers");
        return ExitCode::FAILURE;
    };
    match run(Path::new(model), Path::new(image), prompt, samples, calls) {
        Ok(seconds) => {
            seconds.iter().for_each(|s| println!("{s:.9}"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
