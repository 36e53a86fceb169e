//! DICOM files and series through the dicom-rs crates (docs/volumes.md §1-§2), pure Rust: the
//! uncompressed transfer syntaxes, RLE Lossless and deflate; any other (JPEG, JPEG 2000, ...) is
//! refused by name before decoding.
//!
//! A series folder is read in two passes: the headers of every file (pixel data left unread) to
//! check that they make one volume — one series, one size, one orientation, evenly spaced slice
//! positions with none missing — and to check the limits, then the pixels, one file at a time.
//! The volume's voxel `(i, j, k)` is column `i`, row `j` of the `k`-th slice in the order of its
//! position along the slice normal.

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions, Tag};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

use super::{nifti::header_for_affine, Affine, Volume, VolumeLimits};
use crate::error::{Error, Result};

fn invalid(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {why}", path.display()))
}

/// Relative tolerance on slice gaps: a gap this much above or below the series' usual step is a
/// missing (or extra) slice. Scanners write positions to about 1e-3 mm; 10 % leaves room for
/// rounding while a missing slice (a gap of twice the step) is far outside.
const GAP_TOLERANCE: f64 = 0.1;

/// What the header of one file says (no pixel data read).
#[derive(Clone, Debug)]
struct SliceHeader {
    path: PathBuf,
    rows: usize,
    columns: usize,
    frames: usize,
    position: Option<[f64; 3]>,
    orientation: Option<[f64; 6]>,
    spacing: Option<[f64; 2]>,
    slice_gap: Option<f64>,
    series: Option<String>,
}

/// Reads one DICOM file (a multi-frame file gives one slice per frame) or a folder holding one
/// series. Errors (naming the file): not DICOM, a transfer syntax that cannot be decoded here (by
/// name and UID), no pixel data, colour pixels, and for a series: several series, mixed sizes or
/// orientations, two slices at one position, a missing slice, a multi-frame file among others.
pub fn read_dicom(path: &Path, limits: &VolumeLimits, axis: Option<usize>) -> Result<Volume> {
    let files = if path.is_dir() { series_files(path)? } else { vec![path.to_path_buf()] };
    let mut headers = files.iter().map(|f| read_header(f)).collect::<Result<Vec<_>>>()?;
    let (dims, affine) = if headers.len() == 1 {
        single_file_geometry(&headers[0])
    } else {
        let geometry = series_geometry(path, &mut headers)?;
        ([headers[0].columns, headers[0].rows, headers.len()], geometry)
    };
    limits.check(path, dims, axis.unwrap_or(2).min(2))?;
    let mut voxels = Vec::new();
    voxels
        .try_reserve_exact(dims.iter().product())
        .map_err(|e| invalid(path, format!("cannot hold {dims:?} ({e})")))?;
    for header in &headers {
        voxels.extend(read_pixels(header)?);
    }
    Ok(Volume { source: path.to_path_buf(), dims, voxels, affine, header: header_for_affine(&affine), slice_axis: 2 })
}

/// The files of a series folder, sorted by name: hidden files and `DICOMDIR` are skipped.
fn series_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let entry = entry.map_err(Error::io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.eq_ignore_ascii_case("DICOMDIR") || !entry.path().is_file() {
            continue;
        }
        files.push(entry.path());
    }
    files.sort();
    if files.is_empty() {
        return Err(invalid(dir, "is a folder that holds no DICOM file (--image takes a PNG or JPEG image, a NIfTI volume, a DICOM file or a folder of one DICOM series)"));
    }
    Ok(files)
}

fn read_header(path: &Path) -> Result<SliceHeader> {
    let object = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| invalid(path, format!("not a readable DICOM file ({e})")))?;
    check_transfer_syntax(path, &object)?;
    let samples: usize = int(&object, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    if samples != 1 {
        return Err(invalid(path, format!("{samples} samples per pixel (colour): only grey DICOM images are read")));
    }
    let rows = int(&object, tags::ROWS).ok_or_else(|| invalid(path, "no Rows (0028,0010): holds no image"))?;
    let columns = int(&object, tags::COLUMNS).ok_or_else(|| invalid(path, "no Columns (0028,0011): holds no image"))?;
    let slice_gap = float(&object, tags::SPACING_BETWEEN_SLICES).or_else(|| float(&object, tags::SLICE_THICKNESS));
    Ok(SliceHeader {
        path: path.to_path_buf(),
        rows,
        columns,
        frames: int(&object, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1),
        position: floats(&object, tags::IMAGE_POSITION_PATIENT),
        orientation: floats(&object, tags::IMAGE_ORIENTATION_PATIENT),
        spacing: floats(&object, tags::PIXEL_SPACING).filter(|s: &[f64; 2]| s.iter().all(|&v| v > 0.0)),
        slice_gap: slice_gap.filter(|&g| g > 0.0),
        series: object
            .element_opt(tags::SERIES_INSTANCE_UID)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string()),
    })
}

