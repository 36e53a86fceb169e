//! `mcs-engine convert`: a folder of image volumes and one of label volumes become the official
//! 2-D layout (docs/volumes.md §5-§7), so a radiology dataset trains with `train --data`.
//!
//! - Pairing: each label volume `<id>.nii.gz` (`.nii`, `.dcm`, or a DICOM series folder `<id>/`)
//!   pairs with the image volume of the same id, or `<id>_0000` (nnU-Net's first channel).
//! - Splits are by patient: whole cases are shuffled with the seed and dealt to Train, Val and
//!   Test by the fractions, so no case has slices in two splits.
//! - Per case, every slice along the axis whose label holds foreground is written, plus empty
//!   slices chosen at random so that they make about `empty_fraction` of the case's slices.
//! - Each foreground slice's prompt fills the template's `{side}` and `{size}` from its label.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::intensity::to_grey;
use super::{is_nifti_name, read_volume, Intensity, Volume, VolumeLimits};
use crate::data::layout::{existing_layout_parts, Split, IMAGE_FOLDER, MASK_FOLDER, PROMPTS_FOLDER};
use crate::data::prompts::{write_prompt_xlsx, PromptRow};
use crate::data::random::{hash_words, Stream};
use crate::error::{Error, Result};

/// The default prompt template: `{size}` and `{side}` are filled per slice.
pub const DEFAULT_TEMPLATE: &str = "a {size} lesion in the {side} region of the slice";
/// The default prompt of a slice whose label is empty.
pub const DEFAULT_EMPTY_PROMPT: &str = "no lesion in the slice";
/// Foreground below this share of a slice's pixels is `small`.
pub const SMALL_BELOW: f64 = 0.01;
/// Foreground below this share (and at least [`SMALL_BELOW`]) is `medium`; above, `large`.
pub const MEDIUM_BELOW: f64 = 0.05;
/// A centroid within this share of the slice's side from its middle is central along that axis.
pub const CENTRAL_BAND: f64 = 1.0 / 6.0;

const SPLIT_PURPOSE: u64 = 0x5350_4C49_545F_4341;

/// How a conversion runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvertOptions {
    /// Shares of the cases for Train, Val and Test (any non-negative numbers, normalised).
    pub split: [f64; 3],
    /// Seed of the case shuffle and of the choice of empty slices.
    pub seed: u64,
    /// Share of each case's written slices that are empty (0 <= f < 1).
    pub empty_fraction: f64,
    /// Foreground is `label == value` when set, else `label > 0`.
    pub label_value: Option<i64>,
    /// The axis slices are taken along (default: each image volume's own slice axis).
    pub axis: Option<usize>,
    /// The intensity mapping of the image volumes.
    pub intensity: Intensity,
    /// The prompt of a foreground slice, with `{side}` and `{size}`.
    pub template: String,
    /// The prompt of an empty slice.
    pub empty_prompt: String,
    /// Size limits of each volume.
    pub limits: VolumeLimits,
}

impl Default for ConvertOptions {
    fn default() -> ConvertOptions {
        ConvertOptions {
            split: [70.0, 15.0, 15.0],
            seed: 666,
            empty_fraction: 0.1,
            label_value: None,
            axis: None,
            intensity: Intensity::default(),
            template: DEFAULT_TEMPLATE.into(),
            empty_prompt: DEFAULT_EMPTY_PROMPT.into(),
            limits: VolumeLimits::default(),
        }
    }
}

impl ConvertOptions {
    /// Errors: split shares that are negative, not finite or all zero; an empty fraction outside
    /// [0, 1); a template with a placeholder other than `{side}` and `{size}`; empty prompts.
    pub fn check(&self) -> Result<()> {
        if self.split.iter().any(|s| !s.is_finite() || *s < 0.0) || self.split.iter().sum::<f64>() <= 0.0 {
            return Err(Error::Invalid(format!(
                "split shares {:?} must be non-negative with a positive sum",
                self.split
            )));
        }
        if !(0.0..1.0).contains(&self.empty_fraction) {
            return Err(Error::Invalid(format!("empty fraction {} is not in [0, 1)", self.empty_fraction)));
        }
        check_template(&self.template)?;
        if self.template.trim().is_empty() || self.empty_prompt.trim().is_empty() {
            return Err(Error::Invalid("the prompt template and the empty-slice prompt must not be empty".into()));
        }
        Ok(())
    }
}

