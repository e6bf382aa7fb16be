//! `ModelNode`: what the agent on one Kubernetes node holds and can do. Written
//! by that agent (status only), read by the operator's scheduler.

use crate::types::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A ModelNode has no desired state: everything is reported in status by the node's agent.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "modelcache.io",
    version = "v1alpha1",
    kind = "ModelNode",
    doc = "What the modelcache agent on one Kubernetes node holds and can do; written by that agent. The name is the node's name.",
    status = "ModelNodeStatus",
    shortname = "mnode",
    category = "modelcache",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.agent.endpoint"
    ),
    printcolumn(
        name = "RAM-Used",
        type_ = "integer",
        format = "int64",
        json_path = ".status.cache.ramUsedBytes"
    ),
    printcolumn(
        name = "VRAM-Used",
        type_ = "integer",
        format = "int64",
        json_path = ".status.cache.vramUsedBytes"
    ),
    printcolumn(
        name = "Fragmentation",
        type_ = "number",
        json_path = ".status.memory.fragmentationRatio",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct ModelNodeSpec {}

/// Most entries an agent reports in `models` and `localModels`; longer lists are
/// cut and flagged, so a ModelNode stays far below etcd's object size limit.
pub const MAX_REPORTED_MODELS: usize = 512;

/// What the node's agent reports about itself.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelNodeStatus {
    /// The agent process that writes this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInfo>,

    /// Compute devices of the node (cpu, cuda:0, …) with their memory and cache budgets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceInfo>,

    /// Capacity, use and statistics of the agent's model cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStatus>,

    /// Models resident in the cache (at most 512; see modelsTruncated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ResidentModel>,

    /// True when `models` was cut to its maximum length.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub models_truncated: bool,

    /// The agent's view of every placement that names this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<NodePlacement>,

    /// Models found under the agent's model root, with probe results (at most 512; see
    /// localModelsTruncated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_models: Vec<LocalModel>,

    /// True when `localModels` was cut: a path missing from the list is then unknown, not absent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local_models_truncated: bool,

    /// Process memory and glibc allocator statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,

    /// Ready: the agent is running and its cache is usable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Identity of the agent process.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    /// Agent version.
    pub version: String,
    /// Name of the agent's pod.
    pub pod_name: String,
    /// `podIP:port` of the generation API.
    pub endpoint: String,
    /// `podIP:port` of the monitoring port: `/metrics`, and `/load` (requests in flight by
    /// deployment), which the operator's autoscaler reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_endpoint: Option<String>,
}

/// One compute device.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    /// `cpu`, `cuda:0`, `cuda:1`, …
    pub id: String,
    /// Product name.
    pub name: String,
    /// Total memory of the device in bytes.
    pub memory_bytes: i64,
    /// Free memory of the device in bytes, as last measured.
    pub free_bytes: i64,
    /// Bytes of this device the agent's cache may use.
    pub cache_budget_bytes: i64,
}

/// Capacity, use and statistics of the agent's cache.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatus {
    /// Budget of the RAM tier in bytes.
    pub ram_capacity_bytes: i64,
    /// Bytes held by the RAM tier.
    pub ram_used_bytes: i64,
    /// Budget of the VRAM tier in bytes (all devices).
    pub vram_capacity_bytes: i64,
    /// Bytes held by the VRAM tier.
    pub vram_used_bytes: i64,
    /// Requests served from the cache.
    pub hits: i64,
    /// Requests that needed a load.
    pub misses: i64,
    /// Models evicted to make room.
    pub evictions: i64,
    /// Moving average of disk → RAM load bandwidth, bytes per second.
    pub disk_read_bytes_per_second: i64,
    /// Moving average of RAM → device move bandwidth, bytes per second.
    pub ram_to_device_bytes_per_second: i64,
}

/// A model resident in the cache.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResidentModel {
    /// Path relative to the model root.
    pub path: String,
    /// Ram or Vram.
    pub tier: Tier,
    /// Bytes charged to the tier.
    pub size_bytes: i64,
    /// True while a request uses the model (it cannot be evicted).
    pub locked: bool,
    /// When a request last used the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<Time>,
}

/// Progress of a placement as the agent sees it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodePlacementPhase {
    /// The agent is downloading the model from `spec.model.source`.
    Downloading,
    /// The agent is loading the model.
    Loading,
    /// The model is resident and verified.
    Ready,
    /// Loading or verification failed; see the message.
    Failed,
}

/// The agent's view of one placement on its node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodePlacement {
    /// `namespace/name` of the ModelDeployment.
    pub deployment: String,
    /// Downloading, Loading, Ready or Failed.
    pub phase: NodePlacementPhase,
    /// Where the agent holds the model now.
    pub tier: Tier,
    /// Details, for example the error of a failed load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Bytes of the model on this node's disk so far, while it is Downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadProgress>,
}

/// How far a download has come.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DownloadProgress {
    /// Bytes on disk, those a resumed download already had included.
    pub bytes_done: i64,
    /// Bytes of every file of the model.
    pub bytes_total: i64,
}

/// A model found under the agent's model root.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalModel {
    /// Path relative to the model root.
    pub path: String,
    /// Kind of model.
    #[serde(rename = "type")]
    pub model_type: ModelType,
    /// Model family; absent for models that work with every base (CLIP Vision image
    /// encoders) or whose base their weights do not tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseModel>,
    /// UNet variant of a main model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<ModelVariant>,
    /// What the UNet predicts, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<PredictionType>,
    /// Checkpoint or Diffusers.
    pub format: ModelFormat,
    /// Bytes of the files on disk.
    pub file_bytes: i64,
    /// Number of tensors.
    pub tensor_count: i64,
    /// Number of weight elements: with a deployment's precision it gives the model's size in
    /// memory (the operator falls back to fileBytes when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter_count: Option<i64>,
    /// SHA-256 of the content, once computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Process memory and glibc allocator statistics.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemoryStatus {
    /// Resident set size of the agent process.
    pub resident_bytes: i64,
    /// Bytes in malloc's heap arenas (mallinfo2 arena).
    pub malloc_arena_bytes: i64,
    /// Bytes malloc holds in mmapped chunks (mallinfo2 hblkhd).
    pub malloc_mmap_bytes: i64,
    /// Free bytes malloc holds but does not return (mallinfo2 fordblks).
    pub malloc_free_bytes: i64,
    /// malloc's free bytes ÷ all bytes it holds; high values mean fragmentation.
    pub fragmentation_ratio: f64,
    /// M_MMAP_THRESHOLD in force; 0 when glibc's dynamic threshold is in effect.
    pub mmap_threshold_bytes: i64,
}
