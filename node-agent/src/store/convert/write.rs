//! Writing a planned component as one safetensors file, streaming tensor by
//! tensor: bytes are copied, never cast.

use super::plan::{Op, Planned};
use crate::store::error::{Result, StoreError};
use crate::store::index::{TensorIndex, TensorMeta};
use crate::store::load::read_bytes;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// Writes planned tensors as one safetensors file, streaming tensor by tensor.
pub fn write_component(index: &TensorIndex, planned: &[Planned], out: &Path) -> Result<()> {
    struct Item<'a> {
        p: &'a Planned,
        meta: &'a TensorMeta,
        shape: Vec<usize>,
        len: usize,
    }
    let mut items = Vec::with_capacity(planned.len());
    for p in planned {
        let meta = index
            .get(&p.src)
            .ok_or_else(|| StoreError::invalid(&index.path, format!("missing tensor {}", p.src)))?;
        let el = meta.dtype.bitsize() / 8;
        let shape = match &p.op {
            Op::Copy { shape } => shape.clone(),
            Op::Rows { start, end } => {
                let mut s = meta.shape.clone();
                s[0] = end - start;
                s
            }
            Op::Transpose => {
                if meta.shape.len() != 2 {
                    return Err(StoreError::Tensor {
                        path: index.path.clone(),
                        tensor: p.src.clone(),
                        reason: "expected a 2-D tensor to transpose".into(),
                    });
                }
                vec![meta.shape[1], meta.shape[0]]
            }
        };
        let len = shape.iter().product::<usize>() * el;
        items.push(Item {
            p,
            meta,
            shape,
            len,
        });
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for it in &items {
        header.insert(
            it.p.dst.clone(),
            json!({"dtype": it.meta.dtype, "shape": it.shape, "data_offsets": [offset, offset + it.len]}),
        );
        offset += it.len;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut text = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| StoreError::invalid(out, e.to_string()))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let file = std::fs::File::create(out).map_err(StoreError::io(out))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let io = StoreError::io(out);
    let write_all = |w: &mut std::io::BufWriter<std::fs::File>, b: &[u8]| w.write_all(b);
    write_all(&mut w, &(text.len() as u64).to_le_bytes())
        .and_then(|_| write_all(&mut w, &text))
        .map_err(io)?;
    let mut cache: Option<(String, Vec<u8>)> = None;
    for it in &items {
        if cache.as_ref().is_none_or(|(n, _)| *n != it.p.src) {
            cache = Some((it.p.src.clone(), read_bytes(index, it.meta)?));
        }
        let bytes = &cache
            .as_ref()
            .map(|(_, b)| b)
            .ok_or_else(|| StoreError::invalid(out, "internal"))?[..];
        let el = it.meta.dtype.bitsize() / 8;
        let data: std::borrow::Cow<[u8]> = match &it.p.op {
            Op::Copy { .. } => bytes.into(),
            Op::Rows { start, end } => {
                let row: usize = it.meta.shape.iter().skip(1).product::<usize>() * el;
                bytes[start * row..end * row].into()
            }
            Op::Transpose => {
                let (r, c) = (it.meta.shape[0], it.meta.shape[1]);
                let mut t = vec![0u8; bytes.len()];
                for i in 0..r {
                    for j in 0..c {
                        t[(j * r + i) * el..(j * r + i + 1) * el]
                            .copy_from_slice(&bytes[(i * c + j) * el..(i * c + j + 1) * el]);
                    }
                }
                t.into()
            }
        };
        w.write_all(&data).map_err(StoreError::io(out))?;
    }
    w.flush().map_err(StoreError::io(out))?;
    Ok(())
}
