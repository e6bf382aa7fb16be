//! A single-file ControlNet (the original layout: `control_model.`
//! `input_blocks`, `middle_block`, `input_hint_block`, `zero_convs`,
//! `middle_block_out`, with or without the prefix) as a diffusers
//! `ControlNetModel` folder. Its configuration comes from the tensors'
//! shapes and the base's conventions (heads per block), so that any width
//! converts without a config file.

use super::keys::{split_num, unet_key, UnetLayout};
use super::plan::{Op, Planned};
use super::{cache_dir, write_single_component};
use crate::store::error::{Result, StoreError};
use crate::store::index::TensorIndex;
use crate::store::open_weights;
use modelcache_crds::BaseModel;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The diffusers folder of a ControlNet file, converted once into the state folder.
pub fn converted_controlnet(state_dir: &Path, checkpoint: &Path) -> Result<PathBuf> {
    let out = cache_dir(state_dir, checkpoint, None)?;
    if out.join("config.json").exists() {
        return Ok(out);
    }
    convert_controlnet(checkpoint, &out)
}

/// Converts a ControlNet file into the diffusers folder `out`.
pub fn convert_controlnet(checkpoint: &Path, out: &Path) -> Result<PathBuf> {
    let index = open_weights(checkpoint)?;
    let probe = crate::store::probe::probe(checkpoint)?;
    let base = probe.base.ok_or_else(|| {
        StoreError::invalid(checkpoint, "cannot determine the base of this ControlNet")
    })?;
    let (prefix, config) = controlnet_config(&index, base)?;
    let planned = plan_controlnet(&index, prefix, &config)?;
    write_single_component(&index, &planned, &config, out)
}

/// The key prefix of the ControlNet's tensors and the `ControlNetModel`
/// configuration their shapes (and `base`) describe.
pub fn controlnet_config(index: &TensorIndex, base: BaseModel) -> Result<(&'static str, Value)> {
    let prefix = if index.names().any(|n| n.starts_with("control_model.")) {
        "control_model."
    } else {
        ""
    };
    let shape = |name: &str| index.shape(&format!("{prefix}{name}"));
    let missing =
        |name: &str| StoreError::invalid(&index.path, format!("ControlNet has no {prefix}{name}"));
    let first = shape("input_blocks.0.0.weight")
        .and_then(|s| s.first().copied())
        .ok_or_else(|| missing("input_blocks.0.0.weight"))?;
    let in_channels = shape("input_blocks.0.0.weight")
        .and_then(|s| s.get(1).copied())
        .unwrap_or(4);
    // Down levels: input block i ≥ 1 is a resnet (`in_layers`), its
    // attention, or a downsampler (`op`).
    let mut channels = Vec::new();
    let mut layers = 0;
    let mut attention = Vec::new();
    let mut depth = Vec::new();
    let mut current = Vec::new();
    for i in 1.. {
        let resnet = shape(&format!("input_blocks.{i}.0.in_layers.2.weight"));
        let op = shape(&format!("input_blocks.{i}.0.op.weight"));
        match (resnet, op) {
            (Some(s), _) => {
                current.push(s[0]);
                let blocks = (0..)
                    .take_while(|b| {
                        shape(&format!(
                            "input_blocks.{i}.1.transformer_blocks.{b}.attn1.to_q.weight"
                        ))
                        .is_some()
                    })
                    .count();
                if current.len() == 1 {
                    attention.push(blocks > 0);
                    depth.push(blocks.max(1));
                }
            }
            (None, Some(_)) => {
                layers = current.len();
                channels.push(current[0]);
                current.clear();
            }
            (None, None) => break,
        }
    }
    if let Some(&c) = current.first() {
        layers = layers.max(current.len());
        channels.push(c);
    }
    if channels.is_empty() || layers == 0 {
        return Err(missing("input_blocks.1.0.in_layers.2.weight"));
    }
    let cross = (1..)
        .take(3 * channels.len())
        .find_map(|i| {
            shape(&format!(
                "input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight"
            ))
        })
        .and_then(|s| s.get(1).copied())
        .ok_or_else(|| missing("input_blocks.*.1.transformer_blocks.0.attn2.to_k.weight"))?;
    let linear = (1..)
        .take(3 * channels.len())
        .find_map(|i| shape(&format!("input_blocks.{i}.1.proj_in.weight")))
        .is_some_and(|s| s.len() == 2);
    // The hint block: convolutions at even indices, the last one `conv_out`.
    let hint: Vec<usize> = (0..)
        .step_by(2)
        .map_while(|i| shape(&format!("input_hint_block.{i}.weight")).map(|s| s[0]))
        .collect();
    let hint_in = shape("input_hint_block.0.weight")
        .and_then(|s| s.get(1).copied())
        .ok_or_else(|| missing("input_hint_block.0.weight"))?;
    if hint.len() < 2 || !hint.len().is_multiple_of(2) {
        return Err(StoreError::invalid(
            &index.path,
            format!(
                "ControlNet hint block has {} convolutions; expected an even number from 2",
                hint.len()
            ),
        ));
    }
    // conv_in, then (same, strided) pairs: the pairs' outputs are the widths.
    let mut cond_channels = vec![hint[0]];
    cond_channels.extend(hint[1..hint.len() - 1].iter().skip(1).step_by(2));
    // SD 1.x counts 8 heads per block; SD 2.x and SDXL 64 channels per head.
    let heads: Vec<usize> = channels
        .iter()
        .map(|c| match base {
            BaseModel::Sd1 => 8,
            _ => (c / 64).max(1),
        })
        .collect();
    let types: Vec<&str> = attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let mut config = json!({
        "_class_name": "ControlNetModel",
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": channels,
        "conditioning_channels": hint_in,
        "conditioning_embedding_out_channels": cond_channels,
        "controlnet_conditioning_channel_order": "rgb",
        "cross_attention_dim": cross,
        "down_block_types": types,
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "global_pool_conditions": false,
        "in_channels": in_channels,
        "layers_per_block": layers,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "transformer_layers_per_block": depth,
        "use_linear_projection": linear,
    });
    if first != channels[0] {
        return Err(StoreError::invalid(
            &index.path,
            "ControlNet conv_in and first block widths differ",
        ));
    }
    if let Some(s) = shape("label_emb.0.0.weight") {
        config["addition_embed_type"] = "text_time".into();
        config["addition_time_embed_dim"] = 256.into();
        config["projection_class_embeddings_input_dim"] = s.get(1).copied().unwrap_or(0).into();
    }
    Ok((prefix, config))
}

