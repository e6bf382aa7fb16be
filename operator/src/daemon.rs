//! `modelcache-operator run`: connects to the cluster, serves health and
//! metrics, waits for leadership, and runs the controller until a signal.

use crate::autoscaler;
use crate::controller::{self, Config, Context};
use crate::leader::{LeaderElector, Timing};
use crate::metrics::{ClusterCollector, Metrics};
use crate::server::serve;
use crate::stores::Stores;
use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use modelcache_crds::{ModelDeployment, ModelNode, OPERATOR_MANAGER};
use modelcache_support::shutdown_signal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Name of the leader-election Lease in the operator's namespace.
pub const LEADER_LEASE: &str = "modelcache-operator-leader";

pub struct Settings {
    pub namespace: String,
    pub metrics_listen: SocketAddr,
    pub health_listen: SocketAddr,
    pub leader_elect: bool,
    pub leader_timing: Timing,
    /// Pod name: the leader identity and the Events' reporting instance.
    pub identity: String,
    /// How often the autoscaler runs; `None`: never.
    pub autoscale_interval: Option<Duration>,
    pub controller: Config,
}

#[derive(Clone)]
struct Health {
    ready: Arc<AtomicBool>,
    metrics: Metrics,
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let metrics = Metrics::new().context("registering metrics")?;
    let health = Health {
        ready: Arc::new(AtomicBool::new(false)),
        metrics: metrics.clone(),
    };
    let health_router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                if h.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
                }
            }),
        )
        .with_state(health.clone());
    let metrics_router = Router::new()
        .route(
            "/metrics",
            get(|State(h): State<Health>| async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    h.metrics.render(),
                )
            }),
        )
        .with_state(health.clone());
    // They run until the process ends: a standby's health must answer until then.
    let forever = std::future::pending::<()>;
    tokio::spawn(log_exit(serve(
        settings.health_listen,
        health_router,
        forever(),
    )));
    tokio::spawn(log_exit(serve(
        settings.metrics_listen,
        metrics_router,
        forever(),
    )));

    let elector = settings.leader_elect.then(|| {
        Arc::new(LeaderElector::new(
            Api::namespaced(client.clone(), &settings.namespace),
            LEADER_LEASE,
            &settings.identity,
            settings.leader_timing,
        ))
    });
    let mut renewed = None;
    if let Some(e) = &elector {
        // A standby is healthy and ready: it is doing what it should.
        health.ready.store(true, Ordering::Relaxed);
        tokio::select! {
            at = e.acquire() => renewed = Some(at),
            _ = shutdown_signal() => return Ok(()),
        }
        health.ready.store(false, Ordering::Relaxed);
    }

    let wc = watcher::Config::default();
    let (md_reader, md_writer) = reflector::store();
    let (mn_reader, mn_writer) = reflector::store();
    let (node_reader, node_writer) = reflector::store();
    let (lease_reader, lease_writer) = reflector::store();
    let deployments = reflector(
        md_writer,
        watcher(Api::<ModelDeployment>::all(client.clone()), wc.clone()),
    )
    .default_backoff()
    .applied_objects()
    .inspect_err(|e| watch_failed("ModelDeployments", e));
    let model_nodes = reflector(
        mn_writer,
        watcher(Api::<ModelNode>::all(client.clone()), wc.clone()),
    )
    .default_backoff()
    .touched_objects()
    .inspect_err(|e| watch_failed("ModelNodes", e));
    let nodes = reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), wc.clone()),
    )
    .default_backoff()
    .touched_objects()
    .inspect_err(|e| watch_failed("Nodes", e));
    let leases = reflector(
        lease_writer,
        watcher(
            Api::<Lease>::namespaced(client.clone(), &settings.namespace),
            wc,
        ),
    )
    .default_backoff()
    .touched_objects()
    .inspect_err(|e| watch_failed("Leases", e));
    tokio::spawn(leases.for_each(|_| std::future::ready(())));

    let stores = Stores {
        deployments: md_reader,
        model_nodes: mn_reader,
        nodes: node_reader,
        leases: lease_reader,
    };
    let expiry = settings.controller.lease_expiry;
    metrics
        .register_cluster(ClusterCollector::new(stores.clone(), expiry)?)
        .context("registering cluster metrics")?;
    let reporter = Reporter {
        controller: OPERATOR_MANAGER.into(),
        instance: Some(settings.identity.clone()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    if let Some(interval) = settings.autoscale_interval {
        tokio::spawn(autoscaler::run(autoscaler::Context {
            client: client.clone(),
            stores: stores.clone(),
            metrics: metrics.autoscaler.clone(),
            recorder: recorder.clone(),
            interval,
        }));
    }
    let (ctx, requeues) = Context::new(
        client,
        stores.clone(),
        settings.controller,
        metrics,
        recorder,
    );
    tokio::spawn(controller::watch_node_states(
        ctx.clone(),
        (expiry / 8).max(Duration::from_millis(500)),
    ));
    {
        let ready = health.ready.clone();
        tokio::spawn(async move {
            if stores.ready().await {
                tracing::info!("caches synced");
                ready.store(true, Ordering::Relaxed);
            }
        });
    }

    // Stop gracefully on a signal. When leadership is lost, exit at once, with
    // reconciles in flight (as client-go's users do in OnStoppedLeading): a
    // graceful stop could wait on an API server that no longer answers while a
    // standby takes over. The pod restarts as a candidate.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    {
        let elector = elector.clone();
        tokio::spawn(async move {
            match (elector, renewed) {
                (Some(e), Some(renewed)) => tokio::select! {
                    _ = e.hold(renewed) => {
                        tracing::error!("lost leadership; exiting so that the pod restarts as a candidate");
                        std::process::exit(1);
                    }
                    _ = shutdown_signal() => {}
                },
                _ => shutdown_signal().await,
            }
            let _ = stop_tx.send(());
        });
    }
    controller::controller(
        ctx,
        deployments,
        model_nodes,
        nodes,
        requeues,
        stop_rx.map(|_| ()),
    )
    .for_each(|_| std::future::ready(()))
    .await;
    if let Some(e) = elector {
        // After the last reconcile, so the standby takes over at once.
        e.release().await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn log_exit(f: impl std::future::Future<Output = anyhow::Result<()>>) {
    if let Err(e) = f.await {
        tracing::error!(error = format!("{e:#}"), "server stopped");
        std::process::exit(1);
    }
}

/// A watch error is retried with backoff by the watcher; it is logged here
/// because nothing else would say why the caches never sync (a 403 from
/// missing RBAC, say).
fn watch_failed(kind: &str, e: &watcher::Error) {
    tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
}
