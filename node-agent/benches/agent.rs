//! Agent benchmarks: each prints the measured figure beside the reference it is
//! judged against, measured in the same run.
//!
//! `cargo bench -p modelcache-agent --bench agent [-- GROUP]` with GROUP one of
//! `store`, `cache`, `pipeline`, `edits`, `sd15`, `api`, `fetch`, `peers`,
//! `batching`, `switching`, `malloc` (`malloc-steps` and `malloc-serving`)
//! (default: all but `sd15` and `malloc`).
//! The benchmark runs with the agent's allocator (`memory::pool`).

#[path = "../tests/agent/common/mod.rs"]
mod common;
use common::{copy_dir, fixtures, rchar};
#[path = "agent/malloc.rs"]
mod malloc;

#[global_allocator]
static ALLOCATOR: modelcache_agent::memory::pool::PoolAllocator =
    modelcache_agent::memory::pool::PoolAllocator;

use candle_core::{DType, Device};
use modelcache_agent::agent::Agent;
use modelcache_agent::api::{self, AppState, Limits, Queue};
use modelcache_agent::cache::{CacheConfig, CacheKey, DiskLoader, ModelCache};
use modelcache_agent::catalog::Catalog;
use modelcache_agent::pipeline::{self, DiffusersModel, GenerateParams};
use modelcache_agent::routes::Routes;
use modelcache_agent::store::{self, safetensors::write_sparse};
use safetensors::Dtype;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GB: f64 = 1e9;

fn scratch() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-scratch");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn row(what: &str, value: String, reference: String, ratio: Option<f64>, goal: &str) {
    let r = ratio.map_or("".into(), |r| format!("{r:.2}x"));
    println!("| {what} | {value} | {reference} | {r} | {goal} |");
}

fn header(title: &str) {
    println!("\n### {title}\n\n| measurement | value | reference (same run) | ratio | goal |\n|---|---|---|---|---|");
}

/// A 1 GiB safetensors file of 256 tensors (written once, with real bytes).
fn gib_file(dtype: Dtype) -> PathBuf {
    let p = scratch().join(format!("gib-{dtype:?}.safetensors"));
    if p.exists() {
        return p;
    }
    let el = dtype.bitsize() / 8;
    let n = (4 << 20) / el;
    let tensors: Vec<(String, Vec<usize>)> =
        (0..256).map(|i| (format!("t{i:03}"), vec![n])).collect();
    let refs: Vec<(&str, Dtype, &[usize])> = tensors
        .iter()
        .map(|(k, s)| (k.as_str(), dtype, s.as_slice()))
        .collect();
    write_sparse(&p, &refs, &[]).unwrap();
    // Fill the data with non-zero bytes so it really occupies the page cache.
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let index = store::open_weights(&p).unwrap();
    let start = match index.tensors[0].location {
        store::Location::File { offset } => offset,
        _ => 0,
    };
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(start)).unwrap();
    let chunk: Vec<u8> = (0..(16 << 20)).map(|i| (i % 7 + 1) as u8).collect();
    for _ in 0..64 {
        f.write_all(&chunk).unwrap();
    }
    p
}

/// memcpy between two already-resident buffers.
fn memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![2u8; bytes];
    let t = Instant::now();
    dst.copy_from_slice(&src);
    std::hint::black_box(&dst);
    bytes as f64 / t.elapsed().as_secs_f64() / GB
}

fn bench_store() {
    header("Store: probe, search, load");
    // A 7 GB SD 1.5-shaped checkpoint: 1,131 tensors, data left as holes.
    let dir = scratch().join("probe");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("sd15-7gb.safetensors");
    if !p.exists() {
        let mut t: Vec<(String, Dtype, Vec<usize>)> = vec![
            (
                "model.diffusion_model.input_blocks.0.0.weight".into(),
                Dtype::F32,
                vec![320, 4, 3, 3],
            ),
            (
                "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
                    .into(),
                Dtype::F32,
                vec![320, 768],
            ),
        ];
        for i in 0..1128 {
            t.push((
                format!("model.diffusion_model.layer{i}.weight"),
                Dtype::F32,
                vec![1_600_000],
            ));
        }
        t.push((
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight".into(),
            Dtype::F32,
            vec![49408, 768],
        ));
        let refs: Vec<(&str, Dtype, &[usize])> = t
            .iter()
            .map(|(k, d, s)| (k.as_str(), *d, s.as_slice()))
            .collect();
        write_sparse(&p, &refs, &[]).unwrap();
    }
    let size = std::fs::metadata(&p).unwrap().len();
    let before = rchar();
    let r = store::probe(&p).unwrap();
    let read = rchar() - before;
    let times: Vec<f64> = (0..50)
        .map(|_| {
            let t = Instant::now();
            store::probe(&p).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    row(
        &format!(
            "probe of a {:.1} GB checkpoint ({} tensors)",
            size as f64 / GB,
            r.tensor_count
        ),
        format!("{:.2} ms, {} KiB read", median(times), read / 1024),
        format!("file {:.1} GB", size as f64 / GB),
        None,
        "< 5 ms, header only",
    );
    // Search over 10,000 files.
    let tree = scratch().join("search-10k");
    if !tree.exists() {
        for d in 0..100 {
            let sub = tree.join(format!("dir{d:03}"));
            std::fs::create_dir_all(&sub).unwrap();
            for f in 0..100 {
                std::fs::write(sub.join(format!("m{f:03}.safetensors")), b"").unwrap();
            }
        }
    }
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let found = store::search::find_models(&tree);
            assert_eq!(found.models.len(), 10_000);
            t.elapsed().as_secs_f64()
        })
        .collect();
    row(
        "search over 10,000 files",
        format!("{:.3} s", median(times)),
        "-".into(),
        None,
        "< 1 s",
    );
    // Load throughput into CPU tensors.
    let f16 = gib_file(Dtype::F16);
    let index = store::open_weights(&f16).unwrap();
    let bytes = index.tensors.iter().map(|t| t.len).sum::<u64>() as f64;
    let _ = store::load::load_all(&index, &Device::Cpu, DType::F16).unwrap(); // warm the page cache
    let t = Instant::now();
    let tensors = store::load::load_all(&index, &Device::Cpu, DType::F16).unwrap();
    let load = bytes / t.elapsed().as_secs_f64() / GB;
    drop(tensors);
    let file = std::fs::File::open(&f16).unwrap();
    let t = Instant::now();
    // SAFETY: read-only mapping of a file nobody modifies during the benchmark.
    let map = unsafe { memmap_ro(&file) };
    let mut copy = vec![0u8; map.len()];
    copy.copy_from_slice(map);
    let mmap = map.len() as f64 / t.elapsed().as_secs_f64() / GB;
    drop(copy);
    // SAFETY: unmapping the mapping made above, which is not used afterwards.
    unsafe { libc::munmap(map.as_ptr() as *mut libc::c_void, map.len()) };
    row(
        "load 1 GiB safetensors into CPU tensors (f16, warm)",
        format!("{load:.2} GB/s"),
        format!("mmap+memcpy {mmap:.2} GB/s"),
        Some(load / mmap),
        ">= 0.8x",
    );
    let t = Instant::now();
    let tensors = store::load::load_all(&index, &Device::Cpu, DType::F32).unwrap();
    let conv = bytes / t.elapsed().as_secs_f64() / GB;
    drop(tensors);
    row(
        "load 1 GiB f16 → f32 tensors (warm)",
        format!("{conv:.2} GB/s of file"),
        format!("mmap+memcpy {mmap:.2} GB/s"),
        Some(conv / mmap),
        "(reported)",
    );
}

