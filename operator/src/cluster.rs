//! The cluster as the scheduler sees it: what the API server holds (Nodes,
//! ModelNodes, Leases, ModelDeployments) turned into the scheduler's plain
//! inputs, a deployment's model resolved from the agents' reports, and which
//! deployments a change on a node concerns. Pure functions over values: the
//! controller passes the reflector stores' contents in, tests pass objects.

use crate::scheduler::{self, Assignment, Fetch, Sizes, Taint, Toleration};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use modelcache_crds::{
    condition, node_lease_name, reason, text_to_image, LocalModel, ModelDeployment, ModelFormat,
    ModelInfo, ModelNode, NotTextToImage, Tier,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// Bandwidths assumed until an agent has measured its own: a local disk and a
/// PCIe 4 x8 link, conservatively.
const DEFAULT_DISK_BPS: f64 = 1e9;
const DEFAULT_RAM_TO_DEVICE_BPS: f64 = 10e9;

/// The `modelcache_nodes{state}` classification of an agent's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    Ready,
    /// Lease expired or ModelNode not Ready: nothing is scheduled there.
    Stale,
    /// `spec.unschedulable` (kubectl cordon).
    Cordoned,
}

impl NodeState {
    pub fn label(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Stale => "stale",
            NodeState::Cordoned => "cordoned",
        }
    }
}

/// The nodes at one moment: the agents' ModelNodes, the Kubernetes Nodes,
/// and the agents' Leases (in the operator's namespace), with the time they
/// were read and how old a Lease may be before its node counts as gone.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub model_nodes: Vec<Arc<ModelNode>>,
    pub nodes: Vec<Arc<Node>>,
    pub leases: Vec<Arc<Lease>>,
    pub now: Timestamp,
    pub lease_expiry: SignedDuration,
}

impl Cluster {
    fn lease(&self, node: &str) -> Option<&Lease> {
        let name = node_lease_name(node);
        self.leases
            .iter()
            .find(|l| l.name_any() == name)
            .map(|l| l.as_ref())
    }

