//! Medical image volumes (docs/volumes.md): NIfTI-1 files (`.nii`, `.nii.gz`, read and written
//! with the `nifti` crate) and DICOM files or series folders (read with the dicom-rs crates), as
//! one [`Volume`] of `f32` voxels with its voxel-to-world affine (RAS+, millimetres) and the NIfTI
//! header that outputs are written with; the mapping of voxel intensities to the 8-bit grey slices
//! the model takes ([`intensity`]); and `mcs-engine convert`, a folder of volumes to the official
//! 2-D layout ([`convert`]).
//!
//! Voxels are held in NIfTI's own order, the first axis fastest: voxel `(i, j, k)` is at
//! `i + nx * (j + ny * k)`. A slice along axis `a` is a picture whose columns run along the lower
//! of the two other axes and whose rows run along the higher one ([`Volume::slice`]), without
//! any flip, so that a map written back slice by slice lands on the voxels it came from.

pub mod convert;
pub mod dicom;
pub mod intensity;
pub mod nifti;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::limits;

pub use intensity::Intensity;

/// The most voxels a volume may hold unless the caller raises the limit (`--max-voxels`): 2^28,
/// e.g. 512 x 512 x 1024, about 7 GB at [`BYTES_PER_VOXEL`].
pub const DEFAULT_MAX_VOXELS: u64 = 1 << 28;

/// Bytes a volume holds per voxel at its peak in `predict`, rounded up: the decoder's buffer (up
/// to 8 for float64 files) and the `f32` voxels (4) while they are converted, a sorted copy for
/// the percentiles (4), the 8-bit slices (1), then the maps (probability 4, uncertainty 4, mask 1)
/// and the writer's copy of one of them.
pub const BYTES_PER_VOXEL: u64 = 26;

/// How large a volume may be, checked from its header(s) before any voxel is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeLimits {
    /// The most pixels one slice (along the axis segmented or converted) may have.
    pub max_slice_pixels: u64,
    /// The most voxels the whole volume may have.
    pub max_voxels: u64,
}

impl Default for VolumeLimits {
    fn default() -> VolumeLimits {
        VolumeLimits { max_slice_pixels: limits::DEFAULT_MAX_PIXELS, max_voxels: DEFAULT_MAX_VOXELS }
    }
}

impl VolumeLimits {
    /// Errors (naming `path`): a volume of `dims` with no voxel, more voxels than
    /// [`VolumeLimits::max_voxels`], or a slice along `axis` of more than
    /// [`VolumeLimits::max_slice_pixels`] pixels.
    pub fn check(&self, path: &Path, dims: [usize; 3], axis: usize) -> Result<()> {
        if dims.contains(&0) {
            return Err(Error::Invalid(format!(
                "{}: the volume is empty ({}): it holds no voxel",
                path.display(),
                dims_text(dims)
            )));
        }
        let voxels = dims.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64));
        if voxels > self.max_voxels {
            return Err(Error::Invalid(format!(
                "{}: the volume has {voxels} voxels ({}), more than the limit of {} (raise it with --max-voxels; \
                 docs/volumes.md)",
                path.display(),
                dims_text(dims),
                self.max_voxels
            )));
        }
        let (u, v) = plane_axes(axis);
        let pixels = dims[u] as u64 * dims[v] as u64;
        if pixels > self.max_slice_pixels {
            return Err(Error::Invalid(format!(
                "{}: a slice along axis {axis} has {}x{} = {pixels} pixels, more than the limit of {} (--max-pixels)",
                path.display(),
                dims[u],
                dims[v],
                self.max_slice_pixels
            )));
        }
        Ok(())
    }
}

/// The most voxels any volume may have on this machine, whatever `--max-voxels` asks for: what
/// [`BYTES_PER_VOXEL`] lets fit in its memory.
pub fn max_voxels_ceiling() -> u64 {
    limits::physical_memory().map_or(u64::MAX, |memory| memory / BYTES_PER_VOXEL)
}

