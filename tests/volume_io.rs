//! Volumes in and out through the library (docs/volumes.md): NIfTI and DICOM series read with
//! their affines, and every refusal of bad input naming the file at fault.

#[path = "common/volumes.rs"]
mod volumes;

use std::path::Path;

use mcs_engine::volume::convert::side_words;
use mcs_engine::volume::{read_volume, Volume, VolumeLimits};
use volumes::*;

fn read(path: &Path) -> mcs_engine::Result<Volume> {
    read_volume(path, &VolumeLimits::default(), None)
}

fn refusal(path: &Path, limits: &VolumeLimits) -> String {
    let message = read_volume(path, limits, None).unwrap_err().to_string();
    assert!(message.contains(&path.display().to_string()), "the message names the file: {message}");
    message
}

#[test]
fn a_dicom_series_reads_in_position_order_with_the_affine_of_its_geometry() {
    let dir = scratch("volume-io", "series");
    let dims = [6, 5, 4];
    let values: Vec<f32> = (0..120).map(|v| v as f32 * 3.0 - 200.0).collect();
    let geometry = SeriesGeometry::axial();
    write_dicom_series(&dir.join("ct"), dims, &values, &geometry);
    let volume = read(&dir.join("ct")).unwrap();
    assert_eq!(volume.dims, dims);
    // Files are named in reverse: equal values prove the position sort and the rescale.
    assert_eq!(volume.voxels, values);
    assert_eq!(volume.affine, geometry.ras_affine(), "{:?}", volume.affine);
    assert_eq!(volume.slice_axis, 2);
    assert!(volume.oblique_warning().is_none());
    // An oblique series (rows tilted 30 degrees in the axial plane) keeps its exact affine and
    // is reported.
    let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
    let oblique = SeriesGeometry { orientation: [c, s, 0.0, -s, c, 0.0], ..geometry };
    write_dicom_series(&dir.join("oblique"), dims, &values, &oblique);
    let volume = read(&dir.join("oblique")).unwrap();
    let want = oblique.ras_affine();
    for (got, want) in volume.affine.iter().flatten().zip(want.iter().flatten()) {
        // DS strings hold the cosines to about 16 digits.
        assert!((got - want).abs() < 1e-9, "{:?} vs {want:?}", volume.affine);
    }
    assert_eq!(volume.oblique_axes(), vec![0, 1]);
}

#[test]
fn a_qform_only_nifti_and_a_4d_file_with_one_volume_are_read() {
    let dir = scratch("volume-io", "qform");
    let path = dir.join("q.nii");
    let affine = typical_affine();
    let mut header = mcs_engine::volume::nifti::header_for_affine(&affine);
    header.sform_code = 0;
    mcs_engine::volume::nifti::write_nifti(&path, &header, [3, 2, 2], &[0.5f32; 12]).unwrap();
    let volume = read(&path).unwrap();
    for (got, want) in volume.affine.iter().flatten().zip(affine.iter().flatten()) {
        // The qform goes through a quaternion in f32: a few ulps of the largest entry.
        assert!((got - want).abs() < 1e-4, "{:?}", volume.affine);
    }
}

