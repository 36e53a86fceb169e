//! One GPU: its context, the owned stream every op runs on, a cuBLAS handle bound to that stream
//! and the kernel modules loaded so far; one per ordinal for the life of the process.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream};

use super::availability::runtime_unavailable_reason;
use super::blas::configure_strict_fp32;
use super::kernels::{ptx_for, KernelFamily};
use crate::error::{Error, Result};

/// Values shared per device ordinal: made on first request, then the same `Arc` every time.
/// A failed `make` is not remembered, so a later request tries again.
pub struct OrdinalCache<T> {
    slots: Mutex<HashMap<usize, Arc<T>>>,
}

impl<T> Default for OrdinalCache<T> {
    fn default() -> Self {
        OrdinalCache { slots: Mutex::new(HashMap::new()) }
    }
}

impl<T> OrdinalCache<T> {
    pub fn get_or_try_insert<E>(
        &self,
        ordinal: usize,
        make: impl FnOnce() -> std::result::Result<Arc<T>, E>,
    ) -> std::result::Result<Arc<T>, E> {
        // The lock is held while `make` runs so that two threads never open the same device twice.
        // A panic while it was held left the map itself intact, so a poisoned lock is still usable.
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(value) = slots.get(&ordinal) {
            return Ok(value.clone());
        }
        let value = make()?;
        slots.insert(ordinal, value.clone());
        Ok(value)
    }

    /// How many ordinals hold a value.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The process-wide devices. Never dropped: kernel handles cached in statics
/// ([`super::Kernel`]) stay valid because their contexts live as long as the process.
fn devices() -> &'static OrdinalCache<CudaDevice> {
    static DEVICES: OnceLock<OrdinalCache<CudaDevice>> = OnceLock::new();
    DEVICES.get_or_init(OrdinalCache::default)
}

/// How the emulated driver (tools/emulated_gpu/driver.cc) names its device.
pub const EMULATED_DEVICE_NAME: &str = "mcs-engine emulated GPU";

pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Never dropped through cudarc: its `Drop` unwraps the destroy status and would panic after
    /// a device fault. [`Drop for CudaDevice`] destroys the handle and ignores a failure instead.
    blas: ManuallyDrop<CudaBlas>,
    /// One slot per [`KernelFamily`] (indexed by `family as usize`).
    modules: Vec<OnceLock<Arc<CudaModule>>>,
    /// Serialises the first load of a module (NVRTC compiles take a second; do them once).
    module_loading: Mutex<()>,
    /// Functions found by name through [`CudaDevice::function`], per family.
    functions: Vec<RwLock<HashMap<String, CudaFunction>>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{}", self.ordinal)
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        let handle = *self.blas.handle();
        // SAFETY: the handle belongs to this device and nothing uses it after this point; the
        // wrapper is never dropped (ManuallyDrop), so it is destroyed exactly once. The status is
        // ignored on purpose: a Drop must not panic, and a sticky device error already surfaced.
        let _ = unsafe { cudarc::cublas::sys::cublasDestroy_v2(handle) };
    }
}

