//! Tokenizers from a model's `tokenizer/` folder (tokenizer.json, or
//! vocab.json + merges.txt assembled into the CLIP pipeline), fully offline.

use std::path::Path;
use tokenizers::Tokenizer;

/// A CLIP tokenizer padded or cut to the text encoder's length.
pub struct ClipTokenizer {
    tok: Tokenizer,
    max_len: usize,
    pad_id: u32,
    eos_id: u32,
}

/// The pipeline transformers builds for CLIP, with vocab and merges inserted.
fn clip_json(vocab: &str, merges: &str) -> Result<String, String> {
    let vocab: serde_json::Value =
        serde_json::from_str(vocab).map_err(|e| format!("vocab.json: {e}"))?;
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
    pub fn load(dir: &Path, max_len: usize) -> Result<Self, String> {
        let json = dir.join("tokenizer.json");
        let tok = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| format!("{}: {e}", json.display()))?
        } else {
            let vocab = std::fs::read_to_string(dir.join("vocab.json"))
                .map_err(|e| format!("{}/vocab.json: {e}", dir.display()))?;
            let merges = std::fs::read_to_string(dir.join("merges.txt"))
                .map_err(|e| format!("{}/merges.txt: {e}", dir.display()))?;
            let text = clip_json(&vocab, &merges)?;
            text.parse::<Tokenizer>()
                .map_err(|e| format!("{}: {e}", dir.display()))?
        };
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let token_id = |t: &str| tok.token_to_id(t);
        let eos_id = token_id("<|endoftext|>")
            .ok_or_else(|| format!("{}: tokenizer has no <|endoftext|>", dir.display()))?;
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

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids of `text`, cut to the maximum length (keeping the final EOS) and padded.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| format!("tokenizing the prompt: {e}"))?;
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

    /// Number of tokens `text` has before cutting (for prompt-length limits).
    pub fn count(&self, text: &str) -> Result<usize, String> {
        Ok(self
            .tok
            .encode(text, true)
            .map_err(|e| format!("tokenizing the prompt: {e}"))?
            .len())
    }
}
