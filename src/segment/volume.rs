//! A whole volume segmented slice by slice (docs/volumes.md §4): each slice along the chosen
//! axis is mapped to 8-bit grey with one intensity mapping for the whole volume, given to the
//! model as a grey image (replicated to three channels as for any grey picture), and the slices
//! go through [`Segmenter::segment_batch`] a few at a time. The maps are put back on the
//! volume's grid and written as NIfTI volumes with the input's header, plus an overlay of the
//! slice with the largest mask.

use std::path::{Path, PathBuf};

use super::{output, Options, Segmentation, Segmenter};
use crate::data::Image8;
use crate::error::{Error, Result};
use crate::volume::intensity::to_grey;
use crate::volume::nifti::write_nifti;
use crate::volume::{Intensity, Volume};

/// The most slices one pass stacks when the caller does not say: enough to keep a GPU busy on
/// the small configs, few enough that a pass's memory stays near one image's times the samples.
pub const DEFAULT_SLICES_PER_PASS: usize = 8;

/// The maps of a volume, on its grid (first axis fastest, as [`Volume::voxels`]).
#[derive(Clone, Debug)]
pub struct VolumeSegmentation {
    /// The volume's dims.
    pub dims: [usize; 3],
    /// The axis the slices were taken along.
    pub axis: usize,
    /// 1 in the mask, 0 outside.
    pub mask: Vec<u8>,
    /// Mean foreground probability.
    pub probability: Vec<f32>,
    /// Binary entropy of the mean (nats).
    pub uncertainty: Vec<f32>,
    /// The slice (along `axis`) with the most mask pixels (the first of them; slice 0 when the
    /// mask is empty).
    pub largest_slice: usize,
    /// That slice's grey picture and segmentation (for the overlay).
    pub largest: (Image8, Segmentation),
}

impl VolumeSegmentation {
    /// Share of the voxels in the mask.
    pub fn foreground_fraction(&self) -> f64 {
        self.mask.iter().filter(|&&m| m != 0).count() as f64 / self.mask.len().max(1) as f64
    }
}

/// How many slices one pass stacks: `requested` when the memory check
/// ([`Segmenter::check_options`]) allows it, else its error; without a request the most up to
/// [`DEFAULT_SLICES_PER_PASS`] that the check allows (at least 1, else the check's error).
pub fn slices_per_pass(segmenter: &Segmenter, options: &Options, requested: Option<usize>) -> Result<usize> {
    if let Some(n) = requested {
        segmenter.check_options(options, n.max(1))?;
        return Ok(n.max(1));
    }
    segmenter.check_options(options, 1)?;
    Ok((1..=DEFAULT_SLICES_PER_PASS).rev().find(|&n| segmenter.check_options(options, n).is_ok()).unwrap_or(1))
}

/// The grey picture of every slice along `axis` shares one mapping: the black and white values
/// of `intensity` over the whole volume.
pub fn grey_slice(volume: &Volume, axis: usize, index: usize, range: (f64, f64)) -> Result<Image8> {
    let (w, h) = volume.slice_size(axis);
    Image8::from_raw(w, h, 1, to_grey(&volume.slice(axis, index), range))
}

/// How a volume is cut and fed to the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlicePlan<'a> {
    /// The axis slices are taken along (0, 1 or 2).
    pub axis: usize,
    /// The prompt every slice is segmented with.
    pub prompt: &'a str,
    /// The mapping of voxel values to grey.
    pub intensity: Intensity,
    /// Slices per [`Segmenter::segment_batch`] call ([`slices_per_pass`]).
    pub per_pass: usize,
}

