//! Reading PyTorch checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) without executing them.
//!
//! `torch.save` writes a zip archive whose `data.pkl` is a pickle program. A
//! Python unpickler would run whatever callables it names; here candle's pickle
//! interpreter only builds a tree of plain values, and the tree is then checked
//! against an allowlist of the globals a tensor state dict needs (the same set
//! as PyTorch's own `weights_only` loader). Anything else is refused.

use super::error::{Result, StoreError};
use super::index::{Location, TensorIndex, TensorMeta, WeightsFormat};
use candle_core::pickle::{Object, Stack};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// Largest `data.pkl` accepted. Real SDXL checkpoints have ~1 MB of pickle.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Globals a plain tensor state dict may reference.
const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"),
];

fn bad(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Pickle {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn allowed(module: &str, class: &str) -> bool {
    (module == "torch" && class.ends_with("Storage"))
        || ALLOWED_GLOBALS
            .iter()
            .any(|(m, c)| *m == module && *c == class)
}

/// Refuses the first global that is not needed to rebuild tensors.
fn check_globals(path: &Path, obj: &Object) -> Result<()> {
    match obj {
        Object::Class {
            module_name,
            class_name,
        } => {
            if allowed(module_name, class_name) {
                Ok(())
            } else {
                Err(StoreError::UnsafePickle {
                    path: path.to_path_buf(),
                    global: format!("{module_name}.{class_name}"),
                })
            }
        }
        Object::Tuple(items) | Object::List(items) => {
            items.iter().try_for_each(|o| check_globals(path, o))
        }
        Object::Dict(items) => items.iter().try_for_each(|(k, v)| {
            check_globals(path, k)?;
            check_globals(path, v)
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            check_globals(path, callable)?;
            check_globals(path, args)
        }
        Object::PersistentLoad(o) => check_globals(path, o),
        _ => Ok(()),
    }
}

/// Most values (nodes) the parsed tree may have; real state dicts have a few per tensor.
const MAX_PICKLE_NODES: u64 = 10_000_000;

/// Checks, before candle's interpreter runs, that no length prefix points past
/// the data and that memo references cannot blow the tree up exponentially
/// (BINGET copies the memoized value). Tracks the size of every stack value in
/// nodes only; the opcodes are those candle's interpreter understands, and an
/// unknown one ends the scan (the interpreter then reports it).
fn precheck(path: &Path, b: &[u8]) -> Result<()> {
    let too_big = || {
        bad(
            path,
            format!("pickle would build more than {MAX_PICKLE_NODES} values"),
        )
    };
    let mut pos = 0usize;
    let mut stack: Vec<Option<u64>> = Vec::new(); // None = MARK
    let mut memo: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
        let s = b
            .get(*pos..pos.saturating_add(n))
            .ok_or_else(|| bad(path, format!("pickle: truncated at byte {}", *pos)))?;
        *pos += n;
        Ok(s)
    };
    let pop_to_mark = |stack: &mut Vec<Option<u64>>| -> u64 {
        let mut total = 1u64;
        while let Some(Some(n)) = stack.pop() {
            total = total.saturating_add(n);
        }
        total
    };
    while pos < b.len() {
        let op = b[pos];
        pos += 1;
        match op {
            0x80 | b'K' => drop(take(&mut pos, 1)?),
            b'M' => drop(take(&mut pos, 2)?),
            b'J' => drop(take(&mut pos, 4)?),
            b'G' => drop(take(&mut pos, 8)?),
            b'c' => {
                for _ in 0..2 {
                    let rest = &b[pos..];
                    let nl = rest
                        .iter()
                        .position(|&c| c == b'\n')
                        .ok_or_else(|| bad(path, "pickle: unterminated GLOBAL"))?;
                    pos += nl + 1;
                }
                stack.push(Some(1));
            }
            b'X' => {
                let len =
                    u32::from_le_bytes(take(&mut pos, 4)?.try_into().unwrap_or([0; 4])) as usize;
                take(&mut pos, len).map_err(|_| {
                    bad(
                        path,
                        format!("pickle: a {len}-byte string runs past the end of the data"),
                    )
                })?;
                stack.push(Some(1));
            }
            0x8a => {
                let len = take(&mut pos, 1)?[0] as usize;
                if len > 8 {
                    return Err(bad(
                        path,
                        format!("pickle: a {len}-byte integer is larger than 64 bits"),
                    ));
                }
                take(&mut pos, len)?;
                stack.push(Some(1));
            }
            b'q' | b'r' => {
                let id = if op == b'q' {
                    take(&mut pos, 1)?[0] as u32
                } else {
                    u32::from_le_bytes(take(&mut pos, 4)?.try_into().unwrap_or([0; 4]))
                };
                memo.insert(id, stack.last().copied().flatten().unwrap_or(1));
            }
            b'h' | b'j' => {
                let id = if op == b'h' {
                    take(&mut pos, 1)?[0] as u32
                } else {
                    u32::from_le_bytes(take(&mut pos, 4)?.try_into().unwrap_or([0; 4]))
                };
                stack.push(Some(memo.get(&id).copied().unwrap_or(1)));
            }
            b'(' => stack.push(None),
            b')' | b'N' | 0x88 | 0x89 | b'}' | b'd' | b']' => stack.push(Some(1)),
            b't' | b'u' | b'e' => {
                let n = pop_to_mark(&mut stack);
                if op == b't' {
                    stack.push(Some(n));
                } else if let Some(Some(top)) = stack.last_mut() {
                    *top = top.saturating_add(n);
                }
            }
            0x85..=0x87 | b'R' | b'b' | b'a' | b's' | 0x81 | b'Q' => {
                let k = match op {
                    0x85 | b'Q' => 1,
                    0x86 | b'R' | b'b' | b'a' | 0x81 => 2,
                    _ => 3,
                };
                let mut total = 1u64;
                for _ in 0..k {
                    total = total.saturating_add(stack.pop().flatten().unwrap_or(1));
                }
                stack.push(Some(total));
            }
            b'.' => return Ok(()),
            _ => return Ok(()),
        }
        if stack.last().copied().flatten().unwrap_or(0) > MAX_PICKLE_NODES {
            return Err(too_big());
        }
    }
    Ok(())
}

/// Parses the pickle program of an archive into a value tree (no code runs).
pub fn parse_pickle(path: &Path, bytes: &[u8]) -> Result<Object> {
    precheck(path, bytes)?;
    let mut stack = Stack::empty();
    let mut cursor = std::io::Cursor::new(bytes);
    stack.read_loop(&mut cursor).map_err(|e| {
        bad(
            path,
            format!("pickle: {}", super::error::candle_message(&e)),
        )
    })?;
    let obj = stack.finalize().map_err(|e| {
        bad(
            path,
            format!("pickle: {}", super::error::candle_message(&e)),
        )
    })?;
    check_globals(path, &obj)?;
    Ok(obj)
}

fn candle_to_st(dtype: candle_core::DType) -> Option<Dtype> {
    use candle_core::DType as D;
    Some(match dtype {
        D::U8 => Dtype::U8,
        D::U32 => Dtype::U32,
        D::I64 => Dtype::I64,
        D::BF16 => Dtype::BF16,
        D::F16 => Dtype::F16,
        D::F32 => Dtype::F32,
        D::F64 => Dtype::F64,
        _ => return None,
    })
}

fn as_int(o: &Object) -> Option<i64> {
    match o {
        Object::Int(i) => Some(*i as i64),
        Object::Long(i) => Some(*i),
        _ => None,
    }
}

/// Reads the tensor index of a PyTorch zip checkpoint. Nested `state_dict`
/// wrappers are unwrapped; `global_step` is kept for the SD2 prediction probe.
pub fn read_index(path: &Path) -> Result<TensorIndex> {
    let file = super::file::open_regular(path)?;
    let file_bytes = file.metadata().map_err(StoreError::io(path))?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        bad(
            path,
            format!("not a PyTorch zip archive ({e}); legacy non-zip pickles are not supported"),
        )
    })?;
    let entry_name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| bad(path, "archive has no data.pkl"))?;
    let dir = entry_name.trim_end_matches(".pkl").to_string();
    let mut entry = zip
        .by_name(&entry_name)
        .map_err(|e| bad(path, e.to_string()))?;
    if entry.size() > MAX_PICKLE_BYTES {
        return Err(bad(
            path,
            format!(
                "data.pkl is {} bytes, over the {MAX_PICKLE_BYTES}-byte limit",
                entry.size()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .by_ref()
        .take(MAX_PICKLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(path, e.to_string()))?;
    drop(entry);
    let mut obj = parse_pickle(path, &bytes)?;

    let mut global_step = None;
    let mut key = None;
    // Unwrap `{"state_dict": {...}, "global_step": N}` (possibly nested).
    let is_key = |k: &Object, name: &str| matches!(k, Object::Unicode(s) if s == name);
    while let Object::Dict(items) = &obj {
        if let Some((_, v)) = items.iter().find(|(k, _)| is_key(k, "global_step")) {
            global_step = global_step.or_else(|| as_int(v));
        }
        let Some(pos) = items.iter().position(|(k, _)| is_key(k, "state_dict")) else {
            break;
        };
        let Object::Dict(mut items) = obj else { break };
        obj = items.swap_remove(pos).1;
        key = Some(key.map_or("state_dict".to_string(), |k: String| {
            format!("{k}.state_dict")
        }));
    }
    let Object::Dict(items) = obj else {
        return Err(bad(path, "the pickle does not hold a dict of tensors"));
    };
    // A dict of tensors, or (IP-Adapter files) a dict of such dicts, each a
    // section whose key prefixes its tensors' names.
    let mut entries = Vec::new();
    for (name, value) in items {
        match (value, key.is_none(), name.clone().unicode()) {
            (Object::Dict(inner), true, Ok(section)) => entries.extend(
                inner
                    .into_iter()
                    .map(|(n, v)| (n, v, Some(section.clone()))),
            ),
            (value, _, _) => entries.push((name, value, None)),
        }
    }
    let mut tensors = Vec::new();
    for (name, value, section) in entries {
        let Ok(name_str) = name.clone().unicode() else {
            continue;
        };
        let info = match value.into_tensor_info(name, Path::new(&dir)) {
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(e) => {
                return Err(StoreError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name_str,
                    reason: super::error::candle_message(&e),
                })
            }
        };
        let dtype = candle_to_st(info.dtype).ok_or_else(|| StoreError::Tensor {
            path: path.to_path_buf(),
            tensor: info.name.clone(),
            reason: format!("unsupported dtype {:?}", info.dtype),
        })?;
        let shape = info.layout.dims().to_vec();
        let len = shape.iter().product::<usize>() as u64 * info.dtype.size_in_bytes() as u64;
        tensors.push(TensorMeta {
            name: match &section {
                Some(s) => format!("{s}.{}", info.name),
                None => info.name,
            },
            dtype,
            shape,
            location: Location::Zip {
                entry: info.path,
                section,
            },
            len,
        });
    }
    let mut metadata = BTreeMap::new();
    if let Some(k) = key {
        metadata.insert(PICKLE_KEY.to_string(), k);
    }
    Ok(TensorIndex::new(
        path.to_path_buf(),
        WeightsFormat::Pickle,
        tensors,
        metadata,
        global_step,
        file_bytes,
    ))
}

/// Metadata entry recording the dict key the tensors were found under.
pub const PICKLE_KEY: &str = "modelcache.pickle_key";
