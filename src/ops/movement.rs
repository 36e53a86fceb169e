//! Data movement, each differentiable: `reshape` (a view), `permute` / `transpose` (one strided
//! copy), `narrow`, `concat`, `index_select_rows` (embedding lookup), `repeat_rows`,
//! `repeat_batch` (Monte-Carlo sample stacking), and `sum_columns_forward`, the deterministic
//! column sum their gradients (and bias gradients) use.
//! Kernels: `kernels/movement.cu`. Tests: `tests/movement.rs`.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use rayon::prelude::*;

use super::matmul::column_sums;
use super::strided::StridedWalk;
use super::{cuda_output, cuda_slice, launch, same_device};
use crate::cuda::{launch_elements, CudaDevice, Kernel, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::{host_buffer, host_zeros, numel, Tensor};

static PERMUTE_COPY: Kernel = Kernel::new(KernelFamily::Movement, "permute_copy");
static COPY_SLICES: Kernel = Kernel::new(KernelFamily::Movement, "copy_slices");
static GATHER_ROWS: Kernel = Kernel::new(KernelFamily::Movement, "gather_rows");
static SCATTER_ADD_ROWS: Kernel = Kernel::new(KernelFamily::Movement, "scatter_add_rows");
static REPEAT_ROWS: Kernel = Kernel::new(KernelFamily::Movement, "repeat_rows");
static SUM_COLUMNS: Kernel = Kernel::new(KernelFamily::Movement, "sum_columns");

/// The largest rank [`permute`] handles (the kernel's fixed loop length).
pub const MAX_PERMUTE_RANK: usize = 6;

/// The kernels index with 32-bit integers; refuse anything they could not address.
fn check_addressable(op: &'static str, shape: &[usize]) -> Result<()> {
    if numel(shape) > i32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("shape {shape:?} has 2^31 elements or more, beyond the 32-bit kernel indices"),
        ));
    }
    Ok(())
}

fn check_dim(op: &'static str, x: &Tensor, dim: usize) -> Result<()> {
    if dim >= x.rank() {
        return Err(Error::shape(op, format!("dimension {dim} is out of range for shape {:?}", x.shape())));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// reshape

/// The same data seen with another shape of equal element count (no copy). The gradient is
/// reshaped back.
pub fn reshape(tape: &Tape, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let y = x.view_as(shape)?;
    let input_shape = x.shape().to_vec();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(dy.view_as(&input_shape)?)])))
}

// ---------------------------------------------------------------------------------------------
// permute / transpose

/// Reorders dimensions: output dimension `i` is input dimension `perm[i]` (rank <= 6).
pub fn permute(tape: &Tape, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let y = permute_forward(x, perm)?;
    let mut inverse = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p] = i;
    }
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(permute_forward(dy, &inverse)?)])))
}

/// Swaps dimensions `d0` and `d1`.
pub fn transpose(tape: &Tape, x: &Tensor, d0: usize, d1: usize) -> Result<Tensor> {
    check_dim("transpose", x, d0)?;
    check_dim("transpose", x, d1)?;
    let mut perm: Vec<usize> = (0..x.rank()).collect();
    perm.swap(d0, d1);
    permute(tape, x, &perm)
}

