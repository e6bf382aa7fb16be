//! `ModelDeployment`: which model to serve, how many replicas, at what
//! precision, with which adapters, and how warm to keep it.

use crate::types::*;
use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Desired state of a ModelDeployment.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "modelcache.io",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    doc = "A model served on the cluster's GPU nodes: which weights, how many replicas, at what precision, with which LoRA adapters and how warm to keep them.",
    status = "ModelDeploymentStatus",
    shortname = "mdep",
    category = "modelcache",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready"),
    printcolumn(name = "Base", type_ = "string", json_path = ".status.model.base"),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.size"),
    printcolumn(name = "Warm", type_ = "string", json_path = ".spec.warmTier"),
    printcolumn(name = "Nodes", type_ = "string", json_path = ".status.nodes"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    validation = Rule::new("self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label (at most 63 characters: lowercase letters, digits and '-', starting with a letter and ending with a letter or digit), because it also names the model's Service")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The model to serve: where its weights are on the agents' model root and how to read them.
    pub model: ModelSource,

    /// Number of serving replicas: nodes that hold the model ready and receive traffic. 0 stops
    /// serving; with a warmTier other than None the model is still kept warm where there is room.
    /// Works with `kubectl scale` and HorizontalPodAutoscalers through the scale subresource.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Precision of the weights on the compute device: F16 (default), BF16 or F32. Agents
    /// without a GPU always compute in F32.
    #[serde(default)]
    pub precision: Precision,

    /// What the assigned nodes keep the model in while it is idle: None (load on demand, may
    /// be evicted), Ram or Vram. Warm copies count against the node's cache capacity.
    #[serde(default)]
    pub warm_tier: WarmTier,

    /// Scheduling priority. When capacity is short, a higher-priority deployment may preempt
    /// the warm reservations of lower-priority ones. Default 0.
    #[serde(default)]
    pub priority: i32,

    /// LoRA adapters applied to every request by default (requests can add their own). At most 16.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub loras: Vec<LoraSpec>,

    /// A VAE used in place of the model's own: a VAE file (`.safetensors`, converted once) or
    /// diffusers VAE folder, relative to the agents' models folder. Requests may name another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("!self.startsWith('/')").message("vae must be relative to the agents' model root, not absolute"))]
    #[x_kube(validation = Rule::new("!self.matches('(^|/)[.][.](/|$)')").message("vae must not contain '..' segments"))]
    pub vae: Option<String>,

    /// An SDXL refiner that finishes every image of an SDXL model: a refiner folder or
    /// single-file checkpoint relative to the agents' models folder. The model denoises the
    /// first `defaults.denoisingEnd` (0.8) of the schedule and the refiner the rest. It is
    /// placed, warmed and sized with the model; requests may name another or set
    /// `denoising_end` 1 to skip it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("!self.startsWith('/')").message("refiner must be relative to the agents' model root, not absolute"))]
    #[x_kube(validation = Rule::new("!self.matches('(^|/)[.][.](/|$)')").message("refiner must not contain '..' segments"))]
    pub refiner: Option<String>,

    /// ControlNets and T2I-Adapters (folders, or single-file ControlNets) relative to the
    /// agents' models folder, of the model's base. They are placed, warmed and sized with the
    /// model, so that requests naming them in `controlnet` find them loaded; requests may name
    /// others. At most 4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[x_kube(validation = Rule::new("self.all(p, !p.startsWith('/') && !p.matches('(^|/)[.][.](/|$)'))").message("controlnets must be relative to the agents' model root, without '..' segments"))]
    pub controlnets: Vec<String>,

    /// An IP-Adapter placed, warmed and sized with the model for requests' `ip_adapter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_adapter: Option<IpAdapterSpec>,

    /// Which nodes may serve the model and how replicas are spread over them.
    #[serde(default)]
    pub placement: PlacementSpec,

    /// Generation parameters used when a request does not set them.
    #[serde(default)]
    pub defaults: GenerationDefaults,

    /// Replicas set from load: the operator raises `replicas` when requests in flight and
    /// queued per replica exceed `targetInFlight`, and lowers it after `scaleDownDelaySeconds`
    /// of less load; the gateway scales a deployment at zero up on its first request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// How the operator sets `replicas` from load.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Whether the operator sets `replicas` (and the gateway scales up from zero). Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Fewest replicas, 0 to 1000. 0 lets an idle deployment scale to zero; its next request
    /// waits at the gateway while a replica loads. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,

    /// Most replicas, 1 to 1000. Default 3.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,

    /// Requests in flight or queued per replica the autoscaler aims at, 1 to 1000. An agent
    /// runs one generation at a time by default, so 2 means one running and one waiting.
    /// Default 2.
    #[serde(default = "default_target_in_flight")]
    #[schemars(range(min = 1, max = 1000))]
    pub target_in_flight: i32,

    /// Seconds the load must have stayed lower before replicas are removed, 0 to 86400.
    /// Scaling up is immediate. Default 300.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_delay_seconds: i32,
}

