//! Puts the demo checkpoint (`weights/demo`: config, weights, tokenizer) inside the Python package,
//! at `mcs_engine/demo/`, so that maturin packs it into the wheel as package data and
//! `mcs_engine.Segmenter()` works wherever the wheel is installed (docs/python.md §2). The copy is
//! not committed (python/.gitignore): `weights/demo` stays the one source.

use std::path::Path;

const DEMO_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

fn main() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = manifest.join("../weights/demo");
    let target = manifest.join("mcs_engine/demo");
    std::fs::create_dir_all(&target).unwrap_or_else(|e| panic!("cannot create {}: {e}", target.display()));
    for name in DEMO_FILES {
        let from = source.join(name);
        let to = target.join(name);
        // The copy too: a deleted or edited copy is made again.
        println!("cargo:rerun-if-changed={}", from.display());
        println!("cargo:rerun-if-changed={}", to.display());
        let bytes = std::fs::read(&from)
            .unwrap_or_else(|e| panic!("cannot read the demo checkpoint's {}: {e}", from.display()));
        // Rewriting an unchanged file would only touch its time stamp.
        if std::fs::read(&to).ok().as_deref() != Some(bytes.as_slice()) {
            std::fs::write(&to, &bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", to.display()));
        }
    }
}
