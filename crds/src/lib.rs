//! The `modelcache.io/v1alpha1` API: the contract between the operator, the node
//! agents, the Helm chart and users' manifests (docs/architecture.md).
//!
//! Field names are camelCase and enum values PascalCase, as in Kubernetes' own
//! APIs. Every field carries a doc comment because kube-derive turns them into
//! the CRD's `description`, which is what `kubectl explain` prints.

// kube-derive's repeated `printcolumn(...)` arguments trip this lint.
#![allow(clippy::duplicated_attributes)]

pub mod conditions;
pub mod crdgen;
pub mod deployment;
pub mod node;
pub mod source;
pub mod types;
#[cfg(feature = "validation")]
pub mod validation;

pub use conditions::{condition, reason};
pub use deployment::*;
pub use node::*;
pub use source::{Source, SourceError};
pub use types::*;

/// API group of every modelcache resource.
pub const GROUP: &str = "modelcache.io";
/// API version served by this crate.
pub const VERSION: &str = "v1alpha1";

/// Field manager the operator uses for server-side apply.
pub const OPERATOR_MANAGER: &str = "modelcache-operator";
/// Field manager the node agent uses for server-side apply.
pub const AGENT_MANAGER: &str = "modelcache-agent";

/// Label put on Services and EndpointSlices that the operator owns, naming the
/// ModelDeployment they route to.
pub const DEPLOYMENT_LABEL: &str = "modelcache.io/deployment";
/// Label that marks objects created by modelcache (value: the component).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// `kubernetes.io/service-name` ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The finalizer versions before 0.3 added; the operator removes it from the
/// objects that still carry it (owner references clean up instead).
pub const LEGACY_FINALIZER: &str = "modelcache.io/cleanup";
/// Prefix of the per-node liveness Lease: `modelcache-node-<node>`.
pub const NODE_LEASE_PREFIX: &str = "modelcache-node-";
/// Port the agent serves the generation API on, and the Service port.
pub const API_PORT: u16 = 8080;
/// Port of the agent's and operator's `/metrics`.
pub const METRICS_PORT: u16 = 9090;

/// Name of the liveness Lease for a node.
pub fn node_lease_name(node: &str) -> String {
    format!("{NODE_LEASE_PREFIX}{node}")
}
