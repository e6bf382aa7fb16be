//! The scheduler core: pure functions over a snapshot of the cluster, no I/O.
//!
//! Filter (healthy, schedulable, selector, taints, model available, capacity for
//! warm reservations, per-node replica cap) → score (expected load time from
//! where the weights already are; balance; topology spread) → pick, with
//! deterministic tie-breaks. Existing placements are kept while feasible;
//! higher priority may preempt lower-priority warm reservations.

use modelcache_crds::{PlacementRole, Tier, WarmTier};
use std::collections::{BTreeMap, HashMap};

/// A node taint (`NoSchedule` and `NoExecute` keep models off; `PreferNoSchedule` does not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: String,
}

/// A toleration, with Kubernetes' matching rules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Toleration {
    pub key: String,
    /// `Equal` (default) or `Exists`.
    pub operator: String,
    pub value: String,
    /// Empty matches every effect.
    pub effect: String,
}

impl Toleration {
    fn tolerates(&self, t: &Taint) -> bool {
        (self.effect.is_empty() || self.effect == t.effect)
            && (self.key.is_empty() && self.operator == "Exists"
                || self.key == t.key && (self.operator == "Exists" || self.value == t.value))
    }
}

/// One node as the scheduler sees it (from Node, ModelNode and Lease).
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// `spec.unschedulable` is false.
    pub schedulable: bool,
    /// Lease fresh and ModelNode Ready.
    pub healthy: bool,
    pub ram_budget: u64,
    /// Cache budget of each device.
    pub device_budgets: Vec<u64>,
    /// The agent has no GPU: its device tier holds weights in F32.
    pub cpu_only: bool,
    /// Models resident in the agent's cache, by path, with the best tier.
    pub resident: HashMap<String, Tier>,
    /// Models found on the node's disk; `None` when the list was truncated (unknown).
    pub local: Option<std::collections::HashSet<String>>,
    /// Measured disk → RAM bandwidth, bytes/s.
    pub disk_bps: f64,
    /// Measured RAM → device bandwidth, bytes/s.
    pub ram_to_device_bps: f64,
    /// Bytes of serving replicas other deployments already have on the node: the
    /// load the balance score spreads.
    pub serving_bytes: u64,
}

/// One ModelDeployment as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// `namespace/name`.
    pub key: String,
    pub model: String,
    /// What its weights take where.
    pub size: Sizes,
    pub replicas: u32,
    pub warm: WarmTier,
    pub priority: i32,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub max_per_node: u32,
    pub spread_key: Option<String>,
    /// Placements from the last decision, kept while feasible.
    pub current: Vec<Assignment>,
    /// How a node without a copy gets the model, if it may: `None` when the
    /// model has no remote source.
    pub fetch: Option<Fetch>,
}

/// Where a node without a copy of a model gets one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// From its remote source: no node has it yet.
    Source,
    /// From a node that has it (the agents copy from each other), falling
    /// back to the source.
    Peer,
}

/// What a deployment's weights (its model with its refiner and VAE override)
/// take in each place, as the agents charge them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// On a GPU, at the deployment's precision.
    pub gpu: u64,
    /// On an agent without a GPU, which computes in F32.
    pub cpu: u64,
    /// In a node's RAM tier: the weights' files.
    pub ram: u64,
}

impl Sizes {
    /// The same bytes everywhere.
    pub fn uniform(bytes: u64) -> Sizes {
        Sizes {
            gpu: bytes,
            cpu: bytes,
            ram: bytes,
        }
    }
}

impl Node {
    /// Whether the node has `model` on its disk or in its cache (an unknown
    /// list, when the agent truncated it, counts as having it).
    fn has(&self, model: &str) -> bool {
        self.local.as_ref().is_none_or(|l| l.contains(model)) || self.resident.contains_key(model)
    }
}

