//! The price of `MALLOC_MMAP_THRESHOLD_`, and what the allocation pool buys
//! back: each allocator setting in its own process (the threshold must be in
//! force before the first allocation), measured the same way in one run.

use super::common::{copy_dir, fixtures};
use super::{header, pct, row, scratch};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The environment variable that makes this benchmark a child measuring steps.
const CHILD: &str = "MODELCACHE_BENCH_MALLOC_CHILD";
const MIB: f64 = (1 << 20) as f64;

/// An allocator setting: glibc's threshold (`None`: its dynamic default) and
/// the pool's cap (`None`: the agent's default).
struct Setting {
    name: &'static str,
    threshold: Option<&'static str>,
    pool: Option<&'static str>,
}

const SETTINGS: [Setting; 4] = [
    Setting {
        name: "glibc dynamic threshold, no pool",
        threshold: None,
        pool: Some("0"),
    },
    Setting {
        name: "threshold 32 MiB, no pool",
        threshold: Some("33554432"),
        pool: Some("0"),
    },
    Setting {
        name: "threshold 1 MiB, no pool (before)",
        threshold: Some("1048576"),
        pool: Some("0"),
    },
    Setting {
        name: "threshold 1 MiB + pool (default)",
        threshold: Some("1048576"),
        pool: None,
    },
];

impl Setting {
    fn apply(&self, cmd: &mut Command) {
        cmd.env_remove("MALLOC_MMAP_THRESHOLD_")
            .env_remove(modelcache_agent::memory::pool::ENV);
        if let Some(t) = self.threshold {
            cmd.env("MALLOC_MMAP_THRESHOLD_", t);
        }
        if let Some(p) = self.pool {
            cmd.env(modelcache_agent::memory::pool::ENV, p);
        }
    }
}

/// Runs in a child process: three SD-1.5-sized denoising steps, their seconds on stdout.
pub fn child() -> bool {
    if std::env::var_os(CHILD).is_none() {
        return false;
    }
    let (unet, _map) = super::sd15_unet();
    // As a generation does: freed step buffers are kept for the next step.
    let _reuse = modelcache_agent::memory::pool::busy();
    let cpu = candle_core::Device::Cpu;
    let x = candle_core::Tensor::zeros((2, 4, 64, 64), candle_core::DType::F32, &cpu).unwrap();
    let ctx = candle_core::Tensor::zeros((2, 77, 768), candle_core::DType::F32, &cpu).unwrap();
    let steps: Vec<String> = (0..3)
        .map(|_| {
            let t = Instant::now();
            unet.forward(&x, 500.0, &ctx).unwrap();
            format!("{:.3}", t.elapsed().as_secs_f64())
        })
        .collect();
    println!("steps {}", steps.join(" "));
    true
}

/// Step time of an SD-1.5-sized UNet under each setting.
pub fn bench_steps() {
    header("Allocator settings: SD 1.5 UNet step at 512×512 (CFG batch 2, f32, CPU); first step, then the steady one (third)");
    let mut reference = None;
    for s in &SETTINGS {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        s.apply(&mut cmd);
        let out = cmd.env(CHILD, "1").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let steps: Vec<f64> = text
            .lines()
            .find_map(|l| l.strip_prefix("steps "))
            .unwrap_or_else(|| panic!("{}: no steps in {text}", s.name))
            .split(' ')
            .map(|v| v.parse().unwrap())
            .collect();
        let steady = steps[2];
        let base = *reference.get_or_insert(steady);
        row(
            s.name,
            format!("first {:.1} s, steady {steady:.1} s", steps[0]),
            format!("{base:.1} s (glibc dynamic)"),
            Some(steady / base),
            "pool: ≤ 1.05x dynamic",
        );
    }
}

/// An agent process, killed by its PID when dropped (also when the benchmark panics).
struct AgentProcess {
    child: Child,
    api: String,
    metrics: String,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

/// Posts a generation request; the answer's status line and body when it is not 200.
fn post(addr: &str, body: &str) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    write!(s, "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    if text.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(text.chars().take(600).collect())
    }
}

/// The sum of every sample whose line starts with `series` (a name, or a
/// name and `{` for all its label sets).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn resident_bytes(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb * 1024.0)
}