#[test]
fn bad_volumes_are_refused_naming_the_file() {
    let dir = scratch("volume-io", "refusals");
    let affine = typical_affine();
    let limits = VolumeLimits::default();

    // 4-D: two volumes along the fourth axis.
    let four = dir.join("four_d.nii");
    let header = mcs_engine::volume::nifti::header_for_affine(&affine);
    let array = ndarray::Array4::<f32>::zeros((3, 3, 2, 2));
    nifti::writer::WriterOptions::new(&four).reference_header(&header).write_nifti(&array).unwrap();
    assert!(refusal(&four, &limits).contains("4-D volume"));

    // Empty: a zero size in the header (patched into a valid file: dim[3] at byte 46).
    let empty = dir.join("empty.nii");
    write_nifti_volume(&empty, [2, 2, 2], &[1.0; 8], &affine);
    let mut bytes = std::fs::read(&empty).unwrap();
    bytes[46..48].copy_from_slice(&0i16.to_le_bytes());
    std::fs::write(&empty, bytes).unwrap();
    assert!(refusal(&empty, &limits).contains("empty"));

    // NaN voxels.
    let nan = dir.join("nan.nii.gz");
    let mut values = vec![1.0f32; 27];
    values[13] = f32::NAN;
    write_nifti_volume(&nan, [3, 3, 3], &values, &affine);
    assert!(refusal(&nan, &limits).contains("NaN or infinite (the first at voxel (1, 1, 1)"));

    // Too many voxels, or too many pixels per slice, from the header alone.
    let big = dir.join("big.nii");
    write_nifti_volume(&big, [4, 4, 4], &[0.0; 64], &affine);
    let few_voxels = VolumeLimits { max_voxels: 63, ..limits };
    assert!(refusal(&big, &few_voxels).contains("--max-voxels"));
    let few_pixels = VolumeLimits { max_slice_pixels: 15, ..limits };
    assert!(refusal(&big, &few_pixels).contains("--max-pixels"));

    // Not a volume at all.
    let junk = dir.join("junk.nii");
    std::fs::write(&junk, b"not a nifti file").unwrap();
    assert!(refusal(&junk, &limits).contains("not a readable NIfTI-1 file"));
}

#[test]
fn bad_dicom_is_refused_naming_the_file() {
    let dir = scratch("volume-io", "dicom-refusals");
    let geometry = SeriesGeometry::axial();
    let limits = VolumeLimits::default();
    let pixels = vec![1000u16; 12];

    let no_pixels = dir.join("no_pixels.dcm");
    write_dicom_slice(&no_pixels, &geometry, 0, 4, 3, &pixels, false, EXPLICIT_VR_LITTLE_ENDIAN);
    assert!(refusal(&no_pixels, &limits).contains("holds no pixel data"));

    let jpeg2000 = dir.join("j2k.dcm");
    write_dicom_slice(&jpeg2000, &geometry, 0, 4, 3, &pixels, true, JPEG_2000);
    let message = refusal(&jpeg2000, &limits);
    assert!(message.contains("JPEG 2000") && message.contains(JPEG_2000), "{message}");

    // A series with one slice of another size.
    let mixed = dir.join("mixed");
    let values = vec![0.0f32; 36];
    write_dicom_series(&mixed, [4, 3, 3], &values, &geometry);
    write_dicom_slice(&mixed.join("IM0002.dcm"), &geometry, 1, 5, 3, &[1000; 15], true, EXPLICIT_VR_LITTLE_ENDIAN);
    let message = read(&mixed).unwrap_err().to_string();
    assert!(message.contains("mixed slice sizes") && message.contains("IM0002.dcm"), "{message}");

    // A series with a slice missing in the middle.
    let gap = dir.join("gap");
    let files = write_dicom_series(&gap, [4, 3, 5], &[0.0; 60], &geometry);
    std::fs::remove_file(&files[2]).unwrap();
    let message = read(&gap).unwrap_err().to_string();
    assert!(message.contains("a slice may be missing") && message.contains("6.000 mm"), "{message}");
    assert!(message.contains(&files[1].display().to_string()), "{message}");
}

#[test]
fn the_side_of_a_slice_is_told_in_the_patients_terms() {
    let dir = scratch("volume-io", "side");
    // typical_affine: voxel x runs to -x (the patient's left), voxel y to -y (posterior).
    let path = dir.join("v.nii");
    write_nifti_volume(&path, [12, 12, 1], &[0.0; 144], &typical_affine());
    let volume = read(&path).unwrap();
    let mut foreground = vec![false; 144];
    // Low x and low y voxel indices: towards the patient's right and anterior.
    foreground[12 + 1] = true;
    assert_eq!(side_words(&volume, 2, &foreground), "right anterior");
    let mut centre = vec![false; 144];
    centre[6 * 12 + 6] = true;
    assert_eq!(side_words(&volume, 2, &centre), "central");
}
