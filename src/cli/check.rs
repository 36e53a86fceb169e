//! `mcs-engine check`: checks a dataset in the official layout before anything trains on it (see
//! [`mcs_engine::data::check`]) and prints a table per split and the first problems.

use std::path::PathBuf;

use mcs_engine::data::check::{check_prompt_file, other_prompt_files};
use mcs_engine::data::{check_split, Split, SplitCheck};
use mcs_engine::{Error, Result};

/// Problems printed in full; the rest are counted (a broken dataset can have thousands, all alike).
const LISTED_PROBLEMS: usize = 20;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Dataset folder in the official layout ({Train,Val,Test}_Folder/{img,label},
    /// Prompts_Folder/*.xlsx).
    #[arg(long)]
    data: PathBuf,
    /// Check only this split; default every split that has a folder.
    #[arg(long, value_parser = ["Train", "Val", "Test"])]
    split: Option<String>,
}

pub fn run(args: &CheckArgs) -> Result<()> {
    if !args.data.is_dir() {
        return Err(Error::Invalid(format!("{}: no such dataset folder", args.data.display())));
    }
    let splits: Vec<Split> = match &args.split {
        Some(name) => vec![super::parse_split(name)?],
        None => Split::ALL.into_iter().filter(|split| args.data.join(split.folder()).is_dir()).collect(),
    };
    if splits.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: holds none of Train_Folder, Val_Folder, Test_Folder (expected the official layout)",
            args.data.display()
        )));
    }
    let checks: Vec<SplitCheck> =
        splits.iter().map(|&split| check_with_other_prompt_files(&args.data, split)).collect();
    print_table(&checks);
    let problems: Vec<&String> = checks.iter().flat_map(|c| &c.problems).collect();
    for check in checks.iter().filter(|c| c.images > 0 && c.foreground_pixels == 0) {
        eprintln!("warning: {}: no mask has any foreground pixel", check.split.folder());
    }
    if problems.is_empty() {
        println!("{}: every check passed", args.data.display());
        return Ok(());
    }
    println!();
    for problem in problems.iter().take(LISTED_PROBLEMS) {
        println!("{problem}");
    }
    if problems.len() > LISTED_PROBLEMS {
        println!("... and {} more", problems.len() - LISTED_PROBLEMS);
    }
    Err(Error::Invalid(format!("{}: {} problem(s) found (listed above)", args.data.display(), problems.len())))
}

/// The split checked through its main prompt file, with the problems of its other prompt files
/// (subsets, prompt styles) added.
fn check_with_other_prompt_files(root: &std::path::Path, split: Split) -> SplitCheck {
    let mut check = check_split(root, split, None);
    for file in other_prompt_files(root, split, &check.prompts) {
        check.problems.extend(check_prompt_file(root, split, &file));
    }
    check
}

fn print_table(checks: &[SplitCheck]) {
    println!("{:<12} {:>8} {:>8} {:>9}  prompt file", "split", "images", "ok", "problems");
    for c in checks {
        println!(
            "{:<12} {:>8} {:>8} {:>9}  {}",
            c.split.folder(),
            c.images,
            c.ok,
            c.problems.len(),
            c.prompts.display()
        );
    }
}