fn default_true() -> bool {
    true
}

fn default_max_replicas() -> i32 {
    3
}

fn default_target_in_flight() -> i32 {
    2
}

fn default_scale_down_delay() -> i32 {
    300
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        AutoscalingSpec {
            enabled: true,
            min_replicas: 0,
            max_replicas: default_max_replicas(),
            target_in_flight: default_target_in_flight(),
            scale_down_delay_seconds: default_scale_down_delay(),
        }
    }
}

impl ModelDeploymentSpec {
    /// The autoscaling settings when autoscaling is on.
    pub fn autoscaling(&self) -> Option<&AutoscalingSpec> {
        self.autoscaling.as_ref().filter(|a| a.enabled)
    }
}

fn default_replicas() -> i32 {
    1
}

/// Where a model's weights are and how they are laid out.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// File or diffusers folder, relative to the agents' model root (`--models-dir`), for
    /// example `sdxl/juggernaut.safetensors` or `sd15/dreamshaper`. Absolute paths and `..`
    /// segments are refused.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/')").message("model.path must be relative to the agents' model root, not absolute"))]
    #[x_kube(validation = Rule::new("!self.matches('(^|/)[.][.](/|$)')").message("model.path must not contain '..' segments"))]
    pub path: String,

    /// Optional SHA-256 of the model's content (64 lowercase hex digits). When set, an agent
    /// verifies it before its copy becomes Ready; a mismatch fails the placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,

    /// Layout of the files: Auto (decide from the files, default), Checkpoint (one file in the
    /// original layout) or Diffusers (a diffusers folder).
    #[serde(default)]
    pub format: FormatHint,

    /// Where to download the model from when no node has it at `path` (optional). The
    /// download lands in an agent's disk cache under the same `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RemoteSource>,
}

/// A remote copy of a model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemoteSource {
    /// `s3://bucket/prefix` (a folder, or one object), `hf://org/repo[@revision][/subfolder]`
    /// (a Hugging Face repository, default revision `main`) or `https://host/path/file` (one
    /// file).
    #[schemars(length(min = 6, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9][A-Za-z0-9._-]*)?(/.*)?|https?://[^/?#]+/[^?#]*[^/?#]([?#].*)?)$')").message("model.source.url must be s3://bucket/prefix, hf://org/repo[@revision][/subfolder] or https://host/path/file"))]
    #[x_kube(validation = Rule::new("!self.matches('/[.][.]?(/|$)')").message("model.source.url must not contain '.' or '..' segments"))]
    pub url: String,

    /// An S3-compatible endpoint (MinIO, SeaweedFS, R2…; default AWS), or a Hugging Face hub
    /// (default `https://huggingface.co`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), pattern(r"^https?://[^/?#]+"))]
    pub endpoint: Option<String>,

    /// The S3 region (default: the agent's `AWS_REGION`, else `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,

    /// A Secret in the agents' namespace, labelled `modelcache.io/source-credentials: "true"`,
    /// with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, or `HF_TOKEN`. Without one the
    /// agents' own environment applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
}

impl RemoteSource {
    /// The URL parsed; the agent and the operator refuse what does not parse.
    pub fn parsed(&self) -> Result<crate::Source, crate::SourceError> {
        self.url.parse()
    }
}

/// An IP-Adapter file and its image encoder.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IpAdapterSpec {
    /// The IP-Adapter file, relative to the agents' model root.
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("!self.startsWith('/')").message("ipAdapter.path must be relative to the agents' model root, not absolute"))]
    #[x_kube(validation = Rule::new("!self.matches('(^|/)[.][.](/|$)')").message("ipAdapter.path must not contain '..' segments"))]
    pub path: String,

    /// Its CLIP Vision image encoder folder, relative to the agents' model root. Default: the
    /// `image_encoder` folder beside the file (name it for an IP-Adapter folder in InvokeAI's
    /// layout, whose `image_encoder.txt` only the agents read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("!self.startsWith('/')").message("ipAdapter.imageEncoder must be relative to the agents' model root, not absolute"))]
    #[x_kube(validation = Rule::new("!self.matches('(^|/)[.][.](/|$)')").message("ipAdapter.imageEncoder must not contain '..' segments"))]
    pub image_encoder: Option<String>,
}

/// A LoRA adapter and the weight it is applied with.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoraSpec {
    /// Adapter file, relative to the agents' model root; absolute paths and `..` are refused.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/')").message("lora path must be relative to the agents' model root, not absolute"))]
    #[x_kube(validation = Rule::new("!self.matches('(^|/)[.][.](/|$)')").message("lora path must not contain '..' segments"))]
    pub path: String,

    /// Multiplier of the adapter's delta, from -4 to 4. Default 1.
    #[serde(default = "default_lora_weight")]
    #[schemars(range(min = -4.0, max = 4.0))]
    pub weight: f64,
}

