//! Proof that the emulated GPU (tools/emulated_gpu.sh, docs/emulated_gpu.md) can fail: known
//! faults are put into copies of kernel sources and launchers, and each must be reported by the
//! emulated run, naming the kernel; the same run without the fault must pass (so the report comes
//! from the fault, not from the set-up).
//!
//! Every case runs in a child process (this binary again, with `MCS_FAULT_CHILD=<case>`), because a
//! device fault is sticky for the rest of its process, as on a real GPU. Kernel-source faults are
//! built into a separate kernel folder (`tools/emulated_gpu.sh kernels`) that the child loads
//! through `MCS_EMU_KERNELS`. The test needs the emulated device: on a real GPU it skips, and
//! without any GPU it skips (or fails under `REQUIRE_GPU=1`, as the other GPU tests do).

mod common;

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;

use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use mcs_engine::cuda::{launch_rows, CudaDevice, KernelFamily};
use mcs_engine::ops::elementwise::sum_to_shape;
use mcs_engine::ops::softmax::softmax_forward;
use mcs_engine::{Device, Result, Tensor};

const CHILD_VAR: &str = "MCS_FAULT_CHILD";

/// One fault: what it breaks, the child case that runs the broken code, and what the report must say.
struct Fault {
    what: &'static str,
    /// Kernel-source fault: (file under kernels/, text to find exactly once, its replacement).
    source_edit: Option<(&'static str, &'static str, &'static str)>,
    /// The child case that runs the faulty code, and the one that runs the same code without the fault.
    faulty_case: &'static str,
    clean_case: &'static str,
    expected: &'static [&'static str],
}

const FAULTS: &[Fault] = &[
    Fault {
        what: "a removed __syncthreads() in a block reduction",
        source_edit: Some((
            "block_reduce.cuh",
            "    if (lane == 0) scratch[warp] = v;\n    __syncthreads();\n    v = lane < warps ? scratch[lane] : 0.0f;",
            "    if (lane == 0) scratch[warp] = v;\n    v = lane < warps ? scratch[lane] : 0.0f;",
        )),
        faulty_case: "softmax",
        clean_case: "softmax",
        expected: &["shared-memory race", "`softmax_forward`"],
    },
    Fault {
        what: "an off-by-one loop bound",
        source_edit: Some((
            "softmax.cu",
            "for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, xr[c] + (mr",
            "for (int c = threadIdx.x; c <= cols; c += blockDim.x) m = fmaxf(m, xr[c] + (mr",
        )),
        faulty_case: "softmax",
        clean_case: "softmax",
        expected: &["out-of-bounds global memory read", "`softmax_forward`", "past the end of allocation"],
    },
    Fault {
        what: "a shared-memory array one element short",
        source_edit: Some((
            "elementwise.cu",
            "__shared__ float partial[SUM_THREADS];",
            "__shared__ float partial[SUM_THREADS - 1];",
        )),
        faulty_case: "sum_to_shape",
        clean_case: "sum_to_shape",
        expected: &["out-of-bounds shared memory write", "`sum_to_shape`", "partial"],
    },
    Fault {
        what: "a block size that is not a whole number of warps",
        source_edit: None,
        faulty_case: "softmax_block_of_48",
        clean_case: "softmax_block_of_64",
        expected: &["__shfl_xor_sync", "`softmax_forward`", "not a whole number of warps"],
    },
    Fault {
        what: "two launcher arguments swapped",
        source_edit: None,
        faulty_case: "softmax_output_and_input_swapped",
        clean_case: "softmax_block_of_64",
        expected: &["uninitialised global memory read", "`softmax_forward`"],
    },
    Fault {
        what: "a cuBLAS leading dimension off by one",
        source_edit: None,
        faulty_case: "gemm_lda_one_too_large",
        clean_case: "gemm",
        expected: &["cublasGemmStridedBatchedEx", "past its end"],
    },
];

