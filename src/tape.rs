//! Reverse-mode autograd as an explicit tape (docs/architecture.md §5).
//!
//! Every differentiable op computes its output with untracked kernels and then calls
//! [`Tape::record`] with a backward closure. The tape keeps those closures in forward order;
//! [`Tape::backward`] replays them in reverse, passing each the gradient of its output and
//! collecting the gradients of its inputs by [`TensorId`]. An entry is recorded only when the tape
//! is recording and at least one input needs a gradient, so frozen towers fed by frozen inputs cost
//! nothing, while activations downstream of a trainable adapter carry gradients through them.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ops;
use crate::tensor::{Tensor, TensorId};

/// Gradient of an op's inputs given the gradient of its output: one entry per input, `None` where
/// the input needs no gradient.
pub type BackwardFn = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Entry {
    output: TensorId,
    inputs: Vec<(TensorId, bool)>,
    backward: BackwardFn,
}

pub struct Tape {
    recording: bool,
    entries: RefCell<Vec<Entry>>,
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

impl Tape {
    /// A tape that records differentiable ops (training).
    pub fn new() -> Tape {
        Tape { recording: true, entries: RefCell::new(Vec::new()) }
    }

    /// A tape that records nothing (inference): ops run their forward only.
    pub fn inference() -> Tape {
        Tape { recording: false, entries: RefCell::new(Vec::new()) }
    }

    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Number of recorded entries (for tests and memory diagnostics).
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records `output = op(inputs)`. Returns `output`, marked as needing a gradient when an entry
    /// was recorded. `backward` is called at most once, with the output's gradient, and must return
    /// one gradient (or `None`) per input, each of that input's shape.
    pub fn record(
        &self,
        output: Tensor,
        inputs: &[&Tensor],
        backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    ) -> Tensor {
        if !self.recording || !inputs.iter().any(|t| t.needs_grad()) {
            return output;
        }
        let output = output.with_needs_grad(true);
        self.entries.borrow_mut().push(Entry {
            output: output.id(),
            inputs: inputs.iter().map(|t| (t.id(), t.needs_grad())).collect(),
            backward: Box::new(backward),
        });
        output
    }

    /// Back-propagates from a scalar `loss` (seed gradient 1) and empties the tape. Returns the
    /// gradients of every leaf that needs one (trainable parameters and inputs marked trainable).
    pub fn backward(&self, loss: &Tensor) -> Result<Gradients> {
        if loss.numel() != 1 {
            return Err(Error::shape("backward", format!("loss must be a scalar, got shape {:?}", loss.shape())));
        }
        let seed = Tensor::full_like(loss, 1.0)?;
        self.backward_from(loss, seed)
    }

    /// Back-propagates a given output gradient `grad` of `output` (same shape) and empties the tape.
    pub fn backward_from(&self, output: &Tensor, grad: Tensor) -> Result<Gradients> {
        if grad.shape() != output.shape() {
            return Err(Error::shape(
                "backward",
                format!("gradient shape {:?} differs from output shape {:?}", grad.shape(), output.shape()),
            ));
        }
        let entries = std::mem::take(&mut *self.entries.borrow_mut());
        let produced: std::collections::HashSet<TensorId> = entries.iter().map(|e| e.output).collect();
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        if output.needs_grad() {
            grads.insert(output.id(), grad);
        }
        for entry in entries.into_iter().rev() {
            // An intermediate gradient is consumed here; only leaves' gradients are kept.
            let Some(grad_out) = grads.remove(&entry.output) else { continue };
            let input_grads = (entry.backward)(&grad_out)?;
            debug_assert_eq!(input_grads.len(), entry.inputs.len(), "backward returned the wrong arity");
            for ((id, needs), grad) in entry.inputs.iter().zip(input_grads) {
                let (true, Some(grad)) = (*needs, grad) else { continue };
                let total = match grads.remove(id) {
                    Some(previous) => ops::add_untracked(&previous, &grad)?,
                    None => grad,
                };
                grads.insert(*id, total);
            }
        }
        grads.retain(|id, _| !produced.contains(id));
        Ok(Gradients(grads))
    }
}

/// Gradients of leaf tensors, by tensor.
pub struct Gradients(HashMap<TensorId, Tensor>);

impl Gradients {
    pub fn get(&self, tensor: &Tensor) -> Option<&Tensor> {
        self.0.get(&tensor.id())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
