//! The tensor: a shape and contiguous, row-major f32 storage on one device.
//!
//! Tensors are immutable values: every op makes a new one, which keeps the autograd tape simple
//! (a saved input can never change under it). Cloning a tensor is cheap: the storage is shared.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;

use crate::cuda::CudaDevice;
use crate::device::Device;
use crate::error::{Error, Result};

/// Identifies a tensor for the autograd tape. Reshaping makes a new id over the same storage.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> TensorId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// The data behind a tensor.
pub enum Storage {
    Cpu(Vec<f32>),
    Cuda { device: Arc<CudaDevice>, data: CudaSlice<f32> },
}

/// Bytes of tensor storage alive now, and the most alive at once since the last
/// [`reset_peak_tensor_bytes`]: what the tape keeps for the backward pass is the growth of this
/// figure over a training forward pass (both devices counted together).
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

impl Storage {
    fn bytes(&self) -> usize {
        4 * match self {
            Storage::Cpu(v) => v.len(),
            Storage::Cuda { data, .. } => data.len(),
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.bytes(), Ordering::Relaxed);
        if let Storage::Cpu(values) = self {
            recycle(std::mem::take(values));
        }
    }
}

/// Host buffers of dropped tensors, kept by length for the next op that needs one. Every step of
/// a training loop or a predict call makes tensors of the same sizes again: reusing their memory
/// saves the zeroing (`vec![0.0; n]` is a memset once the allocator recycles memory) and the page
/// faults of fresh memory, about a tenth of a CPU training step.
struct HostPool {
    by_len: HashMap<usize, Vec<Vec<f32>>>,
    pooled_floats: usize,
}

static HOST_POOL: Mutex<Option<HostPool>> = Mutex::new(None);
/// At most this many floats (256 MiB) wait in the pool; beyond it dropped buffers are freed.
const POOL_LIMIT_FLOATS: usize = 64 << 20;
/// Smaller buffers are cheap to allocate and not worth the lock.
const POOL_MIN_FLOATS: usize = 1 << 10;

fn recycle(values: Vec<f32>) {
    let len = values.len();
    if len < POOL_MIN_FLOATS || values.capacity() != len {
        return;
    }
    // A poisoned lock only means a panic elsewhere while it was held; the pool is still sound.
    let mut guard = HOST_POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = guard.get_or_insert_with(|| HostPool { by_len: HashMap::new(), pooled_floats: 0 });
    if pool.pooled_floats + len <= POOL_LIMIT_FLOATS {
        pool.pooled_floats += len;
        pool.by_len.entry(len).or_default().push(values);
    }
}

/// A host buffer of `len` floats whose contents are unspecified (stale values of a dropped
/// tensor, or zeros): for CPU kernels that overwrite every element of their output.
pub(crate) fn host_buffer(len: usize) -> Vec<f32> {
    if len >= POOL_MIN_FLOATS {
        let mut guard = HOST_POOL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = guard.as_mut() {
            if let Some(values) = pool.by_len.get_mut(&len).and_then(Vec::pop) {
                pool.pooled_floats -= len;
                return values;
            }
        }
    }
    vec![0.0; len]
}

/// Bytes of all tensor storage alive now.
pub fn live_tensor_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// The peak of [`live_tensor_bytes`] since the last reset.
pub fn peak_tensor_bytes() -> usize {
    PEAK_BYTES.load(Ordering::Relaxed)
}

/// Starts a new peak measurement from what is alive now.
pub fn reset_peak_tensor_bytes() {
    PEAK_BYTES.store(live_tensor_bytes(), Ordering::Relaxed);
}

#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

struct Inner {
    id: TensorId,
    shape: Vec<usize>,
    storage: Arc<Storage>,
    needs_grad: bool,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?} on {}", self.0.id, self.0.shape, self.device().name())?;
        if self.0.needs_grad {
            write!(f, ", needs grad")?;
        }
        write!(f, ")")
    }
}

