//! Adam (src/ops/adam.rs): the CPU step against an f64 re-implementation of torch.optim.Adam over
//! several steps, the first-step property |Δp| = lr, in-place updates, errors for shared
//! parameters, bad shapes and bad hyper-parameters, checkpoint round trips, and the fused GPU
//! launch against the CPU bit for bit.

mod common;

use common::{assert_close, gpu, random_vec};
use mcs_engine::ops::{adam_step, AdamConfig, AdamMoments, AdamState};
use mcs_engine::{Device, Tensor};

/// Parameter shapes of a small model: a matrix, a bias, a scalar, an empty tensor, and one large
/// enough to span several CPU chunks and GPU blocks (and not a multiple of either).
const SHAPES: [&[usize]; 5] = [&[7, 13], &[13], &[], &[0, 4], &[3, 16_411]];

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Initial parameter values, in [-1, 1).
fn initial_params(seed: u64) -> Vec<Vec<f32>> {
    SHAPES.iter().enumerate().map(|(i, s)| random_vec(seed + i as u64, numel(s), -1.0, 1.0)).collect()
}

/// Gradients of step `t`: magnitudes vary by step and parameter (1e-3 to 10) so the moments
/// see both growth and decay.
fn gradients(seed: u64, t: u64) -> Vec<Vec<f32>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let size = 10f32.powi((t as i32 + i as i32) % 5 - 3);
            random_vec(seed * 1000 + t * 10 + i as u64, numel(s), -size, size)
        })
        .collect()
}

/// torch.optim.Adam's update in f64, as written in its single-tensor step (AdamW's decoupled
/// decay `p *= 1 - lr * weight_decay` first, as torch.optim.AdamW).
struct ReferenceAdam {
    params: Vec<Vec<f64>>,
    m: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    t: i32,
}

impl ReferenceAdam {
    fn new(params: &[Vec<f32>]) -> Self {
        let widen = |p: &Vec<f32>| p.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let zeros = |p: &Vec<f32>| vec![0.0; p.len()];
        ReferenceAdam {
            params: params.iter().map(widen).collect(),
            m: params.iter().map(zeros).collect(),
            v: params.iter().map(zeros).collect(),
            t: 0,
        }
    }

    fn step(&mut self, grads: &[Vec<f32>], lr: f64, cfg: AdamConfig) {
        self.t += 1;
        let bias_correction1 = 1.0 - cfg.beta1.powi(self.t);
        let bias_correction2 = 1.0 - cfg.beta2.powi(self.t);
        let step_size = lr / bias_correction1;
        for (((p, m), v), g) in self.params.iter_mut().zip(&mut self.m).zip(&mut self.v).zip(grads) {
            for j in 0..p.len() {
                p[j] *= 1.0 - lr * cfg.weight_decay;
                let g = g[j] as f64;
                m[j] = cfg.beta1 * m[j] + (1.0 - cfg.beta1) * g;
                v[j] = cfg.beta2 * v[j] + (1.0 - cfg.beta2) * g * g;
                let denom = v[j].sqrt() / bias_correction2.sqrt() + cfg.eps;
                p[j] -= step_size * m[j] / denom;
            }
        }
    }
}

fn tensors(values: &[Vec<f32>], device: &Device) -> Vec<Tensor> {
    values.iter().zip(SHAPES).map(|(v, s)| Tensor::from_slice(v, s, device).unwrap()).collect()
}

/// Runs `steps` Adam steps on `device` from the deterministic parameters and gradients; returns
/// the final parameters and the state.
fn run_steps(device: &Device, steps: u64, lr: f64, cfg: AdamConfig) -> (Vec<Tensor>, AdamState) {
    let mut params = tensors(&initial_params(1), device);
    let mut state = AdamState::new(&params.iter().collect::<Vec<_>>()).unwrap();
    for t in 1..=steps {
        let grads = tensors(&gradients(2, t), device);
        let mut param_refs: Vec<&mut Tensor> = params.iter_mut().collect();
        adam_step(&mut param_refs, &grads.iter().collect::<Vec<_>>(), &mut state, lr, cfg).unwrap();
    }
    (params, state)
}