impl Deployment {
    /// Bytes a device of `node` is charged for the weights.
    pub fn device_bytes(&self, node: &Node) -> u64 {
        if node.cpu_only {
            self.size.cpu
        } else {
            self.size.gpu
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub node: String,
    pub role: PlacementRole,
}

/// What the scheduler decided for one deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub key: String,
    pub assignments: Vec<Assignment>,
    /// Serving replicas that could not be placed.
    pub unplaced: u32,
    /// kube-scheduler style summary, when replicas are unplaced.
    pub reason: Option<String>,
    /// The most common rejection in PascalCase (`InsufficientVram`, …), for the
    /// `Scheduled` condition's reason and the unschedulable metric's label.
    pub reason_code: Option<&'static str>,
    /// Deployments whose warm reservations this one preempted.
    pub preempted: Vec<String>,
    /// Set when this deployment lost placements to a higher-priority one.
    pub preempted_by: Option<String>,
}

/// How replicas are spread over nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Prefer nodes with more free capacity.
    Spread,
    /// Prefer fuller nodes, keeping others free for large models.
    BinPack,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Score by where the weights already are (turn off to measure what it buys).
    pub locality: bool,
    pub strategy: Strategy,
    /// Bytes/s a node downloads a model from its remote source at.
    pub source_bps: f64,
    /// Seconds a download takes before its first byte (listing, connecting).
    pub source_latency_s: f64,
    /// Bytes/s a node copies a model from another node at.
    pub peer_bps: f64,
}

/// A node's share of a 10 Gb/s link to object storage.
pub const DEFAULT_SOURCE_BPS: f64 = 1.25e9;
/// A 25 Gb/s link between nodes.
pub const DEFAULT_PEER_BPS: f64 = 3.125e9;
/// Seconds before a copy from another node starts (asking it for its files).
pub const PEER_LATENCY_S: f64 = 0.1;

impl Default for Options {
    fn default() -> Self {
        Options {
            locality: true,
            strategy: Strategy::Spread,
            source_bps: DEFAULT_SOURCE_BPS,
            source_latency_s: 1.0,
            peer_bps: DEFAULT_PEER_BPS,
        }
    }
}

/// Why a node was filtered out; the `Display` form is kube-scheduler's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Reject {
    NotReady,
    Unschedulable,
    Selector,
    Taint,
    NoModel,
    InsufficientRam,
    InsufficientVram,
    PerNodeCap,
}

impl Reject {
    fn text(self) -> &'static str {
        match self {
            Reject::NotReady => "node(s) were not ready (agent lease expired)",
            Reject::Unschedulable => "node(s) were unschedulable",
            Reject::Selector => "node(s) didn't match node selector",
            Reject::Taint => "node(s) had untolerated taint",
            Reject::NoModel => "node(s) didn't have the model",
            Reject::InsufficientRam => "Insufficient RAM",
            Reject::InsufficientVram => "Insufficient VRAM",
            Reject::PerNodeCap => "node(s) already had maxReplicasPerNode replicas",
        }
    }

    fn code(self) -> &'static str {
        match self {
            Reject::NotReady => "NodeNotReady",
            Reject::Unschedulable => "NodeUnschedulable",
            Reject::Selector => "NodeSelectorMismatch",
            Reject::Taint => "UntoleratedTaint",
            Reject::NoModel => "ModelNotOnNode",
            Reject::InsufficientRam => "InsufficientRam",
            Reject::InsufficientVram => "InsufficientVram",
            Reject::PerNodeCap => "MaxReplicasPerNode",
        }
    }

    fn is_capacity(self) -> bool {
        matches!(self, Reject::InsufficientRam | Reject::InsufficientVram)
    }
}

/// A warm reservation on a node, for preemption.
#[derive(Debug, Clone)]
struct Reservation {
    deployment: usize,
    bytes: u64,
    device: Option<usize>,
    priority: i32,
}

/// Mutable capacity state while planning.
pub struct State<'a> {
    nodes: &'a [Node],
    ram_free: Vec<u64>,
    dev_free: Vec<Vec<u64>>,
    reservations: Vec<Vec<Reservation>>,
    /// Per deployment index: (node index, serving replicas there); a handful each.
    per_node: HashMap<usize, Vec<(usize, u32)>>,
    /// Bytes of serving replicas per node.
    serving: Vec<u64>,
    opts: Options,
}

/// Seconds of expected load time that a fully used node is worth: the balance
/// term is `BALANCE_SECONDS × utilisation`, so a cold load (~3 s for a 5 GB
/// model) is accepted to avoid a node that is ~1.5× over-committed.
const BALANCE_SECONDS: f64 = 2.0;

impl<'a> State<'a> {
    pub fn new(nodes: &'a [Node], opts: Options) -> Self {
        State {
            nodes,
            ram_free: nodes.iter().map(|n| n.ram_budget).collect(),
            dev_free: nodes.iter().map(|n| n.device_budgets.clone()).collect(),
            reservations: vec![Vec::new(); nodes.len()],
            per_node: HashMap::new(),
            serving: nodes.iter().map(|n| n.serving_bytes).collect(),
            opts,
        }
    }

