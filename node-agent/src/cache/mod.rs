//! The two-tier model cache.
//!
//! - **RAM tier**: each model's file bytes in its own anonymous mapping
//!   ([`region`]), charged at the region's size.
//! - **Device tier**: each model's tensors at compute precision on a compute
//!   device (GPU memory with the `cuda` feature, a second budgeted copy on the
//!   CPU otherwise), charged at their exact size. A node with several GPUs has
//!   one device tier per GPU, each with its own budget; a model lives on one of
//!   them, placed where there is room ([`ModelCache::get_device`]).
//!
//! Both tiers are LRU caches under byte budgets. A [`ModelGuard`] locks a model
//! while a request uses it; locked and pinned (warm) models are never evicted.
//! Room is made *before* a load; when it cannot be made the load fails with
//! [`CacheError::CacheFull`] instead of overshooting the budget. Concurrent
//! requests for a model that is loading wait for that one load.

pub mod key;
pub mod model;
pub mod region;

pub use key::CacheKey;
pub use model::{DeviceModel, RamModel, RamPlan, RegionTensor};

use crate::memory::{self, MemoryReading};
use candle_core::{DType, Device};
use modelcache_crds::{Tier, WarmTier};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Which tier of the cache. The API speaks of the same places as
/// [`Tier`] (where a copy of a model is: `Disk`, `Ram`, `Vram`) and asks for
/// them as [`WarmTier`]; the conversions below are the only place they meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TierKind {
    Ram,
    Device,
}

impl From<TierKind> for Tier {
    fn from(t: TierKind) -> Tier {
        match t {
            TierKind::Ram => Tier::Ram,
            TierKind::Device => Tier::Vram,
        }
    }
}

impl TierKind {
    /// The tier a ModelDeployment's `warmTier` keeps a model in; `None` keeps it nowhere.
    pub fn for_warm(warm: WarmTier) -> Option<TierKind> {
        match warm {
            WarmTier::None => None,
            WarmTier::Ram => Some(TierKind::Ram),
            WarmTier::Vram => Some(TierKind::Device),
        }
    }

    /// The metric label (`tier="ram|vram"`).
    pub fn label(self) -> &'static str {
        match self {
            TierKind::Ram => "ram",
            TierKind::Device => "vram",
        }
    }
}

impl fmt::Display for TierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TierKind::Ram => "RAM",
            TierKind::Device => "device",
        })
    }
}

/// Cache errors; `CacheFull` becomes HTTP 503, the rest name the model.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("cache full: cannot make room for {key} ({needed} bytes) in the {tier} tier: budget {budget} bytes, {locked} bytes locked by requests in progress, {pinned} bytes kept warm")]
    CacheFull {
        tier: TierKind,
        key: CacheKey,
        needed: u64,
        budget: u64,
        locked: u64,
        pinned: u64,
    },
    #[error("loading {key}: {message}")]
    Load { key: CacheKey, message: String },
}

/// Where a model's bytes come from. The store's loader reads model files;
/// tests substitute their own.
pub trait Loader: Send + Sync {
    /// The file ranges and tensors of the weights `key` names.
    fn plan(&self, key: &CacheKey) -> Result<RamPlan, CacheError>;
}

/// Loads paths (weights files or diffusers component folders) from disk.
pub struct DiskLoader;

impl Loader for DiskLoader {
    fn plan(&self, key: &CacheKey) -> Result<RamPlan, CacheError> {
        model::plan_path(key.path()).map_err(|e| CacheError::Load {
            key: key.clone(),
            message: e.to_string(),
        })
    }
}

/// One device tier: a compute device and its byte budget.
#[derive(Debug, Clone)]
pub struct DeviceSlot {
    pub device: Device,
    pub budget: u64,
}

/// Budgets and behaviour.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub ram_budget: u64,
    /// One device tier per compute device (one per GPU). Never empty: an empty
    /// list becomes a CPU tier with no room.
    pub devices: Vec<DeviceSlot>,
    /// Compute dtype of the device tiers.
    pub dtype: DType,
    /// Threads that fill a RAM region.
    pub load_threads: usize,
    /// `malloc_trim(0)` after evictions.
    pub trim_on_evict: bool,
}

