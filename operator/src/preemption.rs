//! Preemption bookkeeping: which deployments lost warm reservations to which
//! higher-priority one, kept until each victim's own reconcile has said so in
//! its conditions (the victim's status is written by its reconcile, not by
//! the preemptor's).

use crate::cluster;
use modelcache_crds::ModelDeployment;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a victim's reconcile waits for the watch to show the preemptor's
/// new placement before deciding anyway.
pub const SETTLE: Duration = Duration::from_secs(10);

/// A deployment's loss of warm reservations.
#[derive(Debug, Clone, PartialEq)]
pub struct Preemption {
    /// The preemptor, `namespace/name`.
    pub by: String,
    /// The nodes the victim lost.
    pub nodes: Vec<String>,
    pub at: Instant,
}

/// Preemptions by victim (`namespace/name`).
#[derive(Debug, Default)]
pub struct Preemptions(Mutex<HashMap<String, Preemption>>);

impl Preemptions {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Preemption>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `victim` lost `nodes` to `by`.
    pub fn record(&self, victim: &str, by: &str, nodes: Vec<String>) {
        self.lock().insert(
            victim.to_string(),
            Preemption {
                by: by.to_string(),
                nodes,
                at: Instant::now(),
            },
        );
    }

    /// Whether `victim` should wait before deciding: it was preempted less than
    /// [`SETTLE`] ago and the watch does not show the preemptor on the nodes
    /// yet. Deciding earlier would keep the placement it lost.
    pub fn must_wait(&self, victim: &str, deployments: &[Arc<ModelDeployment>]) -> bool {
        let Some(p) = self.lock().get(victim).cloned() else {
            return false;
        };
        p.at.elapsed() < SETTLE && !preemptor_visible(&p, deployments)
    }

    /// The preemption that explains why `victim` is short of `unplaced`
    /// replicas; forgotten once it is fully placed again.
    pub fn explains(&self, victim: &str, unplaced: u32) -> Option<Preemption> {
        let mut p = self.lock();
        if unplaced > 0 {
            p.get(victim).cloned()
        } else {
            p.remove(victim)
        }
    }

    /// The deployments `preemptor` displaced that have not recovered yet.
    pub fn victims_of(&self, preemptor: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, p)| p.by == preemptor)
            .map(|(victim, _)| victim.clone())
            .collect();
        v.sort();
        v
    }

    /// Forgets preemptions whose victim or preemptor no longer exists.
    pub fn retain(&self, deployments: &[Arc<ModelDeployment>]) {
        let live = |key: &str| deployments.iter().any(|d| cluster::key(d) == key);
        self.lock().retain(|victim, p| live(victim) && live(&p.by));
    }
}

/// Whether the watch shows the preemptor placed on every node the victim lost.
fn preemptor_visible(p: &Preemption, deployments: &[Arc<ModelDeployment>]) -> bool {
    deployments
        .iter()
        .find(|d| cluster::key(d) == p.by)
        .is_some_and(|d| {
            let placed = d
                .status
                .as_ref()
                .map(|s| s.placements.as_slice())
                .unwrap_or_default();
            p.nodes
                .iter()
                .all(|n| placed.iter().any(|pl| &pl.node == n))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcache_crds::{ModelDeploymentStatus, Placement, PlacementPhase, PlacementRole, Tier};

    fn md(name: &str, nodes: &[&str]) -> Arc<ModelDeployment> {
        let mut md = ModelDeployment::new(
            name,
            serde_json::from_value(serde_json::json!({"model": {"path": "m"}})).unwrap(),
        );
        md.metadata.namespace = Some("ml".into());
        md.status = Some(ModelDeploymentStatus {
            placements: nodes
                .iter()
                .map(|n| Placement {
                    node: n.to_string(),
                    role: PlacementRole::Warm,
                    phase: PlacementPhase::Assigned,
                    tier: Tier::Ram,
                    message: None,
                    since: None,
                    download: None,
                })
                .collect(),
            ..Default::default()
        });
        Arc::new(md)
    }

    #[test]
    fn a_victim_waits_until_the_preemptor_shows_on_the_lost_nodes() {
        let p = Preemptions::default();
        assert!(!p.must_wait("ml/low", &[]), "nothing recorded");
        p.record("ml/low", "ml/high", vec!["n1".into()]);
        assert!(p.must_wait("ml/low", &[md("high", &[])]));
        assert!(p.must_wait("ml/low", &[md("high", &["n2"])]));
        assert!(!p.must_wait("ml/low", &[md("high", &["n1", "n2"])]));
    }

    #[test]
    fn the_explanation_lasts_while_replicas_are_unplaced() {
        let p = Preemptions::default();
        p.record("ml/low", "ml/high", vec!["n1".into()]);
        p.record("ml/other", "ml/high", vec!["n2".into()]);
        assert_eq!(p.victims_of("ml/high"), ["ml/low", "ml/other"]);
        assert_eq!(
            p.explains("ml/low", 1).map(|e| e.by),
            Some("ml/high".into())
        );
        assert_eq!(
            p.explains("ml/low", 0).map(|e| e.nodes),
            Some(vec!["n1".into()])
        );
        assert_eq!(p.explains("ml/low", 1), None, "forgotten once placed");
        // A deleted victim is forgotten.
        let live = |name: &str| {
            Arc::new(crate::cluster::fixtures::deployment(
                name,
                "m",
                serde_json::json!({}),
            ))
        };
        p.retain(&[live("high")]);
        assert!(p.victims_of("ml/high").is_empty());
    }
}
