//! The reflector stores the operator reads, kept current by its watches.

use crate::cluster::Cluster;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::reflector::Store;
use modelcache_crds::{ModelDeployment, ModelNode};
use std::time::Duration;

#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<ModelDeployment>,
    pub model_nodes: Store<ModelNode>,
    pub nodes: Store<Node>,
    /// Leases in the operator's namespace (agents' `modelcache-node-<node>`).
    pub leases: Store<Lease>,
}

/// The stores had not finished their first list in time.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the ModelNode, Node and Lease caches have not finished their first list")]
pub struct NotSynced;

impl Stores {
    /// Waits until every store has finished its first list, or `limit` runs
    /// out. Before that a node whose ModelNode or Lease is not cached yet
    /// looks gone, and a freshly started operator would move its placements.
    pub async fn synced(&self, limit: Duration) -> Result<(), NotSynced> {
        match tokio::time::timeout(limit, self.ready()).await {
            Ok(true) => Ok(()),
            _ => Err(NotSynced),
        }
    }

    /// Waits for every store's first list, however long it takes; false when
    /// a store's writer is gone.
    ///
    /// A store's readiness is a oneshot receiver that remembers one waker, so
    /// of several tasks waiting at once (health, autoscaler, reconciles) only
    /// the last to poll is woken; the others would wait forever. Each wait is
    /// therefore polled again every half second.
    pub async fn ready(&self) -> bool {
        let all = || async {
            self.deployments.wait_until_ready().await.is_ok()
                && self.model_nodes.wait_until_ready().await.is_ok()
                && self.nodes.wait_until_ready().await.is_ok()
                && self.leases.wait_until_ready().await.is_ok()
        };
        loop {
            if let Ok(ready) = tokio::time::timeout(Duration::from_millis(500), all()).await {
                return ready;
            }
        }
    }

    /// The nodes as they are now; a Lease older than `lease_expiry` means its agent is gone.
    pub fn cluster(&self, lease_expiry: Duration) -> Cluster {
        Cluster {
            model_nodes: self.model_nodes.state(),
            nodes: self.nodes.state(),
            leases: self.leases.state(),
            now: Timestamp::now(),
            lease_expiry: SignedDuration::try_from(lease_expiry).unwrap_or(SignedDuration::MAX),
        }
    }
}
