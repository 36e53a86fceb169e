//! `mcs-engine predict --image VOLUME`: a NIfTI file, a DICOM file or a DICOM series folder,
//! segmented slice by slice ([`mcs_engine::segment::volume`], docs/volumes.md §4); writes
//! `mask.nii.gz`, `probability.nii.gz`, `uncertainty.nii.gz` and `overlay.png` into --out.

use std::path::Path;
use std::time::Instant;

use mcs_engine::segment::volume::{segment_volume, slices_per_pass, write_volume_outputs, SlicePlan};
use mcs_engine::segment::{Options, Segmenter};
use mcs_engine::volume::{self, read_volume, Intensity, VolumeLimits, DEFAULT_MAX_VOXELS};
use mcs_engine::{Error, Result};

/// The flags that only volumes use (flattened into `predict`'s own and `convert`'s).
#[derive(clap::Args, Clone)]
pub struct VolumeArgs {
    /// Volumes only: the voxel axis to take slices along (0, 1 or 2). Default: the file's slice
    /// axis, the third voxel axis of a NIfTI file, the stacking axis of a DICOM series.
    #[arg(long, value_parser = super::whole(0, 2))]
    pub axis: Option<usize>,
    /// Volumes only: map intensities to grey with a window CENTER,WIDTH (e.g. CT soft tissue
    /// 40,400, lung -600,1500, bone 400,1800: values in Hounsfield units for CT). Default: the
    /// volume's own 0.5th and 99.5th percentiles to black and white (see --percentiles).
    #[arg(long, value_parser = Intensity::parse_window, allow_hyphen_values = true, conflicts_with = "percentiles")]
    pub window: Option<Intensity>,
    /// Volumes only: map the LOW-th and HIGH-th percentiles of the volume's voxels to black and
    /// white, clipping the rest (default 0.5,99.5: each slice of a volume gets the same mapping).
    #[arg(long, value_parser = Intensity::parse_percentiles)]
    pub percentiles: Option<Intensity>,
    /// Volumes only: the most voxels a volume may have, checked from its header(s) before any
    /// voxel is decoded (default 2^28 = 268435456, e.g. 512x512x1024; a volume holds up to about
    /// 26 bytes per voxel). --max-pixels bounds each slice.
    #[arg(long, default_value_t = DEFAULT_MAX_VOXELS, value_parser = max_voxels)]
    pub max_voxels: u64,
    /// Volumes only (predict): slices stacked in one batched pass (default: up to 8, as many as
    /// this machine's memory holds for --samples; a number that does not fit is refused).
    #[arg(long, value_parser = super::count())]
    pub slices_per_pass: Option<usize>,
}

impl VolumeArgs {
    /// The intensity mapping chosen (the default percentiles when neither flag is given).
    pub fn intensity(&self) -> Intensity {
        self.window.or(self.percentiles).unwrap_or_default()
    }

    /// The size limits, with `max_pixels` per slice.
    pub fn limits(&self, max_pixels: u64) -> VolumeLimits {
        VolumeLimits { max_slice_pixels: max_pixels, max_voxels: self.max_voxels }
    }
}

/// clap parser of `--max-voxels`: at least 1, at most what this machine's memory holds.
fn max_voxels(text: &str) -> std::result::Result<u64, String> {
    let value: u64 = text.parse().map_err(|_| format!("`{text}` is not a whole number of voxels"))?;
    let ceiling = volume::max_voxels_ceiling();
    match value {
        0 => Err("the limit must be at least 1 voxel".into()),
        v if v > ceiling => Err(format!(
            "{v} voxels at {} bytes each do not fit in this machine's memory; at most {ceiling}",
            volume::BYTES_PER_VOXEL
        )),
        v => Ok(v),
    }
}

/// Predicts one volume. The volume is read (and refused) before the model loads.
pub fn run(
    path: &Path,
    prompt: Option<&str>,
    out: &Path,
    options: &Options,
    args: &VolumeArgs,
    load: impl FnOnce() -> Result<Segmenter>,
) -> Result<()> {
    let prompt = prompt.ok_or_else(|| {
        Error::Invalid(format!(
            "{}: say what to segment with --prompt, e.g. --prompt \"a small lesion in the left kidney\"",
            path.display()
        ))
    })?;
    let started = Instant::now();
    let volume = read_volume(path, &args.limits(options.max_pixels), args.axis)?;
    let axis = volume.axis(args.axis)?;
    if let Some(warning) = volume.oblique_warning() {
        eprintln!("{warning}");
    }
    let segmenter = load()?;
    let per_pass = slices_per_pass(&segmenter, options, args.slices_per_pass)?;
    let slices = volume.slice_count(axis);
    let bar = indicatif::ProgressBar::new(slices as u64);
    let template = "predict {bar:30} {pos}/{len} slices [{elapsed_precise} < {eta_precise}]";
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("the progress template is valid"));
    let plan = SlicePlan { axis, prompt, intensity: args.intensity(), per_pass };
    let maps = segment_volume(&segmenter, &volume, &plan, options, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let files = write_volume_outputs(out, &volume, &maps)?;
    let [nx, ny, nz] = volume.dims;
    println!(
        "{}: {nx}x{ny}x{nz} voxels, {slices} slices along axis {axis} ({per_pass} per pass, {} samples on {}) in \
         {:.2?}; foreground {:.2}%, largest mask on slice {} ({})",
        out.display(),
        options.samples,
        segmenter.device().name(),
        started.elapsed(),
        maps.foreground_fraction() * 100.0,
        maps.largest_slice,
        files.overlay.display()
    );
    Ok(())
}
