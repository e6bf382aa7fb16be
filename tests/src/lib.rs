//! End-to-end tests of a whole modelcache deployment (operator and agents as
//! separate processes against an emulated Kubernetes API) live in this crate's
//! `tests/` folder as they are written. `tests/fixtures/` holds the data every
//! crate's tests share: tiny reference models made with diffusers, a LoRA, and
//! the malformed-input corpus (`fixtures/gen_malformed.py` regenerates it).
