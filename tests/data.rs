//! The data layer: cv2/PIL-exact pre-processing and augmentation, prompt files, the official
//! layout and every bad-data case, the synthetic dataset, and loader determinism.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mcs_engine::data::synthetic::{self, LesionSize, Position};
use mcs_engine::data::*;
use mcs_engine::Error;

/// A fresh, empty folder under the system temp dir, unique per test and process.
fn scratch(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mcs-data-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn message(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e.to_string(),
    }
}

/// The test pattern the cv2/PIL fixtures below were made from (same formula in Python).
fn pattern(width: usize, height: usize, channels: usize) -> Image8 {
    let mut data = Vec::with_capacity(width * height * channels);
    for y in 0..height {
        for x in 0..width {
            for c in 0..channels {
                data.push(((x * 73 + y * 151 + c * 29 + x * y * 17) % 256) as u8);
            }
        }
    }
    Image8::from_raw(width, height, channels, data).unwrap()
}

// Produced by opencv-python-headless 5.0.0 (4.14.0 gives the same bytes) and Pillow 13.0:
//   src = pattern(5, 4, 3); cv2.resize(src, (w, h)).ravel()
//   g = pattern(9, 7, 1)[..., 0]; np.array(Image.fromarray(g).rotate(angle)).ravel()
const CV2_LINEAR_5X4_TO_3X2: &[u8] =
    &[103, 89, 118, 111, 140, 169, 161, 105, 91, 117, 146, 175, 97, 126, 155, 161, 190, 134];
const CV2_LINEAR_5X4_TO_8X7: &[u8] = &[
    0, 29, 58, 32, 61, 90, 77, 106, 136, 123, 152, 181, 169, 198, 147, 214, 243, 32, 116, 145, 62, 36, 65, 94, 54, 83,
    112, 88, 77, 106, 132, 76, 104, 124, 125, 154, 145, 174, 152, 195, 224, 98, 151, 129, 86, 114, 52, 81, 140, 169,
    198, 179, 104, 133, 220, 26, 55, 127, 81, 110, 108, 137, 160, 163, 192, 204, 209, 104, 125, 239, 31, 59, 99, 128,
    157, 141, 114, 143, 187, 96, 125, 89, 78, 107, 70, 99, 128, 132, 161, 190, 193, 150, 107, 237, 138, 39, 57, 86,
    115, 96, 125, 154, 138, 168, 197, 57, 87, 116, 45, 74, 103, 101, 130, 159, 168, 197, 92, 215, 244, 36, 143, 172,
    201, 123, 151, 181, 98, 127, 156, 115, 144, 172, 108, 137, 166, 79, 108, 137, 143, 171, 149, 194, 223, 161, 197,
    226, 255, 139, 168, 197, 73, 102, 131, 150, 179, 208, 148, 177, 206, 65, 94, 123, 127, 156, 185, 181, 210, 239,
];
const CV2_LINEAR_5X4_TO_7X3: &[u8] = &[
    25, 54, 83, 68, 73, 102, 110, 109, 138, 134, 163, 192, 188, 217, 94, 151, 162, 69, 72, 59, 88, 99, 128, 157, 155,
    111, 140, 152, 89, 118, 40, 69, 98, 110, 139, 168, 180, 154, 128, 237, 138, 39, 172, 201, 230, 119, 148, 177, 102,
    131, 160, 158, 187, 216, 92, 121, 150, 118, 147, 158, 187, 216, 202,
];
const PIL_ROTATE_9X7_BY_13: &[u8] = &[
    0, 0, 219, 36, 109, 182, 13, 103, 0, 73, 146, 165, 165, 255, 89, 176, 27, 134, 151, 241, 4, 111, 218, 69, 176, 41,
    165, 46, 153, 189, 57, 181, 49, 173, 55, 196, 197, 65, 118, 3, 144, 29, 170, 69, 227, 92, 233, 118, 205, 107, 9, 9,
    164, 83, 0, 243, 145, 232, 151, 70, 245, 0, 0,
];
const PIL_ROTATE_9X7_BY_MINUS_20: &[u8] = &[
    0, 151, 241, 75, 219, 36, 0, 0, 0, 46, 46, 153, 75, 165, 255, 109, 182, 255, 197, 65, 189, 111, 218, 69, 179, 179,
    13, 92, 233, 118, 57, 181, 49, 176, 27, 134, 145, 47, 47, 3, 144, 29, 173, 41, 165, 57, 232, 151, 107, 9, 167, 55,
    196, 196, 0, 0, 0, 70, 245, 167, 69, 227, 0,
];

// ---------------------------------------------------------------- resize

