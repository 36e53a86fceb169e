//! Weights on disk: safetensors files keyed by the official MedCLIPSeg state-dict names
//! (docs/model.md §9). Loading checks every key the model asks for (missing, mis-shaped) and every key it
//! did not ask for (unexpected), each error naming the key, the file and both shapes. Saving goes
//! through a temporary file and a rename, so an existing checkpoint is never left half-written.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::device::Device;
use crate::error::{Error, Result};
/// Re-exported where writers of model files have always found it.
pub use crate::files::write_atomically;
use crate::tensor::Tensor;

/// Tensors read from a safetensors file (kept on the CPU until the model takes them).
pub struct WeightStore {
    origin: String,
    tensors: BTreeMap<String, Tensor>,
    taken: BTreeSet<String>,
    metadata: HashMap<String, String>,
    /// When set, absent keys that start with the prefix (every key for `""`) are invented from
    /// the seed (see [`WeightStore::synthetic`]).
    synthetic: Option<(String, u64)>,
}

impl WeightStore {
    /// Reads every tensor of `path`. F32 is taken as is; F16 and BF16 are widened to f32.
    pub fn load(path: &Path) -> Result<WeightStore> {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<WeightStore> {
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Weights(format!("{origin}: not a readable safetensors file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::Weights(format!("{origin}: unreadable safetensors header: {e}")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let data = decode_floats(view.dtype(), view.data()).ok_or_else(|| {
                Error::Weights(format!(
                    "{origin}: key `{name}` has dtype {:?}; expected F32, F16 or BF16",
                    view.dtype()
                ))
            })?;
            tensors.insert(name, Tensor::from_vec(data, view.shape())?);
        }
        Ok(WeightStore { origin: origin.to_string(), tensors, taken: BTreeSet::new(), metadata, synthetic: None })
    }

    /// A store that invents every tensor the model asks for: random weights of the right shapes
    /// under the official keys (benchmarks, full-size smoke tests, a checkpoint to start from).
    /// Values are deterministic in `seed` and `key`: uniform in +-1/sqrt(fan_in) for matrices,
    /// 1 for LayerNorm weights, small values for biases and embeddings, 0 for gates.
    pub fn synthetic(seed: u64) -> WeightStore {
        WeightStore {
            origin: format!("random weights (seed {seed})"),
            tensors: BTreeMap::new(),
            taken: BTreeSet::new(),
            metadata: HashMap::new(),
            synthetic: Some((String::new(), seed)),
        }
    }

    /// This store, with absent keys under `prefix` invented from `seed` as [`WeightStore::synthetic`]
    /// does: a part the file does not have (a new CNN branch on an official checkpoint) starts
    /// from random weights while everything else must be in the file.
    pub fn with_random_part(mut self, prefix: &str, seed: u64) -> WeightStore {
        self.synthetic = Some((prefix.to_string(), seed));
        self
    }

    /// A store over tensors already in memory (tests, random initialisation).
    pub fn from_tensors(origin: &str, tensors: BTreeMap<String, Tensor>) -> WeightStore {
        WeightStore {
            origin: origin.to_string(),
            tensors,
            taken: BTreeSet::new(),
            metadata: HashMap::new(),
            synthetic: None,
        }
    }

    /// Every tensor of the file by key (for files that are not model weights, such as optimiser
    /// state).
    pub fn into_tensors(self) -> BTreeMap<String, Tensor> {
        self.tensors
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The tensor `key`, checked to have `shape`, copied to `device`.
    pub fn take(&mut self, key: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        if let Some((prefix, seed)) = &self.synthetic {
            if key.starts_with(prefix.as_str()) && !self.tensors.contains_key(key) {
                let invented = invent(*seed, key, shape)?;
                self.tensors.insert(key.to_string(), invented);
            }
        }
        let tensor = self.tensors.get(key).ok_or_else(|| {
            Error::Weights(format!("{}: missing key `{key}` (expected shape {shape:?})", self.origin))
        })?;
        if tensor.shape() != shape {
            return Err(Error::Weights(format!(
                "{}: key `{key}` has shape {:?}, expected {shape:?}",
                self.origin,
                tensor.shape()
            )));
        }
        // A NaN or infinity in a weight would silently poison every output: refuse it here.
        if let Some(bad) = tensor.cpu_data("weights")?.iter().find(|v| !v.is_finite()) {
            return Err(Error::Weights(format!("{}: key `{key}` holds a non-finite value ({bad})", self.origin)));
        }
        self.taken.insert(key.to_string());
        tensor.to_device(device)
    }

    /// Fails when the file holds keys the model never asked for, other than `unused` ones that the
    /// official checkpoints carry but the model does not need (such as `logit_scale`).
    pub fn finish(self, unused: &[&str]) -> Result<()> {
        let unexpected: Vec<&String> =
            self.tensors.keys().filter(|k| !self.taken.contains(*k) && !unused.contains(&k.as_str())).collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = unexpected.iter().take(8).map(|k| format!("`{k}`")).collect();
        let more = unexpected.len().saturating_sub(shown.len());
        Err(Error::Weights(format!(
            "{}: {} unexpected key(s): {}{}",
            self.origin,
            unexpected.len(),
            shown.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
        )))
    }
}

/// A deterministic random tensor for `key` (see [`WeightStore::synthetic`]); batch norm's running
/// statistics start as PyTorch's do (mean 0, variance 1).
fn invent(seed: u64, key: &str, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    if key.ends_with(".running_mean") || key.ends_with(".running_var") {
        let value = if key.ends_with(".running_var") { 1.0 } else { 0.0 };
        return Tensor::from_vec(vec![value; n], shape);
    }
    let key_hash = key.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3));
    let is_norm_weight = shape.len() == 1 && key.ends_with(".weight");
    let scale = match shape.len() {
        0 => 0.0,                   // gates: sigmoid(0) = 0.5, as initialised
        1 if is_norm_weight => 0.0, // LayerNorm weights: exactly 1
        1 => 0.02,                  // biases and the class embedding
        _ => 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt(),
    };
    let mut values = vec![0.0f32; n];
    crate::philox::fill_normal(seed, key_hash, &mut values);
    let offset = if is_norm_weight { 1.0 } else { 0.0 };
    // Normal noise clipped to +-2 sigma keeps the towers' activations in a sane range.
    values.iter_mut().for_each(|v| *v = offset + scale * v.clamp(-2.0, 2.0));
    Tensor::from_vec(values, shape)
}

fn decode_floats(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let words = |n: usize| bytes.chunks_exact(n);
    match dtype {
        Dtype::F32 => Some(words(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        Dtype::F16 => Some(words(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()),
        Dtype::BF16 => Some(words(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()),
        _ => None,
    }
}

/// An f32 tensor as safetensors sees it.
struct F32View {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &F32View {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` (any device) as an F32 safetensors file, atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let bytes = t.to_vec()?.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok((name.clone(), F32View { shape: t.shape().to_vec(), bytes }))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let bytes = safetensors::tensor::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), &metadata)
        .map_err(|e| Error::Weights(format!("{}: cannot serialise: {e}", path.display())))?;
    write_atomically(path, &bytes)
}
