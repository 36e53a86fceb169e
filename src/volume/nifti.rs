//! NIfTI-1 volumes in and out through the `nifti` crate (docs/volumes.md §1-§2): the header is
//! read first and the volume refused from it (4-D, empty, too large, an affine the header cannot
//! give) before any voxel is decoded; outputs are written with a reference header (the input's,
//! or one built from a DICOM series' geometry), so they lie on the input's grid.

use std::path::{Path, PathBuf};

use ::nifti::writer::WriterOptions;
use ::nifti::{DataElement, IntoNdArray, NiftiHeader, NiftiObject, ReaderOptions, XForm};

use super::{Affine, Volume, VolumeLimits};
use crate::error::{Error, Result};

fn invalid(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {why}", path.display()))
}

/// Reads a `.nii` or `.nii.gz` file. Errors (naming the file): not a NIfTI-1 file, a 4-D (or
/// higher) volume with more than one volume in it, an empty volume, one past `limits` for slices
/// along `axis` (default the third axis), an unreadable qform, voxels that do not decode.
pub fn read_nifti(path: &Path, limits: &VolumeLimits, axis: Option<usize>) -> Result<Volume> {
    let header =
        NiftiHeader::from_file(path).map_err(|e| invalid(path, format!("not a readable NIfTI-1 file ({e})")))?;
    let dims = spatial_dims(path, &header)?;
    let axis = axis.unwrap_or(2);
    limits.check(path, dims, axis.min(2))?;
    let affine = header_affine(path, &header)?;
    let object =
        ReaderOptions::new().read_file(path).map_err(|e| invalid(path, format!("cannot read the voxels ({e})")))?;
    let array = object
        .into_volume()
        .into_ndarray::<f32>()
        .map_err(|e| invalid(path, format!("cannot convert the voxels to numbers ({e})")))?;
    // The array's logical order is (i, j, k[, 1...]); reversed, row-major iteration runs i fastest.
    let voxels: Vec<f32> = array.t().iter().copied().collect();
    if voxels.len() != dims.iter().product::<usize>() {
        return Err(invalid(path, format!("{} voxels decoded for dims {dims:?}", voxels.len())));
    }
    Ok(Volume { source: path.to_path_buf(), dims, voxels, affine, header, slice_axis: 2 })
}

/// The three spatial sizes of a header's `dim` (a 1-D or 2-D image is a volume of one slice).
/// Errors: a `dim[0]` outside 1..=7, more than one volume along the 4th to 7th axes.
fn spatial_dims(path: &Path, header: &NiftiHeader) -> Result<[usize; 3]> {
    let rank = usize::from(header.dim[0]);
    if !(1..=7).contains(&rank) {
        return Err(invalid(path, format!("dim[0] = {rank} is not a number of dimensions from 1 to 7")));
    }
    let sizes = &header.dim[1..=rank];
    if rank > 3 && sizes[3..].iter().any(|&d| d > 1) {
        return Err(invalid(
            path,
            format!(
                "a {rank}-D volume (dims {:?}): predict and convert take one 3-D volume; split it into 3-D volumes \
                 first (e.g. fslsplit, or nibabel's slicer)",
                sizes
            ),
        ));
    }
    let size = |axis: usize| sizes.get(axis).map_or(1, |&d| usize::from(d));
    Ok([size(0), size(1), size(2)])
}

/// The header's voxel-to-world affine, as NIfTI readers choose it: the sform when its code is
/// set, else the qform when its code is set, else the base affine of the voxel sizes (centred,
/// x flipped, as the `nifti` crate and nibabel give it). Errors: a qform the standard does not
/// allow (negative voxel sizes, a quaternion longer than 1), which the crate would panic on.
pub fn header_affine(path: &Path, header: &NiftiHeader) -> Result<Affine> {
    let mut header = header.clone();
    if header.sform_code == 0 && header.qform_code != 0 {
        if header.pixdim[1..4].iter().any(|&p| p < 0.0) {
            return Err(invalid(path, format!("the qform's voxel sizes {:?} are negative", &header.pixdim[1..4])));
        }
        let (b, c, d) = (f64::from(header.quatern_b), f64::from(header.quatern_c), f64::from(header.quatern_d));
        if b * b + c * c + d * d > 1.0 + 1e-6 {
            return Err(invalid(path, format!("the qform quaternion ({b}, {c}, {d}) is longer than 1")));
        }
        // The standard reads a qfac (pixdim[0]) other than -1 as 1.
        header.fix();
    }
    if header.sform_code == 0 && header.qform_code == 0 {
        // The base affine needs three sizes: a 1-D or 2-D image has one slice along the rest.
        for axis in usize::from(header.dim[0]) + 1..=3 {
            header.dim[axis] = 1;
        }
        header.dim[0] = header.dim[0].max(3);
    }
    let m = header.affine::<f64>();
    Ok(std::array::from_fn(|r| std::array::from_fn(|c| m[(r, c)])))
}