/// A read-only mapping of a whole file.
unsafe fn memmap_ro(file: &std::fs::File) -> &'static [u8] {
    use std::os::fd::AsRawFd;
    let len = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
    let p = libc::mmap(
        std::ptr::null_mut(),
        len,
        libc::PROT_READ,
        libc::MAP_PRIVATE,
        file.as_raw_fd(),
        0,
    );
    std::slice::from_raw_parts(p as *const u8, len)
}

/// Drops the file's pages from the page cache (written back first, or the kernel keeps them).
fn evict_page_cache(p: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::File::open(p) {
        let _ = f.sync_all();
        // SAFETY: advisory call on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// Fraction of the file's pages in the page cache (mincore).
fn resident_fraction(p: &Path) -> f64 {
    let Ok(file) = std::fs::File::open(p) else {
        return 0.0;
    };
    // SAFETY: read-only mapping, only inspected with mincore.
    let map = unsafe { memmap_ro(&file) };
    let pages = map.len().div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: vec has one byte per page of the mapping.
    unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            vec.as_mut_ptr(),
        )
    };
    let resident = vec.iter().filter(|b| **b & 1 == 1).count();
    unsafe { libc::munmap(map.as_ptr() as *mut libc::c_void, map.len()) };
    resident as f64 / pages.max(1) as f64
}

