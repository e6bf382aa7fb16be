//! What a remote source sends the agent before any weight: a Hugging Face
//! tree listing (any bytes), filtered into the model's files, and a source
//! URL as a user writes it. Must return a list or a typed error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelcache_agent::fetch::{hf, Source};

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = hf::parse_tree(data) {
        for sub in ["", "unet", "a/b"] {
            let _ = hf::model_files(&entries, sub);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<Source>();
    }
});
