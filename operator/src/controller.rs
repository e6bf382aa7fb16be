//! The ModelDeployment controller: one reconcile per deployment, in the style of
//! kube-rs's controller-rs (a [`Context`], an [`error_policy`], a finalizer).
//!
//! Reconcile = resolve the model from the agents' reports → decide placements
//! with the scheduler over the reflector snapshot → write status (server-side
//! apply), the Service and the EndpointSlice, and publish Events for decisions.
//! Watches of ModelNodes and Nodes, and a ticker that notices Lease expiry,
//! requeue only the deployments a change affects.

use crate::metrics::Metrics;
use crate::routing::{self, Backend};
use crate::scheduler::{self, Decision};
use crate::snapshot::{self, Cluster, NodeState, ResolvedModel};
use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use modelcache_crds::{
    ModelDeployment, ModelDeploymentStatus, ModelNode, NodePlacementPhase, Placement,
    PlacementPhase, PlacementRole, Tier, FINALIZER, OPERATOR_MANAGER,
};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("ModelDeployment {0} has no namespace")]
    MissingNamespace(String),
    #[error("encoding status: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the ModelNode, Node and Lease caches have not finished their first list")]
    NotSynced,
}

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// A node whose agent Lease is older than this is not scheduled to and its
    /// placements move (ARCHITECTURE §3; 40 s by default).
    pub lease_expiry: Duration,
    pub options: scheduler::Options,
    /// Periodic re-reconcile of every deployment, to repair drift.
    pub resync: Duration,
}

/// The reflector stores the reconciler reads.
#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<ModelDeployment>,
    pub model_nodes: Store<ModelNode>,
    pub nodes: Store<Node>,
    /// Leases in the operator's namespace (agents' `modelcache-node-<node>`).
    pub leases: Store<Lease>,
}

impl Stores {
    /// Waits (at most `limit`) until every store has finished its first list.
    /// Before that a node whose ModelNode or Lease is not cached yet looks
    /// gone, and a freshly started operator would move its placements.
    async fn synced(&self, limit: Duration) -> Result<(), Error> {
        let all = async {
            self.deployments.wait_until_ready().await.is_ok()
                && self.model_nodes.wait_until_ready().await.is_ok()
                && self.nodes.wait_until_ready().await.is_ok()
                && self.leases.wait_until_ready().await.is_ok()
        };
        match tokio::time::timeout(limit, all).await {
            Ok(true) => Ok(()),
            _ => Err(Error::NotSynced),
        }
    }
}

/// A deployment that lost warm reservations to a higher-priority one; kept until
/// the victim's own reconcile has written the reason into its conditions.
#[derive(Debug, Clone)]
struct Preemption {
    by: String,
    nodes: Vec<String>,
    at: Instant,
}

/// How long a victim's reconcile waits for the watch to show the preemptor's
/// new placement before deciding anyway.
const PREEMPTION_SETTLE: Duration = Duration::from_secs(10);

/// State shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub config: Config,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Requeues other deployments (preemption victims, stale-node fallout).
    requeue: mpsc::UnboundedSender<ObjectRef<ModelDeployment>>,
    preempted: Mutex<HashMap<String, Preemption>>,
}

impl Context {
    /// Returns the context and the stream of requeues it asks for, to pass to [`controller`].
    pub fn new(
        client: Client,
        stores: Stores,
        config: Config,
        metrics: Metrics,
        recorder: Recorder,
    ) -> (Arc<Self>, impl Stream<Item = ObjectRef<ModelDeployment>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = Context {
            client,
            stores,
            config,
            metrics,
            recorder,
            requeue: tx,
            preempted: Mutex::default(),
        };
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        (Arc::new(ctx), stream)
    }

    fn cluster<'a>(&self, snap: &'a Snapshot) -> Cluster<'a> {
        Cluster {
            model_nodes: &snap.model_nodes,
            nodes: &snap.nodes,
            leases: &snap.leases,
            now: snap.now,
            lease_expiry: SignedDuration::try_from(self.config.lease_expiry)
                .unwrap_or(SignedDuration::MAX),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            model_nodes: self.stores.model_nodes.state(),
            nodes: self.stores.nodes.state(),
            leases: self.stores.leases.state(),
            now: Timestamp::now(),
        }
    }
}

