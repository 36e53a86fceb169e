//! `mcs-engine convert` end to end (docs/volumes.md §5-§7): image and label volumes (NIfTI and a
//! DICOM series, nnU-Net naming) become the official layout with splits by patient, which
//! `check` accepts and `train --data` trains on; bad pairs and existing layouts are refused.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/volumes.rs"]
mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use cli::{run, s};
use mcs_engine::data::{read_prompt_file, Split};
use volumes::*;

const DIMS: [usize; 3] = [24, 20, 6];

/// Six patients: five NIfTI images named `case_00N_0000.nii.gz`, one DICOM series `case_005/`,
/// labels `case_00N.nii.gz` on the same grids (the series' label with the series' affine).
fn dataset(dir: &Path) -> (PathBuf, PathBuf) {
    let (images, labels) = (dir.join("imagesTr"), dir.join("labelsTr"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&labels).unwrap();
    for n in 0..6 {
        let (image, label) = phantom(DIMS, [6.0 + 2.0 * n as f64, 7.0, 2.0]);
        let id = format!("case_{n:03}");
        let affine = if n == 5 {
            let geometry = SeriesGeometry::axial();
            write_dicom_series(&images.join(&id), DIMS, &image, &geometry);
            geometry.ras_affine()
        } else {
            write_nifti_volume(&images.join(format!("{id}_0000.nii.gz")), DIMS, &image, &typical_affine());
            typical_affine()
        };
        write_nifti_volume(&labels.join(format!("{id}.nii.gz")), DIMS, &label, &affine);
    }
    (images, labels)
}

fn convert(images: &Path, labels: &Path, out: &Path, extra: &[&str]) -> cli::Outcome {
    let mut args = vec!["convert", "--images", s(images), "--labels", s(labels), "--out", s(out)];
    args.extend(["--split", "50,25,25", "--empty-fraction", "0.25", "--seed", "3"]);
    args.extend(extra);
    run(&args)
}

#[test]
fn convert_writes_a_layout_split_by_patient_that_trains() {
    let dir = scratch("convert-cli", "end-to-end");
    let (images, labels) = dataset(&dir);
    let out = dir.join("layout");
    let outcome = convert(&images, &labels, &out, &["--label-value", "1", "--window", "100,400"]);
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);

    let mut patients_of: HashMap<Split, HashSet<String>> = HashMap::new();
    let mut foreground_rows = 0;
    for split in Split::ALL {
        let prompts = out.join("Prompts_Folder").join(format!("{}_text.xlsx", split.name()));
        let rows = read_prompt_file(&prompts).unwrap();
        assert!(!rows.is_empty(), "{}: every split gets a patient", split.name());
        for row in &rows {
            let folder = out.join(split.folder());
            assert!(folder.join("img").join(&row.image).is_file() && folder.join("label").join(&row.image).is_file());
            let patient = row.image.rsplit_once('_').unwrap().0.to_string();
            patients_of.entry(split).or_default().insert(patient);
            let label = image::open(folder.join("label").join(&row.image)).unwrap().to_luma8();
            let foreground = label.pixels().filter(|p| p[0] == 255).count();
            assert!(label.pixels().all(|p| p[0] == 0 || p[0] == 255));
            if foreground > 0 {
                foreground_rows += 1;
                // The template's placeholders are filled from the label.
                assert!(row.description.starts_with("a ") && !row.description.contains('{'), "{}", row.description);
                assert!(["small", "medium", "large"].iter().any(|w| row.description.contains(w)));
            } else {
                assert_eq!(row.description, "no lesion in the slice");
            }
        }
    }
    // Splits by patient: no patient in two splits, every patient in one.
    let all: Vec<&String> = patients_of.values().flatten().collect();
    assert_eq!(all.len(), all.iter().collect::<HashSet<_>>().len(), "{patients_of:?}");
    assert_eq!(all.len(), 6);
    // The ellipsoid covers slices 1..=3 of 6 along the slice axis (label 1); the blob of label
    // 2 is not foreground with --label-value 1, so those slices may only appear as empty ones.
    assert!(foreground_rows >= 6 * 2, "{foreground_rows}");

    let check = run(&["check", "--data", s(&out)]);
    assert_eq!(check.code, Some(0), "{}{}", check.stdout, check.stderr);
    let runs = dir.join("runs");
    let train = run(&[
        "train",
        "--data",
        s(&out),
        "--config",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--out",
        s(&runs),
    ]);
    assert_eq!(train.code, Some(0), "{}{}", train.stdout, train.stderr);
    assert!(runs.join("best").join("model.safetensors").is_file());

    // The layout is never written over.
    let again = convert(&images, &labels, &out, &[]);
    assert_ne!(again.code, Some(0));
    assert!(again.stderr.contains("already holds a dataset") && again.stderr.contains(s(&out)), "{}", again.stderr);
}

#[test]
fn a_label_off_its_images_grid_or_without_an_image_is_refused_naming_both() {
    let dir = scratch("convert-cli", "refusals");
    let (images, labels) = dataset(&dir);
    let out = dir.join("layout");

    // Another shape.
    let label = labels.join("case_001.nii.gz");
    write_nifti_volume(&label, [24, 20, 5], &[0.0; 2400], &typical_affine());
    let outcome = convert(&images, &labels, &out, &[]);
    assert_ne!(outcome.code, Some(0));
    let image = images.join("case_001_0000.nii.gz");
    for needle in [s(&label), s(&image), "[24, 20, 5]", "[24, 20, 6]"] {
        assert!(outcome.stderr.contains(needle), "{needle}: {}", outcome.stderr);
    }
    assert!(!out.join("Train_Folder").exists(), "a failed conversion leaves no layout behind");

    // Another affine.
    let mut shifted = typical_affine();
    shifted[0][3] += 5.0;
    write_nifti_volume(&label, DIMS, &vec![0.0; DIMS.iter().product()], &shifted);
    let outcome = convert(&images, &labels, &out, &[]);
    assert_ne!(outcome.code, Some(0));
    assert!(outcome.stderr.contains("affine") && outcome.stderr.contains("45.5"), "{}", outcome.stderr);

    // A label without an image.
    std::fs::remove_file(&label).unwrap();
    write_nifti_volume(&labels.join("case_009.nii.gz"), DIMS, &vec![0.0; DIMS.iter().product()], &typical_affine());
    let outcome = convert(&images, &labels, &out, &[]);
    assert_ne!(outcome.code, Some(0));
    assert!(
        outcome.stderr.contains("case_009.nii.gz") && outcome.stderr.contains("case_009_0000"),
        "{}",
        outcome.stderr
    );
    assert!(std::fs::read_dir(&out).map_or(true, |mut d| d.next().is_none()), "nothing left in --out");
}
