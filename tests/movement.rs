//! Movement family (kernels/movement.cu, src/ops/movement.rs): reshape, permute, transpose,
//! narrow, concat, index_select_rows and repeat_rows against independent index arithmetic on every
//! device, GPU against CPU, and gradients against finite differences. These ops only move values,
//! so forward results must be exact.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::{concat, index_select_rows, narrow, permute, repeat_rows, reshape, transpose};
use mcs_engine::{Device, Tape, Tensor};
use proptest::prelude::*;

fn strides(shape: &[usize]) -> Vec<usize> {
    (0..shape.len()).map(|d| shape[d + 1..].iter().product()).collect()
}

/// The multi-index of flat position `i` in a row-major `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        index[d] = i % shape[d];
        i /= shape[d];
    }
    index
}

fn ravel(index: &[usize], shape: &[usize]) -> usize {
    index.iter().zip(strides(shape)).map(|(i, s)| i * s).sum()
}

/// Reference permute: out[index] = x[index mapped back through perm].
fn permute_reference(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    (0..x.len())
        .map(|i| {
            let out_index = unravel(i, &out_shape);
            let mut in_index = vec![0; shape.len()];
            for (d, &p) in perm.iter().enumerate() {
                in_index[p] = out_index[d];
            }
            x[ravel(&in_index, shape)]
        })
        .collect()
}

/// A permutation of 0..rank from a seed (Fisher-Yates with a tiny LCG).
fn seeded_permutation(rank: usize, seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..rank).collect();
    let mut state = seed;
    for i in (1..rank).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        perm.swap(i, (state >> 33) as usize % (i + 1));
    }
    perm
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn permute_matches_reference(shape in proptest::collection::vec(1usize..9, 1..=6), seed in any::<u64>()) {
        let perm = seeded_permutation(shape.len(), seed);
        let n: usize = shape.iter().product();
        let x = random_vec(seed, n, -1.0, 1.0);
        let want = permute_reference(&x, &shape, &perm);
        for device in devices() {
            let xt = Tensor::from_slice(&x, &shape, &device).unwrap();
            let y = permute(&Tape::inference(), &xt, &perm).unwrap();
            let want_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            prop_assert_eq!(y.shape(), want_shape.as_slice());
            // A copy: exact.
            prop_assert_eq!(y.to_vec().unwrap(), want.clone(), "permute {:?} by {:?} on {}", shape, perm, device.name());
        }
    }

    #[test]
    fn narrow_matches_reference(shape in proptest::collection::vec(1usize..8, 1..=4), seed in any::<u64>()) {
        let dim = seed as usize % shape.len();
        let start = (seed >> 8) as usize % shape[dim];
        let len = (seed >> 16) as usize % (shape[dim] - start + 1);
        let x = random_vec(seed, shape.iter().product(), -1.0, 1.0);
        let mut out_shape = shape.clone();
        out_shape[dim] = len;
        let want: Vec<f32> = (0..out_shape.iter().product())
            .map(|i| {
                let mut index = unravel(i, &out_shape);
                index[dim] += start;
                x[ravel(&index, &shape)]
            })
            .collect();
        for device in devices() {
            let xt = Tensor::from_slice(&x, &shape, &device).unwrap();
            let y = narrow(&Tape::inference(), &xt, dim, start, len).unwrap();
            prop_assert_eq!(y.shape(), out_shape.as_slice());
            prop_assert_eq!(y.to_vec().unwrap(), want.clone(), "narrow on {}", device.name());
        }
    }

    #[test]
    fn concat_matches_reference(shape in proptest::collection::vec(1usize..6, 1..=4), pieces in 1usize..4, seed in any::<u64>()) {
        let dim = seed as usize % shape.len();
        let shapes: Vec<Vec<usize>> = (0..pieces)
            .map(|j| {
                let mut s = shape.clone();
                s[dim] = (seed as usize >> (4 * j)) % 4; // 0..3 entries: empty pieces included
                s
            })
            .collect();
        let values: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(j, s)| random_vec(seed + j as u64, s.iter().product(), -1.0, 1.0)).collect();
        let mut out_shape = shape.clone();
        out_shape[dim] = shapes.iter().map(|s| s[dim]).sum();
        // Reference: find, for each output index, which piece holds it.
        let want: Vec<f32> = (0..out_shape.iter().product())
            .map(|i| {
                let mut index = unravel(i, &out_shape);
                let mut j = 0;
                while index[dim] >= shapes[j][dim] {
                    index[dim] -= shapes[j][dim];
                    j += 1;
                }
                values[j][ravel(&index, &shapes[j])]
            })
            .collect();
        for device in devices() {
            let ts: Vec<Tensor> = values.iter().zip(&shapes).map(|(v, s)| Tensor::from_slice(v, s, &device).unwrap()).collect();
            let refs: Vec<&Tensor> = ts.iter().collect();
            let y = concat(&Tape::inference(), &refs, dim).unwrap();
            prop_assert_eq!(y.shape(), out_shape.as_slice());
            prop_assert_eq!(y.to_vec().unwrap(), want.clone(), "concat on {}", device.name());
        }
    }

    #[test]
    fn index_select_rows_matches_reference(rows in 1usize..40, cols in 1usize..300, picks in 0usize..50, seed in any::<u64>()) {
        let table = random_vec(seed, rows * cols, -1.0, 1.0);
        let ids: Vec<u32> = random_vec(seed ^ 7, picks, 0.0, rows as f32).iter().map(|&v| (v as u32).min(rows as u32 - 1)).collect();
        let want: Vec<f32> = ids.iter().flat_map(|&id| (0..cols).map(move |c| (id as usize, c))).map(|(r, c)| table[r * cols + c]).collect();
        for device in devices() {
            let t = Tensor::from_slice(&table, &[rows, cols], &device).unwrap();
            let y = index_select_rows(&Tape::inference(), &t, &ids).unwrap();
            prop_assert_eq!(y.shape(), &[picks, cols]);
            prop_assert_eq!(y.to_vec().unwrap(), want.clone(), "index_select_rows on {}", device.name());
        }
    }
}