/// A 4x4 voxel-to-world matrix (row-major; world is NIfTI's RAS+ in millimetres): voxel
/// `(i, j, k)` lies at `affine * (i, j, k, 1)`.
pub type Affine = [[f64; 4]; 4];

/// One 3-D volume in memory.
#[derive(Clone, Debug)]
pub struct Volume {
    /// The file or series folder it was read from (named in every message).
    pub source: PathBuf,
    /// Voxels along the three axes.
    pub dims: [usize; 3],
    /// The voxel values (after the file's own scaling: NIfTI's `scl_slope`/`scl_inter`, DICOM's
    /// rescale slope and intercept), first axis fastest.
    pub voxels: Vec<f32>,
    /// Voxel to world (RAS+, mm).
    pub affine: Affine,
    /// The header that outputs on this volume's grid are written with: the input's own for a
    /// NIfTI file, one built from the series geometry for DICOM.
    pub header: ::nifti::NiftiHeader,
    /// The axis slices are taken along unless told otherwise: NIfTI's third voxel axis, the
    /// stacking axis of a DICOM series (also the third).
    pub slice_axis: usize,
}

/// The format of a volume path, from its name (and, for a folder, that it is one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeFormat {
    /// `.nii` or `.nii.gz`.
    Nifti,
    /// One DICOM file (any other file name).
    DicomFile,
    /// A folder holding one DICOM series.
    DicomSeries,
}

impl VolumeFormat {
    /// The format of `path`: a folder is a DICOM series, `.nii`/`.nii.gz` (any case) NIfTI,
    /// any other file a DICOM file.
    pub fn of(path: &Path) -> VolumeFormat {
        if path.is_dir() {
            VolumeFormat::DicomSeries
        } else if is_nifti_name(path) {
            VolumeFormat::Nifti
        } else {
            VolumeFormat::DicomFile
        }
    }
}

/// Whether a file name ends in `.nii` or `.nii.gz` (any case).
pub fn is_nifti_name(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

/// Whether `path` is read as a volume by `predict --image` (rather than as a PNG or JPEG): a
/// folder, a NIfTI name, a `.dcm` name, or a file with DICOM's `DICM` marker (a DICOM file is often
/// named without an extension).
pub fn is_volume_path(path: &Path) -> bool {
    if path.is_dir() || is_nifti_name(path) {
        return true;
    }
    let lower = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    matches!(lower.as_deref(), Some("dcm" | "dicom")) || has_dicom_preamble(path)
}

/// True when the file carries DICOM Part 10's marker, `DICM` after a 128-byte preamble (how a
/// DICOM file without a `.dcm` name is told apart from a picture or any other file, which then
/// gets the image reader's own messages).
fn has_dicom_preamble(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path).and_then(|mut file| file.read_exact(&mut head)).is_ok() && &head[128..] == b"DICM"
}

/// Reads a volume (NIfTI file, DICOM file or DICOM series folder), refusing it by `limits` for
/// slices along `axis` (the file's own slice axis when `None`) before any voxel is decoded.
///
/// Errors name the file: unreadable, not a volume, 4-D, too large, NaN or infinite voxels, and the
/// DICOM refusals of [`dicom::read_dicom`].
pub fn read_volume(path: &Path, limits: &VolumeLimits, axis: Option<usize>) -> Result<Volume> {
    if !path.exists() {
        return Err(Error::Invalid(format!("{}: no such file or folder", path.display())));
    }
    let volume = match VolumeFormat::of(path) {
        VolumeFormat::Nifti => nifti::read_nifti(path, limits, axis)?,
        VolumeFormat::DicomFile | VolumeFormat::DicomSeries => dicom::read_dicom(path, limits, axis)?,
    };
    volume.check_finite()?;
    Ok(volume)
}

/// The two in-plane axes of a slice along `axis`, lower first (the picture's columns, then rows).
pub fn plane_axes(axis: usize) -> (usize, usize) {
    match axis {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    }
}