/// Errors: a `{...}` in the template other than `{side}` and `{size}`.
fn check_template(template: &str) -> Result<()> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open..];
        let close = after.find('}').map_or(after.len(), |c| c + 1);
        let placeholder = &after[..close];
        if placeholder != "{side}" && placeholder != "{size}" {
            return Err(Error::Invalid(format!(
                "prompt template `{template}`: unknown placeholder `{placeholder}` (only {{side}} and {{size}})"
            )));
        }
        rest = &after[close..];
    }
    Ok(())
}

/// One patient: an image volume and its label volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// The label's name without its extension; names the written slices.
    pub id: String,
    /// The image volume (file or series folder).
    pub image: PathBuf,
    /// The label volume.
    pub label: PathBuf,
}

/// The id of a volume entry: the name without `.nii.gz`, `.nii` or `.dcm` (any case).
pub fn volume_id(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    for ending in [".nii.gz", ".nii", ".dcm"] {
        if lower.ends_with(ending) && name.len() > ending.len() {
            return name[..name.len() - ending.len()].to_string();
        }
    }
    name
}

/// The volume entries of a folder by id: NIfTI files, `.dcm` files and sub-folders (DICOM
/// series); hidden entries skipped. Error: two entries with one id (`a.nii` and `a.nii.gz`).
fn volume_entries(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::Invalid(format!("{}: not a folder", dir.display())));
    }
    let mut entries = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let path = entry.map_err(Error::io(dir))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dicom = name.to_ascii_lowercase().ends_with(".dcm");
        if name.starts_with('.') || !(path.is_dir() || is_nifti_name(&path) || dicom) {
            continue;
        }
        if let Some(other) = entries.insert(volume_id(&path), path.clone()) {
            return Err(Error::Invalid(format!(
                "{} and {} have the same case id `{}`: keep one",
                other.display(),
                path.display(),
                volume_id(&path)
            )));
        }
    }
    Ok(entries)
}

/// Pairs every label volume of `labels` with its image in `images` (the same id, or the id with
/// `_0000`). Returns the cases sorted by id and how many image volumes have no label. Errors: a
/// folder with no label volume, a label without an image (naming both names tried), a label
/// with two candidate images.
pub fn pair_cases(images: &Path, labels: &Path) -> Result<(Vec<Case>, usize)> {
    let image_entries = volume_entries(images)?;
    let label_entries = volume_entries(labels)?;
    if label_entries.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: holds no label volume (.nii, .nii.gz, .dcm or a DICOM series folder)",
            labels.display()
        )));
    }
    let mut cases = Vec::new();
    let mut used = 0;
    for (id, label) in label_entries {
        let nnunet = format!("{id}_0000");
        let found: Vec<&PathBuf> = [&id, &nnunet].iter().filter_map(|key| image_entries.get(*key)).collect();
        let image = match found[..] {
            [one] => one.clone(),
            [] => {
                return Err(Error::Invalid(format!(
                    "{}: no image volume `{id}` or `{nnunet}` (.nii, .nii.gz, .dcm or a series folder) in {}",
                    label.display(),
                    images.display()
                )))
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: two image volumes could be its image, {} and {}: keep one",
                    label.display(),
                    found[0].display(),
                    found[1].display()
                )))
            }
        };
        used += 1;
        cases.push(Case { id, image, label });
    }
    Ok((cases, image_entries.len() - used))
}

/// The split of each case (in the order given): the cases are shuffled with `seed`, then the
/// first shares go to Train, the next to Val, the rest to Test; every split with a positive
/// share gets at least one case. Error: fewer cases than splits with a positive share.
pub fn assign_splits(count: usize, shares: [f64; 3], seed: u64) -> Result<Vec<Split>> {
    let total: f64 = shares.iter().sum();
    let wanted = shares.iter().filter(|&&s| s > 0.0).count();
    if count < wanted {
        return Err(Error::Invalid(format!(
            "{count} case(s) cannot fill {wanted} splits: splits are by patient, so each needs a case of its own \
             (add cases or set a split's share to 0 with --split)"
        )));
    }
    let at_least = |share: f64| if share > 0.0 { 1 } else { 0 };
    let mut val = ((count as f64 * shares[1] / total).round() as usize).max(at_least(shares[1]));
    let mut test = ((count as f64 * shares[2] / total).round() as usize).max(at_least(shares[2]));
    // Train keeps at least its one case; Val and Test give back what they rounded up.
    while val + test + at_least(shares[0]) > count {
        if test >= val && test > at_least(shares[2]) {
            test -= 1;
        } else {
            val -= 1;
        }
    }
    let mut order: Vec<usize> = (0..count).collect();
    // A purpose word of its own, so the split shuffle shares no draws with the empty-slice choice.
    let mut stream = Stream::new(&[seed, SPLIT_PURPOSE]);
    for i in (1..count).rev() {
        order.swap(i, stream.below(i + 1));
    }
    let mut splits = vec![Split::Train; count];
    for (rank, &case) in order.iter().enumerate() {
        let train = count - val - test;
        splits[case] = if rank < train {
            Split::Train
        } else if rank < train + val {
            Split::Val
        } else {
            Split::Test
        };
    }
    Ok(splits)
}

