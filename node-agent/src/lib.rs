//! The modelcache node agent: model store, two-tier cache, generation pipeline
//! and HTTP API (ARCHITECTURE §4).

pub mod api;
pub mod cache;
pub mod catalog;
pub mod client;
pub mod cluster;
pub mod demo;
pub mod device;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod store;
