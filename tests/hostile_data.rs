//! Hostile and careless datasets (issue 20): names that leave the dataset, results that would be
//! overwritten, masks stored as 0/1 or with stray values, a resume onto another run, CRLF prompt
//! files, prompt files that would exhaust memory, and the `check` command. Each bad input goes to
//! the library or the `mcs-engine` binary, and the test asserts the refusal and its message.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/png.rs"]
mod png;

use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicUsize, Ordering};

use cli::{run, s, Outcome};
use mcs_engine::data::{load_pair, open_split, read_grey, read_mask, read_prompt_file, resize_nearest, Split};

/// Asserts a refusal as the CLI gives it: exit code 1, every needle in stderr, no panic.
fn assert_refused(run: &Outcome, needles: &[&str]) {
    assert_eq!(run.code, Some(1), "expected exit code 1; stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    for needle in needles {
        assert!(run.stderr.contains(needle), "stderr lacks {needle:?}:\n{}", run.stderr);
    }
}

/// A fresh, empty folder under the system temp dir, unique per test and process.
fn scratch(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mcs-hostile-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn error_of<T: std::fmt::Debug>(result: mcs_engine::Result<T>) -> String {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------- prompt files

#[test]
fn crlf_csv_names_the_right_row() {
    let dir = scratch("crlf");
    let path = dir.join("prompts.csv");
    // Row 1 is the header; rows 2 and 3 are fine; row 4 has no image name.
    std::fs::write(&path, "Image,Description\r\na.png,first\r\nb.png,second\r\n,third\r\nd.png,fourth\r\n").unwrap();
    let error = error_of(read_prompt_file(&path));
    assert!(error.contains("prompts.csv") && error.contains("row 4,") && error.contains("'Image'"), "{error}");
    // A quoted description spanning two lines is still one row: the bad row after it is row 4 too.
    std::fs::write(&path, "Image,Description\r\na.png,\"two\r\nlines\"\r\nb.png,x\r\nc.png,\" \"\r\n").unwrap();
    let error = error_of(read_prompt_file(&path));
    assert!(error.contains("row 4,") && error.contains("c.png"), "{error}");
}

#[test]
fn a_sheet_spanning_the_whole_grid_is_read_in_bounded_memory() {
    // Two cells at opposite corners of the grid: read as a dense rectangle this is 17 billion
    // cells (hundreds of GB); streamed it is three rows.
    let dir = scratch("corners");
    let path = dir.join("corners.xlsx");
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.write_string(0, 0, "Image").unwrap();
    sheet.write_string(0, 1, "Description").unwrap();
    sheet.write_string(1, 0, "a.png").unwrap();
    sheet.write_string(1, 1, "one lesion").unwrap();
    sheet.write_string(1_048_575, 16_383, "far away").unwrap();
    workbook.save(&path).unwrap();
    let rows = read_prompt_file(&path).unwrap();
    assert_eq!(rows.len(), 1, "the far cell lies outside the header's columns: {rows:?}");
    assert_eq!((rows[0].image.as_str(), rows[0].location.as_str()), ("a.png", "row 2"));
}

#[test]
fn oversized_and_legacy_prompt_files_are_refused_up_front() {
    let dir = scratch("oversized");
    let big = dir.join("big.json");
    let file = std::fs::File::create(&big).unwrap();
    // Sparse: no disk used, but the size is past the limit.
    file.set_len(mcs_engine::data::prompts::MAX_PROMPT_FILE_BYTES + 1).unwrap();
    let error = error_of(read_prompt_file(&big));
    assert!(error.contains("big.json") && error.contains("more than a prompt file may hold"), "{error}");
    let ods = dir.join("prompts.ods");
    std::fs::write(&ods, "whatever").unwrap();
    let error = error_of(read_prompt_file(&ods));
    assert!(error.contains("prompts.ods") && error.contains("'.ods'") && error.contains(".xlsx"), "{error}");
}

#[test]
fn a_workbook_that_unpacks_past_the_limit_is_refused_before_unpacking() {
    use std::io::Write;
    let dir = scratch("bomb");
    let path = dir.join("bomb.xlsx");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(1));
    zip.start_file("xl/sharedStrings.xml", options).unwrap();
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..=(mcs_engine::data::prompts::MAX_WORKBOOK_UNPACKED_BYTES >> 20) {
        zip.write_all(&chunk).unwrap();
    }
    zip.finish().unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() < 4 << 20, "the test bomb should be small on disk");
    let error = error_of(read_prompt_file(&path));
    assert!(error.contains("bomb.xlsx") && error.contains("unpacks to"), "{error}");
}

