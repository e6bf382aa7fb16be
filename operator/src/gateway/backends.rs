//! What a gateway request names and where it can go, from the watched
//! objects alone: pure, no I/O.

use crate::balance;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use modelcache_crds::{condition, ModelDeployment, PlacementPhase, PlacementRole, Tier};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};

/// One agent serving the deployment Ready.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub node: String,
    pub addr: SocketAddr,
    pub tier: Tier,
}

/// `namespace/name`, or `name` in the gateway's namespace. `None` when the
/// value cannot name a ModelDeployment.
pub fn deployment_name<'a>(model: &'a str, default_ns: &'a str) -> Option<(&'a str, &'a str)> {
    let (ns, name) = model.split_once('/').unwrap_or((default_ns, model));
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    (label(ns) && label(name)).then_some((ns, name))
}

/// The agents of `slice` that are ready, with the tier the deployment's
/// status gives their node (Ram when it says nothing more). An agent's
/// address is the one its ModelNode reports (`agent_at(node)`), which carries
/// its own port; the slice's address and port otherwise.
pub fn backends(
    md: &ModelDeployment,
    slice: Option<&EndpointSlice>,
    agent_at: impl Fn(&str) -> Option<SocketAddr>,
) -> Vec<Backend> {
    let Some(slice) = slice else {
        return Vec::new();
    };
    let port = slice
        .ports
        .as_ref()
        .and_then(|p| p.first())
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(modelcache_crds::API_PORT);
    let placements = md
        .status
        .as_ref()
        .map(|s| s.placements.as_slice())
        .unwrap_or_default();
    slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| {
            let ip: IpAddr = e.addresses.first()?.parse().ok()?;
            let node = e.node_name.clone().unwrap_or_else(|| ip.to_string());
            let tier = placements
                .iter()
                .find(|p| {
                    p.node == node
                        && p.role == PlacementRole::Serving
                        && p.phase == PlacementPhase::Ready
                })
                .map_or(Tier::Ram, |p| p.tier);
            Some(Backend {
                addr: agent_at(&node).unwrap_or(SocketAddr::new(ip, port)),
                node,
                tier,
            })
        })
        .collect()
}

/// Why a deployment has no ready replica, from its `Scheduled` condition when
/// that is False (`Unschedulable: 0/3 nodes …`), else from `Ready`.
pub fn not_ready_reason(md: &ModelDeployment) -> Option<String> {
    let conds = &md.status.as_ref()?.conditions;
    let find = |t: &str| conds.iter().find(|c| c.type_ == t && c.status == "False");
    let c = find(condition::SCHEDULED).or_else(|| find(condition::READY))?;
    Some(format!("{}: {}", c.reason, c.message))
}

/// The request's balancing key: the deployment, and its LoRA set when it has
/// one (the adapters' paths and weights, in a canonical order).
pub fn balance_request(deployment: &str, body: &Value) -> balance::Request {
    let mut loras: Vec<String> = body
        .get("loras")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|l| {
                    format!(
                        "{}:{}",
                        l.get("path").and_then(Value::as_str).unwrap_or_default(),
                        l.get("weight").and_then(Value::as_f64).unwrap_or(1.0)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    loras.sort();
    let set = loras.join(",");
    balance::Request {
        key: balance::hash(&[deployment, &set]),
        adapters: !loras.is_empty(),
    }
}

/// The deployments a gateway lists in `GET /v1/models`, as OpenAI model
/// objects with this API's extensions.
pub fn model_object(md: &ModelDeployment, gateway_ns: &str) -> Value {
    let ns = md.namespace().unwrap_or_default();
    let id = if ns == gateway_ns {
        md.name_any()
    } else {
        format!("{ns}/{}", md.name_any())
    };
    let status = md.status.clone().unwrap_or_default();
    serde_json::json!({
        "id": id,
        "object": "model",
        "created": md.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
        "owned_by": "modelcache",
        "namespace": ns,
        "name": md.name_any(),
        "ready": status.ready_replicas > 0,
        "replicas": md.spec.replicas,
        "ready_replicas": status.ready_replicas,
        "autoscaling": md.spec.autoscaling().is_some(),
        "base": status.model.as_ref().map(|m| m.base),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use modelcache_crds::{ModelDeploymentStatus, Placement};

    fn md() -> ModelDeployment {
        let mut md: ModelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "alpha", "namespace": "ml"},
            "spec": {"model": {"path": "sd15"}, "replicas": 2},
        }))
        .unwrap();
        let placement = |node: &str, tier| Placement {
            node: node.into(),
            role: PlacementRole::Serving,
            phase: PlacementPhase::Ready,
            tier,
            message: None,
            since: None,
            download: None,
        };
        md.status = Some(ModelDeploymentStatus {
            placements: vec![placement("n1", Tier::Vram), placement("n2", Tier::Ram)],
            ..Default::default()
        });
        md
    }

    fn endpoint(ip: &str, node: &str, ready: bool) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                ..Default::default()
            }),
            node_name: Some(node.into()),
            ..Default::default()
        }
    }

    #[test]
    fn names_are_a_deployment_here_or_in_a_namespace() {
        assert_eq!(deployment_name("alpha", "ml"), Some(("ml", "alpha")));
        assert_eq!(deployment_name("team/alpha", "ml"), Some(("team", "alpha")));
        for bad in ["", "a/b/c", "Alpha", "/x", "x/", "sd15/dream shaper"] {
            assert_eq!(deployment_name(bad, "ml"), None, "{bad:?}");
        }
    }

    #[test]
    fn ready_endpoints_become_backends_with_their_nodes_tier() {
        let slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: Some(vec![
                endpoint("10.0.0.1", "n1", true),
                endpoint("10.0.0.2", "n2", true),
                endpoint("10.0.0.3", "n3", false),
            ]),
            ports: Some(vec![EndpointPort {
                port: Some(8080),
                ..Default::default()
            }]),
            metadata: Default::default(),
        };
        let n2_reports: SocketAddr = "10.0.0.2:9000".parse().unwrap();
        let b = backends(&md(), Some(&slice), |n| (n == "n2").then_some(n2_reports));
        assert_eq!(
            b.iter()
                .map(|b| (b.node.as_str(), b.addr.to_string(), b.tier))
                .collect::<Vec<_>>(),
            vec![
                ("n1", "10.0.0.1:8080".to_string(), Tier::Vram),
                ("n2", "10.0.0.2:9000".to_string(), Tier::Ram),
            ]
        );
        assert!(backends(&md(), None, |_| None).is_empty());
    }

    #[test]
    fn the_lora_set_is_the_key_whatever_its_order() {
        let a = balance_request(
            "ml/alpha",
            &serde_json::json!({"loras": [{"path": "a.safetensors", "weight": 0.5}, {"path": "b.safetensors"}]}),
        );
        let b = balance_request(
            "ml/alpha",
            &serde_json::json!({"loras": [{"path": "b.safetensors", "weight": 1.0}, {"path": "a.safetensors", "weight": 0.5}]}),
        );
        assert_eq!(a, b);
        assert!(a.adapters);
        let plain = balance_request("ml/alpha", &serde_json::json!({"prompt": "x"}));
        assert!(!plain.adapters);
        assert_ne!(plain.key, a.key);
    }
}
