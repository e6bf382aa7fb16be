//! The standard CLIP tokenizer files (`vocab.json`, `merges.txt`,
//! `tokenizer_config.json`), written from the BPE vocabulary shipped with the
//! agent, for single-file checkpoints, which carry no tokenizer.

use std::path::Path;

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
