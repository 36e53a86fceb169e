//! `mcs-engine bench predict|forward|attention` on the tiny config: the JSON each prints has its
//! fields, with positive finite times and a peak RSS (this runs on Linux, where /proc exists).
//! No timing assertions: the machines are shared and noisy.

use std::process::Command;

/// The binary under test: `MCS_ENGINE_BIN` when set (a packed GPU kit), else the one cargo built.
fn binary() -> std::path::PathBuf {
    std::env::var_os("MCS_ENGINE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_mcs-engine").into(), Into::into)
}

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(binary()).arg("bench").args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench {args:?} failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| panic!("bench {args:?} printed nothing"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bench {args:?} printed no JSON ({e}): {stdout}"))
}

fn positive(report: &serde_json::Value, field: &str) -> f64 {
    let value = report[field].as_f64().unwrap_or_else(|| panic!("`{field}` missing or not a number in {report}"));
    assert!(value.is_finite() && value > 0.0, "`{field}` = {value} in {report}");
    value
}

fn timings(report: &serde_json::Value, prefix: &str, steps: usize) {
    let (min, median, max) = (
        positive(report, &format!("{prefix}min_s")),
        positive(report, &format!("{prefix}median_s")),
        positive(report, &format!("{prefix}max_s")),
    );
    assert!(min <= median && median <= max, "{report}");
    let times =
        report[format!("{prefix}times_s")].as_array().unwrap_or_else(|| panic!("no {prefix}times_s in {report}"));
    assert_eq!(times.len(), steps, "{report}");
}

/// Every timing's matrix-product work and rate, against the measured SGEMM peak.
fn rates(report: &serde_json::Value, names: &[&str]) {
    let peak = report["gemm_peak"]["gflop_s"].as_f64().unwrap_or_else(|| panic!("no gemm_peak in {report}"));
    assert!(peak.is_finite() && peak > 0.0, "{report}");
    assert_eq!(report["gemm_peak"]["shape"], serde_json::json!([128, 128, 128]), "{report}");
    let rates = report["rates"].as_array().unwrap_or_else(|| panic!("no rates in {report}"));
    let found: Vec<&str> = rates.iter().map(|r| r["timing"].as_str().unwrap()).collect();
    assert_eq!(found, names, "{report}");
    for rate in rates {
        let (gflop, effective, fraction) = (
            positive(rate, "matrix_gflop_per_step"),
            positive(rate, "effective_gflop_s"),
            positive(rate, "fraction_of_gemm_peak"),
        );
        // The three are one computation apart: rate = work / median step, fraction = rate / peak.
        assert!((fraction - effective / peak).abs() <= 1e-9 * fraction, "{rate}");
        assert!(gflop > 0.0 && effective > 0.0, "{rate}");
    }
}

fn common(report: &serde_json::Value, case: &str) {
    assert_eq!(report["case"], case, "{report}");
    assert_eq!(report["config"], "tiny", "{report}");
    assert_eq!(report["device"], "cpu", "{report}");
    assert_eq!(report["clock"], "host clock", "{report}");
    assert!(report["threads"].as_u64().is_some_and(|t| t >= 1), "{report}");
    positive(report, "peak_rss_mib");
}

const TINY: [&str; 12] = [
    "--config",
    "tiny",
    "--steps",
    "2",
    "--warmup",
    "0",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--gemm-peak-size",
    "128",
];

#[test]
fn predict_reports_its_timing_throughput_and_peak_memory() {
    let report = bench(&[&["predict", "--samples", "3", "--batch-size", "2", "--json"], &TINY[..]].concat());
    common(&report, "predict");
    assert_eq!((report["samples"].as_u64(), report["batch"].as_u64()), (Some(3), Some(2)), "{report}");
    timings(&report, "", 2);
    positive(&report, "images_per_s");
    rates(&report, &["predict"]);
    assert!(report["peak_step_tensor_mib"].as_f64().is_some_and(|m| m.is_finite() && m >= 0.0), "{report}");
}

#[test]
fn forward_is_one_sample_and_refuses_more() {
    let report = bench(&[&["forward", "--json"], &TINY[..]].concat());
    common(&report, "forward");
    assert_eq!((report["samples"].as_u64(), report["batch"].as_u64()), (Some(1), Some(1)), "{report}");
    timings(&report, "", 2);
    positive(&report, "images_per_s");
    rates(&report, &["forward"]);
    let out = Command::new(binary()).args(["bench", "forward", "--samples", "4"]).args(TINY).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("bench predict --samples 4"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn attention_times_both_directions_forward_and_backward() {
    let report = bench(&[&["attention", "--samples", "3", "--json"], &TINY[..]].concat());
    common(&report, "attention");
    let directions = report["directions"].as_array().unwrap_or_else(|| panic!("no directions in {report}"));
    let names: Vec<_> = directions.iter().map(|d| d["direction"].as_str().unwrap()).collect();
    assert_eq!(names, ["image_to_text", "text_to_image"]);
    // tiny: 1 + (32/8)^2 = 17 image tokens, a 16-token text context, adapter width 16.
    assert_eq!(directions[0]["q_shape"], serde_json::json!([3, 17, 16]), "{report}");
    assert_eq!(directions[0]["kv_shape"], serde_json::json!([3, 16, 16]), "{report}");
    assert_eq!(directions[1]["q_shape"], serde_json::json!([3, 16, 16]), "{report}");
    for direction in directions {
        timings(direction, "forward_", 2);
        timings(direction, "forward_backward_", 2);
    }
    rates(
        &report,
        &[
            "image_to_text forward",
            "image_to_text forward+backward",
            "text_to_image forward",
            "text_to_image forward+backward",
        ],
    );
}

#[test]
fn train_reports_peak_memory_too_and_bad_arguments_are_sentences() {
    let report = bench(&[&["train", "--batch-size", "2", "--json"], &TINY[..]].concat());
    common(&report, "train");
    timings(&report, "", 2);
    positive(&report, "images_per_s");
    rates(&report, &["train step"]);
    for (args, expected) in [
        (&["predict", "--steps", "0"][..], "0 is not a whole number from 1 to 100000"),
        (&["predict", "--samples", "0"][..], "0 is not a whole number of at least 1"),
        (&["attention", "--batch-size", "0"][..], "0 is not a whole number of at least 1"),
        (&["train", "--samples", "3"][..], "--samples is for predict and attention"),
        (&["predict", "--config", "nonesuch"][..], "unknown model config `nonesuch`"),
    ] {
        let out = Command::new(binary()).arg("bench").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// On the emulated GPU (tools/emulated_gpu.sh) `info` says so, and `bench` refuses to time it:
/// naming it is an error, `auto` falls back to the CPU. Elsewhere there is nothing to check.
#[test]
fn the_emulated_gpu_is_named_and_never_timed() {
    let info = Command::new(binary()).arg("info").output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    if !info.contains("emulated GPU") {
        println!("skip: not on the emulated GPU ({})", info.lines().next().unwrap_or_default());
        return;
    }
    assert!(info.contains("timings are no GPU figures"), "{info}");
    let out =
        Command::new(binary()).args(["bench", "forward", "--config", "tiny", "--device", "cuda"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("emulated GPU"), "{stderr}");
    let report = bench(&["forward", "--config", "tiny", "--steps", "1", "--warmup", "0", "--json"]);
    assert_eq!(report["device"], "cpu", "{report}");
}