    /// Serving replicas of deployment `di` on node `i`.
    fn replicas_on(&self, di: usize, i: usize) -> u32 {
        self.per_node
            .get(&di)
            .and_then(|v| v.iter().find(|(j, _)| *j == i))
            .map_or(0, |(_, c)| *c)
    }

    fn add_replica(&mut self, di: usize, i: usize, delta: i32) {
        let v = self.per_node.entry(di).or_default();
        match v.iter_mut().find(|(j, _)| *j == i) {
            Some((_, c)) => *c = c.saturating_add_signed(delta),
            None if delta > 0 => v.push((i, delta as u32)),
            None => {}
        }
    }

    fn static_filter(&self, n: &Node, d: &Deployment) -> Result<(), Reject> {
        if !n.healthy {
            return Err(Reject::NotReady);
        }
        if !n.schedulable {
            return Err(Reject::Unschedulable);
        }
        if d.node_selector
            .iter()
            .any(|(k, v)| n.labels.get(k) != Some(v))
        {
            return Err(Reject::Selector);
        }
        if n.taints.iter().any(|t| {
            (t.effect == "NoSchedule" || t.effect == "NoExecute")
                && !d.tolerations.iter().any(|tol| tol.tolerates(t))
        }) {
            return Err(Reject::Taint);
        }
        if d.fetch.is_none() && !n.has(&d.model) {
            return Err(Reject::NoModel);
        }
        Ok(())
    }

    /// Where a warm copy of `d` would be reserved on node `i`: `Ok(Some(device))`
    /// for VRAM, `Ok(None)` for RAM or no reservation.
    fn capacity(&self, i: usize, d: &Deployment) -> Result<Option<usize>, Reject> {
        let n = &self.nodes[i];
        let dev = d.device_bytes(n);
        match d.warm {
            WarmTier::Vram => self.dev_free[i]
                .iter()
                .enumerate()
                .filter(|(_, f)| **f >= dev)
                .min_by_key(|(j, f)| (**f, *j))
                .map(|(j, _)| Some(j))
                .ok_or(Reject::InsufficientVram),
            // Kept in RAM while idle, but served from a device: it must fit one too.
            WarmTier::Ram if !n.device_budgets.iter().any(|b| *b >= dev) => {
                Err(Reject::InsufficientVram)
            }
            WarmTier::Ram if self.ram_free[i] >= d.size.ram => Ok(None),
            WarmTier::Ram => Err(Reject::InsufficientRam),
            // On demand: no reservation, but the model must fit one device's budget.
            WarmTier::None if n.device_budgets.iter().any(|b| *b >= dev) => Ok(None),
            WarmTier::None => Err(Reject::InsufficientVram),
        }
    }

    fn reserve(&mut self, di: usize, d: &Deployment, i: usize, device: Option<usize>) {
        let bytes = match (d.warm, device) {
            (WarmTier::Vram, Some(j)) => {
                let bytes = d.device_bytes(&self.nodes[i]);
                self.dev_free[i][j] -= bytes;
                bytes
            }
            (WarmTier::Ram, _) => {
                self.ram_free[i] -= d.size.ram;
                d.size.ram
            }
            _ => return,
        };
        self.reservations[i].push(Reservation {
            deployment: di,
            bytes,
            device,
            priority: d.priority,
        });
    }

    fn release(&mut self, i: usize, r: &Reservation) {
        match r.device {
            Some(j) => self.dev_free[i][j] += r.bytes,
            None => self.ram_free[i] += r.bytes,
        }
    }

    /// Expected seconds to make `d` ready on node `i`, from where its weights are.
    fn load_seconds(&self, i: usize, d: &Deployment) -> f64 {
        if !self.opts.locality {
            return 0.0;
        }
        let n = &self.nodes[i];
        let to_dev = d.device_bytes(n) as f64 / n.ram_to_device_bps.max(1.0);
        let from_disk = d.size.ram as f64 / n.disk_bps.max(1.0) + to_dev;
        match n.resident.get(&d.model) {
            Some(Tier::Vram) => 0.0,
            Some(Tier::Ram) => to_dev,
            _ if n.has(&d.model) => from_disk,
            // Copied first (the file written is read back from the page cache).
            _ => {
                let (latency, bps) = match d.fetch {
                    Some(Fetch::Peer) => (PEER_LATENCY_S, self.opts.peer_bps),
                    _ => (self.opts.source_latency_s, self.opts.source_bps),
                };
                latency + d.size.ram as f64 / bps.max(1.0) + to_dev
            }
        }
    }

