//! Fragmentation benchmark (docs/memory.md), against the real cache code.
//!
//! Switches among 12 models (round-robin unless the profile says otherwise),
//! loads dispatched over 4 threads, evict-before-load under a byte budget; RSS
//! and VmHWM are read and each load timed after every switch. Variants, each
//! run in its own process so they cannot disturb each other's RSS:
//!
//! - `region`: the agent's RAM tier (one 2 MiB-aligned anonymous mapping per
//!   model; a load reuses the mappings of the models it evicted);
//! - `region-fresh`: the same mappings made fresh for every load and unmapped
//!   on eviction, as the tier did before it reused them: the reference for
//!   the reuse's speed;
//! - `heap`: the control — each tensor in its own heap buffer, glibc defaults;
//! - `heap-threshold`: the control with `MALLOC_MMAP_THRESHOLD_=1048576`.
//!
//! `modelcache-memory-bench [ci|full|zipf]` runs them all and prints a table
//! (`zipf`: `full`'s models asked for with Zipf popularity, as a busy node
//! sees them, with each load's latency); `trace:BUDGET_MIB:MODEL_MIB:I,J,…`
//! replays another benchmark's switches; `modelcache-memory-bench run VARIANT
//! PROFILE` runs one and prints a JSON line.

use anyhow::Context;
use modelcache_agent::cache::region::{self, Region, Segment};
use modelcache_agent::cache::{
    CacheConfig, CacheError, CacheKey, Loader, ModelCache, RamPlan, RegionTensor,
};
use modelcache_agent::memory;
use modelcache_support::SplitMix64;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::mpsc;
use std::time::Instant;

const MIB: u64 = 1 << 20;

#[derive(Clone)]
struct Profile {
    budget: u64,
    min: u64,
    max: u64,
    models: usize,
    /// The model each switch asks for.
    sequence: Vec<usize>,
}

impl Profile {
    fn round_robin(budget: u64, min: u64, max: u64, switches: usize) -> Profile {
        Profile {
            budget,
            min,
            max,
            models: 12,
            sequence: (0..switches).map(|k| k % 12).collect(),
        }
    }
}

/// `ci`, `full`, `zipf` (full's models, 300 switches drawn Zipf s=1: what a
/// busy node sees), or `trace:BUDGET_MIB:MODEL_MIB:I,J,K…` (models of one size
/// asked for in the given order: another benchmark's trace).
fn profile(name: &str) -> Option<Profile> {
    match name {
        "ci" => Some(Profile::round_robin(512 * MIB, 75 * MIB, 225 * MIB, 100)),
        "full" => Some(Profile::round_robin(2048 * MIB, 300 * MIB, 900 * MIB, 300)),
        "zipf" => {
            let mut rng = SplitMix64::new(11);
            let weights: Vec<f64> = (1..=12).map(|k| 1.0 / k as f64).collect();
            let total: f64 = weights.iter().sum();
            let sequence = (0..300)
                .map(|_| {
                    let mut u = rng.unit() * total;
                    weights
                        .iter()
                        .position(|w| {
                            let hit = u < *w;
                            u -= w;
                            hit
                        })
                        .unwrap_or(11)
                })
                .collect();
            Some(Profile {
                sequence,
                ..Profile::round_robin(2048 * MIB, 300 * MIB, 900 * MIB, 0)
            })
        }
        trace => {
            let mut parts = trace.strip_prefix("trace:")?.splitn(3, ':');
            let budget = parts.next()?.parse::<u64>().ok()? * MIB;
            let size = parts.next()?.parse::<u64>().ok()? * MIB;
            let sequence: Vec<usize> = parts
                .next()?
                .split(',')
                .map(|v| v.parse().ok())
                .collect::<Option<_>>()?;
            let models = sequence.iter().max()? + 1;
            Some(Profile {
                budget,
                min: size,
                max: size,
                models,
                sequence,
            })
        }
    }
}

/// Uniform in [a, b), from the benchmark's seeded generator.
fn uniform(rng: &mut SplitMix64, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.unit()
}

/// Log-uniform in [a, b): as many small sizes per decade as large ones.
fn log_uniform(rng: &mut SplitMix64, a: f64, b: f64) -> f64 {
    (a.ln() + (b.ln() - a.ln()) * rng.unit()).exp()
}