#[test]
fn linear_resize_matches_opencv_fixtures() {
    let src = pattern(5, 4, 3);
    for (width, height, want) in
        [(3, 2, CV2_LINEAR_5X4_TO_3X2), (8, 7, CV2_LINEAR_5X4_TO_8X7), (7, 3, CV2_LINEAR_5X4_TO_7X3)]
    {
        let got = resize_linear(&src, width, height).unwrap();
        assert_eq!((got.width, got.height, got.channels), (width, height, 3));
        assert_eq!(got.data, want, "5x4 -> {width}x{height}");
    }
}

#[test]
fn linear_resize_hand_computed_fixed_point() {
    // 2x1 -> 3x1 (the height stays 1, so the vertical pass has weights 2048/0):
    // x=0: f = 0.5·(2/3) − 0.5 < 0 → pinned to pixel 0 → 0.
    // x=1: f = 1.5·(2/3) − 0.5 = 0.5 → weights 1024/1024, S = 1024·255 = 261120;
    //      ((2048·(S>>4))>>16 + 2)>>2 = (510 + 2)>>2 = 128 (a float bilinear gives 127.5).
    // x=2: f = 1.1667 → beyond the last pixel → pinned to pixel 1 → 255.
    let src = Image8::from_raw(2, 1, 3, vec![0, 0, 0, 255, 255, 255]).unwrap();
    let got = resize_linear(&src, 3, 1).unwrap();
    assert_eq!(got.data, [0, 0, 0, 128, 128, 128, 255, 255, 255]);

    // Exactly half size: every output is ((a + b + c + d + 2) >> 2) of its 2x2 block (what cv2's
    // INTER_AREA shortcut for this case computes too): (10 + 20 + 30 + 41 + 2) >> 2 = 25.
    let src = Image8::from_raw(2, 2, 1, vec![10, 20, 30, 41]).unwrap();
    assert_eq!(resize_linear(&src, 1, 1).unwrap().data, [25]);
}

#[test]
fn linear_resize_is_identity_at_equal_size() {
    let src = pattern(13, 11, 3);
    assert_eq!(resize_linear(&src, 13, 11).unwrap(), src);
}

#[test]
fn nearest_resize_uses_floor_without_half_pixel_offset() {
    let src = Image8::from_raw(5, 1, 1, vec![10, 11, 12, 13, 14]).unwrap();
    // floor(x · 5/3) = 0, 1, 3
    assert_eq!(resize_nearest(&src, 3, 1).unwrap().data, [10, 11, 13]);
    // floor(x · 5/8) = 0, 0, 1, 1, 2, 3, 3, 4
    assert_eq!(resize_nearest(&src, 8, 1).unwrap().data, [10, 10, 11, 11, 12, 13, 13, 14]);
    let column = Image8::from_raw(1, 3, 1, vec![1, 2, 3]).unwrap();
    // floor(y · 3/7) = 0, 0, 0, 1, 1, 2, 2
    assert_eq!(resize_nearest(&column, 1, 7).unwrap().data, [1, 1, 1, 2, 2, 3, 3]);
    let src = pattern(6, 4, 1);
    assert_eq!(resize_nearest(&src, 6, 4).unwrap(), src);
}

#[test]
fn resize_refuses_empty_sizes() {
    let src = pattern(3, 3, 3);
    assert!(message(resize_linear(&src, 0, 4)).contains("3x3"));
    assert!(resize_nearest(&src, 4, 0).is_err());
}

// ---------------------------------------------------------------- rotation

#[test]
fn rotation_matches_pillow_fixtures() {
    let src = pattern(9, 7, 1);
    assert_eq!(rotate_nearest(&src, 13.0).data, PIL_ROTATE_9X7_BY_13);
    assert_eq!(rotate_nearest(&src, -20.0).data, PIL_ROTATE_9X7_BY_MINUS_20);
}

