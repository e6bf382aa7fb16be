//! The two-tier model cache (ARCHITECTURE §4 `cache`).
//!
//! - **RAM tier**: each model's file bytes in its own anonymous mapping
//!   ([`region`]), charged at the region's size.
//! - **Device tier**: each model's tensors at compute precision on the compute
//!   device (GPU memory with the `cuda` feature, a second budgeted copy on the
//!   CPU otherwise), charged at their exact size.
//!
//! Both tiers are LRU caches under byte budgets. A [`ModelGuard`] locks a model
//! while a request uses it; locked and pinned (warm) models are never evicted.
//! Room is made *before* a load; when it cannot be made the load fails with
//! [`CacheError::CacheFull`] instead of overshooting the budget. Concurrent
//! requests for a model that is loading wait for that one load.

pub mod model;
pub mod region;

pub use model::{DeviceModel, RamModel, RamPlan, RegionTensor};

use crate::memory::{self, Snapshot};
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Which tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TierKind {
    Ram,
    Device,
}

impl TierKind {
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
        key: String,
        needed: u64,
        budget: u64,
        locked: u64,
        pinned: u64,
    },
    #[error("loading {key}: {message}")]
    Load { key: String, message: String },
}

/// Where a model's bytes come from. The store's loader reads model files;
/// tests substitute their own.
pub trait Loader: Send + Sync {
    /// The file ranges and tensors of the model named `key`.
    fn plan(&self, key: &str) -> Result<RamPlan, CacheError>;
}

/// Loads paths (weights files or diffusers component folders) from disk.
pub struct DiskLoader;

impl Loader for DiskLoader {
    fn plan(&self, key: &str) -> Result<RamPlan, CacheError> {
        model::plan_path(std::path::Path::new(key)).map_err(|e| CacheError::Load {
            key: key.into(),
            message: e.to_string(),
        })
    }
}

/// Budgets and behaviour.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub ram_budget: u64,
    pub device_budget: u64,
    /// Compute device and dtype of the device tier.
    pub device: Device,
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
            device_budget,
            device: Device::Cpu,
            dtype: DType::F32,
            load_threads: 2,
            trim_on_evict: false,
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

/// One resident model, for status reports.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryInfo {
    pub key: String,
    pub tier: TierKind,
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

struct Tier<T> {
    kind: TierKind,
    entries: HashMap<String, Entry<T>>,
    stats: TierStats,
    tick: u64,
    /// Bytes held by [`Reservation`]s (counted in `stats.used`, never evictable).
    reserved: u64,
}

