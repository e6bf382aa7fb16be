//! The modelcache operator: a cluster scheduler for models (ARCHITECTURE §5).
//! `scheduler` is pure (no I/O) so it can be tested and benchmarked at 1,000+
//! nodes; `simulate` runs it against a model of the agents' caches.

pub mod scheduler;
pub mod simulate;