    /// Reserved plus serving bytes over the node's cache capacity.
    fn utilisation(&self, i: usize) -> f64 {
        let n = &self.nodes[i];
        let total = n.ram_budget + n.device_budgets.iter().sum::<u64>();
        let free = self.ram_free[i] + self.dev_free[i].iter().sum::<u64>();
        if total == 0 {
            return 0.0;
        }
        (total - free.min(total) + self.serving[i]) as f64 / total as f64
    }

    /// Picks the best node for one more serving replica of `d`, or the reasons
    /// every node was rejected.
    fn pick(
        &self,
        di: usize,
        d: &Deployment,
        zones: &HashMap<String, u32>,
    ) -> Result<(usize, Option<usize>), BTreeMap<Reject, u32>> {
        let mut reasons: BTreeMap<Reject, u32> = BTreeMap::new();
        let mine: &[(usize, u32)] = self.per_node.get(&di).map_or(&[], Vec::as_slice);
        let cap = d.max_per_node.max(1);
        // (zone count, cost in ms, name) → node index and device.
        type Ranked<'n> = ((u32, i64, &'n str), usize, Option<usize>);
        let mut best: Option<Ranked> = None;
        for (i, n) in self.nodes.iter().enumerate() {
            let r = self.static_filter(n, d).and_then(|_| {
                if mine.iter().any(|(j, c)| *j == i && *c >= cap) {
                    Err(Reject::PerNodeCap)
                } else {
                    self.capacity(i, d)
                }
            });
            let device = match r {
                Ok(dev) => dev,
                Err(why) => {
                    *reasons.entry(why).or_default() += 1;
                    continue;
                }
            };
            let zone_count = d
                .spread_key
                .as_ref()
                .and_then(|k| n.labels.get(k))
                .map_or(0, |z| zones.get(z).copied().unwrap_or(0));
            // Spread first, then expected load time plus the balance term (in
            // milliseconds, so ties are exact), then the name: deterministic.
            let balance = BALANCE_SECONDS * self.utilisation(i);
            let cost = self.load_seconds(i, d)
                + match self.opts.strategy {
                    Strategy::Spread => balance,
                    Strategy::BinPack => -balance,
                };
            let key = (zone_count, (cost * 1e3).round() as i64, n.name.as_str());
            if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                best = Some((key, i, device));
            }
        }
        best.map(|(_, i, dev)| (i, dev)).ok_or(reasons)
    }

    /// Lower-priority warm reservations on node `i` that, evicted lowest priority
    /// first, would make room for `d`; `None` if they cannot.
    fn victims(&self, i: usize, d: &Deployment) -> Option<Vec<usize>> {
        let mut candidates: Vec<(usize, &Reservation)> = self.reservations[i]
            .iter()
            .enumerate()
            .filter(|(_, r)| r.priority < d.priority)
            .collect();
        candidates.sort_by_key(|(_, r)| (r.priority, std::cmp::Reverse(r.bytes)));
        let mut ram = self.ram_free[i];
        let mut dev = self.dev_free[i].clone();
        let mut chosen = Vec::new();
        for (idx, r) in candidates {
            let fits = |ram: u64, dev: &[u64]| match d.warm {
                WarmTier::Vram | WarmTier::None => {
                    dev.iter().any(|f| *f >= d.device_bytes(&self.nodes[i]))
                }
                WarmTier::Ram => ram >= d.size.ram,
            };
            if fits(ram, &dev) {
                break;
            }
            match r.device {
                Some(j) => dev[j] += r.bytes,
                None => ram += r.bytes,
            }
            chosen.push(idx);
            if fits(ram, &dev) {
                return Some(chosen);
            }
        }
        None
    }
}

/// Formats kube-scheduler's summary: "0/12 nodes are available: 7 Insufficient VRAM, 5 node(s) didn't match node selector."
fn reason_summary(total: usize, reasons: &BTreeMap<Reject, u32>) -> String {
    let mut parts: Vec<(String, u32)> = reasons
        .iter()
        .map(|(r, c)| (r.text().to_string(), *c))
        .collect();
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    let list = parts
        .iter()
        .map(|(t, c)| format!("{c} {t}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("0/{total} nodes are available: {list}.")
}

/// The rejection that filtered out the most nodes (first in declaration order on ties).
fn dominant(reasons: &BTreeMap<Reject, u32>) -> Option<&'static str> {
    reasons
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(r, _)| r.code())
}

/// Plans every deployment. Deterministic for the same input.
pub fn plan(nodes: &[Node], deployments: &[Deployment], opts: Options) -> Vec<Decision> {
    plan_phases(nodes, deployments, None, opts)
}