/// Number of elements of a shape (1 for a scalar `[]`).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// Wraps storage whose length must equal the shape's element count.
    pub(crate) fn from_storage(storage: Storage, shape: Vec<usize>) -> Tensor {
        let live = LIVE_BYTES.fetch_add(storage.bytes(), Ordering::Relaxed) + storage.bytes();
        PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
        Tensor(Arc::new(Inner { id: TensorId::fresh(), shape, storage: Arc::new(storage), needs_grad: false }))
    }

    /// A tensor on the CPU from host data.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::shape(
                "from_vec",
                format!("{} values cannot fill shape {shape:?} ({} elements)", data.len(), numel(shape)),
            ));
        }
        Ok(Tensor::from_storage(Storage::Cpu(data), shape.to_vec()))
    }

    /// A tensor on `device` from host data.
    pub fn from_slice(data: &[f32], shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape)?.to_device(device)
    }

    pub fn full(value: f32, shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_vec(vec![value; numel(shape)], shape)?.to_device(device)
    }

    pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Tensor::from_vec(vec![0.0; numel(shape)], shape),
            Device::Cuda(d) => Ok(Tensor::from_storage(
                Storage::Cuda { device: d.clone(), data: d.zeros(numel(shape))? },
                shape.to_vec(),
            )),
        }
    }

    /// A tensor of `value` with the shape and device of `like`.
    pub fn full_like(like: &Tensor, value: f32) -> Result<Tensor> {
        Tensor::full(value, like.shape(), &like.device())
    }

    pub fn ones(shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, device)
    }

    /// A scalar (shape `[]`).
    pub fn scalar(value: f32, device: &Device) -> Result<Tensor> {
        Tensor::full(value, &[], device)
    }

    pub fn id(&self) -> TensorId {
        self.0.id
    }

    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    pub fn rank(&self) -> usize {
        self.0.shape.len()
    }

    /// Size of dimension `dim`; negative values count from the end (-1 is the last).
    pub fn dim(&self, dim: isize) -> usize {
        let rank = self.rank() as isize;
        let d = if dim < 0 { rank + dim } else { dim };
        self.0.shape[d as usize]
    }

    pub fn numel(&self) -> usize {
        numel(&self.0.shape)
    }

    pub fn storage(&self) -> &Storage {
        &self.0.storage
    }

    pub fn device(&self) -> Device {
        match &*self.0.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda { device, .. } => Device::Cuda(device.clone()),
        }
    }

    /// True when the autograd tape will produce a gradient for this tensor.
    pub fn needs_grad(&self) -> bool {
        self.0.needs_grad
    }

    /// The same data and id, marked as a trainable leaf (a parameter the tape differentiates).
    pub fn into_trainable(self) -> Tensor {
        self.with_needs_grad(true)
    }

    /// The same data under a new id, cut off from the tape.
    pub fn detach(&self) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            shape: self.0.shape.clone(),
            storage: self.0.storage.clone(),
            needs_grad: false,
        }))
    }

    pub(crate) fn with_needs_grad(self, needs_grad: bool) -> Tensor {
        if self.0.needs_grad == needs_grad {
            return self;
        }
        Tensor(Arc::new(Inner {
            id: self.0.id,
            shape: self.0.shape.clone(),
            storage: self.0.storage.clone(),
            needs_grad,
        }))
    }

    /// The same storage seen with another shape of equal element count, under a new id.
    /// Untracked: use [`crate::ops::reshape`] inside a differentiable computation.
    pub(crate) fn view_as(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("cannot view {:?} ({} elements) as {shape:?}", self.shape(), self.numel()),
            ));
        }
        Ok(Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            shape: shape.to_vec(),
            storage: self.0.storage.clone(),
            needs_grad: false,
        })))
    }

    /// Copies the data to the host.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &*self.0.storage {
            Storage::Cpu(v) => Ok(v.clone()),
            Storage::Cuda { device, data } => device.download(data, self.numel()),
        }
    }

    /// The value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape("to_scalar", format!("tensor of shape {:?} is not a scalar", self.shape())));
        }
        Ok(self.to_vec()?[0])
    }

    /// A copy on `device` (the same tensor when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device().same_as(device) {
            return Ok(self.clone());
        }
        let storage = match device {
            Device::Cpu => Storage::Cpu(self.to_vec()?),
            Device::Cuda(d) => Storage::Cuda { device: d.clone(), data: d.upload(&self.to_vec()?)? },
        };
        Ok(Tensor::from_storage(storage, self.shape().to_vec()).with_needs_grad(self.needs_grad()))
    }

    /// The storage for writing in place, when this handle is its only owner (no clone, view or
    /// tape entry shares it). Optimisers update parameters through this between steps, so a
    /// parameter is never reallocated; `None` means someone else can still see the data.
    pub fn storage_mut(&mut self) -> Option<&mut Storage> {
        Arc::get_mut(&mut self.0).and_then(|inner| Arc::get_mut(&mut inner.storage))
    }

    /// The host data of a CPU tensor, or an error naming the op that needed it.
    pub fn cpu_data(&self, op: &'static str) -> Result<&[f32]> {
        match &*self.0.storage {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda { .. } => Err(Error::shape(op, "expected a CPU tensor, got a CUDA one")),
        }
    }
}
