//! Prompt files: one text prompt per image, read from an `.xlsx` (the official format), a `.csv`
//! or a `.json` array of objects. Required columns are `Image` and `Description`; the official
//! sheets also carry `Ground Truth`, the mask's file name (it differs from the image's for ISIC),
//! which is used when present.
//!
//! Texts are kept exactly as written (the official sheets end many descriptions with `\n`; the
//! tokenizer cleans them); only the file names are trimmed.

use std::path::Path;

use calamine::{Data, Reader};

use crate::error::{Error, Result};

pub const IMAGE_COLUMN: &str = "Image";
pub const DESCRIPTION_COLUMN: &str = "Description";
pub const MASK_COLUMN: &str = "Ground Truth";

/// One row of a prompt file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptRow {
    /// File name of the image inside `img/`.
    pub image: String,
    /// The text prompt, untouched.
    pub description: String,
    /// File name of the mask inside `label/`, when the file says it (`Ground Truth` column).
    pub mask: Option<String>,
    /// Where the row is in its file, for messages: "row 7" (spreadsheet numbering, header = row 1)
    /// or "element [5]" (JSON).
    pub location: String,
}

/// Reads a prompt file, choosing the format by extension (`xlsx`/`xlsm`/`xls`/`ods`, `csv`,
/// `json`). Rows whose cells are all empty are skipped (spreadsheets often end with some).
pub fn read_prompt_file(path: &Path) -> Result<Vec<PromptRow>> {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match extension.as_str() {
        "xlsx" | "xlsm" | "xls" | "xlsb" | "ods" => read_spreadsheet(path),
        "csv" => read_csv(path),
        "json" => read_json(path),
        other => Err(Error::Invalid(format!(
            "{}: unknown prompt file type '.{other}' (expected .xlsx, .csv or .json)",
            path.display()
        ))),
    }
}

fn invalid(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {detail}", path.display()))
}

/// A cell as text: integral numbers print without a fraction (a sheet may store `12` for an
/// image called "12"), everything else through calamine's own formatting.
fn cell_text(cell: &Data) -> String {
    match cell {
        Data::Empty => String::new(),
        Data::String(s) => s.clone(),
        Data::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", *f as i64),
        other => other.to_string(),
    }
}

fn read_spreadsheet(path: &Path) -> Result<Vec<PromptRow>> {
    let mut workbook =
        calamine::open_workbook_auto(path).map_err(|e| invalid(path, format!("cannot open spreadsheet: {e}")))?;
    let range = workbook
        .worksheet_range_at(0)
        .ok_or_else(|| invalid(path, "the workbook has no worksheet"))?
        .map_err(|e| invalid(path, format!("cannot read the first worksheet: {e}")))?;
    let first_row = range.start().map(|(row, _)| row as usize).unwrap_or(0);
    let mut rows = range.rows().enumerate();
    let header = match rows.next() {
        Some((_, cells)) => cells.iter().map(cell_text).collect::<Vec<_>>(),
        None => return Err(invalid(path, "the first worksheet is empty (no header row)")),
    };
    let body = rows.map(|(i, cells)| (format!("row {}", first_row + i + 1), cells.iter().map(cell_text).collect()));
    rows_from_table(path, &header, body)
}

fn read_csv(path: &Path) -> Result<Vec<PromptRow>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| invalid(path, format!("cannot open CSV: {e}")))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| invalid(path, format!("cannot read the CSV header: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let mut body = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| invalid(path, format!("malformed CSV: {e}")))?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        body.push((format!("row {line}"), record.iter().map(str::to_string).collect()));
    }
    rows_from_table(path, &header, body)
}

fn column(path: &Path, header: &[String], name: &str) -> Result<Option<usize>> {
    let matches: Vec<usize> =
        header.iter().enumerate().filter(|(_, h)| h.trim().eq_ignore_ascii_case(name)).map(|(i, _)| i).collect();
    match matches.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(invalid(path, format!("column '{name}' appears {} times in the header", matches.len()))),
    }
}

