//! A ModelDeployment's new status, computed as data: its conditions, its
//! placements with the agents' view of each, the agents to route to, and the
//! Events that tell users what changed. Pure: the controller passes in what
//! it read and decided, and writes what comes out.

use crate::cluster::{Cluster, ResolvedModel, Unresolved};
use crate::preemption::Preemption;
use crate::routing::{self, Backend};
use crate::scheduler::{Assignment, Decision};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use modelcache_crds::{
    condition, reason, ModelDeployment, ModelDeploymentStatus, ModelNode, NodePlacementPhase,
    Placement, PlacementPhase, PlacementRole, Tier,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What scheduling decided for a deployment whose model was resolved.
#[derive(Debug, Clone)]
pub struct Scheduling {
    pub decision: Decision,
    /// The preemption that displaced this deployment, while it explains unplaced replicas.
    pub displaced_by: Option<Preemption>,
    /// Deployments this one preempted earlier that have not recovered yet.
    pub earlier_victims: Vec<String>,
}

/// An Event to publish on the deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct EventNote {
    pub type_: EventType,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

/// Everything a reconcile writes for one deployment.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: ModelDeploymentStatus,
    /// Agents that hold it Serving and Ready: its EndpointSlice.
    pub backends: Vec<Backend>,
    pub events: Vec<EventNote>,
}

/// The status of `md` after this reconcile. `scheduling` is `None` when the
/// model could not be resolved; its placements are then kept as they are, so
/// that a report briefly missing the model does not churn the cluster.
pub fn deployment_status(
    md: &ModelDeployment,
    cluster: &Cluster,
    resolved: &Result<ResolvedModel, Unresolved>,
    scheduling: Option<&Scheduling>,
) -> Outcome {
    let key = crate::cluster::key(md);
    let old = md.status.clone().unwrap_or_default();
    let mut conds = Conditions::new(&old.conditions, md.metadata.generation, cluster.now);
    let assignments = match (resolved, scheduling) {
        (Ok(r), Some(s)) => {
            match (&r.info, &r.source) {
                (Some(info), _) => conds.set(
                    condition::RESOLVED,
                    "True",
                    reason::MODEL_FOUND,
                    format!(
                        "{:?} {:?} model {:?} found on {} node(s): {}",
                        info.base,
                        info.format,
                        r.path,
                        r.nodes.len(),
                        r.nodes.join(", ")
                    ),
                ),
                (None, source) => conds.set(
                    condition::RESOLVED,
                    "True",
                    reason::FROM_SOURCE,
                    format!(
                        "no node has model {:?} yet; the agents it is placed on download it from {}",
                        r.path,
                        source.as_deref().unwrap_or("spec.model.source")
                    ),
                ),
            }
            scheduled_condition(&mut conds, md, s);
            s.decision.assignments.clone()
        }
        (resolved, _) => {
            if let Err(u) = resolved {
                conds.set(condition::RESOLVED, u.status, u.reason, u.message.clone());
            }
            conds.set(
                condition::SCHEDULED,
                "False",
                reason::MODEL_NOT_RESOLVED,
                "waiting for the model to be resolved (see the Resolved condition)".into(),
            );
            old.placements
                .iter()
                .map(|p| Assignment {
                    node: p.node.clone(),
                    role: p.role,
                })
                .collect()
        }
    };
    let placements = placements(
        &key,
        &assignments,
        &old.placements,
        cluster,
        resolved.as_ref().ok(),
    );
    let replicas = md.spec.replicas.max(0);
    let ready = placements
        .iter()
        .filter(|p| p.role == PlacementRole::Serving && p.phase == PlacementPhase::Ready)
        .count() as i32;
    progress_conditions(&mut conds, replicas, ready, &placements);
    ready_condition(&mut conds, replicas, ready);
    let backends = backends(&placements, &cluster.model_nodes);
    let model = resolved
        .as_ref()
        .ok()
        .and_then(|r| r.info.clone())
        .or(old.model.clone());
    let status = ModelDeploymentStatus {
        observed_generation: md.metadata.generation,
        conditions: conds.into_vec(),
        // The scale subresource's status: what serves or is about to, as a
        // Deployment counts its pods, so an autoscaler sees the truth.
        replicas: placements
            .iter()
            .filter(|p| p.role == PlacementRole::Serving)
            .count() as i32,
        ready_replicas: ready,
        ready: Some(format!("{ready}/{replicas}")),
        selector: Some(routing::owned_selector(md)),
        service_name: Some(md.name_any()),
        nodes: (!placements.is_empty()).then(|| {
            placements
                .iter()
                .map(|p| p.node.as_str())
                .collect::<Vec<_>>()
                .join(",")
        }),
        size: model
            .as_ref()
            .map(|m| binary_size(m.size_bytes.max(0) as u64)),
        model,
        placements,
    };
    let events = transitions(&old, &status);
    Outcome {
        status,
        backends,
        events,
    }
}

