//! Cluster mode (`serve --kubernetes`, ARCHITECTURE §3 and §4 `cluster`).
//!
//! The agent publishes its node's `ModelNode` status (on change, rate-limited,
//! never as a heartbeat), renews its liveness Lease, and follows the
//! ModelDeployments whose placements name its node: it verifies, converts and
//! warms each model at the deployment's `warmTier`, reports the placement's
//! phase, and serves Ready deployments by name through the API. Every loop
//! survives API errors with exponential backoff; nothing here panics because
//! the API server is away.

use crate::api::{AppState, Route};
use crate::cache::TierKind;
use crate::memory;
use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use modelcache_crds::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Least time between two searches of the models folder for a missing model.
const RESCAN_AFTER: Duration = Duration::from_secs(5);

/// Settings from the command line and the downward API.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    pub pod_name: String,
    pub pod_ip: String,
    /// Namespace of the Lease (the agent's own).
    pub namespace: String,
    pub api_port: u16,
    pub lease_renew: Duration,
    /// Lease duration written for the operator; 4× the renew period as kubelets do.
    pub lease_duration: Duration,
    /// Least time between two ModelNode status writes.
    pub report_interval: Duration,
}

/// What the agent should hold for one deployment placed on its node.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// `namespace/name`.
    pub key: String,
    pub path: String,
    pub sha256: Option<String>,
    pub warm: WarmTier,
    pub role: PlacementRole,
    pub precision: Precision,
    pub loras: Vec<LoraSpec>,
    pub defaults: GenerationDefaults,
}

/// The placements that name `node`, by deployment.
pub fn desired(node: &str, deployments: &[Arc<ModelDeployment>]) -> BTreeMap<String, Desired> {
    let mut out = BTreeMap::new();
    for md in deployments {
        if md.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(p) = md
            .status
            .as_ref()
            .and_then(|s| s.placements.iter().find(|p| p.node == node))
        else {
            continue;
        };
        let key = format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any());
        out.insert(
            key.clone(),
            Desired {
                key,
                path: md.spec.model.path.clone(),
                sha256: md.spec.model.sha256.clone(),
                warm: md.spec.warm_tier,
                role: p.role,
                precision: md.spec.precision,
                loras: md.spec.loras.clone(),
                defaults: md.spec.defaults.clone(),
            },
        );
    }
    out
}

/// One placement the agent works on.
#[derive(Debug, Clone)]
struct Tracked {
    want: Desired,
    report: NodePlacement,
    /// Catalog name, once the model was found.
    model: Option<String>,
    /// Bumped on every (re)start; a finishing worker with an older value is stale.
    attempt: u64,
    failures: u32,
    retry_at: Option<Instant>,
}

/// The cluster side of an agent.
pub struct ClusterAgent {
    pub state: Arc<AppState>,
    pub settings: Settings,
    tracked: Mutex<BTreeMap<String, Tracked>>,
    /// Hashes verified this run, by model path, for the ModelNode's localModels.
    hashes: Mutex<HashMap<String, String>>,
    changed: Notify,
    started: Timestamp,
    attempts: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Exponential backoff between retries of a failing API call.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Backoff { next: Self::MIN }
    }

    fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

impl ClusterAgent {
    pub fn new(state: Arc<AppState>, settings: Settings) -> Arc<Self> {
        state.set_routes(HashMap::new());
        Arc::new(ClusterAgent {
            state,
            settings,
            tracked: Mutex::default(),
            hashes: Mutex::default(),
            changed: Notify::new(),
            started: Timestamp::now(),
            attempts: Default::default(),
        })
    }

    /// Runs the Lease, the ModelNode reports and the placement follower until
    /// the process ends.
    pub async fn run(self: Arc<Self>, client: Client) {
        let events = watcher(
            Api::<ModelDeployment>::all(client.clone()),
            watcher::Config::default(),
        );
        tokio::join!(
            self.clone().renew_lease(client.clone()),
            self.clone().report(client),
            self.follow(events),
        );
    }