fn dims_text(dims: [usize; 3]) -> String {
    format!("{}x{}x{}", dims[0], dims[1], dims[2])
}

impl Volume {
    /// Voxels in the volume.
    pub fn len(&self) -> usize {
        self.voxels.len()
    }

    /// Whether the volume holds no voxel.
    pub fn is_empty(&self) -> bool {
        self.voxels.is_empty()
    }

    /// The axis to slice along: `requested`, else [`Volume::slice_axis`]. Error: an axis past 2.
    pub fn axis(&self, requested: Option<usize>) -> Result<usize> {
        match requested.unwrap_or(self.slice_axis) {
            axis @ 0..=2 => Ok(axis),
            other => Err(Error::Invalid(format!("axis {other} does not exist: a volume has axes 0, 1 and 2"))),
        }
    }

    /// Slices along `axis`.
    pub fn slice_count(&self, axis: usize) -> usize {
        self.dims[axis]
    }

    /// (width, height) of a slice along `axis`.
    pub fn slice_size(&self, axis: usize) -> (usize, usize) {
        let (u, v) = plane_axes(axis);
        (self.dims[u], self.dims[v])
    }

    /// The voxel index of pixel `(x, y)` of slice `index` along `axis`.
    fn voxel_index(&self, axis: usize, index: usize, x: usize, y: usize) -> usize {
        let strides = [1, self.dims[0], self.dims[0] * self.dims[1]];
        let (u, v) = plane_axes(axis);
        x * strides[u] + y * strides[v] + index * strides[axis]
    }

    /// The voxel indices of slice `index` along `axis`, row by row (row-major picture order).
    pub fn slice_indices(&self, axis: usize, index: usize) -> Vec<usize> {
        let (w, h) = self.slice_size(axis);
        (0..h).flat_map(|y| (0..w).map(move |x| (x, y))).map(|(x, y)| self.voxel_index(axis, index, x, y)).collect()
    }

    /// Slice `index` along `axis` as a row-major picture of `width * height` values.
    pub fn slice(&self, axis: usize, index: usize) -> Vec<f32> {
        self.slice_indices(axis, index).into_iter().map(|i| self.voxels[i]).collect()
    }

    /// Errors: a NaN or infinite voxel (how many, and the first one's voxel coordinates).
    pub fn check_finite(&self) -> Result<()> {
        let bad = self.voxels.iter().filter(|v| !v.is_finite()).count();
        let Some(first) = self.voxels.iter().position(|v| !v.is_finite()) else { return Ok(()) };
        let (nx, ny) = (self.dims[0], self.dims[1]);
        let (i, j, k) = (first % nx, (first / nx) % ny, first / (nx * ny));
        Err(Error::Invalid(format!(
            "{}: {bad} voxel(s) are NaN or infinite (the first at voxel ({i}, {j}, {k}), value {}); fix or mask \
             them before segmenting",
            self.source.display(),
            self.voxels[first]
        )))
    }

    /// The world direction (0 = x, R; 1 = y, A; 2 = z, S) that voxel axis `axis` runs closest
    /// to, and whether it runs towards the positive end (R, A, S).
    pub fn world_direction(&self, axis: usize) -> (usize, bool) {
        let column = [self.affine[0][axis], self.affine[1][axis], self.affine[2][axis]];
        let dominant = (0..3).max_by(|&a, &b| column[a].abs().total_cmp(&column[b].abs())).unwrap_or(axis);
        (dominant, column[dominant] >= 0.0)
    }

    /// The voxel axes that are oblique: more than [`OBLIQUE_DEGREES`] away from every world
    /// axis. Slices are still taken along the voxel axes (docs/volumes.md).
    pub fn oblique_axes(&self) -> Vec<usize> {
        (0..3)
            .filter(|&axis| {
                let column = [self.affine[0][axis], self.affine[1][axis], self.affine[2][axis]];
                let norm = column.iter().map(|c| c * c).sum::<f64>().sqrt();
                let largest = column.iter().fold(0.0f64, |m, c| m.max(c.abs()));
                norm > 0.0 && largest / norm < OBLIQUE_DEGREES.to_radians().cos()
            })
            .collect()
    }

