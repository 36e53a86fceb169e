//! The CUDA runtime layer (src/cuda/) without needing a GPU: why CUDA is unavailable, where
//! kernels would come from, one device per ordinal, launch-size limits, the debug switch for
//! synchronous launches and the compiler flags. Where a GPU is present the same properties are
//! checked on it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mcs_engine::cuda::kernels::{float_flags, nvrtc_options};
use mcs_engine::cuda::{
    gpu_available, kernel_ptx_source, launch_rows, runtime_reason, sync_launches_requested, unavailable_reason,
    OrdinalCache, PtxSource, RuntimeProbes, MAX_GRID_X,
};
use mcs_engine::Device;

fn probes(driver: bool, cublas: bool, devices: Result<i32, String>) -> RuntimeProbes {
    RuntimeProbes { driver_library: driver, cublas_library: cublas, devices }
}

#[test]
fn runtime_reasons_name_what_is_missing() {
    let reason = |p| runtime_reason(&p).unwrap_or_default();
    assert!(reason(probes(false, true, Ok(1))).contains("libcuda.so"));
    assert!(reason(probes(true, false, Ok(1))).contains("libcublas.so"));
    assert!(reason(probes(true, true, Ok(0))).contains("no device"));
    assert!(reason(probes(true, true, Err("CUDA_ERROR_NO_DEVICE".into()))).contains("CUDA_ERROR_NO_DEVICE"));
    assert_eq!(runtime_reason(&probes(true, true, Ok(2))), None);
}

#[test]
fn kernels_come_from_prebuilt_ptx_or_nvrtc_or_an_error_says_why_not() {
    assert_eq!(kernel_ptx_source(true, (9, 0), false), Ok(PtxSource::Prebuilt));
    assert_eq!(kernel_ptx_source(true, (10, 0), false), Ok(PtxSource::Prebuilt));
    // sm_90 PTX does not run on an Ampere device: NVRTC compiles for the device's own arch.
    assert_eq!(kernel_ptx_source(true, (8, 0), true), Ok(PtxSource::Nvrtc("compute_80")));
    assert_eq!(kernel_ptx_source(false, (9, 0), true), Ok(PtxSource::Nvrtc("compute_90")));
    let no_nvcc = kernel_ptx_source(false, (9, 0), false).unwrap_err();
    assert!(no_nvcc.contains("no nvcc") && no_nvcc.contains("libnvrtc"), "{no_nvcc}");
    let old_device = kernel_ptx_source(true, (8, 6), false).unwrap_err();
    assert!(old_device.contains("compute capability 8.6") && old_device.contains("libnvrtc"), "{old_device}");
}

/// Without a GPU the reason is a sentence, the skip line carries it, and opening a device
/// returns it as an error instead of panicking.
#[test]
fn an_unusable_gpu_is_explained_everywhere() {
    if gpu_available() {
        assert_eq!(unavailable_reason(), None);
        return;
    }
    let reason = unavailable_reason().expect("no GPU, so a reason");
    assert!(reason.len() > 10, "reason too short to help: {reason:?}");
    assert!(common::skip_line(reason).starts_with("skip: no GPU (") && common::skip_line(reason).contains(reason));
    let err = Device::cuda(0).unwrap_err().to_string();
    assert!(err.contains("CUDA is not available"), "{err}");
}

#[test]
fn ordinal_cache_makes_one_value_per_ordinal_and_retries_failures() {
    let cache: OrdinalCache<usize> = OrdinalCache::default();
    let made = AtomicUsize::new(0);
    let make = |ordinal: usize| {
        made.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(Arc::new(ordinal * 10))
    };
    let first = cache.get_or_try_insert(0, || make(0)).unwrap();
    let again = cache.get_or_try_insert(0, || make(0)).unwrap();
    assert!(Arc::ptr_eq(&first, &again), "a second request made a second value");
    let other = cache.get_or_try_insert(1, || make(1)).unwrap();
    assert_eq!((*first, *other, made.load(Ordering::SeqCst)), (0, 10, 2));
    // A failure is returned and not remembered.
    assert_eq!(cache.get_or_try_insert(2, || Err::<Arc<usize>, _>("busy".to_string())).unwrap_err(), "busy");
    assert_eq!(*cache.get_or_try_insert(2, || make(2)).unwrap(), 20);
    assert_eq!(cache.len(), 3);
}

/// Concurrent first requests still make exactly one value.
#[test]
fn ordinal_cache_is_shared_across_threads() {
    let cache: OrdinalCache<usize> = OrdinalCache::default();
    let made = AtomicUsize::new(0);
    let values: Vec<Arc<usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    cache
                        .get_or_try_insert(3, || {
                            made.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, ()>(Arc::new(3))
                        })
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(made.load(Ordering::SeqCst), 1);
    assert!(values.iter().all(|v| Arc::ptr_eq(v, &values[0])));
}

