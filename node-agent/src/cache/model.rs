//! What the cache holds: a model's file bytes in a RAM region, and its tensors
//! at compute precision on the device.

use super::region::{Region, Segment};
use crate::store::load::candle_dtype;
use crate::store::{self, StoreError, TensorIndex};
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

/// A tensor stored in a region.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

impl RegionTensor {
    fn is_float(&self) -> bool {
        matches!(
            self.dtype,
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64
        )
    }

    /// Bytes of this tensor at `dtype` on the device.
    pub fn device_bytes(&self, dtype: DType) -> u64 {
        if self.is_float() {
            self.shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64
        } else {
            self.len as u64
        }
    }
}

/// How to fill a model's RAM region: which file ranges go where.
#[derive(Debug, Clone, PartialEq)]
pub struct RamPlan {
    pub segments: Vec<Segment>,
    pub tensors: Vec<RegionTensor>,
    /// Bytes of data (the region is this rounded up to 2 MiB).
    pub bytes: u64,
}

impl RamPlan {
    /// The data sections of safetensors files laid out one after the other.
    pub fn from_indexes(indexes: &[TensorIndex]) -> Result<RamPlan, StoreError> {
        let mut plan = RamPlan {
            segments: Vec::new(),
            tensors: Vec::new(),
            bytes: 0,
        };
        for index in indexes {
            if index.format != store::WeightsFormat::Safetensors {
                return Err(StoreError::invalid(
                    &index.path,
                    "PyTorch pickles are not cached directly; convert the model to safetensors (modelcache-agent convert)",
                ));
            }
            let Some(start) = index
                .tensors
                .iter()
                .filter_map(|t| match t.location {
                    store::Location::File { offset } => Some(offset),
                    _ => None,
                })
                .min()
            else {
                continue;
            };
            let end = index.file_bytes;
            // Keep 64-byte alignment between files so every tensor stays aligned.
            let base = plan.bytes.next_multiple_of(64);
            plan.segments.push(Segment {
                path: index.path.clone(),
                file_offset: start,
                len: end - start,
                region_offset: base,
            });
            for t in &index.tensors {
                if let store::Location::File { offset } = t.location {
                    plan.tensors.push(RegionTensor {
                        name: t.name.clone(),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        offset: (base + offset - start) as usize,
                        len: t.len as usize,
                    });
                }
            }
            plan.bytes = base + (end - start);
        }
        Ok(plan)
    }

    /// Bytes the device copy takes at `dtype`.
    pub fn device_bytes(&self, dtype: DType) -> u64 {
        self.tensors.iter().map(|t| t.device_bytes(dtype)).sum()
    }
}

/// A model's file bytes in the RAM tier.
pub struct RamModel {
    pub region: Region,
    pub tensors: Vec<RegionTensor>,
    /// Which file ranges the region holds, and where: a neighbour's copy of
    /// a file can be served from here.
    pub segments: Vec<Segment>,
}

impl RamModel {
    pub fn bytes(&self) -> u64 {
        self.region.len() as u64
    }

    /// The raw bytes of one tensor, as stored in the file.
    pub fn tensor_bytes(&self, t: &RegionTensor) -> &[u8] {
        &self.region.as_slice()[t.offset..t.offset + t.len]
    }

    /// Bytes the device copy takes at `dtype`.
    pub fn device_bytes(&self, dtype: DType) -> u64 {
        self.tensors.iter().map(|t| t.device_bytes(dtype)).sum()
    }

    /// Builds the device copy: every tensor made from the region, floating-point
    /// ones cast to `dtype`.
    pub fn to_device(&self, device: &Device, dtype: DType) -> candle_core::Result<DeviceModel> {
        let mut tensors = HashMap::with_capacity(self.tensors.len());
        let mut bytes = 0u64;
        for t in &self.tensors {
            let src = candle_dtype(t.dtype).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "tensor {}: dtype {:?} cannot be loaded",
                    t.name, t.dtype
                ))
            })?;
            let mut x = Tensor::from_raw_buffer(self.tensor_bytes(t), src, &t.shape, device)?;
            if t.is_float() && src != dtype {
                x = x.to_dtype(dtype)?;
            }
            bytes += (x.elem_count() * x.dtype().size_in_bytes()) as u64;
            tensors.insert(t.name.clone(), x);
        }
        Ok(DeviceModel {
            tensors,
            bytes,
            dtype,
            device: device.clone(),
        })
    }
}

/// A model's tensors at compute precision on the compute device.
pub struct DeviceModel {
    pub tensors: HashMap<String, Tensor>,
    pub bytes: u64,
    pub dtype: DType,
    pub device: Device,
}

impl DeviceModel {
    /// A VarBuilder over these tensors, the way candle model code takes weights.
    pub fn var_builder(&self) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_tensors(self.tensors.clone(), self.dtype, &self.device)
    }
}

/// Plans the RAM copy of a weights file or a diffusers component folder.
pub fn plan_path(path: &Path) -> Result<RamPlan, StoreError> {
    let files = if path.is_dir() {
        store::component_weights(path)?
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        return Err(StoreError::invalid(
            path,
            "no weight files (.safetensors) in this folder",
        ));
    }
    let indexes = files
        .iter()
        .map(|f| store::open_weights(f))
        .collect::<Result<Vec<_>, _>>()?;
    RamPlan::from_indexes(&indexes)
}
