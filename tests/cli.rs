//! The `mcs-engine` binary end to end: the default `predict` writes its three maps, and bad input
//! ends in a one-line error and a non-zero exit, never a panic.

use std::process::Command;

/// The binary under test: `MCS_ENGINE_BIN` when set (a packed GPU kit, where cargo's
/// compile-time path does not exist), else the one cargo built.
fn binary() -> std::path::PathBuf {
    std::env::var_os("MCS_ENGINE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_mcs-engine").into(), Into::into)
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary()).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn default_predict_writes_mask_probability_and_uncertainty() {
    let dir = std::env::temp_dir().join(format!("mcs-cli-{}", std::process::id()));
    let (ok, stdout, stderr) = run(&["predict", "--samples", "4", "--out", dir.to_str().unwrap()]);
    assert!(ok, "predict failed: {stderr}");
    assert!(stdout.contains("4 samples on cpu"), "{stdout}");
    for name in ["mask.png", "probability.png", "uncertainty.png"] {
        let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&bytes[1..4], b"PNG", "{name} is not a PNG");
    }
    // Same seed, same maps: the sampling noise is counter-based.
    let first = std::fs::read(dir.join("uncertainty.png")).unwrap();
    assert!(run(&["predict", "--samples", "4", "--out", dir.to_str().unwrap()]).0);
    assert_eq!(std::fs::read(dir.join("uncertainty.png")).unwrap(), first);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_gives_a_named_error_and_a_failing_exit() {
    let cases: [(&[&str], &str); 4] = [
        (&["predict", "--image", "no/such/image.png"], "no/such/image.png"),
        (&["predict", "--prompt", "  "], "empty prompt"),
        (&["predict", "--samples", "0"], "at least 1"),
        (&["predict", "--config", "no-such-config"], "unknown model config `no-such-config`"),
    ];
    for (args, expected) in cases {
        let (ok, _, stderr) = run(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
fn a_corrupt_image_is_named() {
    let path = std::env::temp_dir().join(format!("mcs-corrupt-{}.png", std::process::id()));
    std::fs::write(&path, b"\x89PNG\r\n\x1a\nthis is not really a png").unwrap();
    let (ok, _, stderr) = run(&["predict", "--image", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert!(!ok && stderr.contains("not a readable PNG or JPEG image"), "{stderr}");
}
