//! `modelcache-gpu-bench [--device cuda:0] [--gib N]`: the GPU figures of
//! `scripts/gpu-check.sh` — the cache's RAM→VRAM move of a model against a plain
//! host-to-device copy of the same bytes, and an SD-1.5-sized UNet step at
//! 512×512 in f16 for one image and per image in a batch of four (f32 on the
//! CPU, where this binary also runs as a smoke test).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use modelcache_agent::cache::{CacheConfig, CacheKey, DeviceSlot, DiskLoader, ModelCache};
use modelcache_agent::pipeline::nets::unet_2d;
use modelcache_crds::Precision;
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Instant;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn sync(d: &Device) -> candle_core::Result<()> {
    d.synchronize()
}

fn run() -> anyhow::Result<()> {
    let e =
        |e: candle_core::Error| anyhow::anyhow!(modelcache_agent::store::error::candle_message(&e));
    let compute =
        modelcache_agent::device::open(&arg("--device", "auto"), Precision::F16)?.remove(0);
    let gib: u64 = arg("--gib", "1")
        .parse()
        .map_err(|_| anyhow::anyhow!("--gib must be a number"))?;
    let dev = compute.device.clone();
    println!(
        "device {} ({}), compute dtype {:?}",
        compute.id, compute.name, compute.dtype
    );
    if let Some((free, total)) = compute.memory() {
        println!(
            "memory: {:.1} GiB free of {:.1} GiB",
            free as f64 / 1e9 * 0.931,
            total as f64 / 1e9 * 0.931
        );
    }
    println!("| measurement | value | reference | ratio |\n|---|---|---|---|");

    // A model of `gib` GiB of f32 weights in 64 tensors.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    let per = (gib << 30) / 64 / 4;
    let tensors: HashMap<String, Tensor> = (0..64)
        .map(|i| {
            Ok((
                format!("w{i}"),
                Tensor::ones(per as usize, DType::F32, &Device::Cpu)?,
            ))
        })
        .collect::<candle_core::Result<_>>()
        .map_err(e)?;
    candle_core::safetensors::save(&tensors, &path).map_err(e)?;
    let bytes = (gib << 30) as f64;
    let cache = ModelCache::new(
        CacheConfig {
            devices: vec![DeviceSlot {
                device: dev.clone(),
                budget: (gib + 1) << 30,
            }],
            ..CacheConfig::cpu((gib + 1) << 30, 0)
        },
        Box::new(DiskLoader),
        None,
    );
    let key = CacheKey::from(path.as_path());
    drop(cache.get_ram(&key)?);
    let t = Instant::now();
    drop(cache.get_device(&key)?);
    sync(&dev).map_err(e)?;
    let moved = bytes / t.elapsed().as_secs_f64();
    let host: Vec<Tensor> = tensors.values().cloned().collect();
    let t = Instant::now();
    let copies = host
        .iter()
        .map(|t| t.to_device(&dev))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(e)?;
    sync(&dev).map_err(e)?;
    let plain = bytes / t.elapsed().as_secs_f64();
    drop(copies);
    if dev.is_cpu() {
        // The CPU "device" shares the host copy: there is no transfer to compare.
        println!(
            "| RAM → device move of a {gib} GiB model (cache) | {:.2} GB/s | n/a on the CPU | |",
            moved / 1e9
        );
    } else {
        println!(
            "| RAM → device move of a {gib} GiB model (cache) | {:.2} GB/s | plain host→device copy {:.2} GB/s | {:.2}x |",
            moved / 1e9,
            plain / 1e9,
            moved / plain
        );
        match modelcache_agent::device::pcie_bandwidth(&dev) {
            Some(link) => println!(
                "| RAM → device move against the PCIe link | {:.2} GB/s | link (sysfs speed × width) {:.2} GB/s | {:.2}x |",
                moved / 1e9,
                link / 1e9,
                moved / link
            ),
            None => println!("| PCIe link bandwidth | not visible in sysfs | | |"),
        }
    }

    // SD 1.5's UNet at 512×512, classifier-free guidance batch 2.
    let cfg = unet_2d::UNet2DConditionModelConfig::from_json(&serde_json::json!({
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "attention_head_dim": 8, "cross_attention_dim": 768, "layers_per_block": 2}))?;
    let map = VarMap::new();
    let unet = unet_2d::UNet2DConditionModel::new(
        VarBuilder::from_varmap(&map, compute.dtype, &dev),
        4,
        4,
        false,
        cfg,
    )
    .map_err(e)?;
    // One image (CFG batch 2), then four in one batch: what batching saves per image.
    let step = |images: usize| -> anyhow::Result<f64> {
        let x = Tensor::zeros((2 * images, 4, 64, 64), compute.dtype, &dev).map_err(e)?;
        let ctx = Tensor::zeros((2 * images, 77, 768), compute.dtype, &dev).map_err(e)?;
        unet.forward(&x, 500.0, &ctx).map_err(e)?;
        sync(&dev).map_err(e)?;
        let steps = if dev.is_cpu() { 1 } else { 10 };
        let t = Instant::now();
        for _ in 0..steps {
            unet.forward(&x, 500.0, &ctx).map_err(e)?;
        }
        sync(&dev).map_err(e)?;
        Ok(t.elapsed().as_secs_f64() / steps as f64)
    };
    let one = step(1)?;
    println!(
        "| SD 1.5 UNet step at 512×512, CFG batch 2, {:?} | {one:.3} s | | |",
        compute.dtype,
    );
    let four = step(4)?;
    println!(
        "| the same step per image, 4 images in one batch (CFG batch 8) | {:.3} s | 1 image: {one:.3} s | {:.2}x |",
        four / 4.0,
        four / 4.0 / one
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
