//! The official dataset layout (LViT / MedCLIPSeg, spec §7):
//!
//! ```text
//! <root>/Train_Folder/{img,label}/    <root>/Prompts_Folder/Train_text.xlsx   (Train_text_{10,25,50}.xlsx)
//! <root>/Val_Folder/{img,label}/      <root>/Prompts_Folder/Val_text.xlsx     (Val_text_{10,25,50}.xlsx)
//! <root>/Test_Folder/{img,label}/     <root>/Prompts_Folder/Test_text.xlsx    (or Test_text_original.xlsx)
//! ```
//!
//! Each prompt row names an image in `img/`; its mask in `label/` is the row's `Ground Truth`
//! file when the sheet has that column, otherwise the same file name (or the same stem as `.png`
//! or `.jpg`). Like the official `DatasetSegmentation`, items are sorted by image name (stable, so
//! duplicated rows stay, in file order).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::prompts::{read_prompt_file, PromptRow};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    /// "Train", "Val" or "Test", as in the folder and prompt-file names.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "Train",
            Split::Val => "Val",
            Split::Test => "Test",
        }
    }

    /// `Train_Folder`, `Val_Folder`, `Test_Folder`.
    pub fn folder(self) -> String {
        format!("{}_Folder", self.name())
    }
}

/// The data percentages the official subsets exist for (100 = the full file).
pub const DATA_PERCENTAGES: [u32; 3] = [10, 25, 50];

pub const PROMPTS_FOLDER: &str = "Prompts_Folder";
pub const IMAGE_FOLDER: &str = "img";
pub const MASK_FOLDER: &str = "label";

/// One sample on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// The image's file name (what the prompt file lists); used to name predictions.
    pub name: String,
    pub image_path: PathBuf,
    pub mask_path: PathBuf,
    pub prompt: String,
}

/// The samples of one split, in the official order (sorted by image name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatasetIndex {
    pub items: Vec<Item>,
}

impl DatasetIndex {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The prompt file the official scripts read for `split`: `Train_text_{p}.xlsx` /
/// `Val_text_{p}.xlsx` for p in 10, 25, 50; the full file for 100 or `None`; the test set is
/// always full (`Test_text.xlsx`, falling back to the official `Test_text_original.xlsx`).
pub fn prompt_file_path(root: &Path, split: Split, percentage: Option<u32>) -> Result<PathBuf> {
    let folder = root.join(PROMPTS_FOLDER);
    let subset = match percentage {
        None | Some(100) => None,
        Some(p) if DATA_PERCENTAGES.contains(&p) => Some(p),
        Some(p) => return Err(Error::Invalid(format!("data percentage {p} is not one of 10, 25, 50, 100"))),
    };
    Ok(match (split, subset) {
        (Split::Test, _) => {
            let plain = folder.join("Test_text.xlsx");
            let original = folder.join("Test_text_original.xlsx");
            if !plain.exists() && original.exists() {
                original
            } else {
                plain
            }
        }
        (_, Some(p)) => folder.join(format!("{}_text_{p}.xlsx", split.name())),
        (_, None) => folder.join(format!("{}_text.xlsx", split.name())),
    })
}

/// Opens one split of a dataset in the official layout. Returns the index and how many images in
/// `img/` no prompt row lists (not an error: the official subsets leave most images out; the
/// caller decides whether to warn).
///
/// Errors: a missing folder or prompt file, a bad prompt row, an image the prompts list that is
/// not in `img/`, an image without a mask in `label/`.
pub fn open_split(
    root: &Path,
    split: Split,
    percentage: Option<u32>,
    prompts_override: Option<&Path>,
) -> Result<(DatasetIndex, usize)> {
    let split_folder = root.join(split.folder());
    let image_folder = split_folder.join(IMAGE_FOLDER);
    let mask_folder = split_folder.join(MASK_FOLDER);
    for folder in [&image_folder, &mask_folder] {
        if !folder.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: folder not found (expected the official layout)",
                folder.display()
            )));
        }
    }
    let prompt_path = match prompts_override {
        Some(path) => path.to_path_buf(),
        None => prompt_file_path(root, split, percentage)?,
    };
    if !prompt_path.is_file() {
        return Err(Error::Invalid(format!("{}: prompt file not found", prompt_path.display())));
    }
    let rows = read_prompt_file(&prompt_path)?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        items.push(item_for_row(&prompt_path, row, &image_folder, &mask_folder)?);
    }
    items.sort_by(|a, b| a.name.cmp(&b.name));
    let listed: HashSet<&str> = rows.iter().map(|r| r.image.as_str()).collect();
    let unlisted = image_files(&image_folder)?.iter().filter(|name| !listed.contains(name.as_str())).count();
    Ok((DatasetIndex { items }, unlisted))
}

fn item_for_row(prompt_path: &Path, row: &PromptRow, image_folder: &Path, mask_folder: &Path) -> Result<Item> {
    let image_path = image_folder.join(&row.image);
    if !image_path.is_file() {
        return Err(Error::Invalid(format!(
            "{}: {} lists image '{}' but {} does not exist",
            prompt_path.display(),
            row.location,
            row.image,
            image_path.display()
        )));
    }
    let mask_name = row.mask.as_deref().unwrap_or(&row.image);
    let candidates = mask_candidates(mask_folder, mask_name);
    let mask_path = candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: no mask for image '{}' ({} of {}); tried {}",
            image_path.display(),
            row.image,
            row.location,
            prompt_path.display(),
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ))
    })?;
    Ok(Item { name: row.image.clone(), image_path, mask_path, prompt: row.description.clone() })
}

/// The mask file as named, then the same stem as PNG and JPEG.
fn mask_candidates(mask_folder: &Path, name: &str) -> Vec<PathBuf> {
    let named = mask_folder.join(name);
    let mut candidates = vec![named.clone()];
    for extension in ["png", "jpg", "jpeg"] {
        let other = named.with_extension(extension);
        if !candidates.contains(&other) {
            candidates.push(other);
        }
    }
    candidates
}

/// Image file names in a folder (hidden files and non-image files such as `Thumbs.db` skipped).
fn image_files(folder: &Path) -> Result<Vec<String>> {
    let is_image = |name: &str| {
        let lower = name.to_ascii_lowercase();
        !name.starts_with('.') && [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"].iter().any(|e| lower.ends_with(e))
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(Error::io(folder))? {
        let entry = entry.map_err(Error::io(folder))?;
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            if let Some(name) = entry.file_name().to_str().filter(|n| is_image(n)) {
                names.push(name.to_string());
            }
        }
    }
    Ok(names)
}
