//! The generation pipeline (ARCHITECTURE §4 `pipeline`): text encoder → UNet
//! denoising loop with classifier-free guidance → VAE decode, for diffusers
//! pipeline folders whose `config.json` files describe the architecture.
//! Every weight comes from the cache; components are separate cache entries.

pub mod clip;
pub mod embedding;
pub mod image;
pub mod lora;
pub mod lora_keys;
pub mod rng;
pub mod scheduler;
pub mod tokenizer;
pub mod unet;

use crate::cache::{CacheError, ModelCache};
use crate::store::{self, read_json};
use candle_core::{DType, Device, Tensor};
use clip::{ClipConfig, ClipTextModel};
pub use image::Image;
use modelcache_crds::{BaseModel, ModelVariant, SchedulerKind};
use rng::NormalRng;
use scheduler::{ScheduleConfig, Scheduler};
use serde_json::Value;
use std::path::{Path, PathBuf};
use unet::conv::{with_seamless, Net, Seamless};
use unet::unet_2d;
use unet::vae::{VaeConfig, VaeDecoder};

/// Fixes the CPU thread count that candle's ops use, once, at start-up.
///
/// candle asks for it on every CPU matrix product and, unless
/// `RAYON_NUM_THREADS` is set, works it out each time by parsing
/// `/proc/cpuinfo` (`num_cpus::get_physical`): 10% of a tiny model's step on
/// the 2-core reference machine, and more on hosts with many cores, whose
/// `/proc/cpuinfo` is long. Setting the variable to the same answer makes the
/// lookup an environment read. Call it while the process has one thread:
/// `setenv` races with other threads' `getenv`.
pub fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Why a generation failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Cache(#[from] CacheError),
    #[error("{path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("generation cancelled")]
    Cancelled,
    #[error("{0}")]
    Compute(String),
}

impl From<candle_core::Error> for PipelineError {
    fn from(e: candle_core::Error) -> Self {
        PipelineError::Compute(store::error::candle_message(&e))
    }
}