impl<T> Tier<T> {
    fn new(kind: TierKind, budget: u64) -> Self {
        Tier {
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

    fn touch(&mut self, key: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(key) {
            e.tick = tick;
            e.last_used = Instant::now();
        }
    }

    /// Evicts least-recently-used unlocked, unpinned, ready entries until
    /// `needed` more bytes fit. Fails without evicting anything if they cannot.
    fn make_room(&mut self, key: &str, needed: u64) -> Result<Vec<Arc<T>>, CacheError> {
        let budget = self.stats.budget;
        if self.stats.used + needed <= budget {
            return Ok(Vec::new());
        }
        let mut candidates: Vec<(u64, String, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.locks == 0 && !e.pinned && matches!(e.slot, Slot::Ready(_)))
            .map(|(k, e)| (e.tick, k.clone(), e.bytes))
            .collect();
        let evictable: u64 = candidates.iter().map(|c| c.2).sum();
        if self.stats.used - evictable + needed > budget {
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
                key: key.into(),
                needed,
                budget,
                locked,
                pinned,
            });
        }
        candidates.sort();
        let mut evicted = Vec::new();
        for (_, k, _) in candidates {
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

    fn reserve(&mut self, key: &str, bytes: u64, wait: Arc<LoadWait>) {
        self.tick += 1;
        self.entries.insert(
            key.to_string(),
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

    fn complete(&mut self, key: &str, value: Arc<T>, bytes: u64, seconds: f64) {
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
    fn evict_now(&mut self, key: &str) -> Option<Entry<T>> {
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

    fn abort(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key) {
            self.stats.used -= e.bytes;
        }
    }
}

struct State {
    ram: Tier<RamModel>,
    dev: Tier<DeviceModel>,
}

impl State {
    fn tier<T: TierValue>(&mut self) -> &mut Tier<T> {
        T::tier(self)
    }
}

/// Lets generic code reach the tier a value type lives in. Sealed: its method
/// names private types, so only this module can implement it.
#[allow(private_interfaces)]
pub trait TierValue: Send + Sync + Sized + 'static {
    #[doc(hidden)]
    fn tier(state: &mut State) -> &mut Tier<Self>;
}

#[allow(private_interfaces)]
impl TierValue for RamModel {
    fn tier(state: &mut State) -> &mut Tier<Self> {
        &mut state.ram
    }
}

#[allow(private_interfaces)]
impl TierValue for DeviceModel {
    fn tier(state: &mut State) -> &mut Tier<Self> {
        &mut state.dev
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
    key: String,
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
            .finish()
    }
}

impl<T: TierValue> ModelGuard<T> {
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// Device-tier bytes held for memory a request makes outside the cache's
/// entries (a LoRA's patched weight copies), so that it counts against the
/// budget like a locked model and cannot push the device past it. Released on drop.
pub struct Reservation {
    cache: Arc<Inner>,
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
        st.dev.reserved = st.dev.reserved.saturating_sub(self.bytes);
        st.dev.stats.used = st.dev.stats.used.saturating_sub(self.bytes);
    }
}

impl<T: TierValue> Drop for ModelGuard<T> {
    fn drop(&mut self) {
        let mut st = lock(&self.cache.state);
        let tier = st.tier::<T>();
        if let Some(e) = tier.entries.get_mut(&self.key) {
            e.locks = e.locks.saturating_sub(1);
        }
        tier.touch(&self.key);
    }
}

impl ModelCache {
    pub fn new(
        config: CacheConfig,
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
        let state = State {
            ram: Tier::new(TierKind::Ram, config.ram_budget),
            dev: Tier::new(TierKind::Device, config.device_budget),
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

    /// Holds `bytes` of the device tier for `what` (evicting idle models if
    /// needed), or fails with `CacheFull` when they cannot be made free.
    pub fn reserve_device(&self, what: &str, bytes: u64) -> Result<Reservation, CacheError> {
        let evicted = {
            let mut st = lock(&self.inner.state);
            let evicted = st.dev.make_room(what, bytes)?;
            st.dev.reserved += bytes;
            st.dev.stats.used += bytes;
            st.dev.stats.high_water = st.dev.stats.high_water.max(st.dev.stats.used);
            evicted
        };
        drop(evicted);
        Ok(Reservation {
            cache: self.inner.clone(),
            bytes,
        })
    }

    /// Loads `key` into `tier` and pins it there (warm): never evicted until
    /// [`Self::unpin`] or [`Self::drop_model`].
    pub fn warm(&self, key: &str, tier: TierKind) -> Result<(), CacheError> {
        match tier {
            TierKind::Ram => drop(self.get_ram(key)?),
            TierKind::Device => drop(self.get_device(key)?),
        }
        match tier {
            TierKind::Ram => self.set_pinned::<RamModel>(key, true),
            TierKind::Device => self.set_pinned::<DeviceModel>(key, true),
        }
        Ok(())
    }

    /// Unpins `key` in both tiers and evicts it from them unless a request is using it.
    pub fn drop_model(&self, key: &str) {
        let (dev, ram) = {
            let mut st = lock(&self.inner.state);
            (st.dev.evict_now(key), st.ram.evict_now(key))
        };
        let any = dev.is_some() || ram.is_some();
        drop((dev, ram));
        if any && self.inner.config.trim_on_evict {
            memory::trim();
        }
    }

    /// Unpins `key` in `tier` (it stays cached but becomes evictable).
    pub fn unpin(&self, key: &str, tier: TierKind) {
        match tier {
            TierKind::Ram => self.set_pinned::<RamModel>(key, false),
            TierKind::Device => self.set_pinned::<DeviceModel>(key, false),
        }
    }

    fn set_pinned<T: TierValue>(&self, key: &str, pinned: bool) {
        let mut st = lock(&self.inner.state);
        if let Some(e) = st.tier::<T>().entries.get_mut(key) {
            e.pinned = pinned;
        }
    }

    pub fn stats(&self) -> (TierStats, TierStats) {
        let st = lock(&self.inner.state);
        let ram = TierStats {
            models: st.ram.entries.len(),
            ..st.ram.stats.clone()
        };
        let dev = TierStats {
            models: st.dev.entries.len(),
            ..st.dev.stats.clone()
        };
        (ram, dev)
    }

    /// Every entry of both tiers, most recently used first.
    pub fn entries(&self) -> Vec<EntryInfo> {
        let st = lock(&self.inner.state);
        let mut out: Vec<(u64, EntryInfo)> = Vec::new();
        fn collect<T>(tier: &Tier<T>, out: &mut Vec<(u64, EntryInfo)>) {
            for (k, e) in &tier.entries {
                out.push((
                    e.tick,
                    EntryInfo {
                        key: k.clone(),
                        tier: tier.kind,
                        bytes: e.bytes,
                        locked: e.locks > 0,
                        pinned: e.pinned,
                        loading: matches!(e.slot, Slot::Loading(_)),
                        idle: e.last_used.elapsed(),
                    },
                ));
            }
        }
        collect(&st.ram, &mut out);
        collect(&st.dev, &mut out);
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        out.into_iter().map(|(_, e)| e).collect()
    }

    /// Hit, wait for a load in progress, or load exactly once: `prepare` (run
    /// only on a miss, outside the lock) says how many bytes the model needs,
    /// room is made and reserved, then `build` makes it.
    fn acquire<T: TierValue, P>(
        &self,
        key: &str,
        prepare: impl FnOnce() -> Result<(u64, P), CacheError>,
        build: impl FnOnce(P) -> Result<(T, u64), CacheError>,
    ) -> Result<ModelGuard<T>, CacheError> {
        let wait = LoadWait::new();
        loop {
            let mut st = lock(&self.inner.state);
            let tier = st.tier::<T>();
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
                        key: key.to_string(),
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
                None => {
                    // This caller loads; others now wait on `wait`.
                    tier.stats.misses += 1;
                    tier.reserve(key, 0, wait.clone());
                    break;
                }
            }
        }
        let fail = |e: CacheError| {
            lock(&self.inner.state).tier::<T>().abort(key);
            wait.finish(Err(e.clone()));
            e
        };
        let (reserved, input) = prepare().map_err(fail)?;
        let evicted = {
            let mut st = lock(&self.inner.state);
            let tier = st.tier::<T>();
            tier.entries.remove(key);
            match tier.make_room(key, reserved) {
                Ok(evicted) => {
                    tier.reserve(key, reserved, wait.clone());
                    evicted
                }
                Err(e) => {
                    drop(st);
                    wait.finish(Err(e.clone()));
                    return Err(e);
                }
            }
        };
        let had_evictions = !evicted.is_empty();
        drop(evicted);
        if had_evictions && self.inner.config.trim_on_evict {
            memory::trim();
        }
        let kind = lock(&self.inner.state).tier::<T>().kind;
        let before = Snapshot::capture(None);
        let start = Instant::now();
        match build(input) {
            Ok((value, bytes)) => {
                let seconds = start.elapsed().as_secs_f64();
                let after = Snapshot::capture(None);
                let grew = after.resident.saturating_sub(before.resident);
                tracing::debug!(key, tier = %kind, bytes, seconds, "loaded\n{}", before.diff(&after));
                if kind == TierKind::Ram && memory::misaccounted(grew, bytes) {
                    tracing::warn!(key, accounted = bytes, measured = grew, "resident memory changed by {grew} bytes loading a model accounted at {bytes} bytes");
                }
                if bytes > reserved {
                    tracing::warn!(key, reserved, bytes, "model is larger than its reservation");
                }
                let value = Arc::new(value);
                lock(&self.inner.state)
                    .tier::<T>()
                    .complete(key, value.clone(), bytes, seconds);
                wait.finish(Ok(()));
                if let Some(h) = &self.inner.load_seconds {
                    let from = if kind == TierKind::Ram { "disk" } else { "ram" };
                    h.with_label_values(&[from, kind.label()]).observe(seconds);
                }
                Ok(ModelGuard {
                    cache: self.inner.clone(),
                    key: key.to_string(),
                    value,
                })
            }
            Err(e) => Err(fail(e)),
        }
    }

    /// Locks the RAM copy of `key`, loading it if needed.
    pub fn get_ram(&self, key: &str) -> Result<ModelGuard<RamModel>, CacheError> {
        let threads = self.inner.config.load_threads;
        self.acquire::<RamModel, RamPlan>(
            key,
            || {
                let plan = self.inner.loader.plan(key)?;
                let bytes = plan.bytes.max(1).div_ceil(region::REGION_ALIGN as u64)
                    * region::REGION_ALIGN as u64;
                Ok((bytes, plan))
            },
            |plan| {
                let err = |message: String| CacheError::Load {
                    key: key.into(),
                    message,
                };
                let mut region = region::Region::new(plan.bytes as usize)
                    .map_err(|e| err(format!("cannot map {} bytes: {e}", plan.bytes)))?;
                region::fill(&mut region, &plan.segments, threads)
                    .map_err(|e| err(e.to_string()))?;
                let bytes = region.len() as u64;
                Ok((
                    RamModel {
                        region,
                        tensors: plan.tensors,
                    },
                    bytes,
                ))
            },
        )
    }

    /// Locks the device copy of `key`, loading it (through the RAM tier) if needed.
    /// When the device tier is full, least-recently-used unlocked models are
    /// offloaded from it (their RAM copies stay, so coming back is a move, not a load).
    pub fn get_device(&self, key: &str) -> Result<ModelGuard<DeviceModel>, CacheError> {
        let (device, dtype) = (self.inner.config.device.clone(), self.inner.config.dtype);
        self.acquire::<DeviceModel, ModelGuard<RamModel>>(
            key,
            || {
                let ram = self.get_ram(key)?;
                Ok((ram.device_bytes(dtype), ram))
            },
            |ram| {
                let needed = ram.device_bytes(dtype);
                let budget = self.inner.config.device_budget;
                let m = ram.to_device(&device, dtype).map_err(|e| {
                    let message = crate::store::error::candle_message(&e);
                    // The GPU ran out before the budget did (other processes, or
                    // activations): a full cache, not a crash.
                    if message.to_ascii_lowercase().contains("out of memory") {
                        CacheError::CacheFull {
                            tier: TierKind::Device,
                            key: key.into(),
                            needed,
                            budget,
                            locked: 0,
                            pinned: 0,
                        }
                    } else {
                        CacheError::Load {
                            key: key.into(),
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
