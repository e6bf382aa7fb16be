//! LoRA key layouts, all brought to kohya's before
//! the adapter is applied: `lora_unet_…`, `lora_te_…` (`lora_te1_`/`lora_te2_`
//! for SDXL's two text encoders), a `.`-free module path and
//! `lora_down`/`lora_up`/`alpha` leaves.
//!
//! - kohya: kept as they are;
//! - diffusers/PEFT (`unet.…attn1.to_q.lora_A.weight`, `text_encoder.…`,
//!   `text_encoder_2.…`) and diffusers' older attention-processor layout
//!   (`…to_q.lora.down.weight`, `…processor.to_q_lora.down.weight`);
//! - SDXL in Stability's UNet naming (`lora_unet_input_blocks_4_1_…`), converted
//!   with InvokeAI's table; a file that converts only partly is refused.

use std::collections::HashMap;

/// Why a key cannot be understood.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum KeyError {
    #[error("LoRA key {0:?} is in no known layout (kohya lora_unet_/lora_te_, diffusers/PEFT unet./text_encoder.)")]
    Unknown(String),
    #[error("SDXL LoRA could only be partially converted from Stability's naming ({converted} keys converted, {kept} not; first not converted: {example})")]
    Partial {
        converted: usize,
        kept: usize,
        example: String,
    },
}

/// Renames every key of an adapter file to kohya's layout.
pub fn normalize<T>(tensors: HashMap<String, T>) -> Result<HashMap<String, T>, KeyError> {
    let sdxl = tensors
        .keys()
        .any(|k| k.starts_with("text_encoder_2.") || k.starts_with("lora_te2_"));
    let mut out = HashMap::with_capacity(tensors.len());
    for (k, v) in tensors {
        out.insert(kohya(&k, sdxl)?, v);
    }
    stability_to_diffusers(out)
}

/// One key in kohya form.
fn kohya(key: &str, sdxl: bool) -> Result<String, KeyError> {
    if key.starts_with("lora_unet_") || key.starts_with("lora_te") {
        return Ok(key.to_string());
    }
    let (prefix, rest) = if let Some(r) = key.strip_prefix("unet.") {
        ("lora_unet_", r)
    } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
        ("lora_te2_", r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (if sdxl { "lora_te1_" } else { "lora_te_" }, r)
    } else {
        return Err(KeyError::Unknown(key.to_string()));
    };
    // Leaf spellings, longest first.
    const LEAVES: &[(&str, &str)] = &[
        (".lora_A.default.weight", "lora_down.weight"),
        (".lora_B.default.weight", "lora_up.weight"),
        (".lora_A.weight", "lora_down.weight"),
        (".lora_B.weight", "lora_up.weight"),
        (".lora.down.weight", "lora_down.weight"),
        (".lora.up.weight", "lora_up.weight"),
        ("_lora.down.weight", "lora_down.weight"),
        ("_lora.up.weight", "lora_up.weight"),
        (".lora_down.weight", "lora_down.weight"),
        (".lora_up.weight", "lora_up.weight"),
        (".alpha", "alpha"),
    ];
    let (module, leaf) = LEAVES
        .iter()
        .find_map(|(suffix, leaf)| rest.strip_suffix(suffix).map(|m| (m, *leaf)))
        .ok_or_else(|| KeyError::Unknown(key.to_string()))?;
    // Attention-processor layout: `attn1.processor.to_q` names `attn1.to_q`;
    // `to_out_lora` names `to_out.0`.
    let module = module.replace(".processor.", ".");
    let module = match module.strip_suffix(".to_out") {
        Some(m) => format!("{m}.to_out.0"),
        None => module,
    };
    Ok(format!("{prefix}{}.{leaf}", module.replace('.', "_")))
}