#[test]
fn rotation_by_zero_is_identity_and_quarter_turn_is_counter_clockwise() {
    let src = pattern(4, 4, 3);
    assert_eq!(rotate_nearest(&src, 0.0), src);
    // Counter-clockwise quarter turn of a square: output (x, y) shows input (W-1-y, x), so the
    // top-right corner moves to the top left.
    let turned = rotate_nearest(&src, 90.0);
    for y in 0..4 {
        for x in 0..4 {
            for c in 0..3 {
                assert_eq!(turned.get(x, y, c), src.get(3 - y, x, c), "pixel ({x}, {y}) channel {c}");
            }
        }
    }
    // A 3x2 canvas keeps its shape; column 2 comes from outside the source and is black.
    let small = Image8::from_raw(3, 2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
    assert_eq!(rotate_nearest(&small, 90.0).data, [3, 6, 0, 2, 5, 0]);
    assert_eq!(rotate_nearest(&small, 180.0).data, [6, 5, 4, 3, 2, 1]);
}

#[test]
fn positive_angles_move_points_right_of_centre_upwards() {
    let mut src = Image8::zeros(41, 41, 1);
    // A 3x3 block 15 px right of the centre (a single pixel could be skipped by the inverse map).
    for y in 19..22 {
        for x in 34..37 {
            src.data[y * 41 + x] = 255;
        }
    }
    let turned = rotate_nearest(&src, 20.0);
    let lit: Vec<(usize, usize)> = (0..41 * 41).filter(|&i| turned.data[i] == 255).map(|i| (i % 41, i / 41)).collect();
    assert!(!lit.is_empty());
    for (x, y) in lit {
        // 15 px at 20 degrees counter-clockwise lands near (34.6, 15.4) in image coordinates.
        assert!(y < 19 && x > 30, "the block went to ({x}, {y})");
    }
}

#[test]
fn rotation_draws_are_pure_and_balanced() {
    let draws: Vec<Option<i32>> = (0..4000).map(|i| rotation_for(666, 3, i)).collect();
    let again: Vec<Option<i32>> = (0..4000).map(|i| rotation_for(666, 3, i)).collect();
    assert_eq!(draws, again);
    let rotated: Vec<i32> = draws.iter().flatten().copied().collect();
    // Binomial(4000, 0.5) has a standard deviation of about 32; 200 is over 6 of them.
    assert!((rotated.len() as i64 - 2000).abs() < 200, "{} of 4000 rotated", rotated.len());
    assert!(rotated.iter().all(|a| (-20..=20).contains(a)));
    assert!(rotated.contains(&-20) && rotated.contains(&20) && rotated.contains(&0));
    let next_epoch: Vec<Option<i32>> = (0..4000).map(|i| rotation_for(666, 4, i)).collect();
    assert_ne!(draws, next_epoch);
}

// ---------------------------------------------------------------- decoding and normalisation

fn write_rgb_png(path: &Path, width: u32, height: u32, rgb: &[u8]) {
    image::RgbImage::from_raw(width, height, rgb.to_vec()).unwrap().save(path).unwrap();
}

fn write_grey_png(path: &Path, width: u32, height: u32, grey: &[u8]) {
    image::GrayImage::from_raw(width, height, grey.to_vec()).unwrap().save(path).unwrap();
}

#[test]
fn images_decode_to_bgr_and_grey_like_cv2_imread() {
    let dir = scratch("decode");
    let colour = dir.join("colour.png");
    // R, G, B pixels: red, green, blue, and (99, 201, 37).
    write_rgb_png(&colour, 2, 2, &[255, 0, 0, 0, 255, 0, 0, 0, 255, 99, 201, 37]);
    assert_eq!(read_bgr(&colour).unwrap().data, [0, 0, 255, 0, 255, 0, 255, 0, 0, 37, 201, 99]);
    // cv2.imread(colour, 0) on this file gives these (opencv-python 5.0 and 4.14).
    assert_eq!(read_grey(&colour).unwrap().data, [76, 149, 29, 151]);
    let grey = dir.join("grey.png");
    write_grey_png(&grey, 2, 1, &[7, 200]);
    let bgr = read_bgr(&grey).unwrap();
    assert_eq!((bgr.channels, bgr.data.as_slice()), (3, &[7, 7, 7, 200, 200, 200][..]));
}

#[test]
fn normalisation_is_imagenet_statistics_on_bgr_planes() {
    // One pixel B = 255, G = 0, R = 128 (the order in memory after cv2.imread).
    let image = Image8::from_raw(1, 1, 3, vec![255, 0, 128]).unwrap();
    let got = normalise_bgr(&image).unwrap();
    let want = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128.0 / 255.0 - 0.406) / 0.225];
    for (plane, (&g, &w)) in got.iter().zip(&want).enumerate() {
        // f32 arithmetic against an f64 reference: a few ulps of values near 2.
        assert!((g as f64 - w).abs() < 1e-6, "plane {plane}: {g} vs {w}");
    }
    // Planar layout: [B plane, G plane, R plane].
    let two = Image8::from_raw(2, 1, 3, vec![255, 0, 0, 0, 0, 255]).unwrap();
    let planes = normalise_bgr(&two).unwrap();
    assert!(planes[0] > 2.0 && planes[1] < -2.0 && planes[4] < -1.5 && planes[5] > 2.0, "{planes:?}");
    assert!(message(normalise_bgr(&Image8::zeros(1, 1, 1))).contains("3-channel"));
}

#[test]
fn masks_are_binarised_at_127() {
    let mut mask = Image8::from_raw(4, 1, 1, vec![0, 126, 127, 255]).unwrap();
    binarise_mask(&mut mask);
    assert_eq!(mask.data, [0, 0, 1, 1]);
}