fn to_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&x| x as f32).collect()
}

#[test]
fn cpu_steps_match_f64_reference_of_pytorch_formula() {
    // The defaults, betas whose lerp weight 1 - beta1 = 0.7 takes PyTorch's other lerp branch, and
    // AdamW's decoupled weight decay (MedCLIP-SAMv2's 0.1).
    let configs = [
        AdamConfig::default(),
        AdamConfig { beta1: 0.3, beta2: 0.99, eps: 1e-6, weight_decay: 0.0 },
        AdamConfig { weight_decay: 0.1, ..AdamConfig::default() },
    ];
    for cfg in configs {
        let (lr, steps) = (1e-2, 6);
        let (params, state) = run_steps(&Device::Cpu, steps, lr, cfg);
        let mut reference = ReferenceAdam::new(&initial_params(1));
        for t in 1..=steps {
            reference.step(&gradients(2, t), lr, cfg);
        }
        assert_eq!(state.step_count(), steps);
        for (i, p) in params.iter().enumerate() {
            // Parameters in [-1, 1] moved by <= ~3 lr per step: each step rounds the f32 sum once
            // (<= 6e-8) and the update carries a few ulps of relative error (~1e-6 * 0.03), so
            // six steps stay below 1e-6 absolute.
            assert_close(&format!("{cfg:?} param {i}"), &p.to_vec().unwrap(), &to_f32(&reference.params[i]), 1e-6, 0.0);
            // m = m + w (g - m) rounds twice per step at the scale of max(|m|, |g|), so where m
            // and g cancel the error is absolute: 3e-6 of the largest gradient covers six steps
            // of ~2.4e-7 each. v sums positive terms only: 1e-5 relative (~100 ulps) is ample,
            // and the absolute floor only covers exact zeros.
            let largest_gradient =
                (1..=steps).flat_map(|t| gradients(2, t).swap_remove(i)).fold(0.0f32, |a, g| a.max(g.abs()));
            let AdamMoments { m, v } = &state.moments()[i];
            let m_atol = 3e-6 * largest_gradient;
            assert_close(&format!("{cfg:?} m {i}"), &m.to_vec().unwrap(), &to_f32(&reference.m[i]), m_atol, 1e-5);
            assert_close(&format!("{cfg:?} v {i}"), &v.to_vec().unwrap(), &to_f32(&reference.v[i]), 1e-30, 1e-5);
        }
    }
}

#[test]
fn first_step_moves_every_element_by_the_learning_rate() {
    // At t = 1 the bias-corrected moments are g and g^2, so the update is lr * g / (|g| + eps):
    // lr * sign(g) up to eps / |g| <= 1e-8 / 1e-3 relative.
    let lr = 3e-3;
    let start = initial_params(1);
    let (params, _) = run_steps(&Device::Cpu, 1, lr, AdamConfig::default());
    for ((p, p0), g) in params.iter().zip(&start).zip(gradients(2, 1)) {
        for ((&after, &before), &g) in p.to_vec().unwrap().iter().zip(p0).zip(&g) {
            if g.abs() < 1e-3 {
                continue;
            }
            let moved = (before as f64 - after as f64) * g.signum() as f64;
            // Rounding of the f32 parameter (<= 6e-8 each side) dominates the eps term (<= 3e-8).
            assert!((moved - lr).abs() < 2e-7, "moved {moved} for gradient {g}, lr {lr}");
        }
    }
}

