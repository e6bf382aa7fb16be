//! Tokenizers from a model's `tokenizer/` folder (tokenizer.json, or
//! vocab.json + merges.txt assembled into the CLIP pipeline), fully offline.

use std::path::Path;
use tokenizers::Tokenizer;

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

    /// Number of tokens, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
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

    /// Token ids of a prompt split into text and embedding parts: text is
    /// tokenized as usual, each embedding takes `sizes[i]` positions (filled
    /// with a placeholder id). Returns the ids, cut and padded like
    /// [`Self::encode`], and the positions of each embedding's vectors.
    pub fn encode_parts(
        &self,
        parts: &[super::embedding::Part],
        sizes: &[usize],
    ) -> Result<(Vec<u32>, Vec<VectorSlot>), String> {
        use super::embedding::Part;
        let framed = self
            .tok
            .encode("", true)
            .map_err(|e| format!("tokenizing the prompt: {e}"))?;
        let bos = framed.get_ids().first().copied().unwrap_or(self.eos_id);
        let mut ids = vec![bos];
        let mut slots = Vec::new();
        for part in parts {
            match part {
                Part::Text(t) => ids.extend(
                    self.tok
                        .encode(*t, false)
                        .map_err(|e| format!("tokenizing the prompt: {e}"))?
                        .get_ids(),
                ),
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

    /// Number of tokens `text` has before cutting (for prompt-length limits).
    pub fn count(&self, text: &str) -> Result<usize, String> {
        Ok(self
            .tok
            .encode(text, true)
            .map_err(|e| format!("tokenizing the prompt: {e}"))?
            .len())
    }
}

/// The standard CLIP BPE vocabulary, shipped with the agent (assets/clip/README.md).
const CLIP_BPE_GZ: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");

/// CLIP's byte → printable-character table (GPT-2's `bytes_to_unicode`), in its order.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter().filter_map(char::from_u32).collect()
}

/// Writes the standard CLIP tokenizer (`vocab.json`, `merges.txt`,
/// `tokenizer_config.json`) into `dir`. SD 1.x and SDXL's first tokenizer pad
/// with `<|endoftext|>`; SD 2.x and SDXL's second pad with `!`.
pub fn write_standard_clip(dir: &Path, pad_token: &str) -> std::io::Result<()> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(CLIP_BPE_GZ).read_to_string(&mut text)?;
    // As CLIP's SimpleTokenizer: 49152 − 256 − 2 merges after the version line.
    let merges: Vec<&str> = text.lines().skip(1).take(49152 - 256 - 2).collect();
    let mut vocab: Vec<String> = bytes_to_unicode().into_iter().map(String::from).collect();
    let with_suffix: Vec<String> = vocab.iter().map(|v| format!("{v}</w>")).collect();
    vocab.extend(with_suffix);
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::Value::from(i)))
        .collect();
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&map)?)?;
    std::fs::write(
        dir.join("merges.txt"),
        format!("#version: 0.2\n{}\n", merges.join("\n")),
    )?;
    let cfg = serde_json::json!({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_clip_tokenizer_matches_openai_ids() {
        let dir = tempfile::tempdir().unwrap();
        write_standard_clip(dir.path(), "<|endoftext|>").unwrap();
        let tok = ClipTokenizer::load(dir.path(), 77).unwrap();
        let ids = tok.encode("a red cat").unwrap();
        // OpenAI CLIP: <|startoftext|>=49406, a=320, red=736, cat=2368, <|endoftext|>=49407 (also the pad).
        assert_eq!(&ids[..6], &[49406, 320, 736, 2368, 49407, 49407]);
        assert_eq!(ids.len(), 77);
        let sd2 = tempfile::tempdir().unwrap();
        write_standard_clip(sd2.path(), "!").unwrap();
        let ids = ClipTokenizer::load(sd2.path(), 77)
            .unwrap()
            .encode("a red cat")
            .unwrap();
        assert_eq!(&ids[4..6], &[49407, 0], "SD 2.x pads with '!' (id 0)");
    }
}
