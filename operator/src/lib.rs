//! The modelcache operator: a cluster scheduler for models (ARCHITECTURE §5).
//!
//! `scheduler` is pure (no I/O) so it can be tested and benchmarked at 1,000+
//! nodes; `simulate` runs it against a model of the agents' caches;
//! `snapshot` turns API objects into its inputs; `controller` is the
//! ModelDeployment reconciler, `routing` its Service and EndpointSlice,
//! `leader` the Lease-based leader election, `daemon` the `run` command.

pub mod controller;
pub mod daemon;
pub mod leader;
pub mod metrics;
pub mod routing;
pub mod scheduler;
pub mod simulate;
pub mod snapshot;
