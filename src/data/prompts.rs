//! Prompt files: one text prompt per image, read from an `.xlsx` (the official format), a `.csv`
//! or a `.json` array of objects. Required columns are `Image` and `Description`; the official
//! sheets also carry `Ground Truth`, the mask's file name (it differs from the image's for ISIC),
//! which is used when present.
//!
//! Texts are kept exactly as written (the official sheets end many descriptions with `\n`; the
//! tokenizer cleans them); only the file names are trimmed.
//!
//! Memory stays bounded whatever the file holds: CSV and JSON files are refused above
//! [`MAX_PROMPT_FILE_BYTES`], a workbook whose parts unpack to more than
//! [`MAX_WORKBOOK_UNPACKED_BYTES`], and the cells kept from a sheet are counted against
//! [`MAX_SHEET_TEXT_BYTES`] (a sheet is streamed cell by cell, never laid out as the dense
//! rectangle its two farthest cells span).

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::Path;

use calamine::{Data, DataRef, Reader, Xlsx};

use crate::error::{Error, Result};

pub const IMAGE_COLUMN: &str = "Image";
pub const DESCRIPTION_COLUMN: &str = "Description";
pub const MASK_COLUMN: &str = "Ground Truth";

/// Largest CSV or JSON prompt file read. The largest official sheet (QaTa-COV19's training set,
/// about 7,000 rows) is near 1 MiB as CSV, so this leaves 64 times that, and caps what is held.
pub const MAX_PROMPT_FILE_BYTES: u64 = 64 << 20;

/// Largest total size the parts of an xlsx workbook may unpack to (as their zip directory declares
/// it, which the unzipper enforces). Sheet XML is several times the size of its text, hence four
/// times [`MAX_PROMPT_FILE_BYTES`]; a zip bomb is refused before anything is unpacked.
pub const MAX_WORKBOOK_UNPACKED_BYTES: u64 = 4 * MAX_PROMPT_FILE_BYTES;

/// Most bytes of cell text (plus per-cell bookkeeping) kept from one sheet: many cells can share
/// one long string, so the unpacked size alone does not bound what the cells add up to.
pub const MAX_SHEET_TEXT_BYTES: usize = MAX_PROMPT_FILE_BYTES as usize;

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

/// Reads a prompt file, choosing the format by extension (`xlsx`/`xlsm`, `csv`, `json`). Rows
/// whose cells are all empty are skipped (spreadsheets often end with some). Other spreadsheet
/// formats (`xls`, `xlsb`, `ods`) are refused: calamine reads them only as a dense rectangle, whose
/// size a two-cell file can make arbitrarily large.
pub fn read_prompt_file(path: &Path) -> Result<Vec<PromptRow>> {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match extension.as_str() {
        "xlsx" | "xlsm" => read_spreadsheet(path),
        "csv" => read_csv(path),
        "json" => read_json(path),
        other => Err(Error::Invalid(format!(
            "{}: unknown prompt file type '.{other}' (expected .xlsx, .csv or .json; save other sheets as .xlsx)",
            path.display()
        ))),
    }
}

fn invalid(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {detail}", path.display()))
}

/// A cell as text: integral numbers print without a fraction (a sheet may store `12` for an
/// image called "12"), everything else through calamine's own formatting.
fn cell_text(cell: DataRef) -> String {
    match cell {
        DataRef::Empty => String::new(),
        DataRef::String(s) => s,
        DataRef::SharedString(s) => s.to_string(),
        DataRef::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        other => Data::from(other).to_string(),
    }
}

/// Refuses a file larger than `limit` bytes before it is read.
fn check_file_size(path: &Path, limit: u64) -> Result<()> {
    let size = std::fs::metadata(path).map_err(Error::io(path))?.len();
    if size > limit {
        return Err(invalid(path, format!("{size} bytes is more than a prompt file may hold ({limit} bytes)")));
    }
    Ok(())
}

