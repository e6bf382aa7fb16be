//! `modelcache-operator simulate`: the real scheduler against a model of each
//! node's cache (VRAM and RAM tiers, LRU), on a Zipf-popular stream of
//! deployments and requests. Users plan capacity with it; we benchmark with it.

use crate::scheduler::{self, Assignment, Decision, Deployment, Fetch, Node, Options, Sizes};
use modelcache_crds::{PlacementRole, Tier, WarmTier};
use modelcache_support::SplitMix64;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

/// A described cluster or workload the simulation cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("the cluster has no nodes")]
    NoNodes,
    #[error("{field} is {value}; it must be {rule}")]
    OutOfRange {
        field: String,
        value: String,
        rule: &'static str,
    },
}

fn out_of_range(field: impl Into<String>, value: impl ToString, rule: &'static str) -> SpecError {
    SpecError::OutOfRange {
        field: field.into(),
        value: value.to_string(),
        rule,
    }
}

/// Most nodes, models, deployment arrivals and requests a simulation takes: a
/// run of that size takes minutes, not forever.
pub const MAX_NODES: usize = 100_000;
pub const MAX_MODELS: usize = 1_000_000;
pub const MAX_ARRIVALS: usize = 10_000_000;
pub const MAX_REQUESTS: usize = 100_000_000;

/// A cluster description: nodes with their cache budgets and bandwidths.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    pub nodes: Vec<NodeSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ram_bytes: u64,
    pub device_bytes: Vec<u64>,
    #[serde(default = "default_disk")]
    pub disk_bytes_per_second: f64,
    #[serde(default = "default_pcie")]
    pub ram_to_device_bytes_per_second: f64,
    /// The node's disk tier for downloaded models (LRU). Unset: every model
    /// is already on the node's disk, as with a shared models volume.
    #[serde(default)]
    pub disk_cache_bytes: Option<u64>,
}

fn default_disk() -> f64 {
    2.0e9
}

fn default_pcie() -> f64 {
    20.0e9
}

/// The workload: models and how deployments and requests arrive.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceSpec {
    /// Model sizes in bytes (at serving precision).
    pub model_bytes: Vec<u64>,
    /// Zipf exponent of model popularity.
    pub zipf: f64,
    /// Deployments active at once; the oldest leaves when a new one arrives.
    pub active: usize,
    /// Deployment arrivals to simulate.
    pub arrivals: usize,
    /// Requests sent to each deployment after it is placed, spread over its replicas.
    pub requests_per_arrival: usize,
    pub seed: u64,
    /// Serving replicas of each deployment (`spec.replicas`), at most one per node.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Share of deployments with `warmTier: Vram`: each replica's model is
    /// loaded when placed and pinned on the GPU while the deployment is active,
    /// and the scheduler reserves its bytes.
    #[serde(default)]
    pub warm_vram: f64,
    /// Share of deployments with `warmTier: Ram` (pinned in the RAM tier).
    #[serde(default)]
    pub warm_ram: f64,
    /// `spec.priority` of each deployment, drawn uniformly from this list
    /// (empty: all 0). A warm deployment that finds no room preempts lower
    /// priorities' warm reservations, as the operator does; the preempted
    /// deployment is then placed again elsewhere if it can be.
    #[serde(default)]
    pub priorities: Vec<i32>,
}

fn one() -> u32 {
    1
}

