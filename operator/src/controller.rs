//! The ModelDeployment controller: one reconcile per deployment, in the style of
//! kube-rs's controller-rs (a [`Context`], an [`error_policy`]).
//! This module holds the reconcile's I/O only; what to write is computed by
//! [`crate::status`] from what [`crate::cluster`] reads and the scheduler decides.
//!
//! Reconcile = resolve the model from the agents' reports → decide placements
//! with the scheduler → write status (server-side apply), the Service and the
//! EndpointSlice, and publish Events for decisions. Watches of ModelNodes and
//! Nodes, and a ticker that notices Lease expiry, requeue only the deployments
//! a change affects.

use crate::cluster::{self, Cluster, NodeState, ResolvedModel};
use crate::metrics::Metrics;
use crate::preemption::Preemptions;
use crate::routing;
use crate::scheduler::{self, Decision};
use crate::status::{self, EventNote, Scheduling};
use crate::stores::{NotSynced, Stores};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use modelcache_crds::{reason, ModelDeployment, ModelNode, LEGACY_FINALIZER, OPERATOR_MANAGER};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building a JSON patch: {0}")]
    Patch(#[source] serde_json::Error),
    #[error("ModelDeployment {0} has no namespace")]
    MissingNamespace(String),
    #[error("encoding status: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    NotSynced(#[from] NotSynced),
}

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// A node whose agent Lease is older than this is not scheduled to and its
    /// placements move (40 s by default).
    pub lease_expiry: Duration,
    pub options: scheduler::Options,
    /// Periodic re-reconcile of every deployment, to repair drift.
    pub resync: Duration,
}

/// State shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub config: Config,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Requeues other deployments (preemption victims, stale-node fallout).
    requeue: mpsc::UnboundedSender<ObjectRef<ModelDeployment>>,
    preemptions: Preemptions,
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
            preemptions: Preemptions::default(),
        };
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        (Arc::new(ctx), stream)
    }

    fn cluster(&self) -> Cluster {
        self.stores.cluster(self.config.lease_expiry)
    }
}

/// Wires the controller from its input streams. Production passes watcher
/// streams (see `daemon.rs`); tests pass channels. Both run this same code.
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
            cluster::affected(&by_model_node.state(), &mn.name_any())
        })
        .watches_stream(nodes, move |n: Node| {
            cluster::affected(&by_node.state(), &n.name_any())
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
        let cluster = ctx.cluster();
        let deployments = ctx.stores.deployments.state();
        for mn in &cluster.model_nodes {
            let name = mn.name_any();
            let state = cluster.state(mn);
            if last
                .insert(name.clone(), state)
                .is_some_and(|old| old != state)
            {
                tracing::info!(node = %name, state = state.label(), "node state changed");
                for r in cluster::affected(&deployments, &name) {
                    let _ = ctx.requeue.send(r);
                }
            }
        }
    }
}

pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(deployment = %cluster::key(&md), error = %error, "reconcile failed; retrying in 5 s");
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
    ctx.preemptions.retain(&ctx.stores.deployments.state());
    // What the operator makes for a deployment is owned by it, so the garbage
    // collector removes it, and deletion never waits for the operator.
    // Versions before 0.3 added a finalizer: take it off.
    if let Some(i) = md.finalizers().iter().position(|f| f == LEGACY_FINALIZER) {
        let path = format!("/metadata/finalizers/{i}");
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "test", "path": path, "value": LEGACY_FINALIZER},
            {"op": "remove", "path": path},
        ]))
        .map_err(Error::Patch)?;
        api.patch(
            &md.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await?;
        tracing::info!(deployment = %cluster::key(&md), "removed the finalizer of an earlier version");
    }
    if md.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let result = apply(&md, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn apply(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let key = cluster::key(md);
    if ctx
        .preemptions
        .must_wait(&key, &ctx.stores.deployments.state())
    {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let cluster = ctx.cluster();
    let resolved = cluster::resolve(md, &cluster.model_nodes);
    let scheduling = match &resolved {
        Ok(model) => {
            let decision = schedule(md, model, &cluster, ctx).await;
            Some(Scheduling {
                displaced_by: ctx.preemptions.explains(&key, decision.unplaced),
                earlier_victims: ctx.preemptions.victims_of(&key),
                decision,
            })
        }
        Err(_) => None,
    };
    let outcome = status::deployment_status(md, &cluster, &resolved, scheduling.as_ref());
    for e in outcome.events {
        publish(ctx, md, e).await;
    }

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
            &Patch::Apply(routing::endpoint_slice(md, &outcome.backends)),
        )
        .await?;
    if md.status.as_ref() != Some(&outcome.status) {
        let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": ModelDeployment::api_version(&()),
            "kind": ModelDeployment::kind(&()),
            "status": outcome.status,
        });
        api.patch_status(&name, &pp, &Patch::Apply(patch)).await?;
    }
    Ok(Action::requeue(ctx.config.resync))
}

/// Runs the scheduler for `md` and tells preemption victims.
async fn schedule(
    md: &ModelDeployment,
    model: &ResolvedModel,
    cluster: &Cluster,
    ctx: &Context,
) -> Decision {
    let key = cluster::key(md);
    let nodes = cluster.scheduler_nodes(Some(model));
    let others = ctx.stores.deployments.state();
    let mut deployments: Vec<scheduler::Deployment> = others
        .iter()
        .filter(|d| cluster::key(d) != key && d.metadata.deletion_timestamp.is_none())
        .filter_map(|d| {
            let size = cluster::sizes_of(d.status.as_ref()?.model.as_ref()?);
            Some(cluster::scheduler_deployment(d, size))
        })
        .collect();
    let target = deployments.len();
    let mut this = cluster::scheduler_deployment(
        md,
        // Unknown until a node reports the first download: placed by the
        // nodes' other constraints, then kept while it fits.
        model
            .info
            .as_ref()
            .map_or(scheduler::Sizes::uniform(0), cluster::sizes_of),
    );
    if this.fetch.is_some() && !model.nodes.is_empty() {
        // A node without a copy gets it from one that has it.
        this.fetch = Some(scheduler::Fetch::Peer);
    }
    deployments.push(this);
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
        let Some(vmd) = others.iter().find(|d| cluster::key(d) == victim.key) else {
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
        let note = format!(
            "preempted by {key} (priority {}) on {}",
            md.spec.priority,
            lost.join(", ")
        );
        ctx.preemptions.record(&victim.key, &key, lost);
        let event = EventNote {
            type_: EventType::Warning,
            reason: reason::PREEMPTED,
            action: "Schedule",
            note,
        };
        publish(ctx, vmd, event).await;
        let _ = ctx.requeue.send(ObjectRef::from_obj(vmd.as_ref()));
    }
    decision
}

async fn publish(ctx: &Context, md: &ModelDeployment, e: EventNote) {
    let ev = Event {
        type_: e.type_,
        reason: e.reason.into(),
        // The Events API caps notes at 1 kB.
        note: Some(e.note.chars().take(1000).collect()),
        action: e.action.into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&ev, &md.object_ref(&())).await {
        tracing::warn!(error = %err, reason = e.reason, "publishing event");
    }
}
