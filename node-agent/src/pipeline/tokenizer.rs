//! Tokenizers from a model's `tokenizer/` folder (tokenizer.json, or
//! vocab.json + merges.txt assembled into the CLIP pipeline), fully offline.

use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Why a tokenizer cannot be loaded or a prompt tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Read(#[from] crate::store::StoreError),
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("tokenizing the prompt: {0}")]
    Encode(String),
}

fn encode_err(e: tokenizers::Error) -> TokenizerError {
    TokenizerError::Encode(e.to_string())
}

/// Where an embedding vector goes: (token position, embedding index, vector index).
pub type VectorSlot = (usize, usize, usize);

/// A CLIP tokenizer padded or cut to the text encoder's length.
pub struct ClipTokenizer {
    tok: Tokenizer,
    max_len: usize,
    pad_id: u32,
    eos_id: u32,
}

/// The pipeline transformers builds for CLIP, with vocab and merges inserted.
fn clip_json(vocab: &str, merges: &str) -> Result<String, &'static str> {
    let vocab: serde_json::Value =
        serde_json::from_str(vocab).map_err(|_| "vocab.json is not JSON")?;
    let merges: Vec<String> = merges
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let id = |t: &str| vocab[t].as_u64();
    let (bos, eos) = (
        id("<|startoftext|>").ok_or("vocab lacks <|startoftext|>")?,
        id("<|endoftext|>").ok_or("vocab lacks <|endoftext|>")?,
    );
    let j = serde_json::json!({
        "version": "1.0",
        "truncation": null, "padding": null,
        "added_tokens": [
            {"id": bos, "content": "<|startoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true},
            {"id": eos, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}
        ],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos], "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    Ok(j.to_string())
}

impl ClipTokenizer {
    /// Loads the tokenizer in `dir`; `max_len` is the text encoder's position count.
    pub fn load(dir: &Path, max_len: usize) -> Result<Self, TokenizerError> {
        let invalid = |path: PathBuf, reason: String| TokenizerError::Invalid { path, reason };
        let read = |file: &str| {
            let path = dir.join(file);
            crate::store::file::read_to_string(&path).map_err(TokenizerError::Read)
        };
        if max_len == 0 {
            return Err(invalid(
                dir.to_path_buf(),
                "the text encoder has no token positions".into(),
            ));
        }
        let json = dir.join("tokenizer.json");
        let tok = if json.exists() {
            crate::store::file::read_to_string(&json)?
                .parse::<Tokenizer>()
                .map_err(|e| invalid(json.clone(), e.to_string()))?
        } else {
            let text = clip_json(&read("vocab.json")?, &read("merges.txt")?)
                .map_err(|e| invalid(dir.to_path_buf(), e.to_string()))?;
            text.parse::<Tokenizer>()
                .map_err(|e| invalid(dir.to_path_buf(), e.to_string()))?
        };
        let cfg: serde_json::Value =
            crate::store::file::read_to_string(&dir.join("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
        let token_id = |t: &str| tok.token_to_id(t);
        let eos_id = token_id("<|endoftext|>").ok_or_else(|| {
            invalid(
                dir.to_path_buf(),
                "the tokenizer has no <|endoftext|>".into(),
            )
        })?;
        // SD 1.x pads with <|endoftext|>; SD 2.x and SDXL's second tokenizer pad with "!".
        let pad_token = cfg["pad_token"]
            .as_str()
            .or_else(|| cfg["pad_token"]["content"].as_str())
            .unwrap_or("<|endoftext|>");
        let pad_id = token_id(pad_token).unwrap_or(eos_id);
        let max_len = cfg["model_max_length"]
            .as_u64()
            .map_or(max_len, |m| (m as usize).min(max_len));
        Ok(ClipTokenizer {
            tok,
            max_len,
            pad_id,
            eos_id,
        })
    }

    /// Number of tokens, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids of `text`, cut to the maximum length (keeping the final EOS) and padded.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.tok.encode(text, true).map_err(encode_err)?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_len {
            ids.truncate(self.max_len);
            if let Some(last) = ids.last_mut() {
                *last = self.eos_id;
            }
        }
        ids.resize(self.max_len, self.pad_id);
        Ok(ids)
    }

    /// Token ids of a prompt split into text and embedding parts: text is
    /// tokenized as usual, each embedding takes `sizes[i]` positions (filled
    /// with a placeholder id). Returns the ids, cut and padded like
    /// [`Self::encode`], and the positions of each embedding's vectors.
    pub fn encode_parts(
        &self,
        parts: &[super::embedding::Part],
        sizes: &[usize],
    ) -> Result<(Vec<u32>, Vec<VectorSlot>), TokenizerError> {
        use super::embedding::Part;
        let framed = self.tok.encode("", true).map_err(encode_err)?;
        let bos = framed.get_ids().first().copied().unwrap_or(self.eos_id);
        let mut ids = vec![bos];
        let mut slots = Vec::new();
        for part in parts {
            match part {
                Part::Text(t) => {
                    ids.extend(self.tok.encode(*t, false).map_err(encode_err)?.get_ids())
                }
                Part::Embedding(i) => {
                    for k in 0..sizes.get(*i).copied().unwrap_or(0) {
                        // Any id but EOS: the pooled output is taken at the first EOS.
                        slots.push((ids.len(), *i, k));
                        ids.push(0);
                    }
                }
            }
        }
        ids.push(self.eos_id);
        if ids.len() > self.max_len {
            ids.truncate(self.max_len);
            if let Some(last) = ids.last_mut() {
                *last = self.eos_id;
            }
            let max = self.max_len - 1;
            slots.retain(|(pos, _, _)| *pos < max);
        }
        ids.resize(self.max_len, self.pad_id);
        Ok((ids, slots))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_clip_tokenizer_matches_openai_ids() {
        let dir = tempfile::tempdir().unwrap();
        crate::store::clip_vocab::write_standard_clip(dir.path(), "<|endoftext|>").unwrap();
        let tok = ClipTokenizer::load(dir.path(), 77).unwrap();
        let ids = tok.encode("a red cat").unwrap();
        // OpenAI CLIP: <|startoftext|>=49406, a=320, red=736, cat=2368, <|endoftext|>=49407 (also the pad).
        assert_eq!(&ids[..6], &[49406, 320, 736, 2368, 49407, 49407]);
        assert_eq!(ids.len(), 77);
        let sd2 = tempfile::tempdir().unwrap();
        crate::store::clip_vocab::write_standard_clip(sd2.path(), "!").unwrap();
        let ids = ClipTokenizer::load(sd2.path(), 77)
            .unwrap()
            .encode("a red cat")
            .unwrap();
        assert_eq!(&ids[4..6], &[49407, 0], "SD 2.x pads with '!' (id 0)");
    }
}