/// The catalog of models, shaped like real checkpoints: sizes uniform in [min, max];
/// tensors by count 5% big (40–100 MiB scaled to the profile), 55% medium
/// (1–16 MiB log-uniform), 40% small (4–512 KiB log-uniform).
fn catalog(p: &Profile) -> Vec<Vec<u64>> {
    let mut rng = SplitMix64::new(1);
    let scale = p.max as f64 / (900 * MIB) as f64;
    (0..p.models)
        .map(|_| {
            let total = uniform(&mut rng, p.min as f64, p.max as f64) as u64;
            let mut left = total;
            let mut tensors = Vec::new();
            while left > 0 {
                let r = rng.unit();
                let s = if r < 0.05 {
                    uniform(
                        &mut rng,
                        40.0 * MIB as f64 * scale,
                        100.0 * MIB as f64 * scale,
                    )
                } else if r < 0.60 {
                    log_uniform(&mut rng, MIB as f64, 16.0 * MIB as f64)
                } else {
                    log_uniform(&mut rng, 4096.0, 512.0 * 1024.0)
                } as u64;
                let s = s.clamp(64, left);
                tensors.push(s);
                left -= s;
            }
            tensors
        })
        .collect()
}

/// One data file shared by all models: model i reads its first `size_i`
/// bytes. Written with real bytes, not left sparse: reading a hole costs the
/// kernel a freshly zeroed page every time, which is not what reading a
/// model from a warm page cache costs.
fn data_file(max: u64) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::env::temp_dir().join("modelcache-memory-bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("data-{max}"));
    let written = std::fs::metadata(&path)
        .map(|m| m.len() == max && m.blocks() * 512 >= max)
        .unwrap_or(false);
    if !written {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let block = vec![0x5au8; 1 << 20];
        let mut left = max;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            std::io::Write::write_all(&mut f, &block[..n])?;
            left -= n as u64;
        }
        std::io::Write::flush(&mut f)?;
    }
    Ok(path)
}

struct SharedFile {
    path: PathBuf,
    models: Vec<Vec<u64>>,
}

impl Loader for SharedFile {
    fn plan(&self, key: &CacheKey) -> Result<RamPlan, CacheError> {
        let i: usize = key.as_str().parse().map_err(|_| CacheError::Load {
            key: key.clone(),
            message: "bad key".into(),
        })?;
        let mut tensors = Vec::new();
        let mut off = 0u64;
        for (n, &s) in self.models.get(i).into_iter().flatten().enumerate() {
            // 64-byte aligned, as tensors are.
            off = off.next_multiple_of(64);
            tensors.push(RegionTensor {
                name: format!("t{n}"),
                dtype: safetensors::Dtype::U8,
                shape: vec![s as usize],
                offset: off as usize,
                len: s as usize,
            });
            off += s;
        }
        let len = off;
        Ok(RamPlan {
            segments: vec![Segment {
                path: self.path.clone(),
                file_offset: 0,
                len,
                region_offset: 0,
            }],
            tensors,
            bytes: len,
        })
    }
}

/// A tensor of the control: 64-byte aligned heap memory plus the two small
/// metadata allocations a framework makes per tensor (name, impl).
struct HeapTensor {
    ptr: *mut u8,
    layout: std::alloc::Layout,
    _meta: (Vec<u8>, Vec<u8>),
}

// SAFETY: the buffer is owned by this value and only freed on drop.
unsafe impl Send for HeapTensor {}

impl HeapTensor {
    fn new(size: u64, rng: &mut SplitMix64) -> Option<HeapTensor> {
        let layout = std::alloc::Layout::from_size_align(size as usize, 64).ok()?;
        // SAFETY: non-zero size layout; the pointer is checked and freed with the same layout.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return None;
        }
        // Every byte written, so the pages are resident (as a load would make them).
        unsafe { std::ptr::write_bytes(ptr, 1, size as usize) };
        let name = vec![0u8; 24 + (rng.next_u64() % 100) as usize];
        let imp = vec![0u8; 160 + (rng.next_u64() % 256) as usize];
        Some(HeapTensor {
            ptr,
            layout,
            _meta: (name, imp),
        })
    }
}