fn scheduled_condition(conds: &mut Conditions, md: &ModelDeployment, s: &Scheduling) {
    let d = &s.decision;
    let serving: Vec<&str> = d
        .assignments
        .iter()
        .filter(|a| a.role == PlacementRole::Serving)
        .map(|a| a.node.as_str())
        .collect();
    // Victims of this deployment: decided now, or earlier and still displaced.
    let mut victims: Vec<String> = d.preempted.clone();
    victims.extend(s.earlier_victims.iter().cloned());
    victims.sort();
    victims.dedup();
    let preempted_msg = if victims.is_empty() {
        String::new()
    } else {
        format!("; preempted warm reservations of {}", victims.join(", "))
    };
    match (d.unplaced, &s.displaced_by) {
        (0, _) if md.spec.replicas == 0 => conds.set(
            condition::SCHEDULED,
            "True",
            reason::SCALED_TO_ZERO,
            match d.assignments.first() {
                Some(a) => format!("replicas is 0; kept warm on {}", a.node),
                None => "replicas is 0; nothing to place".into(),
            },
        ),
        (0, _) => conds.set(
            condition::SCHEDULED,
            "True",
            reason::SCHEDULED,
            format!(
                "{} serving replica(s) placed on {}{preempted_msg}",
                serving.len(),
                serving.join(", ")
            ),
        ),
        (n, Some(p)) => conds.set(
            condition::SCHEDULED,
            "False",
            reason::PREEMPTED,
            format!(
                "{n} replica(s) lost their place on {} to higher-priority {} and could not be placed elsewhere: {}",
                p.nodes.join(", "),
                p.by,
                d.reason.as_deref().unwrap_or_default()
            ),
        ),
        (n, None) => conds.set(
            condition::SCHEDULED,
            "False",
            d.reason_code.unwrap_or(reason::UNSCHEDULABLE),
            format!(
                "{n} of {} replica(s) could not be placed: {} Add capacity, relax placement, or lower replicas{preempted_msg}",
                md.spec.replicas,
                d.reason.as_deref().unwrap_or_default()
            ),
        ),
    }
}