/// `{side}` of a slice: where the foreground's centroid lies, in the patient's words along each
/// in-plane axis (`left`/`right`, `anterior`/`posterior`, `superior`/`inferior`, through the
/// volume's affine, RAS+), or `central` when it is within [`CENTRAL_BAND`] of the middle along
/// both.
pub fn side_words(volume: &Volume, axis: usize, foreground: &[bool]) -> String {
    let (w, h) = volume.slice_size(axis);
    let (u, v) = super::plane_axes(axis);
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
    for (i, _) in foreground.iter().enumerate().filter(|(_, &f)| f) {
        sx += (i % w) as f64;
        sy += (i / w) as f64;
        n += 1.0;
    }
    if n == 0.0 {
        return "central".into();
    }
    let mut words: Vec<(usize, &str)> = Vec::new();
    for (voxel_axis, centroid, side) in [(u, sx / n, w), (v, sy / n, h)] {
        let offset = (centroid + 0.5) / side as f64 - 0.5;
        if offset.abs() < CENTRAL_BAND {
            continue;
        }
        let (world, positive) = volume.world_direction(voxel_axis);
        // Towards higher voxel indices goes towards the positive world end when `positive`.
        let towards_positive = (offset > 0.0) == positive;
        let names = [("right", "left"), ("anterior", "posterior"), ("superior", "inferior")][world];
        words.push((world, if towards_positive { names.0 } else { names.1 }));
    }
    words.sort();
    if words.is_empty() {
        return "central".into();
    }
    words.iter().map(|(_, w)| *w).collect::<Vec<_>>().join(" ")
}

/// `{size}` of a slice: `small`, `medium` or `large` by the share of its pixels in the
/// foreground ([`SMALL_BELOW`], [`MEDIUM_BELOW`]).
pub fn size_word(foreground_pixels: usize, pixels: usize) -> &'static str {
    let share = foreground_pixels as f64 / pixels.max(1) as f64;
    if share < SMALL_BELOW {
        "small"
    } else if share < MEDIUM_BELOW {
        "medium"
    } else {
        "large"
    }
}

/// What a conversion wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConvertSummary {
    /// Cases per split (Train, Val, Test).
    pub cases: [usize; 3],
    /// Slices with foreground per split.
    pub foreground_slices: [usize; 3],
    /// Empty slices per split.
    pub empty_slices: [usize; 3],
    /// Image volumes with no label (not converted).
    pub unlabelled_images: usize,
    /// Notes for the user (oblique volumes, labels with no foreground).
    pub notes: Vec<String>,
}

/// Converts the volumes of `images` and `labels` into the official layout under `out`. Nothing
/// appears in `out` until every case is written (a hidden staging folder inside it is renamed
/// into place at the end, and removed on error). `progress` is called before each case with the cases done, the case and their number.
///
/// Errors: invalid options, `out` already holding a layout (never overwritten), the pairing
/// errors of [`pair_cases`], a volume that cannot be read ([`read_volume`]), a label whose dims
/// or affine differ from its image's (both files and values named).
pub fn convert(
    images: &Path,
    labels: &Path,
    out: &Path,
    options: &ConvertOptions,
    mut progress: impl FnMut(usize, &Case, usize),
) -> Result<ConvertSummary> {
    options.check()?;
    let existing = existing_layout_parts(out);
    if !existing.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: already holds a dataset ({}); convert never writes over one: choose another --out",
            out.display(),
            existing.join(", ")
        )));
    }
    if out.is_file() {
        return Err(Error::Invalid(format!("{}: is a file, not a folder", out.display())));
    }
    let (cases, unlabelled) = pair_cases(images, labels)?;
    let splits = assign_splits(cases.len(), options.split, options.seed)?;
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    let staging = out.join(format!(".convert-partial-{}", std::process::id()));
    let written = write_layout(&staging, &cases, &splits, options, &mut progress).and_then(|mut summary| {
        for part in Split::ALL.iter().map(|s| s.folder()).chain([PROMPTS_FOLDER.to_string()]) {
            std::fs::rename(staging.join(&part), out.join(&part)).map_err(Error::io(out.join(&part)))?;
        }
        summary.unlabelled_images = unlabelled;
        Ok(summary)
    });
    let _ = std::fs::remove_dir_all(&staging);
    written
}