impl CacheConfig {
    /// Budgets on the CPU device, which computes in f32 (the device tier is then a
    /// second budgeted copy in RAM); 2 loader threads, no trim after evictions.
    pub fn cpu(ram_budget: u64, device_budget: u64) -> Self {
        CacheConfig {
            ram_budget,
            devices: vec![DeviceSlot {
                device: Device::Cpu,
                budget: device_budget,
            }],
            dtype: DType::F32,
            load_threads: 2,
            trim_on_evict: false,
        }
    }

    /// Budgets for a one-shot generation of one model (`modelcache-agent
    /// generate`): room for its RAM copy and its copy on `device` at f32
    /// (`model_bytes`), its adapters' copies (`adapter_bytes`), and 64 MiB of slack.
    pub fn for_one_model(
        device: Device,
        dtype: DType,
        model_bytes: u64,
        adapter_bytes: u64,
    ) -> Self {
        let budget = model_bytes * 2 + adapter_bytes + (64 << 20);
        CacheConfig {
            devices: vec![DeviceSlot { device, budget }],
            dtype,
            ..CacheConfig::cpu(budget, budget)
        }
    }
}

/// Counters and gauges of one tier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TierStats {
    pub budget: u64,
    pub used: u64,
    pub models: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub high_water: u64,
    pub loads: u64,
    pub load_bytes: u64,
    pub load_seconds: f64,
    /// Moving average of load bandwidth (bytes/s); 0 until measured.
    pub bandwidth: f64,
}

impl TierStats {
    /// Several device tiers' statistics as one (the `vram` metrics and status):
    /// sums, with the load bandwidth over all their loads.
    fn sum(all: impl IntoIterator<Item = TierStats>) -> TierStats {
        let mut t = TierStats::default();
        for s in all {
            t.budget += s.budget;
            t.used += s.used;
            t.models += s.models;
            t.hits += s.hits;
            t.misses += s.misses;
            t.evictions += s.evictions;
            t.high_water += s.high_water;
            t.loads += s.loads;
            t.load_bytes += s.load_bytes;
            t.load_seconds += s.load_seconds;
        }
        if t.load_seconds > 0.0 {
            t.bandwidth = t.load_bytes as f64 / t.load_seconds;
        }
        t
    }
}

/// One resident model, for status reports.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryInfo {
    pub key: CacheKey,
    pub tier: TierKind,
    /// Index of the device tier (into [`CacheConfig::devices`]); 0 in the RAM tier.
    pub slot: usize,
    pub bytes: u64,
    pub locked: bool,
    pub pinned: bool,
    pub loading: bool,
    pub idle: Duration,
}

/// A load in progress that others wait on.
struct LoadWait {
    done: Mutex<Option<Result<(), CacheError>>>,
    cv: Condvar,
}

impl LoadWait {
    fn new() -> Arc<Self> {
        Arc::new(LoadWait {
            done: Mutex::new(None),
            cv: Condvar::new(),
        })
    }

    fn finish(&self, r: Result<(), CacheError>) {
        *lock(&self.done) = Some(r);
        self.cv.notify_all();
    }

    fn wait(&self) -> Result<(), CacheError> {
        let mut g = lock(&self.done);
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

enum Slot<T> {
    Loading(Arc<LoadWait>),
    Ready(Arc<T>),
}

struct Entry<T> {
    slot: Slot<T>,
    bytes: u64,
    locks: usize,
    pinned: bool,
    last_used: Instant,
    tick: u64,
}

/// One tier's entries and counters (the RAM tier, or one device's tier).
struct Shelf<T> {
    kind: TierKind,
    entries: HashMap<CacheKey, Entry<T>>,
    stats: TierStats,
    tick: u64,
    /// Bytes held by [`Reservation`]s (counted in `stats.used`, never evictable).
    reserved: u64,
}

impl<T> Shelf<T> {
    fn new(kind: TierKind, budget: u64) -> Self {
        Shelf {
            kind,
            entries: HashMap::new(),
            stats: TierStats {
                budget,
                ..Default::default()
            },
            tick: 0,
            reserved: 0,
        }
    }

    /// The entries eviction may remove: unlocked, unpinned and ready.
    fn evictable_entries(&self) -> impl Iterator<Item = (&CacheKey, &Entry<T>)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.locks == 0 && !e.pinned && matches!(e.slot, Slot::Ready(_)))
    }