#[test]
fn truncated_and_unreadable_images_name_the_file() {
    let dir = scratch("truncated");
    let good = dir.join("good.png");
    write_rgb_png(&good, 8, 8, &[90; 8 * 8 * 3]);
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.join("truncated.png");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let text = dir.join("notes.png");
    std::fs::write(&text, "not an image").unwrap();
    for path in [&truncated, &text] {
        let error = message(read_bgr(path));
        assert!(error.contains(&path.display().to_string()), "{error}");
    }
    assert!(message(read_grey(&dir.join("absent.png"))).contains("absent.png"));
}

// ---------------------------------------------------------------- prompt files

fn rows(pairs: &[(&str, &str)]) -> Vec<PromptRow> {
    pairs
        .iter()
        .map(|&(image, description)| PromptRow {
            image: image.into(),
            description: description.into(),
            mask: None,
            location: String::new(),
        })
        .collect()
}

fn image_and_text(rows: &[PromptRow]) -> Vec<(String, String)> {
    rows.iter().map(|r| (r.image.clone(), r.description.clone())).collect()
}

fn write_xlsx(path: &Path, header: &[&str], body: &[&[&str]]) {
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook.add_worksheet();
    for (col, name) in header.iter().enumerate() {
        sheet.write_string(0, col as u16, *name).unwrap();
    }
    for (r, row) in body.iter().enumerate() {
        for (col, cell) in row.iter().enumerate() {
            if !cell.is_empty() {
                sheet.write_string(r as u32 + 1, col as u16, *cell).unwrap();
            }
        }
    }
    workbook.save(path).unwrap();
}

#[test]
fn prompt_files_round_trip_in_xlsx_csv_and_json() {
    let dir = scratch("prompts");
    let want =
        rows(&[("a.png", "one small lesion\n"), ("b.png", "Polyp visible, \"quoted\"."), ("c.png", " two  spaces ")]);
    let xlsx = dir.join("p.xlsx");
    write_prompt_xlsx(&xlsx, &want).unwrap();
    let got = read_prompt_file(&xlsx).unwrap();
    assert_eq!(image_and_text(&got), image_and_text(&want));
    // The writer fills `Ground Truth` with the image name; the reader picks it up as the mask.
    assert_eq!(got[1].mask.as_deref(), Some("b.png"));
    assert_eq!(got[2].location, "row 4");

    let csv = dir.join("p.csv");
    let mut writer = csv::Writer::from_path(&csv).unwrap();
    writer.write_record(["Image", "Description"]).unwrap();
    for row in &want {
        writer.write_record([&row.image, &row.description]).unwrap();
    }
    writer.flush().unwrap();
    drop(writer);
    let got = read_prompt_file(&csv).unwrap();
    assert_eq!(image_and_text(&got), image_and_text(&want));
    assert!(got.iter().all(|r| r.mask.is_none()));

    let json = dir.join("p.json");
    let entries: Vec<serde_json::Value> =
        want.iter().map(|r| serde_json::json!({"Image": r.image, "Description": r.description})).collect();
    std::fs::write(&json, serde_json::to_string(&entries).unwrap()).unwrap();
    assert_eq!(image_and_text(&read_prompt_file(&json).unwrap()), image_and_text(&want));
}

#[test]
fn official_sheets_with_ground_truth_and_trailing_empty_rows_are_read() {
    let dir = scratch("sheet");
    let path = dir.join("Train_text.xlsx");
    let body: &[&[&str]] = &[
        &["ISIC_1.png", "one large brown oval melanoma\n", "ISIC_1_Segmentation.png"],
        &["ISIC_2.png", "one small red round melanoma\n", ""],
        &["", "", ""],
    ];
    write_xlsx(&path, &["Image", "Description", "Ground Truth"], body);
    let got = read_prompt_file(&path).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].mask.as_deref(), Some("ISIC_1_Segmentation.png"));
    assert_eq!(got[1].mask, None);
    assert_eq!(got[0].description, "one large brown oval melanoma\n");
}

