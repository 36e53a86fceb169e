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
    by_len: HashMap<usize, PooledLength>,
    pooled_floats: usize,
}

/// The free buffers of one length, and how many the pool keeps: one per time
/// [`host_buffer`] found none (the most that were ever wanted at once). Buffers of lengths
/// nobody asks the pool for (a `collect`, a `to_vec`) are freed rather than kept: parked, they
/// would fill the pool a step at a time until buffers that are asked for no longer fit.
#[derive(Default)]
struct PooledLength {
    free: Vec<Vec<f32>>,
    keep: usize,
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
    let Some(pool) = guard.as_mut() else { return };
    let fits = pool.pooled_floats + len <= POOL_LIMIT_FLOATS;
    if let Some(entry) = pool.by_len.get_mut(&len).filter(|e| fits && e.free.len() < e.keep) {
        entry.free.push(values);
        pool.pooled_floats += len;
    }
}

/// A host buffer of `len` floats whose contents are unspecified (stale values of a dropped
/// tensor, or zeros): for CPU kernels that overwrite every element of their output. Meant for
/// buffers that become tensors: a scratch `Vec` dropped as such never comes back, and each
/// miss lets the pool keep one more buffer of its length.
pub(crate) fn host_buffer(len: usize) -> Vec<f32> {
    if len >= POOL_MIN_FLOATS {
        let mut guard = HOST_POOL.lock().unwrap_or_else(|e| e.into_inner());
        let pool = guard.get_or_insert_with(|| HostPool { by_len: HashMap::new(), pooled_floats: 0 });
        let entry = pool.by_len.entry(len).or_default();
        if let Some(values) = entry.free.pop() {
            pool.pooled_floats -= len;
            return values;
        }
        entry.keep += 1;
    }
    vec![0.0; len]
}

/// A host buffer of `len` zeros, from the pool when it holds one of that length (a memset of
/// warm memory costs less than the page faults of fresh memory; and a zeroed tensor that came
/// from `vec!` would, once dropped, park in the pool under a length only zeros ever ask for).
pub(crate) fn host_zeros(len: usize) -> Vec<f32> {
    host_filled(len, 0.0)
}

/// A host buffer of `len` copies of `value` (from the pool as [`host_zeros`]).
pub(crate) fn host_filled(len: usize, value: f32) -> Vec<f32> {
    let mut values = host_buffer(len);
    values.fill(value);
    values
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
        Tensor::from_vec(host_filled(numel(shape), value), shape)?.to_device(device)
    }

    pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Tensor::from_vec(host_zeros(numel(shape)), shape),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(len: usize) -> usize {
        let guard = HOST_POOL.lock().unwrap();
        guard.as_ref().and_then(|p| p.by_len.get(&len)).map_or(0, |e| e.free.len())
    }

    #[test]
    fn the_pool_keeps_only_lengths_it_was_asked_for_and_no_more_of_them() {
        // Lengths no other test uses (the pool is process-wide and tests run in parallel).
        let (unasked, asked) = (POOL_MIN_FLOATS + 17, POOL_MIN_FLOATS + 23);
        drop(Tensor::from_vec(vec![1.0; unasked], &[unasked]).unwrap());
        assert_eq!(kept(unasked), 0, "a length nobody asked the pool for is not kept");

        let from_pool_once = Tensor::from_vec(host_buffer(asked), &[asked]).unwrap(); // one miss
        let made_elsewhere = Tensor::from_vec(vec![2.0; asked], &[asked]).unwrap();
        drop(from_pool_once);
        drop(made_elsewhere);
        assert_eq!(kept(asked), 1, "one miss lets the pool keep one buffer of that length");
        let reused = host_buffer(asked);
        assert_eq!(kept(asked), 0, "the kept buffer is handed out again");
        assert_eq!(reused.len(), asked);
    }
}
