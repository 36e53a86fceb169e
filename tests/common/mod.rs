//! Shared test helpers: the devices to run on, close-enough comparisons that say where they fail,
//! deterministic random data, and finite-difference gradient checks.
#![allow(dead_code)]

use mcs_engine::cuda::{gpu_available, unavailable_reason};
use mcs_engine::{Device, Result, Tape, Tensor};

/// True when `REQUIRE_GPU=1`: a missing GPU is then a failure, not a skip.
pub fn require_gpu() -> bool {
    std::env::var("REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The GPU, or `None` after printing `skip: no GPU (<why>)` (a panic under `REQUIRE_GPU=1`).
/// The reason covers the libraries, the device and whether the kernels load.
pub fn gpu() -> Option<Device> {
    if gpu_available() {
        log_gpu_half();
        return Some(Device::cuda(0).expect("a GPU was detected but could not be opened"));
    }
    let reason = unavailable_reason().unwrap_or("unknown");
    assert!(!require_gpu(), "REQUIRE_GPU=1 but no GPU can be used: {reason}");
    eprintln!("{}", skip_line(reason));
    None
}

/// Appends `<test binary> <test>` to the file `MCS_GPU_TEST_LOG` names, if any: `.ci/run` counts
/// the tests whose GPU half ran.
fn log_gpu_half() {
    let Some(path) = std::env::var_os("MCS_GPU_TEST_LOG") else { return };
    let binary = std::env::current_exe().ok().and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()));
    let binary = binary.as_deref().unwrap_or("?").split('-').next().unwrap_or("?").to_string();
    let test = std::thread::current().name().unwrap_or("main").to_string();
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(file, "{binary} {test}");
    }
}

/// The line a skipped GPU test prints (tools/gpu_check.sh counts these).
pub fn skip_line(reason: &str) -> String {
    format!("skip: no GPU ({reason})")
}

/// The repository root for files the tests read at run time: `MCS_ROOT` when set (a GPU kit
/// copied to another machine, see tools/gpu_check.sh), else the source tree cargo built from.
pub fn repo_root() -> std::path::PathBuf {
    match std::env::var_os("MCS_ROOT") {
        Some(root) if !root.is_empty() => root.into(),
        _ => env!("CARGO_MANIFEST_DIR").into(),
    }
}

/// `relative` (e.g. `tests/fixtures/x.json`) under [`repo_root`].
pub fn repo_file(relative: &str) -> std::path::PathBuf {
    repo_root().join(relative)
}

/// The CPU always, and the GPU when there is one: the devices a device-generic test body runs on.
pub fn devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu());
    devices
}

/// Fails with the worst element's index and both values when `|got - want| > atol + rtol*|want|`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length {} != expected {}", got.len(), want.len());
    let mut worst: Option<(usize, f32)> = None;
    let mut max_abs = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g - w).abs();
        if g.is_finite() != w.is_finite() || diff.is_nan() {
            panic!("{what}: element {i} is {g}, expected {w}");
        }
        max_abs = max_abs.max(if diff.is_finite() { diff } else { 0.0 });
        let excess = diff - (atol + rtol * w.abs());
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: max abs diff {max_abs:e}; worst at element {i}: got {} expected {} (atol {atol:e}, rtol {rtol:e})",
            got[i], want[i]
        );
    }
}

