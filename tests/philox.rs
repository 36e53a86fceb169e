//! Philox noise (src/philox.rs, kernels/philox.cuh + philox.cu, src/ops/random.rs): the block
//! cipher against Random123's known answers, the noise against the NumPy definition bit for bit,
//! GPU against CPU bit for bit, the distribution, stream separation, and the accuracy of the ln
//! and sin/cos polynomials.

mod common;

use common::{devices, gpu};
use mcs_engine::ops::normal_noise;
use mcs_engine::philox::{
    fill_normal, fill_normal_from, ln, normal, philox4x32_10, sincos_2pi, stream_id, uniform, NoiseMode,
};
use mcs_engine::Device;
use proptest::prelude::*;
use safetensors::{Dtype, SafeTensors};

const FIXTURE: &str = "tests/fixtures/philox_normal.safetensors";

/// Fails with the number of differing elements and the first one (values and bit patterns).
fn assert_bits_equal(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length {} != expected {}", got.len(), want.len());
    let differing: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
    if let Some(&i) = differing.first() {
        panic!(
            "{what}: {} of {} elements differ; first at {i}: got {} ({:#010x}) expected {} ({:#010x})",
            differing.len(),
            got.len(),
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

fn read_fixture() -> Vec<u8> {
    std::fs::read(common::repo_file(FIXTURE))
        .unwrap_or_else(|e| panic!("{FIXTURE}: {e} (written by tools/make_philox_fixture.py)"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn u64s(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).collect()
}

/// `(seed, stream)` from a fixture name `seed_<seed>_stream_<stream>`.
fn parse_case(name: &str) -> Option<(u64, u64)> {
    let (seed, stream) = name.strip_prefix("seed_")?.split_once("_stream_")?;
    Some((seed.parse().ok()?, stream.parse().ok()?))
}

#[test]
fn philox_matches_random123_known_answers() {
    // Random123's tests/kat_vectors, lines "philox4x32 10 <ctr[4]> <key[2]> <out[4]>".
    let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        ([0; 4], [0; 2], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([u32::MAX; 4], [u32::MAX; 2], [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ];
    for (counter, key, want) in cases {
        assert_eq!(philox4x32_10(counter, key), want, "philox4x32_10({counter:x?}, {key:x?})");
    }
}

#[test]
fn noise_matches_numpy_reference_bit_for_bit() {
    let bytes = read_fixture();
    let fixture = SafeTensors::deserialize(&bytes).unwrap();
    let mut cases = 0;
    for (name, view) in fixture.tensors() {
        let Some((seed, stream)) = parse_case(&name) else { continue };
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        let want = f32s(view.data());
        for device in devices() {
            let noise = normal_noise(&device, view.shape(), seed, stream).unwrap();
            assert_eq!(noise.shape(), view.shape());
            assert_bits_equal(&format!("{name} on {}", device.name()), &noise.to_vec().unwrap(), &want);
        }
        cases += 1;
    }
    assert_eq!(cases, 5, "the fixture should hold the five cases of tools/make_philox_fixture.py");
}

#[test]
fn noise_far_along_a_sequence_matches_numpy_reference() {
    // Element indices up to 2^64 - 1: the Philox block index fills the counter's high word.
    let bytes = read_fixture();
    let fixture = SafeTensors::deserialize(&bytes).unwrap();
    let name = "far_seed_42_stream_196619";
    let indices = u64s(fixture.tensor(&format!("{name}_index")).unwrap().data());
    let want = f32s(fixture.tensor(&format!("{name}_value")).unwrap().data());
    assert!(indices.iter().any(|&i| i / 4 > u64::from(u32::MAX)), "fixture lacks indices beyond 2^34");
    let got: Vec<f32> = indices.iter().map(|&i| normal(42, 196_619, i)).collect();
    assert_bits_equal(name, &got, &want);
}

#[test]
fn gpu_noise_matches_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    // Sizes around the 4-element Philox block and the 256-thread launch block (one thread per
    // Philox block), and a million-element one that fills many launch blocks.
    let sizes = [1usize, 2, 3, 4, 5, 7, 255, 1023, 1024, 1025, 1027, 4099, (1 << 20) + 3];
    for (k, &n) in sizes.iter().enumerate() {
        let (seed, stream) = (0x0123_4567_89AB_CDEF ^ k as u64, stream_id(k as u64 + (1 << 20), 3, 1));
        let cpu = normal_noise(&Device::Cpu, &[n], seed, stream).unwrap().to_vec().unwrap();
        let on_gpu = normal_noise(&gpu, &[n], seed, stream).unwrap().to_vec().unwrap();
        assert_bits_equal(&format!("n={n} gpu vs cpu"), &on_gpu, &cpu);
    }
    assert_eq!(normal_noise(&gpu, &[0, 3], 1, 2).unwrap().to_vec().unwrap(), Vec::<f32>::new());
}

#[test]
fn noise_statistics_are_standard_normal() {
    const N: usize = 1_000_000;
    let n = N as f64;
    for device in devices() {
        let z = normal_noise(&device, &[N], 2024, stream_id(17, 4, 0)).unwrap().to_vec().unwrap();
        let what = format!("noise on {}", device.name());
        let mean = z.iter().map(|&v| v as f64).sum::<f64>() / n;
        let moment = |p: i32| z.iter().map(|&v| (v as f64 - mean).powi(p)).sum::<f64>() / n;
        let (variance, fourth) = (moment(2), moment(4));
        let beyond_3_sigma = z.iter().filter(|v| v.abs() > 3.0).count() as f64 / n;
        // Every bound below is five standard errors of the statistic for N independent standard
        // normals: a correct generator exceeds one with probability below 1e-6 for any seed.
        // Standard error of the mean: 1/sqrt(N) = 1e-3.
        assert!(mean.abs() < 5e-3, "{what}: mean {mean}");
        // Of the variance: sqrt(2/N) = 1.41e-3.
        assert!((variance - 1.0).abs() < 7.1e-3, "{what}: variance {variance}");
        // Of the fourth moment (3 for a normal): sqrt((E z^8 - 9)/N) = sqrt(96/N) = 9.8e-3.
        assert!((fourth - 3.0).abs() < 0.049, "{what}: fourth moment {fourth}");
        // Of the two-sided tail fraction p = P(|z| > 3) = 0.0026998: sqrt(p(1-p)/N) = 5.2e-5.
        assert!((beyond_3_sigma - 0.0026998).abs() < 2.6e-4, "{what}: fraction beyond 3 sigma {beyond_3_sigma}");
        // Lags 1 and 2 stay inside a Philox block (lag 1 shares a Box-Muller radius), lag 4
        // crosses blocks. Correlation standard error 1/sqrt(N) = 1e-3.
        for lag in [1usize, 2, 3, 4] {
            let r = z.iter().zip(&z[lag..]).map(|(&a, &b)| (a as f64 - mean) * (b as f64 - mean)).sum::<f64>()
                / ((n - lag as f64) * variance);
            assert!(r.abs() < 5e-3, "{what}: lag-{lag} correlation {r}");
        }
        // The smallest uniform is 2^-24, so no sample exceeds sqrt(-2 ln 2^-24) = 5.7682.
        let max = z.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(z.iter().all(|v| v.is_finite()) && max <= 5.7683, "{what}: max |z| {max}");
    }
}

#[test]
fn streams_and_seeds_select_independent_sequences() {
    const N: usize = 1 << 16;
    let draw = |seed: u64, stream: u64| normal_noise(&Device::Cpu, &[N], seed, stream).unwrap().to_vec().unwrap();
    let (seed, stream) = (0x5EED_0000_0001, stream_id(5, 2, 1));
    let base = draw(seed, stream);
    assert_bits_equal("same seed and stream, drawn twice", &draw(seed, stream), &base);
    let others = [
        ("next stream", seed, stream + 1),
        ("stream + 2^32 (high counter word)", seed, stream + (1 << 32)),
        ("next draw", seed, stream_id(6, 2, 1)),
        ("other adapter", seed, stream_id(5, 3, 1)),
        ("other direction", seed, stream_id(5, 2, 0)),
        ("next seed", seed + 1, stream),
        ("seed + 2^32 (high key word)", seed + (1 << 32), stream),
    ];
    for (what, s, t) in others {
        let other = draw(s, t);
        // Two independent continuous sequences coincide at an index with probability ~0; the
        // correlation of N independent pairs has standard error 1/sqrt(N) = 0.0039, bound 5x.
        let equal = base.iter().zip(&other).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
        let r = base.iter().zip(&other).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / N as f64;
        assert!(equal < 4, "{what}: {equal} of {N} elements equal the base sequence");
        assert!(r.abs() < 0.0196, "{what}: correlation with the base sequence {r}");
    }
}

#[test]
fn element_and_bulk_generation_agree() {
    // Three rayon tasks of fill_normal (4096 blocks each) plus a partial block.
    let n = 3 * 4 * 4096 + 7;
    let (seed, stream) = (u64::MAX - 3, 1 << 40);
    let mut bulk = vec![0.0f32; n];
    fill_normal(seed, stream, &mut bulk);
    let single: Vec<f32> = (0..n as u64).map(|i| normal(seed, stream, i)).collect();
    assert_bits_equal("normal(i) vs fill_normal", &single, &bulk);
}

#[test]
fn ranges_at_any_offset_match_element_generation() {
    // fill_normal_from computes eight Philox blocks side by side: starts inside a block and
    // inside a group, lengths shorter than a block and spanning groups, and block counters that
    // cross 2^32 (the counter's second word) must all give normal(i) bit for bit.
    let (seed, stream) = (0x1234_5678_9ABC_DEF0, 77);
    for start in [0u64, 1, 3, 5, 31, 32, 33, (1 << 34) - 13] {
        for len in [1usize, 3, 4, 29, 64, 101] {
            let mut range = vec![0.0f32; len];
            fill_normal_from(seed, stream, start, &mut range);
            let single: Vec<f32> = (start..start + len as u64).map(|i| normal(seed, stream, i)).collect();
            assert_bits_equal(&format!("fill_normal_from({start}, len {len})"), &single, &range);
        }
    }
}

#[test]
fn uniform_covers_the_open_unit_interval_exactly() {
    assert_eq!(uniform(0), f32::from_bits(0x3380_0000), "smallest is 2^-24");
    assert_eq!(uniform(u32::MAX), 1.0 - f32::from_bits(0x3380_0000), "largest is 1 - 2^-24");
    assert_eq!(uniform(0x8000_0000), 0.5 + f32::from_bits(0x3380_0000));
    // The low 9 bits are dropped.
    assert_eq!(uniform(0x1234_5600), uniform(0x1234_57FF));
}

#[test]
fn stream_id_packs_draw_adapter_and_direction() {
    assert_eq!(stream_id(0, 3, 1), 7);
    assert_eq!(stream_id(70_000, 2, 0), 4_587_520_004);
    assert_eq!(stream_id(1, 0, 0), 1 << 16);
}

#[test]
fn polynomials_match_numpy_on_every_uniform_value() {
    // The noise fixture samples ~11k elements; here ln, sin and cos are compared with NumPy on
    // all 2^23 values the generator can draw, through the checksum of tools/make_philox_fixture.py:
    // sum_k bits(f(u_k)) * P^(k+1) mod 2^64 with P odd, so any one-ulp difference shows.
    const P: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes = read_fixture();
    let fixture = SafeTensors::deserialize(&bytes).unwrap();
    let want = u64s(fixture.tensor("polynomial_checksums").unwrap().data());
    let (mut sums, mut power) = ([0u64; 3], 1u64);
    for k in 0u32..1 << 23 {
        let u = uniform(k << 9);
        let (s, c) = sincos_2pi(u);
        power = power.wrapping_mul(P);
        for (sum, value) in sums.iter_mut().zip([ln(u), s, c]) {
            *sum = sum.wrapping_add(u64::from(value.to_bits()).wrapping_mul(power));
        }
    }
    assert_eq!(sums.to_vec(), want, "checksums of [ln, sin, cos] over every uniform value differ from NumPy's");
}

#[test]
fn ln_polynomial_is_accurate_on_every_uniform_value() {
    // Every value the generator can feed to ln: the 2^23 odd multiples of 2^-24 in (0, 1).
    // m - 1 is exact, m + 1, the division, s*s, the Horner steps, s*p and the two final additions
    // each round once (half an ulp); the final e*ln2 + ln(m) can cancel by up to a factor 2 when
    // e = -1. That budget stays under 3 f32 epsilons relative (measured worst: 1.75).
    let bound = 3.0 * f32::EPSILON as f64;
    let mut worst = (0.0f64, 0.0f32);
    for odd in (1u32..1 << 24).step_by(2) {
        let u = odd as f32 * f32::from_bits(0x3380_0000);
        let exact = (u as f64).ln();
        let rel = ((ln(u) as f64 - exact) / exact).abs();
        if rel > worst.0 {
            worst = (rel, u);
        }
    }
    assert!(worst.0 < bound, "ln: relative error {:e} at u = {:e} exceeds {bound:e}", worst.0, worst.1);
}

#[test]
fn sincos_polynomials_are_accurate_on_every_uniform_value() {
    // Every value the generator can feed to sincos_2pi. The argument x = f * 2pi carries the
    // rounding of 2pi to f32 (2.8e-8 relative) and of the product (6e-8 relative): with |x| <= pi/4
    // that is up to 6.9e-8 absolute, passed on with slope <= 1. The final rounding of a result
    // below 1 adds up to 3e-8, the other roundings and the series truncation (< 2e-9) ~2e-8:
    // 1.2e-7 in all, bound 1.5e-7 (measured worst: 9.7e-8).
    let bound = 1.5e-7;
    let (mut worst_sin, mut worst_cos) = (0.0f64, 0.0f64);
    for odd in (1u32..1 << 24).step_by(2) {
        let u = odd as f32 * f32::from_bits(0x3380_0000);
        let (s, c) = sincos_2pi(u);
        let angle = std::f64::consts::TAU * u as f64;
        worst_sin = worst_sin.max((s as f64 - angle.sin()).abs());
        worst_cos = worst_cos.max((c as f64 - angle.cos()).abs());
    }
    assert!(worst_sin < bound, "sin(2 pi u): max abs error {worst_sin:e} exceeds {bound:e}");
    assert!(worst_cos < bound, "cos(2 pi u): max abs error {worst_cos:e} exceeds {bound:e}");
}

#[test]
fn normal_noise_rejects_a_shape_too_large_to_count() {
    let err = normal_noise(&Device::Cpu, &[usize::MAX, 2], 0, 0).unwrap_err().to_string();
    assert!(err.contains("normal_noise") && err.contains(&format!("[{}, 2]", usize::MAX)), "unexpected message: {err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Element i depends only on (seed, stream, i): a tensor is a prefix of any longer one drawn
    /// under the same key, whatever its shape.
    #[test]
    fn noise_depends_only_on_the_flat_index(rows in 1usize..40, cols in 1usize..300, extra in 0usize..600,
                                            seed in any::<u64>(), stream in any::<u64>()) {
        let longer = normal_noise(&Device::Cpu, &[rows * cols + extra], seed, stream).unwrap().to_vec().unwrap();
        for device in devices() {
            let noise = normal_noise(&device, &[rows, cols], seed, stream).unwrap().to_vec().unwrap();
            assert_bits_equal(&format!("[{rows}, {cols}] on {} vs prefix", device.name()), &noise, &longer[..rows * cols]);
        }
    }
}

#[test]
fn noise_modes_map_draws_to_streams_and_parse_by_name() {
    for draw in [0u64, 1, 2, 3, 40, 41, (1 << 40) + 7] {
        assert_eq!(NoiseMode::Plain.source(draw), (draw, false));
        assert_eq!(NoiseMode::Antithetic.source(draw), (draw & !1, draw % 2 == 1));
        // The kernels' form: clear negate_bit in the nominal stream, negate when it was set.
        for mode in NoiseMode::ALL {
            let (bit, nominal) = (mode.negate_bit(), stream_id(draw, 5, 1));
            let (source, negate) = mode.source(draw);
            assert_eq!((nominal & !bit, nominal & bit != 0), (stream_id(source, 5, 1), negate), "{mode} draw {draw}");
        }
    }
    assert_eq!(NoiseMode::default(), NoiseMode::Plain);
    for mode in NoiseMode::ALL {
        assert_eq!(mode.name().parse::<NoiseMode>().unwrap(), mode);
    }
    let err = "sobol".parse::<NoiseMode>().unwrap_err().to_string();
    assert!(err.contains("`sobol`") && err.contains("plain, antithetic"), "{err}");
}
