//! Files that a crash must never leave half-written: single files written through a temporary
//! file and a rename, and whole folders (checkpoints, model folders) written beside their final
//! place and swapped in by renames, with the repair of a swap cut short between its two renames.
//! The lowest layer of the crate's file handling: it knows nothing of models or training.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a crash
/// leaves either the old file or the new one, never a torn one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let file_name = path.file_name().ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let temp: PathBuf = dir.join(format!(".{}.partial-{}", file_name.to_string_lossy(), std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&temp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        Error::Io { path: path.to_path_buf(), source: e }
    })
}

/// Runs `write` on a fresh sibling folder of `dest`, then swaps it in for `dest`.
pub fn write_folder_atomically(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (parent, name) = split_folder(dest)?;
    std::fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
    // Half-written folders of a run that was killed mid-save (any process id) are dropped.
    let partial_prefix = format!(".{name}.partial-");
    for entry in std::fs::read_dir(&parent).map_err(Error::io(&parent))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&partial_prefix) {
            let stale = entry.path();
            std::fs::remove_dir_all(&stale).map_err(Error::io(&stale))?;
        }
    }
    let tmp = parent.join(format!("{partial_prefix}{}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(Error::io(&tmp))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = retired_path(&parent, &name);
    if dest.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(Error::io(&old))?;
        }
        std::fs::rename(dest, &old).map_err(Error::io(dest))?;
    }
    std::fs::rename(&tmp, dest).map_err(Error::io(dest))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(Error::io(&old))?;
    }
    Ok(())
}

fn split_folder(dest: &Path) -> Result<(PathBuf, String)> {
    let name = dest
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a folder path", dest.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    Ok((parent, name))
}

/// Where the previous version of `name` waits while the new one is renamed in.
fn retired_path(parent: &Path, name: &str) -> PathBuf {
    parent.join(format!(".{name}.previous"))
}

/// The checkpoint folder to read for `dir`: `dir` itself, or — when a swap was cut short
/// between its two renames — the previous version kept beside it, which is moved back.
pub fn recover_folder(dir: &Path) -> Result<PathBuf> {
    if dir.is_dir() {
        return Ok(dir.to_path_buf());
    }
    let (parent, name) = split_folder(dir)?;
    let old = retired_path(&parent, &name);
    if old.is_dir() {
        std::fs::rename(&old, dir).map_err(Error::io(dir))?;
        return Ok(dir.to_path_buf());
    }
    Err(Error::Invalid(format!("{}: no such checkpoint folder", dir.display())))
}