/// Status placements for the decided assignments, with the agents' view of each.
fn placements(
    key: &str,
    assignments: &[Assignment],
    old: &[Placement],
    cluster: &Cluster,
    model: Option<&ResolvedModel>,
) -> Vec<Placement> {
    assignments
        .iter()
        .map(|a| {
            let mn = cluster.model_nodes.iter().find(|n| n.name_any() == a.node);
            let status = mn.and_then(|n| n.status.as_ref());
            let agent = status.and_then(|s| s.placements.iter().find(|p| p.deployment == key));
            let resident = model.and_then(|m| {
                status.and_then(|s| {
                    s.models
                        .iter()
                        .filter(|r| r.path == m.path)
                        .map(|r| r.tier)
                        .max()
                })
            });
            let (phase, tier, message) = match agent {
                Some(p) => (
                    match p.phase {
                        NodePlacementPhase::Downloading => PlacementPhase::Downloading,
                        NodePlacementPhase::Loading => PlacementPhase::Loading,
                        NodePlacementPhase::Ready => PlacementPhase::Ready,
                        NodePlacementPhase::Failed => PlacementPhase::Failed,
                    },
                    p.tier,
                    p.message.clone(),
                ),
                None => (
                    PlacementPhase::Assigned,
                    resident.unwrap_or(Tier::Disk),
                    None,
                ),
            };
            let since = old
                .iter()
                .find(|o| o.node == a.node && o.role == a.role && o.phase == phase)
                .and_then(|o| o.since.clone())
                .or(Some(Time(cluster.now)));
            Placement {
                node: a.node.clone(),
                role: a.role,
                phase,
                tier,
                message,
                since,
                download: agent.and_then(|p| p.download),
            }
        })
        .collect()
}

fn progress_conditions(
    conds: &mut Conditions,
    replicas: i32,
    ready: i32,
    placements: &[Placement],
) {
    let failed: Vec<String> = placements
        .iter()
        .filter(|p| p.phase == PlacementPhase::Failed)
        .map(|p| format!("{}: {}", p.node, p.message.as_deref().unwrap_or("failed")))
        .collect();
    let waiting: Vec<&str> = placements
        .iter()
        .filter(|p| {
            matches!(
                p.phase,
                PlacementPhase::Assigned | PlacementPhase::Downloading | PlacementPhase::Loading
            )
        })
        .map(|p| p.node.as_str())
        .collect();
    if ready > 0 {
        conds.set(
            condition::AVAILABLE,
            "True",
            reason::REPLICAS_READY,
            format!("{ready}/{replicas} replica(s) ready"),
        );
    } else if replicas == 0 {
        conds.set(
            condition::AVAILABLE,
            "False",
            reason::SCALED_TO_ZERO,
            "replicas is 0; not serving".into(),
        );
    } else {
        conds.set(
            condition::AVAILABLE,
            "False",
            reason::NO_READY_REPLICAS,
            "no replica is ready yet; see Progressing and Scheduled".into(),
        );
    }
    if !failed.is_empty() {
        conds.set(
            condition::PROGRESSING,
            "False",
            reason::PLACEMENT_FAILED,
            format!(
                "loading failed on {}; fix the model or remove the node's copy",
                failed.join("; ")
            ),
        );
    } else if !waiting.is_empty() {
        conds.set(
            condition::PROGRESSING,
            "True",
            reason::LOADING,
            format!("waiting for the model on {}", waiting.join(", ")),
        );
    } else {
        conds.set(
            condition::PROGRESSING,
            "False",
            reason::COMPLETE,
            "every placement is ready".into(),
        );
    }
}

/// Bytes with a binary suffix, as Kubernetes quantities write them (`15.0Mi`).
fn binary_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// The summary `Ready` condition that `kubectl wait`, kstatus, Argo CD and
/// Flux read: True when the model is resolved, every replica is placed and
/// ready, and nothing is still loading; otherwise False with the reason of
/// the first condition that holds it back.
fn ready_condition(conds: &mut Conditions, replicas: i32, ready: i32) {
    let get = |t: &str| conds.list.get(t).cloned();
    let blocking = [
        get(condition::RESOLVED).filter(|c| c.status != "True"),
        get(condition::SCHEDULED).filter(|c| c.status != "True"),
        get(condition::PROGRESSING).filter(|c| c.reason != reason::COMPLETE),
    ]
    .into_iter()
    .flatten()
    .next();
    match blocking {
        Some(c) => conds.set(condition::READY, "False", &c.reason, c.message),
        None if ready < replicas => conds.set(
            condition::READY,
            "False",
            reason::NO_READY_REPLICAS,
            format!("{ready}/{replicas} replica(s) ready"),
        ),
        None if replicas == 0 => conds.set(
            condition::READY,
            "True",
            reason::SCALED_TO_ZERO,
            "replicas is 0; every warm copy is in place".into(),
        ),
        None => conds.set(
            condition::READY,
            "True",
            reason::REPLICAS_READY,
            format!("{ready}/{replicas} replica(s) ready"),
        ),
    }
}

