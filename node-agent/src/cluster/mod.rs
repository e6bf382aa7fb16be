//! Cluster mode (`serve --kubernetes`).
//!
//! The agent publishes its node's `ModelNode` status (on change, rate-limited,
//! never as a heartbeat), renews its liveness Lease, and follows the
//! ModelDeployments whose placements name its node: it verifies, converts and
//! warms each model at the deployment's `warmTier` ([`placement`]), reports
//! the placement's phase ([`status`]), and serves Ready deployments by name
//! through the API's [`Routes`]. Every loop survives API errors with
//! exponential backoff; nothing here panics because the API server is away.

pub mod credentials;
pub mod neighbours;
pub mod placement;
pub mod status;

pub use placement::{desired, Desired};

use crate::agent::Agent;
use crate::cache::{CacheKey, TierKind};
use crate::fetch::peer::Peer;
use crate::routes::{Route, Routes};
use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use modelcache_crds::*;
use placement::{PlacementError, Prepared};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Settings from the command line and the downward API.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    pub pod_name: String,
    pub pod_ip: String,
    /// Namespace of the Lease (the agent's own).
    pub namespace: String,
    pub api_port: u16,
    /// Port of `/metrics` and `/load`, reported for the operator's autoscaler.
    pub metrics_port: u16,
    pub lease_renew: Duration,
    /// Lease duration written for the operator; 4× the renew period as kubelets do.
    pub lease_duration: Duration,
    /// Least time between two ModelNode status writes.
    pub report_interval: Duration,
}

/// One placement the agent works on.
#[derive(Debug, Clone)]
struct Tracked {
    want: Desired,
    report: NodePlacement,
    /// Catalog name, once the model was found.
    model: Option<String>,
    /// The cache entries it warmed (see [`Prepared::keys`]).
    keys: Vec<CacheKey>,
    /// Bumped on every (re)start; a finishing worker with an older value is stale.
    attempt: u64,
    failures: u32,
    retry_at: Option<Instant>,
}

/// The cluster side of an agent.
pub struct ClusterAgent {
    pub agent: Arc<Agent>,
    routes: Arc<Routes>,
    pub settings: Settings,
    tracked: Mutex<BTreeMap<String, Tracked>>,
    /// Hashes verified this run, by model path, for the ModelNode's localModels.
    hashes: Mutex<HashMap<String, String>>,
    changed: Notify,
    started: Timestamp,
    attempts: std::sync::atomic::AtomicU64,
    /// The API client, once [`ClusterAgent::run`] has one: credentials
    /// Secrets are read through it.
    client: std::sync::OnceLock<Client>,
    /// The ModelNodes (from [`ClusterAgent::run`]'s watch): which neighbours
    /// have a model this node needs.
    model_nodes: std::sync::OnceLock<Store<ModelNode>>,
    /// The ModelDeployments [`ClusterAgent::follow`] reads.
    deployments: std::sync::OnceLock<Store<ModelDeployment>>,
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
    /// The cluster side of `agent`, which serves only its Ready placements
    /// through `routes` from now on.
    pub fn new(agent: Arc<Agent>, routes: Arc<Routes>, settings: Settings) -> Arc<Self> {
        routes.set(HashMap::new());
        Arc::new(ClusterAgent {
            agent,
            routes,
            settings,
            tracked: Mutex::default(),
            hashes: Mutex::default(),
            changed: Notify::new(),
            started: Timestamp::now(),
            attempts: Default::default(),
            client: std::sync::OnceLock::new(),
            model_nodes: std::sync::OnceLock::new(),
            deployments: std::sync::OnceLock::new(),
        })
    }

