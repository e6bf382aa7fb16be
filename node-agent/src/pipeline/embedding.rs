//! Textual inversion: learned token vectors used by writing `<name>` in a
//! prompt. The files come as A1111 `.pt`/`.safetensors` embeddings
//! (`string_to_param`, or `emb_params`) or diffusers' `learned_embeds.bin`.
//!
//! Instead of growing the text encoder's embedding table (and shrinking it back
//! afterwards, shared state InvokeAI mutates per request), a prompt is
//! split at its triggers: text is tokenized as usual and each trigger becomes
//! its vectors' positions, whose rows replace the token embeddings for this one
//! forward pass. This is what InvokeAI's added tokens plus pad tokens
//! compute, without touching the shared model or tokenizer.

use crate::store;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// An embedding's vectors `[n, d]` (f32, CPU): for SDXL, one set per text
/// encoder (`clip_l` for the first, `clip_g` for the second).
#[derive(Debug, Clone)]
pub struct TextualInversion {
    pub name: String,
    pub vectors: Tensor,
    pub vectors_2: Option<Tensor>,
}

/// Why an embedding cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    #[error("embedding {name:?}: {source}")]
    Store {
        name: String,
        source: store::StoreError,
    },
    #[error("embedding {name:?} is for SDXL's two text encoders (clip_l and clip_g), not this model's one")]
    ForSdxl { name: String },
    #[error("embedding {name:?} has vectors for one text encoder; SDXL needs clip_l and clip_g")]
    NotForSdxl { name: String },
    #[error("embedding {name:?}: {} holds no tensor", file.display())]
    Empty { name: String, file: PathBuf },
    #[error("embedding {name:?}: {key:?} has rank {rank}; expected [vectors, width]")]
    Rank {
        name: String,
        key: String,
        rank: usize,
    },
    #[error("embedding {name:?}: {message}")]
    Tensor { name: String, message: String },
}

/// Loads an embedding file (or a diffusers folder's `learned_embeds.bin`):
/// A1111 `string_to_param` (first entry), `emb_params`, or the first tensor of
/// a diffusers file; a 1-D vector becomes `[1, d]`.
pub fn load(name: &str, path: &Path) -> Result<TextualInversion, EmbeddingError> {
    let file: PathBuf = if path.is_dir() {
        path.join("learned_embeds.bin")
    } else {
        path.to_path_buf()
    };
    let store_err = |source| EmbeddingError::Store {
        name: name.to_string(),
        source,
    };
    let index = store::open_weights(&file).map_err(store_err)?;
    let names: Vec<&str> = index.tensors.iter().map(|t| t.name.as_str()).collect();
    let sdxl = names.contains(&"clip_l") && names.contains(&"clip_g");
    let params: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| *n == "string_to_param" || n.starts_with("string_to_param."))
        .collect();
    let key = if sdxl {
        "clip_l".to_string()
    } else if let Some(first) = params.first() {
        if params.len() > 1 {
            tracing::warn!(
                embedding = name,
                "string_to_param has {} entries; only the first token is used",
                params.len()
            );
        }
        first.to_string()
    } else if names.contains(&"emb_params") {
        "emb_params".to_string()
    } else {
        names
            .first()
            .ok_or_else(|| EmbeddingError::Empty {
                name: name.to_string(),
                file: file.clone(),
            })?
            .to_string()
    };
    let mut tensors = store::load::load_all(&index, &Device::Cpu, DType::F32).map_err(store_err)?;
    let tensor_err = |message: String| EmbeddingError::Tensor {
        name: name.to_string(),
        message,
    };
    let mut take = |key: &str| -> Result<Tensor, EmbeddingError> {
        let t = tensors
            .remove(key)
            .ok_or_else(|| tensor_err(format!("tensor {key:?} could not be read")))?;
        match t.rank() {
            1 => t.unsqueeze(0),
            2 => Ok(t),
            rank => {
                return Err(EmbeddingError::Rank {
                    name: name.to_string(),
                    key: key.to_string(),
                    rank,
                })
            }
        }
        .map_err(|e| tensor_err(store::error::candle_message(&e)))
    };
    let vectors = take(&key)?;
    let vectors_2 = if sdxl { Some(take("clip_g")?) } else { None };
    Ok(TextualInversion {
        name: name.to_string(),
        vectors,
        vectors_2,
    })
}

/// The name an embedding file is used by: `<stem>` of `style.safetensors`, or
/// the folder name of a diffusers `learned_embeds.bin` folder.
pub fn trigger_name(path: &Path) -> String {
    let p = if path.file_name().is_some_and(|f| f == "learned_embeds.bin") {
        path.parent().unwrap_or(path)
    } else {
        path
    };
    let name = if p.is_dir() {
        p.file_name()
    } else {
        p.file_stem()
    };
    name.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The `<name>` triggers written in `text` (names of letters, digits, `_`, `-`, `.`).
pub fn triggers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        match after.find('>') {
            Some(end)
                if end > 0
                    && after[..end]
                        .chars()
                        .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
            {
                out.push(after[..end].to_string());
                rest = &after[end + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

/// A prompt split at the triggers of known embeddings.
#[derive(Debug, PartialEq)]
pub enum Part<'a> {
    Text(&'a str),
    /// Embedding index into the caller's list.
    Embedding(usize),
}

/// Splits `text` at `<name>` for each name in `known` (by position in `known`).
pub fn split<'a>(text: &'a str, known: &[&str]) -> Vec<Part<'a>> {
    let by_trigger: BTreeMap<String, usize> = known
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("<{n}>"), i))
        .collect();
    let mut parts = Vec::new();
    let mut rest = text;
    loop {
        let next = by_trigger
            .iter()
            .filter_map(|(t, i)| rest.find(t.as_str()).map(|at| (at, t.len(), *i)))
            .min();
        match next {
            Some((at, len, i)) => {
                if at > 0 {
                    parts.push(Part::Text(&rest[..at]));
                }
                parts.push(Part::Embedding(i));
                rest = &rest[at + len..];
            }
            None => {
                if !rest.is_empty() {
                    parts.push(Part::Text(rest));
                }
                return parts;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_splits_triggers() {
        assert_eq!(
            triggers("a <style-1> cat, <bad name>, <x.y> <>"),
            ["style-1", "x.y"]
        );
        assert_eq!(
            split("<a> red <b>cat <c>", &["a", "b"]),
            [
                Part::Embedding(0),
                Part::Text(" red "),
                Part::Embedding(1),
                Part::Text("cat <c>")
            ]
        );
        assert_eq!(split("plain", &[]), [Part::Text("plain")]);
    }
}