/// Decides one deployment (index `target`) incrementally, as the controller does
/// on each reconcile: every deployment's feasible current placements are kept
/// first (highest priority first, so they hold their capacity), then only the
/// target's missing replicas are placed, preempting lower priorities if needed.
/// Other deployments' decisions show what the target preempted.
pub fn plan_for(
    nodes: &[Node],
    deployments: &[Deployment],
    target: usize,
    opts: Options,
) -> Vec<Decision> {
    plan_phases(nodes, deployments, Some(target), opts)
}

fn plan_phases(
    nodes: &[Node],
    deployments: &[Deployment],
    only: Option<usize>,
    opts: Options,
) -> Vec<Decision> {
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut order: Vec<usize> = (0..deployments.len()).collect();
    order.sort_by(|&a, &b| {
        deployments[b]
            .priority
            .cmp(&deployments[a].priority)
            .then_with(|| deployments[a].key.cmp(&deployments[b].key))
    });
    let mut st = State::new(nodes, opts);
    let mut decisions: Vec<Decision> = deployments
        .iter()
        .map(|d| Decision {
            key: d.key.clone(),
            assignments: Vec::new(),
            unplaced: 0,
            reason: None,
            reason_code: None,
            preempted: Vec::new(),
            preempted_by: None,
        })
        .collect();

    // Phase 1: keep feasible current placements (no churn), highest priority first.
    for &di in &order {
        let d = &deployments[di];
        let want_serving = d.replicas;
        let want_warm = u32::from(d.replicas == 0 && d.warm != WarmTier::None);
        let (mut serving, mut warm) = (0, 0);
        for a in &d.current {
            let Some(&i) = index.get(a.node.as_str()) else {
                continue;
            };
            let role_ok = match a.role {
                PlacementRole::Serving => serving < want_serving,
                PlacementRole::Warm => warm < want_warm,
            };
            if !role_ok || st.static_filter(&nodes[i], d).is_err() {
                continue;
            }
            if a.role == PlacementRole::Serving && st.replicas_on(di, i) >= d.max_per_node.max(1) {
                continue;
            }
            let Ok(device) = st.capacity(i, d) else {
                continue;
            };
            st.reserve(di, d, i, device);
            match a.role {
                PlacementRole::Serving => {
                    serving += 1;
                    st.add_replica(di, i, 1);
                    st.serving[i] += d.device_bytes(&nodes[i]);
                }
                PlacementRole::Warm => warm += 1,
            }
            decisions[di].assignments.push(a.clone());
        }
    }

    // Phase 2: place what is missing, highest priority first, preempting lower
    // priorities' warm reservations when only capacity is short.
    for &di in &order {
        if only.is_some_and(|t| t != di) {
            continue;
        }
        let d = &deployments[di];
        let mut zones: HashMap<String, u32> = HashMap::new();
        if let Some(k) = &d.spread_key {
            for a in &decisions[di].assignments {
                if let Some(z) = index
                    .get(a.node.as_str())
                    .and_then(|&i| nodes[i].labels.get(k))
                {
                    *zones.entry(z.clone()).or_default() += 1;
                }
            }
        }
        let serving = decisions[di]
            .assignments
            .iter()
            .filter(|a| a.role == PlacementRole::Serving)
            .count() as u32;
        let mut missing = d.replicas.saturating_sub(serving);
        while missing > 0 {
            match st.pick(di, d, &zones) {
                Ok((i, device)) => {
                    st.reserve(di, d, i, device);
                    st.add_replica(di, i, 1);
                    st.serving[i] += d.device_bytes(&nodes[i]);
                    if let Some(z) = d.spread_key.as_ref().and_then(|k| nodes[i].labels.get(k)) {
                        *zones.entry(z.clone()).or_default() += 1;
                    }
                    decisions[di].assignments.push(Assignment {
                        node: nodes[i].name.clone(),
                        role: PlacementRole::Serving,
                    });
                    missing -= 1;
                }
                Err(reasons) => {
                    if preempt(&mut st, nodes, deployments, &mut decisions, di) {
                        continue;
                    }
                    decisions[di].unplaced = missing;
                    decisions[di].reason = Some(reason_summary(nodes.len(), &reasons));
                    decisions[di].reason_code = dominant(&reasons);
                    break;
                }
            }
        }
        // A scaled-to-zero deployment with a warm tier keeps one warm copy where there is room.
        let has_warm = decisions[di]
            .assignments
            .iter()
            .any(|a| a.role == PlacementRole::Warm);
        if d.replicas == 0 && d.warm != WarmTier::None && !has_warm {
            if let Ok((i, device)) = st.pick(di, d, &zones) {
                st.reserve(di, d, i, device);
                decisions[di].assignments.push(Assignment {
                    node: nodes[i].name.clone(),
                    role: PlacementRole::Warm,
                });
            }
        }
    }
    decisions
}