#[test]
fn reshape_shares_storage_and_transpose_swaps() {
    for device in devices() {
        let x = random_tensor(1, &[2, 3, 4], -1.0, 1.0, &device);
        let r = reshape(&Tape::inference(), &x, &[6, 4]).unwrap();
        assert_eq!(r.shape(), &[6, 4]);
        assert_eq!(r.to_vec().unwrap(), x.to_vec().unwrap());
        let t = transpose(&Tape::inference(), &x, 0, 2).unwrap();
        assert_eq!(t.shape(), &[4, 3, 2]);
        let want = permute_reference(&x.to_vec().unwrap(), &[2, 3, 4], &[2, 1, 0]);
        assert_eq!(t.to_vec().unwrap(), want, "transpose on {}", device.name());
    }
}

#[test]
fn repeat_rows_stacks_copies() {
    for device in devices() {
        let row = Tensor::from_slice(&[1.0, 2.0, 3.0], &[3], &device).unwrap();
        let y = repeat_rows(&Tape::inference(), &row, 4).unwrap();
        assert_eq!(y.shape(), &[4, 3]);
        assert_eq!(y.to_vec().unwrap(), [1.0, 2.0, 3.0].repeat(4), "repeat_rows on {}", device.name());
    }
}

// Every op here is linear in its input, so central differences have no truncation error; with
// eps 1e-2 and a probe sum of ~100 terms of size ~1, f32 rounding gives ~1e-4. 1e-3 sits above it.
const GRAD_EPS: f32 = 1e-2;
const GRAD_ATOL: f32 = 1e-3;
const GRAD_RTOL: f32 = 1e-3;

