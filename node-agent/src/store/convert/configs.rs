//! The diffusers configurations a converted folder gets: built-in ones for
//! the standard SD 1.5, SD 2.x and SDXL architectures, or those of a
//! diffusers-layout folder given with `--config`.

use crate::store::error::Result;
use crate::store::read_json;
use modelcache_crds::BaseModel;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

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

pub(super) fn component_name(c: &str) -> &'static str {
    match c {
        "unet" => "unet",
        "vae" => "vae",
        "text_encoder" => "text_encoder",
        _ => "text_encoder_2",
    }
}
