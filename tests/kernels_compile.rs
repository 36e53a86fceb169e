//! Every kernel family compiles through NVRTC (the run-time path used when build.rs found no
//! nvcc), and the `KernelFamily` enum build.rs generates lists exactly the files in `kernels/`.
//! CI sets `MCS_REQUIRE_NVRTC=1` so that a missing libnvrtc is a failure there, not a skip.

use mcs_engine::cuda::kernels::{compile_with_nvrtc, embedded_stems, KernelFamily};
use mcs_engine::cuda::nvrtc_available;

/// The stems of the `*.cu` files in `kernels/` as they are now, read here rather than taken from
/// build.rs, which generates both the enum and the embedded table from its own listing.
fn kernel_files_on_disk() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut stems: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .map(|path| path.file_stem().unwrap().to_str().unwrap().to_owned())
        .collect();
    stems.sort();
    stems
}

#[test]
fn kernel_family_enum_matches_the_kernel_files() {
    let mut from_enum: Vec<&str> = KernelFamily::ALL.iter().map(|f| f.stem()).collect();
    let mut embedded = embedded_stems();
    from_enum.sort();
    embedded.sort();
    assert_eq!(from_enum, kernel_files_on_disk(), "KernelFamily and kernels/*.cu disagree");
    assert_eq!(embedded, kernel_files_on_disk(), "the embedded sources and kernels/*.cu disagree");
    for family in KernelFamily::ALL {
        assert!(!family.source().is_empty(), "kernels/{}.cu is embedded empty", family.stem());
    }
}

#[test]
fn kernel_families_are_named_and_indexed_as_build_rs_promises() {
    for (index, &family) in KernelFamily::ALL.iter().enumerate() {
        // CudaDevice keeps one module slot per family at index `family as usize`.
        assert_eq!(family as usize, index, "KernelFamily::ALL is not in declaration order");
        let camel: String = family.stem().split('_').map(|word| word[..1].to_ascii_uppercase() + &word[1..]).collect();
        assert_eq!(format!("{family:?}"), camel, "the variant of kernels/{}.cu", family.stem());
    }
    assert_eq!(format!("{:?}", KernelFamily::ProbAttention), "ProbAttention");
    assert_eq!(KernelFamily::ProbAttention.stem(), "prob_attention");
}

#[test]
fn every_kernel_family_compiles_with_nvrtc() {
    if !nvrtc_available() {
        assert!(std::env::var("MCS_REQUIRE_NVRTC").is_err(), "MCS_REQUIRE_NVRTC is set but libnvrtc cannot be loaded");
        eprintln!("skip: libnvrtc not found (set LD_LIBRARY_PATH to a CUDA 13.0 lib folder)");
        return;
    }
    for &family in KernelFamily::ALL {
        let ptx = compile_with_nvrtc(family, "compute_90").unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        assert!(text.contains(".entry"), "kernels/{}.cu produced PTX with no kernel entry", family.stem());
        eprintln!("nvrtc: kernels/{}.cu -> {} bytes of PTX", family.stem(), text.len());
    }
}