    /// A warning to print when the volume is oblique, `None` when it is not.
    pub fn oblique_warning(&self) -> Option<String> {
        let oblique = self.oblique_axes();
        if oblique.is_empty() {
            return None;
        }
        Some(format!(
            "warning: {}: the voxel axes {:?} are oblique (more than {OBLIQUE_DEGREES} degree off the scanner's \
             axes): slices are taken along the voxel axes, so they are not exact axial, coronal or sagittal \
             planes; the outputs keep the input's affine exactly",
            self.source.display(),
            oblique
        ))
    }
}

/// How far (degrees) a voxel axis may lean from the nearest world axis before the volume counts
/// as oblique.
pub const OBLIQUE_DEGREES: f64 = 1.0;

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(dims: [usize; 3]) -> Volume {
        let n = dims.iter().product();
        Volume {
            source: PathBuf::from("v.nii"),
            dims,
            voxels: (0..n).map(|v| v as f32).collect(),
            affine: [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
            header: ::nifti::NiftiHeader::default(),
            slice_axis: 2,
        }
    }

    #[test]
    fn slices_run_along_the_lower_in_plane_axis_first() {
        let v = volume([2, 3, 4]);
        // Axis 2, slice 1: x along i (2), y along j (3); voxel (i, j, 1) = i + 2j + 6.
        assert_eq!(v.slice_size(2), (2, 3));
        assert_eq!(v.slice(2, 1), vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        // Axis 0, slice 1: x along j (3), y along k (4); voxel (1, j, k) = 1 + 2j + 6k.
        assert_eq!(v.slice_size(0), (3, 4));
        assert_eq!(&v.slice(0, 1)[..4], &[1.0, 3.0, 5.0, 7.0]);
        // Axis 1, slice 2: x along i, y along k; voxel (i, 2, k) = i + 4 + 6k.
        assert_eq!(v.slice(1, 2), vec![4.0, 5.0, 10.0, 11.0, 16.0, 17.0, 22.0, 23.0]);
    }

    #[test]
    fn oblique_axes_are_found_past_one_degree() {
        let mut v = volume([2, 2, 2]);
        assert!(v.oblique_axes().is_empty());
        let angle = 5f64.to_radians();
        v.affine[0][0] = angle.cos();
        v.affine[1][0] = angle.sin();
        assert_eq!(v.oblique_axes(), vec![0]);
        assert!(v.oblique_warning().unwrap().contains("not exact axial"));
    }

    #[test]
    fn nan_voxels_are_refused_with_their_place() {
        let mut v = volume([2, 2, 2]);
        v.voxels[5] = f32::NAN;
        let message = v.check_finite().unwrap_err().to_string();
        assert!(message.contains("1 voxel(s) are NaN") && message.contains("(1, 0, 1)"), "{message}");
    }

    #[test]
    fn limits_refuse_empty_large_and_wide_volumes() {
        let limits = VolumeLimits { max_slice_pixels: 100, max_voxels: 1000 };
        let path = Path::new("x.nii");
        assert!(limits.check(path, [10, 10, 10], 2).is_ok());
        assert!(limits.check(path, [10, 0, 10], 2).unwrap_err().to_string().contains("empty"));
        assert!(limits.check(path, [10, 10, 11], 2).unwrap_err().to_string().contains("--max-voxels"));
        assert!(limits.check(path, [30, 4, 3], 2).unwrap_err().to_string().contains("--max-pixels"));
        // The same volume sliced along another axis fits (30 x 3 pixels).
        assert!(limits.check(path, [30, 4, 3], 1).is_ok());
    }
}
