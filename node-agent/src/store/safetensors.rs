//! Reading safetensors headers without touching tensor data.
//!
//! The format is an 8-byte little-endian header length, a JSON header and the
//! data. Everything about the file is checked from the header alone: its size
//! cap, that the header fits in the file, that offsets are sorted, contiguous
//! and non-overlapping, that every tensor's shape × dtype equals its byte span
//! (all via `safetensors::tensor::Metadata`'s own validation), and that the
//! data section ends exactly at the end of the file.

use super::error::{Result, StoreError};
use super::index::{Location, TensorIndex, TensorMeta, WeightsFormat};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// Largest header accepted; the same cap as the safetensors crate's own.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Reads and validates the header of `path`. Reads 8 + header bytes, never the data.
pub fn read_index(path: &Path) -> Result<TensorIndex> {
    let mut file = super::file::open_regular(path)?;
    let file_len = file.metadata().map_err(StoreError::io(path))?.len();
    let header = read_header_bytes(path, &mut file, file_len)?;
    parse_header(path, &header, file_len)
}

fn bad(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Safetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_header_bytes(path: &Path, file: &mut impl Read, file_len: u64) -> Result<Vec<u8>> {
    if file_len < 8 {
        return Err(bad(
            path,
            format!("file is {file_len} bytes, shorter than the 8-byte header length"),
        ));
    }
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(StoreError::io(path))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES {
        return Err(bad(
            path,
            format!("header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit"),
        ));
    }
    if n == 0 || 8 + n > file_len {
        return Err(bad(
            path,
            format!("header length {n} does not fit in a {file_len}-byte file"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(StoreError::io(path))?;
    Ok(header)
}

/// Validates a header (the bytes after the 8-byte length) against the length of
/// the whole file and builds the tensor index. Pure: the fuzz target calls it.
pub fn parse_header(path: &Path, header: &[u8], file_len: u64) -> Result<TensorIndex> {
    let text =
        std::str::from_utf8(header).map_err(|e| bad(path, format!("header is not UTF-8: {e}")))?;
    let md: safetensors::tensor::Metadata = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| bad(path, format!("header: {e}")))?;
    let data_start = 8 + header.len() as u64;
    let data_len = md.data_len() as u64;
    if data_start + data_len != file_len {
        return Err(bad(
            path,
            format!(
                "tensor data ends at byte {} but the file has {file_len} bytes (truncated or trailing data)",
                data_start + data_len
            ),
        ));
    }
    let mut tensors = Vec::new();
    for name in md.offset_keys() {
        let Some(info) = md.info(&name) else { continue };
        let (start, end) = info.data_offsets;
        tensors.push(TensorMeta {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            location: Location::File {
                offset: data_start + start as u64,
            },
            len: (end - start) as u64,
        });
    }
    let metadata: BTreeMap<String, String> = md
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    if let Some(fmt) = metadata.get("format") {
        if !matches!(fmt.as_str(), "pt" | "torch" | "pytorch") {
            return Err(bad(
                path,
                format!(
                    "__metadata__.format is {fmt:?}; only PyTorch-layout tensors are supported"
                ),
            ));
        }
    }
    Ok(TensorIndex::new(
        path.to_path_buf(),
        WeightsFormat::Safetensors,
        tensors,
        metadata,
        None,
        file_len,
    ))
}

/// Writes a valid safetensors file with the given tensors whose data bytes are
/// left as a hole (zeros, no disk blocks): a header-faithful stand-in for a
/// multi-gigabyte checkpoint, used by tests and benchmarks.
pub fn write_sparse(
    path: &Path,
    tensors: &[(&str, Dtype, &[usize])],
    metadata: &[(&str, &str)],
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let md: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(md));
    }
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    std::fs::write(path, &out)?;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len((out.len() + offset) as u64)
}

use safetensors::Dtype;
