//! Philox dropout (src/ops/dropout.rs): the dropped fraction and pair statistics against their
//! binomial expectations, reproducibility by key, outputs and gradients against an f64 reference,
//! finite differences, p = 0 as the identity, bad probabilities, stream ids apart from the noise
//! streams, and CPU against GPU bit for bit.

mod common;

use std::collections::HashSet;

use common::{assert_close, check_gradients, devices, gpu, random_vec};
use mcs_engine::ops::{dropout, dropout_backward, dropout_forward, dropout_keeps, dropout_stream_id, DropoutKey};
use mcs_engine::philox::stream_id;
use mcs_engine::{Device, Tape, Tensor};

const KEY: DropoutKey = DropoutKey { seed: 0x5EED_1234_ABCD, stream: 7 };

/// The kept mask of `dropout(ones)`: kept elements are 1 / (1 - p) > 0, dropped ones 0.
fn kept_mask(device: &Device, n: usize, p: f32, key: DropoutKey) -> Vec<bool> {
    let ones = Tensor::ones(&[n], device).unwrap();
    dropout(&Tape::inference(), &ones, p, key).unwrap().to_vec().unwrap().iter().map(|&y| y > 0.0).collect()
}

/// Six standard deviations of the mean of `n` Bernoulli(`q`) draws, plus the generator's
/// resolution: uniforms are odd multiples of 2^-24, so P(u < p) is within 2^-23 of p.
fn six_sigma(q: f64, n: usize) -> f64 {
    6.0 * (q * (1.0 - q) / n as f64).sqrt() + 2f64.powi(-23)
}

#[test]
fn dropped_fraction_and_pairs_match_the_binomial_expectation() {
    // 2^20 elements: six sigma is <= 3e-3, so a generator biased by more fails, while an unbiased
    // one fails with probability ~2e-9 (and the draw is fixed, so never flakes).
    let n = 1 << 20;
    for device in devices() {
        for p in [0.1f32, 0.5, 0.9] {
            let kept = kept_mask(&device, n, p, KEY);
            let dropped = kept.iter().filter(|&&k| !k).count() as f64 / n as f64;
            let p64 = p as f64;
            assert!(
                (dropped - p64).abs() < six_sigma(p64, n),
                "p {p} on {}: dropped fraction {dropped}",
                device.name()
            );
            // Neighbours share a Philox block; disjoint pairs both dropped should be p^2 apart
            // from any correlation within the block.
            let pairs = n / 2;
            let both = kept.chunks(2).filter(|pair| !pair[0] && !pair[1]).count() as f64 / pairs as f64;
            let want = p64 * p64;
            assert!((both - want).abs() < six_sigma(want, pairs), "p {p} on {}: both dropped {both}", device.name());
        }
    }
}

#[test]
fn masks_are_reproducible_by_key_and_differ_between_keys() {
    let (n, p) = (100_003, 0.1f32);
    let agreement = |a: &[bool], b: &[bool]| a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / n as f64;
    // Independent masks agree where both keep or both drop: (1 - p)^2 + p^2.
    let independent = (1.0 - p as f64).powi(2) + (p as f64).powi(2);
    for device in devices() {
        let first = kept_mask(&device, n, p, KEY);
        assert_eq!(first, kept_mask(&device, n, p, KEY), "same key, different mask on {}", device.name());
        for other in [DropoutKey { stream: KEY.stream + 1, ..KEY }, DropoutKey { seed: KEY.seed + 1, ..KEY }] {
            let second = kept_mask(&device, n, p, other);
            let agree = agreement(&first, &second);
            assert!(
                (agree - independent).abs() < six_sigma(independent, n),
                "{other:?} vs {KEY:?} on {}: agreement {agree}, independent masks give {independent}",
                device.name()
            );
        }
    }
}

#[test]
fn outputs_and_gradients_match_f64_reference() {
    let (n, p) = (4 * 257 + 3, 0.3f32);
    let x = random_vec(1, n, -3.0, 3.0);
    let dy = random_vec(2, n, -1.0, 1.0);
    let reference = |values: &[f32]| -> Vec<f32> {
        let scale = 1.0 / (1.0 - p as f64);
        let keep = |i: usize| if dropout_keeps(KEY, p, i as u64) { scale } else { 0.0 };
        values.iter().enumerate().map(|(i, &v)| (v as f64 * keep(i)) as f32).collect()
    };
    for device in devices() {
        let tape = Tape::new();
        let xt = Tensor::from_slice(&x, &[n], &device).unwrap().into_trainable();
        let y = dropout(&tape, &xt, p, KEY).unwrap();
        let grads = tape.backward_from(&y, Tensor::from_slice(&dy, &[n], &device).unwrap()).unwrap();
        // Rounding 1 / (1 - p) to f32, the product, and the f64 reference to f32: three half-ulps.
        let rtol = 2e-7;
        assert_close(&format!("dropout on {}", device.name()), &y.to_vec().unwrap(), &reference(&x), 0.0, rtol);
        let dx = grads.get(&xt).unwrap().to_vec().unwrap();
        assert_close(&format!("dropout backward on {}", device.name()), &dx, &reference(&dy), 0.0, rtol);
    }
}