    /// Bytes that eviction could free.
    fn evictable(&self) -> u64 {
        self.evictable_entries().map(|(_, e)| e.bytes).sum()
    }

    fn stats(&self) -> TierStats {
        TierStats {
            models: self.entries.len(),
            ..self.stats.clone()
        }
    }

    fn free(&self) -> u64 {
        self.stats.budget.saturating_sub(self.stats.used)
    }

    fn touch(&mut self, key: &CacheKey) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(key) {
            e.tick = tick;
            e.last_used = Instant::now();
        }
    }

    /// Evicts least-recently-used unlocked, unpinned, ready entries until
    /// `needed` more bytes fit. Fails without evicting anything if they cannot.
    fn make_room(&mut self, key: &CacheKey, needed: u64) -> Result<Vec<Arc<T>>, CacheError> {
        let budget = self.stats.budget;
        if self.stats.used + needed <= budget {
            return Ok(Vec::new());
        }
        if self.stats.used - self.evictable() + needed > budget {
            let locked = self
                .entries
                .values()
                .filter(|e| e.locks > 0 || matches!(e.slot, Slot::Loading(_)))
                .map(|e| e.bytes)
                .sum::<u64>()
                + self.reserved;
            let pinned = self
                .entries
                .values()
                .filter(|e| e.pinned && e.locks == 0)
                .map(|e| e.bytes)
                .sum();
            return Err(CacheError::CacheFull {
                tier: self.kind,
                key: key.clone(),
                needed,
                budget,
                locked,
                pinned,
            });
        }
        let mut candidates: Vec<(u64, CacheKey)> = self
            .evictable_entries()
            .map(|(k, e)| (e.tick, k.clone()))
            .collect();
        candidates.sort();
        let mut evicted = Vec::new();
        for (_, k) in candidates {
            if self.stats.used + needed <= budget {
                break;
            }
            if let Some(e) = self.entries.remove(&k) {
                self.stats.used -= e.bytes;
                self.stats.evictions += 1;
                tracing::info!(tier = %self.kind, key = %k, bytes = e.bytes, "evicted");
                if let Slot::Ready(m) = e.slot {
                    evicted.push(m);
                }
            }
        }
        Ok(evicted)
    }

    fn reserve(&mut self, key: &CacheKey, bytes: u64, wait: Arc<LoadWait>) {
        self.tick += 1;
        self.entries.insert(
            key.clone(),
            Entry {
                slot: Slot::Loading(wait),
                bytes,
                locks: 1,
                pinned: false,
                last_used: Instant::now(),
                tick: self.tick,
            },
        );
        self.stats.used += bytes;
        self.stats.high_water = self.stats.high_water.max(self.stats.used);
    }

    fn complete(&mut self, key: &CacheKey, value: Arc<T>, bytes: u64, seconds: f64) {
        if let Some(e) = self.entries.get_mut(key) {
            self.stats.used = self.stats.used - e.bytes + bytes;
            e.bytes = bytes;
            e.slot = Slot::Ready(value);
        }
        self.stats.high_water = self.stats.high_water.max(self.stats.used);
        self.stats.loads += 1;
        self.stats.load_bytes += bytes;
        self.stats.load_seconds += seconds;
        if seconds > 0.0 {
            let bw = bytes as f64 / seconds;
            self.stats.bandwidth = if self.stats.bandwidth == 0.0 {
                bw
            } else {
                0.8 * self.stats.bandwidth + 0.2 * bw
            };
        }
    }

    /// Removes an idle entry now (unpinning it first); a locked one is only unpinned.
    fn evict_now(&mut self, key: &CacheKey) -> Option<Entry<T>> {
        let e = self.entries.get_mut(key)?;
        e.pinned = false;
        if e.locks > 0 || !matches!(e.slot, Slot::Ready(_)) {
            return None;
        }
        let e = self.entries.remove(key)?;
        self.stats.used -= e.bytes;
        self.stats.evictions += 1;
        Some(e)
    }

    fn abort(&mut self, key: &CacheKey) {
        if let Some(e) = self.entries.remove(key) {
            self.stats.used -= e.bytes;
        }
    }
}

