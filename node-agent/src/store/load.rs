//! Reading tensor bytes and turning them into candle tensors.

use super::error::{Result, StoreError};
use super::index::{Location, TensorIndex, TensorMeta, WeightsFormat};
use super::pickle::PICKLE_KEY;
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;

/// candle's dtype for a safetensors dtype, when candle has one.
pub fn candle_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I64 => DType::I64,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        _ => return None,
    })
}

/// Reads the raw little-endian bytes of one tensor, as stored.
pub fn read_bytes(index: &TensorIndex, meta: &TensorMeta) -> Result<Vec<u8>> {
    match &meta.location {
        Location::File { offset } => {
            let file = super::file::open_regular(&index.path)?;
            let mut buf = vec![0u8; meta.len as usize];
            file.read_exact_at(&mut buf, *offset)
                .map_err(StoreError::io(&index.path))?;
            Ok(buf)
        }
        Location::Zip { .. } => {
            let t = read_pickle_tensor(index, meta)?;
            tensor_bytes(index, meta, &t)
        }
    }
}

/// candle's reader of a pickle archive (of one section of it), parsed once
/// per index.
fn pickle_reader(
    index: &TensorIndex,
    section: Option<&str>,
) -> Result<std::sync::Arc<candle_core::pickle::PthTensors>> {
    let key = section.or(index.metadata.get(PICKLE_KEY).map(String::as_str));
    index
        .pickle
        .get_or_try_init(section, || {
            candle_core::pickle::PthTensors::new(&index.path, key)
        })
        .map_err(|e| StoreError::Candle {
            path: index.path.clone(),
            reason: super::error::candle_message(&e),
        })
}

/// A pickled tensor: its section's reader and its name there.
fn pickled<'m>(
    index: &TensorIndex,
    meta: &'m TensorMeta,
) -> Result<(std::sync::Arc<candle_core::pickle::PthTensors>, &'m str)> {
    let section = match &meta.location {
        Location::Zip { section, .. } => section.as_deref(),
        Location::File { .. } => None,
    };
    let name = match section {
        Some(s) => meta
            .name
            .strip_prefix(s)
            .and_then(|n| n.strip_prefix('.'))
            .unwrap_or(&meta.name),
        None => &meta.name,
    };
    Ok((pickle_reader(index, section)?, name))
}

fn read_pickle_tensor(index: &TensorIndex, meta: &TensorMeta) -> Result<Tensor> {
    let (reader, name) = pickled(index, meta)?;
    reader
        .get(name)
        .map_err(|e| StoreError::Candle {
            path: index.path.clone(),
            reason: super::error::candle_message(&e),
        })?
        .ok_or_else(|| StoreError::Tensor {
            path: index.path.clone(),
            tensor: meta.name.clone(),
            reason: "listed in the pickle but not readable".into(),
        })
}

fn tensor_bytes(index: &TensorIndex, meta: &TensorMeta, t: &Tensor) -> Result<Vec<u8>> {
    let err = |e: candle_core::Error| StoreError::Tensor {
        path: index.path.clone(),
        tensor: meta.name.clone(),
        reason: super::error::candle_message(&e),
    };
    let flat = t.flatten_all().map_err(err)?;
    let bytes = match flat.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U32 => flat
            .to_vec1::<u32>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>().map_err(err)?,
        other => {
            return Err(err(candle_core::Error::Msg(format!(
                "unsupported dtype {other:?}"
            ))))
        }
    };
    Ok(bytes)
}

/// Loads every tensor of a weights file onto `device`, casting floating-point
/// tensors to `dtype` (integer buffers keep theirs).
pub fn load_all(
    index: &TensorIndex,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(index.tensors.len());
    let pickle = index.format == WeightsFormat::Pickle;
    let file = super::file::open_regular(&index.path)?;
    for meta in &index.tensors {
        let terr = |e: candle_core::Error| StoreError::Tensor {
            path: index.path.clone(),
            tensor: meta.name.clone(),
            reason: super::error::candle_message(&e),
        };
        let t = match (&meta.location, pickle) {
            (Location::File { offset }, _) => {
                let src = candle_dtype(meta.dtype).ok_or_else(|| StoreError::Tensor {
                    path: index.path.clone(),
                    tensor: meta.name.clone(),
                    reason: format!("dtype {:?} cannot be loaded", meta.dtype),
                })?;
                let mut buf = vec![0u8; meta.len as usize];
                file.read_exact_at(&mut buf, *offset)
                    .map_err(StoreError::io(&index.path))?;
                Tensor::from_raw_buffer(&buf, src, &meta.shape, &Device::Cpu).map_err(terr)?
            }
            (Location::Zip { .. }, true) => {
                let (reader, name) = pickled(index, meta)?;
                reader
                    .get(name)
                    .map_err(terr)?
                    .ok_or_else(|| terr(candle_core::Error::Msg("missing from archive".into())))?
            }
            (Location::Zip { .. }, false) => continue,
        };
        let t = if meta.is_float() && t.dtype() != dtype {
            t.to_dtype(dtype).map_err(terr)?
        } else {
            t
        };
        let t = t.to_device(device).map_err(terr)?;
        out.insert(meta.name.clone(), t);
    }
    Ok(out)
}