fn default_lora_weight() -> f64 {
    1.0
}

/// Constraints on where replicas go.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Only nodes whose labels include all of these are eligible.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints (NoSchedule, NoExecute) of a node are ignored when a toleration here matches them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Most serving replicas on one node. Default 1.
    #[serde(default = "default_max_per_node")]
    #[schemars(range(min = 1))]
    pub max_replicas_per_node: i32,

    /// Node label whose values replicas are spread over, for example
    /// `topology.kubernetes.io/zone`. Unset: no spreading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 316))]
    pub spread_topology_key: Option<String>,
}

fn default_max_per_node() -> i32 {
    1
}

impl Default for PlacementSpec {
    fn default() -> Self {
        PlacementSpec {
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            max_replicas_per_node: default_max_per_node(),
            spread_topology_key: None,
        }
    }
}

/// Generation parameters used when a request leaves them out.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GenerationDefaults {
    /// Denoising steps, 1 to 150.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 150))]
    pub steps: Option<i32>,

    /// Classifier-free guidance scale, 0 to 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 30.0))]
    pub guidance_scale: Option<f64>,

    /// Image width in pixels: a multiple of 8 from 64 to 2048.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64, max = 2048), extend("multipleOf" = 8))]
    pub width: Option<i32>,

    /// Image height in pixels: a multiple of 8 from 64 to 2048.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64, max = 2048), extend("multipleOf" = 8))]
    pub height: Option<i32>,

    /// Denoising scheduler; without one, the model's own (its scheduler_config.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerKind>,

    /// With a refiner: the share of the schedule the model denoises before the refiner
    /// takes over, above 0 and at most 1 (1: the refiner is not used). Default 0.8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    #[x_kube(validation = Rule::new("self > 0.0").message("defaults.denoisingEnd must be above 0"))]
    pub denoising_end: Option<f64>,

    /// Negative prompt used when a request has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub negative_prompt: Option<String>,
}

/// Observed state of a ModelDeployment, written by the operator only.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Resolved (the model was found and probed), Scheduled, Available (at least one replica
    /// ready) and Progressing, each with a reason and a message that says what to do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// What the model is, as probed from its files on an agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelInfo>,

    /// Nodes chosen for the model: Serving copies count as replicas and receive traffic; Warm
    /// copies only keep the model resident.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<Placement>,

    /// Number of Serving placements.
    #[serde(default)]
    pub replicas: i32,

    /// Number of Serving placements that are Ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// `<readyReplicas>/<replicas>`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// Label selector of the serving copies, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Name of the Service that routes to the ready serving copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,

    /// Every placement's node, comma-separated, for `kubectl get` (a printer
    /// column shows only the first match of a JSONPath list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<String>,

    /// `model.sizeBytes` for a person (`1.9Gi`, `15.0Mi`), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
}

/// Probe result of a model's files.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    /// Kind of model: Main, Vae, Lora, ControlNet, Embedding, IpAdapter, ClipVision or T2iAdapter.
    #[serde(rename = "type")]
    pub model_type: ModelType,
    /// Model family: Sd1, Sd2, Sdxl or SdxlRefiner.
    pub base: BaseModel,
    /// UNet variant of a main model: Normal, Inpaint or Depth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<ModelVariant>,
    /// Layout on disk: Checkpoint or Diffusers.
    pub format: ModelFormat,
    /// What the UNet predicts: Epsilon, VPrediction or Sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<PredictionType>,
    /// Bytes the weights take on a GPU at the deployment's precision, its refiner and VAE
    /// override included: what a node's device tier is charged.
    pub size_bytes: i64,
    /// The same on agents without a GPU, which compute in F32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_size_bytes: Option<i64>,
    /// Bytes of the weights' files: what a node's RAM tier holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_size_bytes: Option<i64>,
    /// Number of tensors in the weights.
    pub tensor_count: i64,
}

/// Role of a placement.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlacementRole {
    /// Counts as a replica and receives traffic.
    Serving,
    /// Only keeps the model resident; never routed to.
    Warm,
}

/// Progress of a placement.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlacementPhase {
    /// Chosen by the operator; the agent has not reported it yet.
    Assigned,
    /// The agent is downloading the model from `spec.model.source`.
    Downloading,
    /// The agent is loading the model.
    Loading,
    /// The model is resident and verified.
    Ready,
    /// The agent could not load or verify the model; see the message.
    Failed,
}

/// One node chosen for a ModelDeployment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Kubernetes node name.
    pub node: String,
    /// Serving (a replica that receives traffic) or Warm (kept resident only).
    pub role: PlacementRole,
    /// Assigned, Downloading, Loading, Ready or Failed.
    pub phase: PlacementPhase,
    /// Where the node holds the model now: Disk, Ram or Vram.
    pub tier: Tier,
    /// Why the placement is in its phase, when there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The agent's download progress, while the placement is Downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<crate::DownloadProgress>,
    /// When the placement entered its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}