    fn node(&self, name: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name_any() == name)
            .map(|n| n.as_ref())
    }

    /// Whether the agent's Lease was renewed within the expiry window.
    pub fn lease_fresh(&self, node: &str) -> bool {
        let Some(spec) = self.lease(node).and_then(|l| l.spec.as_ref()) else {
            return false;
        };
        let Some(renewed) = spec
            .renew_time
            .as_ref()
            .or(spec.acquire_time.as_ref())
            .map(|t| t.0)
        else {
            return false;
        };
        self.now.duration_since(renewed) <= self.lease_expiry
    }

    /// Ready, Stale or Cordoned, for the scheduler and the nodes metric.
    pub fn state(&self, mn: &ModelNode) -> NodeState {
        let name = mn.name_any();
        let ready = mn
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::READY))
            .is_some_and(|c| c.status == "True");
        if !ready || !self.lease_fresh(&name) {
            NodeState::Stale
        } else if self
            .node(&name)
            .and_then(|n| n.spec.as_ref())
            .and_then(|s| s.unschedulable)
            .unwrap_or(false)
        {
            NodeState::Cordoned
        } else {
            NodeState::Ready
        }
    }

    /// The scheduler's view of every agent. A ModelNode without a Kubernetes
    /// Node (deleted, or an emulated cluster) has no labels or taints.
    pub fn scheduler_nodes(&self, model: Option<&ResolvedModel>) -> Vec<scheduler::Node> {
        let mut out: Vec<scheduler::Node> = self
            .model_nodes
            .iter()
            .map(|mn| self.scheduler_node(mn, model))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn scheduler_node(&self, mn: &ModelNode, model: Option<&ResolvedModel>) -> scheduler::Node {
        let name = mn.name_any();
        let state = self.state(mn);
        let node = self.node(&name);
        let status = mn.status.clone().unwrap_or_default();
        let cache = status.cache.clone().unwrap_or_default();
        let labels = node.map(|n| n.labels().clone()).unwrap_or_default();
        let taints = node
            .and_then(|n| n.spec.as_ref())
            .and_then(|s| s.taints.as_ref())
            .map(|ts| {
                ts.iter()
                    .map(|t| Taint {
                        key: t.key.clone(),
                        value: t.value.clone().unwrap_or_default(),
                        effect: t.effect.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        // The fastest tier each model is in (Tier orders Disk < Ram < Vram).
        let mut resident: HashMap<String, Tier> = HashMap::new();
        for m in &status.models {
            let best = resident.entry(m.path.clone()).or_insert(m.tier);
            *best = (*best).max(m.tier);
        }
        // A copy whose hash differs from the pinned one does not count as the model.
        let local = (!status.local_models_truncated).then(|| {
            status
                .local_models
                .iter()
                .filter(|l| model.is_none_or(|m| m.accepts(l)))
                .map(|l| l.path.clone())
                .collect::<HashSet<_>>()
        });
        scheduler::Node {
            name,
            labels,
            taints,
            schedulable: state != NodeState::Cordoned,
            healthy: state != NodeState::Stale,
            ram_budget: cache.ram_capacity_bytes.max(0) as u64,
            device_budgets: status
                .devices
                .iter()
                .map(|d| d.cache_budget_bytes.max(0) as u64)
                .filter(|b| *b > 0)
                .collect(),
            cpu_only: status.devices.iter().all(|d| d.id == "cpu"),
            resident,
            local,
            disk_bps: positive_or(cache.disk_read_bytes_per_second, DEFAULT_DISK_BPS),
            ram_to_device_bps: positive_or(
                cache.ram_to_device_bytes_per_second,
                DEFAULT_RAM_TO_DEVICE_BPS,
            ),
            serving_bytes: 0,
        }
    }
}

fn positive_or(v: i64, default: f64) -> f64 {
    if v > 0 {
        v as f64
    } else {
        default
    }
}

/// `namespace/name` of a deployment: the key agents report placements under.
pub fn key(md: &ModelDeployment) -> String {
    format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
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
                    (c.type_ == condition::RESOLVED || c.type_ == condition::SCHEDULED)
                        && c.status != "True"
                })
        })
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

/// The scheduler's view of a deployment. `size` comes from the resolved model
/// (the target) or from the last status (others).
pub fn scheduler_deployment(md: &ModelDeployment, size: Sizes) -> scheduler::Deployment {
    let spec = &md.spec;
    scheduler::Deployment {
        key: key(md),
        model: normalize(&spec.model.path),
        size,
        replicas: spec.replicas.max(0) as u32,
        warm: spec.warm_tier,
        priority: spec.priority,
        node_selector: spec.placement.node_selector.clone(),
        tolerations: spec
            .placement
            .tolerations
            .iter()
            .map(|t| Toleration {
                key: t.key.clone().unwrap_or_default(),
                operator: t.operator.clone().unwrap_or_else(|| "Equal".into()),
                value: t.value.clone().unwrap_or_default(),
                effect: t.effect.clone().unwrap_or_default(),
            })
            .collect(),
        max_per_node: spec.placement.max_replicas_per_node.max(1) as u32,
        spread_key: spec.placement.spread_topology_key.clone(),
        current: md
            .status
            .as_ref()
            .map(|s| {
                s.placements
                    .iter()
                    .map(|p| Assignment {
                        node: p.node.clone(),
                        role: p.role,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        fetch: spec.model.source.as_ref().map(|_| Fetch::Source),
    }
}

/// A model path as agents report it: no leading `./`, no trailing `/`.
pub fn normalize(path: &str) -> String {
    path.trim_start_matches("./")
        .trim_end_matches('/')
        .to_string()
}

/// A deployment's model as found in the agents' reports.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    pub path: String,
    /// What the agents report of it; `None` while no node has it and the
    /// agents are to download it from `spec.model.source` (its size is known
    /// once the first download is reported).
    pub info: Option<ModelInfo>,
    pub sha256: Option<String>,
    /// Nodes that report the model.
    pub nodes: Vec<String>,
    /// `spec.model.source`'s URL: nodes without the model may download it.
    pub source: Option<String>,
}

impl ResolvedModel {
    /// Whether a node's local model counts: other paths always do; a copy of this
    /// path only when its hash matches a pinned one (or is not known yet).
    fn accepts(&self, l: &LocalModel) -> bool {
        l.path != self.path
            || match (&self.sha256, &l.sha256) {
                (Some(want), Some(have)) => want.eq_ignore_ascii_case(have),
                _ => true,
            }
    }
}

/// Why a model could not be resolved: the `Resolved` condition's reason and message.
#[derive(Debug, Clone, PartialEq)]
pub struct Unresolved {
    /// `False` or `Unknown`.
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// Finds `md`'s model in the ModelNodes' local-model reports.
pub fn resolve(
    md: &ModelDeployment,
    model_nodes: &[Arc<ModelNode>],
) -> Result<ResolvedModel, Unresolved> {
    let path = normalize(&md.spec.model.path);
    let want_sha = md
        .spec
        .model
        .sha256
        .as_ref()
        .map(|s| s.to_ascii_lowercase());
    let mut names: Vec<String> = model_nodes.iter().map(|n| n.name_any()).collect();
    names.sort();
    let mut found: BTreeMap<String, &LocalModel> = BTreeMap::new();
    let mut mismatched: Vec<(String, String)> = Vec::new();
    let mut truncated = Vec::new();
    for mn in model_nodes {
        let Some(st) = mn.status.as_ref() else {
            continue;
        };
        if st.local_models_truncated {
            truncated.push(mn.name_any());
        }
        if let Some(l) = st.local_models.iter().find(|l| l.path == path) {
            match (&want_sha, &l.sha256) {
                (Some(want), Some(have)) if !want.eq_ignore_ascii_case(have) => {
                    mismatched.push((mn.name_any(), have.clone()))
                }
                _ => {
                    found.insert(mn.name_any(), l);
                }
            }
        }
    }
    let Some((_, first)) = found.iter().next() else {
        if let Some(source) = &md.spec.model.source {
            // A pinned hash no copy has is still an error: downloading would not fix the copies.
            if mismatched.is_empty() {
                return Ok(ResolvedModel {
                    path,
                    info: None,
                    sha256: want_sha,
                    nodes: Vec::new(),
                    source: Some(source.url.clone()),
                });
            }
        }
        return Err(not_found(
            &path,
            &names,
            &truncated,
            &mismatched,
            want_sha.as_deref(),
        ));
    };
    let l = *first;
    use modelcache_crds::FormatHint;
    let format_ok = match md.spec.model.format {
        FormatHint::Auto => true,
        FormatHint::Checkpoint => l.format == ModelFormat::Checkpoint,
        FormatHint::Diffusers => l.format == ModelFormat::Diffusers,
    };
    if !format_ok {
        return Err(Unresolved {
            status: "False",
            reason: reason::FORMAT_MISMATCH,
            message: format!(
                "model {path:?} is a {:?} model but spec.model.format is {:?}; set format to Auto or {:?}",
                l.format, md.spec.model.format, l.format
            ),
        });
    }
    match text_to_image(l.model_type, l.base, l.variant) {
        Ok(()) => {}
        Err(NotTextToImage::NotMain(t)) => {
            return Err(Unresolved {
                status: "False",
                reason: reason::NOT_A_MAIN_MODEL,
                message: format!(
                    "model {path:?} is a {t:?} model, not a text-to-image pipeline; point model.path at a base model (use LoRAs through spec.loras)"
                ),
            })
        }
        Err(_) => {
            return Err(Unresolved {
                status: "False",
                reason: reason::UNSUPPORTED_MODEL,
                message: format!(
                    "model {path:?} is a {:?}{} model; text-to-image serving needs a normal base model",
                    l.base,
                    l.variant.map(|v| format!(" {v:?}")).unwrap_or_default()
                ),
            })
        }
    }
    let Some(base) = l.base else {
        return Err(Unresolved {
            status: "False",
            reason: reason::UNSUPPORTED_MODEL,
            message: format!("model {path:?}: its base model cannot be determined"),
        });
    };
    let precision = md.spec.precision;
    let mut size = sizes_of_local(l, precision);
    let mut nodes: Vec<String> = found.keys().cloned().collect();
    // What the deployment uses beside its model is placed, warmed and sized with it.
    let mut companions: Vec<(String, String, Companion)> = Vec::new();
    if let Some(r) = &md.spec.refiner {
        companions.push(("refiner".into(), r.clone(), Companion::Refiner(base)));
    }
    if let Some(v) = &md.spec.vae {
        companions.push(("vae".into(), v.clone(), Companion::Vae));
    }
    for (i, c) in md.spec.controlnets.iter().enumerate() {
        companions.push((
            format!("controlnets[{i}]"),
            c.clone(),
            Companion::Control(base),
        ));
    }
    if let Some(ip) = &md.spec.ip_adapter {
        // Without imageEncoder, the agents look beside the file.
        let beside = std::path::Path::new(&normalize(&ip.path))
            .with_file_name("image_encoder")
            .to_string_lossy()
            .into_owned();
        companions.push((
            "ipAdapter.path".into(),
            ip.path.clone(),
            Companion::IpAdapter(base),
        ));
        companions.push((
            "ipAdapter.imageEncoder".into(),
            ip.image_encoder.clone().unwrap_or(beside),
            Companion::ImageEncoder,
        ));
    }
    for (field, extra, kind) in &companions {
        let (field, extra) = (field.as_str(), extra.as_str());
        let (bytes, with) = companion(field, extra, *kind, precision, model_nodes)?;
        size = Sizes {
            gpu: size.gpu.saturating_add(bytes.gpu),
            cpu: size.cpu.saturating_add(bytes.cpu),
            ram: size.ram.saturating_add(bytes.ram),
        };
        nodes.retain(|n| with.contains(n));
        if nodes.is_empty() {
            return Err(Unresolved {
                status: "False",
                reason: reason::MODEL_NOT_FOUND,
                message: format!(
                    "no node has both model {path:?} and spec.{field} {extra:?} (the model is on {}, the {field} on {}); copy them onto the same nodes",
                    found.keys().cloned().collect::<Vec<_>>().join(", "),
                    with.into_iter().collect::<Vec<_>>().join(", "),
                ),
            });
        }
    }
    Ok(ResolvedModel {
        path,
        source: md.spec.model.source.as_ref().map(|s| s.url.clone()),
        info: Some(ModelInfo {
            model_type: l.model_type,
            base,
            variant: l.variant,
            format: l.format,
            prediction_type: l.prediction_type,
            size_bytes: size.gpu as i64,
            cpu_size_bytes: Some(size.cpu as i64),
            ram_size_bytes: Some(size.ram as i64),
            tensor_count: l.tensor_count,
        }),
        sha256: want_sha,
        nodes,
    })
}

/// What a model of a node's report takes: on a GPU at `precision`, on the
/// CPU at F32 (its parameters, or its files when the agent did not count
/// them), and in RAM its files.
fn sizes_of_local(l: &LocalModel, precision: modelcache_crds::Precision) -> Sizes {
    let files = l.file_bytes.max(0) as u64;
    let at = |bytes: u64| match l.parameter_count {
        Some(n) if n > 0 => (n as u64).saturating_mul(bytes),
        _ => files,
    };
    Sizes {
        gpu: at(precision.element_bytes()),
        cpu: at(4),
        ram: files,
    }
}

/// What a deployment resolved earlier takes, from its status (older
/// statuses have only the GPU size, used for all three).
pub fn sizes_of(info: &ModelInfo) -> Sizes {
    let gpu = info.size_bytes.max(0) as u64;
    let or_gpu = |v: Option<i64>| v.map_or(gpu, |v| v.max(0) as u64);
    Sizes {
        gpu,
        cpu: or_gpu(info.cpu_size_bytes),
        ram: or_gpu(info.ram_size_bytes),
    }
}

/// What a deployment uses beside its model must be.
#[derive(Clone, Copy)]
enum Companion {
    /// An SDXL refiner, for a model of this base.
    Refiner(modelcache_crds::BaseModel),
    Vae,
    /// A ControlNet or T2I-Adapter for a model of this base.
    Control(modelcache_crds::BaseModel),
    /// An IP-Adapter for a model of this base (or of a base its weights do not tell).
    IpAdapter(modelcache_crds::BaseModel),
    /// A CLIP Vision image encoder.
    ImageEncoder,
}

impl Companion {
    /// Whether a reported model is what the field asks for.
    fn fits(self, l: &LocalModel) -> bool {
        use modelcache_crds::{BaseModel, ModelType};
        match self {
            Companion::Refiner(_) => {
                l.model_type == ModelType::Main && l.base == Some(BaseModel::SdxlRefiner)
            }
            Companion::Vae => l.model_type == ModelType::Vae,
            Companion::Control(base) => {
                matches!(l.model_type, ModelType::ControlNet | ModelType::T2iAdapter)
                    && l.base == Some(base)
            }
            Companion::IpAdapter(base) => {
                l.model_type == ModelType::IpAdapter && l.base.is_none_or(|b| b == base)
            }
            Companion::ImageEncoder => l.model_type == ModelType::ClipVision,
        }
    }

    fn wanted(self) -> String {
        match self {
            Companion::Refiner(_) => "an SDXL refiner".into(),
            Companion::Vae => "a VAE".into(),
            Companion::Control(base) => format!("a {base:?} ControlNet or T2I-Adapter"),
            Companion::IpAdapter(base) => format!("a {base:?} IP-Adapter"),
            Companion::ImageEncoder => "a CLIP Vision image encoder".into(),
        }
    }
}

/// A model a deployment uses beside its own (`spec.refiner`, `spec.vae`):
/// the bytes it adds to a placement and the nodes that report it.
fn companion(
    field: &str,
    path: &str,
    kind: Companion,
    precision: modelcache_crds::Precision,
    model_nodes: &[Arc<ModelNode>],
) -> Result<(Sizes, BTreeSet<String>), Unresolved> {
    use modelcache_crds::BaseModel;
    let path = normalize(path);
    let unsupported = |message: String| Unresolved {
        status: "False",
        reason: reason::UNSUPPORTED_MODEL,
        message,
    };
    if let Companion::Refiner(base) = kind {
        if base != BaseModel::Sdxl {
            return Err(unsupported(format!(
                "spec.refiner is set but the model is {base:?}: a refiner only finishes SDXL images; remove spec.refiner"
            )));
        }
    }
    let mut nodes = BTreeSet::new();
    let mut bytes = Sizes::uniform(0);
    for mn in model_nodes {
        let Some(l) = mn
            .status
            .as_ref()
            .and_then(|st| st.local_models.iter().find(|l| l.path == path))
        else {
            continue;
        };
        if !kind.fits(l) {
            return Err(unsupported(format!(
                "spec.{field} {path:?} is a {} {:?} model, not {}",
                l.base
                    .map_or("base-independent".to_string(), |b| format!("{b:?}")),
                l.model_type,
                kind.wanted()
            )));
        }
        bytes = sizes_of_local(l, precision);
        nodes.insert(mn.name_any());
    }
    if nodes.is_empty() {
        return Err(Unresolved {
            status: "False",
            reason: reason::MODEL_NOT_FOUND,
            message: format!(
                "spec.{field} {path:?} is on no node's models folder; copy it there or remove spec.{field}"
            ),
        });
    }
    Ok((bytes, nodes))
}

fn not_found(
    path: &str,
    searched: &[String],
    truncated: &[String],
    mismatched: &[(String, String)],
    want: Option<&str>,
) -> Unresolved {
    let list = |v: &[String]| {
        const SHOWN: usize = 10;
        let mut s = v.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
        if v.len() > SHOWN {
            s.push_str(&format!(" and {} more", v.len() - SHOWN));
        }
        s
    };
    if let (Some(want), false) = (want, mismatched.is_empty()) {
        let nodes: Vec<String> = mismatched
            .iter()
            .map(|(n, h)| format!("{n} has {h}"))
            .collect();
        return Unresolved {
            status: "False",
            reason: reason::SHA256_MISMATCH,
            message: format!(
                "model {path:?} was found but no copy has the pinned sha256 {want}: {}; update spec.model.sha256 or replace the files",
                list(&nodes)
            ),
        };
    }
    if searched.is_empty() {
        return Unresolved {
            status: "Unknown",
            reason: reason::NO_AGENTS,
            message: format!(
                "no node agent has reported yet, so model {path:?} cannot be looked up; check that the modelcache agent DaemonSet runs on your GPU nodes"
            ),
        };
    }
    if !truncated.is_empty() {
        return Unresolved {
            status: "Unknown",
            reason: reason::MODEL_NOT_REPORTED,
            message: format!(
                "model {path:?} is not in the model lists of {} node(s) searched ({}); the lists of {} are truncated, so it may exist there unseen: remove unused models from those nodes or check the path",
                searched.len(),
                list(searched),
                list(truncated)
            ),
        };
    }
    Unresolved {
        status: "False",
        reason: reason::MODEL_NOT_FOUND,
        message: format!(
            "model {path:?} was not found under the model root of any of the {} node(s) searched ({}); copy it to the agents' --models-dir or fix spec.model.path (relative to the model root)",
            searched.len(),
            list(searched)
        ),
    }
}

/// Objects as the API server would hold them, for the operator's tests: the
/// pure modules' unit tests and the reconcile tests (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod fixtures {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint as NodeTaint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
    use modelcache_crds::*;

    pub const G: i64 = 1 << 30;

    /// `ml/<name>` serving `path`, with `spec` merged into the spec.
    pub fn deployment(name: &str, path: &str, spec: serde_json::Value) -> ModelDeployment {
        let mut s = serde_json::json!({"model": {"path": path}});
        if let (Some(dst), Some(src)) = (s.as_object_mut(), spec.as_object()) {
            dst.extend(src.clone());
        }
        let mut md = ModelDeployment::new(name, serde_json::from_value(s).unwrap());
        md.metadata.namespace = Some("ml".into());
        md.metadata.uid = Some(format!("uid-{name}"));
        md.metadata.generation = Some(1);
        md.metadata.resource_version = Some("1".into());
        md
    }

    /// An SD 1.x checkpoint of `params` parameters.
    pub fn local(path: &str, params: i64) -> LocalModel {
        LocalModel {
            path: path.into(),
            model_type: ModelType::Main,
            base: Some(BaseModel::Sd1),
            variant: Some(ModelVariant::Normal),
            prediction_type: Some(PredictionType::Epsilon),
            format: ModelFormat::Checkpoint,
            file_bytes: params * 4,
            tensor_count: 1100,
            parameter_count: Some(params),
            sha256: None,
        }
    }

    /// A Ready agent at `ip` with 32 GiB of RAM and one device of `vram` GiB.
    pub fn model_node(name: &str, ip: &str, vram: i64, locals: Vec<LocalModel>) -> ModelNode {
        let mut mn = ModelNode::new(name, ModelNodeSpec {});
        mn.status = Some(ModelNodeStatus {
            agent: Some(AgentInfo {
                version: "0.1.0".into(),
                pod_name: format!("agent-{name}"),
                endpoint: format!("{ip}:8080"),
                metrics_endpoint: Some(format!("{ip}:9090")),
            }),
            devices: vec![DeviceInfo {
                id: "cuda:0".into(),
                name: "H100".into(),
                memory_bytes: vram * G,
                free_bytes: vram * G,
                cache_budget_bytes: vram * G,
            }],
            cache: Some(CacheStatus {
                ram_capacity_bytes: 32 * G,
                ..Default::default()
            }),
            local_models: locals,
            conditions: vec![Condition {
                type_: condition::READY.into(),
                status: "True".into(),
                reason: reason::AGENT_SERVING.into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(Timestamp::now()),
            }],
            ..Default::default()
        });
        mn
    }

    /// The node's agent Lease, renewed `age_secs` ago.
    pub fn lease(node: &str, age_secs: i64) -> Lease {
        Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(node_lease_name(node)),
                namespace: Some("modelcache".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.into()),
                lease_duration_seconds: Some(40),
                renew_time: Some(MicroTime(
                    Timestamp::now() - SignedDuration::from_secs(age_secs),
                )),
                ..Default::default()
            }),
        }
    }

    /// A Kubernetes Node with labels, `(key, value, effect)` taints, maybe cordoned.
    pub fn node(
        name: &str,
        labels: &[(&str, &str)],
        taints: &[(&str, &str, &str)],
        cordoned: bool,
    ) -> Node {
        Node {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(cordoned),
                taints: Some(
                    taints
                        .iter()
                        .map(|(k, v, e)| NodeTaint {
                            key: k.to_string(),
                            value: Some(v.to_string()),
                            effect: e.to_string(),
                            time_added: None,
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// The nodes now, with the operator's default 40 s Lease expiry.
    pub fn cluster(model_nodes: Vec<ModelNode>, nodes: Vec<Node>, leases: Vec<Lease>) -> Cluster {
        Cluster {
            model_nodes: model_nodes.into_iter().map(Arc::new).collect(),
            nodes: nodes.into_iter().map(Arc::new).collect(),
            leases: leases.into_iter().map(Arc::new).collect(),
            now: Timestamp::now(),
            lease_expiry: SignedDuration::from_secs(40),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use modelcache_crds::{
        ModelDeploymentStatus, ModelType, ModelVariant, Placement, PlacementPhase, PlacementRole,
        ResidentModel,
    };

    #[test]
    fn a_node_is_ready_stale_or_cordoned() {
        let mns = vec![
            model_node("fresh", "10.0.0.1", 24, vec![]),
            model_node("old", "10.0.0.2", 24, vec![]),
            model_node("leaseless", "10.0.0.3", 24, vec![]),
            model_node("cordoned", "10.0.0.4", 24, vec![]),
        ];
        let mut unready = model_node("unready", "10.0.0.5", 24, vec![]);
        if let Some(s) = unready.status.as_mut() {
            s.conditions[0].status = "False".into();
        }
        let c = cluster(
            [mns.clone(), vec![unready]].concat(),
            vec![node("cordoned", &[], &[], true)],
            vec![
                lease("fresh", 5),
                lease("old", 41),
                lease("cordoned", 5),
                lease("unready", 5),
            ],
        );
        let states: Vec<(String, NodeState)> = c
            .model_nodes
            .iter()
            .map(|m| (m.name_any(), c.state(m)))
            .collect();
        assert_eq!(
            states,
            [
                ("fresh".to_string(), NodeState::Ready),
                ("old".to_string(), NodeState::Stale),
                ("leaseless".to_string(), NodeState::Stale),
                ("cordoned".to_string(), NodeState::Cordoned),
                ("unready".to_string(), NodeState::Stale),
            ]
        );
    }

    #[test]
    fn scheduler_nodes_carry_labels_taints_residency_and_measured_bandwidth() {
        let mut mn = model_node("n1", "10.0.0.1", 24, vec![local("a", G), local("b", G)]);
        if let Some(s) = mn.status.as_mut() {
            s.models = vec![
                ResidentModel {
                    path: "a".into(),
                    tier: Tier::Ram,
                    size_bytes: G,
                    locked: false,
                    last_used: None,
                },
                ResidentModel {
                    path: "a".into(),
                    tier: Tier::Vram,
                    size_bytes: G,
                    locked: false,
                    last_used: None,
                },
            ];
            s.cache.as_mut().unwrap().disk_read_bytes_per_second = 3_000_000_000;
        }
        let c = cluster(
            vec![mn, model_node("n0", "10.0.0.2", 24, vec![])],
            vec![node(
                "n1",
                &[("zone", "z1")],
                &[("nvidia.com/gpu", "", "NoSchedule")],
                false,
            )],
            vec![lease("n1", 1)],
        );
        let nodes = c.scheduler_nodes(None);
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["n0", "n1"], "sorted by name");
        let n1 = &nodes[1];
        assert_eq!(n1.resident["a"], Tier::Vram, "the fastest tier wins");
        assert_eq!(n1.labels["zone"], "z1");
        assert_eq!(n1.taints[0].key, "nvidia.com/gpu");
        assert!(n1.healthy && n1.schedulable);
        assert_eq!(
            (n1.ram_budget, n1.device_budgets.clone()),
            (32 << 30, vec![24 << 30])
        );
        assert_eq!(n1.disk_bps, 3e9, "measured");
        assert_eq!(
            n1.ram_to_device_bps, DEFAULT_RAM_TO_DEVICE_BPS,
            "not measured yet"
        );
        assert!(n1.local.as_ref().unwrap().contains("b"));
        assert!(!nodes[0].healthy, "n0 has no Lease");
    }

    #[test]
    fn a_refiner_and_a_vae_are_sized_with_the_model_and_narrow_its_nodes() {
        use modelcache_crds::BaseModel;
        let with = |base: BaseModel, model_type: ModelType, path: &str, params: i64| LocalModel {
            base: Some(base),
            model_type,
            ..local(path, params)
        };
        let xl = || with(BaseModel::Sdxl, ModelType::Main, "xl", 3 * G);
        let refiner = || with(BaseModel::SdxlRefiner, ModelType::Main, "xl-refiner", 2 * G);
        let vae = || {
            with(
                BaseModel::Sdxl,
                ModelType::Vae,
                "vae/fix.safetensors",
                G / 10,
            )
        };
        let mns: Vec<Arc<ModelNode>> = [
            model_node("n1", "10.0.0.1", 24, vec![xl(), refiner(), vae()]),
            model_node("n2", "10.0.0.2", 24, vec![xl(), vae()]),
            model_node("n3", "10.0.0.3", 24, vec![xl(), refiner(), vae()]),
        ]
        .map(Arc::new)
        .to_vec();
        let md = deployment(
            "xl",
            "xl",
            serde_json::json!({"precision": "F16", "refiner": "xl-refiner", "vae": "./vae/fix.safetensors"}),
        );
        let r = resolve(&md, &mns).unwrap();
        assert_eq!(
            r.info.as_ref().unwrap().size_bytes,
            2 * (3 * G + 2 * G + G / 10),
            "model, refiner and VAE at F16"
        );
        assert_eq!(r.nodes, ["n1", "n3"], "only nodes with the refiner too");

        let why = |spec: serde_json::Value, mns: &[Arc<ModelNode>]| {
            let u = resolve(&deployment("xl", "xl", spec), mns).unwrap_err();
            (u.reason, u.message)
        };
        let (reason, message) = why(serde_json::json!({"refiner": "xl-refiner"}), &mns[1..2]);
        assert_eq!(reason, reason::MODEL_NOT_FOUND);
        assert!(
            message.contains("spec.refiner \"xl-refiner\" is on no node"),
            "{message}"
        );
        let (reason, message) = why(serde_json::json!({"refiner": "xl"}), &mns);
        assert_eq!(reason, reason::UNSUPPORTED_MODEL);
        assert!(message.contains("not an SDXL refiner"), "{message}");
        let (reason, message) = why(serde_json::json!({"vae": "xl-refiner"}), &mns);
        assert_eq!(reason, reason::UNSUPPORTED_MODEL);
        assert!(message.contains("not a VAE"), "{message}");
        let split = [
            model_node("n1", "10.0.0.1", 24, vec![xl()]),
            model_node("n2", "10.0.0.2", 24, vec![refiner()]),
        ]
        .map(Arc::new)
        .to_vec();
        let (reason, message) = why(serde_json::json!({"refiner": "xl-refiner"}), &split);
        assert_eq!(reason, reason::MODEL_NOT_FOUND);
        assert!(message.contains("no node has both"), "{message}");
        let sd1 = [model_node(
            "n1",
            "10.0.0.1",
            24,
            vec![local("xl", G), refiner()],
        )]
        .map(Arc::new)
        .to_vec();
        let (reason, message) = why(serde_json::json!({"refiner": "xl-refiner"}), &sd1);
        assert_eq!(reason, reason::UNSUPPORTED_MODEL);
        assert!(message.contains("only finishes SDXL"), "{message}");
    }

    #[test]
    fn controlnets_and_an_ip_adapter_are_sized_with_the_model_and_narrow_its_nodes() {
        use modelcache_crds::BaseModel;
        let with =
            |base: Option<BaseModel>, model_type: ModelType, path: &str, params: i64| LocalModel {
                base,
                model_type,
                ..local(path, params)
            };
        let sd = || local("sd", G);
        let canny = || {
            with(
                Some(BaseModel::Sd1),
                ModelType::ControlNet,
                "cn/canny",
                G / 2,
            )
        };
        let t2i = || {
            with(
                Some(BaseModel::Sd1),
                ModelType::T2iAdapter,
                "t2i/depth",
                G / 20,
            )
        };
        let xl_cn = || with(Some(BaseModel::Sdxl), ModelType::ControlNet, "cn/xl", G);
        let ip = || {
            with(
                Some(BaseModel::Sd1),
                ModelType::IpAdapter,
                "ip/ip.safetensors",
                G / 50,
            )
        };
        let encoder = || with(None, ModelType::ClipVision, "ip/image_encoder", G / 2);
        let mns: Vec<Arc<ModelNode>> = [
            model_node(
                "n1",
                "10.0.0.1",
                24,
                vec![sd(), canny(), t2i(), ip(), encoder(), xl_cn()],
            ),
            model_node("n2", "10.0.0.2", 24, vec![sd(), canny(), ip()]),
            model_node(
                "n3",
                "10.0.0.3",
                24,
                vec![sd(), canny(), t2i(), ip(), encoder()],
            ),
        ]
        .map(Arc::new)
        .to_vec();
        let spec = serde_json::json!({"precision": "F16", "controlnets": ["cn/canny", "t2i/depth"],
                                      "ipAdapter": {"path": "ip/ip.safetensors"}});
        let r = resolve(&deployment("sd", "sd", spec), &mns).unwrap();
        assert_eq!(
            r.info.as_ref().unwrap().size_bytes,
            2 * (G + G / 2 + G / 20 + G / 50 + G / 2),
            "model, ControlNet, T2I-Adapter, IP-Adapter and its encoder at F16"
        );
        assert_eq!(
            r.nodes,
            ["n1", "n3"],
            "only nodes with every one (n2 lacks the encoder)"
        );
        let why = |spec: serde_json::Value| {
            let u = resolve(&deployment("sd", "sd", spec), &mns).unwrap_err();
            (u.reason, u.message)
        };
        let (reason, message) = why(serde_json::json!({"controlnets": ["cn/canny", "cn/xl"]}));
        assert_eq!(reason, reason::UNSUPPORTED_MODEL);
        assert!(
            message.contains("spec.controlnets[1] \"cn/xl\" is a Sdxl ControlNet model, not a Sd1 ControlNet or T2I-Adapter"),
            "{message}"
        );
        let (_, message) = why(
            serde_json::json!({"ipAdapter": {"path": "ip/ip.safetensors", "imageEncoder": "cn/canny"}}),
        );
        assert!(message.contains("spec.ipAdapter.imageEncoder"), "{message}");
        let (reason, message) = why(serde_json::json!({"controlnets": ["cn/none"]}));
        assert_eq!(reason, reason::MODEL_NOT_FOUND);
        assert!(
            message.contains("spec.controlnets[0] \"cn/none\" is on no node"),
            "{message}"
        );
    }

    #[test]
    fn resolving_finds_the_model_and_says_why_not() {
        let md = deployment("sd", "./sd15/", serde_json::json!({"precision": "F16"}));
        let mns: Vec<Arc<ModelNode>> = [
            model_node("n2", "10.0.0.2", 24, vec![local("sd15", G)]),
            model_node(
                "n1",
                "10.0.0.1",
                24,
                vec![local("sd15", G), local("other", G)],
            ),
        ]
        .map(Arc::new)
        .to_vec();
        let r = resolve(&md, &mns).unwrap();
        assert_eq!(r.path, "sd15");
        assert_eq!(r.nodes, ["n1", "n2"]);
        assert_eq!(
            r.info.as_ref().unwrap().size_bytes,
            2 * G,
            "one billion parameters at F16"
        );

        let why = |md: &ModelDeployment, mns: &[Arc<ModelNode>]| {
            let u = resolve(md, mns).unwrap_err();
            (u.status, u.reason)
        };
        assert_eq!(why(&md, &[]), ("Unknown", reason::NO_AGENTS));
        let elsewhere = vec![Arc::new(model_node(
            "n1",
            "10.0.0.1",
            24,
            vec![local("other", G)],
        ))];
        assert_eq!(why(&md, &elsewhere), ("False", reason::MODEL_NOT_FOUND));
        // With a source, no copy yet means a download; its size is known once one is reported.
        let remote = deployment(
            "sd",
            "sd15",
            serde_json::json!({"model": {"path": "sd15", "source": {"url": "s3://models/sd15"}}}),
        );
        let r = resolve(&remote, &elsewhere).unwrap();
        assert_eq!((r.info, r.nodes.len()), (None, 0));
        assert_eq!(r.source.as_deref(), Some("s3://models/sd15"));
        let r = resolve(&remote, &mns).unwrap();
        assert_eq!(r.nodes, ["n1", "n2"], "reported copies are used first");
        assert!(r.info.is_some());
        let mut truncated = (*elsewhere[0]).clone();
        truncated.status.as_mut().unwrap().local_models_truncated = true;
        assert_eq!(
            why(&md, &[Arc::new(truncated)]),
            ("Unknown", reason::MODEL_NOT_REPORTED)
        );
        let diffusers = deployment(
            "sd",
            "sd15",
            serde_json::json!({"model": {"path": "sd15", "format": "Diffusers"}}),
        );
        assert_eq!(why(&diffusers, &mns), ("False", reason::FORMAT_MISMATCH));
        let mut lora = local("sd15", G);
        lora.model_type = ModelType::Lora;
        let l = vec![Arc::new(model_node("n1", "10.0.0.1", 24, vec![lora]))];
        assert_eq!(why(&md, &l), ("False", reason::NOT_A_MAIN_MODEL));
        let mut depth = local("sd15", G);
        depth.variant = Some(ModelVariant::Depth);
        let i = vec![Arc::new(model_node("n1", "10.0.0.1", 24, vec![depth]))];
        assert_eq!(why(&md, &i), ("False", reason::UNSUPPORTED_MODEL));
        let pinned = deployment(
            "sd",
            "sd15",
            serde_json::json!({"model": {"path": "sd15", "sha256": "aa".repeat(32)}}),
        );
        let mut copy = local("sd15", G);
        copy.sha256 = Some("bb".repeat(32));
        let wrong = vec![Arc::new(model_node("n1", "10.0.0.1", 24, vec![copy]))];
        let u = resolve(&pinned, &wrong).unwrap_err();
        assert_eq!(u.reason, reason::SHA256_MISMATCH);
        assert!(u.message.contains(&"bb".repeat(32)), "{}", u.message);
    }

    #[test]
    fn a_node_change_concerns_what_is_placed_there_and_what_is_not_done() {
        let placed = |name: &str, node: &str, ready: i32| {
            let mut md = deployment(name, "m", serde_json::json!({"replicas": 1}));
            md.status = Some(ModelDeploymentStatus {
                placements: vec![Placement {
                    node: node.into(),
                    role: PlacementRole::Serving,
                    phase: PlacementPhase::Ready,
                    tier: Tier::Ram,
                    message: None,
                    since: None,
                    download: None,
                }],
                ready_replicas: ready,
                ..Default::default()
            });
            Arc::new(md)
        };
        let deployments = vec![
            placed("here", "n1", 1),
            placed("elsewhere", "n2", 1),
            placed("waiting", "n2", 0),
            Arc::new(deployment("new", "m", serde_json::json!({}))),
        ];
        let names: Vec<String> = affected(&deployments, "n1")
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["here", "waiting", "new"]);
    }

    #[test]
    fn paths_are_normalized_as_agents_report_them() {
        assert_eq!(normalize("./sd15/"), "sd15");
        assert_eq!(
            normalize("sdxl/juggernaut.safetensors"),
            "sdxl/juggernaut.safetensors"
        );
        assert_eq!(key(&deployment("a", "m", serde_json::json!({}))), "ml/a");
    }
}