/// Segments every slice of `volume` as `plan` says, calling `progress` with the number of slices
/// done after each pass. Errors: as `segment_batch`, naming the volume and the slices.
pub fn segment_volume(
    segmenter: &Segmenter,
    volume: &Volume,
    plan: &SlicePlan,
    options: &Options,
    mut progress: impl FnMut(usize),
) -> Result<VolumeSegmentation> {
    let SlicePlan { axis, prompt, intensity, per_pass } = *plan;
    let count = volume.slice_count(axis);
    let range = intensity.range(&volume.voxels)?;
    let n = volume.len();
    let (mut mask, mut probability, mut uncertainty) = (vec![0u8; n], vec![0f32; n], vec![0f32; n]);
    let mut largest: Option<(usize, usize, Image8, Segmentation)> = None;
    for first in (0..count).step_by(per_pass.max(1)) {
        let indices: Vec<usize> = (first..count.min(first + per_pass.max(1))).collect();
        let images = indices.iter().map(|&s| grey_slice(volume, axis, s, range)).collect::<Result<Vec<_>>>()?;
        let items: Vec<(&Image8, &str)> = images.iter().map(|image| (image, prompt)).collect();
        let results = segmenter.segment_batch(&items, options).map_err(|e| {
            Error::Invalid(format!(
                "{}: slices {first}..{} along axis {axis}: {e}",
                volume.source.display(),
                first + indices.len()
            ))
        })?;
        for ((&s, image), result) in indices.iter().zip(images).zip(results) {
            for (pixel, voxel) in volume.slice_indices(axis, s).into_iter().enumerate() {
                mask[voxel] = u8::from(result.mask[pixel]);
                probability[voxel] = result.probability[pixel];
                uncertainty[voxel] = result.uncertainty[pixel];
            }
            let area = result.mask.iter().filter(|&&m| m).count();
            if largest.as_ref().is_none_or(|(best, ..)| area > *best) {
                largest = Some((area, s, image, result));
            }
        }
        progress(first + indices.len());
    }
    let (_, largest_slice, image, result) =
        largest.ok_or_else(|| Error::Invalid(format!("{}: no slice along axis {axis}", volume.source.display())))?;
    Ok(VolumeSegmentation {
        dims: volume.dims,
        axis,
        mask,
        probability,
        uncertainty,
        largest_slice,
        largest: (image, result),
    })
}

/// The files [`write_volume_outputs`] writes into a folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeOutputFiles {
    /// `mask.nii.gz` (uint8, 0/1).
    pub mask: PathBuf,
    /// `probability.nii.gz` (float32).
    pub probability: PathBuf,
    /// `uncertainty.nii.gz` (float32, nats).
    pub uncertainty: PathBuf,
    /// `overlay.png`: the slice with the largest mask.
    pub overlay: PathBuf,
}

impl VolumeOutputFiles {
    /// The file names inside `dir`.
    pub fn in_folder(dir: &Path) -> VolumeOutputFiles {
        VolumeOutputFiles {
            mask: dir.join("mask.nii.gz"),
            probability: dir.join("probability.nii.gz"),
            uncertainty: dir.join("uncertainty.nii.gz"),
            overlay: dir.join("overlay.png"),
        }
    }
}

/// Writes the maps as NIfTI volumes with `volume`'s header (so its affine, voxel sizes and
/// orientation codes) and the overlay PNG, each file through a temporary name and a rename.
pub fn write_volume_outputs(dir: &Path, volume: &Volume, maps: &VolumeSegmentation) -> Result<VolumeOutputFiles> {
    if maps.dims != volume.dims {
        return Err(Error::Invalid(format!(
            "{}: maps of {:?} voxels for a volume of {:?}",
            dir.display(),
            maps.dims,
            volume.dims
        )));
    }
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let files = VolumeOutputFiles::in_folder(dir);
    write_nifti(&files.mask, &volume.header, volume.dims, &maps.mask)?;
    write_nifti(&files.probability, &volume.header, volume.dims, &maps.probability)?;
    write_nifti(&files.uncertainty, &volume.header, volume.dims, &maps.uncertainty)?;
    let (image, segmentation) = &maps.largest;
    output::write_overlay(&files.overlay, image, segmentation)?;
    Ok(files)
}
