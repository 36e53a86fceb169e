//! Small volumes the volume tests write for themselves: NIfTI files through the engine's own
//! writer (the `nifti` crate) and DICOM series through dicom-object.
#![allow(dead_code)] // each test binary uses its own part of these helpers

use std::path::{Path, PathBuf};

use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use mcs_engine::volume::nifti::{header_for_affine, write_nifti};
use mcs_engine::volume::Affine;

pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
pub const JPEG_2000: &str = "1.2.840.10008.1.2.4.90";

/// A fresh scratch folder for one test.
pub fn scratch(prefix: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-{prefix}-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An affine with voxel sizes (0.8, 0.9, 2.5) mm, axes along -x, -y, +z (a typical radiological
/// NIfTI) and an origin away from 0: exact in f32.
pub fn typical_affine() -> Affine {
    [[-0.75, 0.0, 0.0, 40.5], [0.0, -0.875, 0.0, 20.25], [0.0, 0.0, 2.5, -30.0], [0.0, 0.0, 0.0, 1.0]]
}

/// A volume with a bright ellipsoid (the "lesion") on a textured background, first axis fastest,
/// and its label (1 inside the ellipsoid, 2 in a second small blob, 0 elsewhere).
pub fn phantom(dims: [usize; 3], centre: [f64; 3]) -> (Vec<f32>, Vec<f32>) {
    let [nx, ny, nz] = dims;
    let (mut image, mut label) = (Vec::new(), Vec::new());
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let d = [
                    (i as f64 - centre[0]) / (nx as f64 * 0.2),
                    (j as f64 - centre[1]) / (ny as f64 * 0.2),
                    (k as f64 - centre[2]) / (nz as f64 * 0.3).max(1.0),
                ];
                let inside = d.iter().map(|v| v * v).sum::<f64>() <= 1.0;
                let blob = i == 1 && j == 1;
                image.push(if inside { 300.0 } else { 40.0 + ((i * 7 + j * 13 + k * 3) % 23) as f32 * 4.0 });
                label.push(if inside {
                    1.0
                } else if blob {
                    2.0
                } else {
                    0.0
                });
            }
        }
    }
    (image, label)
}

/// Writes `values` as a NIfTI file (float32) with `affine`.
pub fn write_nifti_volume(path: &Path, dims: [usize; 3], values: &[f32], affine: &Affine) {
    write_nifti(path, &header_for_affine(affine), dims, values).unwrap();
}

/// Geometry of a DICOM series: LPS orientation (row, column directions), pixel spacing (between
/// rows, between columns), the first slice's position and the step between slices.
#[derive(Clone, Copy, Debug)]
pub struct SeriesGeometry {
    pub orientation: [f64; 6],
    pub spacing: [f64; 2],
    pub origin: [f64; 3],
    pub step: [f64; 3],
}

impl SeriesGeometry {
    pub fn axial() -> SeriesGeometry {
        SeriesGeometry {
            orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            spacing: [0.5, 0.75],
            origin: [-10.0, -20.0, 35.0],
            step: [0.0, 0.0, 3.0],
        }
    }

    /// The NIfTI affine the series means, written out by hand from the standard (DICOM's
    /// patient position of pixel (c, r) of slice k is origin + c * col_spacing * row_dir +
    /// r * row_spacing * col_dir + k * step; RAS negates x and y).
    pub fn ras_affine(&self) -> Affine {
        let o = self.orientation;
        let [row_spacing, col_spacing] = self.spacing;
        let mut affine = [[0.0; 4]; 4];
        for r in 0..3 {
            let sign = if r < 2 { -1.0 } else { 1.0 };
            affine[r] =
                [sign * o[r] * col_spacing, sign * o[3 + r] * row_spacing, sign * self.step[r], sign * self.origin[r]];
        }
        affine[3][3] = 1.0;
        affine
    }
}

fn strings(values: &[f64]) -> PrimitiveValue {
    PrimitiveValue::Strs(values.iter().map(|v| format!("{v}")).collect())
}

/// One slice file. `pixels` are stored values (u16, rows x columns, row-major); the rescale
/// intercept -1000 makes the voxel values `stored - 1000`. `with_pixels: false` leaves out the
/// PixelData element; `transfer_syntax` other than explicit VR little endian writes the pixels
/// as one encapsulated fragment (not really encoded: for refusal tests).
#[allow(clippy::too_many_arguments)]
pub fn write_dicom_slice(
    path: &Path,
    geometry: &SeriesGeometry,
    k: usize,
    columns: usize,
    rows: usize,
    pixels: &[u16],
    with_pixels: bool,
    transfer_syntax: &str,
) {
    let mut obj = InMemDicomObject::new_empty();
    let uid = format!("1.2.826.0.1.3680043.2.1125.{}", 1000 + k);
    let position: Vec<f64> = (0..3).map(|r| geometry.origin[r] + k as f64 * geometry.step[r]).collect();
    obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2")));
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(uid.as_str())));
    obj.put(DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, PrimitiveValue::from("1.2.826.0.1.3680043.2.1125.7")));
    obj.put(DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("CT")));
    obj.put(DataElement::new(tags::IMAGE_POSITION_PATIENT, VR::DS, strings(&position)));
    obj.put(DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, strings(&geometry.orientation)));
    obj.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)));
    obj.put(DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from("MONOCHROME2")));
    obj.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(rows as u16)));
    obj.put(DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(columns as u16)));
    obj.put(DataElement::new(tags::PIXEL_SPACING, VR::DS, strings(&geometry.spacing)));
    obj.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)));
    obj.put(DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(16u16)));
    obj.put(DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15u16)));
    obj.put(DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16)));
    obj.put(DataElement::new(tags::RESCALE_INTERCEPT, VR::DS, PrimitiveValue::from("-1000")));
    obj.put(DataElement::new(tags::RESCALE_SLOPE, VR::DS, PrimitiveValue::from("1")));
    if with_pixels {
        if transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN {
            obj.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.iter().copied().collect())));
        } else {
            let bytes: Vec<u8> = pixels.iter().flat_map(|p| p.to_le_bytes()).collect();
            let fragments = PixelFragmentSequence::new(Vec::<u32>::new(), vec![bytes]);
            obj.put(DataElement::new(tags::PIXEL_DATA, VR::OB, fragments));
        }
    }
    let file = obj.with_meta(FileMetaTableBuilder::new().transfer_syntax(transfer_syntax)).unwrap();
    file.write_to_file(path).unwrap();
}

/// Writes `values` (voxel values, first axis fastest, `dims` = columns, rows, slices) as a DICOM
/// series in `dir`, one file per slice, named so that name order is not position order.
pub fn write_dicom_series(dir: &Path, dims: [usize; 3], values: &[f32], geometry: &SeriesGeometry) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let [nx, ny, nz] = dims;
    (0..nz)
        .map(|k| {
            let stored: Vec<u16> = values[k * nx * ny..(k + 1) * nx * ny].iter().map(|v| (v + 1000.0) as u16).collect();
            // Reverse name order: the reader must sort by position, not by name.
            let path = dir.join(format!("IM{:04}.dcm", nz - k));
            write_dicom_slice(&path, geometry, k, nx, ny, &stored, true, EXPLICIT_VR_LITTLE_ENDIAN);
            path
        })
        .collect()
}
