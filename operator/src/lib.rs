//! The modelcache operator: a cluster scheduler for models.
//!
//! Its modules form one-way layers, from the pure `scheduler` at the bottom to
//! `daemon` at the top: docs/architecture.md lists them and what each does,
//! and `tests/tests/layers.rs` fails on an import that goes upward.

pub mod autoscale;
pub mod autoscaler;
pub mod balance;
pub mod cluster;
pub mod controller;
pub mod daemon;
pub mod gateway;
pub mod leader;
pub mod metrics;
pub mod preemption;
pub mod routing;
pub mod scale;
pub mod scheduler;
pub mod server;
pub mod simulate;
pub mod status;
pub mod stores;
