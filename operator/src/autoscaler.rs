//! The autoscaler loop of the leader: every interval it reads each agent's
//! `/load` (requests in flight and queued, by deployment), exports the sum per
//! deployment, and sets `replicas` of the autoscaled ones through the scale
//! subresource, with an Event for each change.
//!
//! The load comes from the agents rather than from the gateway, so requests
//! sent to a deployment's Service directly count too, and it needs no
//! agreement between gateway replicas.

use crate::autoscale::{Autoscaler, Decision};
use crate::metrics::AutoscalerMetrics;
use crate::scale::{self, ScaleError};
use crate::stores::Stores;
use futures::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use modelcache_crds::{ModelDeployment, ModelNode};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How long one agent's `/load` may take; a slower agent counts as idle this round.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// What the loop needs.
pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub metrics: AutoscalerMetrics,
    pub recorder: Recorder,
    pub interval: Duration,
}

/// The part of an agent's `/load` the autoscaler reads.
#[derive(Debug, Deserialize)]
struct AgentLoad {
    #[serde(default)]
    models: BTreeMap<String, u64>,
}

/// Runs until the process ends (the leader exits when it loses the lease).
pub async fn run(ctx: Context) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(POLL_TIMEOUT));
    let http = HttpClient::builder(TokioExecutor::new()).build(connector);
    // Until the caches are full, absent agents would look idle.
    if !ctx.stores.ready().await {
        return;
    }
    tracing::info!(interval = ?ctx.interval, "autoscaler running");
    let mut autoscaler = Autoscaler::default();
    // Label sets exported last round, removed when their deployment is gone
    // (or, for the autoscaler's own gauges, no longer autoscaled).
    let mut exported = (BTreeSet::new(), BTreeSet::new());
    let mut tick = tokio::time::interval(ctx.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let polled = poll(&http, &ctx.stores.model_nodes.state()).await;
        if !polled.silent.is_empty() {
            tracing::warn!(nodes = ?polled.silent, "agents did not answer /load; their deployments are not scaled down this round (check the NetworkPolicy to the agents' metrics port)");
        }
        let mut seen = (BTreeSet::new(), BTreeSet::new());
        for md in ctx.stores.deployments.state() {
            let (Some(ns), name) = (md.namespace(), md.name_any()) else {
                continue;
            };
            let key = format!("{ns}/{name}");
            let load = polled.load.get(&key).copied().unwrap_or(0) as f64;
            let labels = [ns.as_str(), name.as_str()];
            ctx.metrics.inflight.with_label_values(&labels).set(load);
            seen.0.insert((ns.clone(), name.clone()));
            let Some(spec) = md.spec.autoscaling() else {
                continue;
            };
            seen.1.insert((ns.clone(), name.clone()));
            let current = md.spec.replicas;
            let d = autoscaler.decide(&key, spec, load, current, Instant::now());
            ctx.metrics
                .desired
                .with_label_values(&labels)
                .set(i64::from(d.desired));
            ctx.metrics
                .current
                .with_label_values(&labels)
                .set(i64::from(current));
            // An agent that did not answer may be busy: never lower on a guess.
            let unknown = md
                .status
                .iter()
                .flat_map(|s| &s.placements)
                .any(|p| polled.silent.contains(&p.node));
            let lower_blind = d.desired < current && unknown;
            if d.desired != current && !lower_blind && md.metadata.deletion_timestamp.is_none() {
                rescale(&ctx, &md, &ns, current, d, load, spec.target_in_flight).await;
            }
        }
        autoscaler.retain(|k| {
            k.split_once('/')
                .is_some_and(|(ns, name)| seen.1.contains(&(ns.to_string(), name.to_string())))
        });
        for (ns, name) in exported.0.difference(&seen.0) {
            let _ = ctx.metrics.inflight.remove_label_values(&[ns, name]);
        }
        for (ns, name) in exported.1.difference(&seen.1) {
            let _ = ctx.metrics.desired.remove_label_values(&[ns, name]);
            let _ = ctx.metrics.current.remove_label_values(&[ns, name]);
        }
        exported = seen;
    }
}

/// What one round read from the agents.
struct Polled {
    /// Requests in flight and queued by deployment (`namespace/name`), summed
    /// over every agent that answered.
    load: BTreeMap<String, u64>,
    /// Nodes whose agent did not answer: their load is unknown, not zero.
    silent: BTreeSet<String>,
}