fn write_layout(
    root: &Path,
    cases: &[Case],
    splits: &[Split],
    options: &ConvertOptions,
    progress: &mut impl FnMut(usize, &Case, usize),
) -> Result<ConvertSummary> {
    let mut summary = ConvertSummary::default();
    let mut rows: [Vec<PromptRow>; 3] = Default::default();
    for split in Split::ALL {
        for sub in [IMAGE_FOLDER, MASK_FOLDER] {
            let dir = root.join(split.folder()).join(sub);
            std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        }
    }
    for (n, (case, &split)) in cases.iter().zip(splits).enumerate() {
        progress(n, case, cases.len());
        let s = split_index(split);
        summary.cases[s] += 1;
        let (foreground, empty) = convert_case(root, case, split, options, &mut rows[s], &mut summary.notes)?;
        summary.foreground_slices[s] += foreground;
        summary.empty_slices[s] += empty;
    }
    for split in Split::ALL {
        let path = root.join(PROMPTS_FOLDER).join(format!("{}_text.xlsx", split.name()));
        write_prompt_xlsx(&path, &rows[split_index(split)])?;
    }
    Ok(summary)
}

fn split_index(split: Split) -> usize {
    Split::ALL.iter().position(|&s| s == split).expect("a split of Split::ALL")
}

/// Errors: a label whose dims differ from its image's, or whose affine differs by more than
/// 1e-3 (mm, or the unit-free rotation parts) in any entry: both are stored as f32 and rounding
/// differs by far less, while a real mismatch (another grid) by far more.
fn check_label_matches(image: &Volume, label: &Volume) -> Result<()> {
    if image.dims != label.dims {
        return Err(Error::Invalid(format!(
            "label {} has dims {:?} but its image {} has {:?}: they must be on the same grid",
            label.source.display(),
            label.dims,
            image.source.display(),
            image.dims
        )));
    }
    let differs = image.affine.iter().flatten().zip(label.affine.iter().flatten()).any(|(a, b)| (a - b).abs() > 1e-3);
    if differs {
        return Err(Error::Invalid(format!(
            "label {} has the affine {:?} but its image {} has {:?}: they must be on the same grid (resample the \
             label onto the image first)",
            label.source.display(),
            label.affine,
            image.source.display(),
            image.affine
        )));
    }
    Ok(())
}