#[test]
fn bad_prompt_files_name_file_row_and_column() {
    let dir = scratch("bad-prompts");
    let no_description = dir.join("no_description.xlsx");
    write_xlsx(&no_description, &["Image", "Text"], &[&["a.png", "x"]]);
    let error = message(read_prompt_file(&no_description));
    assert!(error.contains("no_description.xlsx") && error.contains("'Description'"), "{error}");

    let empty_text = dir.join("empty_text.xlsx");
    write_xlsx(&empty_text, &["Image", "Description"], &[&["a.png", "fine"], &["b.png", "   "]]);
    let error = message(read_prompt_file(&empty_text));
    assert!(
        error.contains("empty_text.xlsx")
            && error.contains("row 3")
            && error.contains("Description")
            && error.contains("b.png"),
        "{error}"
    );

    let no_image = dir.join("no_image.csv");
    std::fs::write(&no_image, "Image,Description\n,some text\n").unwrap();
    let error = message(read_prompt_file(&no_image));
    assert!(error.contains("no_image.csv") && error.contains("row 2") && error.contains("'Image'"), "{error}");

    let missing_columns = dir.join("missing.csv");
    std::fs::write(&missing_columns, "File,Prompt\na.png,x\n").unwrap();
    assert!(message(read_prompt_file(&missing_columns)).contains("no 'Image' column"));

    let json = dir.join("bad.json");
    std::fs::write(&json, r#"[{"Image": "a.png", "Description": "ok"}, {"Image": "b.png"}]"#).unwrap();
    let error = message(read_prompt_file(&json));
    assert!(error.contains("bad.json") && error.contains("element [1]") && error.contains("Description"), "{error}");

    let garbage = dir.join("garbage.xlsx");
    std::fs::write(&garbage, "this is not a zip archive").unwrap();
    assert!(message(read_prompt_file(&garbage)).contains("garbage.xlsx"));
    assert!(message(read_prompt_file(&dir.join("prompts.txt"))).contains("unknown prompt file type"));
}

// ---------------------------------------------------------------- official layout

/// A two-image Train split written by hand: `a.png` and `b.png`, masks of the same names.
fn tiny_layout(name: &str) -> PathBuf {
    let root = scratch(name);
    let split = root.join("Train_Folder");
    for sub in ["img", "label"] {
        std::fs::create_dir_all(split.join(sub)).unwrap();
    }
    for (file, shade) in [("a.png", 40u8), ("b.png", 200)] {
        write_rgb_png(&split.join("img").join(file), 6, 4, &[shade; 6 * 4 * 3]);
        let mask: Vec<u8> = (0..24).map(|i| if i % 6 < 3 { 255 } else { 0 }).collect();
        write_grey_png(&split.join("label").join(file), 6, 4, &mask);
    }
    let prompts = root.join("Prompts_Folder");
    std::fs::create_dir_all(&prompts).unwrap();
    write_xlsx(
        &prompts.join("Train_text.xlsx"),
        &["Image", "Description"],
        &[&["b.png", "second"], &["a.png", "first"]],
    );
    root
}

#[test]
fn open_split_reads_the_official_layout_sorted_by_name() {
    let root = tiny_layout("layout");
    let (index, unlisted) = open_split(&root, Split::Train, None, None).unwrap();
    assert_eq!(unlisted, 0);
    let names: Vec<&str> = index.items.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["a.png", "b.png"]);
    assert_eq!(index.items[0].prompt, "first");
    let sample = index.load(1, 4).unwrap();
    assert_eq!((sample.image.width, sample.image.channels), (4, 3));
    assert_eq!(sample.image.data[0], 200);
    // Mask columns 0..3 of 6 are 255: after nearest resize to 4 wide, floor(x·6/4) < 3 for x < 2.
    assert_eq!(&sample.mask.data[..4], &[1, 1, 0, 0]);
}

