//! Which neighbours to copy a placement's model from, read from the other
//! agents' ModelNodes: pure functions over what the watches hold.

use super::Desired;
use crate::fetch::normalize;
use crate::fetch::peer::Peer;
use kube::ResourceExt;
use modelcache_crds::{condition, ModelDeployment, ModelNode, NodePlacementPhase};
use std::collections::HashSet;
use std::sync::Arc;

/// Most neighbours asked before the source.
const MAX_PEERS: usize = 3;

/// Ready neighbours of `me` that report `d`'s model (with its pinned hash,
/// when they verified one), those holding it in their cache first.
pub fn peers(nodes: &[Arc<ModelNode>], me: &str, d: &Desired) -> Vec<Peer> {
    let path = normalize(&d.path);
    let mut found: Vec<(bool, Peer)> = nodes
        .iter()
        .filter(|mn| mn.name_any() != me)
        .filter_map(|mn| {
            let st = mn.status.as_ref()?;
            let ready = st
                .conditions
                .iter()
                .any(|c| c.type_ == condition::READY && c.status == "True");
            let local = st.local_models.iter().find(|l| l.path == path)?;
            let hash_ok = match (&d.sha256, &local.sha256) {
                (Some(want), Some(have)) => want.eq_ignore_ascii_case(have),
                _ => true,
            };
            let endpoint = st.agent.as_ref()?.endpoint.clone();
            let cold = !st.models.iter().any(|m| m.path == path);
            (ready && hash_ok).then(|| {
                let node = mn.name_any();
                (cold, Peer { node, endpoint })
            })
        })
        .collect();
    found.sort_by(|a, b| (a.0, &a.1.node).cmp(&(b.0, &b.1.node)));
    found.into_iter().take(MAX_PEERS).map(|(_, p)| p).collect()
}

/// Whether a node whose name sorts before `me` is downloading the model at
/// `path` for any deployment: `me` then waits for it rather than reading
/// the source too. The order keeps two nodes from waiting for each other.
pub fn downloading_before(
    nodes: &[Arc<ModelNode>],
    deployments: &[Arc<ModelDeployment>],
    me: &str,
    path: &str,
) -> bool {
    let path = normalize(path);
    let same: HashSet<String> = deployments
        .iter()
        .filter(|md| normalize(&md.spec.model.path) == path)
        .map(|md| format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any()))
        .collect();
    nodes.iter().any(|mn| {
        mn.name_any().as_str() < me
            && mn.status.as_ref().is_some_and(|st| {
                st.placements.iter().any(|p| {
                    p.phase == NodePlacementPhase::Downloading && same.contains(&p.deployment)
                })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;
    use modelcache_crds::*;

    fn node(
        name: &str,
        ready: bool,
        local: &[(&str, Option<&str>)],
        cached: &[&str],
    ) -> Arc<ModelNode> {
        let mut mn = ModelNode::new(name, ModelNodeSpec::default());
        mn.status = Some(ModelNodeStatus {
            agent: Some(AgentInfo {
                version: "0".into(),
                pod_name: format!("agent-{name}"),
                endpoint: format!("{name}:8080"),
                metrics_endpoint: None,
            }),
            conditions: vec![Condition {
                type_: condition::READY.into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: reason::AGENT_SERVING.into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            local_models: local
                .iter()
                .map(|(path, sha)| LocalModel {
                    path: path.to_string(),
                    model_type: ModelType::Main,
                    base: Some(BaseModel::Sd1),
                    variant: None,
                    prediction_type: None,
                    format: ModelFormat::Diffusers,
                    file_bytes: 1,
                    tensor_count: 1,
                    parameter_count: None,
                    sha256: sha.map(Into::into),
                })
                .collect(),
            models: cached
                .iter()
                .map(|path| ResidentModel {
                    path: path.to_string(),
                    tier: Tier::Ram,
                    size_bytes: 1,
                    locked: false,
                    last_used: None,
                })
                .collect(),
            ..Default::default()
        });
        Arc::new(mn)
    }

    fn want(path: &str, sha256: Option<&str>) -> Desired {
        let md = serde_json::from_value::<ModelDeploymentSpec>(
            serde_json::json!({"model": {"path": path}}),
        )
        .unwrap();
        Desired {
            key: "ml/x".into(),
            path: path.into(),
            sha256: sha256.map(Into::into),
            source: None,
            warm: md.warm_tier,
            role: PlacementRole::Serving,
            precision: md.precision,
            loras: Vec::new(),
            vae: None,
            refiner: None,
            controlnets: Vec::new(),
            ip_adapter: None,
            defaults: md.defaults,
        }
    }

    #[test]
    fn ready_neighbours_with_the_model_and_its_hash_come_first_when_cached() {
        let nodes = [
            node("me", true, &[("m", None)], &[]),
            node("a", true, &[("m", None)], &[]),
            node("b", true, &[("m", None)], &["m"]),
            node("c", false, &[("m", None)], &["m"]),
            node("d", true, &[("m", Some("bad"))], &[]),
            node("e", true, &[("other", None)], &[]),
        ];
        let names = |d: &Desired| -> Vec<String> {
            peers(&nodes, "me", d).into_iter().map(|p| p.node).collect()
        };
        assert_eq!(names(&want("./m/", None)), ["b", "a", "d"]);
        assert_eq!(
            names(&want("m", Some("good"))),
            ["b", "a"],
            "a copy that verified another hash is not used"
        );
        assert_eq!(peers(&nodes, "me", &want("m", None))[0].endpoint, "b:8080");
        assert!(names(&want("absent", None)).is_empty());
    }

    #[test]
    fn only_an_earlier_node_downloading_the_same_model_is_waited_for() {
        let downloading = |name: &str, deployment: &str| {
            let mut mn = (*node(name, true, &[], &[])).clone();
            if let Some(st) = mn.status.as_mut() {
                st.placements.push(NodePlacement {
                    deployment: deployment.into(),
                    phase: NodePlacementPhase::Downloading,
                    tier: Tier::Disk,
                    message: None,
                    download: None,
                });
            }
            Arc::new(mn)
        };
        let deployment = |name: &str, path: &str| {
            let mut md = ModelDeployment::new(
                name,
                serde_json::from_value(serde_json::json!({"model": {"path": path}})).unwrap(),
            );
            md.metadata.namespace = Some("ml".into());
            Arc::new(md)
        };
        let deps = [
            deployment("x", "m"),
            deployment("y", "m"),
            deployment("z", "other"),
        ];
        let nodes = [downloading("n1", "ml/y"), downloading("n5", "ml/x")];
        assert!(
            downloading_before(&nodes, &deps, "n3", "m"),
            "n1 is before n3"
        );
        assert!(
            !downloading_before(&nodes, &deps, "n0", "m"),
            "n0 waits for nobody"
        );
        assert!(!downloading_before(&nodes, &deps, "n3", "other"));
    }
}