impl ClusterSpec {
    /// Refuses what cannot be simulated: no nodes, too many, or a bandwidth
    /// that is not a positive number (loads would take forever or no time).
    pub fn check(&self) -> Result<(), SpecError> {
        if self.nodes.is_empty() {
            return Err(SpecError::NoNodes);
        }
        if self.nodes.len() > MAX_NODES {
            return Err(out_of_range("nodes", self.nodes.len(), "at most 100000"));
        }
        for n in &self.nodes {
            for (field, v) in [
                ("diskBytesPerSecond", n.disk_bytes_per_second),
                (
                    "ramToDeviceBytesPerSecond",
                    n.ram_to_device_bytes_per_second,
                ),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(out_of_range(
                        format!("node {:?} {field}", n.name),
                        v,
                        "a positive number",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The nodes as the scheduler sees them: healthy, schedulable, nothing resident yet.
    pub fn scheduler_nodes(&self) -> Vec<Node> {
        self.nodes
            .iter()
            .map(|n| Node {
                name: n.name.clone(),
                labels: n.labels.clone(),
                taints: Vec::new(),
                schedulable: true,
                healthy: true,
                ram_budget: n.ram_bytes,
                device_budgets: n.device_bytes.clone(),
                cpu_only: false,
                resident: HashMap::new(),
                // With a disk tier the node starts empty; without one it has every model.
                local: n.disk_cache_bytes.map(|_| Default::default()),
                disk_bps: n.disk_bytes_per_second,
                ram_to_device_bps: n.ram_to_device_bytes_per_second,
                // The active deployments' placements are passed to the scheduler.
                serving_bytes: 0,
            })
            .collect()
    }

    pub fn synthetic(nodes: usize, ram: u64, devices: Vec<u64>) -> Self {
        ClusterSpec {
            nodes: (0..nodes)
                .map(|i| NodeSpec {
                    name: format!("gpu-{i:04}"),
                    labels: BTreeMap::from([(
                        "topology.kubernetes.io/zone".to_string(),
                        format!("zone-{}", i % 3),
                    )]),
                    ram_bytes: ram,
                    device_bytes: devices.clone(),
                    disk_bytes_per_second: default_disk(),
                    ram_to_device_bytes_per_second: default_pcie(),
                    disk_cache_bytes: None,
                })
                .collect(),
        }
    }
}

/// Draws model indices with Zipf popularity.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut SplitMix64) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// One LRU tier of a node's cache model. Pinned models (warm deployments')
/// are never evicted.
#[derive(Default)]
struct Lru {
    budget: u64,
    used: u64,
    order: VecDeque<(usize, u64)>,
    pins: HashMap<usize, u32>,
}

impl Lru {
    fn with_budget(budget: u64) -> Self {
        Lru {
            budget,
            ..Default::default()
        }
    }

    fn holds(&self, m: usize) -> bool {
        self.order.iter().any(|e| e.0 == m)
    }

    fn touch(&mut self, m: usize) -> bool {
        match self.order.iter().position(|e| e.0 == m) {
            Some(p) => {
                if let Some(e) = self.order.remove(p) {
                    self.order.push_back(e);
                }
                true
            }
            None => false,
        }
    }

    /// Inserts `m` (kept if present), evicting the least recently used
    /// unpinned entries; returns the evicted models. Without room beside the
    /// pinned entries the model is used without being cached.
    fn insert(&mut self, m: usize, size: u64) -> Vec<usize> {
        let mut out = Vec::new();
        if self.touch(m) {
            return out;
        }
        let pinned: u64 = self
            .order
            .iter()
            .filter(|e| self.pins.contains_key(&e.0))
            .map(|e| e.1)
            .sum();
        if pinned + size > self.budget {
            return out;
        }
        while self.used + size > self.budget {
            let Some(p) = self
                .order
                .iter()
                .position(|e| !self.pins.contains_key(&e.0))
            else {
                break;
            };
            if let Some((e, s)) = self.order.remove(p) {
                self.used -= s;
                out.push(e);
            }
        }
        self.order.push_back((m, size));
        self.used += size;
        out
    }

    fn pin(&mut self, m: usize) {
        *self.pins.entry(m).or_default() += 1;
    }

    fn unpin(&mut self, m: usize) {
        if let Some(c) = self.pins.get_mut(&m) {
            *c -= 1;
            if *c == 0 {
                self.pins.remove(&m);
            }
        }
    }
}

impl TraceSpec {
    /// Refuses what cannot be simulated: no models, a model of 0 bytes, a
    /// popularity exponent that is not a number, or a run too long to end.
    pub fn check(&self) -> Result<(), SpecError> {
        if self.model_bytes.is_empty() || self.model_bytes.len() > MAX_MODELS {
            return Err(out_of_range(
                "modelBytes",
                format!("a list of {}", self.model_bytes.len()),
                "a list of 1 to 1000000 sizes",
            ));
        }
        if let Some(i) = self.model_bytes.iter().position(|b| *b == 0) {
            return Err(out_of_range(
                format!("modelBytes[{i}]"),
                0,
                "at least 1 byte",
            ));
        }
        if !(self.zipf.is_finite() && self.zipf >= 0.0) {
            return Err(out_of_range("zipf", self.zipf, "a number from 0 up"));
        }
        if self.active == 0 {
            return Err(out_of_range("active", 0, "at least 1"));
        }
        if !(1..=MAX_ARRIVALS).contains(&self.arrivals) {
            return Err(out_of_range(
                "arrivals",
                self.arrivals,
                "from 1 to 10000000",
            ));
        }
        if !(1..=64).contains(&self.replicas) {
            return Err(out_of_range("replicas", self.replicas, "from 1 to 64"));
        }
        for (field, v) in [("warmVram", self.warm_vram), ("warmRam", self.warm_ram)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(out_of_range(field, v, "a share from 0 to 1"));
            }
        }
        if self.warm_vram + self.warm_ram > 1.0 {
            return Err(out_of_range(
                "warmVram + warmRam",
                self.warm_vram + self.warm_ram,
                "at most 1",
            ));
        }
        if self.arrivals.saturating_mul(self.requests_per_arrival) > MAX_REQUESTS {
            return Err(out_of_range(
                "arrivals × requestsPerArrival",
                self.arrivals.saturating_mul(self.requests_per_arrival),
                "at most 100000000",
            ));
        }
        Ok(())
    }
}

/// What a simulation measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub nodes: usize,
    pub arrivals: usize,
    pub requests: usize,
    /// Arrivals placed with at least one serving replica.
    pub placements: usize,
    /// Of those, placed with fewer replicas than asked.
    pub partial: usize,
    /// Arrivals placed nowhere.
    pub unschedulable: usize,
    /// Why arrivals were not (fully) placed.
    pub reasons: BTreeMap<String, usize>,
    /// Requests that read the model from disk (or further).
    pub cold_loads: usize,
    /// Requests that moved the model from RAM to the GPU.
    pub ram_moves: usize,
    /// Models loaded and pinned for warm deployments when placed, off the request path.
    pub warm_loads: usize,
    /// Warm reservations taken by a higher-priority deployment.
    pub preemptions: usize,
    /// Preempted deployments placed again on another node.
    pub preempted_replaced: usize,
    /// Preempted deployments that found no other node.
    pub preempted_unplaced: usize,
    /// Cold loads that had to download the model first (nodes with a disk tier).
    pub downloads: usize,
    /// Bytes those downloads read from remote storage: the cluster's egress.
    pub source_bytes: u64,
    /// Downloads copied from another node's disk tier instead (no egress).
    pub peer_copies: usize,
    pub latency_p50: f64,
    pub latency_p99: f64,
    /// Scheduling decisions (arrivals and re-placements) per second of planning.
    pub decisions_per_second: f64,
}

/// The cluster's state during a run: the scheduler's view of each node and a
/// model of each node's cache tiers.
struct Sim<'a> {
    opts: Options,
    nodes: Vec<Node>,
    /// Node name → index into `nodes`.
    index: HashMap<String, usize>,
    vram: Vec<Lru>,
    ram: Vec<Lru>,
    disks: Vec<Option<Lru>>,
    /// Disk tiers holding each model: a node without it copies from one of them.
    on_disks: HashMap<usize, usize>,
    sizes: &'a [u64],
    report: Report,
    latencies: Vec<f64>,
}

fn model_path(m: usize) -> String {
    format!("models/m{m}")
}

impl Sim<'_> {
    /// Records in the scheduler's view where model `m` is on `node` now.
    fn mark(&mut self, node: usize, m: usize) {
        let tier = if self.vram[node].holds(m) {
            Some(Tier::Vram)
        } else if self.ram[node].holds(m) {
            Some(Tier::Ram)
        } else {
            None
        };
        let resident = &mut self.nodes[node].resident;
        match tier {
            Some(t) => resident.insert(model_path(m), t),
            None => resident.remove(&model_path(m)),
        };
    }

    /// Seconds to read model `m` from the node's disk into RAM, downloading
    /// it first where the node has a disk tier without it.
    fn read_from_disk(&mut self, node: usize, m: usize) -> f64 {
        let size = self.sizes[m];
        let mut l = size as f64 / self.nodes[node].disk_bps;
        if let Some(disk) = &mut self.disks[node] {
            if !disk.touch(m) {
                self.report.downloads += 1;
                let holders = self.on_disks.entry(m).or_default();
                if *holders > 0 {
                    self.report.peer_copies += 1;
                    l += scheduler::PEER_LATENCY_S + size as f64 / self.opts.peer_bps;
                } else {
                    self.report.source_bytes += size;
                    l += self.opts.source_latency_s + size as f64 / self.opts.source_bps;
                }
                *holders += 1;
                let evicted = disk.insert(m, size);
                for e in &evicted {
                    if let Some(n) = self.on_disks.get_mut(e) {
                        *n = n.saturating_sub(1);
                    }
                }
                if let Some(local) = &mut self.nodes[node].local {
                    for e in evicted {
                        local.remove(&model_path(e));
                    }
                    local.insert(model_path(m));
                }
            }
        }
        l
    }

    /// Makes model `m` resident in RAM on `node`: seconds taken and whether it was cold.
    fn load_to_ram(&mut self, node: usize, m: usize) -> (f64, bool) {
        if self.ram[node].touch(m) {
            return (0.0, false);
        }
        let l = self.read_from_disk(node, m);
        for e in self.ram[node].insert(m, self.sizes[m]) {
            self.mark(node, e);
        }
        self.mark(node, m);
        (l, true)
    }

    /// Makes model `m` resident on `node`'s GPU: seconds taken, and where it
    /// came from (`None`: it was there).
    fn load_to_device(&mut self, node: usize, m: usize) -> (f64, Option<bool>) {
        if self.vram[node].touch(m) {
            return (0.0, None);
        }
        let (l, cold) = self.load_to_ram(node, m);
        for e in self.vram[node].insert(m, self.sizes[m]) {
            // Offloaded from the GPU: still in RAM if the RAM tier holds it.
            self.mark(node, e);
        }
        self.mark(node, m);
        (
            l + self.sizes[m] as f64 / self.nodes[node].ram_to_device_bps,
            Some(cold),
        )
    }

    fn request(&mut self, node: usize, m: usize) {
        self.report.requests += 1;
        let (l, from) = self.load_to_device(node, m);
        match from {
            Some(true) => self.report.cold_loads += 1,
            Some(false) => self.report.ram_moves += 1,
            None => {}
        }
        self.latencies.push(l);
    }

    /// Loads and pins a warm deployment's model on `node`, as the agent does
    /// when it is placed there.
    fn warm(&mut self, node: usize, m: usize, tier: WarmTier) {
        let fresh = match tier {
            WarmTier::Vram => self.load_to_device(node, m).1.is_some(),
            WarmTier::Ram => self.load_to_ram(node, m).1,
            WarmTier::None => return,
        };
        self.report.warm_loads += usize::from(fresh);
        match tier {
            WarmTier::Vram => self.vram[node].pin(m),
            _ => self.ram[node].pin(m),
        }
    }

    fn unwarm(&mut self, node: usize, m: usize, tier: WarmTier) {
        match tier {
            WarmTier::Vram => self.vram[node].unpin(m),
            WarmTier::Ram => self.ram[node].unpin(m),
            WarmTier::None => {}
        }
    }

    fn node_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Nodes of the assignments in `from` that are not in `except`.
    fn nodes_only_in(&self, from: &[Assignment], except: &[Assignment]) -> Vec<usize> {
        from.iter()
            .filter(|a| !except.contains(a))
            .filter_map(|a| self.node_index(&a.node))
            .collect()
    }

    /// Makes `decision` deployment `i`'s placement: warms what is new, unpins
    /// what it lost. Returns the number of new assignments.
    fn adopt(
        &mut self,
        deps: &mut [Deployment],
        models: &[usize],
        i: usize,
        decision: &Decision,
    ) -> usize {
        let (m, warm) = (models[i], deps[i].warm);
        let old = std::mem::replace(&mut deps[i].current, decision.assignments.clone());
        for n in self.nodes_only_in(&old, &decision.assignments) {
            self.unwarm(n, m, warm);
        }
        let gained = self.nodes_only_in(&decision.assignments, &old);
        for &n in &gained {
            self.warm(n, m, warm);
        }
        gained.len()
    }

    /// Plans deployment `t` against every active one, as a reconcile does,
    /// and adopts the result; deployments it preempted are adopted with what
    /// they kept and pushed on `preempted`. Returns the decision and how many
    /// assignments it gained.
    fn plan(
        &mut self,
        deps: &mut [Deployment],
        models: &[usize],
        t: usize,
        decide: &mut (usize, f64),
        preempted: &mut Vec<usize>,
    ) -> (Decision, usize) {
        let started = Instant::now();
        let mut decisions = scheduler::plan_for(&self.nodes, deps, t, self.opts);
        decide.0 += 1;
        decide.1 += started.elapsed().as_secs_f64();
        for (v, dv) in decisions.iter().enumerate() {
            if v != t && dv.preempted_by.is_some() {
                self.report.preemptions += 1;
                self.adopt(deps, models, v, dv);
                preempted.push(v);
            }
        }
        let own = decisions.swap_remove(t);
        let gained = self.adopt(deps, models, t, &own);
        (own, gained)
    }

    /// Places deployment `target`, then places again whatever it preempted
    /// (and what those preempt in turn: always lower priorities, so it ends).
    fn schedule(
        &mut self,
        deps: &mut [Deployment],
        models: &[usize],
        target: usize,
        decide: &mut (usize, f64),
    ) -> Decision {
        let mut preempted = Vec::new();
        let (own, _) = self.plan(deps, models, target, decide, &mut preempted);
        while let Some(v) = preempted.pop() {
            match self.plan(deps, models, v, decide, &mut preempted) {
                (_, 0) => self.report.preempted_unplaced += 1,
                _ => self.report.preempted_replaced += 1,
            }
        }
        own
    }
}

/// Runs the workload against the cluster with the real scheduler, deciding
/// each arrival as the controller does (against every active deployment).
pub fn run(cluster: &ClusterSpec, trace: &TraceSpec, opts: Options) -> Result<Report, SpecError> {
    cluster.check()?;
    trace.check()?;
    let mut rng = SplitMix64::new(trace.seed);
    let zipf = Zipf::new(trace.model_bytes.len().max(1), trace.zipf);
    let nodes = cluster.scheduler_nodes();
    let mut sim = Sim {
        opts,
        index: nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect(),
        nodes,
        vram: cluster
            .nodes
            .iter()
            .map(|n| Lru::with_budget(n.device_bytes.iter().copied().max().unwrap_or(0)))
            .collect(),
        ram: cluster
            .nodes
            .iter()
            .map(|n| Lru::with_budget(n.ram_bytes))
            .collect(),
        disks: cluster
            .nodes
            .iter()
            .map(|n| n.disk_cache_bytes.map(Lru::with_budget))
            .collect(),
        on_disks: HashMap::new(),
        sizes: &trace.model_bytes,
        report: Report {
            nodes: cluster.nodes.len(),
            arrivals: trace.arrivals,
            ..Default::default()
        },
        latencies: Vec::new(),
    };
    // Active deployments in arrival order, and each one's model.
    let mut deps: Vec<Deployment> = Vec::new();
    let mut models: Vec<usize> = Vec::new();
    let mut decide = (0usize, 0.0f64);
    for a in 0..trace.arrivals {
        // The oldest deployment leaves (its pins and reservations with it) as a new one arrives.
        if deps.len() >= trace.active {
            let old = deps.remove(0);
            let m = models.remove(0);
            for n in sim.nodes_only_in(&old.current, &[]) {
                sim.unwarm(n, m, old.warm);
            }
        }
        let m = zipf.sample(&mut rng);
        let u = rng.unit();
        let warm = if u < trace.warm_vram {
            WarmTier::Vram
        } else if u < trace.warm_vram + trace.warm_ram {
            WarmTier::Ram
        } else {
            WarmTier::None
        };
        let priority = match trace.priorities.len() {
            0 => 0,
            n => trace.priorities[(rng.next_u64() % n as u64) as usize],
        };
        deps.push(Deployment {
            key: format!("default/d{a}"),
            model: model_path(m),
            size: Sizes::uniform(trace.model_bytes[m]),
            replicas: trace.replicas,
            warm,
            priority,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            max_per_node: 1,
            spread_key: None,
            current: Vec::new(),
            fetch: Some(if sim.on_disks.get(&m).is_some_and(|n| *n > 0) {
                Fetch::Peer
            } else {
                Fetch::Source
            }),
        });
        models.push(m);
        let target = deps.len() - 1;
        let decision = sim.schedule(&mut deps, &models, target, &mut decide);
        if let Some(r) = &decision.reason {
            *sim.report.reasons.entry(r.clone()).or_default() += 1;
        }
        let serving: Vec<usize> = deps[target]
            .current
            .iter()
            .filter(|x| x.role == PlacementRole::Serving)
            .filter_map(|x| sim.node_index(&x.node))
            .collect();
        if serving.is_empty() {
            sim.report.unschedulable += 1;
            deps.pop();
            models.pop();
            continue;
        }
        sim.report.placements += 1;
        sim.report.partial += usize::from(serving.len() < trace.replicas as usize);
        for r in 0..trace.requests_per_arrival {
            sim.request(serving[r % serving.len()], m);
        }
    }
    let mut report = sim.report;
    let mut latencies = sim.latencies;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    report.latency_p50 = pct(0.5);
    report.latency_p99 = pct(0.99);
    report.decisions_per_second = decide.0 as f64 / decide.1.max(1e-9);
    Ok(report)
}

/// Builds `count` deployments spread over `models` models, for the full-plan benchmark.
pub fn synthetic_deployments(count: usize, models: usize, seed: u64) -> Vec<Deployment> {
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|i| {
            let m = (rng.next_u64() % models as u64) as usize;
            let warm = match rng.next_u64() % 4 {
                0 => WarmTier::Vram,
                1 => WarmTier::Ram,
                _ => WarmTier::None,
            };
            Deployment {
                key: format!("ns{}/d{i}", i % 50),
                model: format!("models/m{m}"),
                size: Sizes::uniform((2 + (m as u64 % 6)) << 30),
                replicas: 1 + (rng.next_u64() % 2) as u32,
                warm,
                priority: (rng.next_u64() % 3) as i32 - 1,
                node_selector: BTreeMap::new(),
                tolerations: Vec::new(),
                max_per_node: 1,
                spread_key: (i % 5 == 0).then(|| "topology.kubernetes.io/zone".to_string()),
                current: Vec::new(),
                fetch: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn trace(models: usize) -> TraceSpec {
        TraceSpec {
            model_bytes: vec![4 * G; models],
            zipf: 1.0,
            active: 4,
            arrivals: 200,
            requests_per_arrival: 3,
            seed: 7,
            replicas: 1,
            warm_vram: 0.0,
            warm_ram: 0.0,
            priorities: Vec::new(),
        }
    }

    #[test]
    fn warm_deployments_load_when_placed_and_are_never_evicted_while_active() {
        // Two nodes with room on the GPU for two 4 GiB models each, four
        // active deployments over twelve models: on demand they keep evicting
        // each other; warm in VRAM, every request finds its model there.
        let cluster = ClusterSpec::synthetic(2, 32 * G, vec![8 * G]);
        let mut t = trace(12);
        let cold = run(&cluster, &t, Options::default()).unwrap();
        assert_eq!(cold.warm_loads, 0);
        assert!(cold.cold_loads + cold.ram_moves > 0);
        t.warm_vram = 1.0;
        let warm = run(&cluster, &t, Options::default()).unwrap();
        assert_eq!(warm.unschedulable, 0, "{:?}", warm.reasons);
        assert_eq!(
            (warm.cold_loads, warm.ram_moves, warm.latency_p99),
            (0, 0, 0.0),
            "a warm deployment's requests never wait for a load"
        );
        assert!(warm.warm_loads > 0 && warm.warm_loads <= warm.placements);
    }

    #[test]
    fn warm_reservations_beyond_capacity_are_refused_without_priorities() {
        // One GPU with room for two warm models, four wanted at once.
        let cluster = ClusterSpec::synthetic(1, 32 * G, vec![8 * G]);
        let mut t = trace(12);
        t.warm_vram = 1.0;
        let r = run(&cluster, &t, Options::default()).unwrap();
        assert!(r.unschedulable > 0);
        assert_eq!(r.preemptions, 0, "equal priorities never preempt");
        assert!(
            r.reasons.keys().all(|k| k.contains("VRAM")),
            "{:?}",
            r.reasons
        );
        assert_eq!(r.placements + r.unschedulable, r.arrivals);
    }

    #[test]
    fn higher_priorities_preempt_lower_warm_reservations() {
        // One GPU with room for two warm models: the preempted have nowhere to go.
        let one_gpu = ClusterSpec::synthetic(1, 32 * G, vec![8 * G]);
        let mut t = trace(12);
        t.warm_vram = 1.0;
        t.priorities = vec![0, 100];
        let ranked = run(&one_gpu, &t, Options::default()).unwrap();
        assert!(ranked.preemptions > 0);
        assert_eq!(ranked.preempted_replaced, 0);
        assert_eq!(ranked.preempted_unplaced, ranked.preemptions);
        // Fewer arrivals are refused than when every priority is the same.
        t.priorities = vec![0, 0];
        let flat = run(&one_gpu, &t, Options::default()).unwrap();
        assert_eq!(flat.preemptions, 0);
        assert!(
            ranked.unschedulable < flat.unschedulable,
            "{ranked:?} vs {flat:?}"
        );
    }

    #[test]
    fn replicas_spread_over_nodes_and_share_the_requests() {
        let mut t = trace(3);
        t.replicas = 3;
        t.requests_per_arrival = 6;
        let three = run(
            &ClusterSpec::synthetic(3, 32 * G, vec![24 * G]),
            &t,
            Options::default(),
        )
        .unwrap();
        assert_eq!((three.partial, three.unschedulable), (0, 0));
        // Every node serves every model: at most one cold load per model and node.
        assert!(three.cold_loads <= 9, "{}", three.cold_loads);
        // On two nodes each deployment gets two of its three replicas.
        let two = run(
            &ClusterSpec::synthetic(2, 32 * G, vec![24 * G]),
            &t,
            Options::default(),
        )
        .unwrap();
        assert_eq!(two.partial, two.placements);
        assert!(
            two.reasons.keys().any(|k| k.contains("2 nodes")),
            "{:?}",
            two.reasons
        );
    }

    #[test]
    fn malformed_warm_shares_and_replicas_are_refused_by_name() {
        for (edit, field) in [
            (
                (|t: &mut TraceSpec| t.replicas = 0) as fn(&mut TraceSpec),
                "replicas",
            ),
            (|t| t.warm_vram = 1.5, "warmVram"),
            (|t| t.warm_ram = f64::NAN, "warmRam"),
            (
                |t| {
                    t.warm_vram = 0.7;
                    t.warm_ram = 0.7
                },
                "warmVram + warmRam",
            ),
        ] {
            let mut t = trace(2);
            edit(&mut t);
            match t.check() {
                Err(SpecError::OutOfRange { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // Absent fields take their defaults.
        let t: TraceSpec = serde_json::from_str(
            r#"{"modelBytes": [1], "zipf": 1, "active": 1, "arrivals": 1, "requestsPerArrival": 1, "seed": 1}"#,
        )
        .unwrap();
        assert_eq!((t.replicas, t.warm_vram, t.priorities.len()), (1, 0.0, 0));
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever the workload: every arrival is placed or refused, every
        /// placed arrival's requests are served, and every preemption ends
        /// with the preempted deployment placed again or not.
        #[test]
        fn every_arrival_and_request_is_accounted_for(
            nodes in 1usize..4,
            models in 1usize..10,
            active in 1usize..6,
            replicas in 1u32..4,
            warm in 0u8..3,
            priorities in proptest::collection::vec(-5i32..5, 0..3),
            seed in 0u64..1000,
        ) {
            let cluster = ClusterSpec::synthetic(nodes, 16 * G, vec![8 * G]);
            let mut t = trace(models);
            t.model_bytes = (0..models as u64).map(|m| (1 + m % 5) * G).collect();
            t.active = active;
            t.arrivals = 60;
            t.replicas = replicas;
            t.priorities = priorities;
            t.seed = seed;
            match warm {
                1 => t.warm_vram = 0.5,
                2 => t.warm_ram = 0.5,
                _ => {}
            }
            let r = run(&cluster, &t, Options::default()).unwrap();
            prop_assert_eq!(r.placements + r.unschedulable, r.arrivals);
            prop_assert_eq!(r.requests, r.placements * t.requests_per_arrival);
            prop_assert!(r.cold_loads + r.ram_moves <= r.requests);
            prop_assert!(r.partial <= r.placements);
            prop_assert_eq!(r.preempted_replaced + r.preempted_unplaced, r.preemptions);
        }
    }

    #[test]
    fn nodes_with_a_disk_tier_download_each_model_once_while_it_fits() {
        // RAM for two models: most cold loads read the disk.
        let mut cluster = ClusterSpec::synthetic(2, 8 * G, vec![4 * G]);
        let shared = run(&cluster, &trace(12), Options::default()).unwrap();
        assert_eq!(
            (shared.downloads, shared.source_bytes),
            (0, 0),
            "a shared models volume"
        );
        for n in &mut cluster.nodes {
            n.disk_cache_bytes = Some(100 * G);
        }
        let roomy = run(&cluster, &trace(12), Options::default()).unwrap();
        assert!(
            roomy.downloads >= 1 && roomy.downloads <= 24,
            "at most one download per model and node: {}",
            roomy.downloads
        );
        assert_eq!(
            roomy.source_bytes,
            (roomy.downloads - roomy.peer_copies) as u64 * 4 * G,
            "copies between nodes cost no egress"
        );
        assert!(
            roomy.source_bytes <= 12 * 4 * G,
            "each model leaves remote storage at most once while the disks hold it"
        );
        for n in &mut cluster.nodes {
            n.disk_cache_bytes = Some(4 * G);
        }
        let tight = run(&cluster, &trace(12), Options::default()).unwrap();
        assert!(
            tight.downloads > roomy.downloads,
            "a disk tier of one model downloads again: {} vs {}",
            tight.downloads,
            roomy.downloads
        );
        assert!(
            tight.latency_p99 >= roomy.latency_p99,
            "downloads are on the request path"
        );
    }
}