fn model_err(path: &Path, reason: impl Into<String>) -> PipelineError {
    PipelineError::Model {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A diffusers pipeline folder, with its configurations read and checked.
pub struct DiffusersModel {
    pub dir: PathBuf,
    pub base: BaseModel,
    unet: unet_2d::UNet2DConditionModelConfig,
    latent_channels: usize,
    vae: VaeConfig,
    scaling_factor: f64,
    text: ClipConfig,
    schedule: ScheduleConfig,
    tokenizer: tokenizer::ClipTokenizer,
    /// SDXL's second text encoder (with projection) and its tokenizer.
    text2: Option<(ClipConfig, tokenizer::ClipTokenizer)>,
    /// SDXL: an empty negative prompt conditions on zeros, not on "".
    force_zeros_for_empty_prompt: bool,
}

fn usize_list(v: &Value, n: usize) -> Option<Vec<usize>> {
    match v {
        Value::Number(x) => x.as_u64().map(|x| vec![x as usize; n]),
        Value::Array(a) => a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect(),
        _ => None,
    }
}

/// candle's UNet configuration from a diffusers `unet/config.json`.
pub fn unet_config(v: &Value) -> Result<unet_2d::UNet2DConditionModelConfig, String> {
    let channels = usize_list(&v["block_out_channels"], 0)
        .ok_or("unet config.json lacks block_out_channels")?;
    let n = channels.len();
    let types: Vec<&str> = v["down_block_types"]
        .as_array()
        .ok_or("unet config.json lacks down_block_types")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if types.len() != n {
        return Err("unet down_block_types and block_out_channels differ in length".into());
    }
    // diffusers quirk: `attention_head_dim` holds the number of heads unless `num_attention_heads` is set.
    let heads = usize_list(&v["num_attention_heads"], n)
        .or_else(|| usize_list(&v["attention_head_dim"], n))
        .unwrap_or(vec![8; n]);
    let layers = usize_list(&v["transformer_layers_per_block"], n).unwrap_or(vec![1; n]);
    if heads.len() != n || layers.len() != n {
        return Err(
            "unet attention_head_dim / transformer_layers_per_block do not match the blocks".into(),
        );
    }
    if v["class_embed_type"].as_str().is_some() {
        return Err("UNets with class embeddings are not supported".into());
    }
    let addition = match v["addition_embed_type"].as_str() {
        None => None,
        Some("text_time") => Some(unet_2d::AdditionConfig {
            time_embed_dim: v["addition_time_embed_dim"]
                .as_u64()
                .ok_or("unet config.json lacks addition_time_embed_dim")?
                as usize,
            input_dim: v["projection_class_embeddings_input_dim"]
                .as_u64()
                .ok_or("unet config.json lacks projection_class_embeddings_input_dim")?
                as usize,
        }),
        Some(other) => {
            return Err(format!(
                "UNet addition_embed_type {other:?} is not supported (only SDXL's text_time)"
            ))
        }
    };
    let blocks = (0..n)
        .map(|i| unet_2d::BlockConfig {
            out_channels: channels[i],
            use_cross_attn: types[i].starts_with("CrossAttn").then_some(layers[i]),
            attention_head_dim: heads[i],
        })
        .collect();
    Ok(unet_2d::UNet2DConditionModelConfig {
        center_input_sample: v["center_input_sample"].as_bool().unwrap_or(false),
        flip_sin_to_cos: v["flip_sin_to_cos"].as_bool().unwrap_or(true),
        freq_shift: v["freq_shift"].as_f64().unwrap_or(0.0),
        blocks,
        layers_per_block: v["layers_per_block"].as_u64().unwrap_or(2) as usize,
        downsample_padding: v["downsample_padding"].as_u64().unwrap_or(1) as usize,
        mid_block_scale_factor: v["mid_block_scale_factor"].as_f64().unwrap_or(1.0),
        norm_num_groups: v["norm_num_groups"].as_u64().unwrap_or(32) as usize,
        norm_eps: v["norm_eps"].as_f64().unwrap_or(1e-5),
        cross_attention_dim: usize_list(&v["cross_attention_dim"], 1)
            .and_then(|c| c.first().copied())
            .ok_or("unet config.json lacks cross_attention_dim")?,
        sliced_attention_size: None,
        use_linear_projection: v["use_linear_projection"].as_bool().unwrap_or(false),
        addition,
    })
}

impl DiffusersModel {
    /// Reads and checks a diffusers txt2img pipeline folder.
    pub fn open(dir: &Path) -> Result<Self, PipelineError> {
        let probe = store::probe(dir).map_err(|e| model_err(dir, e.to_string()))?;
        if probe.model_type != modelcache_crds::ModelType::Main {
            return Err(model_err(
                dir,
                format!(
                    "is a {} model, not a text-to-image pipeline",
                    probe.model_type
                ),
            ));
        }
        if let Some(v) = probe.variant.filter(|v| *v != ModelVariant::Normal) {
            return Err(model_err(
                dir,
                format!("is an {v} model; text-to-image needs a normal base model"),
            ));
        }
        let base = probe
            .base
            .ok_or_else(|| model_err(dir, "cannot determine the base model"))?;
        if base == BaseModel::SdxlRefiner {
            return Err(model_err(
                dir,
                "is an SDXL refiner, which refines images and cannot generate from text alone",
            ));
        }
        let cfg = |c: &str| read_json(&dir.join(c)).map_err(|e| model_err(dir, e.to_string()));
        let unet_json = cfg("unet/config.json")?;
        let unet = unet_config(&unet_json).map_err(|e| model_err(dir, e))?;
        if unet_json["in_channels"].as_u64().unwrap_or(4) != 4 {
            return Err(model_err(
                dir,
                "UNet does not take 4 latent channels; only text-to-image models are served",
            ));
        }
        let vae_json = cfg("vae/config.json")?;
        let vae = VaeConfig {
            block_out_channels: usize_list(&vae_json["block_out_channels"], 0)
                .ok_or_else(|| model_err(dir, "vae config.json lacks block_out_channels"))?,
            layers_per_block: vae_json["layers_per_block"].as_u64().unwrap_or(2) as usize,
            latent_channels: vae_json["latent_channels"].as_u64().unwrap_or(4) as usize,
            norm_num_groups: vae_json["norm_num_groups"].as_u64().unwrap_or(32) as usize,
            use_post_quant_conv: vae_json["use_post_quant_conv"].as_bool().unwrap_or(true),
        };
        let text = ClipConfig::from_json(&cfg("text_encoder/config.json")?)
            .map_err(|e| model_err(dir, e))?;
        let schedule =
            ScheduleConfig::from_json(&cfg("scheduler/scheduler_config.json").unwrap_or_default());
        let tokenizer =
            tokenizer::ClipTokenizer::load(&dir.join("tokenizer"), text.max_position_embeddings)
                .map_err(|e| model_err(dir, e))?;
        let text2 = if dir.join("text_encoder_2/config.json").exists() {
            let c = ClipConfig::from_json(&cfg("text_encoder_2/config.json")?)
                .map_err(|e| model_err(dir, e))?;
            if c.projection_dim.is_none() {
                return Err(model_err(
                    dir,
                    "text_encoder_2 is not a CLIPTextModelWithProjection (SDXL needs its pooled, projected output)",
                ));
            }
            let t =
                tokenizer::ClipTokenizer::load(&dir.join("tokenizer_2"), c.max_position_embeddings)
                    .map_err(|e| model_err(dir, e))?;
            Some((c, t))
        } else {
            None
        };
        if unet.addition.is_some() != text2.is_some() {
            return Err(model_err(
                dir,
                "the UNet's added text/time embeddings and a second text encoder go together (SDXL); this folder has one without the other",
            ));
        }
        let force_zeros_for_empty_prompt = read_json(&dir.join("model_index.json"))
            .ok()
            .and_then(|v| v["force_zeros_for_empty_prompt"].as_bool())
            .unwrap_or(false);
        if tokenizer.vocab_size() > text.vocab_size {
            return Err(model_err(
                dir,
                format!("the tokenizer has {} tokens but the text encoder only {}: they do not belong together", tokenizer.vocab_size(), text.vocab_size),
            ));
        }
        Ok(DiffusersModel {
            dir: dir.to_path_buf(),
            base,
            latent_channels: vae.latent_channels,
            scaling_factor: vae_json["scaling_factor"].as_f64().unwrap_or(0.18215),
            unet,
            vae,
            text,
            schedule,
            tokenizer,
            text2,
            force_zeros_for_empty_prompt,
        })
    }

    /// The VAE's architecture, from its config.json.
    pub fn vae_config(&self) -> &VaeConfig {
        &self.vae
    }

    /// The components a generation loads, each a cache entry.
    pub fn components(&self) -> Vec<&'static str> {
        let mut c = vec!["text_encoder", "unet", "vae"];
        if self.text2.is_some() {
            c.insert(1, "text_encoder_2");
        }
        c
    }

    /// Cache key of a component.
    pub fn component(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    pub fn tokenizer(&self) -> &tokenizer::ClipTokenizer {
        &self.tokenizer
    }

    pub fn schedule(&self) -> &ScheduleConfig {
        &self.schedule
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub scheduler: SchedulerKind,
    pub n: usize,
    /// Initial latents `[n or 1, C, h/8, w/8]` instead of seeded noise.
    pub latents: Option<Tensor>,
    pub clip_skip: usize,
    /// LoRA-family adapters (cache keys: safetensors paths) and their weights.
    pub loras: Vec<(String, f64)>,
    /// Textual inversion embeddings the prompts may use as `<name>`: (name, file).
    pub embeddings: Vec<(String, std::path::PathBuf)>,
    /// Axes along which the image tiles seamlessly.
    pub seamless: Seamless,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 25,
            guidance_scale: 7.5,
            width: 512,
            height: 512,
            seed: 0,
            scheduler: SchedulerKind::Ddim,
            n: 1,
            latents: None,
            clip_skip: 0,
            loras: Vec::new(),
            embeddings: Vec::new(),
            seamless: Seamless::default(),
        }
    }
}

/// Progress callback: (image index, step done, steps); returns false to cancel.
pub type Progress<'a> = &'a (dyn Fn(usize, usize, usize) -> bool + Sync);

fn check_params(p: &GenerateParams) -> Result<(), PipelineError> {
    if !p.width.is_multiple_of(8) || !p.height.is_multiple_of(8) || p.width == 0 || p.height == 0 {
        return Err(PipelineError::Invalid(format!(
            "size {}x{} must be a positive multiple of 8",
            p.width, p.height
        )));
    }
    if p.steps == 0 || p.n == 0 {
        return Err(PipelineError::Invalid(
            "steps and n must be at least 1".into(),
        ));
    }
    Ok(())
}

/// The adapters of a request, locked in the cache's device tier for its duration.
fn adapters(
    cache: &ModelCache,
    p: &GenerateParams,
) -> Result<Vec<(lora::Adapter, f64)>, PipelineError> {
    p.loras
        .iter()
        .map(|(key, weight)| {
            let g = cache.get_device(key)?;
            let a = lora::Adapter::from_tensors(&g.tensors)
                .map_err(|e| PipelineError::Invalid(format!("{key}: {e}")))?;
            Ok((a, *weight))
        })
        .collect()
}

/// A component's weights with the request's adapters applied. The patched
/// copies live only for this request; their bytes are reserved in the device
/// tier first (released when the returned guard drops), so adapters cannot push
/// the device past its budget.
fn adapted(
    cache: &ModelCache,
    component: &crate::cache::ModelGuard<crate::cache::DeviceModel>,
    prefix: &str,
    adapters: &[(&lora::Adapter, f64)],
) -> Result<
    (
        candle_nn::VarBuilder<'static>,
        Option<crate::cache::Reservation>,
    ),
    PipelineError,
> {
    let bytes = lora::patch_bytes(&component.tensors, prefix, adapters);
    let held = if bytes > 0 {
        Some(cache.reserve_device(
            &format!("{} with adapters", component.key()),
            component.slot(),
            bytes,
        )?)
    } else {
        None
    };
    let vb = lora::var_builder(
        &component.tensors,
        component.dtype,
        &component.device,
        prefix,
        adapters,
    )
    .map_err(lora_err)?;
    Ok((vb, held))
}

fn lora_err(e: lora::LoraError) -> PipelineError {
    PipelineError::Invalid(e.to_string())
}

/// What the UNet is conditioned on: the context `[2, tokens, dim]` (negative
/// first; `[1, …]` without guidance) and, for SDXL, the pooled text embeddings
/// `[2 or 1, width]`.
pub struct Conditioning {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

/// Encodes prompt and negative prompt into the UNet context `[2, tokens, dim]`
/// (negative first), or `[1, …]` without guidance.
pub fn encode_text(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
) -> Result<Tensor, PipelineError> {
    Ok(encode(cache, model, p)?.context)
}

/// SDXL's conditioning: each prompt through both text encoders, their
/// penultimate hidden states side by side, and the second's projected pooled
/// output (diffusers' `encode_prompt`). An empty negative prompt is zeros when
/// the pipeline says `force_zeros_for_empty_prompt`.
fn encode_sdxl(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
    (text2, tokenizer2): &(ClipConfig, tokenizer::ClipTokenizer),
) -> Result<Conditioning, PipelineError> {
    if p.embeddings.iter().any(|(name, _)| {
        let t = format!("<{name}>");
        p.prompt.contains(&t) || p.negative_prompt.contains(&t)
    }) {
        return Err(PipelineError::Invalid(
            "textual inversion embeddings are not supported with SDXL models yet".into(),
        ));
    }
    let adapters = adapters(cache, p)?;
    let refs: Vec<(&lora::Adapter, f64)> = adapters.iter().map(|(a, w)| (a, *w)).collect();
    let te1 = cache.get_device(&model.component("text_encoder"))?;
    let te2 = cache.get_device(&model.component("text_encoder_2"))?;
    let (vb1, _held1) = adapted(cache, &te1, "lora_te1_", &refs)?;
    let (vb2, _held2) = adapted(cache, &te2, "lora_te2_", &refs)?;
    let enc1 = ClipTextModel::new(vb1, &model.text)?;
    let enc2 = ClipTextModel::new(vb2, text2)?;
    let device = &te1.device;
    let encode = |text: &str| -> Result<(Tensor, Tensor), PipelineError> {
        let ids = |t: &tokenizer::ClipTokenizer| -> Result<Tensor, PipelineError> {
            let ids = t.encode(text).map_err(PipelineError::Invalid)?;
            Ok(Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?)
        };
        let a = enc1.forward(&ids(&model.tokenizer)?, p.clip_skip)?;
        let b = enc2.forward(&ids(tokenizer2)?, p.clip_skip)?;
        let context = Tensor::cat(
            &[&a.penultimate, &b.penultimate.to_device(device)?],
            candle_core::D::Minus1,
        )?;
        Ok((context, b.pooled))
    };
    let (cond, pooled) = encode(&p.prompt)?;
    if p.guidance_scale <= 1.0 {
        return Ok(Conditioning {
            context: cond,
            pooled: Some(pooled),
        });
    }
    let (uncond, uncond_pooled) =
        if p.negative_prompt.is_empty() && model.force_zeros_for_empty_prompt {
            (cond.zeros_like()?, pooled.zeros_like()?)
        } else {
            encode(&p.negative_prompt)?
        };
    Ok(Conditioning {
        context: Tensor::cat(&[uncond, cond], 0)?,
        pooled: Some(Tensor::cat(&[uncond_pooled, pooled], 0)?),
    })
}

/// Encodes prompt and negative prompt (see [`Conditioning`]).
pub fn encode(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
) -> Result<Conditioning, PipelineError> {
    if let Some(text2) = &model.text2 {
        return encode_sdxl(cache, model, p, text2);
    }
    let context = encode_sd(cache, model, p)?;
    Ok(Conditioning {
        context,
        pooled: None,
    })
}

fn encode_sd(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
) -> Result<Tensor, PipelineError> {
    let te = cache.get_device(&model.component("text_encoder"))?;
    let adapters = adapters(cache, p)?;
    let refs: Vec<(&lora::Adapter, f64)> = adapters.iter().map(|(a, w)| (a, *w)).collect();
    let (vb, _held) = adapted(cache, &te, "lora_te_", &refs)?;
    let encoder = ClipTextModel::new(vb, &model.text)?;
    let device = &te.device;
    // Only the embeddings a prompt names are read.
    let used: Vec<&(String, std::path::PathBuf)> = p
        .embeddings
        .iter()
        .filter(|(name, _)| {
            let t = format!("<{name}>");
            p.prompt.contains(&t) || p.negative_prompt.contains(&t)
        })
        .collect();
    let tis = used
        .iter()
        .map(|(name, path)| embedding::load(name, path))
        .collect::<Result<Vec<_>, _>>()
        .map_err(PipelineError::Invalid)?;
    let width = model.text.hidden_size;
    if let Some(ti) = tis.iter().find(|t| t.vectors.dims().get(1) != Some(&width)) {
        return Err(PipelineError::Invalid(format!(
            "embedding {:?} was trained for token dimension {} but the model has {width}",
            ti.name,
            ti.vectors.dims().get(1).copied().unwrap_or(0)
        )));
    }
    let names: Vec<&str> = tis.iter().map(|t| t.name.as_str()).collect();
    let sizes: Vec<usize> = tis.iter().map(|t| t.vectors.dims()[0]).collect();
    let encode = |text: &str| -> Result<Tensor, PipelineError> {
        let parts = embedding::split(text, &names);
        if !parts
            .iter()
            .any(|p| matches!(p, embedding::Part::Embedding(_)))
        {
            let ids = model
                .tokenizer
                .encode(text)
                .map_err(PipelineError::Invalid)?;
            let ids = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
            return Ok(encoder.forward(&ids, p.clip_skip)?.hidden);
        }
        let (ids, slots) = model
            .tokenizer
            .encode_parts(&parts, &sizes)
            .map_err(PipelineError::Invalid)?;
        let rows = slots
            .iter()
            .map(|(pos, ti, k)| Ok((*pos, tis[*ti].vectors.get(*k)?)))
            .collect::<Result<Vec<_>, candle_core::Error>>()?;
        let ids = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
        Ok(encoder.forward_with(&ids, &rows, p.clip_skip)?.hidden)
    };
    let cond = encode(&p.prompt)?;
    if p.guidance_scale <= 1.0 {
        return Ok(cond);
    }
    let uncond = encode(&p.negative_prompt)?;
    Ok(Tensor::cat(&[uncond, cond], 0)?)
}

/// Runs txt2img and returns `n` images.
pub fn generate(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
    progress: Progress,
) -> Result<Vec<Image>, PipelineError> {
    check_params(p)?;
    let Conditioning { context, pooled } = encode(cache, model, p)?;
    let guided = context.dim(0)? == 2;
    // SDXL's time ids: original size, crop top-left (0, 0), target size.
    let added = match pooled {
        Some(pooled) => {
            let (h, w) = (p.height as f32, p.width as f32);
            let ids = Tensor::new(&[[h, w, 0.0, 0.0, h, w]], &Device::Cpu)?;
            let ids = ids.repeat((pooled.dim(0)?, 1))?;
            Some((pooled, ids))
        }
        None => None,
    };
    let unet_guard = cache.get_device(&model.component("unet"))?;
    let device: Device = unet_guard.device.clone();
    let dtype = unet_guard.dtype;
    let adapters = adapters(cache, p)?;
    let refs: Vec<(&lora::Adapter, f64)> = adapters.iter().map(|(a, w)| (a, *w)).collect();
    let (vb, _held) = adapted(cache, &unet_guard, "lora_unet_", &refs)?;
    let unet = with_seamless(Net::Unet, p.seamless, || {
        unet_2d::UNet2DConditionModel::new(vb, 4, 4, false, model.unet.clone())
    })?;
    let context = context.to_device(&device)?.to_dtype(dtype)?;
    let added = match added {
        Some((pooled, ids)) => Some((
            pooled.to_device(&device)?.to_dtype(dtype)?,
            ids.to_device(&device)?.to_dtype(dtype)?,
        )),
        None => None,
    };
    let (lh, lw) = (p.height / 8, p.width / 8);
    let mut latents_out = Vec::with_capacity(p.n);
    for i in 0..p.n {
        let mut sched = Scheduler::new(p.scheduler, model.schedule.clone(), p.steps);
        let mut rng = NormalRng::new(p.seed.wrapping_add(i as u64));
        let shape = [1, model.latent_channels, lh, lw];
        let mut x = match &p.latents {
            Some(l) => {
                let l = if l.dim(0)? > i {
                    l.narrow(0, i, 1)?
                } else {
                    l.narrow(0, 0, 1)?
                };
                if l.dims() != shape {
                    return Err(PipelineError::Invalid(format!(
                        "latents have shape {:?}, expected {shape:?}",
                        l.dims()
                    )));
                }
                l.to_device(&device)?.to_dtype(DType::F32)?
            }
            None => rng.tensor(&shape, &device)?,
        };
        x = (x * sched.init_noise_sigma())?;
        let timesteps = sched.timesteps().to_vec();
        for (s, &t) in timesteps.iter().enumerate() {
            let inp = sched.scale_model_input(&x, s)?;
            let inp = if guided {
                Tensor::cat(&[&inp, &inp], 0)?
            } else {
                inp
            };
            let noise = match &added {
                Some((pooled, ids)) => {
                    unet.forward_with_added(&inp.to_dtype(dtype)?, t as f64, &context, pooled, ids)?
                }
                None => unet.forward(&inp.to_dtype(dtype)?, t as f64, &context)?,
            }
            .to_dtype(DType::F32)?;
            let noise = if guided {
                let (u, c) = (noise.narrow(0, 0, 1)?, noise.narrow(0, 1, 1)?);
                (&u + ((c - &u)? * p.guidance_scale)?)?
            } else {
                noise
            };
            x = sched.step(&noise, s, &x, &mut rng)?;
            if !progress(i, s + 1, timesteps.len()) {
                return Err(PipelineError::Cancelled);
            }
        }
        latents_out.push(x);
    }
    drop(unet);
    drop(unet_guard);
    let vae_guard = cache.get_device(&model.component("vae"))?;
    let decoder = with_seamless(Net::Vae, p.seamless, || {
        VaeDecoder::new(vae_guard.var_builder(), 3, &model.vae)
    })?;
    latents_out
        .into_iter()
        .map(|l| {
            let img = decoder
                .decode(
                    &(l.to_device(&vae_guard.device)? / model.scaling_factor)?
                        .to_dtype(vae_guard.dtype)?,
                )?
                .to_dtype(DType::F32)?;
            let img = ((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
            let img = img.squeeze(0)?.permute((1, 2, 0))?.contiguous()?;
            let (h, w, _) = img.dims3()?;
            Ok(Image {
                width: w,
                height: h,
                data: img.flatten_all()?.to_vec1::<f32>()?,
            })
        })
        .collect()
}
