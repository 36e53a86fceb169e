//! The official dataset layout (LViT / MedCLIPSeg, docs/model.md §7):
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

use super::prompts::{read_prompt_file, PromptRow, IMAGE_COLUMN, MASK_COLUMN};
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
/// Errors: a missing folder or prompt file, a bad prompt row, a name that breaks the path rule of
/// [`SplitFolders::resolve`], an image the prompts list that is not in `img/`, an image without a
/// mask in `label/`.
pub fn open_split(
    root: &Path,
    split: Split,
    percentage: Option<u32>,
    prompts_override: Option<&Path>,
) -> Result<(DatasetIndex, usize)> {
    let folders = SplitFolders::open(root, split)?;
    let prompt_path = match prompts_override {
        Some(path) => path.to_path_buf(),
        None => prompt_file_path(root, split, percentage)?,
    };
    if !prompt_path.is_file() {
        return Err(Error::Invalid(format!("{}: prompt file not found", prompt_path.display())));
    }
    let rows = read_prompt_file(&prompt_path)?;
    let mut items = rows.iter().map(|row| folders.resolve(&prompt_path, row)).collect::<Result<Vec<_>>>()?;
    items.sort_by(|a, b| a.name.cmp(&b.name));
    let listed: HashSet<&str> = rows.iter().map(|r| r.image.as_str()).collect();
    let unlisted = image_files(&folders.images)?.iter().filter(|name| !listed.contains(name.as_str())).count();
    Ok((DatasetIndex { items }, unlisted))
}

/// The folders of one split, and the dataset folder that every file a prompt row names must lie
/// in.
#[derive(Clone, Debug)]
pub struct SplitFolders {
    /// `<root>/<Split>_Folder/img`.
    pub images: PathBuf,
    /// `<root>/<Split>_Folder/label`.
    pub masks: PathBuf,
    /// The dataset folder with every symlink resolved.
    real_root: PathBuf,
}

impl SplitFolders {
    /// Errors: the image or mask folder is missing.
    pub fn open(root: &Path, split: Split) -> Result<Self> {
        let split_folder = root.join(split.folder());
        let images = split_folder.join(IMAGE_FOLDER);
        let masks = split_folder.join(MASK_FOLDER);
        for folder in [&images, &masks] {
            if !folder.is_dir() {
                return Err(Error::Invalid(format!(
                    "{}: folder not found (expected the official layout)",
                    folder.display()
                )));
            }
        }
        let real_root = root.canonicalize().map_err(Error::io(root))?;
        Ok(SplitFolders { images, masks, real_root })
    }

    /// The sample a prompt row names. The path rule: the image and mask names are plain file
    /// names (no absolute path, no `..`, no `/` or `\`), checked before anything is looked up,
    /// and the files they name, symlinks followed, lie inside the dataset folder. Every error
    /// names the prompt file, the row and the value (or the missing file).
    pub fn resolve(&self, prompt_path: &Path, row: &PromptRow) -> Result<Item> {
        let refuse = |column: &str, name: &str, why: String| {
            Error::Invalid(format!("{}: {}, column '{column}': '{name}' {why}", prompt_path.display(), row.location))
        };
        let mask_name = row.mask.as_deref().unwrap_or(&row.image);
        let mask_column = if row.mask.is_some() { MASK_COLUMN } else { IMAGE_COLUMN };
        for (column, name, folder) in
            [(IMAGE_COLUMN, row.image.as_str(), &self.images), (mask_column, mask_name, &self.masks)]
        {
            if let Err(why) = check_file_name(name) {
                return Err(refuse(column, name, format!("is not a file name inside {} ({why})", folder.display())));
            }
        }
        let image_path = self.images.join(&row.image);
        if !image_path.is_file() {
            return Err(Error::Invalid(format!(
                "{}: {} lists image '{}' but {} does not exist",
                prompt_path.display(),
                row.location,
                row.image,
                image_path.display()
            )));
        }
        self.check_inside(&image_path).map_err(|why| refuse(IMAGE_COLUMN, &row.image, why))?;
        let candidates = mask_candidates(&self.masks, mask_name);
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
        self.check_inside(&mask_path).map_err(|why| refuse(mask_column, mask_name, why))?;
        Ok(Item { name: row.image.clone(), image_path, mask_path, prompt: row.description.clone() })
    }