/// Deterministic values in `[lo, hi)` (splitmix64), so failures reproduce without a seed file.
pub fn random_vec(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + (hi - lo) * ((z >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// A tensor of random values on `device`.
pub fn random_tensor(seed: u64, shape: &[usize], lo: f32, hi: f32, device: &Device) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_slice(&random_vec(seed, n, lo, hi), shape, device).unwrap()
}

/// Compares the tape's gradients of `f` against central finite differences on the CPU.
///
/// The scalar probed is `L = sum(f(inputs) * w)` for fixed random weights `w`, so every output
/// element's gradient path is exercised. Inputs listed in `frozen` get no gradient and are not
/// probed. Differences are taken in f32 with step `eps`; the comparison uses `atol + rtol*|g|`.
pub fn check_gradients(
    name: &str,
    inputs: &[(Vec<f32>, Vec<usize>)],
    frozen: &[usize],
    eps: f32,
    atol: f32,
    rtol: f32,
    f: impl Fn(&Tape, &[Tensor]) -> Result<Tensor>,
) {
    let make = |values: &[Vec<f32>], tape_inputs: bool| -> Vec<Tensor> {
        values
            .iter()
            .zip(inputs)
            .enumerate()
            .map(|(i, (v, (_, shape)))| {
                let t = Tensor::from_vec(v.clone(), shape).unwrap();
                if tape_inputs && !frozen.contains(&i) {
                    t.into_trainable()
                } else {
                    t
                }
            })
            .collect()
    };
    let values: Vec<Vec<f32>> = inputs.iter().map(|(v, _)| v.clone()).collect();
    let tape = Tape::new();
    let params = make(&values, true);
    let out = f(&tape, &params).unwrap();
    let weights = random_vec(0xC0FFEE, out.numel(), -1.0, 1.0);
    let grads = tape.backward_from(&out, Tensor::from_vec(weights.clone(), out.shape()).unwrap()).unwrap();

    let probe = |values: &[Vec<f32>]| -> f64 {
        let out = f(&Tape::inference(), &make(values, false)).unwrap().to_vec().unwrap();
        out.iter().zip(&weights).map(|(&o, &w)| o as f64 * w as f64).sum()
    };
    for (i, param) in params.iter().enumerate() {
        if frozen.contains(&i) {
            assert!(grads.get(param).is_none(), "{name}: frozen input {i} received a gradient");
            continue;
        }
        let analytic = match grads.get(param) {
            Some(g) => g.to_vec().unwrap(),
            None => vec![0.0; param.numel()],
        };
        assert_eq!(analytic.len(), param.numel(), "{name}: gradient of input {i} has the wrong size");
        let mut numeric = vec![0.0f32; param.numel()];
        for (j, slot) in numeric.iter_mut().enumerate() {
            let mut plus = values.clone();
            plus[i][j] += eps;
            let mut minus = values.clone();
            minus[i][j] -= eps;
            *slot = ((probe(&plus) - probe(&minus)) / (2.0 * eps as f64)) as f32;
        }
        assert_close(&format!("{name}: d/d input {i}"), &analytic, &numeric, atol, rtol);
    }
}

/// A safetensors fixture written by the PyTorch tools: f32 tensors by name, the token ids
/// (`input.ids`, stored as i64) and the metadata's seed.
pub struct Fixture {
    pub tensors: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub ids: Vec<u32>,
    pub seed: u64,
}

/// Reads the fixture at `relative` (under [`repo_root`]).
pub fn read_fixture(relative: &str) -> Fixture {
    use safetensors::tensor::Dtype;
    use safetensors::SafeTensors;
    let path = repo_file(relative);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (see tools/README.md)", path.display()));
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    let seed = meta.get("seed").expect("fixture metadata has the seed").parse().unwrap();
    let mut tensors = std::collections::BTreeMap::new();
    let mut ids = Vec::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        match view.dtype() {
            Dtype::F32 => {
                let values = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                tensors.insert(name, (view.shape().to_vec(), values));
            }
            Dtype::I64 if name == "input.ids" => {
                ids = data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
            }
            other => panic!("fixture tensor {name} has unexpected dtype {other:?}"),
        }
    }
    Fixture { tensors, ids, seed }
}

/// A `.npy` file's shape and float32 values (format 1.0, `<f4`, C order, as predict writes).
pub fn read_npy(path: &std::path::Path) -> ((usize, usize), Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    let shape = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let dims: Vec<usize> =
        shape.split(',').map(str::trim).filter(|d| !d.is_empty()).map(|d| d.parse().unwrap()).collect();
    let values: Vec<f32> =
        bytes[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(values.len(), dims[0] * dims[1], "{}", path.display());
    ((dims[0], dims[1]), values)
}

// ------------------------------------------------------------------------------------------------
// f64 references and an error bound for f32 sums (the spatial and conv families)
// ------------------------------------------------------------------------------------------------

/// Unit roundoff of f32.
pub const U: f64 = 1.0 / (1u64 << 24) as f64;

/// Sums computed in f64 term by term, remembering for each element how many terms it had and the
/// sum of their magnitudes: what bounds the rounding error of the same sum done in f32.
pub struct Sums {
    pub value: Vec<f64>,
    pub abs: Vec<f64>,
    pub terms: Vec<usize>,
}

impl Sums {
    pub fn zeros(n: usize) -> Sums {
        Sums { value: vec![0.0; n], abs: vec![0.0; n], terms: vec![0; n] }
    }

    pub fn add(&mut self, i: usize, term: f64) {
        self.value[i] += term;
        self.abs[i] += term.abs();
        self.terms[i] += 1;
    }
}

/// Fails unless every `|got - want| <= 2 (n + 4) u sum|terms|`. An f32 sum of n terms, in any order
/// and with or without FMA, is within `(n - 1) u sum|terms|` of the exact sum (Higham, "Accuracy and
/// Stability of Numerical Algorithms", §4.2); each term is a product of up to three rounded
/// factors, which the "+4" covers; the factor 2 is slack for the final rounding to f32 and for
/// sums added up from partial sums (a weight gradient over chunks of the batch).
pub fn assert_sums_close(what: &str, got: &[f32], want: &Sums) {
    assert_eq!(got.len(), want.value.len(), "{what}: length");
    let mut worst: Option<(usize, f64)> = None;
    for (i, &g) in got.iter().enumerate() {
        let bound = 2.0 * (want.terms[i] as f64 + 4.0) * U * want.abs[i];
        let excess = (g as f64 - want.value[i]).abs() - bound;
        assert!(!excess.is_nan(), "{what}: element {i} is {g}, expected {}", want.value[i]);
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        let bound = 2.0 * (want.terms[i] as f64 + 4.0) * U * want.abs[i];
        panic!("{what}: element {i} is {}, expected {} (allowed error {bound:e})", got[i], want.value[i]);
    }
}
