//! Fuzzing the prompt-file readers (issue 20): arbitrary bytes and mutated valid files as CSV,
//! JSON and xlsx. Whatever the bytes, the reader returns rows or an error naming the file; it never
//! panics. Case counts are bounded so the whole file runs in seconds.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use mcs_engine::data::{read_prompt_file, write_prompt_xlsx, PromptRow};
use proptest::prelude::*;

/// Cases per property: a few hundred reads of small files take well under a second each.
const CASES: u32 = 256;

fn config() -> ProptestConfig {
    // No regression files written into the source tree; a failure prints its input.
    ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() }
}

/// Writes `bytes` to a fresh file with `extension`, reads it as a prompt file and checks the
/// outcome: rows, or an error whose message names the file.
fn read_back(extension: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mcs-fuzz-prompts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join(format!("case{n}.{extension}"));
    std::fs::write(&path, bytes).unwrap();
    let result = read_prompt_file(&path);
    std::fs::remove_file(&path).unwrap();
    if let Err(e) = result {
        let message = e.to_string();
        prop_assert!(message.contains(&format!("case{n}.{extension}")), "the error does not name the file: {message}");
        prop_assert!(!message.trim().is_empty());
    }
    Ok(())
}

const VALID_CSV: &str =
    "Image,Description,Ground Truth\r\na.png,\"one small lesion, \"\"upper\"\" left\n\",a_mask.png\r\n\
                         b.png,two lesions,\r\n,,\r\n";

const VALID_JSON: &str = r#"[{"Image": "a.png", "Description": "one lesion\n", "Ground Truth": "a_mask.png"},
{"Image": 12, "Description": "two lesions", "Ground Truth": null}, {"Image": "c.png", "Description": "x"}]"#;

/// A small workbook as `synth` writes them.
fn valid_xlsx() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("mcs-fuzz-valid-{}.xlsx", std::process::id()));
        let rows: Vec<PromptRow> = ["a.png", "b.png", "c.png"]
            .iter()
            .map(|name| PromptRow {
                image: name.to_string(),
                description: format!("one lesion in {name}\n"),
                mask: None,
                location: String::new(),
            })
            .collect();
        write_prompt_xlsx(&path, &rows).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        bytes
    })
}

/// The parts of the workbook whose XML calamine parses.
const XLSX_PARTS: [&str; 5] = [
    "xl/worksheets/sheet1.xml",
    "xl/sharedStrings.xml",
    "xl/workbook.xml",
    "xl/_rels/workbook.xml.rels",
    "[Content_Types].xml",
];

/// The valid workbook with one part mutated and the archive packed again (stored), so that the
/// edits get past the zip's checksums to the XML parser.
fn repacked(part: &str, edits: &[Edit], keep: u16) -> Vec<u8> {
    repacked_with(part, |bytes| mutate(bytes, edits, keep))
}

/// The valid workbook with `part` changed by `change` and the archive packed again (stored).
fn repacked_with(part: &str, change: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    use std::io::{Cursor, Read, Write};
    let mut archive = zip::ZipArchive::new(Cursor::new(valid_xlsx())).unwrap();
    let mut packed = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut found = false;
    for i in 0..archive.len() {
        let mut file = archive.by_index(i).unwrap();
        let name = file.name().unwrap().to_string();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        if name == part {
            bytes = change(&bytes);
            found = true;
        }
        packed.start_file(name, stored).unwrap();
        packed.write_all(&bytes).unwrap();
    }
    assert!(found, "the workbook has no part {part}");
    packed.finish().unwrap().into_inner()
}