fn bench_cache() {
    header("Cache: load and switch");
    let f16 = gib_file(Dtype::F16);
    let key = CacheKey::from(f16.as_path());
    let bytes = std::fs::metadata(&f16).unwrap().len() as f64;
    let cfg = |dev: u64| CacheConfig::cpu(3 << 30, dev);
    let cache = ModelCache::new(cfg(0), Box::new(DiskLoader), None);
    drop(cache.get_ram(&key).unwrap()); // warm page cache
    let mut warm = Vec::new();
    for _ in 0..5 {
        cache.drop_model(&key);
        let t = Instant::now();
        drop(cache.get_ram(&key).unwrap());
        warm.push(bytes / t.elapsed().as_secs_f64() / GB);
    }
    let mut cold = Vec::new();
    let mut residency = 0.0f64;
    for _ in 0..3 {
        cache.drop_model(&key);
        evict_page_cache(&f16);
        residency = residency.max(resident_fraction(&f16));
        let t = Instant::now();
        drop(cache.get_ram(&key).unwrap());
        cold.push(bytes / t.elapsed().as_secs_f64() / GB);
    }
    // The disk itself: a plain sequential read of the same cold file (what `dd bs=16M` does).
    evict_page_cache(&f16);
    let mut disk = std::fs::File::open(&f16).unwrap();
    let mut chunk = vec![0u8; 16 << 20];
    let t = Instant::now();
    let mut total = 0usize;
    loop {
        let n = disk.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    let disk_gbps = total as f64 / t.elapsed().as_secs_f64() / GB;
    let memcpy = memcpy_gbps(1 << 30);
    // read() into already-resident memory.
    let mut buf = vec![1u8; bytes as usize];
    let mut f = std::fs::File::open(&f16).unwrap();
    let t = Instant::now();
    let mut got = 0;
    let len = buf.len();
    while got < len {
        let n = f.read(&mut buf[got..(got + (16 << 20)).min(len)]).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    let read_resident = got as f64 / t.elapsed().as_secs_f64() / GB;
    drop(buf);
    row(
        "disk → RAM tier, warm page cache (1 GiB, 2 threads)",
        format!("{:.2} GB/s", median(warm.clone())),
        format!("memcpy {memcpy:.1} GB/s; read into resident {read_resident:.1} GB/s"),
        Some(median(warm) / read_resident),
        ">= 4 GB/s (aim 10)",
    );
    row(
        &format!(
            "disk → RAM tier, cold ({:.0}% of the file cached before the load)",
            residency * 100.0
        ),
        format!("{:.2} GB/s", median(cold.clone())),
        format!("sequential read of the cold file {disk_gbps:.2} GB/s"),
        Some(median(cold) / disk_gbps),
        ">= 2.5 GB/s (disk-bound)",
    );

    // RAM → device tier move of an f32 model (a plain copy on the CPU device).
    let f32 = gib_file(Dtype::F32);
    let k32 = CacheKey::from(f32.as_path());
    let cache = ModelCache::new(cfg(2 << 30), Box::new(DiskLoader), None);
    drop(cache.get_ram(&k32).unwrap());
    let mut moves = Vec::new();
    for _ in 0..3 {
        cache.drop_model(&k32);
        drop(cache.get_ram(&k32).unwrap());
        let t = Instant::now();
        drop(cache.get_device(&k32).unwrap());
        moves.push(bytes / t.elapsed().as_secs_f64() / GB);
    }
    let memcpy_fresh = {
        let src = vec![1u8; 1 << 30];
        let t = Instant::now();
        let dst = src.clone();
        std::hint::black_box(&dst);
        (1u64 << 30) as f64 / t.elapsed().as_secs_f64() / GB
    };
    row(
        "RAM → device tier move, 1 GiB f32 (CPU device)",
        format!("{:.2} GB/s", median(moves.clone())),
        format!("memcpy into fresh memory {memcpy_fresh:.2} GB/s"),
        Some(median(moves) / memcpy_fresh),
        ">= 0.9x",
    );
    let hits: Vec<f64> = (0..10_000)
        .map(|_| {
            let t = Instant::now();
            drop(cache.get_device(&k32).unwrap());
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    row(
        "hit latency (device tier, lock + unlock)",
        format!(
            "p50 {:.1} µs, p99 {:.1} µs",
            pct(hits.clone(), 0.5),
            pct(hits, 0.99)
        ),
        "-".into(),
        None,
        "microseconds",
    );
}

fn tiny_cache() -> ModelCache {
    let cfg = CacheConfig::cpu(256 << 20, 256 << 20);
    ModelCache::new(cfg, Box::new(DiskLoader), None)
}

/// diffusers' seconds per step for the same measurement, when
/// `MODELCACHE_DIFFUSERS_PYTHON` names a Python with torch and diffusers
/// (scripts/diffusers-venv.sh); the reference column and ratio then follow.
fn diffusers_step(args: &[&str]) -> Option<f64> {
    diffusers_json(args)?["step_s"].as_f64()
}

/// What `scripts/diffusers_step_bench.py` prints, when it can run.
fn diffusers_json(args: &[&str]) -> Option<serde_json::Value> {
    let python = std::env::var_os("MODELCACHE_DIFFUSERS_PYTHON")?;
    let script = fixtures().join("../../scripts/diffusers_step_bench.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "diffusers benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .find(|l| l.starts_with(b"{"))?,
    )
    .ok()
}

fn versus_diffusers(ours: f64, theirs: Option<f64>, unit_ms: bool) -> (String, Option<f64>) {
    match theirs {
        Some(d) if unit_ms => (format!("diffusers {:.2} ms", d * 1e3), Some(ours / d)),
        Some(d) => (format!("diffusers {d:.1} s"), Some(ours / d)),
        None => (
            "diffusers: set MODELCACHE_DIFFUSERS_PYTHON to measure".into(),
            None,
        ),
    }
}

/// Seconds per denoising step of the requests `p(steps)` make: the median
/// time of 22 steps less that of 2, over 20 (the fixed costs cancel).
fn step_time(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: impl Fn(usize) -> GenerateParams,
) -> f64 {
    pipeline::generate(cache, model, &p(2), &|_| true).unwrap();
    let step = |steps: usize| {
        let t = Instant::now();
        pipeline::generate(cache, model, &p(steps), &|_| true).unwrap();
        t.elapsed().as_secs_f64()
    };
    let a = median((0..5).map(|_| step(2)).collect());
    let b = median((0..5).map(|_| step(22)).collect());
    (b - a) / 20.0
}

fn bench_pipeline() {
    header("Pipeline");
    let cache = tiny_cache();
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let p = |steps| GenerateParams {
        prompt: "a red cat".into(),
        steps,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let ours = step_time(&cache, &model, p);
    let fixture = fixtures().join("tiny-sd1");
    let (reference, ratio) = versus_diffusers(
        ours,
        diffusers_step(&["tiny", &fixture.to_string_lossy()]),
        true,
    );
    row(
        "denoising step, tiny-sd1 at 64×64 (CFG batch 2)",
        format!("{:.2} ms", ours * 1e3),
        reference,
        ratio,
        "<= 1.0x diffusers",
    );
}

/// Edits against text-to-image on the same model, size and steps: image to
/// image at strength s should cost about s of it (it runs the last s of the
/// steps, plus one VAE encode), inpainting with an ordinary model under 1.1×
/// (one encode, and a blend per step).
fn bench_edits() {
    header("Edits");
    let cache = tiny_cache();
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let (w, h) = (256, 256);
    let image = pipeline::Image {
        width: w,
        height: h,
        data: (0..w * h * 3).map(|i| (i % 251) as f32 / 250.0).collect(),
    };
    let mut mask = pipeline::Mask::full(w, h);
    mask.data[..w * h / 2].iter_mut().for_each(|v| *v = 0.0);
    let p = |edit: Option<pipeline::Edit>| GenerateParams {
        prompt: "a red cat".into(),
        steps: 20,
        width: w,
        height: h,
        edit,
        ..Default::default()
    };
    // Whole request, and its denoising alone: steps run × the median time
    // between two steps' ends (so the VAE's fixed cost is apart).
    let time = |p: &GenerateParams| {
        pipeline::generate(&cache, &model, p, &|_| true).unwrap();
        let runs: Vec<(f64, f64)> = (0..3)
            .map(|_| {
                let ends = std::sync::Mutex::new(Vec::new());
                let t = Instant::now();
                pipeline::generate(&cache, &model, p, &|s| {
                    if matches!(s, pipeline::Stage::Denoising { .. }) {
                        ends.lock().unwrap().push(t.elapsed().as_secs_f64());
                    }
                    true
                })
                .unwrap();
                let ends = ends.into_inner().unwrap();
                let gaps: Vec<f64> = ends.windows(2).map(|w| w[1] - w[0]).collect();
                (t.elapsed().as_secs_f64(), median(gaps) * ends.len() as f64)
            })
            .collect();
        (
            median(runs.iter().map(|r| r.0).collect()),
            median(runs.iter().map(|r| r.1).collect()),
        )
    };
    let (txt2img, txt2img_denoise) = time(&p(None));
    let reference = |denoise: bool| {
        if denoise {
            format!("text-to-image denoising {:.0} ms", txt2img_denoise * 1e3)
        } else {
            format!("text-to-image {:.0} ms", txt2img * 1e3)
        }
    };
    let what = format!("tiny-sd1 {w}×{h}, 20 steps");
    for strength in [0.25, 0.5, 0.75] {
        let (t, denoise) = time(&p(Some(pipeline::Edit {
            image: image.clone(),
            mask: None,
            strength,
        })));
        row(
            &format!("image-to-image at strength {strength}, {what}: denoising"),
            format!("{:.0} ms", denoise * 1e3),
            reference(true),
            Some(denoise / txt2img_denoise),
            &format!("≈ {strength}x"),
        );
        row(
            &format!("image-to-image at strength {strength}, {what}: whole request"),
            format!("{:.0} ms", t * 1e3),
            reference(false),
            Some(t / txt2img),
            "(adds a VAE encode)",
        );
    }
    let (t, denoise) = time(&p(Some(pipeline::Edit {
        image,
        mask: Some(mask),
        strength: 1.0,
    })));
    row(
        &format!("inpainting (text-to-image UNet), {what}: denoising"),
        format!("{:.0} ms", denoise * 1e3),
        reference(true),
        Some(denoise / txt2img_denoise),
        "≈ 1x (a blend per step)",
    );
    row(
        &format!("inpainting (text-to-image UNet), {what}: whole request"),
        format!("{:.0} ms", t * 1e3),
        reference(false),
        Some(t / txt2img),
        "< 1.1x (adds a VAE encode)",
    );
}

/// SD 1.5's UNet with random weights (f32, CPU), and the variables it holds.
fn sd15_unet() -> (
    modelcache_agent::pipeline::nets::unet_2d::UNet2DConditionModel,
    candle_nn::VarMap,
) {
    use candle_nn::{VarBuilder, VarMap};
    use modelcache_agent::pipeline::nets::unet_2d;
    let cfg = unet_2d::UNet2DConditionModelConfig::from_json(&serde_json::json!({
        "block_out_channels": [320, 640, 1280, 1280], "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "attention_head_dim": 8, "cross_attention_dim": 768, "layers_per_block": 2})).unwrap();
    let map = VarMap::new();
    let unet = unet_2d::UNet2DConditionModel::new(
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        4,
        4,
        false,
        cfg,
    )
    .unwrap();
    (unet, map)
}

fn bench_sd15() {
    header("Pipeline: SD-1.5-sized UNet");
    let (unet, map) = sd15_unet();
    let x = candle_core::Tensor::zeros((2, 4, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let ctx = candle_core::Tensor::zeros((2, 77, 768), DType::F32, &Device::Cpu).unwrap();
    let t = Instant::now();
    unet.forward(&x, 500.0, &ctx).unwrap();
    let ours = t.elapsed().as_secs_f64();
    drop((unet, map));
    let (reference, ratio) = versus_diffusers(ours, diffusers_step(&["sd15"]), false);
    row(
        "denoising step, SD 1.5 UNet at 512×512 (CFG batch 2, f32, CPU)",
        format!("{ours:.1} s"),
        reference,
        ratio,
        "<= 1.0x diffusers",
    );
}

/// Seconds as people read them: ms below one.
fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// One row of the ControlNet benchmark: the step alone and with one
/// ControlNet, the ControlNet's share of the step beside diffusers'.
fn controlnet_row(what: &str, alone: f64, controlled: f64, theirs: Option<serde_json::Value>) {
    let extra = (controlled - alone) / alone;
    let theirs = theirs.and_then(|v| {
        let (a, c) = (v["step_s"].as_f64()?, v["controlled_step_s"].as_f64()?);
        Some((c - a) / a)
    });
    let (reference, ratio) = match theirs {
        Some(d) => (
            format!("diffusers +{:.0}%", d * 100.0),
            Some((1.0 + extra) / (1.0 + d)),
        ),
        None => (
            "diffusers: set MODELCACHE_DIFFUSERS_PYTHON to measure".into(),
            None,
        ),
    };
    row(
        what,
        format!(
            "+{:.0}% ({} → {})",
            extra * 100.0,
            seconds(alone),
            seconds(controlled)
        ),
        reference,
        ratio,
        "<= 1.0x diffusers' controlled/alone",
    );
}

/// What one ControlNet adds to a denoising step, against the step alone in
/// the same run: tiny-sd1 at 64×64 through the whole pipeline.
fn bench_controlnet() {
    header("ControlNet: extra cost per step");
    let cache = tiny_cache();
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let dir = fixtures().join("tiny-sd1-controlnet");
    let control = pipeline::Control {
        model: std::sync::Arc::new(
            pipeline::ControlModel::open(&dir.join("controlnet-a")).unwrap(),
        ),
        image: pipeline::image::decode_image(
            &std::fs::read(dir.join("control.png")).unwrap(),
            1 << 22,
        )
        .unwrap(),
        weight: 1.0,
        start: 0.0,
        end: 1.0,
    };
    let per_step = |controls: Vec<pipeline::Control>| {
        let p = |steps| GenerateParams {
            prompt: "a red cat".into(),
            steps,
            width: 64,
            height: 64,
            controls: controls.clone(),
            ..Default::default()
        };
        step_time(&cache, &model, p)
    };
    let (alone, controlled) = (per_step(Vec::new()), per_step(vec![control]));
    let theirs = diffusers_json(&[
        "controlnet",
        &fixtures().join("tiny-sd1").to_string_lossy(),
        &dir.join("controlnet-a").to_string_lossy(),
        &dir.join("control.png").to_string_lossy(),
    ]);
    controlnet_row(
        "tiny-sd1 step at 64×64 (CFG batch 2) with one ControlNet",
        alone,
        controlled,
        theirs,
    );
}

/// The same at SD 1.5's size: its UNet alone, then an SD 1.5 ControlNet
/// and the UNet with its residuals (random weights, f32, CPU, 512×512).
fn bench_controlnet_sd15() {
    use candle_nn::VarBuilder;
    use modelcache_agent::pipeline::nets::controlnet::{ControlNet, ControlNetConfig};
    use modelcache_agent::pipeline::nets::unet_2d::Inputs;
    header("ControlNet: extra cost per step, SD-1.5-sized");
    let (unet, map) = sd15_unet();
    let config = ControlNetConfig::from_json(&serde_json::json!({
        "block_out_channels": [320, 640, 1280, 1280], "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "attention_head_dim": 8, "cross_attention_dim": 768, "layers_per_block": 2})).unwrap();
    let net_map = candle_nn::VarMap::new();
    let net = ControlNet::new(
        VarBuilder::from_varmap(&net_map, DType::F32, &Device::Cpu),
        4,
        config,
    )
    .unwrap();
    let x = candle_core::Tensor::zeros((2, 4, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let ctx = candle_core::Tensor::zeros((2, 77, 768), DType::F32, &Device::Cpu).unwrap();
    let cond = candle_core::Tensor::zeros((2, 3, 512, 512), DType::F32, &Device::Cpu).unwrap();
    // The control image is embedded once per generation, not per step.
    let control = net.embed_control(&cond).unwrap();
    let controlled_step = || {
        let r = net.forward(&x, 500.0, &ctx, &control, 1.0, None).unwrap();
        unet.forward_with(
            &x,
            500.0,
            &ctx,
            Inputs {
                down: Some(&r.down),
                mid: Some(&r.mid),
                ..Default::default()
            },
        )
        .unwrap();
    };
    // One of each first, as on diffusers' side: first calls pay for allocations.
    unet.forward(&x, 500.0, &ctx).unwrap();
    controlled_step();
    let t = Instant::now();
    unet.forward(&x, 500.0, &ctx).unwrap();
    let alone = t.elapsed().as_secs_f64();
    let t = Instant::now();
    controlled_step();
    let controlled = t.elapsed().as_secs_f64();
    drop((unet, map, net, net_map));
    controlnet_row(
        "SD 1.5 UNet step at 512×512 (CFG batch 2, f32, CPU) with one ControlNet",
        alone,
        controlled,
        diffusers_json(&["controlnet-sd15"]),
    );
}

fn bench_api() {
    header("API overhead");
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny"));
    let catalog = Catalog::scan(&models, &dir.path().join("state"), None);
    let agent =
        std::sync::Arc::new(Agent::new(CacheConfig::cpu(64 << 20, 64 << 20), catalog).unwrap());
    let state = std::sync::Arc::new(AppState::new(
        agent,
        std::sync::Arc::new(Routes::default()),
        Queue::new(2, 64),
        Limits::default(),
        None,
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(async move { axum::serve(listener, api::router(state)).await });
    let body = serde_json::json!({"model": "tiny", "prompt": "a", "size": "64x64", "steps": 1, "guidance_scale": 0, "seed": 1}).to_string();
    let mut e2e = Vec::new();
    let mut overhead = Vec::new();
    for i in 0..300 {
        let t = Instant::now();
        let (status, gen_ms) = post_timed(&addr, &body);
        assert_eq!(status, 200);
        let total = t.elapsed().as_secs_f64() * 1e3;
        if i >= 20 {
            e2e.push(total);
            overhead.push(total - gen_ms);
        }
    }
    row(
        "API overhead per request (end-to-end minus the server's generation time, paired)",
        format!(
            "p50 {:.3} ms, p99 {:.3} ms",
            pct(overhead.clone(), 0.5),
            pct(overhead, 0.99)
        ),
        format!("end-to-end p50 {:.2} ms", pct(e2e.clone(), 0.5)),
        None,
        "p99 < 1 ms",
    );
    // Saturation: 8 clients for 5 s against concurrency 2.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(5);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (addr, body, done) = (addr.clone(), body.clone(), done.clone());
            std::thread::spawn(move || {
                while Instant::now() < until {
                    if post(&addr, &body) == 200 {
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let rps = done.load(std::sync::atomic::Ordering::Relaxed) as f64 / 5.0;
    row(
        "requests/s at saturation (8 clients, 2 generations at once)",
        format!("{rps:.0} req/s"),
        format!("1000/pipeline p50 × 2 = {:.0} req/s", 2000.0 / median(e2e)),
        None,
        "(reported)",
    );
}

/// Status and the `x-modelcache-generation-ms` header of one request.
fn post_timed(addr: &str, body: &str) -> (u16, f64) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let req = format!("POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let ms = text
        .lines()
        .find_map(|l| l.strip_prefix("x-modelcache-generation-ms: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    (status, ms)
}

fn post(addr: &str, body: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let req = format!("POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out[..12.min(out.len())])
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn main() {
    pipeline::pin_cpu_threads();
    if malloc::child() {
        return;
    }
    let groups: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let all = groups.is_empty();
    let want = |g: &str| {
        all && !matches!(
            g,
            "sd15" | "controlnet-sd15" | "malloc" | "malloc-steps" | "malloc-serving"
        ) || groups.iter().any(|x| x == g)
    };
    println!(
        "modelcache agent benchmarks ({} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if want("store") {
        bench_store();
    }
    if want("cache") {
        bench_cache();
    }
    if want("pipeline") {
        bench_pipeline();
    }
    if want("edits") {
        bench_edits();
    }
    if want("sd15") {
        bench_sd15();
    }
    if want("controlnet") {
        bench_controlnet();
    }
    if want("controlnet-sd15") {
        bench_controlnet_sd15();
    }
    if want("api") {
        bench_api();
    }
    if want("fetch") {
        bench_fetch();
    }
    if want("peers") {
        bench_peers();
    }
    if want("batching") {
        bench_batching();
    }
    if want("switching") {
        bench_switching();
    }
    if want("malloc") || want("malloc-steps") {
        malloc::bench_steps();
    }
    if want("malloc") || want("malloc-serving") {
        malloc::bench_serving();
    }
}

/// tiny-sd1 under `dir` with `padding` more bytes of weights in its UNet
/// file (real bytes, f16): a model that computes like the tiny one and is
/// cached, moved and evicted like one of a real model's size.
fn padded_model(dir: &Path, padding: usize) {
    copy_dir(&fixtures().join("tiny-sd1"), dir);
    let file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let pad: Vec<u8> = (0..padding).map(|i| (i % 251) as u8 & 0x3b).collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    views.push((
        "modelcache_bench_padding".into(),
        safetensors::tensor::TensorView::new(Dtype::F16, vec![padding / 2], &pad).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &file).unwrap();
}

fn bench_switching() {
    const MODELS: usize = 5;
    const PADDING: usize = 1 << 30;
    const REQUESTS: usize = 100;
    header("Model switching on a real agent: 5 models of 1 GiB (f16 files, 2 GiB as f32 on the CPU device), Zipf s=1 trace of 100 requests");
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    for i in 0..MODELS {
        padded_model(&models.join(format!("m{i}")), PADDING);
    }
    let catalog = Catalog::scan(&models, &dir.path().join("state"), None);
    // The RAM tier holds 2 of the 5 files, the device tier 2 of the f32 copies.
    let agent = std::sync::Arc::new(
        Agent::new(CacheConfig::cpu(2_400 << 20, 4_600 << 20), catalog).unwrap(),
    );
    let state = std::sync::Arc::new(AppState::new(
        agent.clone(),
        std::sync::Arc::new(Routes::default()),
        Queue::new(1, 16),
        Limits::default(),
        None,
    ));
    let addr = in_background(move |listener| async move {
        let _ = axum::serve(listener, api::router(state)).await;
    })
    .to_string();
    // Zipf over a seeded permutation of the models.
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let weights: Vec<f64> = (1..=MODELS).map(|r| 1.0 / r as f64).collect();
    let total: f64 = weights.iter().sum();
    let trace: Vec<usize> = (0..REQUESTS)
        .map(|_| {
            let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
            let mut pick = MODELS - 1;
            for (i, w) in weights.iter().enumerate() {
                if u < *w {
                    pick = i;
                    break;
                }
                u -= w;
            }
            (pick * 3 + 1) % MODELS
        })
        .collect();
    let tier_of = |m: usize| {
        let unet = models.join(format!("m{m}/unet"));
        let entries = agent.cache.entries();
        let held = |t| {
            entries
                .iter()
                .any(|e| e.tier == t && e.key.path() == unet && !e.loading)
        };
        if held(modelcache_agent::cache::TierKind::Device) {
            "device hit"
        } else if held(modelcache_agent::cache::TierKind::Ram) {
            "RAM → device"
        } else {
            "disk → RAM → device"
        }
    };
    let mut by_tier: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for (i, &m) in trace.iter().enumerate() {
        let tier = tier_of(m);
        let body = serde_json::json!({"model": format!("m{m}"), "prompt": format!("request {i}"), "size": "64x64", "steps": 1, "guidance_scale": 0}).to_string();
        let t = Instant::now();
        assert_eq!(post(&addr, &body), 200);
        by_tier
            .entry(tier)
            .or_default()
            .push(t.elapsed().as_secs_f64() * 1e3);
    }
    let hits = by_tier.get("device hit").map_or(0, Vec::len);
    for (tier, lat) in &by_tier {
        row(
            &format!("{tier}: {} requests", lat.len()),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms",
                pct(lat.clone(), 0.5),
                pct(lat.clone(), 0.99)
            ),
            String::new(),
            None,
            "(reported)",
        );
    }
    row(
        "device-tier hit ratio",
        format!("{:.0}%", 100.0 * hits as f64 / REQUESTS as f64),
        String::new(),
        None,
        "(reported)",
    );
    // The same switches against the fragmentation benchmark's heap-buffer
    // control: the RAM tier's loads beside heap buffers', and what each does to RSS.
    let sequence: Vec<String> = trace.iter().map(usize::to_string).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelcache-memory-bench"))
        .arg(format!("trace:2400:1024:{}", sequence.join(",")))
        .output()
        .unwrap();
    println!(
        "\nThe same trace's RAM-tier switches against the heap-buffer control (`modelcache-memory-bench`):\n\n```\n{}```",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Latencies (ms) and completed requests/s of `n` requests arriving as a
/// Poisson process at `rate` per second (seeded), each on its own thread.
fn poisson_load(
    addr: &str,
    rate: f64,
    n: usize,
    body: impl Fn(usize) -> String,
) -> (Vec<f64>, f64) {
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let start = Instant::now();
    let mut at = 0.0;
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let uniform = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        at += -uniform.ln() / rate;
        let due = start + Duration::from_secs_f64(at);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let (addr, body) = (addr.to_string(), body(i));
        handles.push(std::thread::spawn(move || {
            let t = Instant::now();
            assert_eq!(post(&addr, &body), 200);
            (t.elapsed().as_secs_f64() * 1e3, Instant::now())
        }));
    }
    let done: Vec<(f64, Instant)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let last = done.iter().map(|d| d.1).max().unwrap_or(start);
    let rps = n as f64 / last.duration_since(start).as_secs_f64();
    (done.into_iter().map(|d| d.0).collect(), rps)
}

/// An agent serving tiny-sd1 in-process, one generation at a time, with
/// `batching`; its address.
fn batching_agent(batching: api::Batching) -> String {
    let dir = tempfile::tempdir().unwrap().keep();
    let models = dir.join("models");
    copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny"));
    let catalog = Catalog::scan(&models, &dir.join("state"), None);
    let agent =
        std::sync::Arc::new(Agent::new(CacheConfig::cpu(256 << 20, 256 << 20), catalog).unwrap());
    let state = std::sync::Arc::new(
        AppState::new(
            agent,
            std::sync::Arc::new(Routes::default()),
            Queue::new(1, 1024),
            Limits::default(),
            None,
        )
        .with_batching(batching),
    );
    in_background(move |listener| async move {
        let _ = axum::serve(listener, api::router(state)).await;
    })
    .to_string()
}

fn bench_batching() {
    header("Batching: tiny-sd1, 64×64, 10 steps, Poisson arrivals, one generation at a time");
    let body = |i: usize| {
        serde_json::json!({"model": "tiny", "prompt": format!("a cat number {i}"), "size": "64x64", "steps": 10, "seed": i}).to_string()
    };
    let alone = batching_agent(api::Batching {
        max_images: 1,
        ..Default::default()
    });
    let batched = batching_agent(api::Batching::default());
    // The unbatched agent's capacity: one request at a time, back to back.
    for i in 0..5 {
        post(&alone, &body(i));
        post(&batched, &body(i));
    }
    let service: Vec<f64> = (0..20)
        .map(|i| {
            let t = Instant::now();
            post(&alone, &body(i));
            t.elapsed().as_secs_f64()
        })
        .collect();
    let capacity = 1.0 / median(service);
    println!("\nunbatched capacity: {capacity:.1} req/s (1 ÷ median service time)\n");
    for load in [0.5, 1.0, 2.0] {
        let rate = load * capacity;
        let n = 80;
        let (a_lat, a_rps) = poisson_load(&alone, rate, n, body);
        let (b_lat, b_rps) = poisson_load(&batched, rate, n, body);
        row(
            &format!("{load}× capacity ({rate:.1} req/s offered): requests/s"),
            format!("batched {b_rps:.1}"),
            format!("unbatched {a_rps:.1}"),
            Some(b_rps / a_rps),
            "> 1x under load",
        );
        row(
            &format!("{load}× capacity: latency p50 / p99"),
            format!(
                "batched {:.0} / {:.0} ms",
                pct(b_lat.clone(), 0.5),
                pct(b_lat.clone(), 0.99)
            ),
            format!(
                "unbatched {:.0} / {:.0} ms",
                pct(a_lat.clone(), 0.5),
                pct(a_lat.clone(), 0.99)
            ),
            Some(pct(b_lat, 0.99) / pct(a_lat, 0.99)),
            "p99 < 1x under load",
        );
    }
    bench_batched_sd15_step();
}

/// What batching gains on an SD-1.5-sized UNet on the CPU: one guided step
/// of 1 image (CFG batch 2) against one of 4 images (batch 8), at 256×256.
fn bench_batched_sd15_step() {
    header("Batching: SD-1.5-sized UNet step, 256×256, random weights, f32, CPU");
    let (unet, _map) = sd15_unet();
    let step = |images: usize| {
        let x =
            candle_core::Tensor::zeros((2 * images, 4, 32, 32), DType::F32, &Device::Cpu).unwrap();
        let ctx =
            candle_core::Tensor::zeros((2 * images, 77, 768), DType::F32, &Device::Cpu).unwrap();
        unet.forward(&x, 500.0, &ctx).unwrap();
        let t = Instant::now();
        unet.forward(&x, 500.0, &ctx).unwrap();
        t.elapsed().as_secs_f64()
    };
    let one = step(1);
    let four = step(4);
    row(
        "step time per image, 4 images in one batch",
        format!("{:.2} s", four / 4.0),
        format!("1 image alone: {one:.2} s"),
        Some(four / 4.0 / one),
        "< 1x (reported)",
    );
}

/// Runs `serve` on a listener bound to 127.0.0.1, on a runtime of its own;
/// returns the address.
fn in_background<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            serve(tokio::net::TcpListener::from_std(listener).unwrap()).await;
        });
    });
    addr
}

/// Serves `app` in the background; returns the address.
fn serve_in_background(app: axum::Router) -> std::net::SocketAddr {
    in_background(|listener| async move { axum::serve(listener, app).await.unwrap() })
}

/// Copying a 1 GiB model from a neighbour agent (its internal endpoint, the
/// peer token, synced into the disk tier) against loopback TCP into a file
/// synced the same way, with bare loopback TCP (memory to memory) beside it;
/// then the time to the first image on a node without a copy, from the
/// neighbour against from a real S3 server throttled to 1 Gb/s (a node's
/// typical share of object storage).
fn bench_peers() {
    use modelcache_agent::fetch::disk::DiskTier;
    use modelcache_agent::fetch::peer::Peer;
    use modelcache_agent::fetch::{Access, Fetcher, Source};
    header("Copies between nodes (a 1 GiB model over loopback)");
    let token = "bench-peer-token-0123456789abcdef";
    let big = gib_file(Dtype::F16);
    let bytes = std::fs::metadata(&big).unwrap().len() as f64;
    // The neighbour: tiny-sd1 with the 1 GiB file inside its folder.
    let root = scratch().join("peers");
    let _ = std::fs::remove_dir_all(&root);
    let model = root.join("neighbour/models/big");
    copy_dir(&fixtures().join("tiny-sd1"), &model);
    std::fs::create_dir_all(model.join("extra")).unwrap();
    std::fs::hard_link(&big, model.join("extra/weights.safetensors")).unwrap();
    let catalog = Catalog::scan(
        &root.join("neighbour/models"),
        &root.join("neighbour/state"),
        None,
    );
    let agent =
        std::sync::Arc::new(Agent::new(CacheConfig::cpu(64 << 20, 64 << 20), catalog).unwrap());
    let state = std::sync::Arc::new(
        AppState::new(
            agent,
            Default::default(),
            Queue::new(1, 1),
            Limits::default(),
            None,
        )
        .with_peer_token(Some(token.into())),
    );
    let neighbour = serve_in_background(api::router(state)).to_string();
    let total = bytes + fixture_bytes(&fixtures().join("tiny-sd1"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Seconds to a ready copy, and with `image` to the first image from it.
    let copy = |i: usize, peers: &[Peer], source: &Source, access: &Access, image: bool| -> f64 {
        let dir = root.join(format!("copy-{i}"));
        let fetcher = Fetcher::new(
            DiskTier::open(&dir, 4 << 30).unwrap(),
            Default::default(),
            None,
        )
        .with_peer_token(Some(token.into()));
        let t = Instant::now();
        rt.block_on(fetcher.fetch("big", source, access, peers, &|_| false))
            .unwrap();
        if image {
            let empty = root.join(format!("models-{i}"));
            std::fs::create_dir_all(&empty).unwrap();
            let catalog = Catalog::scan_with(&empty, Some(&dir), &root.join("state"), None);
            let model = catalog.open("big").unwrap();
            let cache = ModelCache::new(
                CacheConfig::cpu(256 << 20, 256 << 20),
                Box::new(DiskLoader),
                None,
            );
            let p = GenerateParams {
                prompt: "a lighthouse".into(),
                steps: 2,
                width: 64,
                height: 64,
                ..Default::default()
            };
            pipeline::generate(&cache, &model, &p, &|_| true).unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        std::fs::remove_dir_all(&dir).unwrap();
        secs
    };
    let peer = [Peer {
        node: "neighbour".into(),
        endpoint: neighbour,
    }];
    let unused: Source = "http://127.0.0.1:9/unused.safetensors".parse().unwrap();
    let mut ours = Vec::new();
    let mut tcp_file = Vec::new();
    let mut tcp = Vec::new();
    for i in 0..3 {
        ours.push(total / copy(i, &peer, &unused, &Access::default(), false));
        let (to_file, to_memory) = loopback_tcp(&big, &root.join("tcp.bin"));
        tcp_file.push(to_file);
        tcp.push(to_memory);
    }
    let (o, f, m) = (median(ours), median(tcp_file), median(tcp));
    row(
        "copy from a neighbour, synced",
        format!("{:.2} GB/s", o / GB),
        format!(
            "loopback TCP into a synced file {:.2} GB/s (memory to memory {:.2} GB/s)",
            f / GB,
            m / GB
        ),
        Some(o / f),
        "≥ 0.9×",
    );

    // The same model in a real S3 server behind a proxy throttled to 1 Gb/s.
    let s3 = modelcache_tests::s3::Seaweed::start();
    s3.upload_dir(&model, "big");
    let throttled = throttling_proxy(s3.endpoint.trim_start_matches("http://"), 125e6);
    let source: Source = "s3://models/big".parse().unwrap();
    let access = Access {
        endpoint: Some(format!("http://{throttled}")),
        region: Some("us-east-1".into()),
        access_key_id: Some(modelcache_tests::s3::KEY.into()),
        secret_access_key: Some(modelcache_tests::s3::SECRET.into()),
        token: None,
    };
    let from_source = copy(10, &[], &source, &access, true);
    let from_peer = copy(11, &peer, &source, &access, true);
    row(
        "time to first image on a node without a copy: from a neighbour",
        format!("{from_peer:.1} s"),
        format!("from a source throttled to 1 Gb/s: {from_source:.1} s"),
        Some(from_peer / from_source),
        "< 1×",
    );
}

/// Bytes of every file under `dir`.
fn fixture_bytes(dir: &Path) -> f64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                fixture_bytes(&e.path())
            } else {
                e.metadata().unwrap().len() as f64
            }
        })
        .sum()
}

/// Bytes/s of `file` sent over a loopback TCP connection and written to
/// `out`, then synced; and of the same bytes from memory, read and dropped.
fn loopback_tcp(file: &Path, out: &Path) -> (f64, f64) {
    let data = std::sync::Arc::new(std::fs::read(file).unwrap());
    let run = |sink: &mut dyn FnMut(&[u8])| -> f64 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let d = data.clone();
        let sender = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(&d).unwrap();
        });
        let t = Instant::now();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let mut buf = vec![0u8; 4 << 20];
        loop {
            let n = c.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            sink(&buf[..n]);
        }
        sender.join().unwrap();
        t.elapsed().as_secs_f64()
    };
    let to_memory = data.len() as f64 / run(&mut |_| {});
    let mut f = std::fs::File::create(out).unwrap();
    let t = Instant::now();
    run(&mut |b| f.write_all(b).unwrap());
    f.sync_all().unwrap();
    let to_file = data.len() as f64 / t.elapsed().as_secs_f64();
    std::fs::remove_file(out).unwrap();
    (to_file, to_memory)
}

/// A TCP proxy to `upstream` that sends the upstream's answers at most
/// `rate` bytes/s in all (every connection shares the budget).
fn throttling_proxy(upstream: &str, rate: f64) -> std::net::SocketAddr {
    let upstream = upstream.to_string();
    in_background(move |listener| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let next = std::sync::Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now()));
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let (upstream, next) = (upstream.clone(), next.clone());
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let mut buf = vec![0u8; 256 << 10];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let due = {
                        let mut at = next.lock().await;
                        let start = (*at).max(tokio::time::Instant::now());
                        *at = start + Duration::from_secs_f64(n as f64 / rate);
                        *at
                    };
                    tokio::time::sleep_until(due).await;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// Downloading a 1 GiB file from a local HTTP server with range support,
/// against curl fetching the same file from the same server into the same
/// folder, in the same run. A download is on disk (synced) before it is
/// used, so the reference is curl followed by `sync` of its file; curl
/// alone (into the page cache) is shown beside it.
fn bench_fetch() {
    use modelcache_agent::fetch::{self, Access, Source};
    header("Downloads (1 GiB over loopback HTTP)");
    let file = gib_file(Dtype::F16);
    let bytes = std::fs::metadata(&file).unwrap().len() as f64;
    let addr = serve_in_background(axum::Router::new().route_service(
        "/model.safetensors",
        tower_http::services::ServeFile::new(file.clone()),
    ));
    let url = format!("http://{addr}/model.safetensors");
    let out = scratch().join("fetch");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let curl_file = out.join("curl.safetensors");
    let mut curl = Vec::new();
    let mut curl_synced = Vec::new();
    let mut ours = Vec::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let source: Source = url.parse().unwrap();
    for i in 0..3 {
        let t = Instant::now();
        let ok = std::process::Command::new("curl")
            .args(["-s", "-f", "-o"])
            .arg(&curl_file)
            .arg(&url)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("curl is not available; skipped");
            return;
        }
        curl.push(bytes / t.elapsed().as_secs_f64());
        let synced = std::process::Command::new("sync")
            .arg(&curl_file)
            .status()
            .is_ok_and(|s| s.success());
        assert!(synced, "coreutils sync FILE");
        curl_synced.push(bytes / t.elapsed().as_secs_f64());
        std::fs::remove_file(&curl_file).unwrap();
        let dest = out.join(format!("ours-{i}"));
        let t = Instant::now();
        rt.block_on(async {
            let (store, files) = fetch::open(&source, &Access::default()).await.unwrap();
            fetch::download(store, &files, &dest, &fetch::Options::default(), &|_, _| {})
                .await
                .unwrap()
        });
        ours.push(bytes / t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&dest).unwrap();
    }
    let (c, cs, o) = (median(curl), median(curl_synced), median(ours));
    row(
        "download, synced: 16 MiB ranges, 4 in flight",
        format!("{:.2} GB/s", o / GB),
        format!(
            "curl + sync {:.2} GB/s (curl alone {:.2} GB/s)",
            cs / GB,
            c / GB
        ),
        Some(o / cs),
        "≥ 0.9×",
    );
}