#[test]
fn cpu_parameters_are_updated_in_place() {
    let mut params = tensors(&initial_params(1), &Device::Cpu);
    let before: Vec<Vec<f32>> = params.iter().map(|p| p.to_vec().unwrap()).collect();
    let pointers: Vec<*const f32> = params.iter().map(|p| p.cpu_data("test").unwrap().as_ptr()).collect();
    let mut state = AdamState::new(&params.iter().collect::<Vec<_>>()).unwrap();
    let grads = tensors(&gradients(2, 1), &Device::Cpu);
    let ids: Vec<_> = params.iter().map(Tensor::id).collect();
    let mut refs: Vec<&mut Tensor> = params.iter_mut().collect();
    adam_step(&mut refs, &grads.iter().collect::<Vec<_>>(), &mut state, 1e-2, AdamConfig::default()).unwrap();
    for (i, p) in params.iter().enumerate() {
        assert_eq!(p.cpu_data("test").unwrap().as_ptr(), pointers[i], "parameter {i} was reallocated");
        assert_eq!(p.id(), ids[i], "parameter {i} changed identity");
        if p.numel() > 0 {
            assert_ne!(p.to_vec().unwrap(), before[i], "parameter {i} did not change");
        }
    }
}

#[test]
fn a_shared_parameter_is_an_error_naming_it_and_nothing_changes() {
    let mut params = tensors(&initial_params(1), &Device::Cpu);
    let before: Vec<Vec<f32>> = params.iter().map(|p| p.to_vec().unwrap()).collect();
    let mut state = AdamState::new(&params.iter().collect::<Vec<_>>()).unwrap();
    let grads = tensors(&gradients(2, 1), &Device::Cpu);
    let alive_clone = params[1].clone();
    let mut refs: Vec<&mut Tensor> = params.iter_mut().collect();
    let err = adam_step(&mut refs, &grads.iter().collect::<Vec<_>>(), &mut state, 1e-2, AdamConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("parameter 1") && err.contains("shared"), "unexpected message: {err}");
    assert_eq!(state.step_count(), 0);
    for (i, p) in params.iter().enumerate() {
        assert_eq!(p.to_vec().unwrap(), before[i], "parameter {i} changed in a failed step");
    }
    drop(alive_clone);

    // A moment held outside the state blocks the step the same way.
    let held_moment = state.moments()[2].v.clone();
    let mut refs: Vec<&mut Tensor> = params.iter_mut().collect();
    let err = adam_step(&mut refs, &grads.iter().collect::<Vec<_>>(), &mut state, 1e-2, AdamConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("parameter 2") && err.contains("moments"), "unexpected message: {err}");
    drop(held_moment);
    let mut refs: Vec<&mut Tensor> = params.iter_mut().collect();
    adam_step(&mut refs, &grads.iter().collect::<Vec<_>>(), &mut state, 1e-2, AdamConfig::default()).unwrap();
    assert_eq!(state.step_count(), 1);
}

