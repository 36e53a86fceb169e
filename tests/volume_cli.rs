//! `predict --image VOLUME` end to end (docs/volumes.md §4): NIfTI (.nii, .nii.gz) and DICOM
//! series in, NIfTI maps out on the input's grid; each slice's maps are what the segmenter gives
//! on that slice's grey picture; bad volumes end with a non-zero exit naming the file.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/volumes.rs"]
mod volumes;

use std::path::Path;

use cli::{run, s};
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{MedClipSeg, ModelConfig};
use mcs_engine::segment::volume::grey_slice;
use mcs_engine::segment::{Options, Segmenter};
use mcs_engine::tokenizer::{preset_tokenizer_json, PromptTokenizer};
use mcs_engine::volume::{read_volume, Intensity, Volume, VolumeLimits};
use mcs_engine::Device;
use volumes::*;

const PROMPT: &str = "one small round-shaped lesion at the center of the image";
const SEED: u64 = 9;
const SAMPLES: usize = 2;

/// `predict` with the tiny config's random weights (seeded by --seed), 2 samples, 3 slices a pass.
fn predict(image: &Path, out: &Path, extra: &[&str]) -> cli::Outcome {
    let seed = SEED.to_string();
    let samples = SAMPLES.to_string();
    let mut args = vec!["predict", "--image", s(image), "--prompt", PROMPT, "--config", "tiny", "--device", "cpu"];
    args.extend(["--seed", &seed, "--samples", &samples, "--out", s(out), "--slices-per-pass", "3"]);
    args.extend(extra);
    run(&args)
}

/// The same model in this process.
fn segmenter() -> Segmenter {
    let config = ModelConfig::preset("tiny").unwrap();
    let tokenizer = PromptTokenizer::from_bytes(
        preset_tokenizer_json("tiny").unwrap(),
        config.text_context_length,
        config.text_pad_id,
    )
    .unwrap();
    let model = MedClipSeg::from_store(config, WeightStore::synthetic(SEED), &Device::Cpu).unwrap();
    Segmenter::new(model, tokenizer).unwrap()
}

fn read(path: &Path) -> Volume {
    read_volume(path, &VolumeLimits::default(), None).unwrap()
}

/// Checks the three maps in `out` against `input`: the same dims and affine (and, for a NIfTI
/// input, the same header fields), uint8 0/1 mask, float32 probability and uncertainty in range,
/// and each slice equal to the segmenter's maps of its grey picture in the same pass.
fn check_outputs(input: &Path, out: &Path, nifti_input: bool) {
    assert!(out.join("overlay.png").is_file());
    let volume = read(input);
    for (name, datatype) in [("mask.nii.gz", 2), ("probability.nii.gz", 16), ("uncertainty.nii.gz", 16)] {
        let path = out.join(name);
        let header = nifti::NiftiHeader::from_file(&path).unwrap();
        assert_eq!(header.datatype, datatype, "{name}: NIfTI datatype (2 = uint8, 16 = float32)");
        let map = read(&path);
        assert_eq!(map.dims, volume.dims, "{name}");
        assert_eq!(map.affine, volume.affine, "{name}: the input's affine, exactly");
        if nifti_input {
            let source = nifti::NiftiHeader::from_file(input).unwrap();
            assert_eq!((header.srow_x, header.srow_y, header.srow_z), (source.srow_x, source.srow_y, source.srow_z));
            assert_eq!(
                (header.qform_code, header.sform_code, header.pixdim),
                (source.qform_code, source.sform_code, source.pixdim)
            );
        }
    }
    let mask = read(&out.join("mask.nii.gz")).voxels;
    let probability = read(&out.join("probability.nii.gz")).voxels;
    let uncertainty = read(&out.join("uncertainty.nii.gz")).voxels;
    assert!(mask.iter().all(|&m| m == 0.0 || m == 1.0));
    assert!(probability.iter().all(|p| (0.0..=1.0).contains(p)));
    assert!(uncertainty.iter().all(|u| (0.0..=std::f32::consts::LN_2 + 1e-6).contains(u)));

    // Slice by slice, in the passes predict made (3 slices, then the rest).
    let segmenter = segmenter();
    let options = Options { samples: SAMPLES, seed: SEED, ..Options::default() };
    let range = Intensity::default().range(&volume.voxels).unwrap();
    let count = volume.slice_count(2);
    for first in (0..count).step_by(3) {
        let slices: Vec<usize> = (first..count.min(first + 3)).collect();
        let images: Vec<_> = slices.iter().map(|&k| grey_slice(&volume, 2, k, range).unwrap()).collect();
        let items: Vec<_> = images.iter().map(|image| (image, PROMPT)).collect();
        let results = segmenter.segment_batch(&items, &options).unwrap();
        for (&k, result) in slices.iter().zip(&results) {
            let voxels = volume.slice_indices(2, k);
            let got: Vec<f32> = voxels.iter().map(|&v| probability[v]).collect();
            // The same computation on the same CPU: equal bit for bit (the maps are stored as float32).
            assert_eq!(got, result.probability, "slice {k}: probability");
            let got: Vec<f32> = voxels.iter().map(|&v| uncertainty[v]).collect();
            assert_eq!(got, result.uncertainty, "slice {k}: uncertainty");
            let got: Vec<bool> = voxels.iter().map(|&v| mask[v] == 1.0).collect();
            assert_eq!(got, result.mask, "slice {k}: mask");
        }
    }
}