#[test]
fn movement_gradients_match_finite_differences() {
    let x = || (random_vec(3, 2 * 3 * 4, -1.0, 1.0), vec![2, 3, 4]);
    check_gradients("reshape", &[x()], &[], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |t, p| reshape(t, &p[0], &[4, 6]));
    check_gradients("permute", &[x()], &[], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |t, p| permute(t, &p[0], &[1, 2, 0]));
    check_gradients("transpose", &[x()], &[], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |t, p| transpose(t, &p[0], 1, 2));
    check_gradients("narrow", &[x()], &[], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |t, p| narrow(t, &p[0], 1, 1, 2));
    check_gradients(
        "repeat_rows",
        &[(random_vec(4, 5, -1.0, 1.0), vec![5])],
        &[],
        GRAD_EPS,
        GRAD_ATOL,
        GRAD_RTOL,
        |t, p| repeat_rows(t, &p[0], 3),
    );
    let pieces =
        [x(), (random_vec(5, 2 * 4, -1.0, 1.0), vec![2, 1, 4]), (random_vec(6, 2 * 2 * 4, -1.0, 1.0), vec![2, 2, 4])];
    check_gradients("concat", &pieces, &[], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |t, p| {
        concat(t, &[&p[0], &p[1], &p[2]], 1)
    });
    check_gradients("concat with a frozen piece", &pieces, &[1], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |t, p| {
        concat(t, &[&p[0], &p[1], &p[2]], 1)
    });
    // Repeated ids: their gradients must add up.
    let table = (random_vec(7, 5 * 3, -1.0, 1.0), vec![5, 3]);
    check_gradients("index_select_rows", &[table], &[], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |t, p| {
        index_select_rows(t, &p[0], &[4, 0, 4, 2, 4])
    });
}

/// Output and input gradient of `f` on `device` for a fixed output gradient.
fn forward_and_grad(device: &Device, x: &Tensor, f: impl Fn(&Tape, &Tensor) -> Tensor) -> (Vec<f32>, Vec<f32>) {
    let tape = Tape::new();
    let x = x.to_device(device).unwrap().into_trainable();
    let y = f(&tape, &x);
    let dy = random_tensor(77, y.shape(), -1.0, 1.0, device);
    let grads = tape.backward_from(&y, dy).unwrap();
    (y.to_vec().unwrap(), grads.get(&x).unwrap().to_vec().unwrap())
}

/// One op under test, applied to the shared input.
type Case = dyn Fn(&Tape, &Tensor) -> Tensor;

#[test]
fn gpu_matches_cpu_forward_and_backward() {
    let Some(gpu) = gpu() else { return };
    let x = random_tensor(8, &[3, 5, 7, 33], -1.0, 1.0, &Device::Cpu);
    let cases: Vec<(&str, Box<Case>)> = vec![
        ("reshape", Box::new(|t, x| reshape(t, x, &[15, 231]).unwrap())),
        ("permute", Box::new(|t, x| permute(t, x, &[2, 0, 3, 1]).unwrap())),
        ("transpose", Box::new(|t, x| transpose(t, x, 1, 3).unwrap())),
        ("narrow", Box::new(|t, x| narrow(t, x, 2, 2, 4).unwrap())),
        (
            "concat",
            Box::new(|t, x| {
                let other = random_tensor(9, &[3, 5, 2, 33], -1.0, 1.0, &x.device());
                concat(t, &[x, &other], 2).unwrap()
            }),
        ),
        (
            "index_select_rows",
            Box::new(|t, x| {
                let table = reshape(t, x, &[105, 33]).unwrap();
                index_select_rows(t, &table, &[3, 104, 3, 0, 3, 77]).unwrap()
            }),
        ),
        ("repeat_rows", Box::new(|t, x| repeat_rows(t, x, 3).unwrap())),
    ];
    for (name, f) in &cases {
        let (y_gpu, dx_gpu) = forward_and_grad(&gpu, &x, f);
        let (y_cpu, dx_cpu) = forward_and_grad(&Device::Cpu, &x, f);
        assert_eq!(y_gpu, y_cpu, "{name} forward gpu vs cpu (a copy: exact)");
        // Gradients are copies, or sums in the same fixed order on both (index_select_rows), except
        // repeat_rows, whose 3-term column sum may be ordered differently by cuBLAS.
        assert_close(&format!("{name} backward gpu vs cpu"), &dx_gpu, &dx_cpu, 1e-6, 0.0);
    }
}

