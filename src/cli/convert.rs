//! `mcs-engine convert`: image and label volumes to the official 2-D layout
//! ([`mcs_engine::volume::convert`], docs/volumes.md §5-§7).

use std::path::PathBuf;
use std::time::Instant;

use mcs_engine::segment::DEFAULT_MAX_PIXELS;
use mcs_engine::volume::convert::{convert, ConvertOptions, DEFAULT_EMPTY_PROMPT, DEFAULT_TEMPLATE};
use mcs_engine::Result;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Folder of image volumes: NIfTI files (.nii, .nii.gz), DICOM files (.dcm) or DICOM series
    /// folders, one per patient.
    #[arg(long)]
    images: PathBuf,
    /// Folder of label volumes on the same grids. A label `<id>.nii.gz` (or `<id>.nii`,
    /// `<id>.dcm`, a series folder `<id>/`) pairs with the image volume `<id>` or `<id>_0000`
    /// (nnU-Net's imagesTr/labelsTr naming) of any of those kinds.
    #[arg(long)]
    labels: PathBuf,
    /// Folder to write {Train,Val,Test}_Folder/{img,label} PNGs and Prompts_Folder/*_text.xlsx
    /// into. Refused when it already holds any of them (never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Shares of the patients (volumes) for Train, Val and Test, normalised (70,15,15 or
    /// 0.7,0.15,0.15). Splits are by patient, never by slice; each split with a share above 0
    /// gets at least one patient.
    #[arg(long, default_value = "70,15,15", value_parser = split_shares)]
    split: SplitShares,
    /// Seed of the patient shuffle and of the choice of empty slices.
    #[arg(long, default_value_t = 666)]
    seed: u64,
    /// Share of each patient's written slices that hold no foreground (0 to below 1): empty
    /// slices picked at random so that the model also learns to mark nothing. 0 writes only
    /// slices with foreground.
    #[arg(long, default_value_t = 0.1, value_parser = empty_fraction)]
    empty_fraction: f64,
    /// Foreground is the label value N (e.g. 2 for the tumour of a kidney/tumour label map);
    /// default: every label above 0.
    #[arg(long, allow_negative_numbers = true)]
    label_value: Option<i64>,
    /// The prompt of a slice with foreground: {size} becomes small, medium or large (under 1 %,
    /// under 5 %, else of the slice's pixels), {side} where the foreground's centre lies in the
    /// patient's terms (e.g. "left anterior", or "central"; docs/volumes.md §6).
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    template: String,
    /// The prompt of an empty slice.
    #[arg(long, default_value = DEFAULT_EMPTY_PROMPT)]
    empty_prompt: String,
    /// The most pixels a slice may have.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_parser = super::max_pixels)]
    max_pixels: u64,
    #[command(flatten)]
    volume: super::predict_volume::VolumeArgs,
}

/// Train, Val and Test shares as given.
#[derive(Clone, Copy, Debug)]
pub struct SplitShares([f64; 3]);

fn split_shares(text: &str) -> std::result::Result<SplitShares, String> {
    let values: Vec<f64> = text.split(',').filter_map(|v| v.trim().parse().ok()).collect();
    match values[..] {
        [a, b, c] if values.iter().all(|v| v.is_finite() && *v >= 0.0) && a + b + c > 0.0 => Ok(SplitShares([a, b, c])),
        _ => {
            Err(format!("`{text}` is not three non-negative shares TRAIN,VAL,TEST with a positive sum, e.g. 70,15,15"))
        }
    }
}

fn empty_fraction(text: &str) -> std::result::Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    if !(0.0..1.0).contains(&value) {
        return Err(format!("{text} is not a fraction from 0 to below 1"));
    }
    Ok(value)
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let options = ConvertOptions {
        split: args.split.0,
        seed: args.seed,
        empty_fraction: args.empty_fraction,
        label_value: args.label_value,
        axis: args.volume.axis,
        intensity: args.volume.intensity(),
        template: args.template.clone(),
        empty_prompt: args.empty_prompt.clone(),
        limits: args.volume.limits(args.max_pixels),
    };
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    let template = "convert {bar:30} {pos}/{len} patients [{elapsed_precise} < {eta_precise}] {msg}";
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("the progress template is valid"));
    let summary = convert(&args.images, &args.labels, &args.out, &options, |done, case, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(case.id.clone());
    });
    bar.finish_and_clear();
    let summary = summary?;
    for note in &summary.notes {
        eprintln!("{note}");
    }
    if summary.unlabelled_images > 0 {
        eprintln!("note: {} image volume(s) have no label and were not converted", summary.unlabelled_images);
    }
    println!("{}: written in {:.1?}", args.out.display(), started.elapsed());
    for (i, name) in ["Train", "Val", "Test"].iter().enumerate() {
        println!(
            "  {name:<5} {:>4} patients, {:>6} slices with foreground, {:>6} empty",
            summary.cases[i], summary.foreground_slices[i], summary.empty_slices[i]
        );
    }
    Ok(())
}