impl Drop for HeapTensor {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// The control's load: one pool thread allocates every tensor of a model; 1 in
/// 32 tensors also leaves a small allocation behind for good (interned strings,
/// log records), as long-running processes do.
fn load_heap(tensors: &[u64], seed: u64, pins: &mut Vec<Vec<u8>>) -> Vec<HeapTensor> {
    let mut rng = SplitMix64::new(seed);
    tensors
        .iter()
        .filter_map(|&s| {
            if rng.next_u64().is_multiple_of(32) {
                pins.push(vec![0u8; 32 + (rng.next_u64() % 4064) as usize]);
            }
            HeapTensor::new(s, &mut rng)
        })
        .collect()
}

struct Outcome {
    max_rss: u64,
    final_rss: u64,
    hwm: u64,
    secs_per_switch: f64,
    /// Bytes loaded per second of the whole run.
    load_bytes_per_sec: f64,
    /// Seconds of each switch that loaded its model.
    loads: Vec<f64>,
    /// Switches whose model was held already.
    hits: usize,
}

/// What the switches did, read after each one.
#[derive(Default)]
struct Switches {
    max_rss: u64,
    final_rss: u64,
    loads: Vec<f64>,
    hits: usize,
}

impl Switches {
    fn record(&mut self, loaded: bool, started: Instant) {
        if loaded {
            self.loads.push(started.elapsed().as_secs_f64());
        } else {
            self.hits += 1;
        }
        self.final_rss = memory::resident_bytes();
        self.max_rss = self.max_rss.max(self.final_rss);
    }
}

/// Runs the profile's switches, dispatching loads over 4 threads.
fn run_variant(variant: &str, p: &Profile) -> anyhow::Result<Outcome> {
    let models = catalog(p);
    let sizes: Vec<u64> = models
        .iter()
        .map(|m| m.iter().map(|s| s.next_multiple_of(64)).sum())
        .collect();
    let mut sw = Switches::default();
    let mut dispatch = SplitMix64::new(7);
    let largest = sizes.iter().copied().max().unwrap_or(p.max);
    let start = Instant::now();
    let loaded = match variant {
        "region" => {
            let path = data_file(largest)?;
            let config = CacheConfig::cpu(p.budget, 0);
            let cache = ModelCache::new(
                config,
                Box::new(SharedFile {
                    path,
                    models: models.clone(),
                }),
                None,
            );
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let (tx, rx) = mpsc::channel::<(usize, mpsc::Sender<Result<(), CacheError>>)>();
                    let cache = cache.clone();
                    std::thread::spawn(move || {
                        for (model, done) in rx {
                            let r = cache.get_ram(&CacheKey::from(model.to_string())).map(drop);
                            let _ = done.send(r);
                        }
                    });
                    tx
                })
                .collect();
            for &model in &p.sequence {
                let before = cache.stats().0.load_bytes;
                let t = Instant::now();
                let (tx, rx) = mpsc::channel();
                workers[(dispatch.next_u64() % 4) as usize].send((model, tx))?;
                rx.recv()??;
                sw.record(cache.stats().0.load_bytes != before, t);
            }
            cache.stats().0.load_bytes
        }
        "region-fresh" => {
            let loader = std::sync::Arc::new(SharedFile {
                path: data_file(largest)?,
                models: models.clone(),
            });
            type Job = (usize, mpsc::Sender<anyhow::Result<Region>>);
            let workers: Vec<mpsc::Sender<Job>> = (0..4)
                .map(|_| {
                    let (tx, rx) = mpsc::channel::<Job>();
                    let loader = loader.clone();
                    std::thread::spawn(move || {
                        for (model, done) in rx {
                            let load = || -> anyhow::Result<Region> {
                                let plan = loader.plan(&CacheKey::from(model.to_string()))?;
                                let mut r = Region::new(plan.bytes as usize)?;
                                region::fill(&mut r, &plan.segments, 2)?;
                                Ok(r)
                            };
                            let _ = done.send(load());
                        }
                    });
                    tx
                })
                .collect();
            let rounded: Vec<u64> = sizes
                .iter()
                .map(|s| s.next_multiple_of(region::REGION_ALIGN as u64))
                .collect();
            lru_switches(p, &rounded, &mut sw, |model| {
                let (tx, rx) = mpsc::channel();
                workers[(dispatch.next_u64() % 4) as usize].send((model, tx))?;
                rx.recv()?
            })?
        }
        "heap" | "heap-threshold" => {
            type Job = (usize, mpsc::Sender<Vec<HeapTensor>>);
            let workers: Vec<mpsc::Sender<Job>> = (0..4)
                .map(|w| {
                    let (tx, rx) = mpsc::channel::<Job>();
                    let models = models.clone();
                    std::thread::spawn(move || {
                        let mut pins = Vec::new();
                        for (k, (model, done)) in rx.into_iter().enumerate() {
                            let _ = done.send(load_heap(
                                &models[model],
                                (w * 1_000_003 + k) as u64,
                                &mut pins,
                            ));
                        }
                    });
                    tx
                })
                .collect();
            lru_switches(p, &sizes, &mut sw, |model| {
                let (tx, rx) = mpsc::channel();
                workers[(dispatch.next_u64() % 4) as usize].send((model, tx))?;
                Ok(rx.recv()?)
            })?
        }
        other => anyhow::bail!("unknown variant {other}"),
    };
    let secs = start.elapsed().as_secs_f64();
    Ok(Outcome {
        max_rss: sw.max_rss,
        final_rss: sw.final_rss,
        hwm: memory::peak_resident_bytes(),
        secs_per_switch: secs / p.sequence.len().max(1) as f64,
        load_bytes_per_sec: loaded as f64 / secs,
        loads: sw.loads,
        hits: sw.hits,
    })
}