/// Refuses a workbook whose zip directory declares parts that unpack to more than
/// [`MAX_WORKBOOK_UNPACKED_BYTES`] in all.
fn check_unpacked_size(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| invalid(path, format!("cannot open spreadsheet: not an xlsx (zip) file: {e}")))?;
    let mut total = 0u64;
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| invalid(path, format!("cannot open spreadsheet: {e}")))?;
        total = total.saturating_add(entry.size());
    }
    if total > MAX_WORKBOOK_UNPACKED_BYTES {
        return Err(invalid(
            path,
            format!(
                "the workbook unpacks to {total} bytes, more than a prompt file may ({MAX_WORKBOOK_UNPACKED_BYTES})"
            ),
        ));
    }
    Ok(())
}

/// The non-empty cells of the first worksheet by row, each row's cells as (column, text); the
/// cells are streamed and their text counted against [`MAX_SHEET_TEXT_BYTES`].
///
/// calamine 0.38 panics on some damaged workbooks instead of returning an error (a worksheet
/// dimension that runs backwards overflows a subtraction; found by tests/fuzz_prompts.rs): such a
/// panic is caught and reported as an unreadable worksheet, so a damaged file is never a crash.
fn sheet_cells(path: &Path) -> Result<BTreeMap<u32, Vec<(u32, String)>>> {
    std::panic::catch_unwind(|| stream_sheet_cells(path)).unwrap_or_else(|_| {
        Err(invalid(
            path,
            "cannot read the first worksheet: the spreadsheet reader failed on it (is the file damaged?)",
        ))
    })
}

fn stream_sheet_cells(path: &Path) -> Result<BTreeMap<u32, Vec<(u32, String)>>> {
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut workbook: Xlsx<_> =
        Xlsx::new(BufReader::new(file)).map_err(|e| invalid(path, format!("cannot open spreadsheet: {e}")))?;
    let first =
        workbook.sheet_names().into_iter().next().ok_or_else(|| invalid(path, "the workbook has no worksheet"))?;
    let unreadable = |e: calamine::XlsxError| invalid(path, format!("cannot read the first worksheet: {e}"));
    let mut reader = workbook.worksheet_cells_reader(&first).map_err(unreadable)?;
    let mut rows: BTreeMap<u32, Vec<(u32, String)>> = BTreeMap::new();
    let mut held = 0usize;
    while let Some(cell) = reader.next_cell().map_err(unreadable)? {
        let (row, column) = cell.get_position();
        let text = cell_text(cell.get_value().clone());
        if text.is_empty() {
            continue;
        }
        held += text.len() + std::mem::size_of::<(u32, String)>();
        if held > MAX_SHEET_TEXT_BYTES {
            return Err(invalid(
                path,
                format!("the first worksheet holds more than {MAX_SHEET_TEXT_BYTES} bytes of text"),
            ));
        }
        rows.entry(row).or_default().push((column, text));
    }
    Ok(rows)
}

/// One row's cells laid out in columns `0..width` (cells further right are not needed).
fn dense_row(cells: Vec<(u32, String)>, width: usize) -> Vec<String> {
    let mut row = vec![String::new(); width];
    for (column, text) in cells {
        if let Some(slot) = row.get_mut(column as usize) {
            *slot = text;
        }
    }
    row
}

fn read_spreadsheet(path: &Path) -> Result<Vec<PromptRow>> {
    check_unpacked_size(path)?;
    let mut rows = sheet_cells(path)?.into_iter();
    let header_cells = match rows.next() {
        Some((_, cells)) => cells,
        None => return Err(invalid(path, "the first worksheet is empty (no header row)")),
    };
    let width = header_cells.iter().map(|(column, _)| *column as usize + 1).max().unwrap_or(0);
    let header = dense_row(header_cells, width);
    let body = rows.map(|(row, cells)| (format!("row {}", row as u64 + 1), dense_row(cells, width)));
    rows_from_table(path, &header, body)
}

fn read_csv(path: &Path) -> Result<Vec<PromptRow>> {
    check_file_size(path, MAX_PROMPT_FILE_BYTES)?;
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
    // Rows are counted as a spreadsheet shows them (header = row 1): the reader's line numbers
    // lag one line per row after a CRLF, and a quoted cell spanning lines is still one row.
    let mut body = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let row = i + 2;
        let record = record.map_err(|e| invalid(path, format!("row {row}: malformed CSV: {e}")))?;
        body.push((format!("row {row}"), record.iter().map(str::to_string).collect()));
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
    check_file_size(path, MAX_PROMPT_FILE_BYTES)?;
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