struct State {
    ram: Shelf<RamModel>,
    devs: Vec<Shelf<DeviceModel>>,
}

impl State {
    fn tiers<T: TierValue>(&mut self) -> &mut [Shelf<T>] {
        T::tiers(self)
    }
}

/// The device tier a model of `needed` bytes goes to: of those where it fits
/// without evicting anything, the one with the most free bytes (spreading
/// models keeps more of them resident); otherwise the one where eviction can
/// free the most. Ties go to the lowest index.
fn choose_slot<T>(tiers: &[Shelf<T>], needed: u64) -> usize {
    let rank = |t: &Shelf<T>| {
        let free = t.free();
        (
            free >= needed,
            if free >= needed {
                free
            } else {
                free + t.evictable()
            },
        )
    };
    let mut best = 0;
    for (i, t) in tiers.iter().enumerate().skip(1) {
        if rank(t) > rank(&tiers[best]) {
            best = i;
        }
    }
    best
}

/// Lets generic code reach the tiers a value type lives in (one RAM tier, one
/// device tier per device). Sealed: its method names private types, so only
/// this module can implement it.
#[allow(private_interfaces)]
pub trait TierValue: Send + Sync + Sized + 'static {
    #[doc(hidden)]
    fn tiers(state: &mut State) -> &mut [Shelf<Self>];

    /// The memory an evicted copy leaves for the load that evicted it.
    #[doc(hidden)]
    fn spare(self) -> Option<region::Region> {
        None
    }
}

#[allow(private_interfaces)]
impl TierValue for RamModel {
    fn tiers(state: &mut State) -> &mut [Shelf<Self>] {
        std::slice::from_mut(&mut state.ram)
    }

    fn spare(self) -> Option<region::Region> {
        Some(self.region)
    }
}

#[allow(private_interfaces)]
impl TierValue for DeviceModel {
    fn tiers(state: &mut State) -> &mut [Shelf<Self>] {
        &mut state.devs
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps half-updated in a way
    // that breaks accounting more than losing the process would; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    state: Mutex<State>,
    loader: Box<dyn Loader>,
    config: CacheConfig,
    load_seconds: Option<prometheus::HistogramVec>,
}

/// The model cache. Cheap to clone; all clones share the same tiers.
#[derive(Clone)]
pub struct ModelCache {
    inner: Arc<Inner>,
}

/// A model locked for use. While it lives the model stays resident in its tier.
pub struct ModelGuard<T: TierValue> {
    cache: Arc<Inner>,
    key: CacheKey,
    slot: usize,
    value: Arc<T>,
}

impl<T: TierValue> std::ops::Deref for ModelGuard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: TierValue> fmt::Debug for ModelGuard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelGuard")
            .field("key", &self.key)
            .field("slot", &self.slot)
            .finish()
    }
}

impl<T: TierValue> ModelGuard<T> {
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// The device tier holding the model (an index into [`CacheConfig::devices`]);
    /// 0 for the RAM tier.
    pub fn slot(&self) -> usize {
        self.slot
    }
}