#[test]
fn mismatched_shapes_counts_and_hyper_parameters_are_errors() {
    let cpu = Device::Cpu;
    let mut p = Tensor::zeros(&[2, 3], &cpu).unwrap();
    let mut state = AdamState::new(&[&p]).unwrap();
    let wrong = Tensor::zeros(&[3, 2], &cpu).unwrap();
    let err = adam_step(&mut [&mut p], &[&wrong], &mut state, 1e-3, AdamConfig::default()).unwrap_err().to_string();
    assert!(err.contains("parameter 0") && err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");

    let g = Tensor::zeros(&[2, 3], &cpu).unwrap();
    let err = adam_step(&mut [&mut p], &[&g, &g], &mut state, 1e-3, AdamConfig::default()).unwrap_err().to_string();
    assert!(err.contains("1 parameters, 2 gradients"), "{err}");

    let bad = AdamConfig { beta1: 1.0, ..AdamConfig::default() };
    let err = adam_step(&mut [&mut p], &[&g], &mut state, 1e-3, bad).unwrap_err().to_string();
    assert!(err.contains("beta1") && err.contains('1'), "{err}");
    let bad = AdamConfig { eps: 0.0, ..AdamConfig::default() };
    let err = adam_step(&mut [&mut p], &[&g], &mut state, 1e-3, bad).unwrap_err().to_string();
    assert!(err.contains("eps"), "{err}");
    let bad = AdamConfig { weight_decay: -0.1, ..AdamConfig::default() };
    let err = adam_step(&mut [&mut p], &[&g], &mut state, 1e-3, bad).unwrap_err().to_string();
    assert!(err.contains("weight decay") && err.contains("-0.1"), "{err}");
    let err = adam_step(&mut [&mut p], &[&g], &mut state, f64::NAN, AdamConfig::default()).unwrap_err().to_string();
    assert!(err.contains("learning rate") && err.contains("NaN"), "{err}");
    assert_eq!(state.step_count(), 0, "a rejected step must not count");

    let m = Tensor::zeros(&[2, 3], &cpu).unwrap();
    let err = AdamState::from_moments(vec![AdamMoments { m, v: Tensor::zeros(&[6], &cpu).unwrap() }], 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[2, 3]") && err.contains("[6]"), "{err}");
}

#[test]
fn a_restored_state_continues_exactly() {
    let cfg = AdamConfig::default();
    let (mut params, mut state) = run_steps(&Device::Cpu, 3, 1e-2, cfg);
    let saved: Vec<(Vec<f32>, Vec<f32>)> =
        state.moments().iter().map(|mv| (mv.m.to_vec().unwrap(), mv.v.to_vec().unwrap())).collect();
    let restored_moments = saved
        .iter()
        .zip(SHAPES)
        .map(|((m, v), s)| AdamMoments {
            m: Tensor::from_vec(m.clone(), s).unwrap(),
            v: Tensor::from_vec(v.clone(), s).unwrap(),
        })
        .collect();
    let mut restored = AdamState::from_moments(restored_moments, state.step_count()).unwrap();
    let mut restored_params: Vec<Tensor> =
        params.iter().zip(SHAPES).map(|(p, s)| Tensor::from_vec(p.to_vec().unwrap(), s).unwrap()).collect();
    for t in 4..=5 {
        let grads = tensors(&gradients(2, t), &Device::Cpu);
        let grad_refs: Vec<&Tensor> = grads.iter().collect();
        adam_step(&mut params.iter_mut().collect::<Vec<_>>(), &grad_refs, &mut state, 1e-2, cfg).unwrap();
        adam_step(&mut restored_params.iter_mut().collect::<Vec<_>>(), &grad_refs, &mut restored, 1e-2, cfg).unwrap();
    }
    assert_eq!(restored.step_count(), 5);
    for (i, (a, b)) in params.iter().zip(&restored_params).enumerate() {
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "parameter {i} diverged after restoring");
    }
}

#[test]
fn gpu_fused_step_matches_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    for cfg in [AdamConfig::default(), AdamConfig { weight_decay: 0.1, ..AdamConfig::default() }] {
        let (on_gpu, gpu_state) = run_steps(&gpu, 5, 1e-2, cfg);
        let (on_cpu, cpu_state) = run_steps(&Device::Cpu, 5, 1e-2, cfg);
        assert_eq!(gpu_state.step_count(), 5);
        let bits = |t: &Tensor| t.to_vec().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        for i in 0..SHAPES.len() {
            // The kernel performs the CPU's operations with explicitly rounded intrinsics: no tolerance.
            assert_eq!(bits(&on_gpu[i]), bits(&on_cpu[i]), "parameter {i}: gpu and cpu differ");
            assert_eq!(bits(&gpu_state.moments()[i].m), bits(&cpu_state.moments()[i].m), "m {i}: gpu and cpu differ");
            assert_eq!(bits(&gpu_state.moments()[i].v), bits(&cpu_state.moments()[i].v), "v {i}: gpu and cpu differ");
        }
    }
}
