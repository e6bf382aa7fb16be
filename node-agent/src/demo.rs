//! The demo model: a tiny Stable Diffusion 1.x pipeline (the architecture of the
//! test fixtures, a few MB) with seeded random weights, written by the agent
//! itself so that `serve --demo` works on a fresh machine without downloads.
//! Its images are noise: it exercises the whole serving path, not image quality.

use crate::pipeline::nets::clip::{ClipConfig, ClipTextModel};
use crate::pipeline::nets::unet_2d;
use crate::pipeline::rng::NormalRng;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::stable_diffusion::vae;
use std::path::{Path, PathBuf};

/// Name of the demo model under the models folder.
pub const DEMO_NAME: &str = "demo";

const MODEL_INDEX: &str = include_str!("../assets/demo/model_index.json");
const UNET: &str = include_str!("../assets/demo/unet_config.json");
const VAE: &str = include_str!("../assets/demo/vae_config.json");
const TEXT: &str = include_str!("../assets/demo/text_encoder_config.json");
const SCHEDULER: &str = include_str!("../assets/demo/scheduler_config.json");
const TOKENIZER: &[(&str, &str)] = &[
    (
        "tokenizer.json",
        include_str!("../assets/demo/tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_str!("../assets/demo/tokenizer/tokenizer_config.json"),
    ),
    (
        "vocab.json",
        include_str!("../assets/demo/tokenizer/vocab.json"),
    ),
    (
        "merges.txt",
        include_str!("../assets/demo/tokenizer/merges.txt"),
    ),
];

/// Replaces every matrix/kernel with seeded N(0, 1/fan_in) values, so the demo
/// is the same on every machine (candle's own init is unseeded).
fn reseed(map: &VarMap, rng: &mut NormalRng) -> candle_core::Result<()> {
    let data = map
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        if dims.len() < 2 {
            continue; // norms keep ones, biases zeros
        }
        let fan_in: usize = dims[1..].iter().product();
        let t = (rng.tensor(&dims, &Device::Cpu)? / (fan_in as f64).sqrt())?;
        var.set(&t)?;
    }
    Ok(())
}

fn save(map: &VarMap, path: &Path) -> std::io::Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    map.save(path)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // safetensors writes 0600 files; models must be readable by other users.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

/// Which architecture family a tiny random pipeline imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiny {
    /// SD 1.x: quick-GELU CLIP, convolutional projections, epsilon prediction.
    Sd1,
    /// SD 2.x (768-v): GELU text encoder, linear projections, per-block heads, v-prediction.
    Sd2,
}

fn configs(variant: Tiny) -> anyhow::Result<[(&'static str, String); 5]> {
    let mut unet: serde_json::Value = serde_json::from_str(UNET)?;
    let mut text: serde_json::Value = serde_json::from_str(TEXT)?;
    let mut sched: serde_json::Value = serde_json::from_str(SCHEDULER)?;
    if variant == Tiny::Sd2 {
        unet["use_linear_projection"] = serde_json::json!(true);
        unet["attention_head_dim"] = serde_json::json!([2, 4, 4, 4]);
        text["hidden_act"] = serde_json::json!("gelu");
        sched["prediction_type"] = serde_json::json!("v_prediction");
    }
    Ok([
        ("model_index.json", MODEL_INDEX.to_string()),
        ("unet/config.json", serde_json::to_string_pretty(&unet)?),
        ("vae/config.json", VAE.to_string()),
        (
            "text_encoder/config.json",
            serde_json::to_string_pretty(&text)?,
        ),
        (
            "scheduler/scheduler_config.json",
            serde_json::to_string_pretty(&sched)?,
        ),
    ])
}

/// Writes the demo pipeline to `models_dir/demo` unless it is already there.
pub fn write_demo(models_dir: &Path) -> anyhow::Result<PathBuf> {
    write_tiny(models_dir, DEMO_NAME, Tiny::Sd1)
}

/// Writes a tiny random pipeline of `variant`'s architecture to `models_dir/name`.
pub fn write_tiny(models_dir: &Path, name: &str, variant: Tiny) -> anyhow::Result<PathBuf> {
    let dir = models_dir.join(name);
    if dir.join("vae/diffusion_pytorch_model.safetensors").exists() {
        return Ok(dir);
    }
    let configs = configs(variant)?;
    let cfg_of = |rel: &str| -> anyhow::Result<serde_json::Value> {
        let text = configs
            .iter()
            .find(|(r, _)| *r == rel)
            .map(|(_, t)| t.as_str())
            .unwrap_or("{}");
        Ok(serde_json::from_str(text)?)
    };
    let tmp = models_dir.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut rng = NormalRng::new(20261129);
    let dev = Device::Cpu;

    let unet_map = VarMap::new();
    let cfg = unet_2d::UNet2DConditionModelConfig::from_json(&cfg_of("unet/config.json")?)?;
    unet_2d::UNet2DConditionModel::new(
        VarBuilder::from_varmap(&unet_map, DType::F32, &dev),
        4,
        4,
        false,
        cfg,
    )?;
    reseed(&unet_map, &mut rng)?;
    save(
        &unet_map,
        &tmp.join("unet/diffusion_pytorch_model.safetensors"),
    )?;

    let vae_map = VarMap::new();
    let v: serde_json::Value = serde_json::from_str(VAE)?;
    let vcfg = vae::AutoEncoderKLConfig {
        block_out_channels: v["block_out_channels"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect()
            })
            .unwrap_or_default(),
        layers_per_block: v["layers_per_block"].as_u64().unwrap_or(2) as usize,
        latent_channels: 4,
        norm_num_groups: v["norm_num_groups"].as_u64().unwrap_or(32) as usize,
        use_quant_conv: true,
        use_post_quant_conv: true,
    };
    vae::AutoEncoderKL::new(
        VarBuilder::from_varmap(&vae_map, DType::F32, &dev),
        3,
        3,
        vcfg,
    )?;
    reseed(&vae_map, &mut rng)?;
    save(
        &vae_map,
        &tmp.join("vae/diffusion_pytorch_model.safetensors"),
    )?;

    let text_map = VarMap::new();
    let tcfg = ClipConfig::from_json(&cfg_of("text_encoder/config.json")?)?;
    ClipTextModel::new(VarBuilder::from_varmap(&text_map, DType::F32, &dev), &tcfg)?;
    reseed(&text_map, &mut rng)?;
    // Embeddings are rows, not matrices with a fan-in: give them CLIP's 0.02 scale.
    for name in [
        "embeddings.token_embedding.weight",
        "embeddings.position_embedding.weight",
    ] {
        if let Some(var) = text_map
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?
            .get(name)
        {
            let t: Tensor = (rng.tensor(var.dims(), &dev)? * 0.02)?;
            var.set(&t)?;
        }
    }
    save(&text_map, &tmp.join("text_encoder/model.safetensors"))?;

    for (rel, text) in &configs {
        let p = tmp.join(rel);
        std::fs::create_dir_all(p.parent().unwrap_or(&tmp))?;
        std::fs::write(p, text)?;
    }
    std::fs::create_dir_all(tmp.join("tokenizer"))?;
    for (name, text) in TOKENIZER {
        std::fs::write(tmp.join("tokenizer").join(name), text)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    Ok(dir)
}