/// The profile's switches through an LRU of `p.budget` bytes with
/// evict-before-load (eviction on this thread); `load` loads a model on a
/// pool thread. Returns the bytes loaded.
fn lru_switches<V>(
    p: &Profile,
    sizes: &[u64],
    sw: &mut Switches,
    mut load: impl FnMut(usize) -> anyhow::Result<V>,
) -> anyhow::Result<u64> {
    let mut lru: VecDeque<(usize, V)> = VecDeque::new();
    let (mut used, mut loaded) = (0u64, 0u64);
    for &model in &p.sequence {
        let t = Instant::now();
        if let Some(pos) = lru.iter().position(|e| e.0 == model) {
            if let Some(e) = lru.remove(pos) {
                lru.push_back(e);
            }
            sw.record(false, t);
        } else {
            while used + sizes[model] > p.budget {
                let Some((m, evicted)) = lru.pop_front() else {
                    break;
                };
                drop(evicted);
                used -= sizes[m];
            }
            lru.push_back((model, load(model)?));
            used += sizes[model];
            loaded += sizes[model];
            sw.record(true, t);
        }
    }
    Ok(loaded)
}

/// The ceilings of a load into resident memory on 2 threads (as the tier
/// fills), GB/s, best of 3: memcpy between resident buffers, and `pread` of
/// the benchmark's data file into a resident buffer.
fn ceilings(p: &Profile) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::fs::FileExt;
    let len = (p.max as usize).min(512 << 20);
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    let file = std::fs::File::open(data_file(p.max)?)?;
    let best = |f: &mut dyn FnMut()| -> f64 {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                f();
                len as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    };
    let memcpy = best(&mut || {
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(len / 2).zip(src.chunks(len / 2)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        })
    });
    let pread = best(&mut || {
        std::thread::scope(|s| {
            for (i, half) in dst.chunks_mut(len / 2).enumerate() {
                let file = &file;
                s.spawn(move || {
                    for (j, chunk) in half.chunks_mut(16 << 20).enumerate() {
                        let at = (i * (len / 2) + j * (16 << 20)) as u64;
                        let _ = file.read_exact_at(chunk, at);
                    }
                });
            }
        })
    });
    Ok((memcpy, pread))
}