#[test]
fn devices_are_opened_once_per_ordinal() {
    let Some(gpu) = common::gpu() else { return };
    let (Device::Cuda(a), Device::Cuda(b)) = (gpu, Device::cuda(0).unwrap()) else { unreachable!("cuda devices") };
    assert!(Arc::ptr_eq(&a, &b), "Device::cuda(0) opened a second context");
    assert!(Arc::ptr_eq(a.stream(), b.stream()));
}

#[test]
fn launch_rows_refuses_more_rows_than_a_grid_holds() {
    let fits = launch_rows(MAX_GRID_X, 256).unwrap();
    assert_eq!(fits.grid_dim.0 as usize, MAX_GRID_X);
    assert_eq!(launch_rows(0, 32).unwrap().grid_dim.0, 1, "an empty launch still needs one block");
    let err = launch_rows(MAX_GRID_X + 1, 256).unwrap_err().to_string();
    assert!(err.contains(&(MAX_GRID_X + 1).to_string()), "{err}");
    assert!(launch_rows(u32::MAX as usize + 5, 256).is_err(), "a row count above u32 must not wrap");
}

#[test]
fn sync_launch_switch_accepts_the_usual_spellings() {
    for on in ["1", "true", "TRUE", " yes "] {
        assert!(sync_launches_requested(Some(on)), "{on:?}");
    }
    for off in [None, Some(""), Some("0"), Some("false"), Some("2")] {
        assert!(!sync_launches_requested(off), "{off:?}");
    }
}

/// nvcc (build.rs) and NVRTC share one flag list; FMA contraction is on for both, and the
/// Philox fixture test (tests/philox.rs) is what proves the generator is unaffected by it.
#[test]
fn nvcc_and_nvrtc_get_the_same_float_flags() {
    let flags = float_flags();
    for wanted in ["--fmad=true", "--prec-div=true", "--prec-sqrt=true", "--ftz=false"] {
        assert!(flags.contains(&wanted), "{wanted} missing from {flags:?}");
    }
    let nvrtc = nvrtc_options();
    assert!(flags.iter().all(|f| nvrtc.iter().any(|o| o == f)), "NVRTC options {nvrtc:?} lack some of {flags:?}");
}

/// A time mark reads its device's clock: the host clock on the CPU; on a GPU events on the stream,
/// whose interval lies within the host's time from before the first mark to after waiting for
/// the second (the GPU cannot reach a mark before it is queued, and `seconds_until` waits).
#[test]
fn time_marks_read_their_devices_clock() {
    use mcs_engine::ops::matmul::{matmul_forward, MatmulOpts};
    use mcs_engine::Tensor;
    use std::time::{Duration, Instant};

    let start = Device::Cpu.time_mark().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let end = Device::Cpu.time_mark().unwrap();
    let slept = start.seconds_until(&end).unwrap();
    // A sleep lasts at least what it asks; the upper bound only catches a unit mistake (ms for s).
    assert!((0.020..5.0).contains(&slept), "20 ms sleep measured as {slept} s");
    assert_eq!(end.seconds_until(&start).unwrap(), 0.0, "an earlier mark is no time after a later one");
    assert_eq!(Device::Cpu.clock(), "host clock");
    let timed = Device::Cpu
        .time(|| {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        })
        .unwrap();
    assert!((0.020..5.0).contains(&timed), "20 ms sleep timed as {timed} s");
    let failed = Device::Cpu.time(|| Err(mcs_engine::Error::Invalid("step failed".into())));
    assert!(failed.is_err_and(|e| e.to_string().contains("step failed")), "a failing step's error is passed on");

    let Some(gpu) = common::gpu() else { return };
    let n = 2048;
    let a = Tensor::from_slice(&vec![0.5; n * n], &[n, n], &gpu).unwrap();
    gpu.synchronize().unwrap();
    let host_start = Instant::now();
    let gpu_start = gpu.time_mark().unwrap();
    for _ in 0..4 {
        matmul_forward(&a, &a, MatmulOpts::default()).unwrap();
    }
    let gpu_end = gpu.time_mark().unwrap();
    let on_gpu = gpu_start.seconds_until(&gpu_end).unwrap();
    let on_host = host_start.elapsed().as_secs_f64();
    assert_eq!(gpu.clock(), "cuda events");
    // Four 2048^3 products are 69 GFLOP: well over a microsecond on any GPU, so the event
    // interval is not zero; 10 us covers the events' stated resolution (about 0.5 us) and
    // the two clocks' different ticks.
    assert!(on_gpu > 0.0 && on_gpu <= on_host + 1e-5, "GPU {on_gpu} s against host {on_host} s");
    assert!(start.seconds_until(&gpu_end).is_err(), "a host mark and a GPU mark compared");
}