#[test]
fn bad_arguments_are_errors_naming_the_shapes() {
    let t = |shape: &[usize]| Tensor::zeros(shape, &Device::Cpu).unwrap();
    let tape = Tape::inference();
    let message = |r: mcs_engine::Result<Tensor>| r.unwrap_err().to_string();

    let err = message(reshape(&tape, &t(&[2, 3]), &[4, 2]));
    assert!(err.contains("[2, 3]") && err.contains("[4, 2]"), "{err}");
    let err = message(permute(&tape, &t(&[2, 3, 4]), &[0, 0, 1]));
    assert!(err.contains("[0, 0, 1]") && err.contains("[2, 3, 4]"), "{err}");
    let err = message(permute(&tape, &t(&[2, 3]), &[0]));
    assert!(err.contains("permutation") && err.contains("[2, 3]"), "{err}");
    let err = message(permute(&tape, &t(&[1; 7]), &[0, 1, 2, 3, 4, 5, 6]));
    assert!(err.contains("rank <= 6"), "{err}");
    let err = message(transpose(&tape, &t(&[2, 3]), 0, 2));
    assert!(err.contains("dimension 2") && err.contains("[2, 3]"), "{err}");
    let err = message(narrow(&tape, &t(&[2, 5]), 1, 3, 3));
    assert!(err.contains("3..6") && err.contains("[2, 5]"), "{err}");
    let err = message(narrow(&tape, &t(&[2, 5]), 2, 0, 1));
    assert!(err.contains("dimension 2") && err.contains("[2, 5]"), "{err}");
    let err = message(concat(&tape, &[&t(&[2, 3]), &t(&[3, 3])], 1));
    assert!(err.contains("[2, 3]") && err.contains("[3, 3]"), "{err}");
    let err = message(concat(&tape, &[], 0));
    assert!(err.contains("at least one"), "{err}");
    let err = message(index_select_rows(&tape, &t(&[4, 3]), &[1, 4]));
    assert!(err.contains("id 4") && err.contains("position 1") && err.contains("[4, 3]"), "{err}");
    let err = message(index_select_rows(&tape, &t(&[4]), &[0]));
    assert!(err.contains("[4]"), "{err}");
}

/// repeat_batch: `copies` consecutive copies of the whole tensor, the gradient the sum of the
/// copies' gradients.
#[test]
fn repeat_batch_stacks_whole_copies_and_sums_their_gradients() {
    use mcs_engine::ops::repeat_batch;
    let x = random_vec(31, 2 * 3 * 4, -1.0, 1.0);
    for device in devices() {
        let xt = Tensor::from_slice(&x, &[2, 3, 4], &device).unwrap();
        let y = repeat_batch(&Tape::inference(), &xt, 3).unwrap();
        assert_eq!(y.shape(), [6, 3, 4]);
        // Exact: values are only copied.
        assert_close(&format!("repeat_batch on {}", device.name()), &y.to_vec().unwrap(), &x.repeat(3), 0.0, 0.0);
    }
    // Summing three copies is exact in f32 except for rounding of the sum itself, so the tape's
    // gradient meets finite differences with the same tolerance as the other movement ops.
    check_gradients("repeat_batch", &[(x.clone(), vec![2, 3, 4])], &[], 1e-2, 1e-3, 1e-3, |tape, xs| {
        repeat_batch(tape, &xs[0], 3)
    });
    let err = repeat_batch(&Tape::inference(), &Tensor::from_vec(x, &[2, 3, 4]).unwrap(), 0).unwrap_err().to_string();
    assert!(err.contains("at least one copy"), "{err}");
}

#[test]
fn repeat_batch_gpu_matches_cpu_forward_and_backward() {
    use mcs_engine::ops::repeat_batch;
    let Some(gpu) = gpu() else { return };
    let x = random_vec(32, 197 * 64, -1.0, 1.0);
    let run = |device: &Device| {
        let xt = Tensor::from_slice(&x, &[1, 197, 64], device).unwrap().into_trainable();
        let tape = Tape::new();
        let y = repeat_batch(&tape, &xt, 30).unwrap();
        let dy = Tensor::from_slice(&random_vec(33, y.numel(), -1.0, 1.0), y.shape(), device).unwrap();
        let grads = tape.backward_from(&y, dy).unwrap();
        (y.to_vec().unwrap(), grads.get(&xt).unwrap().to_vec().unwrap())
    };
    let (cpu_y, cpu_dx) = run(&Device::Cpu);
    let (gpu_y, gpu_dx) = run(&gpu);
    // Exact: copies, and a column sum in the same order on both devices.
    assert_close("repeat_batch forward GPU vs CPU", &gpu_y, &cpu_y, 0.0, 0.0);
    assert_close("repeat_batch backward GPU vs CPU", &gpu_dx, &cpu_dx, 0.0, 0.0);
}