/// Agents that hold the deployment Serving and Ready, with their API address.
fn backends(placements: &[Placement], model_nodes: &[Arc<ModelNode>]) -> Vec<Backend> {
    placements
        .iter()
        .filter(|p| p.role == PlacementRole::Serving && p.phase == PlacementPhase::Ready)
        .filter_map(|p| {
            let mn = model_nodes.iter().find(|n| n.name_any() == p.node)?;
            let endpoint = &mn.status.as_ref()?.agent.as_ref()?.endpoint;
            match endpoint.parse() {
                Ok(addr) => Some(Backend {
                    node: p.node.clone(),
                    addr,
                }),
                Err(_) => {
                    tracing::warn!(node = %p.node, endpoint = %endpoint, "agent endpoint is not ip:port; not routed");
                    None
                }
            }
        })
        .collect()
}

/// Events for what changed: new placements, scheduling failures, failed loads.
fn transitions(old: &ModelDeploymentStatus, new: &ModelDeploymentStatus) -> Vec<EventNote> {
    let mut events = Vec::new();
    let nodes = |s: &ModelDeploymentStatus, role| {
        s.placements
            .iter()
            .filter(|p| p.role == role)
            .map(|p| p.node.clone())
            .collect::<Vec<_>>()
    };
    for role in [PlacementRole::Serving, PlacementRole::Warm] {
        let (before, after) = (nodes(old, role), nodes(new, role));
        if before != after && !after.is_empty() {
            let what = if role == PlacementRole::Serving {
                "serving"
            } else {
                "warm"
            };
            events.push(EventNote {
                type_: EventType::Normal,
                reason: reason::SCHEDULED,
                action: "Schedule",
                note: format!("{what} on {}", after.join(", ")),
            });
        }
    }
    let cond =
        |s: &ModelDeploymentStatus, t: &str| s.conditions.iter().find(|c| c.type_ == t).cloned();
    for (t, event) in [
        (condition::RESOLVED, reason::FAILED_RESOLVE),
        (condition::SCHEDULED, reason::FAILED_SCHEDULING),
    ] {
        // An unresolved model already explains why nothing is scheduled.
        if let Some(c) =
            cond(new, t).filter(|c| c.status != "True" && c.reason != reason::MODEL_NOT_RESOLVED)
        {
            if cond(old, t).map(|o| (o.status, o.message))
                != Some((c.status.clone(), c.message.clone()))
            {
                events.push(EventNote {
                    type_: EventType::Warning,
                    reason: event,
                    action: "Schedule",
                    note: c.message,
                });
            }
        }
    }
    for p in new
        .placements
        .iter()
        .filter(|p| p.phase == PlacementPhase::Failed)
    {
        let was = old
            .placements
            .iter()
            .any(|o| o.node == p.node && o.phase == PlacementPhase::Failed);
        if !was {
            events.push(EventNote {
                type_: EventType::Warning,
                reason: reason::LOAD_FAILED,
                action: "Load",
                note: format!(
                    "{}: {}",
                    p.node,
                    p.message.as_deref().unwrap_or("load failed")
                ),
            });
        }
    }
    events
}

/// Builds the condition list, keeping `lastTransitionTime` when a status is unchanged.
struct Conditions {
    list: BTreeMap<String, Condition>,
    generation: Option<i64>,
    now: Timestamp,
}