fn start_agent(setting: &Setting, dir: &Path) -> AgentProcess {
    let (api, metrics) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelcache-agent"));
    setting.apply(&mut cmd);
    cmd.args(["serve", "--device", "cpu", "--listen", &api])
        .args(["--metrics-listen", &metrics])
        .args(["--ram-cache-bytes", "400Mi", "--vram-cache-bytes", "900Mi"])
        .args(["--concurrency", "2", "--queue-size", "64"])
        .args(["--malloc-mmap-threshold", "0"])
        .arg("--models-dir")
        .arg(dir.join("models"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let agent = AgentProcess {
        child: cmd.spawn().unwrap(),
        api,
        metrics,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&agent.api, "/readyz").is_none() {
        assert!(Instant::now() < deadline, "the agent did not get ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent
}

/// tiny-sd1 with `bytes` more weights (f16) in its UNet, in tensors sized
/// like a real UNet's (40% 64–512 KiB, 55% 0.5–8 MiB, 5% 20–40 MiB), so
/// that loads, moves and evictions allocate and free what real ones do.
fn mixed_model(dir: &Path, bytes: usize, seed: u64) {
    copy_dir(&fixtures().join("tiny-sd1"), dir);
    let file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let original = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&original).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut between = |lo: usize, hi: usize| lo + (rng.next_u64() as usize) % (hi - lo);
    let mut sizes = Vec::new();
    let mut total = 0;
    while total < bytes {
        let kind = between(0, 100);
        let size = match kind {
            0..40 => between(64 << 10, 512 << 10),
            40..95 => between(512 << 10, 8 << 20),
            _ => between(20 << 20, 40 << 20),
        } & !1;
        sizes.push(size);
        total += size;
    }
    let data: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| (0..n).map(|i| (i % 251) as u8 & 0x3b).collect())
        .collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    for (i, d) in data.iter().enumerate() {
        views.push((
            format!("modelcache_bench_padding_{i}"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![d.len() / 2], d)
                .unwrap(),
        ));
    }
    safetensors::serialize_to_file(views, None, &file).unwrap();
}

/// The catalog: four SD-1.x models of 128 MiB (256 MiB as f32 on the CPU
/// device), tiny SDXL, and a LoRA. The RAM tier (400 MiB) holds two of the
/// files, the device tier (900 MiB) three of the f32 copies, so the trace keeps
/// switching; both leave room for the two requests running at once.
fn catalog() -> std::path::PathBuf {
    let dir = scratch().join("malloc-serving");
    let models = dir.join("models");
    if !models.join("ready").exists() {
        let _ = std::fs::remove_dir_all(&models);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            mixed_model(&models.join(name), 128 << 20, i as u64);
        }
        copy_dir(&fixtures().join("tiny-sdxl"), &models.join("xl"));
        std::fs::create_dir_all(models.join("loras")).unwrap();
        std::fs::copy(
            fixtures().join("tiny-sd1-lora/tiny-sd1-lora.safetensors"),
            models.join("loras/style.safetensors"),
        )
        .unwrap();
        std::fs::write(models.join("ready"), "").unwrap();
    }
    dir
}

/// The compressed hour: `n` requests, Zipf over the models, sizes 64–256,
/// 2–6 steps, a third of the SD-1.x requests with the LoRA.
fn trace(n: usize) -> Vec<String> {
    let models = ["a", "b", "xl", "c", "d"];
    let weights: Vec<f64> = (1..=models.len()).map(|r| 1.0 / r as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    (0..n)
        .map(|i| {
            let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
            let pick = weights
                .iter()
                .position(|w| {
                    let hit = u < *w;
                    u -= w;
                    hit
                })
                .unwrap_or(models.len() - 1);
            let model = models[pick];
            let size = [64, 128, 128, 256][(rng.next_u64() % 4) as usize];
            let steps = 2 + rng.next_u64() % 5;
            let mut body = serde_json::json!({"model": model, "prompt": format!("request {i}"),
                "size": format!("{size}x{size}"), "steps": steps, "seed": i});
            if model != "xl" && rng.next_u64() % 3 == 0 {
                body["loras"] =
                    serde_json::json!([{"path": "loras/style.safetensors", "weight": 0.8}]);
            }
            body.to_string()
        })
        .collect()
}

/// What one setting's run measured.
struct Served {
    seconds: f64,
    latencies: Vec<f64>,
    /// (RSS − cached bytes − pooled bytes) samples, in order: what is
    /// neither weights nor the pool's bounded reserve.
    overhead: Vec<f64>,
    malloc_free_max: f64,
    pool_max: f64,
    pool_hits: f64,
    pool_misses: f64,
    /// Requests not answered 200, with the answer (the settings are sized so that none fail).
    failed: Vec<String>,
}

fn serve_trace(setting: &Setting, dir: &Path, trace: &[String]) -> Served {
    let state = dir.join("state");
    let _ = std::fs::remove_dir_all(&state);
    let agent = start_agent(setting, dir);
    let pid = agent.child.id();
    let next = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let latencies = Mutex::new(Vec::new());
    let samples = Mutex::new((Vec::new(), 0.0f64, 0.0f64));
    let start = Instant::now();
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Some(m) = get(&agent.metrics, "/metrics") {
                    let cached = metric(&m, "modelcache_cache_bytes{");
                    let pooled = metric(&m, "modelcache_alloc_pool_bytes ");
                    let mut s = samples.lock().unwrap();
                    s.0.push(resident_bytes(pid) - cached - pooled);
                    s.1 = s.1.max(metric(&m, "modelcache_malloc_free_bytes "));
                    s.2 = s.2.max(pooled);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        // Two clients, so that loads and steps run on several threads (and
        // glibc arenas) at once, as on a busy node.
        let clients: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = trace.get(i) else { break };
                    let t = Instant::now();
                    match post(&agent.api, body) {
                        Ok(()) => latencies.lock().unwrap().push(t.elapsed().as_secs_f64()),
                        Err(answer) => failed.lock().unwrap().push(format!("{body} → {answer}")),
                    }
                })
            })
            .collect();
        for c in clients {
            let _ = c.join();
        }
        done.store(true, Ordering::Relaxed);
        let _ = sampler.join();
    });
    let seconds = start.elapsed().as_secs_f64();
    let m = get(&agent.metrics, "/metrics").unwrap_or_default();
    let (overhead, malloc_free_max, pool_max) = samples.into_inner().unwrap();
    Served {
        seconds,
        latencies: latencies.into_inner().unwrap(),
        overhead,
        malloc_free_max,
        pool_max,
        pool_hits: metric(&m, "modelcache_alloc_pool_hits_total "),
        pool_misses: metric(&m, "modelcache_alloc_pool_misses_total "),
        failed: failed.into_inner().unwrap(),
    }
}