fn main() {
    if let Ok(case) = std::env::var(CHILD_VAR) {
        let code = match child(&case) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("child `{case}` failed: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    if let Some(skip) = skip_reason() {
        println!("skip: {skip}");
        return;
    }
    let scratch = std::env::temp_dir().join(format!("mcs-emulator-faults-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("create a scratch folder");
    let mut failures = Vec::new();
    for (i, fault) in FAULTS.iter().enumerate() {
        match check_fault(fault, &scratch.join(format!("fault-{i}"))) {
            Ok(report) => println!("ok: {} is reported: {report}", fault.what),
            Err(why) => {
                println!("FAILED: {}: {why}", fault.what);
                failures.push(fault.what);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!("{} of {} faults reported", FAULTS.len() - failures.len(), FAULTS.len());
    if !failures.is_empty() {
        std::process::exit(1);
    }
}

/// Why the fault tests cannot run here, or `None` on the emulated device.
fn skip_reason() -> Option<String> {
    let require = std::env::var("REQUIRE_GPU").is_ok_and(|v| v == "1");
    let dev = match CudaDevice::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            assert!(!require, "REQUIRE_GPU=1 but no GPU can be used: {e}");
            return Some(format!("no GPU ({e}); the fault tests run on the emulated GPU (tools/emulated_gpu.sh)"));
        }
    };
    (!dev.is_emulated()).then(|| "a real GPU: the fault tests run on the emulated GPU only".to_string())
}

/// Runs the clean and the faulty child; Ok with the report's first line when the fault is reported
/// as expected and the clean run passes.
fn check_fault(fault: &Fault, dir: &Path) -> std::result::Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let faulty_kernels = match fault.source_edit {
        Some((file, find, replace)) => Some(build_faulty_kernels(dir, file, find, replace)?),
        None => None,
    };
    let clean = run_child(fault.clean_case, None, &dir.join("clean-report.txt"))?;
    if !clean.0 {
        return Err(format!("the run without the fault failed too:\n{}", clean.1));
    }
    let (succeeded, report) = run_child(fault.faulty_case, faulty_kernels.as_deref(), &dir.join("report.txt"))?;
    if succeeded {
        return Err(format!("the faulty run succeeded; report: {report:?}"));
    }
    let missing: Vec<&str> = fault.expected.iter().copied().filter(|e| !report.contains(e)).collect();
    if !missing.is_empty() {
        return Err(format!("the report lacks {missing:?}:\n{report}"));
    }
    Ok(report.lines().next().unwrap_or_default().to_string())
}

/// A copy of kernels/ with one edit, built by tools/emulated_gpu.sh into `dir/kernels-built`.
fn build_faulty_kernels(dir: &Path, file: &str, find: &str, replace: &str) -> std::result::Result<PathBuf, String> {
    let root = common::repo_root();
    let source = dir.join("kernels");
    std::fs::create_dir_all(&source).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(root.join("kernels")).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let name = path.file_name().expect("a file name");
        std::fs::copy(&path, source.join(name)).map_err(|e| e.to_string())?;
    }
    let target = source.join(file);
    let text = std::fs::read_to_string(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    // Exactly one match: if the kernel is rewritten, this test must be updated, not silently pass.
    let count = text.matches(find).count();
    if count != 1 {
        return Err(format!(
            "kernels/{file} holds {count} copies of the text the fault replaces (expected 1): {find:?}"
        ));
    }
    std::fs::write(&target, text.replace(find, replace)).map_err(|e| e.to_string())?;
    let built = dir.join("kernels-built");
    let output = Command::new(root.join("tools/emulated_gpu.sh"))
        .arg("kernels")
        .arg(&source)
        .arg(&built)
        .output()
        .map_err(|e| format!("cannot run tools/emulated_gpu.sh: {e}"))?;
    if !output.status.success() {
        return Err(format!("building the faulty kernels failed:\n{}", String::from_utf8_lossy(&output.stderr)));
    }
    Ok(built)
}

/// Runs this binary as child `case`; returns whether it succeeded and the emulator's report
/// (the lines it appended to `report`), or the child's stderr when it reported nothing.
fn run_child(case: &str, kernels: Option<&Path>, report: &Path) -> std::result::Result<(bool, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut command = Command::new(exe);
    command.env(CHILD_VAR, case).env("MCS_EMU_REPORT", report);
    if let Some(dir) = kernels {
        command.env("MCS_EMU_KERNELS", dir);
    }
    let output = command.output().map_err(|e| format!("cannot start the child `{case}`: {e}"))?;
    let reported = std::fs::read_to_string(report).unwrap_or_default();
    let text = if reported.is_empty() { String::from_utf8_lossy(&output.stderr).into_owned() } else { reported };
    Ok((output.status.success(), text))
}

// ---- the child cases ----------------------------------------------------------------------------

fn child(case: &str) -> Result<()> {
    let dev = CudaDevice::new(0)?;
    let gpu = Device::Cuda(dev.clone());
    match case {
        "softmax" => softmax_through_the_op(&gpu),
        "sum_to_shape" => sum_through_the_op(&gpu),
        "softmax_block_of_64" => softmax_launched_here(&dev, 64, false),
        "softmax_block_of_48" => softmax_launched_here(&dev, 48, false),
        "softmax_output_and_input_swapped" => softmax_launched_here(&dev, 64, true),
        "gemm" => gemm_launched_here(&dev, 0),
        "gemm_lda_one_too_large" => gemm_launched_here(&dev, 1),
        other => Err(mcs_engine::Error::Invalid(format!("unknown child case `{other}`"))),
    }
}

/// Row data with a distinct value everywhere, so a wrong element shows.
fn rows(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| ((i * 37 % 101) as f32) / 25.0 - 2.0).collect()
}

fn softmax_through_the_op(gpu: &Device) -> Result<()> {
    let (r, c) = (3, 300);
    let x = rows(r, c);
    let got = softmax_forward(&Tensor::from_slice(&x, &[r, c], gpu)?, None)?.to_vec()?;
    let want = softmax_forward(&Tensor::from_slice(&x, &[r, c], &Device::Cpu)?, None)?.to_vec()?;
    // Same operations in f32 on both sides; only the summation order differs (1e-5 is ~80 ulp).
    common::assert_close("softmax", &got, &want, 1e-5, 1e-5);
    Ok(())
}

fn sum_through_the_op(gpu: &Device) -> Result<()> {
    let (r, c) = (64, 33);
    let x = rows(r, c);
    let got = sum_to_shape(&Tensor::from_slice(&x, &[r, c], gpu)?, &[c])?.to_vec()?;
    let want = sum_to_shape(&Tensor::from_slice(&x, &[r, c], &Device::Cpu)?, &[c])?.to_vec()?;
    // Same operations in f32 on both sides; only the summation order differs (1e-5 is ~80 ulp).
    common::assert_close("sum_to_shape", &got, &want, 1e-5, 1e-5);
    Ok(())
}

/// A copy of softmax's launcher (src/ops/softmax.rs) with the block size and argument order as given.
fn softmax_launched_here(dev: &std::sync::Arc<CudaDevice>, threads: u32, swap_output_and_input: bool) -> Result<()> {
    let (r, c) = (2, 100);
    let data = rows(r, c);
    let x = dev.upload(&data)?;
    let mut y = dev.alloc(r * c)?;
    let null: u64 = 0;
    let (cols, rows_per_mask_row) = (c as i32, 1i32);
    let f = dev.function(KernelFamily::Softmax, "softmax_forward")?;
    let mut b = dev.stream().launch_builder(&f);
    if swap_output_and_input {
        b.arg(&x).arg(&mut y);
    } else {
        b.arg(&mut y).arg(&x);
    }
    b.arg(&null).arg(&cols).arg(&rows_per_mask_row);
    // SAFETY: softmax_forward(float* y, const float* x, const float* mask, int cols, int
    // rows_per_mask_row) over r rows of c floats in x and y; the faulty cases break this on purpose,
    // against the emulated device, which checks every access.
    unsafe { b.launch(launch_rows(r, threads)?) }.map_err(mcs_engine::Error::driver("launching softmax_forward"))?;
    let got = dev.download(&y, r * c)?;
    let want = softmax_forward(&Tensor::from_slice(&data, &[r, c], &Device::Cpu)?, None)?.to_vec()?;
    // Same operations in f32 on both sides; only the summation order differs (1e-5 is ~80 ulp).
    common::assert_close("softmax", &got, &want, 1e-5, 1e-5);
    Ok(())
}

/// C = A B (row-major 3x4 times 4x5) through cuBLAS as the engine calls it, with cuBLAS's lda
/// (here B's leading dimension, the operands swap for row-major) raised by `lda_error`.
fn gemm_launched_here(dev: &std::sync::Arc<CudaDevice>, lda_error: i32) -> Result<()> {
    let (m, k, n) = (3usize, 4usize, 5usize);
    let a_host = rows(m, k);
    let b_host = rows(k, n);
    let a: CudaSlice<f32> = dev.upload(&a_host)?;
    let b: CudaSlice<f32> = dev.upload(&b_host)?;
    let mut c = dev.alloc(m * n)?;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let stream = dev.stream();
    let (a_ptr, _ga) = a.device_ptr(stream);
    let (b_ptr, _gb) = b.device_ptr(stream);
    let (c_ptr, _gc) = c.device_ptr_mut(stream);
    // SAFETY: column-major C^T (n x m) = B^T (n x k) A^T (k x m) over buffers of exactly k*n, m*k
    // and m*n floats; the faulty case passes a leading dimension one too large on purpose.
    unsafe {
        blas_result::gemm_strided_batched_ex(
            *dev.blas().handle(),
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const c_void,
            b_ptr as *const c_void,
            blas_sys::cudaDataType_t::CUDA_R_32F,
            n as i32 + lda_error,
            0,
            a_ptr as *const c_void,
            blas_sys::cudaDataType_t::CUDA_R_32F,
            k as i32,
            0,
            (&beta) as *const f32 as *const c_void,
            c_ptr as *mut c_void,
            blas_sys::cudaDataType_t::CUDA_R_32F,
            n as i32,
            0,
            1,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(mcs_engine::Error::blas("running the SGEMM"))?;
    drop((_ga, _gb, _gc));
    let got = dev.download(&c, m * n)?;
    let want: Vec<f32> =
        (0..m * n).map(|i| (0..k).map(|p| a_host[(i / n) * k + p] * b_host[p * n + i % n]).sum()).collect();
    // Same operations in f32 on both sides; only the summation order differs (1e-5 is ~80 ulp).
    common::assert_close("gemm", &got, &want, 1e-5, 1e-5);
    Ok(())
}
