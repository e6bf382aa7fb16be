//! Helpers shared by the agent's integration tests (and its benchmark).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository's shared test fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A parity fixture's reference run: `reference.json` (prompt, steps,
/// guidance, token ids) and the initial latents diffusers started from.
pub fn reference_run(dir: &Path) -> (serde_json::Value, candle_core::Tensor) {
    let r = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    let latents = candle_core::safetensors::load(
        dir.join("reference_latents.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .remove("latents")
    .unwrap();
    (r, latents)
}

/// A cache for the tiny fixtures: 64 MiB of RAM and 64 MiB on the CPU device.
pub fn tiny_cache() -> modelcache_agent::cache::ModelCache {
    use modelcache_agent::cache::{CacheConfig, DiskLoader, ModelCache};
    ModelCache::new(
        CacheConfig::cpu(64 << 20, 64 << 20),
        Box::new(DiskLoader),
        None,
    )
}

/// The reference request of a parity fixture: its prompt, steps and guidance
/// at 64×64 with DDIM from the given latents; everything else default.
pub fn reference_params(
    r: &serde_json::Value,
    latents: candle_core::Tensor,
) -> modelcache_agent::pipeline::GenerateParams {
    modelcache_agent::pipeline::GenerateParams {
        prompt: r["prompt"].as_str().unwrap().into(),
        steps: r["steps"].as_u64().unwrap() as usize,
        guidance_scale: r["guidance_scale"].as_f64().unwrap(),
        width: 64,
        height: 64,
        scheduler: Some(modelcache_crds::SchedulerKind::Ddim),
        latents: Some(latents),
        ..Default::default()
    }
}

/// The largest per-pixel difference between two images of the same size.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// [`max_abs_diff`] from an image stored as `.npy`.
pub fn max_abs_diff_from(a: &[f32], npy: &Path) -> f32 {
    let (_, want) =
        modelcache_agent::pipeline::image::read_npy(&std::fs::read(npy).unwrap()).unwrap();
    max_abs_diff(a, &want)
}

/// Bytes this thread has read through system calls so far
/// (`/proc/thread-self/io`, so parallel tests do not interfere); 0 if unknown.
pub fn rchar() -> u64 {
    std::fs::read_to_string("/proc/thread-self/io")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("rchar: ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// The tiny SD 1.x fixture's configs (no weights) into `dst`, in the diffusers
/// layout: what a single-file checkpoint's `<name>.config/` folder holds.
pub fn copy_configs(dst: &Path) {
    for f in [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ] {
        let to = dst.join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixtures().join("tiny-sd1").join(f), to).unwrap();
    }
}

/// Copies a folder tree (a fixture model into a test's models folder).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// Waits at most `limit` for `child` to exit; its exit code and stderr
/// (which must be piped), or `None` for the code when it was still running
/// then, in which case it is killed so that no test leaves it behind.
pub fn wait_exit(
    mut child: std::process::Child,
    limit: std::time::Duration,
) -> (Option<i32>, String) {
    use std::io::Read;
    let deadline = std::time::Instant::now() + limit;
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    (code, err)
}

/// A tensor of a fixture's safetensors file as a flat list: the Gaussian
/// draws of a reference run, which the agent's generator replays.
pub fn draws(file: &Path, key: &str) -> Vec<f32> {
    candle_core::safetensors::load(file, &candle_core::Device::Cpu)
        .unwrap()
        .remove(key)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// A copy of tiny-sd1 under `dir` whose `scheduler_config.json` `change` edits.
pub fn tiny_sd1_with_scheduler(dir: &Path, change: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let m = dir.join("m");
    copy_dir(&fixtures().join("tiny-sd1"), &m);
    let config = m.join("scheduler/scheduler_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    change(&mut v);
    std::fs::write(&config, v.to_string()).unwrap();
    m
}

/// `modelcache-agent generate` of tiny-sd1's reference request (its latents,
/// DDIM, 4 steps at 64×64) with `extra` arguments, writing `out` (`.npy`) and
/// converting into `state`.
pub fn generate_reference_cli(extra: &[String], state: &Path, out: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_modelcache-agent"))
        .arg("generate")
        .arg("--model")
        .arg(fixtures().join("tiny-sd1"))
        .args(["--prompt", "a red cat", "--steps", "4", "--size", "64x64"])
        .args(["--scheduler", "ddim"])
        .arg("--latents")
        .arg(fixtures().join("tiny-sd1/reference_latents.safetensors"))
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}