/// Device-tier bytes held for memory a request makes outside the cache's
/// entries (a LoRA's patched weight copies), so that it counts against the
/// budget like a locked model and cannot push the device past it. Released on drop.
pub struct Reservation {
    cache: Arc<Inner>,
    slot: usize,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = lock(&self.cache.state);
        if let Some(dev) = st.devs.get_mut(self.slot) {
            dev.reserved = dev.reserved.saturating_sub(self.bytes);
            dev.stats.used = dev.stats.used.saturating_sub(self.bytes);
        }
    }
}

impl<T: TierValue> Drop for ModelGuard<T> {
    fn drop(&mut self) {
        let mut st = lock(&self.cache.state);
        if let Some(tier) = st.tiers::<T>().get_mut(self.slot) {
            if let Some(e) = tier.entries.get_mut(&self.key) {
                e.locks = e.locks.saturating_sub(1);
            }
            tier.touch(&self.key);
        }
    }
}

impl ModelCache {
    pub fn new(
        mut config: CacheConfig,
        loader: Box<dyn Loader>,
        registry: Option<&prometheus::Registry>,
    ) -> Self {
        let load_seconds = registry.and_then(|r| {
            let h = prometheus::HistogramVec::new(
                prometheus::HistogramOpts::new(
                    "modelcache_model_load_seconds",
                    "Seconds to load a model into a cache tier, by source and destination tier",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
                &["from", "to"],
            )
            .ok()?;
            r.register(Box::new(h.clone())).ok()?;
            Some(h)
        });
        if config.devices.is_empty() {
            config.devices.push(DeviceSlot {
                device: Device::Cpu,
                budget: 0,
            });
        }
        let state = State {
            ram: Shelf::new(TierKind::Ram, config.ram_budget),
            devs: config
                .devices
                .iter()
                .map(|d| Shelf::new(TierKind::Device, d.budget))
                .collect(),
        };
        ModelCache {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                loader,
                config,
                load_seconds,
            }),
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Holds `bytes` of device tier `slot` for `what` (evicting idle models
    /// there if needed), or fails with `CacheFull` when they cannot be made free.
    pub fn reserve_device(
        &self,
        what: &CacheKey,
        slot: usize,
        bytes: u64,
    ) -> Result<Reservation, CacheError> {
        let evicted = {
            let mut st = lock(&self.inner.state);
            let dev = st.devs.get_mut(slot).ok_or_else(|| CacheError::Load {
                key: what.clone(),
                message: format!("no device tier {slot}"),
            })?;
            let evicted = dev.make_room(what, bytes)?;
            dev.reserved += bytes;
            dev.stats.used += bytes;
            dev.stats.high_water = dev.stats.high_water.max(dev.stats.used);
            evicted
        };
        drop(evicted);
        Ok(Reservation {
            cache: self.inner.clone(),
            slot,
            bytes,
        })
    }

    /// Bytes of device tier `slot` that are free or held by idle models
    /// (which a reservation would evict): what a batch's extra images'
    /// activations may take.
    pub fn device_headroom(&self, slot: usize) -> u64 {
        let st = lock(&self.inner.state);
        st.devs.get(slot).map_or(0, |dev| {
            dev.stats
                .budget
                .saturating_sub(dev.stats.used.saturating_sub(dev.evictable()))
        })
    }

    /// Loads `key` into `tier` (at the compute dtype) and pins it there
    /// (warm): never evicted until [`Self::unpin`] or [`Self::drop_model`].
    pub fn warm(&self, key: &CacheKey, tier: TierKind) -> Result<(), CacheError> {
        self.warm_as(key, tier, self.inner.config.dtype)
    }

    /// [`Self::warm`] with the device copy at `dtype`.
    pub fn warm_as(&self, key: &CacheKey, tier: TierKind, dtype: DType) -> Result<(), CacheError> {
        match tier {
            TierKind::Ram => {
                drop(self.get_ram(key)?);
                self.set_pinned::<RamModel>(&key.weights(), true);
            }
            TierKind::Device => {
                drop(self.get_device_as(key, dtype)?);
                self.set_pinned::<DeviceModel>(&key.at(dtype), true);
            }
        }
        Ok(())
    }

    /// The dtype a device copy is computed in when `requested` is asked for:
    /// the request's (a deployment's precision), else the configured one; F32
    /// when every device is the CPU, which computes in f32.
    pub fn dtype_for(&self, requested: Option<DType>) -> DType {
        let config = &self.inner.config;
        if config.devices.iter().all(|d| d.device.is_cpu()) {
            return DType::F32;
        }
        requested.unwrap_or(config.dtype)
    }

    /// Unpins `key` in all tiers (at every dtype unless the key names one)
    /// and evicts it from them unless a request is using it.
    pub fn drop_model(&self, key: &CacheKey) {
        let (dev, ram) = {
            let mut st = lock(&self.inner.state);
            let dev: Vec<_> = st
                .devs
                .iter_mut()
                .flat_map(|t| {
                    let covered: Vec<CacheKey> = t
                        .entries
                        .keys()
                        .filter(|k| key.covers(k))
                        .cloned()
                        .collect();
                    covered
                        .iter()
                        .filter_map(|k| t.evict_now(k))
                        .collect::<Vec<_>>()
                })
                .collect();
            (dev, st.ram.evict_now(&key.weights()))
        };
        let any = !dev.is_empty() || ram.is_some();
        drop((dev, ram));
        if any && self.inner.config.trim_on_evict {
            memory::trim();
        }
    }

    /// Unpins `key` in `tier` (it stays cached but becomes evictable), at
    /// every dtype unless the key names one.
    pub fn unpin(&self, key: &CacheKey, tier: TierKind) {
        match tier {
            TierKind::Ram => self.set_pinned::<RamModel>(key, false),
            TierKind::Device => self.set_pinned::<DeviceModel>(key, false),
        }
    }

    fn set_pinned<T: TierValue>(&self, key: &CacheKey, pinned: bool) {
        let mut st = lock(&self.inner.state);
        for tier in st.tiers::<T>() {
            for (_, e) in tier.entries.iter_mut().filter(|(k, _)| key.covers(k)) {
                e.pinned = pinned;
            }
        }
    }

    /// The RAM tier's statistics and the device tiers' together.
    pub fn stats(&self) -> (TierStats, TierStats) {
        let st = lock(&self.inner.state);
        (
            st.ram.stats(),
            TierStats::sum(st.devs.iter().map(Shelf::stats)),
        )
    }

    /// Each device tier's statistics, in the order of [`CacheConfig::devices`].
    pub fn device_stats(&self) -> Vec<TierStats> {
        lock(&self.inner.state)
            .devs
            .iter()
            .map(Shelf::stats)
            .collect()
    }

    /// Every entry of all tiers, most recently used first.
    pub fn entries(&self) -> Vec<EntryInfo> {
        let st = lock(&self.inner.state);
        let mut out: Vec<(u64, EntryInfo)> = Vec::new();
        fn collect<T>(slot: usize, tier: &Shelf<T>, out: &mut Vec<(u64, EntryInfo)>) {
            for (k, e) in &tier.entries {
                out.push((
                    e.tick,
                    EntryInfo {
                        key: k.clone(),
                        tier: tier.kind,
                        slot,
                        bytes: e.bytes,
                        locked: e.locks > 0,
                        pinned: e.pinned,
                        loading: matches!(e.slot, Slot::Loading(_)),
                        idle: e.last_used.elapsed(),
                    },
                ));
            }
        }
        collect(0, &st.ram, &mut out);
        for (i, t) in st.devs.iter().enumerate() {
            collect(i, t, &mut out);
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        out.into_iter().map(|(_, e)| e).collect()
    }

    /// Hit, wait for a load in progress, or load exactly once: `prepare` (run
    /// only on a miss, outside the lock) says how many bytes the model needs,
    /// a tier with room is chosen, room is made and reserved there, then
    /// `build` makes the model for that tier. While it is prepared the load is
    /// claimed in the first tier, so that concurrent callers wait for it.
    fn acquire<T: TierValue, P>(
        &self,
        key: &CacheKey,
        prepare: impl FnOnce() -> Result<(u64, P), CacheError>,
        build: impl FnOnce(P, usize, Vec<region::Region>) -> Result<(T, u64), CacheError>,
    ) -> Result<ModelGuard<T>, CacheError> {
        let wait = LoadWait::new();
        loop {
            let mut st = lock(&self.inner.state);
            let tiers = st.tiers::<T>();
            let Some(slot) = tiers.iter().position(|t| t.entries.contains_key(key)) else {
                // This caller loads; others now wait on `wait`.
                tiers[0].reserve(key, 0, wait.clone());
                break;
            };
            let tier = &mut tiers[slot];
            match tier.entries.get_mut(key) {
                Some(Entry {
                    slot: Slot::Ready(v),
                    locks,
                    ..
                }) => {
                    *locks += 1;
                    let value = v.clone();
                    tier.stats.hits += 1;
                    tier.touch(key);
                    return Ok(ModelGuard {
                        cache: self.inner.clone(),
                        key: key.clone(),
                        slot,
                        value,
                    });
                }
                Some(Entry {
                    slot: Slot::Loading(w),
                    ..
                }) => {
                    let w = w.clone();
                    drop(st);
                    w.wait()?;
                }
                None => {}
            }
        }
        let abort = |slot: usize, e: CacheError| {
            lock(&self.inner.state).tiers::<T>()[slot].abort(key);
            wait.finish(Err(e.clone()));
            e
        };
        let (reserved, input) = match prepare() {
            Ok(prepared) => prepared,
            Err(e) => {
                lock(&self.inner.state).tiers::<T>()[0].stats.misses += 1;
                return Err(abort(0, e));
            }
        };
        let (slot, evicted) = {
            let mut st = lock(&self.inner.state);
            let tiers = st.tiers::<T>();
            tiers[0].entries.remove(key);
            let slot = choose_slot(tiers, reserved);
            let tier = &mut tiers[slot];
            tier.stats.misses += 1;
            match tier.make_room(key, reserved) {
                Ok(evicted) => {
                    tier.reserve(key, reserved, wait.clone());
                    (slot, evicted)
                }
                Err(e) => {
                    drop(st);
                    wait.finish(Err(e.clone()));
                    return Err(e);
                }
            }
        };
        let had_evictions = !evicted.is_empty();
        // What nothing else holds any more is left to this load to reuse.
        let spares: Vec<region::Region> = evicted
            .into_iter()
            .filter_map(|v| Arc::try_unwrap(v).ok())
            .filter_map(T::spare)
            .collect();
        if had_evictions && self.inner.config.trim_on_evict {
            memory::trim();
        }
        let kind = lock(&self.inner.state).tiers::<T>()[slot].kind;
        let before = MemoryReading::capture(None);
        let start = Instant::now();
        match build(input, slot, spares) {
            Ok((value, bytes)) => {
                let seconds = start.elapsed().as_secs_f64();
                let after = MemoryReading::capture(None);
                let grew = after.resident.saturating_sub(before.resident);
                tracing::debug!(%key, tier = %kind, slot, bytes, seconds, "loaded\n{}", before.diff(&after));
                if kind == TierKind::Ram && memory::misaccounted(grew, bytes) {
                    tracing::warn!(%key, accounted = bytes, measured = grew, "resident memory changed by {grew} bytes loading a model accounted at {bytes} bytes");
                }
                if bytes > reserved {
                    tracing::warn!(%key, reserved, bytes, "model is larger than its reservation");
                }
                let value = Arc::new(value);
                lock(&self.inner.state).tiers::<T>()[slot].complete(
                    key,
                    value.clone(),
                    bytes,
                    seconds,
                );
                wait.finish(Ok(()));
                if let Some(h) = &self.inner.load_seconds {
                    let from = if kind == TierKind::Ram { "disk" } else { "ram" };
                    h.with_label_values(&[from, kind.label()]).observe(seconds);
                }
                Ok(ModelGuard {
                    cache: self.inner.clone(),
                    key: key.clone(),
                    slot,
                    value,
                })
            }
            Err(e) => Err(abort(slot, e)),
        }
    }

    /// The RAM copy that holds the data of `file`, locked, with where in its
    /// region that data is; `None` when no resident entry holds it.
    pub fn ram_copy_of(&self, file: &Path) -> Option<(ModelGuard<RamModel>, region::Segment)> {
        let resident: Vec<CacheKey> = self
            .entries()
            .into_iter()
            .filter(|e| e.tier == TierKind::Ram && !e.loading && file.starts_with(e.key.path()))
            .map(|e| e.key)
            .collect();
        resident.into_iter().find_map(|key| {
            // Resident a moment ago: this locks it (an eviction in between
            // would load it again, which is correct, only slower).
            let guard = self.get_ram(&key).ok()?;
            let segment = guard.segments.iter().find(|s| s.path == file)?.clone();
            Some((guard, segment))
        })
    }

    /// Locks the RAM copy of `key`, loading it if needed.
    pub fn get_ram(&self, key: &CacheKey) -> Result<ModelGuard<RamModel>, CacheError> {
        let key = &key.weights();
        let threads = self.inner.config.load_threads;
        self.acquire::<RamModel, RamPlan>(
            key,
            || {
                let plan = self.inner.loader.plan(key)?;
                let bytes = plan.bytes.max(1).div_ceil(region::REGION_ALIGN as u64)
                    * region::REGION_ALIGN as u64;
                Ok((bytes, plan))
            },
            |plan, _, spares| {
                let err = |message: String| CacheError::Load {
                    key: key.clone(),
                    message,
                };
                let mut region = region::Region::reuse(spares, plan.bytes as usize)
                    .map_err(|e| err(format!("cannot map {} bytes: {e}", plan.bytes)))?;
                region::fill(&mut region, &plan.segments, threads)
                    .map_err(|e| err(e.to_string()))?;
                let bytes = region.len() as u64;
                Ok((
                    RamModel {
                        region,
                        tensors: plan.tensors,
                        segments: plan.segments,
                    },
                    bytes,
                ))
            },
        )
    }

    /// Locks the device copy of `key` at the compute dtype, loading it
    /// (through the RAM tier) if needed onto the device tier with room
    /// ([`choose_slot`]). When the device tiers are full, least-recently-used
    /// unlocked models are offloaded from the chosen one (their RAM copies
    /// stay, so coming back is a move, not a load).
    pub fn get_device(&self, key: &CacheKey) -> Result<ModelGuard<DeviceModel>, CacheError> {
        self.get_device_as(key, self.inner.config.dtype)
    }

    /// [`Self::get_device`] at `dtype` (what a deployment computes in is
    /// [`Self::dtype_for`] its precision): each dtype is an entry of its own,
    /// charged at its own size.
    pub fn get_device_as(
        &self,
        key: &CacheKey,
        dtype: DType,
    ) -> Result<ModelGuard<DeviceModel>, CacheError> {
        let weights = key.weights();
        let key = &key.at(dtype);
        self.acquire::<DeviceModel, ModelGuard<RamModel>>(
            key,
            || {
                let ram = self.get_ram(&weights)?;
                Ok((ram.device_bytes(dtype), ram))
            },
            |ram, slot, _| {
                let needed = ram.device_bytes(dtype);
                let DeviceSlot { device, budget } = &self.inner.config.devices[slot];
                let m = ram.to_device(device, dtype).map_err(|e| {
                    let message = crate::store::error::candle_message(&e);
                    // The GPU ran out before the budget did (other processes, or
                    // activations): a full cache, not a crash.
                    if message.to_ascii_lowercase().contains("out of memory") {
                        CacheError::CacheFull {
                            tier: TierKind::Device,
                            key: key.clone(),
                            needed,
                            budget: *budget,
                            locked: 0,
                            pinned: 0,
                        }
                    } else {
                        CacheError::Load {
                            key: key.clone(),
                            message,
                        }
                    }
                })?;
                let bytes = m.bytes;
                Ok((m, bytes))
            },
        )
    }
}
