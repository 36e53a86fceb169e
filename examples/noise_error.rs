//! How far the uncertainty map of N Monte-Carlo samples is from a many-sample reference, for each
//! noise mode (issue 7, point 5): does a variance-reduction mode buy the same accuracy with fewer
//! samples?
//!
//! ```sh
//! cargo run --release --example noise_error -- [--model weights/demo] [--images 20] [--seeds 10] \
//!     [--reference 1000] [--samples 5,10,30]
//! ```
//!
//! For each of the first `--images` validation images of the synthetic task (`mcs-engine synth`'s
//! `Val_Folder`: ids 2000.. of seed 666, 96 px) with its own prompt, a reference mean probability
//! is pooled over `--reference` plain draws (chunks of 100 under seeds 1000000 + k, disjoint from
//! the test seeds), and its binary entropy is the reference uncertainty map. Then, for each N of
//! `--samples`, each noise mode and each seed 1..=`--seeds`, the segmenter's maps at N samples are
//! compared with the reference: RMSE and mean absolute error of the entropy map (nats), RMSE of the
//! mean probability. Each seed's numbers are averaged over the images; the table gives the mean
//! over seeds and its spread (sample standard deviation over seeds), and the ratio of the mean
//! squared entropy errors (antithetic / plain: below 1 means fewer samples reach the same error).
//! The reference is itself a Monte-Carlo estimate: its own squared error adds about
//! `sigma^2 / reference` to every row's MSE, where the plain rows give `sigma^2` (their MSE is
//! `sigma^2 (1/N + 1/reference)`). The last columns remove that floor: the variance ratio
//! `(MSE - floor) / (plain MSE - floor)` and the plain samples that would give the same error
//! (`N / ratio`).
//! Both modes use the same seeds (draw 0 is the same noise in both), so the comparison is paired.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use mcs_engine::data::synthetic;
use mcs_engine::segment::{binary_entropy, NoiseMode, Options, Segmenter};
use mcs_engine::{Error, Result};

/// Validation ids of the synthetic task start here (2000 training images come first).
const FIRST_VAL_ID: usize = 2000;
/// Seed of the synthetic task as `mcs-engine synth` and the demo training run use it.
const DATA_SEED: u64 = 666;
/// Reference draws per segment call (bounds the memory of one batched pass).
const REFERENCE_CHUNK: usize = 100;
/// Seeds of the reference chunks start here, far from the test seeds 1..=seeds.
const REFERENCE_SEED: u64 = 1_000_000;

struct Args {
    model: PathBuf,
    images: usize,
    seeds: u64,
    reference: usize,
    samples: Vec<usize>,
}

fn parse_args() -> Result<Args> {
    let mut args =
        Args { model: "weights/demo".into(), images: 20, seeds: 10, reference: 1000, samples: vec![5, 10, 30] };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| Error::Invalid(format!("{flag} needs a value")))?;
        let number = |v: &str| v.parse::<usize>().map_err(|e| Error::Invalid(format!("{flag} {v}: {e}")));
        match flag.as_str() {
            "--model" => args.model = value.into(),
            "--images" => args.images = number(&value)?,
            "--seeds" => args.seeds = number(&value)? as u64,
            "--reference" => args.reference = number(&value)?,
            "--samples" => args.samples = value.split(',').map(number).collect::<Result<_>>()?,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown flag {flag} (expected --model, --images, --seeds, --reference, --samples)"
                )))
            }
        }
    }
    if args.images == 0 || args.seeds < 2 || args.reference == 0 || args.samples.contains(&0) {
        return Err(Error::Invalid("--images, --reference and every --samples need >= 1, --seeds >= 2".into()));
    }
    Ok(args)
}

/// Errors of one N-sample map against the reference.
#[derive(Clone, Copy, Default)]
struct Errors {
    entropy_mse: f64,
    entropy_rmse: f64,
    entropy_mae: f64,
    probability_rmse: f64,
}

fn errors(probability: &[f32], reference_p: &[f64], reference_h: &[f64]) -> Errors {
    let n = probability.len() as f64;
    let (mut h_sq, mut h_abs, mut p_sq) = (0.0, 0.0, 0.0);
    for ((&p, &rp), &rh) in probability.iter().zip(reference_p).zip(reference_h) {
        let dh = f64::from(binary_entropy(p)) - rh;
        let dp = f64::from(p) - rp;
        h_sq += dh * dh;
        h_abs += dh.abs();
        p_sq += dp * dp;
    }
    Errors {
        entropy_mse: h_sq / n,
        entropy_rmse: (h_sq / n).sqrt(),
        entropy_mae: h_abs / n,
        probability_rmse: (p_sq / n).sqrt(),
    }
}