fn run_child(variant: &str, profile_name: &str) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["run", variant, profile_name])
        .env_remove("MALLOC_MMAP_THRESHOLD_");
    if variant == "heap-threshold" {
        cmd.env("MALLOC_MMAP_THRESHOLD_", "1048576");
    }
    let out = cmd.output()?;
    if !out.status.success() {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    serde_json::from_str(&line).with_context(|| format!("the child printed {line:?}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["run", variant, prof] => {
            let Some(p) = profile(prof) else {
                return ExitCode::FAILURE;
            };
            match run_variant(variant, &p) {
                Ok(o) => {
                    let limit = p.budget + 64 * MIB;
                    let mut loads = o.loads.clone();
                    loads.sort_by(f64::total_cmp);
                    let pct = |q: f64| {
                        loads
                            .get(((loads.len().max(1) - 1) as f64 * q).round() as usize)
                            .copied()
                            .unwrap_or(0.0)
                    };
                    println!(
                        "{}",
                        serde_json::json!({
                            "variant": variant, "budget": p.budget, "max_rss": o.max_rss, "final_rss": o.final_rss, "hwm": o.hwm,
                            "secs_per_switch": o.secs_per_switch, "load_bytes_per_sec": o.load_bytes_per_sec, "pass": o.max_rss <= limit && o.hwm <= limit,
                            "loads": o.loads.len(), "hits": o.hits, "load_p50_secs": pct(0.5), "load_p99_secs": pct(0.99),
                        })
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        rest => {
            let prof = rest.first().copied().unwrap_or("full");
            let Some(p) = profile(prof) else {
                eprintln!("usage: modelcache-memory-bench [ci|full|zipf|trace:BUDGET_MIB:MODEL_MIB:I,J,…] | run VARIANT PROFILE");
                return ExitCode::FAILURE;
            };
            let label = prof.split(':').next().unwrap_or(prof);
            println!("Fragmentation, profile {label}: budget B = {} MiB, {} models {}–{} MiB, 4 loader threads, {} switches", p.budget / MIB, p.models, p.min / MIB, p.max / MIB, p.sequence.len());
            println!("check: after every switch RSS <= B + 64 MiB and VmHWM <= B + 64 MiB");
            println!(
                "{:<44} {:>10} {:>10} {:>10} {:>10} {:>8} {:>6} {:>17}",
                "variant",
                "maxRSS/B",
                "finalRSS/B",
                "VmHWM/B",
                "s/switch",
                "GB/s",
                "check",
                "load p50/p99 (s)"
            );
            let mut ok = true;
            let mut hits = 0;
            for (v, label) in [
                ("region", "agent RAM tier (mmap region per model)"),
                (
                    "region-fresh",
                    "regions made fresh per load (the tier before)",
                ),
                ("heap", "control: heap buffers, glibc defaults"),
                ("heap-threshold", "control + MALLOC_MMAP_THRESHOLD_=1048576"),
            ] {
                match run_child(v, prof) {
                    Ok(j) => {
                        let b = p.budget as f64;
                        let f = |k: &str| j[k].as_f64().unwrap_or(0.0) / b;
                        let pass = j["pass"].as_bool().unwrap_or(false);
                        hits = j["hits"].as_u64().unwrap_or(0);
                        let secs = |k: &str| j[k].as_f64().unwrap_or(0.0);
                        println!(
                            "{label:<44} {:>10.2} {:>10.2} {:>10.2} {:>10.3} {:>8.1} {:>6} {:>8.3}/{:<8.3}",
                            f("max_rss"),
                            f("final_rss"),
                            f("hwm"),
                            secs("secs_per_switch"),
                            secs("load_bytes_per_sec") / 1e9,
                            if pass { "pass" } else { "FAIL" },
                            secs("load_p50_secs"),
                            secs("load_p99_secs"),
                        );
                        if v.starts_with("region") {
                            ok &= pass;
                        }
                    }
                    Err(e) => {
                        eprintln!("{v}: {e}");
                        ok = false;
                    }
                }
            }
            println!(
                "switches that found their model held: {} of {}",
                hits,
                p.sequence.len()
            );
            // After the variants, so that the data file is written and warm.
            match ceilings(&p) {
                Ok((memcpy, pread)) => println!(
                    "ceilings (2 threads, resident memory): memcpy {memcpy:.1} GB/s, pread of the data file {pread:.1} GB/s"
                ),
                Err(e) => eprintln!("ceilings: {e}"),
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