impl Conditions {
    fn new(old: &[Condition], generation: Option<i64>, now: Timestamp) -> Self {
        Conditions {
            list: old.iter().map(|c| (c.type_.clone(), c.clone())).collect(),
            generation,
            now,
        }
    }

    fn set(&mut self, type_: &str, status: &str, reason: &str, message: String) {
        let since = match self.list.get(type_) {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(self.now),
        };
        self.list.insert(
            type_.to_string(),
            Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message,
                observed_generation: self.generation,
                last_transition_time: since,
            },
        );
    }

    /// In a fixed order: Ready, Resolved, Scheduled, Available, Progressing.
    fn into_vec(mut self) -> Vec<Condition> {
        condition::DEPLOYMENT
            .iter()
            .filter_map(|t| self.list.remove(*t))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::fixtures::*;
    use crate::cluster::resolve;
    use modelcache_crds::{NodePlacement, ResidentModel};
    use std::time::Instant;

    fn decision(nodes: &[(&str, PlacementRole)], unplaced: u32) -> Decision {
        Decision {
            key: "ml/sd".into(),
            assignments: nodes
                .iter()
                .map(|(n, role)| Assignment {
                    node: n.to_string(),
                    role: *role,
                })
                .collect(),
            unplaced,
            reason: (unplaced > 0).then(|| "0/2 nodes are available: 2 Insufficient VRAM.".into()),
            reason_code: (unplaced > 0).then_some("InsufficientVram"),
            preempted: Vec::new(),
            preempted_by: None,
        }
    }

    fn scheduling(d: Decision) -> Scheduling {
        Scheduling {
            decision: d,
            displaced_by: None,
            earlier_victims: Vec::new(),
        }
    }

    fn condition<'a>(s: &'a ModelDeploymentStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    fn reasons(o: &Outcome) -> Vec<&'static str> {
        o.events.iter().map(|e| e.reason).collect()
    }

    #[test]
    fn sizes_read_as_kubernetes_binary_quantities() {
        assert_eq!(binary_size(512), "512");
        assert_eq!(binary_size(15 * 1024 * 1024 + 1024 * 100), "15.1Mi");
        assert_eq!(binary_size(6_938_040_682), "6.5Gi");
    }

    #[test]
    fn an_unresolved_model_is_not_ready_for_the_same_reason() {
        let md = deployment("sd", "missing", serde_json::json!({"replicas": 1}));
        let o = decide(&md, vec![reporting(None)], None);
        let ready = condition(&o.status, condition::READY);
        let resolved = condition(&o.status, condition::RESOLVED);
        assert_eq!(ready.status, "False");
        assert_eq!(
            (&ready.reason, &ready.message),
            (&resolved.reason, &resolved.message)
        );
    }

    /// Runs a reconcile's computation for `md` against `mns` with `d`.
    fn decide(md: &ModelDeployment, mns: Vec<ModelNode>, d: Option<Scheduling>) -> Outcome {
        let leases = mns.iter().map(|m| lease(&m.name_any(), 1)).collect();
        let c = cluster(mns, Vec::new(), leases);
        let resolved = resolve(md, &c.model_nodes);
        deployment_status(md, &c, &resolved, d.as_ref())
    }

    /// `n1` with the agent's view of `ml/sd` and the model resident in RAM.
    fn reporting(phase: Option<NodePlacementPhase>) -> ModelNode {
        let mut mn = model_node("n1", "10.0.0.1", 24, vec![local("sd15", G)]);
        if let Some(s) = mn.status.as_mut() {
            s.models = vec![ResidentModel {
                path: "sd15".into(),
                tier: Tier::Ram,
                size_bytes: 4 * G,
                locked: false,
                last_used: None,
            }];
            s.placements = phase
                .map(|phase| NodePlacement {
                    deployment: "ml/sd".into(),
                    phase,
                    tier: Tier::Vram,
                    message: (phase == NodePlacementPhase::Failed).then(|| "disk full".into()),
                    download: None,
                })
                .into_iter()
                .collect();
        }
        mn
    }

    #[test]
    fn a_new_placement_is_assigned_loading_and_announced() {
        let md = deployment("sd", "sd15", serde_json::json!({"replicas": 1}));
        let o = decide(
            &md,
            vec![reporting(None)],
            Some(scheduling(decision(&[("n1", PlacementRole::Serving)], 0))),
        );
        let s = &o.status;
        assert_eq!(
            condition(s, condition::RESOLVED).reason,
            reason::MODEL_FOUND
        );
        assert_eq!(condition(s, condition::SCHEDULED).status, "True");
        assert_eq!(
            condition(s, condition::AVAILABLE).reason,
            reason::NO_READY_REPLICAS
        );
        assert_eq!(condition(s, condition::PROGRESSING).reason, reason::LOADING);
        let ready = condition(s, condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason::LOADING)
        );
        let types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, condition::DEPLOYMENT, "in a fixed order");
        let p = &s.placements[0];
        assert_eq!(
            (p.phase, p.tier),
            (PlacementPhase::Assigned, Tier::Ram),
            "the agent has not reported it; the model is resident in RAM there"
        );
        assert_eq!(s.ready.as_deref(), Some("0/1"));
        assert_eq!(
            (s.replicas, s.ready_replicas),
            (1, 0),
            "one serving placement, not ready yet"
        );
        assert!(o.backends.is_empty(), "not routed before it is Ready");
        assert_eq!(reasons(&o), [reason::SCHEDULED]);
        assert_eq!(o.events[0].note, "serving on n1");
    }

    #[test]
    fn a_ready_placement_is_routed_and_nothing_is_announced_twice() {
        let mut md = deployment("sd", "sd15", serde_json::json!({"replicas": 1}));
        let d = || Some(scheduling(decision(&[("n1", PlacementRole::Serving)], 0)));
        let first = decide(&md, vec![reporting(Some(NodePlacementPhase::Loading))], d());
        md.status = Some(first.status.clone());
        let o = decide(&md, vec![reporting(Some(NodePlacementPhase::Ready))], d());
        let s = &o.status;
        assert_eq!((s.ready_replicas, s.ready.as_deref()), (1, Some("1/1")));
        let ready = condition(s, condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", reason::REPLICAS_READY)
        );
        assert_eq!(s.nodes.as_deref(), Some("n1"));
        assert_eq!(s.size.as_deref(), Some("2.0Gi"), "{:?}", s.model);
        assert_eq!(
            condition(s, condition::AVAILABLE).reason,
            reason::REPLICAS_READY
        );
        assert_eq!(
            condition(s, condition::PROGRESSING).reason,
            reason::COMPLETE
        );
        assert_eq!(s.placements[0].tier, Tier::Vram, "the agent's word");
        assert_eq!(o.backends[0].addr.to_string(), "10.0.0.1:8080");
        assert!(o.events.is_empty(), "{:?}", o.events);
        // Unchanged conditions keep their transition time.
        let before = condition(&first.status, condition::RESOLVED);
        assert_eq!(
            condition(s, condition::RESOLVED).last_transition_time,
            before.last_transition_time
        );
    }

    #[test]
    fn a_failed_load_is_announced_once() {
        let mut md = deployment("sd", "sd15", serde_json::json!({"replicas": 1}));
        let d = || Some(scheduling(decision(&[("n1", PlacementRole::Serving)], 0)));
        let o = decide(&md, vec![reporting(Some(NodePlacementPhase::Failed))], d());
        let progressing = condition(&o.status, condition::PROGRESSING);
        assert_eq!(progressing.reason, reason::PLACEMENT_FAILED);
        assert!(
            progressing.message.contains("n1: disk full"),
            "{}",
            progressing.message
        );
        assert_eq!(reasons(&o), [reason::SCHEDULED, reason::LOAD_FAILED]);
        md.status = Some(o.status);
        let again = decide(&md, vec![reporting(Some(NodePlacementPhase::Failed))], d());
        assert!(again.events.is_empty(), "{:?}", again.events);
    }

    #[test]
    fn an_unresolved_model_keeps_the_placements_and_says_why() {
        let mut md = deployment("sd", "sd15", serde_json::json!({"replicas": 1}));
        md.status = Some(ModelDeploymentStatus {
            placements: vec![Placement {
                node: "n1".into(),
                role: PlacementRole::Serving,
                phase: PlacementPhase::Ready,
                tier: Tier::Ram,
                message: None,
                since: None,
                download: None,
            }],
            ..Default::default()
        });
        let o = decide(&md, vec![model_node("n1", "10.0.0.1", 24, vec![])], None);
        let s = &o.status;
        assert_eq!(
            condition(s, condition::RESOLVED).reason,
            reason::MODEL_NOT_FOUND
        );
        assert_eq!(
            condition(s, condition::SCHEDULED).reason,
            reason::MODEL_NOT_RESOLVED
        );
        assert_eq!(
            s.placements[0].node, "n1",
            "kept: a briefly missing report must not churn"
        );
        assert_eq!(
            reasons(&o),
            [reason::FAILED_RESOLVE],
            "and not FailedScheduling too"
        );
    }

    #[test]
    fn unplaced_replicas_name_the_reason_or_the_preemptor() {
        let md = deployment("sd", "sd15", serde_json::json!({"replicas": 2}));
        let d = decision(&[("n1", PlacementRole::Serving)], 1);
        let o = decide(&md, vec![reporting(None)], Some(scheduling(d.clone())));
        let c = condition(&o.status, condition::SCHEDULED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InsufficientVram")
        );
        assert!(
            c.message
                .starts_with("1 of 2 replica(s) could not be placed"),
            "{}",
            c.message
        );
        assert!(reasons(&o).contains(&reason::FAILED_SCHEDULING));

        let displaced = Scheduling {
            decision: d,
            displaced_by: Some(Preemption {
                by: "ml/high".into(),
                nodes: vec!["n2".into()],
                at: Instant::now(),
            }),
            earlier_victims: Vec::new(),
        };
        let o = decide(&md, vec![reporting(None)], Some(displaced));
        let c = condition(&o.status, condition::SCHEDULED);
        assert_eq!(c.reason, reason::PREEMPTED);
        assert!(
            c.message.contains("n2 to higher-priority ml/high"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_preemptor_lists_its_victims_and_zero_replicas_stay_warm() {
        let md = deployment("sd", "sd15", serde_json::json!({"replicas": 1}));
        let mut d = decision(&[("n1", PlacementRole::Serving)], 0);
        d.preempted = vec!["ml/low".into()];
        let s = Scheduling {
            decision: d,
            displaced_by: None,
            earlier_victims: vec!["ml/low".into(), "ml/older".into()],
        };
        let o = decide(&md, vec![reporting(None)], Some(s));
        let c = condition(&o.status, condition::SCHEDULED);
        assert!(
            c.message
                .ends_with("; preempted warm reservations of ml/low, ml/older"),
            "{}",
            c.message
        );

        let idle = deployment(
            "sd",
            "sd15",
            serde_json::json!({"replicas": 0, "warmTier": "Ram"}),
        );
        let o = decide(
            &idle,
            vec![reporting(None)],
            Some(scheduling(decision(&[("n1", PlacementRole::Warm)], 0))),
        );
        assert_eq!(
            condition(&o.status, condition::SCHEDULED).reason,
            reason::SCALED_TO_ZERO
        );
        assert_eq!(
            condition(&o.status, condition::AVAILABLE).reason,
            reason::SCALED_TO_ZERO
        );
        assert_eq!(o.events[0].note, "warm on n1");
        assert!(o.backends.is_empty(), "warm copies are never routed to");
    }
}