/// Mean and sample standard deviation.
fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let segmenter = Segmenter::load(&args.model)?;
    let images: Vec<_> =
        (0..args.images).map(|i| synthetic::sample(DATA_SEED, FIRST_VAL_ID + i, synthetic::DEFAULT_SIZE)).collect();
    let modes = NoiseMode::ALL;

    // errors[n][mode][seed] summed over images, divided at the end.
    let mut table = vec![vec![vec![Errors::default(); args.seeds as usize]; modes.len()]; args.samples.len()];
    for (i, item) in images.iter().enumerate() {
        let segment = |samples, seed, noise| {
            let options = Options { samples, seed, noise, ..Options::default() };
            segmenter.segment(&item.image, &item.prompt, &options).map(|s| s.model_probability)
        };
        // The reference: the mean probability pooled over every plain draw, weighted by chunk size.
        let mut reference_p: Vec<f64> = Vec::new();
        let mut done = 0;
        for chunk in 0.. {
            let samples = REFERENCE_CHUNK.min(args.reference - done);
            if samples == 0 {
                break;
            }
            let p = segment(samples, REFERENCE_SEED + chunk, NoiseMode::Plain)?;
            reference_p.resize(p.len(), 0.0);
            for (acc, &v) in reference_p.iter_mut().zip(&p) {
                *acc += f64::from(v) * samples as f64;
            }
            done += samples;
        }
        reference_p.iter_mut().for_each(|p| *p /= args.reference as f64);
        let reference_h: Vec<f64> = reference_p.iter().map(|&p| f64::from(binary_entropy(p as f32))).collect();
        let mean_h = reference_h.iter().sum::<f64>() / reference_h.len() as f64;

        for (ni, &n) in args.samples.iter().enumerate() {
            for (mi, &mode) in modes.iter().enumerate() {
                for seed in 1..=args.seeds {
                    let e = errors(&segment(n, seed, mode)?, &reference_p, &reference_h);
                    let slot = &mut table[ni][mi][seed as usize - 1];
                    slot.entropy_mse += e.entropy_mse / args.images as f64;
                    slot.entropy_rmse += e.entropy_rmse / args.images as f64;
                    slot.entropy_mae += e.entropy_mae / args.images as f64;
                    slot.probability_rmse += e.probability_rmse / args.images as f64;
                }
            }
        }
        eprintln!(
            "image {}/{} ({}): reference mean entropy {mean_h:.4} nats, {:.0?} so far",
            i + 1,
            args.images,
            item.name,
            started.elapsed()
        );
    }

    println!(
        "{} images x {} seeds, reference {} plain draws, model {} on {} ({:.0?})",
        args.images,
        args.seeds,
        args.reference,
        args.model.display(),
        segmenter.device().name(),
        started.elapsed()
    );
    println!(
        "mean over seeds ± sd over seeds of the image-averaged error; MSE ratio: mean per-image entropy MSE / plain's"
    );
    println!(
        "| N | noise | entropy RMSE (nats) | entropy MAE (nats) | probability RMSE | entropy MSE (1e-6 nats²) | \
         MSE ratio | ratio, reference floor removed | plain samples for the same error |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let seeds = args.seeds as f64;
    for (ni, &n) in args.samples.iter().enumerate() {
        let plain_mse = table[ni][0].iter().map(|e| e.entropy_mse).sum::<f64>() / seeds;
        let floor = plain_mse / (1.0 / n as f64 + 1.0 / args.reference as f64) / args.reference as f64;
        for (mi, mode) in modes.iter().enumerate() {
            let column = |f: fn(&Errors) -> f64| mean_sd(&table[ni][mi].iter().map(f).collect::<Vec<_>>());
            let (h, h_sd) = column(|e| e.entropy_rmse);
            let (a, a_sd) = column(|e| e.entropy_mae);
            let (p, p_sd) = column(|e| e.probability_rmse);
            let mse = table[ni][mi].iter().map(|e| e.entropy_mse).sum::<f64>() / seeds;
            let corrected = (mse - floor) / (plain_mse - floor);
            println!(
                "| {n} | {mode} | {h:.5} ± {h_sd:.5} | {a:.5} ± {a_sd:.5} | {p:.5} ± {p_sd:.5} | {:.3} | {:.3} | {corrected:.3} | {:.0} |",
                mse * 1e6,
                mse / plain_mse,
                n as f64 / corrected
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