/// Maps one ControlNet key (without the prefix) to its diffusers name;
/// `hint_convs` is the number of convolutions in the hint block.
pub fn controlnet_key(key: &str, layout: UnetLayout, hint_convs: usize) -> Option<String> {
    if let Some(rest) = key.strip_prefix("input_hint_block.") {
        let (i, rest) = split_num(rest)?;
        if !i.is_multiple_of(2) {
            return None;
        }
        let n = i / 2;
        return Some(if n == 0 {
            format!("controlnet_cond_embedding.conv_in.{rest}")
        } else if n + 1 == hint_convs {
            format!("controlnet_cond_embedding.conv_out.{rest}")
        } else {
            format!("controlnet_cond_embedding.blocks.{}.{rest}", n - 1)
        });
    }
    if let Some(rest) = key.strip_prefix("zero_convs.") {
        let (i, rest) = split_num(rest)?;
        let rest = rest.strip_prefix("0.")?;
        return Some(format!("controlnet_down_blocks.{i}.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("middle_block_out.0.") {
        return Some(format!("controlnet_mid_block.{rest}"));
    }
    if key.starts_with("output_blocks.") || key.starts_with("out.") {
        return None;
    }
    unet_key(key, layout, &|_, _| false)
}

/// Every tensor of the ControlNet under `prefix`, renamed; attention
/// projections stored as 1×1 convolutions become linear weights.
fn plan_controlnet(index: &TensorIndex, prefix: &str, config: &Value) -> Result<Vec<Planned>> {
    let layout = UnetLayout {
        layers_per_block: config["layers_per_block"].as_u64().unwrap_or(2) as usize,
        text_time: config["addition_embed_type"].as_str() == Some("text_time"),
    };
    let hint_convs = config["conditioning_embedding_out_channels"]
        .as_array()
        .map_or(0, |c| 2 * c.len());
    let mut out = Vec::new();
    for t in &index.tensors {
        let Some(rest) = t.name.strip_prefix(prefix) else {
            continue;
        };
        let Some(dst) = controlnet_key(rest, layout, hint_convs) else {
            continue;
        };
        let shape = if dst.contains("proj_attn.weight")
            || (dst.contains("attentions") && dst.contains("to_"))
        {
            t.shape.iter().take(2).copied().collect()
        } else {
            t.shape.clone()
        };
        out.push(Planned {
            src: t.name.clone(),
            dst,
            op: Op::Copy { shape },
        });
    }
    if out.is_empty() {
        return Err(StoreError::invalid(
            &index.path,
            "no ControlNet weights in this file",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_the_original_layout_map_to_diffusers_names() {
        let l = UnetLayout {
            layers_per_block: 2,
            text_time: false,
        };
        for (src, dst) in [
            (
                "input_hint_block.0.weight",
                "controlnet_cond_embedding.conv_in.weight",
            ),
            (
                "input_hint_block.2.bias",
                "controlnet_cond_embedding.blocks.0.bias",
            ),
            (
                "input_hint_block.12.weight",
                "controlnet_cond_embedding.blocks.5.weight",
            ),
            (
                "input_hint_block.14.weight",
                "controlnet_cond_embedding.conv_out.weight",
            ),
            ("zero_convs.11.0.bias", "controlnet_down_blocks.11.bias"),
            ("middle_block_out.0.weight", "controlnet_mid_block.weight"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "middle_block.1.proj_in.weight",
                "mid_block.attentions.0.proj_in.weight",
            ),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
        ] {
            assert_eq!(controlnet_key(src, l, 8).as_deref(), Some(dst), "{src}");
        }
        // SiLU layers between the hint convolutions hold no weights.
        assert_eq!(controlnet_key("input_hint_block.1.weight", l, 8), None);
    }
}
