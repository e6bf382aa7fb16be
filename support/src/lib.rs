//! What the operator and the node agent share as processes, so that both
//! start, log, read secrets, expose process metrics and stop the same way.

pub mod logging;
pub mod process_metrics;
pub mod secret;
pub mod signal;
pub mod splitmix;

pub use logging::{init_logging, LogFormat};
pub use secret::{bearer_allowed, read_secret, token_matches, SecretError};
pub use signal::shutdown_signal;
pub use splitmix::SplitMix64;
