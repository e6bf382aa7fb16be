//! Arbitrary bytes as a whole safetensors file: the header reader must return
//! Ok or a typed error, never panic, and never accept offsets outside the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let n = u64::from_le_bytes(data[..8].try_into().unwrap_or_default()) as usize;
    let header = &data[8..8 + n.min(data.len() - 8)];
    let file_len = data.len() as u64;
    if let Ok(index) = modelcache_agent::store::safetensors::parse_header(Path::new("fuzz"), header, file_len) {
        for t in &index.tensors {
            if let modelcache_agent::store::Location::File { offset } = t.location {
                assert!(offset + t.len <= file_len);
            }
        }
    }
});