#[test]
fn predict_on_nifti_volumes_writes_maps_on_the_input_grid() {
    let dir = scratch("volume-cli", "nifti");
    let dims = [24, 20, 5];
    let (image, _) = phantom(dims, [8.0, 12.0, 2.0]);
    for name in ["ct.nii", "ct.nii.gz"] {
        let input = dir.join(name);
        write_nifti_volume(&input, dims, &image, &typical_affine());
        let out = dir.join(format!("out-{name}"));
        let outcome = predict(&input, &out, &[]);
        assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
        assert!(outcome.stdout.contains("24x20x5 voxels, 5 slices along axis 2"), "{}", outcome.stdout);
        check_outputs(&input, &out, true);
    }
}

#[test]
fn a_volume_slice_equals_predict_on_that_slice_as_a_png() {
    let dir = scratch("volume-cli", "png");
    let dims = [24, 20, 4];
    let (image, _) = phantom(dims, [10.0, 9.0, 1.0]);
    let input = dir.join("ct.nii.gz");
    write_nifti_volume(&input, dims, &image, &typical_affine());
    let out = dir.join("volume");
    assert_eq!(predict(&input, &out, &[]).code, Some(0));
    // Slices 0 and 3 are the first of their pass, so their maps are those of a single image.
    let volume = read(&input);
    let range = Intensity::default().range(&volume.voxels).unwrap();
    let probability = read(&out.join("probability.nii.gz")).voxels;
    for k in [0, 3] {
        let grey = grey_slice(&volume, 2, k, range).unwrap();
        let png = dir.join(format!("slice{k}.png"));
        image::GrayImage::from_raw(24, 20, grey.data).unwrap().save(&png).unwrap();
        let single = dir.join(format!("single{k}"));
        let outcome = predict(&png, &single, &[]);
        assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
        let bytes = std::fs::read(single.join("probability.npy")).unwrap();
        let values: Vec<f32> = bytes[bytes.len() - 24 * 20 * 4..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let from_volume: Vec<f32> = volume.slice_indices(2, k).iter().map(|&v| probability[v]).collect();
        assert_eq!(values, from_volume, "slice {k}");
    }
}

#[test]
fn predict_on_a_dicom_series_writes_the_affine_of_its_geometry() {
    let dir = scratch("volume-cli", "dicom");
    let dims = [24, 20, 5];
    let (image, _) = phantom(dims, [12.0, 8.0, 2.0]);
    let geometry = SeriesGeometry::axial();
    let series = dir.join("series");
    write_dicom_series(&series, dims, &image, &geometry);
    let out = dir.join("out");
    let outcome = predict(&series, &out, &["--window", "40,400"]);
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
    let mask = read(&out.join("mask.nii.gz"));
    assert_eq!(mask.dims, dims);
    // The sform holds the computed affine in f32: these entries are exact in f32.
    assert_eq!(mask.affine, geometry.ras_affine());
    assert!(read(&out.join("probability.nii.gz")).voxels.iter().all(|p| (0.0..=1.0).contains(p)));
}

#[test]
fn bad_volumes_end_with_an_error_naming_the_file() {
    let dir = scratch("volume-cli", "refusals");
    let affine = typical_affine();
    let out = dir.join("out");

    let nan = dir.join("nan.nii");
    let mut values = vec![1.0f32; 8];
    values[3] = f32::NAN;
    write_nifti_volume(&nan, [2, 2, 2], &values, &affine);
    let four = dir.join("four.nii.gz");
    let header = mcs_engine::volume::nifti::header_for_affine(&affine);
    nifti::writer::WriterOptions::new(&four)
        .reference_header(&header)
        .write_nifti(&ndarray::Array4::<f32>::zeros((3, 3, 2, 3)))
        .unwrap();
    let big = dir.join("big.nii");
    write_nifti_volume(&big, [4, 4, 4], &[0.0; 64], &affine);
    let no_pixels = dir.join("no_pixels.dcm");
    write_dicom_slice(&no_pixels, &SeriesGeometry::axial(), 0, 4, 3, &[0; 12], false, EXPLICIT_VR_LITTLE_ENDIAN);
    let j2k = dir.join("j2k.dcm");
    write_dicom_slice(&j2k, &SeriesGeometry::axial(), 0, 4, 3, &[0; 12], true, JPEG_2000);
    let gap = dir.join("gap");
    let files = write_dicom_series(&gap, [4, 3, 4], &[0.0; 48], &SeriesGeometry::axial());
    std::fs::remove_file(&files[1]).unwrap();

    let cases: [(&Path, &[&str], &str); 7] = [
        (&nan, &[], "NaN or infinite"),
        (&four, &[], "4-D volume"),
        (&big, &["--max-voxels", "63"], "more than the limit of 63"),
        (&big, &["--max-pixels", "15"], "more than the limit of 15"),
        (&no_pixels, &[], "holds no pixel data"),
        (&j2k, &[], "JPEG 2000"),
        (&gap, &[], "a slice may be missing"),
    ];
    for (input, extra, why) in cases {
        let outcome = predict(input, &out, extra);
        assert_ne!(outcome.code, Some(0), "{}: {}", input.display(), outcome.stdout);
        assert!(outcome.stderr.contains(&input.display().to_string()), "names the file: {}", outcome.stderr);
        assert!(outcome.stderr.contains(why), "{}: {}", input.display(), outcome.stderr);
        assert!(!outcome.stderr.contains("panicked"), "{}", outcome.stderr);
    }
    assert!(!out.join("mask.nii.gz").exists(), "nothing is written for a refused volume");
}

#[test]
fn an_oblique_volume_is_segmented_with_a_warning_and_keeps_its_affine() {
    let dir = scratch("volume-cli", "oblique");
    let (c, s_) = (20f64.to_radians().cos(), 20f64.to_radians().sin());
    let affine = [[c, -s_, 0.0, 1.0], [s_, c, 0.0, 2.0], [0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]];
    let input = dir.join("oblique.nii.gz");
    let dims = [16, 16, 2];
    write_nifti_volume(&input, dims, &phantom(dims, [8.0, 8.0, 1.0]).0, &affine);
    let out = dir.join("out");
    let outcome = predict(&input, &out, &[]);
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("oblique") && outcome.stderr.contains("oblique.nii.gz"), "{}", outcome.stderr);
    assert_eq!(read(&out.join("mask.nii.gz")).affine, read(&input).affine);
}