/// Untracked [`permute`]: a contiguous copy in the new dimension order.
pub fn permute_forward(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let rank = x.rank();
    let mut seen = vec![false; rank];
    let is_permutation = perm.len() == rank && perm.iter().all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
    if !is_permutation {
        return Err(Error::shape(
            "permute",
            format!("{perm:?} is not a permutation of the dimensions of shape {:?}", x.shape()),
        ));
    }
    if rank > MAX_PERMUTE_RANK {
        return Err(Error::shape("permute", format!("supports rank <= {MAX_PERMUTE_RANK}, got shape {:?}", x.shape())));
    }
    check_addressable("permute", x.shape())?;
    let in_strides = row_major_strides(x.shape());
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    // For each output dimension, the step it takes through the input.
    let src_strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let (walk_dims, walk_strides) = merge_contiguous_dims(&out_shape, &src_strides);
    match x.device() {
        Device::Cpu => Tensor::from_vec(cpu_permute(x.cpu_data("permute")?, &walk_dims, &walk_strides), &out_shape),
        Device::Cuda(dev) => {
            let layout = PermuteLayout::new(&walk_dims, &walk_strides);
            let n = x.numel() as u32;
            let f = PERMUTE_COPY.function(&dev)?;
            let mut out = dev.alloc(x.numel())?;
            let mut b = dev.stream().launch_builder(f);
            b.arg(&mut out).arg(cuda_slice(x)?).arg(&n).arg(&layout);
            // SAFETY: arguments match `permute_copy(float*, const float*, unsigned, PermuteLayout)`
            // (same #[repr(C)] layout); out and x hold n floats and every source offset the layout
            // produces is below n because the strides come from x's own shape.
            launch("permute_copy", unsafe { b.launch(launch_elements(x.numel())) })?;
            Ok(cuda_output(&dev, out, &out_shape))
        }
    }
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// The output's dims with every run of dims that is also contiguous in the input merged into
/// one (and size-1 dims dropped): `[B, T, H, D] -> [B, H, T, D]` walks rows of `D`, but a
/// permute that keeps the last two dims together copies rows of their product.
fn merge_contiguous_dims(out_shape: &[usize], src_strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (mut dims, mut strides): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for (&size, &stride) in out_shape.iter().zip(src_strides) {
        if size == 1 {
            continue;
        }
        match (dims.last_mut(), strides.last_mut()) {
            (Some(last_size), Some(last_stride)) if *last_stride == stride * size => {
                *last_size *= size;
                *last_stride = stride;
            }
            _ => {
                dims.push(size);
                strides.push(stride);
            }
        }
    }
    if dims.is_empty() {
        (vec![1], vec![1])
    } else {
        (dims, strides)
    }
}

/// Output elements one rayon task copies (rows of the last walked dim, at least one row).
const PERMUTE_TASK_ELEMENTS: usize = 1 << 14;

/// Walks the output row by row (its last dimension); each row is a strided run through `x`.
/// A task takes a block of rows and steps through the outer dims with an odometer (no
/// division per row: rows can be as short as an attention head's 16 values).
fn cpu_permute(x: &[f32], out_shape: &[usize], src_strides: &[usize]) -> Vec<f32> {
    let mut out = host_buffer(x.len());
    let Some((&row_len, outer_dims)) = out_shape.split_last() else {
        out.copy_from_slice(x); // a scalar
        return out;
    };
    if out.is_empty() {
        return out;
    }
    let (step, outer_strides) = src_strides.split_last().expect("one stride per dim");
    let step = *step;
    let rows_per_task = (PERMUTE_TASK_ELEMENTS / row_len).max(1);
    out.par_chunks_mut(rows_per_task * row_len).enumerate().for_each(|(task, block)| {
        let mut walk = StridedWalk::new(outer_dims, [outer_strides], task * rows_per_task);
        for values in block.chunks_mut(row_len) {
            let base = walk.offsets[0];
            if step == 1 {
                values.copy_from_slice(&x[base..base + row_len]);
            } else {
                for (j, v) in values.iter_mut().enumerate() {
                    *v = x[base + j * step];
                }
            }
            walk.advance();
        }
    });
    out
}

/// Kernel argument of `permute_copy`, passed by value; mirrors `struct PermuteLayout` in
/// kernels/movement.cu. Leading unused dimensions have size 1 and stride 0.
#[repr(C)]
#[derive(Clone, Copy)]
struct PermuteLayout {
    dims: [u32; MAX_PERMUTE_RANK],
    src_strides: [u32; MAX_PERMUTE_RANK],
}

// SAFETY: a plain #[repr(C)] struct of u32 arrays, laid out exactly as the kernel's struct.
unsafe impl DeviceRepr for PermuteLayout {}

impl PermuteLayout {
    fn new(out_shape: &[usize], src_strides: &[usize]) -> PermuteLayout {
        let mut layout = PermuteLayout { dims: [1; MAX_PERMUTE_RANK], src_strides: [0; MAX_PERMUTE_RANK] };
        let pad = MAX_PERMUTE_RANK - out_shape.len();
        for (d, (&size, &stride)) in out_shape.iter().zip(src_strides).enumerate() {
            // Both fit: the caller checked the tensor has fewer than 2^31 elements.
            layout.dims[pad + d] = size as u32;
            layout.src_strides[pad + d] = stride as u32;
        }
        layout
    }
}

// ---------------------------------------------------------------------------------------------
// Slice copies: narrow, concat

/// `count` blocks: block `o` copies `chunk` floats from `src[o * src_block + src_offset ..]` to
/// `dst[o * dst_block + dst_offset ..]`.
#[derive(Clone, Copy, Debug)]
struct SliceCopy {
    count: usize,
    chunk: usize,
    src_block: usize,
    src_offset: usize,
    dst_block: usize,
    dst_offset: usize,
}

impl SliceCopy {
    /// Takes `len` of `size` positions from `start` along the middle axis: `[outer, size, inner]`
    /// -> `[outer, len, inner]` (narrow).
    fn take(outer: usize, inner: usize, size: usize, start: usize, len: usize) -> SliceCopy {
        SliceCopy {
            count: outer,
            chunk: len * inner,
            src_block: size * inner,
            src_offset: start * inner,
            dst_block: len * inner,
            dst_offset: 0,
        }
    }

    /// Places a `[outer, len, inner]` block at `start` along the middle axis of an
    /// `[outer, size, inner]` one (narrow's backward, concat).
    fn place(outer: usize, inner: usize, size: usize, start: usize, len: usize) -> SliceCopy {
        SliceCopy {
            count: outer,
            chunk: len * inner,
            src_block: len * inner,
            src_offset: 0,
            dst_block: size * inner,
            dst_offset: start * inner,
        }
    }

    fn cpu(&self, dst: &mut [f32], src: &[f32]) {
        for o in 0..self.count {
            let from = &src[o * self.src_block + self.src_offset..][..self.chunk];
            dst[o * self.dst_block + self.dst_offset..][..self.chunk].copy_from_slice(from);
        }
    }

    /// Launches `copy_slices`. Callers guarantee both buffers hold every block (and fewer than
    /// 2^31 floats, see [`check_addressable`]).
    fn cuda(&self, dev: &CudaDevice, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> Result<()> {
        if self.count * self.chunk == 0 {
            return Ok(());
        }
        let f = COPY_SLICES.function(dev)?;
        let args = [self.count, self.chunk, self.src_block, self.src_offset, self.dst_block, self.dst_offset]
            .map(|v| v as u32);
        let mut b = dev.stream().launch_builder(f);
        b.arg(dst).arg(src);
        for v in &args {
            b.arg(v);
        }
        // SAFETY: arguments match `copy_slices(float*, const float*, unsigned x6)`; the caller's
        // plan keeps every block inside both buffers.
        launch("copy_slices", unsafe { b.launch(launch_elements(self.count * self.chunk)) })
    }
}

/// The product of the dimensions before and after `dim`.
fn outer_inner(shape: &[usize], dim: usize) -> (usize, usize) {
    (numel(&shape[..dim]), numel(&shape[dim + 1..]))
}

/// `len` entries of dimension `dim` starting at `start` (a copy). The gradient is written into
/// zeros of the input's shape.
pub fn narrow(tape: &Tape, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let y = narrow_forward(x, dim, start, len)?;
    let input_shape = x.shape().to_vec();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(narrow_backward(dy, &input_shape, dim, start)?)])))
}

