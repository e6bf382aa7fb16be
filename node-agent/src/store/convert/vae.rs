//! A standalone VAE file (the original layout: `encoder.down.N.block.M…`,
//! with or without `first_stage_model.`) as a diffusers `AutoencoderKL`
//! folder, its configuration read from the tensors' shapes, so that any VAE
//! architecture converts without a config file.

use super::{cache_dir, plan_vae_keys, write_single_component};
use crate::store::error::{Result, StoreError};
use crate::store::index::TensorIndex;
use crate::store::open_weights;
use modelcache_crds::BaseModel;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The diffusers folder of a VAE file, converted once into the state folder.
pub fn converted_vae(state_dir: &Path, checkpoint: &Path) -> Result<PathBuf> {
    let out = cache_dir(state_dir, checkpoint, None)?;
    if out.join("config.json").exists() {
        return Ok(out);
    }
    let index = open_weights(checkpoint)?;
    let probe = crate::store::probe::probe(checkpoint)?;
    let (prefix, config) = vae_config(&index, probe.base == Some(BaseModel::Sdxl))?;
    let levels = config["block_out_channels"].as_array().map_or(0, Vec::len);
    let planned = plan_vae_keys(&index, prefix, levels);
    write_single_component(&index, &planned, &config, &out)
}

/// The key prefix of the VAE's tensors and the `AutoencoderKL` configuration
/// their shapes describe (SDXL's scaling factor when the file is SDXL's).
pub fn vae_config(index: &TensorIndex, sdxl: bool) -> Result<(&'static str, Value)> {
    let prefix = if index.names().any(|n| n.starts_with("first_stage_model.")) {
        "first_stage_model."
    } else {
        ""
    };
    let shape = |name: &str| index.shape(&format!("{prefix}{name}"));
    let missing =
        |name: &str| StoreError::invalid(&index.path, format!("VAE has no {prefix}{name}"));
    let channels: Vec<usize> = (0..)
        .map_while(|i| shape(&format!("encoder.down.{i}.block.0.conv1.weight")).map(|s| s[0]))
        .collect();
    if channels.is_empty() {
        return Err(missing("encoder.down.0.block.0.conv1.weight"));
    }
    let layers = (0..)
        .take_while(|j| shape(&format!("encoder.down.0.block.{j}.conv1.weight")).is_some())
        .count();
    let latent = shape("decoder.conv_in.weight")
        .and_then(|s| s.get(1).copied())
        .ok_or_else(|| missing("decoder.conv_in.weight"))?;
    let config = json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; channels.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; channels.len()],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "use_quant_conv": shape("quant_conv.weight").is_some(),
        "use_post_quant_conv": shape("post_quant_conv.weight").is_some(),
        "scaling_factor": if sdxl { 0.13025 } else { 0.18215 },
    });
    Ok((prefix, config))
}
