//! Planning a conversion: which source tensor becomes which diffusers tensor
//! of which component, and how (copied, split into rows, or transposed), and
//! checking that the configuration describes the checkpoint's shapes.

use super::keys::{openclip_key, split_num, unet_key, vae_key, UnetLayout};
use crate::store::error::{Result, StoreError};
use crate::store::index::TensorIndex;
use modelcache_crds::BaseModel;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// How a destination tensor is made from a source tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Same bytes; `shape` may drop trailing 1-sized dims (1×1 conv → linear).
    Copy { shape: Vec<usize> },
    /// Rows `[start, end)` of a 2-D or 1-D tensor (the fused q/k/v split).
    Rows { start: usize, end: usize },
    /// 2-D transpose (OpenCLIP's text_projection).
    Transpose,
}

/// One tensor of a converted component.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub src: String,
    pub dst: String,
    pub op: Op,
}

fn squeeze_trailing(shape: &[usize]) -> Vec<usize> {
    let mut s = shape.to_vec();
    while s.len() > 2 && s.last() == Some(&1) {
        s.pop();
    }
    s
}

/// The tensors of each diffusers component, planned from a checkpoint's names.
#[derive(Debug, Default)]
pub struct Plan {
    pub components: BTreeMap<&'static str, Vec<Planned>>,
}

/// Which text encoder layout a checkpoint has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextLayout {
    /// Hugging Face CLIP under a prefix (SD1; SDXL's first encoder).
    Hf(&'static str),
    /// OpenCLIP under a prefix.
    OpenClip(&'static str),
}

/// Architecture facts needed to plan a conversion, from `--config` or built-ins.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub unet: UnetLayout,
    pub vae_levels: usize,
    /// Hidden layers of the OpenCLIP encoder(s) to keep (SD2 keeps 23 of 24).
    pub text_layers: Option<usize>,
    pub text_layers_2: Option<usize>,
}