    /// Whether an existing file, symlinks followed, lies inside the dataset folder; the reason
    /// when not.
    fn check_inside(&self, path: &Path) -> std::result::Result<(), String> {
        let real = path.canonicalize().map_err(|e| format!("cannot be resolved: {e}"))?;
        if real.starts_with(&self.real_root) {
            Ok(())
        } else {
            Err(format!(
                "leads outside the dataset folder {} (through a symlink, to {})",
                self.real_root.display(),
                real.display()
            ))
        }
    }
}

/// An image waiting for a label: its file and its prompt (no mask).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptedImage {
    /// The image's file name, as the prompt file lists it.
    pub name: String,
    pub image_path: PathBuf,
    pub prompt: String,
}

/// The images of a plain folder paired with their prompts (`rank --images DIR --prompts FILE`,
/// or a split's `img/` with its prompt file), sorted by name; and the image files in the folder
/// that no row lists, sorted (the caller decides whether that is an error). Masks play no part.
/// Image files are those [`open_split`] counts (png, jpg, jpeg, bmp, tif, tiff; hidden files skipped).
///
/// Errors name the file at fault: a missing folder, one without image files, a missing prompt
/// file, one that lists nothing, a row whose image name breaks the path rule of
/// [`SplitFolders::resolve`] or names a file that is not in the folder (or leads out of it through
/// a symlink), an image listed twice.
pub fn open_prompted_images(folder: &Path, prompt_file: &Path) -> Result<(Vec<PromptedImage>, Vec<String>)> {
    if !folder.is_dir() {
        return Err(Error::Invalid(format!("{}: image folder not found", folder.display())));
    }
    if !prompt_file.is_file() {
        return Err(Error::Invalid(format!("{}: prompt file not found", prompt_file.display())));
    }
    let files = image_files(folder)?;
    if files.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: holds no images (no .png, .jpg, .jpeg, .bmp, .tif or .tiff file)",
            folder.display()
        )));
    }
    let rows = read_prompt_file(prompt_file)?;
    if rows.is_empty() {
        return Err(Error::Invalid(format!("{}: lists no images", prompt_file.display())));
    }
    let real_folder = folder.canonicalize().map_err(Error::io(folder))?;
    let mut listed = HashSet::new();
    let mut images = Vec::with_capacity(rows.len());
    for row in &rows {
        let at = |why: String| {
            Error::Invalid(format!(
                "{}: {}, column '{IMAGE_COLUMN}': '{}' {why}",
                prompt_file.display(),
                row.location,
                row.image
            ))
        };
        check_file_name(&row.image)
            .map_err(|why| at(format!("is not a file name inside {} ({why})", folder.display())))?;
        if !listed.insert(row.image.as_str()) {
            return Err(at("is listed more than once (one prompt per image)".into()));
        }
        let image_path = folder.join(&row.image);
        if !image_path.is_file() {
            return Err(at(format!("names no file: {} does not exist", image_path.display())));
        }
        let real = image_path.canonicalize().map_err(Error::io(&image_path))?;
        if !real.starts_with(&real_folder) {
            return Err(at(format!("leads outside {} (through a symlink, to {})", folder.display(), real.display())));
        }
        images.push(PromptedImage { name: row.image.clone(), image_path, prompt: row.description.clone() });
    }
    images.sort_by(|a, b| a.name.cmp(&b.name));
    let mut unlisted: Vec<String> = files.into_iter().filter(|name| !listed.contains(name.as_str())).collect();
    unlisted.sort();
    Ok((images, unlisted))
}

/// The syntactic half of the path rule: `Ok` for a plain file name, else why not. Runs before
/// the name touches the file system.
pub fn check_file_name(name: &str) -> std::result::Result<(), &'static str> {
    if Path::new(name).is_absolute() || name.starts_with(['/', '\\']) {
        Err("it is an absolute path")
    } else if name.contains(['/', '\\']) {
        Err("it holds a path separator")
    } else if name == ".." || name == "." {
        Err("it names a folder")
    } else if name.contains('\0') {
        Err("it holds a NUL byte")
    } else {
        Ok(())
    }
}

/// The parts of the official layout that already exist under `dir` (split folders and
/// `Prompts_Folder`), by name; empty when `dir` holds no dataset.
pub fn existing_layout_parts(dir: &Path) -> Vec<String> {
    Split::ALL
        .iter()
        .map(|split| split.folder())
        .chain([PROMPTS_FOLDER.to_string()])
        .filter(|name| dir.join(name).exists())
        .collect()
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
