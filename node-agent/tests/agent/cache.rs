//! The model cache's promises, checked with a controllable loader and, at the
//! end, with the store's real loader on the fixture models.

use crate::common::fixtures;
use modelcache_agent::cache::region::{Segment, REGION_ALIGN};
use modelcache_agent::cache::{
    CacheConfig, CacheError, CacheKey, DeviceSlot, DiskLoader, Loader, ModelCache, RamPlan,
    RegionTensor, TierKind,
};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

const R: u64 = REGION_ALIGN as u64;

fn ck(key: impl Into<CacheKey>) -> CacheKey {
    key.into()
}

/// Models whose RAM copies are `regions` × 2 MiB; only a few bytes are read from disk.
struct FakeLoader {
    dir: tempfile::TempDir,
    sizes: HashMap<String, u64>,
    plans: Mutex<HashMap<String, u64>>,
    delay: std::time::Duration,
}

impl FakeLoader {
    fn new(sizes: &[(&str, u64)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (k, _) in sizes {
            std::fs::write(dir.path().join(k), [7u8; 64]).unwrap();
        }
        std::fs::write(dir.path().join("short"), [1u8; 10]).unwrap();
        FakeLoader {
            dir,
            sizes: sizes.iter().map(|(k, r)| (k.to_string(), *r)).collect(),
            plans: Mutex::new(HashMap::new()),
            delay: std::time::Duration::ZERO,
        }
    }

    fn plans(&self, key: &str) -> u64 {
        self.plans.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

impl Loader for FakeLoader {
    fn plan(&self, key: &CacheKey) -> Result<RamPlan, CacheError> {
        let key = key.as_str();
        *self
            .plans
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default() += 1;
        std::thread::sleep(self.delay);
        if key == "fail" {
            return Err(CacheError::Load {
                key: ck(key),
                message: "injected failure".into(),
            });
        }
        let (file, len) = if key == "short" {
            ("short", 64)
        } else {
            (key, 64)
        };
        let regions = *self.sizes.get(key).unwrap_or(&1);
        Ok(RamPlan {
            segments: vec![Segment {
                path: self.dir.path().join(file),
                file_offset: 0,
                len,
                region_offset: 0,
            }],
            tensors: vec![RegionTensor {
                name: "w".into(),
                dtype: safetensors::Dtype::F32,
                shape: vec![16],
                offset: 0,
                len: 64,
            }],
            bytes: regions * R,
        })
    }
}

fn cache_with(loader: Arc<FakeLoader>, ram_regions: u64, dev_bytes: u64) -> ModelCache {
    cache_with_devices(loader, ram_regions, &[dev_bytes])
}

/// One CPU device tier per budget, as a node with several GPUs has.
fn cache_with_devices(loader: Arc<FakeLoader>, ram_regions: u64, devices: &[u64]) -> ModelCache {
    struct Shared(Arc<FakeLoader>);
    impl Loader for Shared {
        fn plan(&self, key: &CacheKey) -> Result<RamPlan, CacheError> {
            self.0.plan(key)
        }
    }
    let config = CacheConfig {
        devices: devices
            .iter()
            .map(|&budget| DeviceSlot {
                device: candle_core::Device::Cpu,
                budget,
            })
            .collect(),
        ..CacheConfig::cpu(ram_regions * R, 0)
    };
    ModelCache::new(config, Box::new(Shared(loader)), None)
}

fn resident(cache: &ModelCache, tier: TierKind) -> Vec<String> {
    let mut v: Vec<_> = cache
        .entries()
        .into_iter()
        .filter(|e| e.tier == tier)
        .map(|e| e.key.weights().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn lru_eviction_keeps_the_recently_used_model() {
    // Budget 10; A(5), B(4), hit A, C(3) → B evicted, A kept.
    let loader = Arc::new(FakeLoader::new(&[("A", 5), ("B", 4), ("C", 3)]));
    let cache = cache_with(loader.clone(), 10, 0);
    drop(cache.get_ram(&ck("A")).unwrap());
    drop(cache.get_ram(&ck("B")).unwrap());
    drop(cache.get_ram(&ck("A")).unwrap());
    drop(cache.get_ram(&ck("C")).unwrap());
    assert_eq!(resident(&cache, TierKind::Ram), ["A", "C"]);
    let (ram, _) = cache.stats();
    assert_eq!((ram.evictions, ram.hits, ram.misses), (1, 1, 3));
    assert_eq!(ram.used, 8 * R);
}

#[test]
fn locked_models_are_never_evicted_and_full_means_cache_full() {
    let loader = Arc::new(FakeLoader::new(&[("A", 5), ("B", 4), ("C", 3), ("D", 6)]));
    let cache = cache_with(loader.clone(), 10, 0);
    let a = cache.get_ram(&ck("A")).unwrap(); // locked, least recently used
    drop(cache.get_ram(&ck("B")).unwrap());
    drop(cache.get_ram(&ck("C")).unwrap()); // needs room: B goes, not A
    assert_eq!(resident(&cache, TierKind::Ram), ["A", "C"]);
    let c = cache.get_ram(&ck("C")).unwrap();
    // Everything is locked: D cannot fit and nothing is evicted.
    let err = cache.get_ram(&ck("D")).unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::CacheFull {
                tier: TierKind::Ram,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("locked by requests in progress"));
    assert_eq!(resident(&cache, TierKind::Ram), ["A", "C"]);
    drop((a, c));
    // A model larger than the whole budget is refused up front.
    let big = Arc::new(FakeLoader::new(&[("huge", 11)]));
    let cache = cache_with(big, 10, 0);
    assert!(matches!(
        cache.get_ram(&ck("huge")).unwrap_err(),
        CacheError::CacheFull { .. }
    ));
    assert_eq!(cache.stats().0.used, 0);
}

#[test]
fn pinned_models_stay_until_dropped() {
    let loader = Arc::new(FakeLoader::new(&[("A", 5), ("B", 5), ("C", 5)]));
    let cache = cache_with(loader, 10, 0);
    cache.warm(&ck("A"), TierKind::Ram).unwrap();
    drop(cache.get_ram(&ck("B")).unwrap());
    drop(cache.get_ram(&ck("C")).unwrap()); // evicts B, not the pinned A
    assert_eq!(resident(&cache, TierKind::Ram), ["A", "C"]);
    cache.drop_model(&ck("A"));
    assert_eq!(resident(&cache, TierKind::Ram), ["C"]);
}

#[test]
fn concurrent_misses_load_once_and_share_the_result() {
    let mut fake = FakeLoader::new(&[("A", 1)]);
    fake.delay = std::time::Duration::from_millis(50);
    let loader = Arc::new(fake);
    let cache = cache_with(loader.clone(), 10, 0);
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (cache, barrier) = (cache.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let g = cache.get_ram(&ck("A")).unwrap();
                g.tensor_bytes(&g.tensors[0]).to_vec()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), vec![7u8; 64]);
    }
    assert_eq!(loader.plans("A"), 1);
    let (ram, _) = cache.stats();
    assert_eq!((ram.misses, ram.hits, ram.loads), (1, 7, 1));
}

#[test]
fn failed_loads_wake_waiters_with_the_error_and_leave_nothing() {
    let mut fake = FakeLoader::new(&[]);
    fake.delay = std::time::Duration::from_millis(30);
    let loader = Arc::new(fake);
    let cache = cache_with(loader.clone(), 10, 0);
    for key in ["fail", "short"] {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let cache = cache.clone();
                let key = key.to_string();
                std::thread::spawn(move || {
                    cache.get_ram(&ck(key)).map(|_| ()).unwrap_err().to_string()
                })
            })
            .collect();
        for h in handles {
            let msg = h.join().unwrap();
            assert!(
                msg.contains("injected failure") || msg.contains("truncated"),
                "{msg}"
            );
        }
        assert!(cache.entries().is_empty());
        assert_eq!(cache.stats().0.used, 0);
    }
}

#[test]
fn device_tier_offloads_lazily_to_ram() {
    let loader = Arc::new(FakeLoader::new(&[("A", 1), ("B", 1), ("C", 1)]));
    // Each device copy is 16 f32 = 64 bytes; room for two.
    let cache = cache_with(loader, 10, 128);
    let a = cache.get_device(&ck("A")).unwrap();
    assert_eq!(a.tensors["w"].dims(), &[16]);
    drop(a);
    drop(cache.get_device(&ck("B")).unwrap());
    drop(cache.get_device(&ck("C")).unwrap());
    assert_eq!(resident(&cache, TierKind::Device), ["B", "C"]);
    // A's RAM copy stayed: coming back is a move, not a disk load.
    assert_eq!(resident(&cache, TierKind::Ram), ["A", "B", "C"]);
    let (ram, dev) = cache.stats();
    assert_eq!((dev.evictions, dev.used), (1, 128));
    drop(cache.get_device(&ck("A")).unwrap());
    assert_eq!(cache.stats().0.misses, ram.misses, "no new RAM load");
}

#[derive(Debug, Clone)]
enum Op {
    /// Model, and where: 0 RAM, 1 the device at f32, 2 the device at f16.
    Get(usize, u8),
    Hold(usize, u8),
    Release,
    Warm(usize, bool),
    Drop(usize),
    /// Hold bytes of a device tier for transient copies (a LoRA's patched weights).
    Reserve(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..8usize, 0..3u8).prop_map(|(k, d)| Op::Get(k, d)),
        2 => (0..8usize, 0..3u8).prop_map(|(k, d)| Op::Hold(k, d)),
        2 => Just(Op::Release),
        1 => (0..8usize, any::<bool>()).prop_map(|(k, d)| Op::Warm(k, d)),
        1 => (0..8usize).prop_map(Op::Drop),
        1 => (0..2usize, 1..100u64).prop_map(|(s, b)| Op::Reserve(s, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// 12 cases × 4 threads × 250 ops = 12,000 operations on a RAM tier and two
    /// device tiers (a two-GPU node), with models held at two precisions: no
    /// tier ever exceeds its budget, a held (locked) model is always resident
    /// where its guard says, a model at one precision is on at most one
    /// device, and the statistics add up.
    #[test]
    fn invariants_hold_under_concurrent_random_operations(ops in proptest::collection::vec(op(), 1000)) {
        let sizes: Vec<(String, u64)> = (0..8).map(|i| (format!("m{i}"), 1 + (i as u64 % 4))).collect();
        let refs: Vec<(&str, u64)> = sizes.iter().map(|(k, s)| (k.as_str(), *s)).collect();
        let loader = Arc::new(FakeLoader::new(&refs));
        let cache = cache_with_devices(loader.clone(), 9, &[64 * 2, 64]);
        let failures = Arc::new(AtomicU64::new(0));
        let chunks: Vec<Vec<Op>> = ops.chunks(250).map(|c| c.to_vec()).collect();
        let handles: Vec<_> = chunks.into_iter().map(|chunk| {
            let (cache, failures) = (cache.clone(), failures.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut held_ram = Vec::new();
                let mut held_dev = Vec::new();
                let mut reserved = Vec::new();
                for op in chunk {
                    match op {
                        Op::Get(k, dev) | Op::Hold(k, dev) => {
                            let key = format!("m{k}");
                            let hold = matches!(op, Op::Hold(..));
                            let dtype = if dev == 2 { candle_core::DType::F16 } else { candle_core::DType::F32 };
                            let r = if dev > 0 {
                                cache.get_device_as(&ck(key), dtype).map(|g| if hold && held_dev.len() < 2 { held_dev.push(g) })
                            } else {
                                cache.get_ram(&ck(key)).map(|g| if hold && held_ram.len() < 2 { held_ram.push(g) })
                            };
                            match r {
                                Ok(()) => {}
                                Err(CacheError::CacheFull { .. }) => { failures.fetch_add(1, Ordering::Relaxed); }
                                Err(e) => return Err(e.to_string()),
                            }
                        }
                        Op::Release => { held_ram.pop(); held_dev.pop(); reserved.pop(); }
                        Op::Reserve(slot, bytes) => match cache.reserve_device(&ck("transient"), slot, bytes) {
                            Ok(r) => if reserved.len() < 2 { reserved.push(r) },
                            Err(CacheError::CacheFull { .. }) => { failures.fetch_add(1, Ordering::Relaxed); }
                            Err(e) => return Err(e.to_string()),
                        },
                        Op::Warm(k, dev) => {
                            let tier = if dev { TierKind::Device } else { TierKind::Ram };
                            if cache.warm(&ck(format!("m{k}")), tier).is_err() { failures.fetch_add(1, Ordering::Relaxed); }
                        }
                        Op::Drop(k) => cache.drop_model(&ck(format!("m{k}"))),
                    }
                    let ram = cache.stats().0;
                    if ram.used > ram.budget {
                        return Err(format!("RAM budget exceeded: {}/{}", ram.used, ram.budget));
                    }
                    for (i, d) in cache.device_stats().iter().enumerate() {
                        if d.used > d.budget {
                            return Err(format!("device {i} budget exceeded: {}/{}", d.used, d.budget));
                        }
                    }
                    let entries = cache.entries();
                    let held = held_ram.iter().map(|g| (g.key().clone(), 0, TierKind::Ram))
                        .chain(held_dev.iter().map(|g| (g.key().clone(), g.slot(), TierKind::Device)));
                    for (k, slot, tier) in held {
                        if !entries.iter().any(|e| e.key == k && e.tier == tier && e.slot == slot && e.locked) {
                            return Err(format!("held model {k} is not resident and locked in {tier:?} {slot}"));
                        }
                    }
                    for k in (0..8).map(|i| ck(format!("m{i}"))) {
                        for dtype in [candle_core::DType::F16, candle_core::DType::F32] {
                            let at = k.at(dtype);
                            let on = entries.iter().filter(|e| e.key == at && e.tier == TierKind::Device).count();
                            if on > 1 {
                                return Err(format!("{at} is on {on} devices"));
                            }
                        }
                    }
                }
                Ok(())
            })
        }).collect();
        for h in handles {
            let r = h.join().map_err(|_| TestCaseError::fail("thread panicked"))?;
            prop_assert!(r.is_ok(), "{:?}", r);
        }
        let (ram, dev) = cache.stats();
        prop_assert!(ram.used <= ram.budget && dev.used <= dev.budget);
        let entries = cache.entries();
        prop_assert!(entries.iter().all(|e| !e.locked), "all guards released");
        let ram_bytes: u64 = entries.iter().filter(|e| e.tier == TierKind::Ram).map(|e| e.bytes).sum();
        prop_assert_eq!(ram_bytes, ram.used);
        for (i, d) in cache.device_stats().iter().enumerate() {
            let bytes: u64 = entries.iter().filter(|e| e.tier == TierKind::Device && e.slot == i).map(|e| e.bytes).sum();
            prop_assert_eq!(bytes, d.used, "device {}", i);
        }
        prop_assert_eq!(dev.budget, 64 * 3);
        // Every RAM load came from exactly one planned miss.
        let plans: u64 = (0..8).map(|i| loader.plans(&format!("m{i}"))).sum();
        prop_assert!(ram.loads <= ram.misses && ram.misses <= plans, "loads {} misses {} plans {}", ram.loads, ram.misses, plans);
    }
}

#[test]
fn one_model_at_two_precisions_is_two_device_entries_charged_at_their_sizes() {
    use candle_core::DType;
    let key = ck(fixtures()
        .join("tiny-sd1/vae")
        .to_string_lossy()
        .into_owned());
    let cache = ModelCache::new(
        CacheConfig::cpu(6 * R, 40 << 20),
        Box::new(DiskLoader),
        None,
    );
    let full = cache.get_device_as(&key, DType::F32).unwrap();
    let half = cache.get_device_as(&key, DType::F16).unwrap();
    assert!(half.tensors.values().all(|t| t.dtype() == DType::F16));
    assert_eq!(full.bytes, 2 * half.bytes, "every VAE weight is a float");
    let (ram, dev) = cache.stats();
    assert_eq!((ram.loads, ram.models), (1, 1), "one RAM copy feeds both");
    assert_eq!((dev.models, dev.used), (2, full.bytes + half.bytes));
    assert_eq!(half.key().to_string(), format!("{key} (f16)"));
    drop((full, half));
    // Warm at one precision pins that copy only; unpinning the weights
    // unpins every precision.
    cache.warm_as(&key, TierKind::Device, DType::F16).unwrap();
    let pinned = |cache: &ModelCache| -> Vec<String> {
        let mut v: Vec<String> = cache
            .entries()
            .into_iter()
            .filter(|e| e.pinned)
            .map(|e| e.key.to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(pinned(&cache), [format!("{key} (f16)")]);
    cache.unpin(&key, TierKind::Device);
    assert!(pinned(&cache).is_empty());
    cache.drop_model(&key);
    assert!(cache.entries().is_empty(), "every copy goes");
    // The CPU computes in f32 whatever a deployment asks for.
    assert_eq!(cache.dtype_for(Some(DType::F16)), DType::F32);
}

#[test]
fn real_loader_on_the_fixture_models() {
    let f = fixtures().join("tiny-sd1");
    let keys: Vec<String> = ["unet", "vae", "text_encoder"]
        .iter()
        .map(|c| f.join(c).to_string_lossy().into_owned())
        .collect();
    let config = CacheConfig {
        trim_on_evict: true,
        ..CacheConfig::cpu(6 * R, 40 << 20)
    };
    let cache = ModelCache::new(config, Box::new(DiskLoader), None);
    for k in &keys {
        let g = cache.get_device(&ck(k.as_str())).unwrap();
        let index = modelcache_agent::store::open_weights(
            &modelcache_agent::store::component_weights(Path::new(k)).unwrap()[0],
        )
        .unwrap();
        // Every tensor equals what the file holds.
        for t in &index.tensors {
            let want = modelcache_agent::store::load::read_bytes(&index, t).unwrap();
            let got = g.tensors[&t.name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got: Vec<u8> = got.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(got, want, "{k}: {}", t.name);
        }
        assert_eq!(g.bytes, index.bytes_at(modelcache_crds::Precision::F32));
    }
    let (ram, dev) = cache.stats();
    assert!(ram.used <= ram.budget && dev.used <= dev.budget);
    assert_eq!(ram.loads, 3);
    // A missing model is a clear load error, not a crash, and leaves nothing.
    let err = cache
        .get_ram(&ck("/nonexistent/unet"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/unet"), "{err}");
}

#[test]
fn reservations_count_against_the_device_budget() {
    // Each fake model is 64 bytes on the device (16 f32).
    let loader = Arc::new(FakeLoader::new(&[("A", 1), ("B", 1)]));
    let cache = cache_with(loader, 4, 200);
    let a = cache.get_device(&ck("A")).unwrap();
    drop(cache.get_device(&ck("B")).unwrap());
    // 200 - 64 (A, locked) leaves 136 once B (idle) is evicted; 150 cannot fit.
    match cache.reserve_device(&ck("A with adapters"), a.slot(), 150) {
        Err(CacheError::CacheFull {
            needed: 150,
            locked: 64,
            ..
        }) => {}
        other => panic!("expected CacheFull, got {:?}", other.map(|r| r.bytes())),
    }
    assert_eq!(
        resident(&cache, TierKind::Device),
        ["A", "B"],
        "a refused reservation evicts nothing"
    );
    let held = cache
        .reserve_device(&ck("A with adapters"), a.slot(), 120)
        .unwrap();
    assert_eq!(
        resident(&cache, TierKind::Device),
        ["A"],
        "idle B made room"
    );
    assert_eq!(cache.stats().1.used, 184);
    // A load now has to fit next to the reservation.
    assert!(matches!(
        cache.get_device(&ck("B")),
        Err(CacheError::CacheFull { .. })
    ));
    drop(held);
    assert_eq!(cache.stats().1.used, 64);
    drop(cache.get_device(&ck("B")).unwrap());
    drop(a);
}

#[test]
fn models_go_to_the_device_with_room_and_offload_there() {
    // Two devices with room for two 64-byte models each.
    let loader = Arc::new(FakeLoader::new(&[
        ("A", 1),
        ("B", 1),
        ("C", 1),
        ("D", 1),
        ("E", 1),
    ]));
    let cache = cache_with_devices(loader, 10, &[128, 128]);
    let slot = |k: &str| cache.get_device(&ck(k)).unwrap().slot();
    // Each new model goes to the device with the most free bytes.
    assert_eq!([slot("A"), slot("B"), slot("C"), slot("D")], [0, 1, 0, 1]);
    assert_eq!(slot("A"), 0, "a resident model is found where it is");
    let stats = cache.device_stats();
    assert_eq!(
        stats.iter().map(|s| (s.used, s.models)).collect::<Vec<_>>(),
        [(128, 2), (128, 2)]
    );
    assert_eq!(cache.stats().1.budget, 256, "the vram tier is their sum");
    // Both are full. With everything on device 0 locked, E offloads the
    // least recently used model of device 1 (B), not one that is in use.
    let (a, c) = (
        cache.get_device(&ck("A")).unwrap(),
        cache.get_device(&ck("C")).unwrap(),
    );
    let e = cache.get_device(&ck("E")).unwrap();
    assert_eq!(e.slot(), 1);
    assert_eq!(resident(&cache, TierKind::Device), ["A", "C", "D", "E"]);
    assert_eq!(cache.device_stats()[1].evictions, 1);
    // Nothing fits when every device is full of locked models.
    let d = cache.get_device(&ck("D")).unwrap();
    match cache.get_device(&ck("B")) {
        Err(CacheError::CacheFull {
            tier: TierKind::Device,
            needed: 64,
            budget: 128,
            locked: 128,
            ..
        }) => {}
        other => panic!("expected CacheFull, got {:?}", other.map(|g| g.slot())),
    }
    drop((a, c, d, e));
    assert_eq!(slot("B"), 0, "the first device with evictable room");
}

#[test]
fn concurrent_requests_load_a_model_once_onto_one_device() {
    let mut loader = FakeLoader::new(&[("A", 1)]);
    loader.delay = std::time::Duration::from_millis(50);
    let loader = Arc::new(loader);
    let cache = cache_with_devices(loader.clone(), 4, &[64, 64, 64]);
    let barrier = Arc::new(Barrier::new(6));
    let slots: Vec<usize> = (0..6)
        .map(|_| {
            let (cache, barrier) = (cache.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                cache.get_device(&ck("A")).unwrap().slot()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(slots.iter().all(|&s| s == slots[0]), "{slots:?}");
    assert_eq!(loader.plans("A"), 1, "one load");
    let dev = cache.stats().1;
    assert_eq!((dev.used, dev.misses, dev.hits), (64, 1, 5));
}