    /// Follows ModelDeployments (a watch stream, or a channel in tests) and the
    /// placements on this node. Retries failed placements on a timer.
    pub async fn follow(
        self: Arc<Self>,
        events: impl Stream<Item = Result<watcher::Event<ModelDeployment>, watcher::Error>> + Send,
    ) {
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(writer, events);
        futures::pin_mut!(stream);
        let mut retry = tokio::time::interval(Duration::from_secs(5));
        let mut backoff = Backoff::new();
        let mut listed = false;
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => {
                        backoff.reset();
                        listed |= matches!(ev, watcher::Event::InitDone);
                        // Before the first full list the store is partial: acting
                        // on it would drop placements that are merely unlisted.
                        if listed && !matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_)) {
                            self.sync(&reader);
                        }
                    }
                    Some(Err(e)) => {
                        let wait = backoff.failed();
                        tracing::warn!(error = %e, retry_in = ?wait, "watching ModelDeployments");
                        tokio::time::sleep(wait).await;
                    }
                    None => return,
                },
                _ = retry.tick() => if listed { self.sync(&reader) },
            }
        }
    }

    /// Starts work for new, changed and retry-due placements; releases removed ones.
    pub fn sync(self: &Arc<Self>, deployments: &Store<ModelDeployment>) {
        let want = desired(&self.settings.node_name, &deployments.state());
        let now = Instant::now();
        let mut start = Vec::new();
        let mut released = Vec::new();
        {
            let mut tracked = lock(&self.tracked);
            tracked.retain(|k, t| {
                let keep = want.contains_key(k);
                if !keep {
                    released.push(t.clone());
                }
                keep
            });
            if !released.is_empty() {
                // Room was freed: placements that failed for want of it try again now.
                for t in tracked.values_mut() {
                    if t.report.phase == NodePlacementPhase::Failed {
                        t.retry_at = Some(now);
                    }
                }
            }
            for (k, d) in &want {
                let due = match tracked.get(k) {
                    None => true,
                    Some(t) if t.want != *d => {
                        if t.want.warm != d.warm {
                            // Re-warmed at the new tier; the old pins go.
                            released.push(t.clone());
                        }
                        true
                    }
                    Some(t) => {
                        t.report.phase == NodePlacementPhase::Failed
                            && t.retry_at.is_some_and(|r| r <= now)
                    }
                };
                if !due {
                    continue;
                }
                let attempt = self
                    .attempts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                let failures = tracked.get(k).map_or(0, |t| t.failures);
                tracked.insert(
                    k.clone(),
                    Tracked {
                        want: d.clone(),
                        report: NodePlacement {
                            deployment: k.clone(),
                            phase: NodePlacementPhase::Loading,
                            tier: Tier::Disk,
                            message: None,
                        },
                        model: None,
                        attempt,
                        failures,
                        retry_at: None,
                    },
                );
                start.push((d.clone(), attempt));
            }
        }
        let any = !start.is_empty() || !released.is_empty();
        for t in released {
            tracing::info!(deployment = %t.want.key, "placement removed from this node");
            self.release(&t);
        }
        for (d, attempt) in start {
            let agent = self.clone();
            tokio::spawn(async move {
                let state = agent.state.clone();
                let want = d.clone();
                let result = tokio::task::spawn_blocking(move || prepare(&state, &want))
                    .await
                    .unwrap_or_else(|e| Err(format!("preparing the model failed: {e}")));
                agent.finish(&d.key, attempt, result);
            });
        }
        if any {
            self.publish_routes();
            self.changed.notify_one();
        }
    }

    fn finish(&self, key: &str, attempt: u64, result: Result<Prepared, String>) {
        {
            let mut tracked = lock(&self.tracked);
            let Some(t) = tracked.get_mut(key).filter(|t| t.attempt == attempt) else {
                return;
            };
            match result {
                Ok(p) => {
                    tracing::info!(deployment = key, tier = %p.tier, "placement ready");
                    if let Some(h) = &p.sha256 {
                        lock(&self.hashes).insert(t.want.path.clone(), h.clone());
                    }
                    t.report.phase = NodePlacementPhase::Ready;
                    t.report.tier = p.tier;
                    t.report.message = p.message;
                    t.model = Some(p.model);
                    t.failures = 0;
                }
                Err(message) => {
                    t.failures += 1;
                    let wait = Duration::from_secs(10u64 << t.failures.min(5))
                        .min(Duration::from_secs(300));
                    tracing::warn!(deployment = key, %message, retry_in = ?wait, "placement failed");
                    t.report.phase = NodePlacementPhase::Failed;
                    t.report.message = Some(message);
                    t.retry_at = Some(Instant::now() + wait);
                }
            }
        }
        self.publish_routes();
        self.changed.notify_one();
    }

    /// Unpins the models of a removed placement unless another placement keeps them warm.
    fn release(&self, gone: &Tracked) {
        let Some(model) = &gone.model else { return };
        let still_warm = lock(&self.tracked)
            .values()
            .any(|t| t.model.as_ref() == Some(model) && t.want.warm != WarmTier::None);
        if still_warm {
            return;
        }
        if let Some(m) = self.state.catalog.opened(model) {
            for c in m.components() {
                // Evictable again; LRU decides when the bytes go.
                let key = m.component(c);
                self.state.cache.unpin(&key, TierKind::Ram);
                self.state.cache.unpin(&key, TierKind::Device);
            }
        }
    }

    /// Serves the deployments whose placement here is Ready.
    fn publish_routes(&self) {
        let routes = lock(&self.tracked)
            .values()
            .filter(|t| t.report.phase == NodePlacementPhase::Ready)
            .filter_map(|t| {
                Some((
                    t.want.key.clone(),
                    Route {
                        deployment: t.want.key.clone(),
                        model: t.model.clone()?,
                        loras: t.want.loras.clone(),
                        defaults: t.want.defaults.clone(),
                    },
                ))
            })
            .collect();
        self.state.set_routes(routes);
    }

    /// The agent's view of its placements.
    pub fn placements(&self) -> Vec<NodePlacement> {
        lock(&self.tracked)
            .values()
            .map(|t| t.report.clone())
            .collect()
    }

    /// The ModelNode status this agent reports now.
    pub fn status(&self) -> ModelNodeStatus {
        let s = &self.state;
        let (ram, dev) = s.cache.stats();
        let cfg = s.cache.config();
        let endpoint = match self.settings.pod_ip.parse::<std::net::IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, self.settings.api_port).to_string(),
            Err(_) => format!("{}:{}", self.settings.pod_ip, self.settings.api_port),
        };
        let now = Timestamp::now();
        let entries = s.cache.entries();
        let mut models: Vec<ResidentModel> = Vec::new();
        for (model, rel) in s
            .catalog
            .found()
            .into_iter()
            .filter_map(|e| s.catalog.opened(&e.name).map(|m| (m, e.rel_path.clone())))
        {
            let keys: Vec<String> = model
                .components()
                .iter()
                .map(|c| model.component(c))
                .collect();
            for tier in [TierKind::Device, TierKind::Ram] {
                let here: Vec<_> = entries
                    .iter()
                    .filter(|e| e.tier == tier && !e.loading && keys.contains(&e.key))
                    .collect();
                if !here.iter().any(|e| e.key.ends_with("unet")) {
                    continue;
                }
                let idle = here.iter().map(|e| e.idle).min().unwrap_or_default();
                models.push(ResidentModel {
                    path: rel.clone(),
                    tier: match tier {
                        TierKind::Device => Tier::Vram,
                        TierKind::Ram => Tier::Ram,
                    },
                    size_bytes: here.iter().map(|e| e.bytes as i64).sum(),
                    locked: here.iter().any(|e| e.locked),
                    last_used: SignedDuration::try_from(idle)
                        .ok()
                        .and_then(|d| now.checked_sub(d).ok())
                        .map(Time),
                });
            }
        }
        let models_truncated = models.len() > MAX_REPORTED_MODELS;
        models.truncate(MAX_REPORTED_MODELS);
        let hashes = lock(&self.hashes).clone();
        let mut local: Vec<LocalModel> = s
            .catalog
            .found()
            .into_iter()
            .filter_map(|e| {
                Some(LocalModel {
                    path: e.rel_path.clone(),
                    model_type: e.probe.model_type,
                    base: e.probe.base?,
                    variant: e.probe.variant,
                    prediction_type: e.probe.prediction_type,
                    format: e.probe.format,
                    file_bytes: e.probe.file_bytes as i64,
                    tensor_count: e.probe.tensor_count as i64,
                    parameter_count: Some((e.probe.size_bytes.f32 / 4) as i64),
                    sha256: hashes.get(&e.rel_path).cloned(),
                })
            })
            .collect();
        let local_truncated = local.len() > MAX_REPORTED_MODELS;
        local.truncate(MAX_REPORTED_MODELS);
        let mi = memory::mallinfo2();
        ModelNodeStatus {
            agent: Some(AgentInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                pod_name: self.settings.pod_name.clone(),
                endpoint,
            }),
            devices: cfg
                .devices
                .iter()
                .map(|slot| {
                    let (free, total) = crate::device::memory_or_host(&slot.device);
                    DeviceInfo {
                        id: crate::device::id(&slot.device),
                        name: crate::device::name(&slot.device),
                        memory_bytes: total as i64,
                        free_bytes: free as i64,
                        cache_budget_bytes: slot.budget as i64,
                    }
                })
                .collect(),
            cache: Some(CacheStatus {
                ram_capacity_bytes: ram.budget as i64,
                ram_used_bytes: ram.used as i64,
                vram_capacity_bytes: dev.budget as i64,
                vram_used_bytes: dev.used as i64,
                hits: (ram.hits + dev.hits) as i64,
                misses: (ram.misses + dev.misses) as i64,
                evictions: (ram.evictions + dev.evictions) as i64,
                disk_read_bytes_per_second: ram.bandwidth as i64,
                // Until a move has been measured, the slowest GPU's PCIe link.
                ram_to_device_bytes_per_second: if dev.bandwidth > 0.0 {
                    dev.bandwidth as i64
                } else {
                    cfg.devices
                        .iter()
                        .filter_map(|d| crate::device::pcie_bandwidth(&d.device))
                        .map(|b| b as i64)
                        .min()
                        .unwrap_or(0)
                },
            }),
            models,
            models_truncated,
            placements: self.placements(),
            local_models: local,
            local_models_truncated: local_truncated,
            memory: Some(MemoryStatus {
                resident_bytes: memory::resident_bytes() as i64,
                malloc_arena_bytes: mi.map_or(0, |m| m.arena as i64),
                malloc_mmap_bytes: mi.map_or(0, |m| m.hblkhd as i64),
                malloc_free_bytes: mi.map_or(0, |m| m.fordblks as i64),
                fragmentation_ratio: mi.map_or(0.0, |m| m.fragmentation_ratio()),
                mmap_threshold_bytes: memory::mmap_threshold() as i64,
            }),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "AgentServing".into(),
                message: format!(
                    "{} model(s) found under the model root; {} placement(s) on this node",
                    s.catalog.found().len(),
                    lock(&self.tracked).len()
                ),
                observed_generation: None,
                last_transition_time: Time(self.started),
            }],
        }
    }

    /// Writes the ModelNode status when something meaningful changed, at most
    /// once per `report_interval`.
    pub async fn report(self: Arc<Self>, client: Client) {
        let api: Api<ModelNode> = Api::all(client);
        let node = self.settings.node_name.clone();
        let pp = PatchParams::apply(AGENT_MANAGER).force();
        let mut created = false;
        let mut last: Option<ModelNodeStatus> = None;
        let mut backoff = Backoff::new();
        loop {
            let status = self.status();
            let fingerprint = significant(&status);
            if last.as_ref() != Some(&fingerprint) {
                let result = async {
                    if !created {
                        // Server-side apply creates the object; its spec is empty.
                        let obj = serde_json::json!({
                            "apiVersion": ModelNode::api_version(&()), "kind": "ModelNode",
                            "metadata": {"name": node}, "spec": {},
                        });
                        api.patch(&node, &pp, &Patch::Apply(obj)).await?;
                        created = true;
                    }
                    let patch = serde_json::json!({
                        "apiVersion": ModelNode::api_version(&()), "kind": "ModelNode",
                        "status": status,
                    });
                    api.patch_status(&node, &pp, &Patch::Apply(patch)).await
                }
                .await;
                match result {
                    Ok(_) => {
                        last = Some(fingerprint);
                        backoff.reset();
                    }
                    Err(e) => {
                        if matches!(&e, kube::Error::Api(s) if s.code == 404) {
                            created = false;
                        }
                        let wait = backoff.failed();
                        tracing::warn!(error = %e, retry_in = ?wait, "writing ModelNode status");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            // Rate limit, then wait for a change (or re-check what the cache did).
            tokio::time::sleep(self.settings.report_interval).await;
            let _ = tokio::time::timeout(Duration::from_secs(10), self.changed.notified()).await;
        }
    }

    /// Renews `modelcache-node-<node>` every `lease_renew`, as kubelets do.
    pub async fn renew_lease(self: Arc<Self>, client: Client) {
        let name = node_lease_name(&self.settings.node_name);
        let api: Api<Lease> = Api::namespaced(client, &self.settings.namespace);
        let pp = PatchParams::apply(AGENT_MANAGER).force();
        let mut backoff = Backoff::new();
        loop {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    labels: Some(
                        [(MANAGED_BY_LABEL.to_string(), AGENT_MANAGER.to_string())].into(),
                    ),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.settings.pod_name.clone()),
                    lease_duration_seconds: Some(
                        self.settings.lease_duration.as_secs().max(1) as i32
                    ),
                    renew_time: Some(MicroTime(Timestamp::now())),
                    ..Default::default()
                }),
            };
            match api.patch(&name, &pp, &Patch::Apply(&lease)).await {
                Ok(_) => {
                    backoff.reset();
                    tokio::time::sleep(self.settings.lease_renew).await;
                }
                Err(e) => {
                    // Retry sooner than the period, but never hammer the API server.
                    let wait = backoff.failed().min(self.settings.lease_renew);
                    tracing::warn!(error = %e, retry_in = ?wait, "renewing the node Lease");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// The status without what changes all the time (memory to the last 256 MiB and
/// 0.05 of fragmentation, free device memory, last-use times), so that reports
/// are written on change and not as a heartbeat.
fn significant(s: &ModelNodeStatus) -> ModelNodeStatus {
    let mut s = s.clone();
    for d in &mut s.devices {
        d.free_bytes = 0;
    }
    for m in &mut s.models {
        m.last_used = None;
    }
    if let Some(m) = s.memory.as_mut() {
        let q = |v: i64| v >> 28;
        m.resident_bytes = q(m.resident_bytes);
        m.malloc_arena_bytes = q(m.malloc_arena_bytes);
        m.malloc_mmap_bytes = q(m.malloc_mmap_bytes);
        m.malloc_free_bytes = q(m.malloc_free_bytes);
        m.fragmentation_ratio = (m.fragmentation_ratio * 20.0).round();
    }
    s
}

/// What preparing a placement produced.
struct Prepared {
    model: String,
    tier: Tier,
    sha256: Option<String>,
    message: Option<String>,
}

/// Finds, verifies, opens (converting a checkpoint once) and warms a placement's
/// model. Blocking: runs on the blocking pool.
fn prepare(state: &AppState, d: &Desired) -> Result<Prepared, String> {
    let catalog = &state.catalog;
    let entry = match catalog.by_path(&d.path) {
        Some(e) => e,
        None => {
            // It may have been copied in since the last search.
            catalog.rescan_if_older(RESCAN_AFTER);
            catalog.by_path(&d.path).ok_or_else(|| {
                format!(
                    "model path {:?} is not under this agent's models folder {} (searched again; it is retried)",
                    d.path,
                    catalog.root().display()
                )
            })?
        }
    };
    if !entry.servable() {
        return Err(format!(
            "{:?} is a {} model, not a text-to-image base model",
            d.path, entry.probe.model_type
        ));
    }
    let mut sha256 = None;
    if let Some(want) = &d.sha256 {
        let have = crate::store::identity::sha256(&entry.path, Some(catalog.state_dir()))
            .map_err(|e| format!("hashing {:?}: {e}", d.path))?;
        if !have.eq_ignore_ascii_case(want) {
            return Err(format!(
                "sha256 mismatch: spec.model.sha256 is {want} but the files on this node hash to {have}"
            ));
        }
        sha256 = Some(have);
    }
    let model = catalog.open(&entry.name).map_err(|e| e.to_string())?;
    let tier = match d.warm {
        WarmTier::None => None,
        WarmTier::Ram => Some(TierKind::Ram),
        WarmTier::Vram => Some(TierKind::Device),
    };
    if let Some(t) = tier {
        for c in model.components() {
            state
                .cache
                .warm(&model.component(c), t)
                .map_err(|e| e.to_string())?;
        }
    }
    let cfg = state.cache.config();
    let message = (cfg.devices.iter().all(|s| s.device.is_cpu()) && d.precision != Precision::F32)
        .then(|| {
            format!(
                "computing in F32 on the CPU (spec.precision {} applies on GPUs)",
                d.precision
            )
        });
    Ok(Prepared {
        model: entry.name.clone(),
        tier: match tier {
            None => Tier::Disk,
            Some(TierKind::Ram) => Tier::Ram,
            Some(TierKind::Device) => Tier::Vram,
        },
        sha256,
        message,
    })
}