async fn poll(
    http: &HttpClient<HttpConnector, Empty<Bytes>>,
    nodes: &[std::sync::Arc<ModelNode>],
) -> Polled {
    let asks = nodes.iter().filter_map(|mn| {
        let endpoint = mn
            .status
            .as_ref()?
            .agent
            .as_ref()?
            .metrics_endpoint
            .clone()?;
        let node = mn.name_any();
        Some(async move {
            let uri: hyper::Uri = format!("http://{endpoint}/load").parse().ok()?;
            let fetch = async {
                let res = http.get(uri).await.ok()?;
                if !res.status().is_success() {
                    return None;
                }
                let body = res.into_body().collect().await.ok()?.to_bytes();
                serde_json::from_slice::<AgentLoad>(&body).ok()
            };
            let load = tokio::time::timeout(POLL_TIMEOUT, fetch)
                .await
                .ok()
                .flatten();
            if load.is_none() {
                tracing::debug!(%node, %endpoint, "no load from the agent this round");
            }
            Some((node, load))
        })
    });
    let mut polled = Polled {
        load: BTreeMap::new(),
        silent: BTreeSet::new(),
    };
    for (node, load) in join_all(asks).await.into_iter().flatten() {
        match load {
            Some(load) => {
                for (k, n) in load.models {
                    *polled.load.entry(k).or_insert(0) += n;
                }
            }
            None => {
                polled.silent.insert(node);
            }
        }
    }
    polled
}

async fn rescale(
    ctx: &Context,
    md: &ModelDeployment,
    ns: &str,
    current: i32,
    d: Decision,
    load: f64,
    target: i32,
) {
    let name = md.name_any();
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), ns);
    match scale::set_replicas(&api, &name, current, d.desired).await {
        Ok(()) => {
            let direction = if d.desired > current { "up" } else { "down" };
            ctx.metrics.rescales.with_label_values(&[direction]).inc();
            let note = format!(
                "Rescaled from {current} to {} replicas: {load} requests in flight or queued, {target} per replica targeted (recommendation now {})",
                d.desired, d.recommended
            );
            tracing::info!(deployment = %format!("{ns}/{name}"), from = current, to = d.desired, load, "rescaled");
            let ev = Event {
                type_: EventType::Normal,
                // Separate reasons: the recorder folds Events of one reason
                // into a series that keeps the first note.
                reason: if d.desired > current {
                    "ScaledUp"
                } else {
                    "ScaledDown"
                }
                .into(),
                note: Some(note),
                action: "Scale".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&ev, &md.object_ref(&())).await {
                tracing::warn!(error = %e, "publishing the autoscaling event");
            }
        }
        Err(ScaleError::Changed) => {
            tracing::debug!(deployment = %format!("{ns}/{name}"), "replicas changed meanwhile; deciding again next round");
        }
        Err(e) => tracing::warn!(deployment = %format!("{ns}/{name}"), error = %e, "autoscaling"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use axum::Router;
    use std::net::SocketAddr;

    async fn agent_answering(body: &'static str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = Router::new().route("/load", get(move || async move { body }));
        tokio::spawn(async move { axum::serve(l, app).await });
        addr
    }

    fn node(name: &str, metrics: SocketAddr) -> std::sync::Arc<ModelNode> {
        std::sync::Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelNode", "metadata": {"name": name},
                "spec": {}, "status": {"agent": {"version": "0", "podName": name, "endpoint": "10.0.0.1:8080",
                                                  "metricsEndpoint": metrics.to_string()}},
            }))
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn loads_are_summed_and_agents_without_a_readable_answer_are_silent_not_idle() {
        let one = agent_answering(
            r#"{"in_flight": 3, "waiting": 2, "concurrency": 1, "models": {"ml/a": 2, "ml/b": 1}}"#,
        )
        .await;
        let two = agent_answering(
            r#"{"in_flight": 1, "waiting": 0, "concurrency": 1, "models": {"ml/a": 1}}"#,
        )
        .await;
        let garbage = agent_answering("<html>not load</html>").await;
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let nodes = [
            node("n1", one),
            node("n2", two),
            node("n3", garbage),
            node("n4", dead),
        ];
        let http = HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new());
        let polled = poll(&http, &nodes).await;
        assert_eq!(
            polled.load,
            BTreeMap::from([("ml/a".to_string(), 3), ("ml/b".to_string(), 1)])
        );
        assert_eq!(
            polled.silent,
            BTreeSet::from(["n3".to_string(), "n4".to_string()])
        );
    }
}
