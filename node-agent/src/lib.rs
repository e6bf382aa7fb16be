//! The modelcache node agent: model store, tiered cache, generation pipeline,
//! HTTP API and cluster sync.
//!
//! Its modules form one-way layers, from `memory` and `store` at the bottom
//! to `daemon` at the top: docs/architecture.md lists them and what each
//! does, and `tests/tests/layers.rs` fails on an import that goes upward.

pub mod agent;
pub mod api;
pub mod cache;
pub mod catalog;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod daemon;
pub mod demo;
pub mod device;
pub mod fetch;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod routes;
pub mod store;