/// The stores' contents at one instant.
struct Snapshot {
    model_nodes: Vec<Arc<ModelNode>>,
    nodes: Vec<Arc<Node>>,
    leases: Vec<Arc<Lease>>,
    now: Timestamp,
}

/// Wires the controller from its input streams. Production passes watcher
/// streams (see `main.rs`); tests pass channels. Both run this same code.
#[allow(clippy::too_many_arguments)]
pub fn controller(
    ctx: Arc<Context>,
    deployments: impl Stream<Item = Result<ModelDeployment, watcher::Error>> + Send + 'static,
    model_nodes: impl Stream<Item = Result<ModelNode, watcher::Error>> + Send + 'static,
    nodes: impl Stream<Item = Result<Node, watcher::Error>> + Send + 'static,
    requeues: impl Stream<Item = ObjectRef<ModelDeployment>> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> impl Stream<Item = ()> {
    let by_model_node = ctx.stores.deployments.clone();
    let by_node = ctx.stores.deployments.clone();
    Controller::for_stream(deployments, ctx.stores.deployments.clone())
        .watches_stream(model_nodes, move |mn: ModelNode| {
            affected(&by_model_node.state(), &mn.name_any())
        })
        .watches_stream(nodes, move |n: Node| {
            affected(&by_node.state(), &n.name_any())
        })
        .reconcile_on(requeues)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .map(|res| match res {
            Ok((obj, _)) => tracing::debug!(deployment = %obj, "reconciled"),
            // error_policy has logged reconcile errors already.
            Err(e) => tracing::debug!(error = %e, "reconcile failed"),
        })
}

/// Deployments a change on `node` can affect: those placed there, and those not
/// yet fully resolved, placed or ready (the node may now have room or the model).
pub fn affected(
    deployments: &[Arc<ModelDeployment>],
    node: &str,
) -> Vec<ObjectRef<ModelDeployment>> {
    deployments
        .iter()
        .filter(|d| {
            let Some(s) = d.status.as_ref() else {
                return true;
            };
            s.placements.iter().any(|p| p.node == node)
                || s.ready_replicas < d.spec.replicas
                || s.conditions.iter().any(|c| {
                    matches!(c.type_.as_str(), "Resolved" | "Scheduled") && c.status != "True"
                })
        })
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

/// Emits the deployments affected by nodes whose state (ready, stale, cordoned)
/// changed since the last tick. Lease renewals arrive every 10 s per node, so
/// watching Leases directly would reconcile everything constantly; expiry is a
/// matter of time passing, which only a clock can notice.
pub async fn watch_node_states(ctx: Arc<Context>, period: Duration) {
    let mut last: HashMap<String, NodeState> = HashMap::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = ctx.snapshot();
        let cluster = ctx.cluster(&snap);
        let deployments = ctx.stores.deployments.state();
        for mn in &snap.model_nodes {
            let name = mn.name_any();
            let state = cluster.state(mn);
            if last
                .insert(name.clone(), state)
                .is_some_and(|old| old != state)
            {
                tracing::info!(node = %name, state = state.label(), "node state changed");
                for r in affected(&deployments, &name) {
                    let _ = ctx.requeue.send(r);
                }
            }
        }
    }
}

pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(deployment = %snapshot::key(&md), error = %error, "reconcile failed; retrying in 5 s");
    ctx.metrics.reconcile_errors.inc();
    Action::requeue(Duration::from_secs(5))
}

pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.stores.synced(Duration::from_secs(30)).await?;
    let started = Instant::now();
    let ns = md
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(md.name_any()))?;
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, md, |event| async {
        match event {
            Finalizer::Apply(md) => apply(&md, &ctx).await,
            Finalizer::Cleanup(md) => cleanup(&md, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Removes the Service and EndpointSlices made for `md`. Owner references would
/// let the garbage collector do it too, but not before the finalizer is gone.
async fn cleanup(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = md.namespace().unwrap_or_default();
    let key = snapshot::key(md);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    match services
        .delete(&md.name_any(), &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    slices
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&routing::owned_selector(md)),
        )
        .await?;
    lock_preempted(ctx).remove(&key);
    tracing::info!(deployment = %key, "removed Service and EndpointSlices");
    Ok(Action::await_change())
}

async fn apply(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let key = snapshot::key(md);
    let snap = ctx.snapshot();
    let cluster = ctx.cluster(&snap);
    let old = md.status.clone().unwrap_or_default();
    let mut conds = Conditions::new(&old.conditions, md.metadata.generation, snap.now);

    // A victim of preemption decides only once the watch shows the preemptor
    // holding the node; deciding earlier would keep the lost placement.
    let pending = lock_preempted(ctx).get(&key).cloned();
    if let Some(p) = pending.filter(|p| p.at.elapsed() < PREEMPTION_SETTLE) {
        let preemptor = ctx
            .stores
            .deployments
            .state()
            .into_iter()
            .find(|d| snapshot::key(d) == p.by);
        let visible = preemptor.is_some_and(|d| {
            let placed = d
                .status
                .as_ref()
                .map(|s| s.placements.as_slice())
                .unwrap_or_default();
            p.nodes
                .iter()
                .all(|n| placed.iter().any(|pl| &pl.node == n))
        });
        if !visible {
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
    }

    let resolved = snapshot::resolve(md, &snap.model_nodes);
    let assignments = match &resolved {
        Ok(r) => {
            conds.set(
                "Resolved",
                "True",
                "ModelFound",
                format!(
                    "{:?} {:?} model {:?} found on {} node(s): {}",
                    r.info.base,
                    r.info.format,
                    r.path,
                    r.nodes.len(),
                    r.nodes.join(", ")
                ),
            );
            let decision = schedule(md, r, &cluster, ctx).await;
            scheduled_condition(&mut conds, md, &decision, ctx);
            decision.assignments
        }
        Err(u) => {
            conds.set("Resolved", u.status, u.reason, u.message.clone());
            conds.set(
                "Scheduled",
                "False",
                "ModelNotResolved",
                "waiting for the model to be resolved (see the Resolved condition)".into(),
            );
            // Keep what is placed: a report that is briefly missing the model
            // must not churn the cluster.
            old.placements
                .iter()
                .map(|p| scheduler::Assignment {
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
        &snap,
        resolved.as_ref().ok(),
    );
    let replicas = md.spec.replicas.max(0);
    let ready = placements
        .iter()
        .filter(|p| p.role == PlacementRole::Serving && p.phase == PlacementPhase::Ready)
        .count() as i32;
    progress_conditions(&mut conds, replicas, ready, &placements);

    let backends = backends(&placements, &snap.model_nodes);
    let status = ModelDeploymentStatus {
        observed_generation: md.metadata.generation,
        conditions: conds.into_vec(),
        model: resolved
            .as_ref()
            .ok()
            .map(|r| r.info.clone())
            .or(old.model.clone()),
        placements,
        replicas: ready.min(replicas),
        ready_replicas: ready,
        ready: Some(format!("{ready}/{replicas}")),
        selector: Some(routing::owned_selector(md)),
        service_name: Some(name.clone()),
    };
    publish_transitions(md, &old, &status, ctx).await;

    let pp = PatchParams::apply(OPERATOR_MANAGER).force();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    services
        .patch(&name, &pp, &Patch::Apply(routing::service(md)))
        .await?;
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    slices
        .patch(
            &name,
            &pp,
            &Patch::Apply(routing::endpoint_slice(md, &backends)),
        )
        .await?;
    if md.status.as_ref() != Some(&status) {
        let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": ModelDeployment::api_version(&()),
            "kind": ModelDeployment::kind(&()),
            "status": status,
        });
        api.patch_status(&name, &pp, &Patch::Apply(patch)).await?;
    }
    Ok(Action::requeue(ctx.config.resync))
}

/// Runs the scheduler for `md` and tells preemption victims.
async fn schedule(
    md: &ModelDeployment,
    model: &ResolvedModel,
    cluster: &Cluster<'_>,
    ctx: &Context,
) -> Decision {
    let key = snapshot::key(md);
    let nodes = cluster.scheduler_nodes(Some(model));
    let others = ctx.stores.deployments.state();
    let mut deployments: Vec<scheduler::Deployment> = others
        .iter()
        .filter(|d| snapshot::key(d) != key && d.metadata.deletion_timestamp.is_none())
        .filter_map(|d| {
            let size = d.status.as_ref()?.model.as_ref()?.size_bytes.max(0) as u64;
            Some(snapshot::scheduler_deployment(d, size))
        })
        .collect();
    let target = deployments.len();
    deployments.push(snapshot::scheduler_deployment(
        md,
        model.info.size_bytes.max(0) as u64,
    ));
    let t0 = Instant::now();
    let mut decisions = scheduler::plan_for(&nodes, &deployments, target, ctx.config.options);
    ctx.metrics
        .scheduler_duration
        .observe(t0.elapsed().as_secs_f64());
    let decision = decisions.swap_remove(target);
    let result = if decision.unplaced > 0 {
        "unschedulable"
    } else if decision.preempted.is_empty() {
        "scheduled"
    } else {
        "preempting"
    };
    ctx.metrics.decisions.with_label_values(&[result]).inc();

    // Victims: their reconcile drops the placements; the reason waits for it here.
    for victim in decisions
        .iter()
        .filter(|d| d.preempted_by.as_deref() == Some(key.as_str()))
    {
        let Some(vmd) = others.iter().find(|d| snapshot::key(d) == victim.key) else {
            continue;
        };
        let lost: Vec<String> = vmd
            .status
            .iter()
            .flat_map(|s| &s.placements)
            .filter(|p| !victim.assignments.iter().any(|a| a.node == p.node))
            .map(|p| p.node.clone())
            .collect();
        tracing::info!(deployment = %key, victim = %victim.key, nodes = ?lost, "preempting lower-priority warm reservations");
        {
            lock_preempted(ctx).insert(
                victim.key.clone(),
                Preemption {
                    by: key.clone(),
                    nodes: lost.clone(),
                    at: Instant::now(),
                },
            );
        }
        let note = format!(
            "preempted by {key} (priority {}) on {}",
            md.spec.priority,
            lost.join(", ")
        );
        publish(ctx, vmd, EventType::Warning, "Preempted", "Schedule", note).await;
        let _ = ctx.requeue.send(ObjectRef::from_obj(vmd.as_ref()));
    }
    decision
}

fn lock_preempted(ctx: &Context) -> std::sync::MutexGuard<'_, HashMap<String, Preemption>> {
    ctx.preempted.lock().unwrap_or_else(|p| p.into_inner())
}

fn scheduled_condition(conds: &mut Conditions, md: &ModelDeployment, d: &Decision, ctx: &Context) {
    let key = snapshot::key(md);
    let preemption = {
        let mut p = lock_preempted(ctx);
        if d.unplaced > 0 {
            p.get(&key).cloned()
        } else {
            p.remove(&key)
        }
    };
    let serving: Vec<&str> = d
        .assignments
        .iter()
        .filter(|a| a.role == PlacementRole::Serving)
        .map(|a| a.node.as_str())
        .collect();
    // Victims of this deployment: decided now, or earlier and still displaced.
    let mut victims: Vec<String> = d.preempted.clone();
    victims.extend(
        lock_preempted(ctx)
            .iter()
            .filter(|(_, p)| p.by == key)
            .map(|(victim, _)| victim.clone()),
    );
    victims.sort();
    victims.dedup();
    let preempted_msg = if victims.is_empty() {
        String::new()
    } else {
        format!("; preempted warm reservations of {}", victims.join(", "))
    };
    match (d.unplaced, preemption) {
        (0, _) if md.spec.replicas == 0 => conds.set(
            "Scheduled",
            "True",
            "ScaledToZero",
            match d.assignments.first() {
                Some(a) => format!("replicas is 0; kept warm on {}", a.node),
                None => "replicas is 0; nothing to place".into(),
            },
        ),
        (0, _) => conds.set(
            "Scheduled",
            "True",
            "Scheduled",
            format!("{} serving replica(s) placed on {}{preempted_msg}", serving.len(), serving.join(", ")),
        ),
        (n, Some(p)) => conds.set(
            "Scheduled",
            "False",
            "Preempted",
            format!(
                "{n} replica(s) lost their place on {} to higher-priority {} and could not be placed elsewhere: {}",
                p.nodes.join(", "),
                p.by,
                d.reason.as_deref().unwrap_or_default()
            ),
        ),
        (n, None) => conds.set(
            "Scheduled",
            "False",
            d.reason_code.unwrap_or("Unschedulable"),
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
    assignments: &[scheduler::Assignment],
    old: &[Placement],
    snap: &Snapshot,
    model: Option<&ResolvedModel>,
) -> Vec<Placement> {
    assignments
        .iter()
        .map(|a| {
            let mn = snap.model_nodes.iter().find(|n| n.name_any() == a.node);
            let status = mn.and_then(|n| n.status.as_ref());
            let agent = status.and_then(|s| s.placements.iter().find(|p| p.deployment == key));
            let resident = model.and_then(|m| {
                status.and_then(|s| {
                    s.models
                        .iter()
                        .filter(|r| r.path == m.path)
                        .map(|r| r.tier)
                        .max_by_key(|t| *t as u8)
                })
            });
            let (phase, tier, message) = match agent {
                Some(p) => (
                    match p.phase {
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
                .or(Some(Time(snap.now)));
            Placement {
                node: a.node.clone(),
                role: a.role,
                phase,
                tier,
                message,
                since,
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
        .filter(|p| matches!(p.phase, PlacementPhase::Assigned | PlacementPhase::Loading))
        .map(|p| p.node.as_str())
        .collect();
    if ready > 0 {
        conds.set(
            "Available",
            "True",
            "ReplicasReady",
            format!("{ready}/{replicas} replica(s) ready"),
        );
    } else if replicas == 0 {
        conds.set(
            "Available",
            "False",
            "ScaledToZero",
            "replicas is 0; not serving".into(),
        );
    } else {
        conds.set(
            "Available",
            "False",
            "NoReadyReplicas",
            "no replica is ready yet; see Progressing and Scheduled".into(),
        );
    }
    if !failed.is_empty() {
        conds.set(
            "Progressing",
            "False",
            "PlacementFailed",
            format!(
                "loading failed on {}; fix the model or remove the node's copy",
                failed.join("; ")
            ),
        );
    } else if !waiting.is_empty() {
        conds.set(
            "Progressing",
            "True",
            "Loading",
            format!("waiting for the model on {}", waiting.join(", ")),
        );
    } else {
        conds.set(
            "Progressing",
            "False",
            "Complete",
            "every placement is ready".into(),
        );
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
async fn publish_transitions(
    md: &ModelDeployment,
    old: &ModelDeploymentStatus,
    new: &ModelDeploymentStatus,
    ctx: &Context,
) {
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
            let note = format!("{what} on {}", after.join(", "));
            publish(ctx, md, EventType::Normal, "Scheduled", "Schedule", note).await;
        }
    }
    let cond =
        |s: &ModelDeploymentStatus, t: &str| s.conditions.iter().find(|c| c.type_ == t).cloned();
    for t in ["Resolved", "Scheduled"] {
        // An unresolved model already explains why nothing is scheduled.
        if let Some(c) =
            cond(new, t).filter(|c| c.status != "True" && c.reason != "ModelNotResolved")
        {
            if cond(old, t).map(|o| (o.status, o.message))
                != Some((c.status.clone(), c.message.clone()))
            {
                let reason = if t == "Resolved" {
                    "FailedResolve"
                } else {
                    "FailedScheduling"
                };
                publish(ctx, md, EventType::Warning, reason, "Schedule", c.message).await;
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
            let note = format!(
                "{}: {}",
                p.node,
                p.message.as_deref().unwrap_or("load failed")
            );
            publish(ctx, md, EventType::Warning, "LoadFailed", "Load", note).await;
        }
    }
}

async fn publish(
    ctx: &Context,
    md: &ModelDeployment,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        // The Events API caps notes at 1 kB.
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &md.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "publishing event");
    }
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

    /// In a fixed order: Resolved, Scheduled, Available, Progressing.
    fn into_vec(mut self) -> Vec<Condition> {
        ["Resolved", "Scheduled", "Available", "Progressing"]
            .iter()
            .filter_map(|t| self.list.remove(*t))
            .collect()
    }
}