/// Plans the conversion of a main checkpoint. `ema` picks EMA weights when the
/// checkpoint carries more than 100 of them.
pub fn plan_main(index: &TensorIndex, base: BaseModel, layout: Layout) -> Result<Plan> {
    let names: Vec<&str> = index.names().collect();
    let mut plan = Plan::default();

    // UNet
    let unet_prefix = "model.diffusion_model.";
    let ema_count = names.iter().filter(|k| k.starts_with("model_ema")).count();
    let use_ema = ema_count > 100;
    let mut subs: BTreeMap<(usize, usize), BTreeSet<String>> = BTreeMap::new();
    for k in &names {
        if let Some(rest) = k
            .strip_prefix(unet_prefix)
            .and_then(|r| r.strip_prefix("output_blocks."))
        {
            if let Some((i, r)) = split_num(rest) {
                if let Some((j, leaf)) = split_num(r) {
                    subs.entry((i, j)).or_default().insert(leaf.to_string());
                }
            }
        }
    }
    let upsampler = |i: usize, j: usize| {
        subs.get(&(i, j)).is_some_and(|leaves| {
            leaves.len() == 2 && leaves.contains("conv.weight") && leaves.contains("conv.bias")
        })
    };
    let mut unet = Vec::new();
    for k in &names {
        let Some(rest) = k.strip_prefix(unet_prefix) else {
            continue;
        };
        let Some(dst) = unet_key(rest, layout.unet, &upsampler) else {
            continue;
        };
        let src = if use_ema {
            let flat = format!("model_ema.diffusion_model{}", rest.replace('.', ""));
            if index.contains(&flat) {
                flat
            } else {
                k.to_string()
            }
        } else {
            k.to_string()
        };
        let meta = index
            .get(&src)
            .ok_or_else(|| StoreError::invalid(&index.path, format!("missing tensor {src}")))?;
        let shape = if dst.contains("proj_attn.weight")
            || (dst.contains("attentions") && dst.contains("to_"))
        {
            meta.shape.iter().take(2).copied().collect()
        } else {
            meta.shape.clone()
        };
        unet.push(Planned {
            src,
            dst,
            op: Op::Copy { shape },
        });
    }
    if unet.is_empty() {
        return Err(StoreError::invalid(
            &index.path,
            "no UNet weights (model.diffusion_model.*) in this checkpoint",
        ));
    }
    plan.components.insert("unet", unet);

    // VAE
    plan.components.insert(
        "vae",
        plan_vae_keys(index, "first_stage_model.", layout.vae_levels),
    );

    // Text encoders
    let layouts: Vec<(&'static str, TextLayout, Option<usize>)> = match base {
        BaseModel::Sd1 => vec![(
            "text_encoder",
            hf_prefix(
                &names,
                &[
                    "cond_stage_model.transformer.",
                    "conditioner.embedders.0.transformer.",
                ],
            ),
            None,
        )],
        BaseModel::Sd2 => vec![(
            "text_encoder",
            TextLayout::OpenClip("cond_stage_model.model."),
            layout.text_layers,
        )],
        BaseModel::Sdxl => vec![
            (
                "text_encoder",
                TextLayout::Hf("conditioner.embedders.0.transformer."),
                None,
            ),
            (
                "text_encoder_2",
                TextLayout::OpenClip("conditioner.embedders.1.model."),
                layout.text_layers_2,
            ),
        ],
        BaseModel::SdxlRefiner => vec![(
            "text_encoder_2",
            TextLayout::OpenClip("conditioner.embedders.0.model."),
            layout.text_layers_2,
        )],
    };
    for (component, tl, keep) in layouts {
        let planned = match tl {
            TextLayout::Hf(prefix) => names
                .iter()
                .filter_map(|k| {
                    let rest = k.strip_prefix(prefix)?;
                    // position_ids is a buffer the model rebuilds; diffusers' own files omit it.
                    if rest.ends_with("position_ids") {
                        return None;
                    }
                    let shape = index.get(k)?.shape.clone();
                    Some(Planned {
                        src: k.to_string(),
                        dst: rest.to_string(),
                        op: Op::Copy { shape },
                    })
                })
                .collect(),
            TextLayout::OpenClip(prefix) => {
                openclip_plan(index, prefix, keep, component == "text_encoder_2")?
            }
        };
        if planned.is_empty() {
            return Err(StoreError::invalid(
                &index.path,
                format!("no {component} weights in this checkpoint"),
            ));
        }
        plan.components.insert(component, planned);
    }
    Ok(plan)
}

