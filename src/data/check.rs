//! The dataset check that `mcs-engine check` prints and `train --data` runs before its first step:
//! per split, the prompt file reads (right columns, no bad row), every row names files inside the
//! split by the path rule ([`SplitFolders::resolve`]), every image's header decodes, every mask
//! decodes, has its image's size and passes the label rule ([`read_mask`]).
//!
//! Images are only opened as far as their header (the size), which keeps the check fast; masks
//! are decoded in full because their values are checked. Nothing decoded is kept, so memory does
//! not grow with the dataset.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::layout::{prompt_file_path, Split, SplitFolders, PROMPTS_FOLDER};
use super::preprocess::read_mask;
use super::prompts::{read_prompt_file, PromptRow};
use crate::imaging::check_image_file;
use crate::limits::DEFAULT_MAX_PIXELS;

/// What the check found in one split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitCheck {
    pub split: Split,
    /// The prompt file whose rows were checked.
    pub prompts: PathBuf,
    /// Images the prompt file lists (0 when it could not be read).
    pub images: usize,
    /// Of those, the ones whose image and mask passed every check.
    pub ok: usize,
    /// One sentence per problem, naming the file at fault and why.
    pub problems: Vec<String>,
    /// Foreground pixels over the masks that passed (a split with none trains on nothing).
    pub foreground_pixels: u64,
}

impl SplitCheck {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks one split against the prompt file the official scripts read for it (see
/// [`prompt_file_path`]; `percentage` picks a training subset). Never fails: whatever is wrong is
/// a problem in the result.
pub fn check_split(root: &Path, split: Split, percentage: Option<u32>) -> SplitCheck {
    let mut check =
        SplitCheck { split, prompts: PathBuf::new(), images: 0, ok: 0, problems: Vec::new(), foreground_pixels: 0 };
    let opened = prompt_file_path(root, split, percentage).map_err(|e| e.to_string()).and_then(|prompts| {
        check.prompts = prompts.clone();
        let folders = SplitFolders::open(root, split).map_err(|e| e.to_string())?;
        Ok((folders, read_rows(&prompts)?))
    });
    let (folders, rows) = match opened {
        Ok(opened) => opened,
        Err(problem) => {
            check.problems.push(problem);
            return check;
        }
    };
    check.images = rows.len();
    let prompts = &check.prompts;
    let results: Vec<Result<u64, String>> = rows.par_iter().map(|row| check_row(&folders, prompts, row)).collect();
    for result in results {
        match result {
            Ok(foreground) => {
                check.ok += 1;
                check.foreground_pixels += foreground;
            }
            Err(problem) => check.problems.push(problem),
        }
    }
    check
}

/// The other prompt files of `split` in `Prompts_Folder` (`<Split>_text_*.xlsx`: the training
/// subsets, the test prompt styles), in name order.
pub fn other_prompt_files(root: &Path, split: Split, checked: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}_text_", split.name());
    let Ok(entries) = std::fs::read_dir(root.join(PROMPTS_FOLDER)) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&prefix) && name.to_ascii_lowercase().ends_with(".xlsx") && path != checked
        })
        .collect();
    files.sort();
    files
}

/// Checks that a further prompt file of `split` reads and that each row names files inside the
/// split (the images themselves are decoded by [`check_split`] through the main file); returns the
/// problems.
pub fn check_prompt_file(root: &Path, split: Split, prompts: &Path) -> Vec<String> {
    let folders = match SplitFolders::open(root, split) {
        Ok(folders) => folders,
        Err(e) => return vec![e.to_string()],
    };
    match read_rows(prompts) {
        Ok(rows) => rows.iter().filter_map(|row| folders.resolve(prompts, row).err().map(|e| e.to_string())).collect(),
        Err(problem) => vec![problem],
    }
}

fn read_rows(prompts: &Path) -> Result<Vec<PromptRow>, String> {
    if !prompts.is_file() {
        return Err(format!("{}: prompt file not found", prompts.display()));
    }
    read_prompt_file(prompts).map_err(|e| e.to_string())
}

/// One row: the path rule, the image's header, the mask's values and size. Returns the mask's
/// foreground pixels.
fn check_row(folders: &SplitFolders, prompts: &Path, row: &PromptRow) -> Result<u64, String> {
    let item = folders.resolve(prompts, row).map_err(|e| e.to_string())?;
    // The header only, with the same pixel limit that training's reading of the image applies.
    let (width, height) = check_image_file(&item.image_path, DEFAULT_MAX_PIXELS).map_err(|e| e.to_string())?;
    let (width, height) = (width as usize, height as usize);
    let mask = read_mask(&item.mask_path).map_err(|e| e.to_string())?;
    if (mask.width, mask.height) != (width, height) {
        return Err(format!(
            "{} is {width}x{height} but its mask {} is {}x{}",
            item.image_path.display(),
            item.mask_path.display(),
            mask.width,
            mask.height
        ));
    }
    Ok(mask.data.iter().filter(|&&v| v != 0).count() as u64)
}