/// A header for outputs on a grid that has no NIfTI header of its own (a DICOM series): voxel
/// sizes from the affine's column lengths, millimetres, and the affine in both the sform and the
/// qform (code 1, scanner anatomical), so that every NIfTI reader finds it.
pub fn header_for_affine(affine: &Affine) -> NiftiHeader {
    let m = nalgebra::Matrix4::from_fn(|r, c| affine[r][c]);
    let mut header = NiftiHeader::default();
    for (axis, size) in header.pixdim[1..4].iter_mut().enumerate() {
        *size = affine[..3].iter().map(|row| row[axis] * row[axis]).sum::<f64>().sqrt() as f32;
    }
    // NIFTI_UNITS_MM for space; no time unit.
    header.xyzt_units = 2;
    header.set_sform(&m, XForm::ScannerAnat);
    header.set_qform(&m, XForm::ScannerAnat);
    header
}

/// Writes `values` (first axis fastest, `dims` voxels) as a NIfTI volume of `T` (`u8` for
/// masks, `f32` for maps) with `reference`'s header fields (affine, voxel sizes, units,
/// orientation codes; the data type, dims and scaling are the data's own). `.nii.gz` names are
/// compressed. The file goes through a temporary name and a rename, so a crash never leaves a
/// torn file in place of an older result.
pub fn write_nifti<T>(path: &Path, reference: &NiftiHeader, dims: [usize; 3], values: &[T]) -> Result<()>
where
    T: DataElement + bytemuck::Pod,
{
    if values.len() != dims.iter().product::<usize>() {
        return Err(invalid(path, format!("{} values do not fill a {dims:?} volume", values.len())));
    }
    let array = ndarray::ArrayView3::from_shape(ndarray::ShapeBuilder::f(dims), values)
        .map_err(|e| invalid(path, format!("cannot shape the values as {dims:?} ({e})")))?;
    let mut header = reference.clone();
    // The input's display range means nothing for a mask or a probability.
    header.cal_min = 0.0;
    header.cal_max = 0.0;
    let temp = temporary_name(path)?;
    let written = WriterOptions::new(&temp).reference_header(&header).write_nifti(&array);
    let renamed = written
        .map_err(|e| invalid(path, format!("cannot write NIfTI ({e})")))
        .and_then(|()| std::fs::rename(&temp, path).map_err(Error::io(path)));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    renamed
}

/// A hidden sibling of `path` with the same `.nii`/`.nii.gz` ending (the writer picks the
/// compression from it).
fn temporary_name(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| invalid(path, "not a file path"))?.to_string_lossy();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    Ok(dir.join(format!(".partial-{}-{name}", std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mcs-nifti-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_volume_round_trips_with_its_affine() {
        let dir = scratch("round");
        let affine = [[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.0], [0.0, 0.0, 0.0, 1.0]];
        let header = header_for_affine(&affine);
        let values: Vec<f32> = (0..24).map(|v| v as f32 * 0.5).collect();
        for name in ["v.nii", "v.nii.gz"] {
            let path = dir.join(name);
            write_nifti(&path, &header, [2, 3, 4], &values).unwrap();
            let volume = read_nifti(&path, &VolumeLimits::default(), None).unwrap();
            assert_eq!(volume.dims, [2, 3, 4]);
            assert_eq!(volume.voxels, values);
            for (row, expected) in volume.affine.iter().zip(&affine) {
                for (a, b) in row.iter().zip(expected) {
                    // The sform is stored as f32: these values are exact in f32.
                    assert_eq!(a, b, "{name}: {:?}", volume.affine);
                }
            }
        }
        assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("partial")));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