fn hf_prefix(names: &[&str], candidates: &[&'static str]) -> TextLayout {
    let p = candidates
        .iter()
        .find(|p| names.iter().any(|k| k.starts_with(*p)))
        .copied()
        .unwrap_or(candidates[0]);
    TextLayout::Hf(p)
}

/// VAE tensors under `prefix` (empty for a standalone VAE file).
pub fn plan_vae_keys(index: &TensorIndex, prefix: &str, levels: usize) -> Vec<Planned> {
    index
        .tensors
        .iter()
        .filter_map(|t| {
            let rest = t.name.strip_prefix(prefix)?;
            let dst = vae_key(rest, levels)?;
            let shape = if dst.contains("attentions")
                && dst.ends_with(".weight")
                && !dst.contains("group_norm")
            {
                squeeze_trailing(&t.shape)
            } else {
                t.shape.clone()
            };
            Some(Planned {
                src: t.name.clone(),
                dst,
                op: Op::Copy { shape },
            })
        })
        .collect()
}

/// OpenCLIP tensors under `prefix`: renames, q/k/v split, layers beyond `keep`
/// dropped, and text_projection transposed when the encoder has a projection.
pub fn openclip_plan(
    index: &TensorIndex,
    prefix: &str,
    keep: Option<usize>,
    projection: bool,
) -> Result<Vec<Planned>> {
    let mut out = Vec::new();
    for t in &index.tensors {
        let Some(rest) = t.name.strip_prefix(prefix) else {
            continue;
        };
        if rest == "logit_scale" || rest.ends_with("attn_mask") {
            continue;
        }
        if let (Some(limit), Some(r)) = (keep, rest.strip_prefix("transformer.resblocks.")) {
            if split_num(r).is_some_and(|(n, _)| n >= limit) {
                continue;
            }
        }
        if rest == "text_projection" {
            if projection {
                out.push(Planned {
                    src: t.name.clone(),
                    dst: "text_projection.weight".into(),
                    op: Op::Transpose,
                });
            }
            continue;
        }
        if rest.ends_with("attn.in_proj_weight") || rest.ends_with("attn.in_proj_bias") {
            let n = rest
                .strip_prefix("transformer.resblocks.")
                .and_then(split_num)
                .map(|(n, _)| n)
                .ok_or_else(|| {
                    StoreError::invalid(&index.path, format!("unexpected key {}", t.name))
                })?;
            let d = t.shape[0] / 3;
            if d * 3 != t.shape[0] {
                return Err(StoreError::Tensor {
                    path: index.path.clone(),
                    tensor: t.name.clone(),
                    reason: "fused q/k/v is not divisible by 3".into(),
                });
            }
            let leaf = if rest.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            for (i, qkv) in ["q", "k", "v"].iter().enumerate() {
                out.push(Planned {
                    src: t.name.clone(),
                    dst: format!("text_model.encoder.layers.{n}.self_attn.{qkv}_proj.{leaf}"),
                    op: Op::Rows {
                        start: i * d,
                        end: (i + 1) * d,
                    },
                });
            }
            continue;
        }
        if let Some(dst) = openclip_key(rest) {
            out.push(Planned {
                src: t.name.clone(),
                dst,
                op: Op::Copy {
                    shape: t.shape.clone(),
                },
            });
        }
    }
    Ok(out)
}

/// Checks that a configuration describes the checkpoint: the first widths of
/// each network must equal the tensor shapes. A mismatch suggests `--config`.
pub(super) fn check_config(
    index: &TensorIndex,
    plan: &Plan,
    config: &BTreeMap<&'static str, Value>,
    from_folder: bool,
) -> Result<()> {
    let shape_of = |comp: &str, dst: &str| -> Option<Vec<usize>> {
        let p = plan.components.get(comp)?.iter().find(|p| p.dst == dst)?;
        match &p.op {
            Op::Copy { shape } => Some(shape.clone()),
            _ => None,
        }
    };
    let mut problems = Vec::new();
    if let (Some(unet), Some(s)) = (config.get("unet"), shape_of("unet", "conv_in.weight")) {
        let want = unet["block_out_channels"][0].as_u64().unwrap_or(0) as usize;
        if s[0] != want {
            problems.push(format!(
                "unet conv_in has {} channels, the configuration says {want}",
                s[0]
            ));
        }
    }
    if let (Some(vae), Some(s)) = (config.get("vae"), shape_of("vae", "encoder.conv_in.weight")) {
        let want = vae["block_out_channels"][0].as_u64().unwrap_or(0) as usize;
        if s[0] != want {
            problems.push(format!(
                "vae encoder.conv_in has {} channels, the configuration says {want}",
                s[0]
            ));
        }
    }
    for comp in ["text_encoder", "text_encoder_2"] {
        let (Some(cfg), Some(planned)) = (config.get(comp), plan.components.get(comp)) else {
            continue;
        };
        let Some(tok) = planned
            .iter()
            .find(|p| p.dst.ends_with("token_embedding.weight"))
        else {
            continue;
        };
        let width = index
            .get(&tok.src)
            .and_then(|m| m.shape.get(1).copied())
            .unwrap_or(0);
        let want = cfg["hidden_size"].as_u64().unwrap_or(0) as usize;
        if width != want {
            problems.push(format!(
                "{comp} has width {width}, the configuration says {want}"
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let hint = if from_folder {
        "the --config folder does not describe this checkpoint"
    } else {
        "this is not a standard SD 1.5 / 2.x / XL architecture; pass --config DIR with a diffusers folder describing it"
    };
    Err(StoreError::Conversion {
        path: index.path.clone(),
        reason: format!("{}: {hint}", problems.join("; ")),
    })
}