/// Errors: a transfer syntax the registry does not know, or one whose pixel data this build
/// cannot decode (named, with its UID and what to do).
fn check_transfer_syntax(path: &Path, object: &DefaultDicomObject) -> Result<()> {
    let uid = object.meta().transfer_syntax().trim_end_matches(['\0', ' ']);
    match TransferSyntaxRegistry.get(uid) {
        None => Err(invalid(path, format!("unknown transfer syntax {uid}: cannot decode its pixel data"))),
        Some(ts) if !ts.can_decode_all() => Err(invalid(
            path,
            format!(
                "pixel data compressed as {} ({uid}), which this build cannot decode (it reads uncompressed, RLE \
                 Lossless and deflated DICOM); decompress the files first, e.g. `gdcmconv --raw in.dcm out.dcm` or \
                 `dcmdjpeg`/`dcmdjp2k`",
                ts.name()
            ),
        )),
        Some(_) => Ok(()),
    }
}

fn int(object: &DefaultDicomObject, tag: Tag) -> Option<usize> {
    object.element_opt(tag).ok().flatten().and_then(|e| e.to_int::<u32>().ok()).map(|v| v as usize)
}

fn float(object: &DefaultDicomObject, tag: Tag) -> Option<f64> {
    object.element_opt(tag).ok().flatten().and_then(|e| e.to_float64().ok()).filter(|v| v.is_finite())
}

fn floats<const N: usize>(object: &DefaultDicomObject, tag: Tag) -> Option<[f64; N]> {
    let values = object.element_opt(tag).ok().flatten()?.to_multi_float64().ok()?;
    let array: [f64; N] = values.try_into().ok()?;
    array.iter().all(|v| v.is_finite()).then_some(array)
}

