//! `modelcache-operator simulate`: the real scheduler against a model of each
//! node's cache (VRAM and RAM tiers, LRU), on a Zipf-popular stream of
//! deployments and requests. Users plan capacity with it; we benchmark with it.

use crate::scheduler::{self, Deployment, Fetch, Node, Options, Sizes};
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
    /// Requests sent to each deployment after it is placed.
    pub requests_per_arrival: usize,
    pub seed: u64,
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

/// One LRU tier of a node's cache model.
#[derive(Default)]
struct Lru {
    budget: u64,
    used: u64,
    order: VecDeque<(usize, u64)>,
}

impl Lru {
    fn touch(&mut self, m: usize) -> bool {
        if let Some(p) = self.order.iter().position(|e| e.0 == m) {
            if let Some(e) = self.order.remove(p) {
                self.order.push_back(e);
            }
            true
        } else {
            false
        }
    }
    /// Inserts, evicting LRU entries; returns the evicted models.
    fn insert(&mut self, m: usize, size: u64) -> Vec<usize> {
        let mut out = Vec::new();
        while self.used + size > self.budget {
            let Some((e, s)) = self.order.pop_front() else {
                break;
            };
            self.used -= s;
            out.push(e);
        }
        if self.used + size <= self.budget {
            self.order.push_back((m, size));
            self.used += size;
        }
        out
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
#[derive(Debug, Clone)]
pub struct Report {
    pub nodes: usize,
    pub arrivals: usize,
    pub requests: usize,
    pub placements: usize,
    pub unschedulable: usize,
    pub reasons: BTreeMap<String, usize>,
    pub cold_loads: usize,
    pub ram_moves: usize,
    /// Cold loads that had to download the model first (nodes with a disk tier).
    pub downloads: usize,
    /// Bytes those downloads read from remote storage: the cluster's egress.
    pub source_bytes: u64,
    /// Downloads copied from another node's disk tier instead (no egress).
    pub peer_copies: usize,
    pub latency_p50: f64,
    pub latency_p99: f64,
    pub decisions_per_second: f64,
}

/// Runs the workload against the cluster with the real scheduler.
pub fn run(cluster: &ClusterSpec, trace: &TraceSpec, opts: Options) -> Result<Report, SpecError> {
    cluster.check()?;
    trace.check()?;
    let mut rng = SplitMix64::new(trace.seed);
    let zipf = Zipf::new(trace.model_bytes.len().max(1), trace.zipf);
    let mut nodes = cluster.scheduler_nodes();
    let mut caches: Vec<(Lru, Lru)> = cluster
        .nodes
        .iter()
        .map(|n| {
            (
                Lru {
                    budget: n.device_bytes.iter().copied().max().unwrap_or(0),
                    ..Default::default()
                },
                Lru {
                    budget: n.ram_bytes,
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut disks: Vec<Option<Lru>> = cluster
        .nodes
        .iter()
        .map(|n| {
            n.disk_cache_bytes.map(|budget| Lru {
                budget,
                ..Default::default()
            })
        })
        .collect();
    let mut active: VecDeque<(Deployment, usize)> = VecDeque::new();
    let mut report = Report {
        nodes: nodes.len(),
        arrivals: trace.arrivals,
        requests: 0,
        placements: 0,
        unschedulable: 0,
        reasons: BTreeMap::new(),
        cold_loads: 0,
        ram_moves: 0,
        downloads: 0,
        source_bytes: 0,
        peer_copies: 0,
        latency_p50: 0.0,
        latency_p99: 0.0,
        decisions_per_second: 0.0,
    };
    // Disk tiers holding each model: a node without it copies from one of them.
    let mut on_disks: HashMap<usize, usize> = HashMap::new();
    let mut latencies = Vec::new();
    let mut decide_seconds = 0.0;
    for a in 0..trace.arrivals {
        let m = zipf.sample(&mut rng);
        let size = trace.model_bytes[m];
        let d = Deployment {
            key: format!("default/d{a}"),
            model: format!("models/m{m}"),
            size: Sizes::uniform(size),
            replicas: 1,
            warm: WarmTier::None,
            priority: 0,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            max_per_node: 1,
            spread_key: None,
            current: Vec::new(),
            fetch: Some(if on_disks.get(&m).is_some_and(|n| *n > 0) {
                Fetch::Peer
            } else {
                Fetch::Source
            }),
        };
        let t = Instant::now();
        let decision = scheduler::plan(&nodes, std::slice::from_ref(&d), opts).remove(0);
        decide_seconds += t.elapsed().as_secs_f64();
        if let Some(r) = &decision.reason {
            report.unschedulable += 1;
            *report.reasons.entry(r.clone()).or_default() += 1;
            continue;
        }
        let Some(node) = decision
            .assignments
            .iter()
            .find(|x| x.role == PlacementRole::Serving)
            .and_then(|x| nodes.iter().position(|n| n.name == x.node))
        else {
            continue;
        };
        report.placements += 1;
        nodes[node].serving_bytes += size;
        for _ in 0..trace.requests_per_arrival {
            report.requests += 1;
            let n = &nodes[node];
            let (vram, ram) = &mut caches[node];
            let latency = if vram.touch(m) {
                0.0
            } else {
                let in_ram = ram.touch(m);
                let mut l = size as f64 / n.ram_to_device_bps;
                if in_ram {
                    report.ram_moves += 1;
                } else {
                    report.cold_loads += 1;
                    l += size as f64 / n.disk_bps;
                    if let Some(disk) = &mut disks[node] {
                        if !disk.touch(m) {
                            report.downloads += 1;
                            let holders = on_disks.entry(m).or_default();
                            if *holders > 0 {
                                report.peer_copies += 1;
                                l += scheduler::PEER_LATENCY_S + size as f64 / opts.peer_bps;
                            } else {
                                report.source_bytes += size;
                                l += opts.source_latency_s + size as f64 / opts.source_bps;
                            }
                            *holders += 1;
                            let evicted = disk.insert(m, size);
                            for e in &evicted {
                                if let Some(n) = on_disks.get_mut(e) {
                                    *n = n.saturating_sub(1);
                                }
                            }
                            if let Some(local) = &mut nodes[node].local {
                                for e in evicted {
                                    local.remove(&format!("models/m{e}"));
                                }
                                local.insert(format!("models/m{m}"));
                            }
                        }
                    }
                    for e in ram.insert(m, size) {
                        nodes[node].resident.remove(&format!("models/m{e}"));
                    }
                }
                for e in caches[node].0.insert(m, size) {
                    // Offloaded from VRAM: still in RAM if the RAM tier holds it.
                    let tier = if caches[node].1.order.iter().any(|x| x.0 == e) {
                        Some(Tier::Ram)
                    } else {
                        None
                    };
                    let key = format!("models/m{e}");
                    match tier {
                        Some(t) => nodes[node].resident.insert(key, t),
                        None => nodes[node].resident.remove(&key),
                    };
                }
                nodes[node]
                    .resident
                    .insert(format!("models/m{m}"), Tier::Vram);
                l
            };
            latencies.push(latency);
        }
        active.push_back((d, node));
        if active.len() > trace.active {
            if let Some((old, n)) = active.pop_front() {
                nodes[n].serving_bytes = nodes[n].serving_bytes.saturating_sub(old.size.gpu);
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    report.latency_p50 = pct(0.5);
    report.latency_p99 = pct(0.99);
    report.decisions_per_second = trace.arrivals as f64 / decide_seconds.max(1e-9);
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
