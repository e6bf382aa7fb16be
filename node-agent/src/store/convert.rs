//! Conversion of single-file (LDM/SGM layout, as A1111 and Civitai publish them)
//! checkpoints to the diffusers layout (seed-spec §13).
//!
//! The key maps are pure functions over tensor names, tested one by one. The
//! conversion itself streams tensor by tensor: a checkpoint's bytes are copied,
//! never cast, so a converted folder is bit-identical to what diffusers itself
//! would hold. Only OpenCLIP's `text_projection` needs its data transposed.

use super::error::{Result, StoreError};
use super::index::{TensorIndex, TensorMeta};
use super::load::read_bytes;
use super::{open_weights, read_json};
use modelcache_crds::BaseModel;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

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

fn resnet_rename(rest: &str) -> String {
    let mut s = rest.to_string();
    for (a, b) in [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("emb_layers.1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ] {
        if let Some(tail) = s.strip_prefix(a) {
            s = format!("{b}{tail}");
            break;
        }
    }
    s
}

fn split_num(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// The SD 1.x/2.x/XL UNet architecture facts the key map needs.
#[derive(Debug, Clone, Copy)]
pub struct UnetLayout {
    pub layers_per_block: usize,
    /// SDXL's `label_emb` is the text-time `add_embedding`; elsewhere a class embedding.
    pub text_time: bool,
}

/// Maps one UNet key (without `model.diffusion_model.`) to its diffusers name.
/// `upsampler(i, j)` tells whether output sub-layer `i.j` holds only `conv.weight`/`conv.bias`.
pub fn unet_key(
    key: &str,
    layout: UnetLayout,
    upsampler: &dyn Fn(usize, usize) -> bool,
) -> Option<String> {
    let l = layout.layers_per_block + 1;
    for (a, b) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ] {
        if let Some(rest) = key.strip_prefix(a) {
            return Some(format!("{b}{rest}"));
        }
    }
    let emb = if layout.text_time {
        "add_embedding"
    } else {
        "class_embedding"
    };
    if let Some(rest) = key.strip_prefix("label_emb.0.0.") {
        return Some(format!("{emb}.linear_1.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("label_emb.0.2.") {
        return Some(format!("{emb}.linear_2.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("input_blocks.") {
        let (i, rest) = split_num(rest)?;
        let (j, rest) = split_num(rest)?;
        if i == 0 {
            return None;
        }
        let (block, layer) = ((i - 1) / l, (i - 1) % l);
        return Some(match j {
            0 if rest.starts_with("op.") => {
                format!("down_blocks.{block}.downsamplers.0.conv.{}", &rest[3..])
            }
            0 => format!(
                "down_blocks.{block}.resnets.{layer}.{}",
                resnet_rename(rest)
            ),
            1 => format!("down_blocks.{block}.attentions.{layer}.{rest}"),
            _ => return None,
        });
    }
    if let Some(rest) = key.strip_prefix("middle_block.") {
        let (j, rest) = split_num(rest)?;
        return Some(match j {
            0 => format!("mid_block.resnets.0.{}", resnet_rename(rest)),
            1 => format!("mid_block.attentions.0.{rest}"),
            2 => format!("mid_block.resnets.1.{}", resnet_rename(rest)),
            _ => return None,
        });
    }
    if let Some(rest) = key.strip_prefix("output_blocks.") {
        let (i, rest) = split_num(rest)?;
        let (j, rest) = split_num(rest)?;
        let (block, layer) = (i / l, i % l);
        return Some(if j == 0 {
            format!("up_blocks.{block}.resnets.{layer}.{}", resnet_rename(rest))
        } else if upsampler(i, j) {
            format!("up_blocks.{block}.upsamplers.0.{rest}")
        } else if j == 1 {
            format!("up_blocks.{block}.attentions.{layer}.{rest}")
        } else {
            return None;
        });
    }
    None
}

/// Maps one VAE key (without `first_stage_model.`) to its diffusers name;
/// `levels` is the number of decoder up levels (their order is reversed).
pub fn vae_key(key: &str, levels: usize) -> Option<String> {
    let (side, rest) = key.split_once('.')?;
    if side == "quant_conv" || side == "post_quant_conv" {
        return Some(key.to_string());
    }
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let out = if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else if let Some(r) = rest.strip_prefix("down.") {
        let (i, r) = split_num(r)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = split_num(r)?;
            format!(
                "down_blocks.{i}.resnets.{j}.{}",
                r.replace("nin_shortcut", "conv_shortcut")
            )
        } else if let Some(r) = r.strip_prefix("downsample.conv.") {
            format!("down_blocks.{i}.downsamplers.0.conv.{r}")
        } else {
            return None;
        }
    } else if let Some(r) = rest.strip_prefix("up.") {
        let (i, r) = split_num(r)?;
        let k = levels.checked_sub(1 + i)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = split_num(r)?;
            format!(
                "up_blocks.{k}.resnets.{j}.{}",
                r.replace("nin_shortcut", "conv_shortcut")
            )
        } else if let Some(r) = r.strip_prefix("upsample.conv.") {
            format!("up_blocks.{k}.upsamplers.0.conv.{r}")
        } else {
            return None;
        }
    } else if let Some(r) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{r}")
    } else if let Some(r) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{r}")
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (leaf, tail) = r.split_once('.')?;
        let leaf = match leaf {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        format!("mid_block.attentions.0.{leaf}.{tail}")
    } else {
        return None;
    };
    Some(format!("{side}.{out}"))
}

/// Maps one OpenCLIP key (without its prefix) to Hugging Face CLIP names.
/// Fused `in_proj_*` keys are expanded by [`openclip_plan`].
pub fn openclip_key(key: &str) -> Option<String> {
    Some(match key {
        "positional_embedding" => "text_model.embeddings.position_embedding.weight".into(),
        "token_embedding.weight" => "text_model.embeddings.token_embedding.weight".into(),
        "ln_final.weight" => "text_model.final_layer_norm.weight".into(),
        "ln_final.bias" => "text_model.final_layer_norm.bias".into(),
        "text_projection" => "text_projection.weight".into(),
        _ => {
            let rest = key.strip_prefix("transformer.resblocks.")?;
            let (n, rest) = split_num(rest)?;
            let rest = rest
                .replace("ln_1", "layer_norm1")
                .replace("ln_2", "layer_norm2")
                .replace(".c_fc.", ".fc1.")
                .replace(".c_proj.", ".fc2.")
                .replace("attn.out_proj", "self_attn.out_proj");
            format!("text_model.encoder.layers.{n}.{rest}")
        }
    })
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

/// Writes planned tensors as one safetensors file, streaming tensor by tensor.
pub fn write_component(index: &TensorIndex, planned: &[Planned], out: &Path) -> Result<()> {
    struct Item<'a> {
        p: &'a Planned,
        meta: &'a TensorMeta,
        shape: Vec<usize>,
        len: usize,
    }
    let mut items = Vec::with_capacity(planned.len());
    for p in planned {
        let meta = index
            .get(&p.src)
            .ok_or_else(|| StoreError::invalid(&index.path, format!("missing tensor {}", p.src)))?;
        let el = meta.dtype.bitsize() / 8;
        let shape = match &p.op {
            Op::Copy { shape } => shape.clone(),
            Op::Rows { start, end } => {
                let mut s = meta.shape.clone();
                s[0] = end - start;
                s
            }
            Op::Transpose => {
                if meta.shape.len() != 2 {
                    return Err(StoreError::Tensor {
                        path: index.path.clone(),
                        tensor: p.src.clone(),
                        reason: "expected a 2-D tensor to transpose".into(),
                    });
                }
                vec![meta.shape[1], meta.shape[0]]
            }
        };
        let len = shape.iter().product::<usize>() * el;
        items.push(Item {
            p,
            meta,
            shape,
            len,
        });
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for it in &items {
        header.insert(
            it.p.dst.clone(),
            json!({"dtype": it.meta.dtype, "shape": it.shape, "data_offsets": [offset, offset + it.len]}),
        );
        offset += it.len;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut text = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| StoreError::invalid(out, e.to_string()))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let file = std::fs::File::create(out).map_err(StoreError::io(out))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let io = StoreError::io(out);
    let write_all = |w: &mut std::io::BufWriter<std::fs::File>, b: &[u8]| w.write_all(b);
    write_all(&mut w, &(text.len() as u64).to_le_bytes())
        .and_then(|_| write_all(&mut w, &text))
        .map_err(io)?;
    let mut cache: Option<(String, Vec<u8>)> = None;
    for it in &items {
        if cache.as_ref().is_none_or(|(n, _)| *n != it.p.src) {
            cache = Some((it.p.src.clone(), read_bytes(index, it.meta)?));
        }
        let bytes = &cache
            .as_ref()
            .map(|(_, b)| b)
            .ok_or_else(|| StoreError::invalid(out, "internal"))?[..];
        let el = it.meta.dtype.bitsize() / 8;
        let data: std::borrow::Cow<[u8]> = match &it.p.op {
            Op::Copy { .. } => bytes.into(),
            Op::Rows { start, end } => {
                let row: usize = it.meta.shape.iter().skip(1).product::<usize>() * el;
                bytes[start * row..end * row].into()
            }
            Op::Transpose => {
                let (r, c) = (it.meta.shape[0], it.meta.shape[1]);
                let mut t = vec![0u8; bytes.len()];
                for i in 0..r {
                    for j in 0..c {
                        t[(j * r + i) * el..(j * r + i + 1) * el]
                            .copy_from_slice(&bytes[(i * c + j) * el..(i * c + j + 1) * el]);
                    }
                }
                t.into()
            }
        };
        w.write_all(&data).map_err(StoreError::io(out))?;
    }
    w.flush().map_err(StoreError::io(out))?;
    Ok(())
}

/// Built-in diffusers configurations of the standard architectures, used when no
/// `--config` folder is given. They are checked against the checkpoint's shapes.
pub fn builtin_config(base: BaseModel, v_prediction: bool) -> BTreeMap<&'static str, Value> {
    let clip_l = json!({"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
        "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
        "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "model_type": "clip_text_model"});
    let vae = |scale: f64, size: u64| {
        json!({"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "sample_size": size, "scaling_factor": scale})
    };
    let ddim = |pred: &str| {
        json!({"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1, "num_train_timesteps": 1000, "prediction_type": pred, "timestep_spacing": "leading"})
    };
    let euler = json!({"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
        "set_alpha_to_one": false, "skip_prk_steps": true, "sample_max_value": 1.0});
    let sd_unet = |cad: u64, heads: Value, linear: bool, size: u64, upcast: bool| {
        json!({"_class_name": "UNet2DConditionModel",
        "act_fn": "silu", "attention_head_dim": heads, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": cad, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
        "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": size,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "use_linear_projection": linear, "upcast_attention": upcast})
    };
    let mut c = BTreeMap::new();
    match base {
        BaseModel::Sd1 => {
            c.insert("model_index", json!({"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [null, null], "feature_extractor": [null, null], "requires_safety_checker": false}));
            c.insert("unet", sd_unet(768, json!(8), false, 64, false));
            c.insert("vae", vae(0.18215, 512));
            c.insert("text_encoder", clip_l);
            c.insert(
                "scheduler",
                ddim(if v_prediction {
                    "v_prediction"
                } else {
                    "epsilon"
                }),
            );
        }
        BaseModel::Sd2 => {
            c.insert("model_index", json!({"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [null, null], "feature_extractor": [null, null], "requires_safety_checker": false}));
            c.insert(
                "unet",
                sd_unet(
                    1024,
                    json!([5, 10, 20, 20]),
                    true,
                    if v_prediction { 96 } else { 64 },
                    v_prediction,
                ),
            );
            c.insert("vae", vae(0.18215, if v_prediction { 768 } else { 512 }));
            c.insert("text_encoder", json!({"architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                "num_attention_heads": 16, "num_hidden_layers": 23, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
                "projection_dim": 512, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "model_type": "clip_text_model"}));
            c.insert(
                "scheduler",
                ddim(if v_prediction {
                    "v_prediction"
                } else {
                    "epsilon"
                }),
            );
        }
        BaseModel::Sdxl | BaseModel::SdxlRefiner => {
            let refiner = base == BaseModel::SdxlRefiner;
            let big_g = json!({"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
                "num_attention_heads": 20, "num_hidden_layers": 32, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
                "projection_dim": 1280, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "model_type": "clip_text_model"});
            let unet = if refiner {
                json!({"_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                    "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536], "cross_attention_dim": 1280,
                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
                    "projection_class_embeddings_input_dim": 2560, "sample_size": 128, "transformer_layers_per_block": 4, "use_linear_projection": true})
            } else {
                json!({"_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
                    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true})
            };
            let mut index = json!({"_class_name": if refiner { "StableDiffusionXLImg2ImgPipeline" } else { "StableDiffusionXLPipeline" },
                "scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "force_zeros_for_empty_prompt": !refiner});
            if refiner {
                index["text_encoder"] = json!([null, null]);
                index["tokenizer"] = json!([null, null]);
                index["requires_aesthetics_score"] = json!(true);
            } else {
                index["text_encoder"] = json!(["transformers", "CLIPTextModel"]);
                index["tokenizer"] = json!(["transformers", "CLIPTokenizer"]);
                c.insert("text_encoder", clip_l);
            }
            c.insert("model_index", index);
            c.insert("unet", unet);
            c.insert("vae", vae(0.13025, 1024));
            c.insert("text_encoder_2", big_g);
            c.insert("scheduler", euler);
        }
    }
    c
}

/// Reads the configs of a diffusers-layout folder given with `--config`.
pub fn folder_config(dir: &Path) -> Result<BTreeMap<&'static str, Value>> {
    let mut c = BTreeMap::new();
    c.insert("model_index", read_json(&dir.join("model_index.json"))?);
    for comp in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        let p = dir.join(comp).join("config.json");
        if p.exists() {
            c.insert(comp, read_json(&p)?);
        }
    }
    let s = dir.join("scheduler/scheduler_config.json");
    if s.exists() {
        c.insert("scheduler", read_json(&s)?);
    }
    Ok(c)
}

fn component_name(c: &str) -> &'static str {
    match c {
        "unet" => "unet",
        "vae" => "vae",
        "text_encoder" => "text_encoder",
        _ => "text_encoder_2",
    }
}

/// Checks that a configuration describes the checkpoint: the first widths of
/// each network must equal the tensor shapes. A mismatch suggests `--config`.
fn check_config(
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

/// What to convert and where the result goes.
pub struct ConvertRequest<'a> {
    pub checkpoint: &'a Path,
    pub out_dir: &'a Path,
    /// A diffusers-layout folder whose configs (and tokenizer) describe the architecture.
    pub config_dir: Option<&'a Path>,
    /// A tokenizer folder to copy (`tokenizer/`), when the config folder has none.
    pub tokenizer_dir: Option<&'a Path>,
}

/// Converts a main checkpoint to a diffusers folder. Writes into a temporary
/// sibling and renames it into place, so a failed conversion leaves nothing.
pub fn convert_main(req: &ConvertRequest) -> Result<PathBuf> {
    let index = open_weights(req.checkpoint)?;
    let probe = super::probe::probe(req.checkpoint)?;
    if probe.model_type != modelcache_crds::ModelType::Main {
        return Err(StoreError::Conversion {
            path: req.checkpoint.to_path_buf(),
            reason: format!(
                "is a {} model; only main checkpoints are converted",
                probe.model_type
            ),
        });
    }
    let base = probe
        .base
        .ok_or_else(|| StoreError::invalid(req.checkpoint, "cannot determine the base model"))?;
    let v = probe.prediction_type == Some(modelcache_crds::PredictionType::VPrediction);
    let config = match req.config_dir {
        Some(dir) => folder_config(dir)?,
        None => builtin_config(base, v),
    };
    let unet_cfg = config.get("unet").cloned().unwrap_or_default();
    let layout = Layout {
        unet: UnetLayout {
            layers_per_block: unet_cfg["layers_per_block"].as_u64().unwrap_or(2) as usize,
            text_time: unet_cfg["addition_embed_type"].as_str() == Some("text_time"),
        },
        vae_levels: config
            .get("vae")
            .and_then(|v| v["block_out_channels"].as_array())
            .map_or(4, Vec::len),
        text_layers: config
            .get("text_encoder")
            .and_then(|c| c["num_hidden_layers"].as_u64())
            .map(|n| n as usize),
        text_layers_2: config
            .get("text_encoder_2")
            .and_then(|c| c["num_hidden_layers"].as_u64())
            .map(|n| n as usize),
    };
    let plan = plan_main(&index, base, layout)?;
    check_config(&index, &plan, &config, req.config_dir.is_some())?;

    let parent = req.out_dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(StoreError::io(parent))?;
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        req.out_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(StoreError::io(&tmp))?;
        let write_json = |p: &Path, v: &Value| -> Result<()> {
            let text = serde_json::to_string_pretty(v)
                .map_err(|e| StoreError::invalid(p, e.to_string()))?;
            std::fs::write(p, text).map_err(StoreError::io(p))
        };
        write_json(&tmp.join("model_index.json"), &config["model_index"])?;
        for (comp, planned) in &plan.components {
            let dir = tmp.join(comp);
            std::fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
            if let Some(cfg) = config.get(component_name(comp)) {
                write_json(&dir.join("config.json"), cfg)?;
            }
            let file = if comp.starts_with("text_encoder") {
                "model.safetensors"
            } else {
                "diffusion_pytorch_model.safetensors"
            };
            write_component(&index, planned, &dir.join(file))?;
        }
        if let Some(s) = config.get("scheduler") {
            let dir = tmp.join("scheduler");
            std::fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
            write_json(&dir.join("scheduler_config.json"), s)?;
        }
        for tok in ["tokenizer", "tokenizer_2"] {
            let src = req
                .config_dir
                .map(|d| d.join(tok))
                .filter(|d| d.is_dir())
                .or_else(|| {
                    req.tokenizer_dir
                        .filter(|_| tok == "tokenizer")
                        .map(Path::to_path_buf)
                })
                .or_else(|| {
                    req.checkpoint
                        .parent()
                        .map(|p| p.join(tok))
                        .filter(|d| d.is_dir())
                });
            let needed = config["model_index"][tok]
                .as_array()
                .is_some_and(|a| a.iter().all(|v| !v.is_null()));
            match src {
                Some(src) => copy_dir(&src, &tmp.join(tok))?,
                // A single file carries no tokenizer: use the standard CLIP vocabulary
                // shipped with the agent (SD 2.x and SDXL's second encoder pad with "!").
                None if needed => {
                    let pad = if tok == "tokenizer_2" || base == BaseModel::Sd2 {
                        "!"
                    } else {
                        "<|endoftext|>"
                    };
                    crate::pipeline::tokenizer::write_standard_clip(&tmp.join(tok), pad)
                        .map_err(StoreError::io(tmp.join(tok)))?;
                }
                None => {}
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(req.out_dir);
    std::fs::rename(&tmp, req.out_dir).map_err(StoreError::io(req.out_dir))?;
    Ok(req.out_dir.to_path_buf())
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(StoreError::io(dst))?;
    for entry in std::fs::read_dir(src).map_err(StoreError::io(src))? {
        let entry = entry.map_err(StoreError::io(src))?;
        let p = entry.path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(entry.file_name())).map_err(StoreError::io(&p))?;
        }
    }
    Ok(())
}

/// Where the converted form of a checkpoint is cached under `--state-dir`:
/// keyed by the file's path, size and modification time, so an edited file is
/// converted again and model folders are never written to.
pub fn cache_dir(
    state_dir: &Path,
    checkpoint: &Path,
    config_dir: Option<&Path>,
) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let abs = checkpoint
        .canonicalize()
        .map_err(StoreError::io(checkpoint))?;
    let m = std::fs::metadata(&abs).map_err(StoreError::io(&abs))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h = Sha256::new();
    h.update(abs.to_string_lossy().as_bytes());
    h.update(m.len().to_le_bytes());
    h.update(mtime.to_le_bytes());
    if let Some(c) = config_dir {
        h.update(
            c.canonicalize()
                .map_err(StoreError::io(c))?
                .to_string_lossy()
                .as_bytes(),
        );
    }
    Ok(state_dir
        .join("converted")
        .join(super::identity::hex(&h.finalize()[..16])))
}

/// The diffusers folder for a checkpoint: converted once, then reused from the cache.
pub fn converted(
    state_dir: &Path,
    checkpoint: &Path,
    config_dir: Option<&Path>,
    tokenizer_dir: Option<&Path>,
) -> Result<PathBuf> {
    let out = cache_dir(state_dir, checkpoint, config_dir)?;
    if out.join("model_index.json").exists() {
        return Ok(out);
    }
    convert_main(&ConvertRequest {
        checkpoint,
        out_dir: &out,
        config_dir,
        tokenizer_dir,
    })
}
