//! The modelcache node agent: model store, two-tier cache, generation pipeline
//! and HTTP API (ARCHITECTURE §4).

pub mod cache;
pub mod memory;
pub mod pipeline;
pub mod store;
pub mod demo;
pub mod metrics;
pub mod catalog;
pub mod api;
