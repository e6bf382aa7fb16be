//! Arbitrary bytes uploaded as an edit's image and mask: decoded under a
//! small pixel limit; must return an image or a typed error, never panic, and
//! never allocate past the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = modelcache_agent::pipeline::image::decode_image(data, 1 << 16);
    let _ = modelcache_agent::pipeline::image::decode_mask(data, 1 << 16);
});