/// Writes one case's slices; returns (foreground slices, empty slices) written.
fn convert_case(
    root: &Path,
    case: &Case,
    split: Split,
    options: &ConvertOptions,
    rows: &mut Vec<PromptRow>,
    notes: &mut Vec<String>,
) -> Result<(usize, usize)> {
    let image = read_volume(&case.image, &options.limits, options.axis)?;
    let axis = image.axis(options.axis)?;
    let label = read_volume(&case.label, &options.limits, Some(axis))?;
    check_label_matches(&image, &label)?;
    if let Some(warning) = image.oblique_warning() {
        notes.push(warning);
    }
    let range = options.intensity.range(&image.voxels)?;
    let is_foreground = |v: f32| match options.label_value {
        Some(value) => f64::from(v).round() == value as f64,
        None => v > 0.0,
    };
    let (w, h) = image.slice_size(axis);
    let mut foreground_slices = Vec::new();
    let mut empty_slices = Vec::new();
    for s in 0..image.slice_count(axis) {
        let mask: Vec<bool> = label.slice(axis, s).into_iter().map(is_foreground).collect();
        if mask.iter().any(|&m| m) {
            foreground_slices.push((s, mask));
        } else {
            empty_slices.push(s);
        }
    }
    if foreground_slices.is_empty() {
        notes.push(format!(
            "note: {}: no foreground voxel ({}): the case adds no slice",
            case.label.display(),
            options.label_value.map_or("label > 0".to_string(), |v| format!("label == {v}"))
        ));
        return Ok((0, 0));
    }
    let f = options.empty_fraction;
    let wanted = ((foreground_slices.len() as f64 * f / (1.0 - f)).round() as usize).min(empty_slices.len());
    let mut stream = Stream::new(&[options.seed, hash_words(&case.id.bytes().map(u64::from).collect::<Vec<_>>())]);
    for i in (1..empty_slices.len()).rev() {
        empty_slices.swap(i, stream.below(i + 1));
    }
    let mut chosen_empty: Vec<usize> = empty_slices[..wanted].to_vec();
    chosen_empty.sort_unstable();
    let folder = root.join(split.folder());
    let digits = image.slice_count(axis).to_string().len().max(3);
    let mut write = |s: usize, mask: &[bool], prompt: String| -> Result<()> {
        let name = format!("{}_{:0digits$}.png", case.id, s);
        write_grey_png(&folder.join(IMAGE_FOLDER).join(&name), w, h, to_grey(&image.slice(axis, s), range))?;
        let label_pixels = mask.iter().map(|&m| if m { 255 } else { 0 }).collect();
        write_grey_png(&folder.join(MASK_FOLDER).join(&name), w, h, label_pixels)?;
        rows.push(PromptRow { image: name.clone(), description: prompt, mask: Some(name), location: String::new() });
        Ok(())
    };
    for (s, mask) in &foreground_slices {
        let size = size_word(mask.iter().filter(|&&m| m).count(), mask.len());
        let prompt = options.template.replace("{side}", &side_words(&image, axis, mask)).replace("{size}", size);
        write(*s, mask, prompt)?;
    }
    let nothing = vec![false; w * h];
    for &s in &chosen_empty {
        write(s, &nothing, options.empty_prompt.clone())?;
    }
    Ok((foreground_slices.len(), chosen_empty.len()))
}

fn write_grey_png(path: &Path, width: usize, height: usize, pixels: Vec<u8>) -> Result<()> {
    let picture = image::GrayImage::from_raw(width as u32, height as u32, pixels).ok_or_else(|| {
        Error::Invalid(format!("{}: pixel buffer does not make a {width}x{height} image", path.display()))
    })?;
    picture
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_dealt_by_share_and_every_positive_share_gets_a_case() {
        let splits = assign_splits(10, [70.0, 15.0, 15.0], 1).unwrap();
        let count = |s: Split| splits.iter().filter(|&&x| x == s).count();
        // Val and Test round 1.5 up to 2 each; Train takes the rest.
        assert_eq!((count(Split::Train), count(Split::Val), count(Split::Test)), (6, 2, 2));
        let few = assign_splits(3, [70.0, 15.0, 15.0], 1).unwrap();
        assert!(Split::ALL.iter().all(|s| few.contains(s)), "{few:?}");
        assert!(assign_splits(2, [70.0, 15.0, 15.0], 1).unwrap_err().to_string().contains("cannot fill 3 splits"));
        assert_eq!(assign_splits(2, [1.0, 0.0, 1.0], 1).unwrap().iter().filter(|&&s| s == Split::Val).count(), 0);
        // The seed decides which cases go where.
        assert_ne!(
            assign_splits(20, [50.0, 25.0, 25.0], 1).unwrap(),
            assign_splits(20, [50.0, 25.0, 25.0], 2).unwrap()
        );
    }

    #[test]
    fn templates_take_only_side_and_size() {
        assert!(check_template("a {size} thing, {side}").is_ok());
        assert!(check_template("a {organ}").unwrap_err().to_string().contains("`{organ}`"));
        assert!(check_template("a {size").is_err());
    }

    #[test]
    fn ids_drop_the_volume_extension() {
        assert_eq!(volume_id(Path::new("a/case_001.nii.gz")), "case_001");
        assert_eq!(volume_id(Path::new("case.NII")), "case");
        assert_eq!(volume_id(Path::new("series_7")), "series_7");
    }

    #[test]
    fn sizes_follow_the_area_share() {
        assert_eq!(size_word(9, 1000), "small");
        assert_eq!(size_word(10, 1000), "medium");
        assert_eq!(size_word(50, 1000), "large");
    }
}
