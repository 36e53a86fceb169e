//! Frozen `linear` weights stored once, at load, in panels of [`PANEL_OUTPUTS`] outputs for the
//! CPU's GEMM (docs/architecture.md §4, "Frozen weights in panels").
//!
//! Why: the `gemm` crate's microkernel multiplies 64 outputs by 6 rows at a time and wants those
//! 64 outputs adjacent for each input. A PyTorch-layout `[out, in]` weight has them `in` floats
//! apart, so every call packed the weight first: 15-19 % of an inference pass on one image (the
//! towers' ~200 tokens), on weights that never change. Panel `p` holds, for every input `i` in
//! order, the 64 values `W[64p .. 64p + 64, i]` (outputs past `out` are zero): each panel is
//! laid out as the microkernel reads it, so the crate is called once per panel and, instead of
//! gathering 64 strided columns, only copies the contiguous panel into its aligned buffer once per
//! block of rows (reading the panel in place was slower unless it starts on a 64-byte boundary,
//! and aligned panels cost memory: BENCHMARKS.md, issue 23 section). The panels replace the weight (no second copy), so only inference models pack
//! ([`crate::model::MedClipSeg::pack_frozen_weights`]); training and the GPU keep `[out, in]`.
//!
//! Numerics: each panel's product is the crate's general blocked path on the same k-blocks as the
//! unpacked product, so the outputs equal those of [`super::linear`] bit for bit, and a row's
//! outputs do not depend on the number of rows or threads (products with few rows are padded
//! as `linear`'s are). Tests: `tests/matmul.rs`.

use rayon::prelude::*;

use super::{column_sums, crate_gemm, linear_backward_input, row_independent_min_rows, LinearShape, SharedOutput};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::movement::repeat_rows_cpu;
use crate::tape::Tape;
use crate::tensor::{host_buffer, Tensor};

/// Outputs per panel: the crate's AVX-512 microkernel height (4 vectors of 16 floats). On
/// machines where the crate picks a narrower kernel a panel is several of its tiles.
pub const PANEL_OUTPUTS: usize = 64;
/// Rows per work item: a block's rows (256 x 768 floats) stay in L2 while the item's panels
/// pass over them.
const BLOCK_ROWS: usize = 256;
/// Most panels per work item (the item's panels of one k-block stay in L2 beside its rows).
const MAX_ITEM_PANELS: usize = 16;

/// A frozen `[out, in]` weight in panels (a `[panels, in, 64]` CPU tensor).
#[derive(Clone)]
pub struct PanelWeight {
    panels: Tensor,
    outputs: usize,
    inputs: usize,
}

impl PanelWeight {
    /// The weight in panels; `None` for a GPU tensor (cuBLAS reads `[out, in]` as it is). A
    /// trainable weight is refused: its updates would not reach the panels.
    pub fn pack(weight: &Tensor) -> Result<Option<PanelWeight>> {
        if weight.rank() != 2 {
            return Err(Error::shape(
                "pack_weight",
                format!("weight must be [out, in], got shape {:?}", weight.shape()),
            ));
        }
        if weight.needs_grad() {
            return Err(Error::Invalid("pack_weight: a trainable weight cannot be stored in panels".into()));
        }
        if !matches!(weight.device(), Device::Cpu) {
            return Ok(None);
        }
        let (outputs, inputs) = (weight.dim(0), weight.dim(1));
        let plain = weight.cpu_data("pack_weight")?;
        let panel_len = inputs * PANEL_OUTPUTS;
        let mut panels = vec![0.0f32; outputs.div_ceil(PANEL_OUTPUTS) * panel_len];
        if panel_len > 0 {
            panels.par_chunks_mut(panel_len).enumerate().for_each(|(p, panel)| {
                for lane in 0..PANEL_OUTPUTS.min(outputs - p * PANEL_OUTPUTS) {
                    let row = &plain[(p * PANEL_OUTPUTS + lane) * inputs..][..inputs];
                    for (i, &value) in row.iter().enumerate() {
                        panel[i * PANEL_OUTPUTS + lane] = value;
                    }
                }
            });
        }
        let shape = [outputs.div_ceil(PANEL_OUTPUTS), inputs, PANEL_OUTPUTS];
        Ok(Some(PanelWeight { panels: Tensor::from_vec(panels, &shape)?, outputs, inputs }))
    }

    /// The weight back as `[out, in]` (a new tensor).
    pub fn unpack(&self) -> Result<Tensor> {
        let panels = self.panels.cpu_data("unpack_weight")?;
        let mut plain = vec![0.0f32; self.outputs * self.inputs];
        for (o, row) in plain.chunks_mut(self.inputs.max(1)).enumerate().take(self.outputs) {
            let panel = &panels[(o / PANEL_OUTPUTS) * self.inputs * PANEL_OUTPUTS..];
            for (i, value) in row.iter_mut().enumerate() {
                *value = panel[i * PANEL_OUTPUTS + o % PANEL_OUTPUTS];
            }
        }
        Tensor::from_vec(plain, &[self.outputs, self.inputs])
    }

    /// The panels, `[panels, in, 64]`: the storage that replaces the weight.
    pub fn tensor(&self) -> &Tensor {
        &self.panels
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }
}

