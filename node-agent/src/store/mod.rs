//! Everything between a file on disk and tensors on a device: safe header and
//! pickle reading, probing, search, identity, conversion and loading.

pub mod clip_vocab;
pub mod convert;
pub mod error;
pub mod file;
pub mod identity;
pub mod index;
pub mod load;
pub mod merge;
pub mod pickle;
pub mod probe;
pub mod safetensors;
pub mod search;
pub mod sidecar;

pub use error::{Result, StoreError};
pub use index::{Location, TensorIndex, TensorMeta, WeightsFormat};
pub use probe::{probe, ProbeResult, SizeByPrecision};

use std::path::{Path, PathBuf};

/// Suffixes of single-file weights.
pub const WEIGHT_SUFFIXES: &[&str] = &["safetensors", "ckpt", "pt", "pth", "bin"];

/// Opens the tensor index of a weights file, choosing the reader by suffix.
pub fn open_weights(path: &Path) -> Result<TensorIndex> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => safetensors::read_index(path),
        Some("ckpt" | "pt" | "pth" | "bin") => pickle::read_index(path),
        _ => Err(StoreError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Removes what interrupted writes left in `dir` (a conversion or the demo
/// model stopped half-way: `.<name>.partial-<pid>`); returns how many.
pub fn remove_partials(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with('.') && name.contains(".partial-")
        })
        .filter(|e| std::fs::remove_dir_all(e.path()).is_ok())
        .count()
}

/// The folder of architecture configs a single-file checkpoint may have
/// beside it, `<name>.config/` for `<name>.safetensors`: what `--config`
/// gives `convert`, for a checkpoint of an architecture that is not built in.
pub fn config_beside(checkpoint: &Path) -> Option<PathBuf> {
    let dir = checkpoint.with_extension("config");
    (checkpoint.is_file() && dir.is_dir()).then_some(dir)
}

/// Reads a JSON file of a model folder.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = file::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Config {
        path: path.parent().unwrap_or(path).to_path_buf(),
        file: path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        reason: e.to_string(),
    })
}

/// Weight files of one diffusers component folder: the default-precision
/// safetensors (all shards), else the fp16 variant, else `.bin` files.
/// (InvokeAI estimated a folder holding only `*.fp16.*` weights as 0 bytes.)
pub fn component_weights(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(StoreError::Io {
                path: dir.to_path_buf(),
                source: e,
            })
        }
    };
    files.sort();
    let name = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let is_variant = |n: &str| {
        n.contains(".fp16.") || n.contains(".8bit.") || n.contains(".fp16-") || n.contains(".8bit-")
    };
    for (suffix, variant) in [
        (".safetensors", false),
        (".safetensors", true),
        (".bin", false),
        (".bin", true),
    ] {
        let group: Vec<PathBuf> = files
            .iter()
            .filter(|p| {
                let n = name(p);
                n.ends_with(suffix)
                    && is_variant(&n) == variant
                    && (!variant || n.contains(".fp16"))
            })
            .cloned()
            .collect();
        if !group.is_empty() {
            return Ok(group);
        }
    }
    Ok(Vec::new())
}

/// Every weight file of a model folder: each component listed in
/// `model_index.json`, or the folder itself for single-component models.
pub fn weights_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model_index.json");
    if !index_path.exists() {
        return component_weights(dir);
    }
    let index = read_json(&index_path)?;
    let mut out = Vec::new();
    if let Some(map) = index.as_object() {
        for (component, value) in map {
            let present = value
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|v| !v.is_null()));
            if present && !component.starts_with('_') {
                out.extend(component_weights(&dir.join(component))?);
            }
        }
    }
    Ok(out)
}