/// A worksheet whose dimension runs backwards (`B3:A1`): calamine 0.38 subtracts the corners
/// unchecked and panics on it in a build with overflow checks (found by the test below in CI). It
/// is an error naming the file, never a panic.
#[test]
fn a_worksheet_dimension_that_runs_backwards_is_an_error() {
    let backwards = repacked_with("xl/worksheets/sheet1.xml", |bytes| {
        let xml = String::from_utf8(bytes.to_vec()).unwrap();
        let start = xml.find("<dimension ref=\"").expect("the sheet has a dimension") + "<dimension ref=\"".len();
        let end = start + xml[start..].find('"').unwrap();
        format!("{}B3:A1{}", &xml[..start], &xml[end..]).into_bytes()
    });
    let outcome = std::panic::catch_unwind(|| read_back("xlsx", &backwards));
    assert!(outcome.is_ok(), "reading the workbook panicked");
}

/// One edit of a byte string: replace, insert or delete at a position (taken modulo the length).
#[derive(Clone, Debug)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
}

/// Bytes that matter to CSV and JSON syntax, mixed with any byte.
fn edit_byte() -> impl Strategy<Value = u8> {
    prop_oneof![prop::sample::select(b"\",\r\n{}[]:\\0-e. <>/=&;\xff\xfe".to_vec()), any::<u8>()]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), edit_byte()).prop_map(|(at, b)| Edit::Replace(at, b)),
        (any::<usize>(), edit_byte()).prop_map(|(at, b)| Edit::Insert(at, b)),
        any::<usize>().prop_map(Edit::Delete),
    ]
}

/// `valid` with `edits` applied and then cut to `keep` of its length (in per-mille; 1000 keeps all).
fn mutate(valid: &[u8], edits: &[Edit], keep: u16) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    for edit in edits {
        let len = bytes.len().max(1);
        match *edit {
            Edit::Replace(at, b) if !bytes.is_empty() => bytes[at % len] = b,
            Edit::Insert(at, b) => bytes.insert(at % (bytes.len() + 1), b),
            Edit::Delete(at) if !bytes.is_empty() => {
                bytes.remove(at % len);
            }
            _ => {}
        }
    }
    bytes.truncate(bytes.len() * keep.min(1000) as usize / 1000);
    bytes
}

/// Cut length in per-mille: most cases keep the whole file, some are truncated.
fn keep() -> impl Strategy<Value = u16> {
    prop_oneof![3 => Just(1000u16), 1 => 0u16..1000]
}

#[test]
fn the_valid_seeds_read() {
    // The mutations start from files that read, so they probe the readers beyond the first byte.
    read_back("csv", VALID_CSV.as_bytes()).unwrap();
    read_back("json", VALID_JSON.as_bytes()).unwrap();
    let dir = std::env::temp_dir().join(format!("mcs-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in [("p.csv", VALID_CSV.as_bytes()), ("p.json", VALID_JSON.as_bytes()), ("p.xlsx", valid_xlsx())]
    {
        std::fs::write(dir.join(name), bytes).unwrap();
        assert_eq!(read_prompt_file(&dir.join(name)).unwrap().len(), 3 - usize::from(name == "p.csv"), "{name}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_as_csv(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        read_back("csv", &bytes)?;
    }

    #[test]
    fn arbitrary_bytes_as_json(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        read_back("json", &bytes)?;
    }

    #[test]
    fn arbitrary_bytes_as_xlsx(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        read_back("xlsx", &bytes)?;
    }

    #[test]
    fn mutated_csv(edits in prop::collection::vec(edit(), 1..8), keep in keep()) {
        read_back("csv", &mutate(VALID_CSV.as_bytes(), &edits, keep))?;
    }

    #[test]
    fn mutated_json(edits in prop::collection::vec(edit(), 1..8), keep in keep()) {
        read_back("json", &mutate(VALID_JSON.as_bytes(), &edits, keep))?;
    }

    #[test]
    fn mutated_xlsx(edits in prop::collection::vec(edit(), 1..8), keep in keep()) {
        read_back("xlsx", &mutate(valid_xlsx(), &edits, keep))?;
    }

    #[test]
    fn xlsx_with_a_mutated_part(
        part in prop::sample::select(XLSX_PARTS.to_vec()),
        edits in prop::collection::vec(edit(), 1..8),
        keep in keep(),
    ) {
        read_back("xlsx", &repacked(part, &edits, keep))?;
    }
}
