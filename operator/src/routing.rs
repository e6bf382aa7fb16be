//! The Service and EndpointSlices that route a ModelDeployment's traffic to the
//! agents holding it ready.
//!
//! The Service has no selector: agents are DaemonSet pods that serve many
//! models, so which pods back a model is the operator's decision, written as
//! one EndpointSlice `<name>`. Its address family is the agents' (pods report
//! their primary IP, and a cluster's pods share one primary family).

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use modelcache_crds::{
    ModelDeployment, API_PORT, DEPLOYMENT_LABEL, MANAGED_BY_LABEL, OPERATOR_MANAGER,
    SERVICE_NAME_LABEL,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// `endpointslice.kubernetes.io/managed-by`: tells kube-controller-manager's
/// mirroring controller to leave our slices alone.
const SLICE_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

/// One agent that holds the deployment `Serving` and `Ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub node: String,
    /// `podIP:port` from the ModelNode's `agent.endpoint`.
    pub addr: SocketAddr,
}

fn labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (DEPLOYMENT_LABEL.to_string(), md.name_any()),
        (MANAGED_BY_LABEL.to_string(), OPERATOR_MANAGER.to_string()),
    ])
}

fn owner(md: &ModelDeployment) -> Option<Vec<OwnerReference>> {
    md.controller_owner_ref(&()).map(|o| vec![o])
}

/// The label selector that finds every object owned for `md`.
pub fn owned_selector(md: &ModelDeployment) -> String {
    format!(
        "{DEPLOYMENT_LABEL}={},{MANAGED_BY_LABEL}={OPERATOR_MANAGER}",
        md.name_any()
    )
}

/// The Service `<name>` (port 8080, no selector).
pub fn service(md: &ModelDeployment) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(md.name_any()),
            namespace: md.namespace(),
            labels: Some(labels(md)),
            owner_references: owner(md),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(API_PORT),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The EndpointSlice listing `backends`, sorted by node so that an unchanged set
/// applies as a no-op. Its family is the first backend's (IPv4 when empty);
/// backends of the other family are left out with a warning.
pub fn endpoint_slice(md: &ModelDeployment, backends: &[Backend]) -> EndpointSlice {
    let ipv6 = backends.first().is_some_and(|b| b.addr.is_ipv6());
    for b in backends.iter().filter(|b| b.addr.is_ipv6() != ipv6) {
        tracing::warn!(node = %b.node, addr = %b.addr, "agent address family differs from the other agents'; not routed");
    }
    let mut chosen: Vec<&Backend> = backends
        .iter()
        .filter(|b| b.addr.is_ipv6() == ipv6)
        .collect();
    chosen.sort_by(|a, b| a.node.cmp(&b.node));
    let port = chosen.first().map_or(API_PORT, |b| b.addr.port());
    let mut slice_labels = labels(md);
    slice_labels.insert(SERVICE_NAME_LABEL.into(), md.name_any());
    slice_labels.insert(
        SLICE_MANAGED_BY.into(),
        format!("{OPERATOR_MANAGER}.modelcache.io"),
    );
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(md.name_any()),
            namespace: md.namespace(),
            labels: Some(slice_labels),
            owner_references: owner(md),
            ..Default::default()
        },
        address_type: if ipv6 { "IPv6" } else { "IPv4" }.into(),
        endpoints: Some(
            chosen
                .iter()
                .map(|b| Endpoint {
                    addresses: vec![b.addr.ip().to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: Some(b.node.clone()),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(i32::from(port)),
            protocol: Some("TCP".into()),
            app_protocol: Some("http".into()),
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcache_crds::ModelDeploymentSpec;

    fn md() -> ModelDeployment {
        let spec: ModelDeploymentSpec =
            serde_json::from_value(serde_json::json!({"model": {"path": "sd15"}})).unwrap();
        let mut md = ModelDeployment::new("sd15", spec);
        md.metadata.namespace = Some("ml".into());
        md.metadata.uid = Some("u1".into());
        md
    }

    #[test]
    fn service_is_selectorless_and_owned() {
        let s = service(&md());
        let spec = s.spec.unwrap();
        assert!(spec.selector.is_none());
        assert_eq!(spec.ports.unwrap()[0].port, 8080);
        let owner = &s.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("ModelDeployment", Some(true))
        );
    }

    #[test]
    fn slice_lists_one_family_sorted_by_node() {
        let b = |node: &str, addr: &str| Backend {
            node: node.into(),
            addr: addr.parse().unwrap(),
        };
        let backends = [
            b("n2", "10.0.0.2:8080"),
            b("n1", "10.0.0.1:8080"),
            b("n3", "[fd00::3]:8080"),
        ];
        let v4 = endpoint_slice(&md(), &backends);
        assert_eq!(v4.address_type, "IPv4");
        let addrs: Vec<_> = v4
            .endpoints
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.addresses[0].as_str())
            .collect();
        assert_eq!(addrs, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(v4.metadata.labels.unwrap()[SERVICE_NAME_LABEL], "sd15");
        let v6 = endpoint_slice(&md(), &backends[2..]);
        assert_eq!(
            (v6.address_type.as_str(), v6.endpoints.unwrap().len()),
            ("IPv6", 1)
        );
    }
}