// Given its key, dropout is linear in x: central differences in f32 with step 1e-2 err only by
// rounding, ~1e-7 * |L| / 1e-2 ~ 1e-4 for these sizes, so 1e-3 absolute is ample.
#[test]
fn gradient_matches_finite_differences() {
    for shape in [vec![3, 5], vec![2, 3, 7], vec![1]] {
        let n = shape.iter().product();
        let x = random_vec(3, n, -2.0, 2.0);
        check_gradients(&format!("dropout {shape:?}"), &[(x, shape.clone())], &[], 1e-2, 1e-3, 1e-3, |tape, t| {
            dropout(tape, &t[0], 0.4, KEY)
        });
    }
}

#[test]
fn zero_probability_is_the_identity_and_records_nothing() {
    for device in devices() {
        let tape = Tape::new();
        let x = Tensor::from_slice(&random_vec(4, 37, -1.0, 1.0), &[37], &device).unwrap().into_trainable();
        let y = dropout(&tape, &x, 0.0, KEY).unwrap();
        assert_eq!(y.id(), x.id(), "p = 0 on {} made a new tensor", device.name());
        assert!(tape.is_empty(), "p = 0 on {} recorded a tape entry", device.name());
        assert_eq!(y.to_vec().unwrap(), x.to_vec().unwrap());
    }
}

#[test]
fn probabilities_outside_zero_one_are_errors() {
    let x = Tensor::zeros(&[4], &Device::Cpu).unwrap();
    for p in [-0.1f32, 1.0, 1.5, f32::NAN] {
        let err = dropout(&Tape::new(), &x, p, KEY).unwrap_err().to_string();
        assert!(err.contains("dropout") && err.contains(&p.to_string()), "p {p}: unexpected message: {err}");
        assert!(dropout_forward(&x, p, KEY).is_err() && dropout_backward(&x, p, KEY).is_err(), "p {p} accepted");
    }
}

#[test]
fn stream_ids_are_distinct_and_apart_from_the_noise_streams() {
    let mut ids = HashSet::new();
    for step in [0u64, 1, 2, 999, (1 << 39) - 1] {
        for layer in 0..13 {
            for site in 0..4 {
                let id = dropout_stream_id(step, layer, site);
                assert!(ids.insert(id), "dropout_stream_id({step}, {layer}, {site}) repeats {id:#x}");
            }
        }
    }
    // Training keys dropout by its step's noise draw, 2^40 + step: consecutive steps stay apart,
    // and step k's ids are step k's (the low 39 bits), so the ids of a run do not repeat.
    let base = mcs_engine::train::step::TRAIN_DRAW_BASE;
    for step in [0u64, 1, 999] {
        assert_eq!(dropout_stream_id(base + step, 3, 1), dropout_stream_id(step, 3, 1));
    }
    assert_ne!(dropout_stream_id(base, 0, 0), dropout_stream_id(base + 1, 0, 0));
    // Probabilistic-attention noise streams with the same small numbers, and its largest draw.
    for draw in [0u64, 1, 2, 999, (1 << 48) - 1] {
        for adapter in 0..13 {
            for direction in 0..2 {
                let id = stream_id(draw, adapter, direction);
                assert!(!ids.contains(&id), "noise stream {id:#x} is also a dropout stream");
            }
        }
    }
}

#[test]
fn gpu_masks_and_gradients_match_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    // Not a multiple of 4, so the last Philox block is partial; large enough for many blocks.
    let n = (1 << 20) + 3;
    let x = random_vec(5, n, -4.0, 4.0);
    let bits = |t: Tensor| t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    for p in [0.1f32, 0.5] {
        let on = |device: &Device| {
            let xt = Tensor::from_slice(&x, &[n], device).unwrap();
            (bits(dropout_forward(&xt, p, KEY).unwrap()), bits(dropout_backward(&xt, p, KEY).unwrap()))
        };
        let (gpu_out, cpu_out) = (on(&gpu), on(&Device::Cpu));
        // Integer Philox, an exact comparison and one rounded product on both: no tolerance.
        assert!(gpu_out.0 == cpu_out.0, "p {p}: forward differs between gpu and cpu");
        assert!(gpu_out.1 == cpu_out.1, "p {p}: backward differs between gpu and cpu");
    }
}
