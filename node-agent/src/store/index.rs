//! What a weights file holds, from its header alone: names, dtypes, shapes and
//! where each tensor's bytes are.

use modelcache_crds::Precision;
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// Container format of a weights file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    Safetensors,
    /// A PyTorch zip archive (`torch.save` since 1.6), read without executing it.
    Pickle,
}

/// Where a tensor's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// Absolute byte offset in a safetensors file.
    File { offset: u64 },
    /// A storage record inside a PyTorch zip archive; `section` is the
    /// top-level key of the dict that holds it in a file of several
    /// (`{"image_proj": {…}, "ip_adapter": {…}}`), whose name is the tensor's
    /// name's first part.
    Zip {
        entry: String,
        section: Option<String>,
    },
}

/// One tensor of a weights file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub location: Location,
    /// Bytes of the tensor in the file.
    pub len: u64,
}

impl TensorMeta {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Floating-point tensors are cast to the compute precision; integer and bool
    /// buffers (CLIP's `position_ids`) keep their dtype.
    pub fn is_float(&self) -> bool {
        matches!(
            self.dtype,
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 | Dtype::F8_E4M3 | Dtype::F8_E5M2
        )
    }

    /// Bytes of this tensor once loaded at `precision`.
    pub fn bytes_at(&self, precision: Precision) -> u64 {
        if self.is_float() {
            self.numel() * precision.element_bytes()
        } else {
            self.len
        }
    }
}

/// The tensors of one weights file, in data order.
#[derive(Debug, Clone)]
pub struct TensorIndex {
    pub path: PathBuf,
    pub format: WeightsFormat,
    pub tensors: Vec<TensorMeta>,
    /// safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// `global_step` of a PyTorch training checkpoint (tells SD2 v/epsilon apart).
    pub global_step: Option<i64>,
    pub file_bytes: u64,
    by_name: HashMap<String, usize>,
    /// candle's reader of a PyTorch archive, parsed once and shared by every tensor read.
    pub(crate) pickle: PickleReader,
}

/// Lazily built [`candle_core::pickle::PthTensors`] of a pickle index, one
/// per section (the whole dict is the section `None`).
#[derive(Clone, Default)]
pub(crate) struct PickleReader(
    std::sync::Arc<
        std::sync::Mutex<HashMap<Option<String>, std::sync::Arc<candle_core::pickle::PthTensors>>>,
    >,
);

impl PickleReader {
    pub(crate) fn get_or_try_init(
        &self,
        section: Option<&str>,
        f: impl FnOnce() -> candle_core::Result<candle_core::pickle::PthTensors>,
    ) -> candle_core::Result<std::sync::Arc<candle_core::pickle::PthTensors>> {
        let mut readers = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = section.map(str::to_string);
        if let Some(r) = readers.get(&key) {
            return Ok(r.clone());
        }
        let r = std::sync::Arc::new(f()?);
        readers.insert(key, r.clone());
        Ok(r)
    }
}

impl std::fmt::Debug for PickleReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PickleReader")
    }
}

impl TensorIndex {
    pub fn new(
        path: PathBuf,
        format: WeightsFormat,
        tensors: Vec<TensorMeta>,
        metadata: BTreeMap<String, String>,
        global_step: Option<i64>,
        file_bytes: u64,
    ) -> Self {
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        TensorIndex {
            path,
            format,
            tensors,
            metadata,
            global_step,
            file_bytes,
            by_name,
            pickle: PickleReader::default(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorMeta> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.get(name).map(|t| t.shape.as_slice())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// Bytes of all tensors once loaded at `precision`.
    pub fn bytes_at(&self, precision: Precision) -> u64 {
        self.tensors.iter().map(|t| t.bytes_at(precision)).sum()
    }
}