fn required_column(path: &Path, header: &[String], name: &str) -> Result<usize> {
    column(path, header, name)?.ok_or_else(|| {
        invalid(
            path,
            format!(
                "no '{name}' column (the header row has: {})",
                header.iter().map(|h| format!("'{h}'")).collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

fn rows_from_table(
    path: &Path,
    header: &[String],
    body: impl IntoIterator<Item = (String, Vec<String>)>,
) -> Result<Vec<PromptRow>> {
    let image_at = required_column(path, header, IMAGE_COLUMN)?;
    let description_at = required_column(path, header, DESCRIPTION_COLUMN)?;
    let mask_at = column(path, header, MASK_COLUMN)?;
    let mut rows = Vec::new();
    for (location, cells) in body {
        if cells.iter().all(|c| c.trim().is_empty()) {
            continue;
        }
        let cell = |at: usize| cells.get(at).cloned().unwrap_or_default();
        let mask = mask_at.map(|at| cell(at).trim().to_string()).filter(|m| !m.is_empty());
        rows.push(checked_row(path, location, cell(image_at), cell(description_at), mask)?);
    }
    Ok(rows)
}

fn checked_row(
    path: &Path,
    location: String,
    image: String,
    description: String,
    mask: Option<String>,
) -> Result<PromptRow> {
    let image = image.trim().to_string();
    if image.is_empty() {
        return Err(invalid(path, format!("{location}, column '{IMAGE_COLUMN}': empty image name")));
    }
    if description.trim().is_empty() {
        return Err(invalid(path, format!("{location}, column '{DESCRIPTION_COLUMN}': empty description for {image}")));
    }
    Ok(PromptRow { image, description, mask, location })
}

fn read_json(path: &Path) -> Result<Vec<PromptRow>> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(path, format!("not valid JSON: {e}")))?;
    let entries = value.as_array().ok_or_else(|| invalid(path, "expected a JSON array of objects"))?;
    let mut rows = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let location = format!("element [{i}]");
        let object = entry.as_object().ok_or_else(|| invalid(path, format!("{location} is not an object")))?;
        let text_field = |name: &str, required: bool| -> Result<Option<String>> {
            match object.get(name) {
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
                Some(serde_json::Value::Null) | None if !required => Ok(None),
                None => Err(invalid(path, format!("{location}, column '{name}': missing"))),
                Some(other) => {
                    Err(invalid(path, format!("{location}, column '{name}': expected a string, found {other}")))
                }
            }
        };
        let image = text_field(IMAGE_COLUMN, true)?.unwrap_or_default();
        let description = text_field(DESCRIPTION_COLUMN, true)?.unwrap_or_default();
        let mask = text_field(MASK_COLUMN, false)?.map(|m| m.trim().to_string()).filter(|m| !m.is_empty());
        rows.push(checked_row(path, location, image, description, mask)?);
    }
    Ok(rows)
}

/// Writes rows as the official sheets are laid out: columns `Image`, `Description`,
/// `Ground Truth` (the mask name, or the image name when the row has none).
pub fn write_prompt_xlsx(path: &Path, rows: &[PromptRow]) -> Result<()> {
    let failed = |e: rust_xlsxwriter::XlsxError| invalid(path, format!("cannot write spreadsheet: {e}"));
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook.add_worksheet();
    for (col, name) in [IMAGE_COLUMN, DESCRIPTION_COLUMN, MASK_COLUMN].into_iter().enumerate() {
        sheet.write_string(0, col as u16, name).map_err(failed)?;
    }
    for (i, row) in rows.iter().enumerate() {
        let line = i as u32 + 1;
        sheet.write_string(line, 0, &row.image).map_err(failed)?;
        sheet.write_string(line, 1, &row.description).map_err(failed)?;
        sheet.write_string(line, 2, row.mask.as_deref().unwrap_or(&row.image)).map_err(failed)?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    }
    workbook.save(path).map_err(failed)
}