// ---------------------------------------------------------------- datasets on disk

/// `synth` writes a dataset of 96 px images (train, val, test images) into `dir`.
fn synth(dir: &Path, train: usize, val: usize, test: usize) {
    let (train, val, test) = (train.to_string(), val.to_string(), test.to_string());
    let run = run(&["synth", "--out", s(dir), "--train", &train, "--val", &val, "--test", &test]);
    assert_eq!(run.code, Some(0), "synth failed: {}", run.stderr);
}

fn label_files(root: &Path, split: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(root.join(split).join("label")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// Rewrites every mask of a split through `map` (grey values in, grey values out).
fn remap_masks(root: &Path, split: &str, map: impl Fn(usize, u8) -> u8) {
    for path in label_files(root, split) {
        let grey = image::open(&path).unwrap().to_luma8();
        let (w, h) = grey.dimensions();
        let data: Vec<u8> = grey.as_raw().iter().enumerate().map(|(i, &v)| map(i, v)).collect();
        image::GrayImage::from_raw(w, h, data).unwrap().save(&path).unwrap();
    }
}

fn write_xlsx(path: &Path, rows: &[[&str; 2]]) {
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.write_string(0, 0, "Image").unwrap();
    sheet.write_string(0, 1, "Description").unwrap();
    for (i, [image, text]) in rows.iter().enumerate() {
        sheet.write_string(i as u32 + 1, 0, *image).unwrap();
        sheet.write_string(i as u32 + 1, 1, *text).unwrap();
    }
    workbook.save(path).unwrap();
}

/// `train` of the tiny model for `epochs` on `data` into `out`, with `extra` arguments.
fn train(data: &Path, out: &Path, epochs: &str, extra: &[&str]) -> Outcome {
    let mut args =
        vec!["train", "--data", s(data), "--config", "tiny", "--epochs", epochs, "--out", s(out), "--workers", "1"];
    args.extend_from_slice(extra);
    run(&args)
}

// ---------------------------------------------------------------- 1. paths stay inside the dataset

#[test]
fn names_that_leave_the_split_are_refused_with_file_row_and_value() {
    let root = scratch("paths");
    synth(&root.join("data"), 1, 1, 2);
    let data = root.join("data");
    let img = data.join("Test_Folder/img");
    let first = std::fs::read_dir(&img).unwrap().next().unwrap().unwrap().file_name().into_string().unwrap();
    std::fs::write(root.join("secret.png"), std::fs::read(img.join(&first)).unwrap()).unwrap();
    let prompts = data.join("Prompts_Folder/Test_text.xlsx");
    for bad in ["../../secret.png", "/etc/passwd", "sub/a.png", "..\\secret.png", ".."] {
        write_xlsx(&prompts, &[[&first, "one lesion"], [bad, "one lesion"]]);
        let error = error_of(open_split(&data, Split::Test, None, None));
        assert!(
            error.contains("Test_text.xlsx") && error.contains("row 3") && error.contains(&format!("'{bad}'")),
            "{bad}: {error}"
        );
        assert!(error.contains("is not a file name inside"), "{bad}: {error}");
    }
    // A symlink inside img/ that leads out of the dataset folder.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.join("secret.png"), img.join("link.png")).unwrap();
        write_xlsx(&prompts, &[["link.png", "one lesion"]]);
        let error = error_of(open_split(&data, Split::Test, None, None));
        assert!(
            error.contains("row 2") && error.contains("'link.png'") && error.contains("outside the dataset"),
            "{error}"
        );
        std::fs::remove_file(img.join("link.png")).unwrap();
    }
    // predict --prompts follows the same rule, through the CLI: exit code 1 and the named row.
    let csv = root.join("mine.csv");
    std::fs::write(&csv, format!("Image,Description\n{first},one lesion\n../../secret.png,one lesion\n")).unwrap();
    let out = root.join("maps");
    let run = run(&["predict", "--config", "tiny", "--data", s(&data), "--prompts", s(&csv), "--out", s(&out)]);
    assert_refused(&run, &["mine.csv", "row 3", "'../../secret.png'"]);
    assert!(!out.exists(), "predict wrote maps although its prompt file was refused");
}

// ---------------------------------------------------------------- 2. nothing overwritten

#[test]
fn synth_refuses_a_folder_that_holds_a_dataset_unless_forced() {
    let root = scratch("synth-twice");
    let data = root.join("data");
    synth(&data, 2, 1, 1);
    let sheet = data.join("Prompts_Folder/Train_text.xlsx");
    let before = std::fs::read(&sheet).unwrap();
    let again = run(&["synth", "--out", s(&data), "--train", "3", "--val", "1", "--test", "1", "--seed", "5"]);
    assert_refused(&again, &[s(&data), "already holds a dataset", "Train_Folder", "Prompts_Folder", "--force"]);
    assert_eq!(std::fs::read(&sheet).unwrap(), before, "the refused synth changed the dataset");
    let forced = run(&["synth", "--out", s(&data), "--train", "3", "--val", "1", "--test", "1", "--force"]);
    assert_eq!(forced.code, Some(0), "{}", forced.stderr);
    assert_eq!(read_prompt_file(&sheet).unwrap().len(), 3);
}

#[test]
fn train_out_must_be_a_writable_folder_before_the_first_step() {
    let root = scratch("train-out");
    let data = root.join("data");
    synth(&data, 2, 1, 1);
    let file = root.join("results.txt");
    std::fs::write(&file, "my notes").unwrap();
    let run = train(&data, &file, "1", &[]);
    assert_refused(&run, &["results.txt", "exists and is not a folder"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "my notes");
    assert!(!run.stderr.contains("loss"), "it trained before refusing: {}", run.stderr);

    // A folder that cannot be written (root ignores permissions, so that half needs a plain user).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let locked = root.join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(locked.join("try"), b"x").is_ok() {
            eprintln!("skip: running as root, a read-only folder is writable");
        } else {
            let run = train(&data, &locked.join("run"), "1", &[]);
            assert_refused(&run, &["locked"]);
            assert!(!run.stderr.contains("loss"), "it trained before refusing: {}", run.stderr);
        }
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

// ---------------------------------------------------------------- 3. labels a hospital has

#[test]
fn zero_one_masks_are_read_as_background_and_foreground_with_one_note() {
    let root = scratch("zero-one");
    let data = root.join("data");
    synth(&data, 3, 2, 1);
    let masks = label_files(&data, "Train_Folder");
    let official = read_mask(&masks[0]).unwrap();
    for split in ["Train_Folder", "Val_Folder", "Test_Folder"] {
        remap_masks(&data, split, |_, v| u8::from(v == 255));
    }
    // The same foreground as the 0/255 mask, not all background.
    let zero_one = read_mask(&masks[0]).unwrap();
    assert!(zero_one.data.contains(&1));
    assert_eq!(zero_one, official);
    // `check` reads every mask of three splits and says how 0/1 masks are read, once.
    let run = run(&["check", "--data", s(&data)]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stderr.matches("note: masks under").count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("store 0 and 1") && run.stderr.contains("reading 0 as background"), "{}", run.stderr);
}

#[test]
fn official_0_255_masks_are_read_bit_identically() {
    let root = scratch("official");
    // Values straddling the threshold in a 0/255 mask, resized nearest from 7x5 to 4x4.
    let mask: Vec<u8> = (0..35).map(|i| if (i * 7) % 3 == 0 { 255 } else { 0 }).collect();
    let (image_path, mask_path) = (root.join("image.png"), root.join("mask.png"));
    image::RgbImage::new(7, 5).save(&image_path).unwrap();
    image::GrayImage::from_raw(7, 5, mask).unwrap().save(&mask_path).unwrap();
    // The official order: read grey, resize nearest, then binarise at 127.
    let mut official = resize_nearest(&read_grey(&mask_path).unwrap(), 4, 4).unwrap();
    mcs_engine::data::binarise_mask(&mut official);
    let (_, loaded) = load_pair(&image_path, &mask_path, 4).unwrap();
    assert_eq!(loaded, official);
    // Evaluation reads the truth the same way at full size.
    let mut truth = read_grey(&mask_path).unwrap();
    mcs_engine::data::binarise_mask(&mut truth);
    assert_eq!(mcs_engine::eval::read_truth(&mask_path).unwrap(), truth);
    // 16-bit masks are judged on their 16-bit values: 0/1 keeps its foreground.
    let wide = root.join("wide.png");
    image::ImageBuffer::<image::Luma<u16>, _>::from_raw(2, 1, vec![0u16, 1]).unwrap().save(&wide).unwrap();
    assert_eq!(read_mask(&wide).unwrap().data, [0, 1]);
}

#[test]
fn masks_with_more_than_two_values_are_refused_naming_file_and_values() {
    let root = scratch("three-values");
    let data = root.join("data");
    synth(&data, 2, 1, 1);
    let bad = label_files(&data, "Val_Folder").remove(0);
    let grey = image::open(&bad).unwrap().to_luma8();
    let mut values = grey.as_raw().clone();
    values[0] = 100;
    image::GrayImage::from_raw(grey.width(), grey.height(), values).unwrap().save(&bad).unwrap();
    let error = error_of(read_mask(&bad));
    assert!(error.contains(s(&bad)) && error.contains("3 distinct values (0, 100, 255)"), "{error}");
    let run = run(&["check", "--data", s(&data), "--split", "Val"]);
    assert_refused(&run, &["1 problem"]);
    assert!(run.stdout.contains("3 distinct values (0, 100, 255)") && run.stdout.contains(s(&bad)), "{}", run.stdout);
    // JPEG masks keep the official threshold: compression smears edges into many values.
    let jpeg = root.join("mask.jpg");
    let ramp: Vec<u8> = (0..64u32).map(|i| (i * 4) as u8).collect();
    image::GrayImage::from_raw(8, 8, ramp.clone()).unwrap().save(&jpeg).unwrap();
    let read = read_mask(&jpeg).unwrap();
    let decoded = read_grey(&jpeg).unwrap();
    assert!(read.data.iter().zip(&decoded.data).all(|(&m, &v)| m == u8::from(v >= 127)));
}

#[test]
fn train_warns_when_a_split_has_no_foreground() {
    let root = scratch("no-foreground");
    let data = root.join("data");
    synth(&data, 2, 1, 1);
    remap_masks(&data, "Train_Folder", |_, _| 0);
    let run = train(&data, &root.join("run"), "1", &["--batch-size", "2"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("warning:") && run.stderr.contains("no mask of Train_Folder has any foreground"));
    assert!(!run.stderr.contains("Val_Folder has"), "{}", run.stderr);
}

// ---------------------------------------------------------------- 4. --resume continues the same run

#[test]
fn resume_refuses_another_dataset_batch_size_or_config() {
    let root = scratch("resume");
    let (data, other, out) = (root.join("data"), root.join("other"), root.join("run"));
    synth(&data, 4, 2, 1);
    synth(&other, 5, 2, 1);
    let first = train(&data, &out, "1", &["--batch-size", "2"]);
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let state = std::fs::read(out.join("latest/training_state.json")).unwrap();

    let attempt = train(&data, &out, "2", &["--batch-size", "3", "--resume"]);
    assert_refused(&attempt, &["--resume continues the same run", "batch size is 2 in the checkpoint but 3 now"]);
    let attempt = train(&other, &out, "2", &["--batch-size", "2", "--resume"]);
    let (data_real, other_real) = (data.canonicalize().unwrap(), other.canonicalize().unwrap());
    assert_refused(
        &attempt,
        &[
            &format!("data folder is {} in the checkpoint but {} now", data_real.display(), other_real.display()),
            "training images is 4 in the checkpoint but 5 now",
        ],
    );
    let attempt = train(&data, &out, "2", &["--batch-size", "2", "--resume", "--data-percentage", "50"]);
    assert_refused(&attempt, &["data percentage is 100 in the checkpoint but 50 now"]);
    let mut args = vec!["train", "--data", s(&data), "--config", "small", "--epochs", "2", "--out", s(&out)];
    args.extend(["--batch-size", "2", "--resume"]);
    assert_refused(&run(&args), &["config name is \"tiny\" in the checkpoint but \"small\" now"]);
    assert_eq!(std::fs::read(out.join("latest/training_state.json")).unwrap(), state, "a refused resume wrote");

    // The same run resumes; a changed learning rate is a note, not a refusal.
    let attempt = train(&data, &out, "2", &["--batch-size", "2", "--resume", "--lr", "0.002"]);
    assert_eq!(attempt.code, Some(0), "{}", attempt.stderr);
    let notes = &attempt.stderr;
    assert!(notes.contains("note:") && notes.contains("learning_rate changes from"), "{notes}");
}

#[test]
fn resume_accepts_a_state_written_before_the_run_was_recorded_with_a_note() {
    let root = scratch("old-state");
    let (data, out) = (root.join("data"), root.join("run"));
    synth(&data, 2, 1, 1);
    let first = train(&data, &out, "1", &["--batch-size", "2"]);
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let path = out.join("latest/training_state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for field in ["data_path", "data_percentage", "train_images", "val_images", "batch_size"] {
        assert!(state.as_object_mut().unwrap().remove(field).is_some(), "the state lacks {field}");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    // Even another batch size goes through: the old state cannot say which it had.
    let run = train(&data, &out, "2", &["--batch-size", "1", "--resume"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "does not record its data folder, data percentage, training images, validation images, batch size"
        ),
        "{}",
        run.stderr
    );
    // The resumed run records them from now on.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(state["batch_size"], 1);
}

// ---------------------------------------------------------------- 6. the dataset check

/// The images, ok and problems columns of a split's row in `check`'s table.
fn table_row(stdout: &str, folder: &str) -> [usize; 3] {
    let line = stdout.lines().find(|l| l.starts_with(folder)).unwrap_or_else(|| panic!("no {folder} row:\n{stdout}"));
    let numbers: Vec<usize> = line.split_whitespace().skip(1).take(3).map(|n| n.parse().unwrap()).collect();
    [numbers[0], numbers[1], numbers[2]]
}

#[test]
fn check_passes_a_clean_dataset_and_lists_the_problems_of_a_broken_one() {
    let root = scratch("check");
    let data = root.join("data");
    synth(&data, 3, 2, 2);
    let clean = run(&["check", "--data", s(&data)]);
    assert_eq!(clean.code, Some(0), "{}{}", clean.stdout, clean.stderr);
    assert_eq!(table_row(&clean.stdout, "Train_Folder"), [3, 3, 0], "{}", clean.stdout);
    assert_eq!(table_row(&clean.stdout, "Val_Folder"), [2, 2, 0], "{}", clean.stdout);
    assert!(clean.stdout.contains("every check passed"), "{}", clean.stdout);

    // Break the training split three ways (the subsets list the first image, whose mask stays)
    // plus a subset naming a file outside it, and the validation prompt file.
    let train_labels = label_files(&data, "Train_Folder");
    let first_image = data.join("Train_Folder/img").join(train_labels[0].file_name().unwrap());
    std::fs::write(&first_image, b"not a picture").unwrap();
    image::GrayImage::new(5, 5).save(&train_labels[1]).unwrap();
    std::fs::remove_file(&train_labels[2]).unwrap();
    write_xlsx(&data.join("Prompts_Folder/Train_text_10.xlsx"), &[["../x.png", "one lesion"]]);
    std::fs::write(data.join("Prompts_Folder/Val_text.xlsx"), b"").unwrap();
    let broken = run(&["check", "--data", s(&data)]);
    assert_refused(&broken, &["5 problem(s)"]);
    let out = &broken.stdout;
    assert_eq!(table_row(out, "Train_Folder"), [3, 0, 4], "{out}");
    assert_eq!(table_row(out, "Val_Folder"), [0, 0, 1], "{out}");
    assert_eq!(table_row(out, "Test_Folder"), [2, 2, 0], "{out}");
    assert!(out.contains(s(&first_image)) && out.contains("not a readable"), "{out}");
    assert!(out.contains("96x96 but its mask") && out.contains("5x5"), "{out}");
    assert!(out.contains("no mask for image") && out.contains(s(&train_labels[2])), "{out}");
    assert!(out.contains("Train_text_10.xlsx: row 2") && out.contains("'../x.png'"), "{out}");
    assert!(out.contains("Val_text.xlsx") && out.contains("cannot open spreadsheet"), "{out}");

    // train runs the same check before its first step and names the first problem.
    let run = train(&data, &root.join("run"), "1", &[]);
    assert_refused(&run, &["the dataset check found", "mcs-engine check --data"]);
    assert!(!root.join("run/latest").exists());
}

/// Sizes and counts a user can type that the synthetic generator could never hold end in a
/// one-line error naming the need and the machine's memory, not an allocation abort; a dataset
/// image beyond the pixel limit is refused from its header, as in predict.
#[test]
fn synthetic_sizes_and_counts_beyond_memory_and_huge_dataset_images_are_refused() {
    let dir = scratch("synth-huge");
    let run_synth =
        run(&["synth", "--out", s(&dir.join("data")), "--size", "200000", "--train", "1", "--val", "1", "--test", "1"]);
    assert_refused(&run_synth, &["200000x200000", "more than this machine's"]);
    let run_train = run(&["train", "--synthetic-train", "1000000000", "--epochs", "1", "--out", s(&dir.join("run"))]);
    assert_refused(&run_train, &["1000000200 synthetic images", "more than this machine's"]);

    // A 20000 x 20000 PNG whose one IDAT chunk holds an empty zlib stream: the decoder reads the
    // header up to the first IDAT, and the size is refused there, before any pixel is decoded.
    let huge = dir.join("huge.png");
    let empty_zlib = [0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01];
    std::fs::write(&huge, png::png(20000, 20000, &[png::chunk(b"IDAT", &empty_zlib)])).unwrap();
    let error = error_of(mcs_engine::data::read_bgr(&huge));
    assert!(error.contains("too large (20000x20000)"), "{error}");
    let error = error_of(read_mask(&huge));
    assert!(error.contains("too large (20000x20000)"), "{error}");
}