/// The serving workload under each setting: speed and whether memory outside
/// the cache stays flat.
pub fn bench_serving() {
    const REQUESTS: usize = 240;
    header("Allocator settings: a real agent serving a compressed hour (240 requests: 4 SD-1.x models of 128 MiB + tiny SDXL, Zipf, 64–256 px, 2–6 steps, a third with a LoRA; 2 clients; RAM tier 400 MiB, CPU device tier 900 MiB)");
    let dir = catalog();
    let trace = trace(REQUESTS);
    let mut reference = None;
    for s in &SETTINGS {
        let r = serve_trace(s, &dir, &trace);
        assert!(
            r.failed.is_empty(),
            "{}: requests failed: {:?}",
            s.name,
            r.failed
        );
        let rps = REQUESTS as f64 / r.seconds;
        let base = *reference.get_or_insert(rps);
        let quarter = (r.overhead.len() / 4).max(1);
        let early = pct(r.overhead[..quarter].to_vec(), 0.5) / MIB;
        let late = pct(r.overhead[r.overhead.len() - quarter..].to_vec(), 0.5) / MIB;
        let max = r.overhead.iter().cloned().fold(0.0, f64::max) / MIB;
        row(
            s.name,
            format!(
                "{rps:.2} req/s, p50 {:.2} s, p99 {:.2} s",
                pct(r.latencies.clone(), 0.5),
                pct(r.latencies.clone(), 0.99)
            ),
            format!("{base:.2} req/s (glibc dynamic)"),
            Some(rps / base),
            "(speed)",
        );
        let pool = if r.pool_hits + r.pool_misses > 0.0 {
            format!(
                "; pool held ≤ {:.0} MiB, hits {:.0}%",
                r.pool_max / MIB,
                100.0 * r.pool_hits / (r.pool_hits + r.pool_misses)
            )
        } else {
            String::new()
        };
        row(
            &format!("{}: RSS − cached − pooled", s.name),
            format!("first quarter {early:.0} MiB, last quarter {late:.0} MiB, max {max:.0} MiB; malloc free ≤ {:.0} MiB{pool}", r.malloc_free_max / MIB),
            String::new(),
            Some(late / early.max(1.0)),
            "flat (last/first ≤ 1.2x)",
        );
    }
}