/// Untracked [`narrow`].
pub fn narrow_forward(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    check_dim("narrow", x, dim)?;
    let size = x.shape()[dim];
    if start.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::shape(
            "narrow",
            format!(
                "entries {start}..{} of dimension {dim} do not fit shape {:?}",
                start.saturating_add(len),
                x.shape()
            ),
        ));
    }
    check_addressable("narrow", x.shape())?;
    let (outer, inner) = outer_inner(x.shape(), dim);
    let mut out_shape = x.shape().to_vec();
    out_shape[dim] = len;
    let copy = SliceCopy::take(outer, inner, size, start, len);
    match x.device() {
        Device::Cpu => {
            let mut out = host_buffer(numel(&out_shape)); // every element is copied
            copy.cpu(&mut out, x.cpu_data("narrow")?);
            Tensor::from_vec(out, &out_shape)
        }
        Device::Cuda(dev) => {
            let mut out = dev.alloc(numel(&out_shape))?;
            copy.cuda(&dev, &mut out, cuda_slice(x)?)?;
            Ok(cuda_output(&dev, out, &out_shape))
        }
    }
}

/// Untracked gradient of [`narrow`]: `dy` placed at `start` along `dim` in zeros of `input_shape`.
pub fn narrow_backward(dy: &Tensor, input_shape: &[usize], dim: usize, start: usize) -> Result<Tensor> {
    let fits = dim < input_shape.len()
        && dy.rank() == input_shape.len()
        && (0..dy.rank()).all(|d| {
            if d == dim {
                start + dy.shape()[d] <= input_shape[d]
            } else {
                dy.shape()[d] == input_shape[d]
            }
        });
    if !fits {
        return Err(Error::shape(
            "narrow_backward",
            format!("gradient {:?} at {start} along dimension {dim} does not fit input {input_shape:?}", dy.shape()),
        ));
    }
    check_addressable("narrow_backward", input_shape)?;
    let (outer, inner) = outer_inner(input_shape, dim);
    let len = dy.shape()[dim];
    let copy = SliceCopy::place(outer, inner, input_shape[dim], start, len);
    match dy.device() {
        Device::Cpu => {
            let mut dx = host_zeros(numel(input_shape));
            copy.cpu(&mut dx, dy.cpu_data("narrow_backward")?);
            Tensor::from_vec(dx, input_shape)
        }
        Device::Cuda(dev) => {
            let mut dx = dev.zeros(numel(input_shape))?;
            copy.cuda(&dev, &mut dx, cuda_slice(dy)?)?;
            Ok(cuda_output(&dev, dx, input_shape))
        }
    }
}