/// Stability's SDXL UNet prefixes and their diffusers counterparts, both with `_` for `.`.
fn stability_table() -> Vec<(String, String)> {
    let resnet = [
        ("in_layers_0", "norm1"),
        ("in_layers_2", "conv1"),
        ("out_layers_0", "norm2"),
        ("out_layers_3", "conv2"),
        ("emb_layers_1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ];
    let mut t: Vec<(String, String)> = Vec::new();
    let mut resnet_pair = |sd: String, hf: String| {
        for (a, b) in resnet {
            t.push((format!("{sd}_{a}"), format!("{hf}_{b}")));
        }
        t.push((sd, hf));
    };
    for i in 0..3 {
        for j in 0..2 {
            resnet_pair(
                format!("input_blocks_{}_0", 3 * i + j + 1),
                format!("down_blocks_{i}_resnets_{j}"),
            );
        }
        for j in 0..3 {
            resnet_pair(
                format!("output_blocks_{}_0", 3 * i + j),
                format!("up_blocks_{i}_resnets_{j}"),
            );
        }
    }
    for j in 0..2 {
        resnet_pair(
            format!("middle_block_{}", 2 * j),
            format!("mid_block_resnets_{j}"),
        );
    }
    for i in 0..3 {
        for j in 0..2 {
            t.push((
                format!("input_blocks_{}_1", 3 * i + j + 1),
                format!("down_blocks_{i}_attentions_{j}"),
            ));
        }
        for j in 0..3 {
            t.push((
                format!("output_blocks_{}_1", 3 * i + j),
                format!("up_blocks_{i}_attentions_{j}"),
            ));
        }
        t.push((
            format!("input_blocks_{}_0_op", 3 * (i + 1)),
            format!("down_blocks_{i}_downsamplers_0_conv"),
        ));
        t.push((
            format!("output_blocks_{}_2", 3 * i + 2),
            format!("up_blocks_{i}_upsamplers_0"),
        ));
    }
    t.push(("middle_block_1".into(), "mid_block_attentions_0".into()));
    for j in 0..2 {
        t.push((
            format!("time_embed_{}", 2 * j),
            format!("time_embedding_linear_{}", j + 1),
        ));
        t.push((
            format!("label_emb_0_{}", 2 * j),
            format!("add_embedding_linear_{}", j + 1),
        ));
    }
    t.push(("input_blocks_0_0".into(), "conv_in".into()));
    t.push(("out_0".into(), "conv_norm_out".into()));
    t.push(("out_2".into(), "conv_out".into()));
    t
}

/// Converts Stability-named SDXL UNet keys; other files pass through unchanged.
fn stability_to_diffusers<T>(tensors: HashMap<String, T>) -> Result<HashMap<String, T>, KeyError> {
    let stability = tensors.keys().any(|k| {
        ["input_blocks_", "output_blocks_", "middle_block_"]
            .iter()
            .any(|p| k.starts_with(&format!("lora_unet_{p}")))
    });
    if !stability {
        return Ok(tensors);
    }
    let table = stability_table();
    let (mut converted, mut kept, mut example) = (0, 0, String::new());
    let mut out = HashMap::with_capacity(tensors.len());
    for (k, v) in tensors {
        let new = match k.strip_prefix("lora_unet_") {
            Some(rest) => {
                // The longest Stability prefix that names this key's module.
                let hit = table
                    .iter()
                    .filter(|(sd, _)| {
                        rest.starts_with(sd.as_str())
                            && matches!(rest.as_bytes().get(sd.len()), Some(b'_') | Some(b'.'))
                    })
                    .max_by_key(|(sd, _)| sd.len());
                match hit {
                    Some((sd, hf)) => {
                        converted += 1;
                        format!("lora_unet_{hf}{}", &rest[sd.len()..])
                    }
                    None => {
                        kept += 1;
                        if example.is_empty() {
                            example = k.clone();
                        }
                        k
                    }
                }
            }
            None => k,
        };
        out.insert(new, v);
    }
    if converted > 0 && kept > 0 {
        return Err(KeyError::Partial {
            converted,
            kept,
            example,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(key: &str) -> Result<String, KeyError> {
        normalize(HashMap::from([(key.to_string(), ())])).map(|m| m.into_keys().next().unwrap())
    }

    #[test]
    fn peft_and_old_diffusers_keys_become_kohya() {
        assert_eq!(
            one("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight")
                .unwrap(),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        );
        assert_eq!(
            one("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight")
                .unwrap(),
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight"
        );
        assert_eq!(
            one("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight").unwrap(),
            "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight"
        );
        assert_eq!(
            one("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight").unwrap(),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
        );
        assert_eq!(one("lora_te_x.alpha").unwrap(), "lora_te_x.alpha");
        assert!(matches!(
            one("model.diffusion_model.x.weight"),
            Err(KeyError::Unknown(_))
        ));
        // SDXL: text_encoder is the first of two.
        let m = normalize(HashMap::from([
            (
                "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight".to_string(),
                (),
            ),
            (
                "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight".to_string(),
                (),
            ),
        ]))
        .unwrap();
        let mut keys: Vec<_> = m.into_keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
            ]
        );
    }

    #[test]
    fn stability_sdxl_keys_are_converted_whole_or_refused() {
        let m = normalize(HashMap::from([
            (
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
                    .to_string(),
                (),
            ),
            (
                "lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight".to_string(),
                (),
            ),
            ("lora_unet_middle_block_1_proj_in.alpha".to_string(), ()),
            (
                "lora_unet_output_blocks_2_2_conv.lora_up.weight".to_string(),
                (),
            ),
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha".to_string(),
                (),
            ),
        ]))
        .unwrap();
        let mut keys: Vec<_> = m.into_keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha",
                "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight",
                "lora_unet_mid_block_attentions_0_proj_in.alpha",
                "lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight",
            ]
        );
        let partial = normalize(HashMap::from([
            ("lora_unet_input_blocks_4_1_proj_in.alpha".to_string(), ()),
            ("lora_unet_something_else.alpha".to_string(), ()),
        ]));
        assert!(matches!(
            partial,
            Err(KeyError::Partial {
                converted: 1,
                kept: 1,
                ..
            })
        ));
    }
}
