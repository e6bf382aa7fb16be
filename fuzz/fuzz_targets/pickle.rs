//! Arbitrary bytes as a `data.pkl` pickle program: parsed without executing
//! anything; must return Ok or a typed error and never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = modelcache_agent::store::pickle::parse_pickle(std::path::Path::new("fuzz"), data);
});
