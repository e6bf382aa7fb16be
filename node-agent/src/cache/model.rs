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
            let bytes_in = self.tensor_bytes(t);
            let x = match (device, src, dtype) {
                (Device::Cpu, DType::F16 | DType::BF16, DType::F32) => {
                    Tensor::from_vec(widen(bytes_in, src), t.shape.as_slice(), device)?
                }
                _ => {
                    let x = Tensor::from_raw_buffer(bytes_in, src, &t.shape, device)?;
                    if t.is_float() && src != dtype {
                        x.to_dtype(dtype)?
                    } else {
                        x
                    }
                }
            };
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

/// Half-precision file bytes (`F16` or `BF16`, little-endian) widened to f32
/// in one pass on every core. The CPU device holds models in f32: copying the
/// bytes into a half tensor and casting it on one thread ran at 0.4 GB/s and
/// made a RAM → device move on the CPU slower than the disk read before it.
fn widen(bytes: &[u8], src: DType) -> Vec<f32> {
    /// Below this many elements a thread costs more than it saves.
    const PER_THREAD: usize = 1 << 20;
    let n = bytes.len() / 2;
    let mut out = vec![0f32; n];
    let convert = |from: &[u8], to: &mut [f32]| {
        let pairs = from
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]));
        if src == DType::BF16 {
            // bf16 is the top half of an f32.
            to.iter_mut()
                .zip(pairs)
                .for_each(|(o, b)| *o = f32::from_bits(u32::from(b) << 16));
        } else if cfg!(target_endian = "little") && from.as_ptr().align_offset(2) == 0 {
            // SAFETY: the bytes are 2-aligned and little-endian f16 values,
            // which have f16's layout on this target.
            let halves = unsafe {
                std::slice::from_raw_parts(from.as_ptr().cast::<half::f16>(), from.len() / 2)
            };
            // Vectorised (F16C where the CPU has it).
            use half::slice::HalfFloatSliceExt;
            halves.convert_to_f32_slice(to);
        } else {
            to.iter_mut()
                .zip(pairs)
                .for_each(|(o, b)| *o = half::f16::from_bits(b).to_f32());
        }
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n / PER_THREAD)
        .max(1);
    if threads == 1 {
        convert(bytes, &mut out);
        return out;
    }
    let chunk = n.div_ceil(threads);
    std::thread::scope(|s| {
        for (to, from) in out.chunks_mut(chunk).zip(bytes.chunks(chunk * 2)) {
            s.spawn(move || convert(from, to));
        }
    });
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The widened copy is candle's cast, bit for bit, on one thread and on several.
    #[test]
    fn widening_matches_candles_cast_for_every_half_format() {
        for n in [7usize, (1 << 21) + 3] {
            let bits: Vec<u16> = (0..n).map(|i| (i as u16).wrapping_mul(40_503)).collect();
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            for src in [DType::F16, DType::BF16] {
                let ours = widen(&bytes, src);
                let theirs: Vec<f32> = Tensor::from_raw_buffer(&bytes, src, &[n], &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.to_vec1())
                    .unwrap();
                assert_eq!(ours.len(), n);
                let same = ours
                    .iter()
                    .zip(&theirs)
                    .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                assert!(same, "{src:?}, {n} elements");
                // Tensors in a region need not be 2-aligned.
                let shifted = [&[0u8][..], &bytes].concat();
                let unaligned = widen(&shifted[1..], src);
                assert!(
                    unaligned
                        .iter()
                        .zip(&ours)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{src:?} unaligned"
                );
            }
        }
    }
}