impl CudaDevice {
    /// GPU `ordinal`, opened on first request and shared afterwards. Returns
    /// [`Error::CudaUnavailable`] instead of panicking when there is no usable CUDA installation
    /// or no such device.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        devices().get_or_try_insert(ordinal, || Self::open(ordinal))
    }

    fn open(ordinal: usize) -> Result<Arc<Self>> {
        if let Some(reason) = runtime_unavailable_reason() {
            return Err(Error::CudaUnavailable(reason.to_string()));
        }
        let count = CudaContext::device_count().map_err(Error::driver("counting devices"))?;
        if ordinal >= count as usize {
            return Err(Error::CudaUnavailable(format!("device {ordinal} requested but only {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::driver(format!("opening device {ordinal}")))?;
        // SAFETY: every buffer of the engine is allocated, used and freed on this device's one
        // stream (below), whose order already serialises all of it; cudarc's per-buffer events
        // only matter across streams. Disabled before the first buffer or stream exists.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(Error::driver(format!("creating a stream on device {ordinal}")))?;
        keep_freed_memory_pooled(&ctx)?;
        let blas = CudaBlas::new(stream.clone()).map_err(Error::blas("creating the cuBLAS handle"))?;
        let blas = ManuallyDrop::new(blas);
        configure_strict_fp32(&blas)?;
        let families = KernelFamily::ALL.len();
        Ok(Arc::new(CudaDevice {
            ordinal,
            ctx,
            stream,
            blas,
            modules: (0..families).map(|_| OnceLock::new()).collect(),
            module_loading: Mutex::new(()),
            functions: (0..families).map(|_| RwLock::new(HashMap::new())).collect(),
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name as its driver reports it.
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(Error::driver("reading the device name"))
    }

    /// True on the emulated GPU of `tools/emulated_gpu.sh` (docs/emulated_gpu.md): the CUDA code
    /// runs there for correctness, but its timings say nothing about a GPU.
    pub fn is_emulated(&self) -> bool {
        self.name().is_ok_and(|name| name.starts_with(EMULATED_DEVICE_NAME))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's own (non-default) stream: every op, copy and GEMM is queued on it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// The module of `family`, loading (and, without usable prebuilt PTX, compiling) it the first
    /// time it is asked for.
    pub fn module(&self, family: KernelFamily) -> Result<&Arc<CudaModule>> {
        let slot = &self.modules[family as usize];
        if let Some(module) = slot.get() {
            return Ok(module);
        }
        let _loading = self.module_loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(module) = slot.get() {
            return Ok(module); // another thread loaded it while this one waited
        }
        let cc = self.ctx.compute_capability().map_err(Error::driver("reading the compute capability"))?;
        let ptx = ptx_for(family, cc)?;
        let module =
            self.ctx.load_module(ptx).map_err(Error::driver(format!("loading kernels/{}.cu", family.stem())))?;
        Ok(slot.get_or_init(|| module))
    }

    /// Finds kernel `name` in `family`'s module (no caching).
    pub(crate) fn load_function(&self, family: KernelFamily, name: &str) -> Result<CudaFunction> {
        self.module(family)?
            .load_function(name)
            .map_err(Error::driver(format!("finding kernel `{name}` in kernels/{}.cu", family.stem())))
    }

    /// The kernel `name` from `family`, cached by name. Hot launch sites should prefer a static
    /// [`super::Kernel`] handle, which needs neither a lock nor a name lookup.
    pub fn function(&self, family: KernelFamily, name: &str) -> Result<CudaFunction> {
        let cache = &self.functions[family as usize];
        if let Some(f) = cache.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(name) {
            return Ok(f.clone());
        }
        let f = self.load_function(family, name)?;
        cache.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Reports an error cudarc recorded where it could not return one (freeing a buffer, dropping
    /// a stream or event): such errors would otherwise go unseen.
    pub fn check_deferred_errors(&self) -> Result<()> {
        self.ctx.check_err().map_err(Error::driver("freeing device memory earlier (error deferred by cudarc)"))
    }

    /// A device buffer of `len` zeros.
    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros(len.max(1)).map_err(Error::driver(format!("allocating {len} floats")))
    }

    /// A device buffer whose contents a kernel will overwrite entirely.
    pub fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: callers pass the buffer to a kernel that writes every element before anything
        // reads it; uninitialised device memory is never read.
        unsafe { self.stream.alloc::<f32>(len.max(1)) }.map_err(Error::driver(format!("allocating {len} floats")))
    }

    pub fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        if data.is_empty() {
            return self.zeros(0);
        }
        self.stream.clone_htod(data).map_err(Error::driver(format!("copying {} floats to the GPU", data.len())))
    }

    pub fn download(&self, data: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>> {
        let mut all = self.stream.clone_dtoh(data).map_err(Error::driver("copying a tensor to the host"))?;
        self.check_deferred_errors()?;
        all.truncate(len);
        Ok(all)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(Error::driver("synchronising the stream"))?;
        self.check_deferred_errors()
    }

    /// An event with timing enabled (cudarc's default disables it), recorded at the current end
    /// of the stream: the GPU stamps it when it reaches that point.
    pub fn record_timing_event(&self) -> Result<CudaEvent> {
        self.stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(Error::driver("recording a timing event on the stream"))
    }
}

/// Seconds on the GPU's clock from `start` to `end`, two events of [`CudaDevice::record_timing_event`];
/// waits until the GPU has reached `end`.
pub fn seconds_between(start: &CudaEvent, end: &CudaEvent) -> Result<f64> {
    let ms = start.elapsed_ms(end).map_err(Error::driver("reading the time between two stream events"))?;
    Ok(f64::from(ms) / 1e3)
}

/// Stream-ordered allocations come from the device's default memory pool, which by default hands
/// freed memory back to the driver at every synchronisation; an unlimited release threshold keeps
/// it for the next predict call or training step instead.
fn keep_freed_memory_pooled(ctx: &CudaContext) -> Result<()> {
    if !ctx.has_async_alloc() {
        return Ok(()); // no pools: cudarc frees synchronously
    }
    use cudarc::driver::{result, sys};
    // SAFETY: `cu_device` is the live device of `ctx`; the pool is the driver's default pool of
    // that device, and the attribute value is a u64 read during the call.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device())
            .map_err(Error::driver("finding the default memory pool"))?;
        let mut threshold = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut std::ffi::c_void,
        )
        .map_err(Error::driver("setting the memory pool's release threshold"))
    }
}