/// Joins tensors along `dim`; all other dimensions must agree. Each input's gradient is its
/// slice of the output's gradient.
pub fn concat(tape: &Tape, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let y = concat_forward(xs, dim)?;
    let pieces: Vec<(usize, usize, bool)> = {
        let mut start = 0;
        xs.iter()
            .map(|x| {
                let piece = (start, x.shape()[dim], x.needs_grad());
                start += x.shape()[dim];
                piece
            })
            .collect()
    };
    Ok(tape.record(y, xs, move |dy| {
        pieces
            .iter()
            .map(|&(start, len, needs_grad)| needs_grad.then(|| narrow_forward(dy, dim, start, len)).transpose())
            .collect()
    }))
}

/// Untracked [`concat`].
pub fn concat_forward(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let Some(first) = xs.first() else {
        return Err(Error::shape("concat", "needs at least one tensor"));
    };
    check_dim("concat", first, dim)?;
    let agrees =
        |x: &&&Tensor| x.rank() == first.rank() && (0..x.rank()).all(|d| d == dim || x.shape()[d] == first.shape()[d]);
    if !xs.iter().all(|x| agrees(&x)) {
        let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape()).collect();
        return Err(Error::shape("concat", format!("shapes {shapes:?} differ outside dimension {dim}")));
    }
    let device = same_device("concat", xs)?;
    let mut out_shape = first.shape().to_vec();
    out_shape[dim] = xs.iter().map(|x| x.shape()[dim]).sum();
    check_addressable("concat", &out_shape)?;
    let (outer, inner) = outer_inner(&out_shape, dim);
    let copies: Vec<SliceCopy> = {
        let mut start = 0;
        xs.iter()
            .map(|x| {
                let len = x.shape()[dim];
                let copy = SliceCopy::place(outer, inner, out_shape[dim], start, len);
                start += len;
                copy
            })
            .collect()
    };
    match device {
        Device::Cpu => {
            // Every output element belongs to exactly one input's slice.
            let mut out = host_buffer(numel(&out_shape));
            for (x, copy) in xs.iter().zip(&copies) {
                copy.cpu(&mut out, x.cpu_data("concat")?);
            }
            Tensor::from_vec(out, &out_shape)
        }
        Device::Cuda(dev) => {
            // Every output element belongs to exactly one input's slice.
            let mut out = dev.alloc(numel(&out_shape))?;
            for (x, copy) in xs.iter().zip(&copies) {
                copy.cuda(&dev, &mut out, cuda_slice(x)?)?;
            }
            Ok(cuda_output(&dev, out, &out_shape))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// index_select_rows (embedding lookup)

/// Rows `ids` of a `[rows, D]` table: `[ids.len(), D]`. The gradient adds each output row back
/// into the table row it came from (deterministically, in order of position).
pub fn index_select_rows(tape: &Tape, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let y = index_select_rows_forward(table, ids)?;
    let (ids, table_rows) = (ids.to_vec(), table.shape()[0]);
    Ok(tape.record(y, &[table], move |dy| Ok(vec![Some(index_select_rows_backward(dy, &ids, table_rows)?)])))
}

/// Untracked [`index_select_rows`].
pub fn index_select_rows_forward(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    if table.rank() != 2 {
        return Err(Error::shape(
            "index_select_rows",
            format!("table must be [rows, D], got shape {:?}", table.shape()),
        ));
    }
    let (rows, cols) = (table.shape()[0], table.shape()[1]);
    if let Some((position, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= rows) {
        return Err(Error::shape(
            "index_select_rows",
            format!("id {id} at position {position} is out of range for a table of shape {:?}", table.shape()),
        ));
    }
    let out_shape = [ids.len(), cols];
    check_addressable("index_select_rows", table.shape())?;
    check_addressable("index_select_rows", &out_shape)?;
    match table.device() {
        Device::Cpu => {
            let data = table.cpu_data("index_select_rows")?;
            let out = ids.iter().flat_map(|&id| &data[id as usize * cols..][..cols]).copied().collect();
            Tensor::from_vec(out, &out_shape)
        }
        Device::Cuda(dev) => {
            let mut out = dev.alloc(numel(&out_shape))?;
            if ids.is_empty() || cols == 0 {
                return Ok(cuda_output(&dev, out, &out_shape));
            }
            let ids_gpu = upload_u32(&dev, ids)?;
            let (n, cols_u) = (ids.len() as u32, cols as u32);
            let f = GATHER_ROWS.function(&dev)?;
            let mut b = dev.stream().launch_builder(f);
            b.arg(&mut out).arg(cuda_slice(table)?).arg(&ids_gpu).arg(&n).arg(&cols_u);
            // SAFETY: arguments match `gather_rows(float*, const float*, const unsigned*, unsigned,
            // unsigned)`; out holds n*cols floats, ids holds n values each below the table's rows.
            launch("gather_rows", unsafe { b.launch(launch_elements(numel(&out_shape))) })?;
            Ok(cuda_output(&dev, out, &out_shape))
        }
    }
}

/// Untracked gradient of [`index_select_rows`]: `[table_rows, D]`, row `r` the sum of the rows
/// of `dy` at the positions where `ids` is `r`, added in increasing position order.
pub fn index_select_rows_backward(dy: &Tensor, ids: &[u32], table_rows: usize) -> Result<Tensor> {
    if dy.rank() != 2 || dy.shape()[0] != ids.len() {
        return Err(Error::shape(
            "index_select_rows_backward",
            format!("gradient {:?} does not fit {} ids", dy.shape(), ids.len()),
        ));
    }
    let cols = dy.shape()[1];
    let table_shape = [table_rows, cols];
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= table_rows) {
        return Err(Error::shape(
            "index_select_rows_backward",
            format!("id {id} is out of range for a table of shape {table_shape:?}"),
        ));
    }
    check_addressable("index_select_rows_backward", &table_shape)?;
    check_addressable("index_select_rows_backward", dy.shape())?;
    match dy.device() {
        Device::Cpu => {
            let g = dy.cpu_data("index_select_rows_backward")?;
            let mut dtable = host_zeros(numel(&table_shape));
            for (position, &id) in ids.iter().enumerate() {
                let target = &mut dtable[id as usize * cols..][..cols];
                target.iter_mut().zip(&g[position * cols..][..cols]).for_each(|(t, v)| *t += v);
            }
            Tensor::from_vec(dtable, &table_shape)
        }
        Device::Cuda(dev) => {
            let mut dtable = dev.zeros(numel(&table_shape))?;
            if ids.is_empty() || cols == 0 {
                return Ok(cuda_output(&dev, dtable, &table_shape));
            }
            let groups = RowGroups::of(ids);
            let rows = upload_u32(&dev, &groups.rows)?;
            let starts = upload_u32(&dev, &groups.starts)?;
            let positions = upload_u32(&dev, &groups.positions)?;
            let (unique, cols_u) = (groups.rows.len() as u32, cols as u32);
            let f = SCATTER_ADD_ROWS.function(&dev)?;
            let mut b = dev.stream().launch_builder(f);
            b.arg(&mut dtable).arg(cuda_slice(dy)?).arg(&rows).arg(&starts).arg(&positions).arg(&unique).arg(&cols_u);
            // SAFETY: arguments match `scatter_add_rows(float*, const float*, const unsigned* x3,
            // unsigned, unsigned)`; rows are below table_rows, positions below ids.len() (dy's
            // rows), starts has unique+1 entries bounding positions.
            launch("scatter_add_rows", unsafe { b.launch(launch_elements(groups.rows.len() * cols)) })?;
            Ok(cuda_output(&dev, dtable, &table_shape))
        }
    }
}

/// Positions of `ids` grouped by row: `rows[u]` was taken at `positions[starts[u]..starts[u+1]]`.
struct RowGroups {
    rows: Vec<u32>,
    starts: Vec<u32>,
    positions: Vec<u32>,
}

impl RowGroups {
    fn of(ids: &[u32]) -> RowGroups {
        let mut positions: Vec<u32> = (0..ids.len() as u32).collect();
        // Stable: positions of one row stay in increasing order (the summation order).
        positions.sort_by_key(|&p| ids[p as usize]);
        let mut rows = Vec::new();
        let mut starts = Vec::new();
        for (i, &p) in positions.iter().enumerate() {
            if rows.last() != Some(&ids[p as usize]) {
                rows.push(ids[p as usize]);
                starts.push(i as u32);
            }
        }
        starts.push(positions.len() as u32);
        RowGroups { rows, starts, positions }
    }
}

fn upload_u32(dev: &CudaDevice, values: &[u32]) -> Result<CudaSlice<u32>> {
    dev.stream().clone_htod(values).map_err(Error::driver(format!("copying {} indices to the GPU", values.len())))
}

// ---------------------------------------------------------------------------------------------
// repeat_rows

/// `rows` copies of `row` stacked: `[rows, ...row.shape]`. The gradient is the sum over copies.
pub fn repeat_rows(tape: &Tape, row: &Tensor, rows: usize) -> Result<Tensor> {
    let y = repeat_rows_forward(row, rows)?;
    let row_shape = row.shape().to_vec();
    Ok(tape.record(y, &[row], move |dy| {
        let flat = dy.view_as(&[rows, numel(&row_shape)])?;
        Ok(vec![Some(column_sums(&flat)?.view_as(&row_shape)?)])
    }))
}

/// Untracked [`repeat_rows`].
pub fn repeat_rows_forward(row: &Tensor, rows: usize) -> Result<Tensor> {
    let mut out_shape = vec![rows];
    out_shape.extend_from_slice(row.shape());
    check_addressable("repeat_rows", &out_shape)?;
    match row.device() {
        Device::Cpu => Tensor::from_vec(repeat_rows_cpu(row.cpu_data("repeat_rows")?, rows), &out_shape),
        Device::Cuda(dev) => {
            Ok(cuda_output(&dev, repeat_rows_cuda(&dev, cuda_slice(row)?, rows, row.numel())?, &out_shape))
        }
    }
}

/// `rows` copies of `row`, back to back (also the bias pre-fill of `linear`).
pub(crate) fn repeat_rows_cpu(row: &[f32], rows: usize) -> Vec<f32> {
    let mut out = host_buffer(row.len() * rows);
    if !row.is_empty() {
        out.chunks_mut(row.len()).for_each(|r| r.copy_from_slice(row));
    }
    out
}

/// A new device buffer holding `rows` copies of the `cols` floats of `row`.
pub(crate) fn repeat_rows_cuda(
    dev: &Arc<CudaDevice>,
    row: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
) -> Result<CudaSlice<f32>> {
    check_addressable("repeat_rows", &[rows, cols])?;
    let mut out = dev.alloc(rows * cols)?;
    if rows * cols == 0 {
        return Ok(out);
    }
    let (rows_u, cols_u) = (rows as u32, cols as u32);
    let f = REPEAT_ROWS.function(dev)?;
    let mut b = dev.stream().launch_builder(f);
    b.arg(&mut out).arg(row).arg(&rows_u).arg(&cols_u);
    // SAFETY: arguments match `repeat_rows(float*, const float*, unsigned, unsigned)`; out holds
    // rows*cols floats and row at least cols (callers pass a tensor of cols elements).
    launch("repeat_rows", unsafe { b.launch(launch_elements(rows * cols)) })?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// repeat_batch

/// `copies` copies of `x` stacked along the first (batch) dimension: `[B, ...]` -> `[copies*B, ...]`
/// in one launch (how the Monte-Carlo samples of a forward pass are stacked). The gradient sums
/// the copies' gradients.
pub fn repeat_batch(tape: &Tape, x: &Tensor, copies: usize) -> Result<Tensor> {
    let y = repeat_batch_forward(x, copies)?;
    let input_shape = x.shape().to_vec();
    Ok(tape.record(y, &[x], move |dy| Ok(vec![Some(repeat_batch_backward(dy, &input_shape, copies)?)])))
}

/// Untracked [`repeat_batch`].
pub fn repeat_batch_forward(x: &Tensor, copies: usize) -> Result<Tensor> {
    if x.rank() == 0 {
        return Err(Error::shape("repeat_batch", "needs a batch dimension, got a scalar"));
    }
    if copies == 0 {
        return Err(Error::shape("repeat_batch", format!("needs at least one copy of {:?}, got 0", x.shape())));
    }
    let mut out_shape = x.shape().to_vec();
    out_shape[0] *= copies;
    // The copies of x are consecutive blocks of x.numel() floats: rows repeated down a matrix.
    repeat_rows_forward(x, copies)?.view_as(&out_shape)
}

/// Untracked gradient of [`repeat_batch`]: the sum of the `copies` blocks of `dy`.
pub fn repeat_batch_backward(dy: &Tensor, input_shape: &[usize], copies: usize) -> Result<Tensor> {
    let fits = copies > 0
        && !input_shape.is_empty()
        && dy.rank() == input_shape.len()
        && dy.shape()[0] == input_shape[0] * copies
        && dy.shape()[1..] == input_shape[1..];
    if !fits {
        return Err(Error::shape(
            "repeat_batch_backward",
            format!("gradient {:?} is not {copies} copies of input {input_shape:?}", dy.shape()),
        ));
    }
    sum_columns_forward(&dy.view_as(&[copies, numel(input_shape)])?)?.view_as(input_shape)
}

// ---------------------------------------------------------------------------------------------
// sum_columns

/// Row lanes of `sum_columns` (SUM_COLUMNS_LANES in kernels/movement.cu): the CPU sums in the
/// same order, so both backends give bit-identical results.
const SUM_COLUMNS_LANES: usize = 8;

/// Untracked sums over every dimension but the last: `[..., C] -> [C]`. Row `r` is added into
/// lane `r % 8` in increasing order and the lanes are added in order, on either backend.
pub fn sum_columns_forward(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        return Err(Error::shape("column_sums", "needs at least one dimension, got a scalar"));
    }
    check_addressable("column_sums", x.shape())?;
    let cols = x.dim(-1);
    let rows = numel(&x.shape()[..x.rank() - 1]);
    match x.device() {
        Device::Cpu => Tensor::from_vec(sum_columns_cpu(x.cpu_data("column_sums")?, rows, cols), &[cols]),
        Device::Cuda(dev) => {
            if rows == 0 || cols == 0 {
                return Ok(cuda_output(&dev, dev.zeros(cols)?, &[cols]));
            }
            let mut out = dev.alloc(cols)?;
            let f = SUM_COLUMNS.function(&dev)?;
            let (rows_u, cols_u) = (rows as u32, cols as u32);
            let groups = cols.div_ceil(32).min(65_535) as u32;
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (groups, 1, 1),
                block_dim: (32, SUM_COLUMNS_LANES as u32, 1),
                shared_mem_bytes: 0,
            };
            let mut b = dev.stream().launch_builder(f);
            b.arg(&mut out).arg(cuda_slice(x)?).arg(&rows_u).arg(&cols_u);
            // SAFETY: arguments match `sum_columns(float*, const float*, unsigned, unsigned)`; x
            // holds rows*cols floats (fewer than 2^31, checked above), out holds cols, and the
            // column groups grid-stride so every column is written once.
            launch("sum_columns", unsafe { b.launch(cfg) })?;
            Ok(cuda_output(&dev, out, &[cols]))
        }
    }
}

fn sum_columns_cpu(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut lanes = vec![vec![0.0f32; cols]; SUM_COLUMNS_LANES];
    for (r, row) in x.chunks_exact(cols.max(1)).take(rows).enumerate() {
        lanes[r % SUM_COLUMNS_LANES].iter_mut().zip(row).for_each(|(sum, v)| *sum += v);
    }
    let (first, rest) = lanes.split_first_mut().expect("SUM_COLUMNS_LANES > 0");
    for lane in rest {
        first.iter_mut().zip(lane.iter()).for_each(|(total, v)| *total += v);
    }
    std::mem::take(first)
}
