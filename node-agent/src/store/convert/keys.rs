//! The key maps: each tensor name of the original (LDM/SGM) layout to its
//! diffusers name. Pure functions over names, tested one by one.

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

pub(super) fn split_num(s: &str) -> Option<(usize, &str)> {
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