/// The row direction, the column direction and their cross product (the slice normal), LPS.
fn directions(orientation: &[f64; 6]) -> Option<([f64; 3], [f64; 3], [f64; 3])> {
    let row = [orientation[0], orientation[1], orientation[2]];
    let column = [orientation[3], orientation[4], orientation[5]];
    let normal = cross(row, column);
    (norm(normal) > 1e-6).then_some((row, column, normal))
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn norm(a: [f64; 3]) -> f64 {
    a.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter().zip(&b).map(|(x, y)| x * y).sum()
}

/// The NIfTI (RAS+) affine of voxel `(i, j, k)` from LPS geometry: column `i` moves `column_step`,
/// row `j` moves `row_step`, slice `k` moves `slice_step`, voxel 0 is at `origin`; x and y are
/// negated (LPS to RAS).
fn ras_affine(column_step: [f64; 3], row_step: [f64; 3], slice_step: [f64; 3], origin: [f64; 3]) -> Affine {
    let flip = [-1.0, -1.0, 1.0];
    let mut affine = [[0.0; 4]; 4];
    for r in 0..3 {
        affine[r] = [flip[r] * column_step[r], flip[r] * row_step[r], flip[r] * slice_step[r], flip[r] * origin[r]];
    }
    affine[3][3] = 1.0;
    affine
}

fn scale(v: [f64; 3], s: f64) -> [f64; 3] {
    v.map(|x| x * s)
}

/// One file: its frames are the slices. Missing geometry falls back to an axial grid of 1 mm
/// pixels at the origin (noted on stderr); slices step along the normal by the spacing between
/// slices (else the slice thickness, else 1 mm).
fn single_file_geometry(header: &SliceHeader) -> ([usize; 3], Affine) {
    let orientation = header.orientation.filter(|o| directions(o).is_some());
    if orientation.is_none() || header.spacing.is_none() || header.position.is_none() {
        eprintln!(
            "note: {}: no complete geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing); the output \
             affine assumes 1 mm pixels on an axial grid at the origin where they are missing",
            header.path.display()
        );
    }
    let (row, column, normal) =
        directions(&orientation.unwrap_or([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])).expect("the default orientation is valid");
    let [row_spacing, column_spacing] = header.spacing.unwrap_or([1.0, 1.0]);
    let gap = header.slice_gap.unwrap_or(1.0);
    let affine = ras_affine(
        scale(row, column_spacing),
        scale(column, row_spacing),
        scale(normal, gap / norm(normal)),
        header.position.unwrap_or([0.0; 3]),
    );
    ([header.columns, header.rows, header.frames], affine)
}

/// Sorts a series' headers by position along the slice normal and returns its affine. Errors
/// name the files at fault.
fn series_geometry(dir: &Path, headers: &mut [SliceHeader]) -> Result<Affine> {
    let first = headers[0].clone();
    for h in headers.iter() {
        if h.series != first.series {
            return Err(invalid(
                dir,
                format!(
                    "holds more than one series: {} is in series {} and {} in {}; put each series in its own folder",
                    first.path.display(),
                    first.series.as_deref().unwrap_or("(none)"),
                    h.path.display(),
                    h.series.as_deref().unwrap_or("(none)")
                ),
            ));
        }
        if (h.rows, h.columns) != (first.rows, first.columns) {
            return Err(invalid(
                dir,
                format!(
                    "mixed slice sizes: {} is {}x{} (columns x rows) but {} is {}x{}",
                    first.path.display(),
                    first.columns,
                    first.rows,
                    h.path.display(),
                    h.columns,
                    h.rows
                ),
            ));
        }
        if h.frames != 1 {
            return Err(invalid(
                &h.path,
                format!("a multi-frame file ({} frames) inside a series folder: read it on its own", h.frames),
            ));
        }
        let geometry = |what: &str| invalid(&h.path, format!("no valid {what}: cannot place the slice in the series"));
        let orientation = h.orientation.ok_or_else(|| geometry("ImageOrientationPatient (0020,0037)"))?;
        directions(&orientation).ok_or_else(|| geometry("ImageOrientationPatient (0020,0037)"))?;
        h.position.ok_or_else(|| geometry("ImagePositionPatient (0020,0032)"))?;
        h.spacing.ok_or_else(|| geometry("PixelSpacing (0028,0030)"))?;
        let reference = first.orientation.unwrap_or(orientation);
        if orientation.iter().zip(&reference).any(|(a, b)| (a - b).abs() > 1e-4) {
            return Err(invalid(
                dir,
                format!(
                    "mixed orientations: {} has ImageOrientationPatient {:?} but {} has {:?}",
                    first.path.display(),
                    reference,
                    h.path.display(),
                    orientation
                ),
            ));
        }
    }
    let orientation = first.orientation.expect("checked above");
    let (row, column, normal) = directions(&orientation).expect("checked above");
    let along = |h: &SliceHeader| dot(h.position.expect("checked above"), normal);
    headers.sort_by(|a, b| along(a).total_cmp(&along(b)));
    check_gaps(dir, headers, &along)?;
    let (start, end) = (headers[0].position.expect("checked"), headers[headers.len() - 1].position.expect("checked"));
    let steps = (headers.len() - 1) as f64;
    let slice_step = [0, 1, 2].map(|r| (end[r] - start[r]) / steps);
    let [row_spacing, column_spacing] = headers[0].spacing.expect("checked above");
    Ok(ras_affine(scale(row, column_spacing), scale(column, row_spacing), slice_step, start))
}

/// Errors: two slices at one position, or a gap between neighbours that differs from the
/// series' median step by more than [`GAP_TOLERANCE`] (a missing slice).
fn check_gaps(dir: &Path, sorted: &[SliceHeader], along: &dyn Fn(&SliceHeader) -> f64) -> Result<()> {
    let gaps: Vec<f64> = sorted.windows(2).map(|w| along(&w[1]) - along(&w[0])).collect();
    let mut ordered = gaps.clone();
    ordered.sort_by(f64::total_cmp);
    let median = ordered[ordered.len() / 2];
    for (k, &gap) in gaps.iter().enumerate() {
        let (a, b) = (&sorted[k], &sorted[k + 1]);
        if gap < 1e-3 {
            return Err(invalid(
                dir,
                format!(
                    "two slices at the same position ({:.3} mm along the normal): {} and {}",
                    along(a),
                    a.path.display(),
                    b.path.display()
                ),
            ));
        }
        if (gap - median).abs() > GAP_TOLERANCE * median {
            return Err(invalid(
                dir,
                format!(
                    "uneven slice spacing, a slice may be missing: {} and {} are {gap:.3} mm apart, the others about \
                     {median:.3} mm",
                    a.path.display(),
                    b.path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The pixels of one file (every frame), after its rescale slope and intercept.
fn read_pixels(header: &SliceHeader) -> Result<Vec<f32>> {
    let path = &header.path;
    let object =
        dicom_object::open_file(path).map_err(|e| invalid(path, format!("not a readable DICOM file ({e})")))?;
    if object.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err(invalid(path, "holds no pixel data (the PixelData element (7FE0,0010) is missing)"));
    }
    let decoded =
        object.decode_pixel_data().map_err(|e| invalid(path, format!("cannot decode the pixel data ({e})")))?;
    let values: Vec<f32> =
        decoded.to_vec().map_err(|e| invalid(path, format!("cannot convert the pixel data to numbers ({e})")))?;
    let expected = header.rows * header.columns * header.frames;
    if values.len() != expected {
        return Err(invalid(
            path,
            format!(
                "{} pixel values for {} frame(s) of {}x{} (columns x rows)",
                values.len(),
                header.frames,
                header.columns,
                header.rows
            ),
        ));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lps_steps_become_ras_columns() {
        // An axial slice: rows run to the patient's left (+x in LPS), columns to posterior (+y).
        let affine = ras_affine([0.5, 0.0, 0.0], [0.0, 0.7, 0.0], [0.0, 0.0, 2.0], [-100.0, -120.0, 30.0]);
        assert_eq!(affine[0], [-0.5, 0.0, 0.0, 100.0]);
        assert_eq!(affine[1], [0.0, -0.7, 0.0, 120.0]);
        assert_eq!(affine[2], [0.0, 0.0, 2.0, 30.0]);
        assert_eq!(affine[3], [0.0, 0.0, 0.0, 1.0]);
    }
}