/// [`super::linear`] with a weight in panels: x `[..., in]`, bias `[out]`, returns `[..., out]`.
/// The backward gives x's gradient (through the weight unpacked for the call) and the bias's; a
/// weight in panels is frozen and gets none.
pub fn linear_panels(tape: &Tape, x: &Tensor, weight: &PanelWeight, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = linear_panels_forward(x, weight, bias)?;
    let x_shape = x.shape().to_vec();
    let w_saved = x.needs_grad().then(|| weight.clone());
    let bias_needs_grad = bias.is_some_and(|b| b.needs_grad());
    let has_bias = bias.is_some();
    let mut inputs = vec![x];
    inputs.extend(bias);
    Ok(tape.record(y, &inputs, move |dy| {
        let dx = w_saved.as_ref().map(|w| linear_backward_input(dy, &w.unpack()?, &x_shape)).transpose()?;
        let db = bias_needs_grad.then(|| column_sums(dy)).transpose()?;
        Ok(if has_bias { vec![dx, db] } else { vec![dx] })
    }))
}

/// Untracked [`linear_panels`].
pub fn linear_panels_forward(x: &Tensor, weight: &PanelWeight, bias: Option<&Tensor>) -> Result<Tensor> {
    let (outputs, inputs) = (weight.outputs, weight.inputs);
    let LinearShape { rows, out_shape, .. } =
        LinearShape::with_dims(x, outputs, inputs, bias, &format!("[{outputs}, {inputs}] (in panels)"))?;
    for t in std::iter::once(x).chain(bias) {
        if !matches!(t.device(), Device::Cpu) {
            return Err(Error::DeviceMismatch { op: "linear", left: "cpu".into(), right: t.device().name() });
        }
    }
    crate::ops::flops::count_matrix_product(1, rows, inputs, outputs);
    // Starts from the bias rows, as `linear` does, so the sums are the same.
    let bias = bias.map(|b| b.cpu_data("linear")).transpose()?;
    let xs = x.cpu_data("linear")?;
    let min_rows = row_independent_min_rows(outputs);
    let out = if rows == 0 || outputs == 0 {
        host_buffer(0)
    } else if rows >= min_rows {
        let mut out = starting_values(bias, rows, outputs);
        panel_products(xs, rows, weight, &mut out, bias.is_some());
        out
    } else {
        // Few rows: on a zero-padded copy, so that the crate takes the same path for any number
        // of rows (see row_independent_min_rows).
        let mut padded_x = vec![0.0f32; min_rows * inputs];
        padded_x[..rows * inputs].copy_from_slice(&xs[..rows * inputs]);
        let mut padded = starting_values(bias, min_rows, outputs);
        panel_products(&padded_x, min_rows, weight, &mut padded, bias.is_some());
        padded.truncate(rows * outputs);
        padded
    };
    Tensor::from_vec(out, &out_shape)
}

/// `rows` copies of the bias, or an unspecified buffer the products overwrite.
fn starting_values(bias: Option<&[f32]>, rows: usize, outputs: usize) -> Vec<f32> {
    match bias {
        Some(b) => repeat_rows_cpu(b, rows),
        None => host_buffer(rows * outputs),
    }
}

/// `out (+)= x W^T` for `rows` rows: one crate call per panel, work items (a block of rows times a
/// group of panels) spread over the rayon threads, each output element written by one item.
fn panel_products(x: &[f32], rows: usize, weight: &PanelWeight, out: &mut [f32], read_out: bool) {
    let (inputs, outputs) = (weight.inputs, weight.outputs);
    assert!(x.len() >= rows * inputs && out.len() >= rows * outputs, "internal: panel GEMM operands too short");
    let panels = outputs.div_ceil(PANEL_OUTPUTS);
    let row_blocks = rows.div_ceil(BLOCK_ROWS);
    let block_rows = rows.div_ceil(row_blocks);
    // Enough items for every thread to get several (rayon balances them).
    let groups =
        (4 * rayon::current_num_threads()).div_ceil(row_blocks).clamp(panels.div_ceil(MAX_ITEM_PANELS), panels);
    let group_panels = panels.div_ceil(groups);
    let groups = panels.div_ceil(group_panels);
    let data = weight.panels.cpu_data("linear").expect("panels are a CPU tensor");
    let out_base = SharedOutput(out.as_mut_ptr());
    (0..row_blocks * groups).into_par_iter().for_each(|item| {
        let (block, group) = (item / groups, item % groups);
        let first_row = block * block_rows;
        let item_rows = block_rows.min(rows - first_row);
        let out_base = &out_base;
        for p in group * group_panels..panels.min((group + 1) * group_panels) {
            let columns = PANEL_OUTPUTS.min(outputs - p * PANEL_OUTPUTS);
            // SAFETY: items cover disjoint (rows x panel columns) blocks of the [rows, outputs]
            // row-major output (checked long enough above), so no element is written twice and
            // nothing else touches `out` meanwhile. The crate reads panel p (`columns` x inputs at
            // column stride 64, inside `data` by the packing) and the item's rows of x (inside x
            // by the check above), and writes the block's `columns` x `item_rows` outputs.
            unsafe {
                crate_gemm(
                    (item_rows, inputs, columns),
                    (out_base.0.add(first_row * outputs + p * PANEL_OUTPUTS), outputs),
                    read_out,
                    (x.as_ptr().add(first_row * inputs), (inputs as isize, 1)),
                    // Panel p as op(B) = [in, 64]: input i's 64 outputs are adjacent.
                    (data.as_ptr().add(p * inputs * PANEL_OUTPUTS), (PANEL_OUTPUTS as isize, 1)),
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        }
    });
}