/// Frees room for deployment `di` by evicting lower-priority warm reservations
/// on the node where the fewest must go. Returns whether anything was freed.
fn preempt(
    st: &mut State,
    nodes: &[Node],
    deployments: &[Deployment],
    decisions: &mut [Decision],
    di: usize,
) -> bool {
    let d = &deployments[di];
    if d.warm == WarmTier::None {
        return false;
    }
    let mut best: Option<(usize, usize, Vec<usize>)> = None;
    for (i, n) in nodes.iter().enumerate() {
        if st.static_filter(n, d).is_err() || st.replicas_on(di, i) >= d.max_per_node.max(1) {
            continue;
        }
        if matches!(st.capacity(i, d), Err(r) if !r.is_capacity()) || st.capacity(i, d).is_ok() {
            continue;
        }
        if let Some(v) = st.victims(i, d) {
            if best
                .as_ref()
                .is_none_or(|(n_victims, _, _)| v.len() < *n_victims)
            {
                best = Some((v.len(), i, v));
            }
        }
    }
    let Some((_, i, mut victims)) = best else {
        return false;
    };
    victims.sort_unstable_by(|a, b| b.cmp(a));
    for idx in victims {
        let r = st.reservations[i].remove(idx);
        st.release(i, &r);
        let victim = r.deployment;
        let node = &nodes[i].name;
        if let Some(pos) = decisions[victim]
            .assignments
            .iter()
            .position(|a| &a.node == node)
        {
            let removed = decisions[victim].assignments.remove(pos);
            if removed.role == PlacementRole::Serving {
                st.add_replica(victim, i, -1);
                st.serving[i] =
                    st.serving[i].saturating_sub(deployments[victim].device_bytes(&nodes[i]));
            }
        }
        decisions[victim].preempted_by = Some(d.key.clone());
        if !decisions[di].preempted.contains(&deployments[victim].key) {
            decisions[di]
                .preempted
                .push(deployments[victim].key.clone());
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn node(name: &str) -> Node {
        Node {
            name: name.into(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            schedulable: true,
            healthy: true,
            ram_budget: 32 * G,
            device_budgets: vec![20 * G],
            cpu_only: false,
            resident: HashMap::new(),
            local: None,
            disk_bps: 2e9,
            ram_to_device_bps: 20e9,
            serving_bytes: 0,
        }
    }

    fn dep(key: &str, model: &str, replicas: u32, warm: WarmTier) -> Deployment {
        Deployment {
            key: key.into(),
            model: model.into(),
            size: Sizes::uniform(5 * G),
            replicas,
            warm,
            priority: 0,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            max_per_node: 1,
            spread_key: None,
            current: Vec::new(),
            fetch: None,
        }
    }

    fn nodes_of(d: &Decision) -> Vec<&str> {
        d.assignments.iter().map(|a| a.node.as_str()).collect()
    }

    #[test]
    fn an_agent_without_a_gpu_is_charged_f32_and_ram_the_files() {
        let mut cpu = node("cpu");
        cpu.cpu_only = true;
        let gpu = node("gpu");
        let mut d = dep("ns/xl", "xl", 1, WarmTier::Vram);
        d.size = Sizes {
            gpu: 12 * G,
            cpu: 24 * G,
            ram: 7 * G,
        };
        // 24 GiB at F32 does not fit the CPU agent's 20 GiB; 12 GiB on the GPU does.
        let out = plan(
            &[cpu.clone(), gpu.clone()],
            &[d.clone()],
            Options::default(),
        );
        assert_eq!(nodes_of(&out[0]), ["gpu"]);
        assert_eq!(
            plan(&[cpu.clone()], &[d.clone()], Options::default())[0].reason_code,
            Some("InsufficientVram")
        );
        // Kept warm in RAM, the files are what count: 7 GiB of a 8 GiB budget.
        d.warm = WarmTier::Ram;
        d.size.cpu = 12 * G;
        let mut small = cpu;
        small.ram_budget = 8 * G;
        assert_eq!(
            nodes_of(&plan(&[small], &[d], Options::default())[0]),
            ["cpu"]
        );
    }

    #[test]
    fn prefers_vram_then_ram_then_disk_residency() {
        let mut a = node("a");
        let mut b = node("b");
        let c = node("c");
        b.resident.insert("m".into(), Tier::Ram);
        let d = plan(
            &[a.clone(), b.clone(), c.clone()],
            &[dep("ns/x", "m", 1, WarmTier::None)],
            Options::default(),
        );
        assert_eq!(nodes_of(&d[0]), ["b"]);
        a.resident.insert("m".into(), Tier::Vram);
        let d = plan(
            &[a, b, c],
            &[dep("ns/x", "m", 1, WarmTier::None)],
            Options::default(),
        );
        assert_eq!(nodes_of(&d[0]), ["a"]);
    }

    #[test]
    fn a_downloadable_model_goes_where_a_copy_is_then_anywhere_it_fits() {
        let with = |name: &str, models: &[&str]| Node {
            local: Some(models.iter().map(|m| m.to_string()).collect()),
            ..node(name)
        };
        let nodes = [with("a", &[]), with("b", &["m"]), with("c", &[])];
        let mut d = dep("ns/x", "m", 3, WarmTier::None);
        let out = plan(&nodes, std::slice::from_ref(&d), Options::default());
        assert_eq!(nodes_of(&out[0]), ["b"], "without a source only b has it");
        assert_eq!(out[0].unplaced, 2);
        d.fetch = Some(Fetch::Source);
        let out = plan(&nodes, &[d], Options::default());
        assert_eq!(out[0].unplaced, 0);
        assert_eq!(nodes_of(&out[0])[0], "b", "the copy on disk is cheapest");
        assert_eq!(out[0].assignments.len(), 3);
        // The download costs latency plus the bytes at the source's bandwidth,
        // instead of the disk read.
        let st = State::new(&nodes, Options::default());
        let d = dep("ns/x", "m", 1, WarmTier::None);
        let (local, remote) = (st.load_seconds(1, &d), st.load_seconds(0, &d));
        let expected = 1.0 + (5 * G) as f64 / DEFAULT_SOURCE_BPS - (5 * G) as f64 / 2e9;
        assert!((remote - local - expected).abs() < 1e-9, "{remote} {local}");
        // A copy from another node costs the peer link instead, and wins over the source.
        let peer = Deployment {
            fetch: Some(Fetch::Peer),
            ..dep("ns/x", "m", 1, WarmTier::None)
        };
        let source = Deployment {
            fetch: Some(Fetch::Source),
            ..peer.clone()
        };
        let expected = PEER_LATENCY_S + (5 * G) as f64 / DEFAULT_PEER_BPS - (5 * G) as f64 / 2e9;
        assert!((st.load_seconds(0, &peer) - local - expected).abs() < 1e-9);
        assert!(st.load_seconds(0, &peer) < st.load_seconds(0, &source));
    }

    #[test]
    fn unschedulable_reason_reads_like_kube_scheduler() {
        let mut nodes: Vec<Node> = (0..12).map(|i| node(&format!("n{i:02}"))).collect();
        for n in nodes.iter_mut().take(5) {
            n.labels.insert("pool".into(), "other".into());
        }
        for n in nodes.iter_mut().skip(5) {
            n.labels.insert("pool".into(), "gpu".into());
            n.device_budgets = vec![4 * G];
        }
        let mut d = dep("ns/big", "m", 1, WarmTier::Vram);
        d.node_selector.insert("pool".into(), "gpu".into());
        let out = plan(&nodes, &[d], Options::default());
        assert_eq!(out[0].unplaced, 1);
        assert_eq!(out[0].reason.as_deref(), Some("0/12 nodes are available: 7 Insufficient VRAM, 5 node(s) didn't match node selector."));
    }

    #[test]
    fn taints_need_tolerations_and_stale_nodes_are_skipped() {
        let mut a = node("a");
        a.taints.push(Taint {
            key: "nvidia.com/gpu".into(),
            value: "".into(),
            effect: "NoSchedule".into(),
        });
        let mut b = node("b");
        b.healthy = false;
        let d = dep("ns/x", "m", 1, WarmTier::None);
        let out = plan(
            &[a.clone(), b.clone()],
            std::slice::from_ref(&d),
            Options::default(),
        );
        assert_eq!(out[0].reason.as_deref(), Some("0/2 nodes are available: 1 node(s) had untolerated taint, 1 node(s) were not ready (agent lease expired)."));
        let mut tol = d;
        tol.tolerations.push(Toleration {
            key: "nvidia.com/gpu".into(),
            operator: "Exists".into(),
            value: "".into(),
            effect: "".into(),
        });
        assert_eq!(
            nodes_of(&plan(&[a, b], &[tol], Options::default())[0]),
            ["a"]
        );
    }

    #[test]
    fn keeps_feasible_placements_and_respects_the_per_node_cap() {
        let nodes = vec![node("a"), node("b"), node("c")];
        let mut d = dep("ns/x", "m", 2, WarmTier::None);
        d.current = vec![Assignment {
            node: "c".into(),
            role: PlacementRole::Serving,
        }];
        let out = plan(&nodes, &[d.clone()], Options::default());
        assert_eq!(out[0].assignments.len(), 2);
        assert_eq!(out[0].assignments[0].node, "c", "existing placement kept");
        let mut many = d;
        many.replicas = 4;
        let out = plan(&nodes, &[many], Options::default());
        assert_eq!((out[0].assignments.len(), out[0].unplaced), (3, 1));
    }

    #[test]
    fn spreads_over_zones() {
        let mut nodes: Vec<Node> = (0..4).map(|i| node(&format!("n{i}"))).collect();
        for (i, n) in nodes.iter_mut().enumerate() {
            n.labels
                .insert("zone".into(), if i < 2 { "z1" } else { "z2" }.into());
        }
        let mut d = dep("ns/x", "m", 2, WarmTier::None);
        d.spread_key = Some("zone".into());
        let out = plan(&nodes, &[d], Options::default());
        let zones: std::collections::BTreeSet<_> = out[0]
            .assignments
            .iter()
            .map(|a| nodes.iter().find(|n| n.name == a.node).unwrap().labels["zone"].clone())
            .collect();
        assert_eq!(zones.len(), 2);
    }

    #[test]
    fn higher_priority_preempts_lower_warm_reservations() {
        let mut a = node("a");
        a.device_budgets = vec![8 * G];
        let mut low = dep("ns/low", "m1", 1, WarmTier::Vram);
        low.priority = -10;
        low.current = vec![Assignment {
            node: "a".into(),
            role: PlacementRole::Serving,
        }];
        let mut high = dep("ns/high", "m2", 1, WarmTier::Vram);
        high.priority = 100;
        let out = plan(&[a], &[low, high], Options::default());
        assert_eq!(nodes_of(&out[1]), ["a"]);
        assert_eq!(out[1].preempted, ["ns/low"]);
        assert_eq!(out[0].preempted_by.as_deref(), Some("ns/high"));
        assert_eq!(out[0].unplaced, 1);
    }

    #[test]
    fn scaled_to_zero_keeps_one_warm_copy() {
        let d = dep("ns/x", "m", 0, WarmTier::Ram);
        let out = plan(&[node("a")], &[d], Options::default());
        assert_eq!(
            out[0].assignments,
            [Assignment {
                node: "a".into(),
                role: PlacementRole::Warm
            }]
        );
    }

    #[test]
    fn plan_for_decides_only_the_target_but_respects_others_placements() {
        let mut a = node("a");
        a.device_budgets = vec![6 * G];
        let b = node("b");
        let mut held = dep("ns/held", "m1", 1, WarmTier::Vram);
        held.current = vec![Assignment {
            node: "b".into(),
            role: PlacementRole::Serving,
        }];
        let waiting = dep("ns/waiting", "m2", 1, WarmTier::Vram);
        let target = dep("ns/target", "m3", 1, WarmTier::Vram);
        let out = plan_for(&[a, b], &[held, waiting, target], 2, Options::default());
        assert_eq!(nodes_of(&out[0]), ["b"], "others' placements are kept");
        assert!(
            out[1].assignments.is_empty(),
            "others' missing replicas wait for their own reconcile"
        );
        // b is busier (held's 5 GiB), so the target goes to a.
        assert_eq!(nodes_of(&out[2]), ["a"]);
    }

    #[test]
    fn deterministic() {
        let nodes: Vec<Node> = (0..20).map(|i| node(&format!("n{i}"))).collect();
        let deps: Vec<Deployment> = (0..30)
            .map(|i| {
                dep(
                    &format!("ns/d{i}"),
                    &format!("m{}", i % 7),
                    2,
                    WarmTier::Ram,
                )
            })
            .collect();
        assert_eq!(
            plan(&nodes, &deps, Options::default()),
            plan(&nodes, &deps, Options::default())
        );
    }
}