    /// Runs the Lease, the ModelNode reports and the placement follower until
    /// the process ends.
    pub async fn run(self: Arc<Self>, client: Client) {
        self.use_client(client.clone());
        let events = watcher(
            Api::<ModelDeployment>::all(client.clone()),
            watcher::Config::default(),
        );
        let (nodes, writer) = reflector::store();
        let _ = self.model_nodes.set(nodes);
        let node_events = reflector::reflector(
            writer,
            watcher(
                Api::<ModelNode>::all(client.clone()),
                watcher::Config::default(),
            ),
        );
        let watch_nodes = async {
            let mut backoff = Backoff::new();
            futures::pin_mut!(node_events);
            while let Some(ev) = node_events.next().await {
                match ev {
                    Ok(_) => backoff.reset(),
                    Err(e) => {
                        let wait = backoff.failed();
                        tracing::warn!(error = %e, retry_in = ?wait, "watching ModelNodes");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        };
        tokio::join!(
            self.clone().renew_lease(client.clone()),
            self.clone().report(client),
            self.follow(events),
            watch_nodes,
        );
    }

    /// Reads credentials Secrets through `client` (set by [`Self::run`]; the
    /// first one given stays).
    pub fn use_client(&self, client: Client) {
        let _ = self.client.set(client);
    }

    /// Follows ModelDeployments (a watch stream, or a channel in tests) and the
    /// placements on this node. Retries failed placements on a timer.
    pub async fn follow(
        self: Arc<Self>,
        events: impl Stream<Item = Result<watcher::Event<ModelDeployment>, watcher::Error>> + Send,
    ) {
        let (reader, writer) = reflector::store();
        let _ = self.deployments.set(reader.clone());
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
                            download: None,
                        },
                        model: None,
                        keys: Vec::new(),
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
                if let Err(e) = agent.download_if_missing(&d, attempt).await {
                    agent.finish(&d.key, attempt, Err(e));
                    return;
                }
                let core = agent.agent.clone();
                let want = d.clone();
                let result = tokio::task::spawn_blocking(move || placement::prepare(&core, &want))
                    .await
                    .unwrap_or_else(|e| Err(PlacementError::Task(e.to_string())));
                agent.finish(&d.key, attempt, result);
            });
        }
        if any {
            self.publish_routes();
            self.changed.notify_one();
        }
    }

    /// Downloads the placement's model from `spec.model.source` when this
    /// node has no copy (and a disk tier to put one in), showing the
    /// placement as Downloading meanwhile.
    async fn download_if_missing(&self, d: &Desired, attempt: u64) -> Result<(), PlacementError> {
        let (Some(source), Some(fetcher)) = (&d.source, self.agent.fetcher.as_ref()) else {
            return Ok(());
        };
        let (core, path) = (self.agent.clone(), d.path.clone());
        let present = tokio::task::spawn_blocking(move || placement::present(&core, &path))
            .await
            .map_err(|e| PlacementError::Task(e.to_string()))?;
        if present {
            return Ok(());
        }
        let parsed = source.parsed()?;
        let secret = match &source.secret_name {
            Some(name) => Some(self.secret(name).await?),
            None => None,
        };
        let env_token = std::env::var(credentials::HF_TOKEN).ok();
        let access = credentials::access(source, secret.as_ref(), env_token)?;
        self.set_phase(&d.key, attempt, NodePlacementPhase::Downloading);
        let placed: HashSet<String> = lock(&self.tracked)
            .values()
            .map(|t| crate::fetch::normalize(&t.want.path).to_string())
            .collect();
        let core = self.agent.clone();
        // Placed here, or in use by a request: never deleted to make room.
        let protected: Box<dyn Fn(&str) -> bool + Send + Sync> = Box::new(move |name| {
            placed.contains(name) || {
                let entries = core.cache.entries();
                core.catalog
                    .by_path(name)
                    .is_some_and(|e| core.residency(&e.name, &entries).iter().any(|r| r.locked))
            }
        });
        let peers = self.peers_waiting(d).await;
        tracing::debug!(model = %d.path, ?peers, "neighbours with the model");
        fetcher
            .fetch(&d.path, &parsed, &access, &peers, &*protected)
            .await?;
        let core = self.agent.clone();
        tokio::task::spawn_blocking(move || core.catalog.rescan())
            .await
            .map_err(|e| PlacementError::Task(e.to_string()))?;
        self.set_phase(&d.key, attempt, NodePlacementPhase::Loading);
        Ok(())
    }

    /// Neighbours to copy the placement's model from: those that have it
    /// now, or, when none does, an earlier node (by name) that is
    /// downloading it, once it has finished; the later nodes wait for it
    /// rather than all reading from the source (a fan-out).
    async fn peers_waiting(&self, d: &Desired) -> Vec<Peer> {
        const PATIENCE: Duration = Duration::from_secs(600);
        let Some(nodes) = self.model_nodes.get() else {
            return Vec::new();
        };
        let me = &self.settings.node_name;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let peers = neighbours::peers(&nodes.state(), me, d);
            let wait = peers.is_empty()
                && Instant::now() < deadline
                && self.deployments.get().is_some_and(|deps| {
                    neighbours::downloading_before(&nodes.state(), &deps.state(), me, &d.path)
                });
            if !wait {
                return peers;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The credentials Secret `name` in the agents' namespace.
    async fn secret(&self, name: &str) -> Result<Secret, credentials::CredentialsError> {
        let failed = |message: String| credentials::CredentialsError::Get {
            name: name.to_string(),
            message,
        };
        let client = self
            .client
            .get()
            .ok_or_else(|| failed("this agent has no Kubernetes client".into()))?;
        Api::<Secret>::namespaced(client.clone(), &self.settings.namespace)
            .get(name)
            .await
            .map_err(|e| failed(e.to_string()))
    }

    fn set_phase(&self, key: &str, attempt: u64, phase: NodePlacementPhase) {
        if let Some(t) = lock(&self.tracked)
            .get_mut(key)
            .filter(|t| t.attempt == attempt)
        {
            t.report.phase = phase;
        }
        self.changed.notify_one();
    }

    fn finish(&self, key: &str, attempt: u64, result: Result<Prepared, PlacementError>) {
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
                    t.keys = p.keys;
                    t.failures = 0;
                }
                Err(e) => {
                    let message = e.to_string();
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

    /// Unpins the cache entries of a removed placement that no other
    /// placement keeps warm; LRU decides when their bytes go.
    fn release(&self, gone: &Tracked) {
        let kept: HashSet<CacheKey> = lock(&self.tracked)
            .values()
            .filter(|t| t.want.warm != WarmTier::None)
            .flat_map(|t| t.keys.iter().cloned())
            .collect();
        for key in gone.keys.iter().filter(|k| !kept.contains(k)) {
            self.agent.cache.unpin(key, TierKind::Ram);
            self.agent.cache.unpin(key, TierKind::Device);
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
                        vae: t.want.vae.clone(),
                        refiner: t.want.refiner.clone(),
                        precision: t.want.precision,
                        defaults: t.want.defaults.clone(),
                    },
                ))
            })
            .collect();
        self.routes.set(routes);
    }

    /// The agent's view of its placements.
    pub fn placements(&self) -> Vec<NodePlacement> {
        let fetcher = self.agent.fetcher.as_ref();
        lock(&self.tracked)
            .values()
            .map(|t| {
                let mut report = t.report.clone();
                if report.phase == NodePlacementPhase::Downloading {
                    report.download = fetcher
                        .and_then(|f| f.progress(crate::fetch::normalize(&t.want.path)))
                        .map(|(done, total)| DownloadProgress {
                            bytes_done: done as i64,
                            bytes_total: total as i64,
                        });
                }
                report
            })
            .collect()
    }

    /// The ModelNode status this agent reports now.
    pub fn status(&self) -> ModelNodeStatus {
        let hashes = lock(&self.hashes).clone();
        status::node_status(
            &self.agent,
            &self.settings,
            self.placements(),
            &hashes,
            self.started,
        )
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
            let fingerprint = status::significant(&status);
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
