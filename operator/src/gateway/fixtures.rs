//! A gateway over stores filled by hand, the way its watches fill them, for
//! the tests and the benchmark (feature `testing`).

use super::metrics::GatewayMetrics;
use super::{Gateway, Limits};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher::Event;
use modelcache_crds::{ModelDeployment, ModelNode, Tier};
use serde_json::{json, Value};
use std::net::SocketAddr;
use tokio::sync::watch;

/// The watched objects behind a [`Gateway`], changed as the API server would.
pub struct Objects {
    deployments: Writer<ModelDeployment>,
    slices: Writer<EndpointSlice>,
    nodes: Writer<ModelNode>,
    changed: watch::Sender<u64>,
}

/// A gateway for bare names in namespace `ml`, without scale-ups (no API
/// server) and without a token.
pub fn gateway(limits: Limits) -> (Gateway, Objects) {
    let (deployments, dw) = reflector::store();
    let (slices, sw) = reflector::store();
    let (nodes, nw) = reflector::store();
    let (changed, changes) = watch::channel(0);
    let g = Gateway::new(
        "ml".into(),
        deployments,
        slices,
        nodes,
        changes,
        None,
        None,
        limits,
        GatewayMetrics::new().expect("registering metrics"),
    );
    (
        g,
        Objects {
            deployments: dw,
            slices: sw,
            nodes: nw,
            changed,
        },
    )
}

fn object<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a fixture object")
}

impl Objects {
    /// The agent on `node` reports its API at `addr`.
    pub fn agent(&mut self, node: &str, addr: SocketAddr) {
        self.nodes.apply_watcher_event(&Event::Apply(object(json!({
            "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelNode", "metadata": {"name": node},
            "spec": {}, "status": {"agent": {"version": "0", "podName": node, "endpoint": addr.to_string()}},
        }))));
        self.bump();
    }

    /// Deployment `ml/<name>` with `replicas` (and autoscaling when
    /// `autoscaled`), served Ready by `ready` (node, tier); `unschedulable`
    /// puts a False `Scheduled` condition with that message.
    pub fn deployment(
        &mut self,
        name: &str,
        replicas: i32,
        autoscaled: bool,
        ready: &[(&str, Tier)],
        unschedulable: Option<&str>,
    ) {
        let placements: Vec<Value> = ready
            .iter()
            .map(|(n, t)| json!({"node": n, "role": "Serving", "phase": "Ready", "tier": t}))
            .collect();
        let conditions: Vec<Value> = unschedulable
            .map(|m| {
                json!({"type": "Scheduled", "status": "False", "reason": "Unschedulable", "message": m,
                       "lastTransitionTime": "2026-01-01T00:00:00Z"})
            })
            .into_iter()
            .collect();
        let mut spec = json!({"model": {"path": name}, "replicas": replicas});
        if autoscaled {
            spec["autoscaling"] = json!({"maxReplicas": 3});
        }
        self.deployments
            .apply_watcher_event(&Event::Apply(object(json!({
                "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": name, "namespace": "ml"},
                "spec": spec,
                "status": {"placements": placements, "conditions": conditions,
                           "replicas": ready.len(), "readyReplicas": ready.len()},
            }))));
        let endpoints: Vec<Value> = ready
            .iter()
            .map(|(n, _)| json!({"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "nodeName": n}))
            .collect();
        self.slices.apply_watcher_event(&Event::Apply(object(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "ml"},
            "endpoints": endpoints, "ports": [{"port": 8080}],
        }))));
        self.bump();
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}