#[test]
fn percentages_and_overrides_choose_the_prompt_file() {
    let root = tiny_layout("percent");
    let prompts = root.join("Prompts_Folder");
    write_xlsx(&prompts.join("Train_text_25.xlsx"), &["Image", "Description"], &[&["a.png", "subset"]]);
    let (index, unlisted) = open_split(&root, Split::Train, Some(25), None).unwrap();
    assert_eq!((index.len(), unlisted), (1, 1));
    assert_eq!(index.items[0].prompt, "subset");
    assert_eq!(open_split(&root, Split::Train, Some(100), None).unwrap().0.len(), 2);
    assert!(message(open_split(&root, Split::Train, Some(30), None)).contains("30"));
    assert!(message(open_split(&root, Split::Train, Some(10), None)).contains("Train_text_10.xlsx"));
    let custom = root.join("custom.json");
    std::fs::write(&custom, r#"[{"Image": "b.png", "Description": "from json"}]"#).unwrap();
    let (index, unlisted) = open_split(&root, Split::Train, None, Some(&custom)).unwrap();
    assert_eq!((index.items[0].prompt.as_str(), unlisted), ("from json", 1));
    assert_eq!(
        prompt_file_path(&root, Split::Test, Some(10)).unwrap(),
        root.join("Prompts_Folder").join("Test_text.xlsx"),
        "the test set is always the full file"
    );
}

#[test]
fn listed_but_absent_images_and_missing_masks_are_errors() {
    let root = tiny_layout("absent");
    let prompts = root.join("Prompts_Folder").join("Train_text.xlsx");
    write_xlsx(&prompts, &["Image", "Description"], &[&["a.png", "first"], &["ghost.png", "nobody"]]);
    let error = message(open_split(&root, Split::Train, None, None));
    assert!(error.contains("ghost.png") && error.contains("row 3"), "{error}");

    let root = tiny_layout("no-mask");
    std::fs::remove_file(root.join("Train_Folder/label/b.png")).unwrap();
    let error = message(open_split(&root, Split::Train, None, None));
    assert!(error.contains("no mask") && error.contains("b.png"), "{error}");

    let root = tiny_layout("no-folder");
    assert!(message(open_split(&root, Split::Val, None, None)).contains("Val_Folder"));
}

#[test]
fn masks_with_another_extension_are_found_by_stem() {
    let root = tiny_layout("stem");
    let label = root.join("Train_Folder/label");
    std::fs::rename(label.join("a.png"), label.join("a.jpg")).unwrap();
    // A PNG-encoded file named .jpg still decodes: the decoder looks at the bytes.
    let (index, _) = open_split(&root, Split::Train, None, None).unwrap();
    assert_eq!(index.items[0].mask_path, label.join("a.jpg"));
}

#[test]
fn unlisted_images_are_counted_not_fatal() {
    let root = tiny_layout("unlisted");
    let img = root.join("Train_Folder/img");
    write_rgb_png(&img.join("extra.png"), 6, 4, &[1; 72]);
    std::fs::write(img.join(".DS_Store"), "x").unwrap();
    let (index, unlisted) = open_split(&root, Split::Train, None, None).unwrap();
    assert_eq!((index.len(), unlisted), (2, 1));
}

#[test]
fn mask_size_mismatch_and_corrupt_images_fail_on_load_naming_files() {
    let root = tiny_layout("mismatch");
    write_grey_png(&root.join("Train_Folder/label/a.png"), 5, 4, &[0; 20]);
    std::fs::write(root.join("Train_Folder/img/b.png"), b"\x89PNG\r\n\x1a\n broken").unwrap();
    let (index, _) = open_split(&root, Split::Train, None, None).unwrap();
    let error = message(index.load(0, 8));
    assert!(
        error.contains("a.png") && error.contains("6x4") && error.contains("5x4") && error.contains("label"),
        "{error}"
    );
    let error = message(index.load(1, 8));
    assert!(error.contains("img") && error.contains("b.png"), "{error}");
    // Through the loader a failure arrives as that batch's Err, and later batches still come.
    write_rgb_png(&root.join("Train_Folder/img/b.png"), 6, 4, &[9; 72]);
    let loader = Loader::new(Arc::new(index), LoaderConfig::eval(1, 8, 2)).unwrap();
    let results: Vec<bool> = loader.epoch(0).map(|b| b.is_ok()).collect();
    assert_eq!(results, [false, true]);
}

// ---------------------------------------------------------------- synthetic dataset

#[test]
fn synthetic_samples_are_reproducible() {
    let a = generate(7, 6, 96);
    let b = generate(7, 6, 96);
    assert_eq!(a, b);
    let other_seed = generate(8, 6, 96);
    assert!(a.iter().zip(&other_seed).all(|(x, y)| x.image != y.image));
    // Sample ids, not list positions, decide a sample: the split ranges rely on it.
    assert_eq!(synthetic::generate_range(7, 4, 2, 96), a[4..].to_vec());
}

fn centroid(mask: &Image8) -> (f64, f64) {
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
    for y in 0..mask.height {
        for x in 0..mask.width {
            if mask.get(x, y, 0) == 1 {
                sx += x as f64 + 0.5;
                sy += y as f64 + 0.5;
                n += 1.0;
            }
        }
    }
    (sx / n, sy / n)
}

#[test]
fn synthetic_mask_is_exactly_the_described_lesion() {
    let samples = generate(666, 120, 96);
    let mut lesion_counts = [0usize; 4];
    for s in &samples {
        let count = s.lesions.len();
        assert!((1..=3).contains(&count), "{}: {count} lesions", s.name);
        lesion_counts[count] += 1;
        let described = &s.lesions[s.described];
        for y in 0..96 {
            for x in 0..96 {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                assert_eq!(s.mask.get(x, y, 0) == 1, described.contains(px, py), "{} pixel ({x}, {y})", s.name);
                for (i, other) in s.lesions.iter().enumerate() {
                    assert!(
                        i == s.described || !(other.contains(px, py) && described.contains(px, py)),
                        "{}: lesions overlap",
                        s.name
                    );
                }
            }
        }
        let positions: std::collections::HashSet<Position> = s.lesions.iter().map(|l| l.position).collect();
        assert_eq!(positions.len(), count, "{}: positions repeat", s.name);
        assert_eq!(s.prompt, described.prompt());
    }
    assert!(lesion_counts[1..].iter().all(|&c| c > 10), "lesions per image: {lesion_counts:?}");
}

#[test]
fn synthetic_prompt_words_match_the_mask() {
    for s in generate(3, 150, 96) {
        let words: Vec<&str> = s.prompt.split(' ').flat_map(|w| w.split_inclusive('-')).collect();
        for word in &words {
            let word = word.trim_end_matches('-');
            assert!(WORDS.contains(&word), "'{word}' of \"{}\" is not in WORDS", s.prompt);
        }
        assert!(s.prompt.starts_with("one ") && s.prompt.ends_with(" of the image"), "{}", s.prompt);
        let (cx, cy) = centroid(&s.mask);
        let phrase = s.prompt.split(" at the ").nth(1).unwrap().trim_end_matches(" of the image");
        let (want_left, want_top) = match phrase {
            "top left" => (Some(true), Some(true)),
            "top right" => (Some(false), Some(true)),
            "bottom left" => (Some(true), Some(false)),
            "bottom right" => (Some(false), Some(false)),
            "center" => (None, None),
            other => panic!("unexpected position phrase {other}"),
        };
        match (want_left, want_top) {
            (Some(left), Some(top)) => {
                assert!((cx < 48.0) == left && (cy < 48.0) == top, "{}: centroid ({cx}, {cy})", s.prompt)
            }
            _ => assert!((cx - 48.0).abs() < 8.0 && (cy - 48.0).abs() < 8.0, "{}: centroid ({cx}, {cy})", s.prompt),
        }
        // Size words order the areas: radius ranges 6-9, 11-14, 16-20 px (ovals and irregular
        // outlines are thinner than their largest radius, hence the loose bounds).
        let area = s.mask.data.iter().filter(|&&v| v == 1).count() as f64;
        let (low, high) = s.lesions[s.described].size.radius_range();
        let circle = |r: f64| std::f64::consts::PI * r * r;
        assert!(area <= circle(high + 1.0) && area >= 0.25 * circle(low), "{}: area {area}", s.prompt);
        assert!(s.prompt.contains(s.lesions[s.described].size.word()));
    }
}

#[test]
fn synthetic_lesions_are_clearly_darker_than_tissue() {
    for s in generate(11, 40, 96) {
        let lesion = &s.lesions[s.described];
        let mut inner = Vec::new();
        let mut ring = Vec::new();
        for y in 0..96 {
            for x in 0..96 {
                let q = lesion.relative_radius(x as f64 + 0.5, y as f64 + 0.5);
                let v = s.image.get(x, y, 0) as f64;
                if q < 0.6 {
                    inner.push(v);
                } else if (1.3..1.6).contains(&q)
                    && s.lesions.iter().all(|l| !l.contains(x as f64 + 0.5, y as f64 + 0.5))
                {
                    ring.push(v);
                }
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (inside, around) = (mean(&inner), mean(&ring));
        assert!(inside < 0.45 * around, "{}: lesion mean {inside:.1} vs surrounding tissue {around:.1}", s.name);
    }
}

#[test]
fn synthetic_lesion_sizes_scale_with_the_image() {
    let small = generate(5, 30, 96);
    let large = generate(5, 30, 192);
    for (a, b) in small.iter().zip(&large) {
        assert_eq!(a.prompt, b.prompt, "the same draws at both sizes");
        let (ra, rb) = (a.lesions[a.described].radius, b.lesions[b.described].radius);
        assert!((rb / ra - 2.0).abs() < 1e-9, "radius {ra} at 96 px, {rb} at 192 px");
    }
    assert!(large.iter().all(|s| s.image.width == 192 && s.mask.data.len() == 192 * 192));
    let sizes: std::collections::HashSet<LesionSize> = small.iter().map(|s| s.lesions[s.described].size).collect();
    assert_eq!(sizes.len(), 3);
}

#[test]
fn synthetic_layout_round_trips_through_open_split() {
    let root = scratch("synthetic-layout");
    write_official_layout(&root, 21, 64, 20, 8, 6).unwrap();
    let splits = synthetic_splits(21, 64, 20, 8, 6).unwrap();
    for (split, memory) in [(Split::Train, &splits.train), (Split::Val, &splits.val), (Split::Test, &splits.test)] {
        let (index, unlisted) = open_split(&root, split, None, None).unwrap();
        assert_eq!((index.len(), unlisted), (memory.len(), 0), "{split:?}");
        for (i, want) in memory.samples().iter().enumerate() {
            let got = index.load(i, 64).unwrap();
            assert_eq!((&got.name, &got.prompt), (&want.name, &want.prompt));
            assert_eq!(got.image, want.image, "{split:?} {}: PNG round trip is lossless", want.name);
            assert_eq!(got.mask, want.mask, "{split:?} {}", want.name);
        }
    }
    // Subsets are the first rows of the full sheet; the rest of img/ counts as unlisted.
    let (subset, unlisted) = open_split(&root, Split::Train, Some(25), None).unwrap();
    assert_eq!((subset.len(), unlisted), (5, 15));
    let (subset, unlisted) = open_split(&root, Split::Train, Some(10), None).unwrap();
    assert_eq!((subset.len(), unlisted), (2, 18));
    assert_eq!(open_split(&root, Split::Val, Some(50), None).unwrap().0.len(), 4);
}

// ---------------------------------------------------------------- loader

fn synthetic_source(count: usize) -> Arc<dyn SampleSource> {
    Arc::new(synthetic_splits(9, 32, count, 0, 0).unwrap().train)
}

fn all_batches(loader: &Loader, epoch: u64) -> Vec<Batch> {
    loader.epoch(epoch).collect::<Result<Vec<_>, _>>().unwrap()
}

#[test]
fn loader_output_does_not_depend_on_worker_count() {
    let source = synthetic_source(23);
    let batches =
        |workers| all_batches(&Loader::new(source.clone(), LoaderConfig::train(5, 32, 666, workers)).unwrap(), 2);
    let inline = batches(0);
    assert_eq!(inline.len(), 5);
    assert_eq!(batches(1), inline);
    assert_eq!(batches(3), inline);
    assert_eq!(batches(8), inline);
}

#[test]
fn loader_shuffles_per_epoch_without_dropping_the_last_batch() {
    let source = synthetic_source(23);
    let loader = Loader::new(source, LoaderConfig::train(5, 32, 666, 2)).unwrap();
    let epoch0 = all_batches(&loader, 0);
    let sizes: Vec<usize> = epoch0.iter().map(Batch::len).collect();
    assert_eq!(sizes, [5, 5, 5, 5, 3]);
    let mut seen: Vec<usize> = epoch0.iter().flat_map(|b| b.indices.clone()).collect();
    let order = seen.clone();
    seen.sort();
    assert_eq!(seen, (0..23).collect::<Vec<_>>(), "every sample once per epoch");
    assert_ne!(order, (0..23).collect::<Vec<_>>(), "shuffled");
    let epoch1: Vec<usize> = all_batches(&loader, 1).iter().flat_map(|b| b.indices.clone()).collect();
    assert_ne!(order, epoch1, "a new order each epoch");
    assert_eq!(epoch_order(23, 666, 0, true), order);
    let b = &epoch0[4];
    assert_eq!((b.pixels.len(), b.masks.len(), b.prompts.len(), b.image_size), (3 * 3 * 32 * 32, 3 * 32 * 32, 3, 32));
    assert!(b.masks.iter().all(|&m| m == 0.0 || m == 1.0));
}

#[test]
fn loader_augments_training_batches_only() {
    let source = synthetic_source(12);
    let eval = all_batches(&Loader::new(source.clone(), LoaderConfig::eval(12, 32, 2)).unwrap(), 0);
    assert_eq!(eval[0].indices, (0..12).collect::<Vec<_>>());
    let mut config = LoaderConfig::train(12, 32, 666, 2);
    config.shuffle = false;
    let train = all_batches(&Loader::new(source.clone(), config.clone()).unwrap(), 0);
    let plane = 3 * 32 * 32;
    for i in 0..12 {
        let same = eval[0].pixels[i * plane..(i + 1) * plane] == train[0].pixels[i * plane..(i + 1) * plane];
        let rotation = rotation_for(config.seed, 0, i);
        assert_eq!(same, rotation.is_none() || rotation == Some(0), "sample {i}, rotation {rotation:?}");
        // The image and the mask turn together: equal to rotating the raw sample by hand.
        let raw = source.load(i, 32).unwrap();
        let (pixels, mask) = prepare_sample(&raw, rotation).unwrap();
        assert_eq!(pixels, train[0].pixels[i * plane..(i + 1) * plane]);
        assert_eq!(mask, train[0].masks[i * 1024..(i + 1) * 1024]);
    }
}

#[test]
fn in_memory_sources_check_their_samples() {
    let image = Image8::zeros(4, 4, 3);
    let bad_mask = Image8::from_raw(4, 4, 1, vec![255; 16]).unwrap();
    let sample = RawSample { image: image.clone(), mask: bad_mask, prompt: "p".into(), name: "n".into() };
    assert!(message(InMemoryDataset::new(vec![sample])).contains("0 or 1"));
    let wrong_size = RawSample { image, mask: Image8::zeros(3, 4, 1), prompt: "p".into(), name: "n".into() };
    assert!(message(InMemoryDataset::new(vec![wrong_size])).contains("do not pair"));
    assert!(Loader::new(synthetic_source(2), LoaderConfig::eval(0, 32, 0)).is_err());
}
