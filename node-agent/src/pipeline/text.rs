//! Prompts to the UNet's conditioning: tokenized, with textual-inversion
//! vectors spliced in, through the text encoder(s) with the request's adapters.

use super::adapters::Adapters;
use super::embedding;
use super::model::{DiffusersModel, TextEncoder};
use super::nets::clip::{ClipTextModel, TextOutput};
use super::{GenerateParams, PipelineError, RequestError};
use crate::cache::ModelCache;
use candle_core::{Device, Tensor};

/// What the UNet is conditioned on: the context `[2, tokens, dim]` (negative
/// first; `[1, …]` without guidance) and, for SDXL, the pooled text embeddings
/// `[2 or 1, width]`.
pub struct Conditioning {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

/// Encodes prompt and negative prompt (see [`Conditioning`]).
pub fn encode(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
) -> Result<Conditioning, PipelineError> {
    super::check_params(p)?;
    encode_with(
        cache,
        model,
        p,
        &Adapters::lock(cache, model, &p.loras, p.dtype)?,
    )
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

/// [`encode`] with the request's adapters already locked.
pub(super) fn encode_with(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
    adapters: &Adapters,
) -> Result<Conditioning, PipelineError> {
    if model.text2.is_some() || model.refiner {
        return encode_sdxl(cache, model, p, adapters);
    }
    Ok(Conditioning {
        context: encode_sd(cache, model, p, adapters)?,
        pooled: None,
    })
}

/// Whether a prompt of the request names the embedding `<name>`.
pub(super) fn named(p: &GenerateParams, name: &str) -> bool {
    let t = format!("<{name}>");
    p.prompt.contains(&t) || p.negative_prompt.contains(&t)
}

/// Token ids of `text` as a `[1, tokens]` tensor.
fn token_ids(encoder: &TextEncoder, text: &str, device: &Device) -> Result<Tensor, PipelineError> {
    let ids = encoder.tokenizer.encode(text).map_err(RequestError::from)?;
    Ok(Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?)
}

/// The embeddings the prompts name, read, with each encoder's vectors
/// checked against that encoder's width.
fn embeddings(
    model: &DiffusersModel,
    p: &GenerateParams,
) -> Result<Vec<embedding::TextualInversion>, PipelineError> {
    let tis = p
        .embeddings
        .iter()
        .filter(|(name, _)| named(p, name))
        .map(|(name, path)| embedding::load(name, path))
        .collect::<Result<Vec<_>, _>>()
        .map_err(RequestError::from)?;
    let width = |t: &Tensor| t.dims().get(1).copied().unwrap_or(0);
    for ti in &tis {
        let name = ti.name.clone();
        let pairs = match (&model.text2, &ti.vectors_2, model.refiner) {
            (None, None, false) => vec![(&ti.vectors, &model.text)],
            (Some(text2), Some(v2), _) => vec![(&ti.vectors, &model.text), (v2, text2)],
            // A refiner's one encoder is SDXL's second.
            (None, Some(v2), true) => vec![(v2, &model.text)],
            (None, Some(_), false) => {
                return Err(RequestError::from(embedding::EmbeddingError::ForSdxl { name }).into())
            }
            (Some(_), None, _) | (None, None, true) => {
                return Err(
                    RequestError::from(embedding::EmbeddingError::NotForSdxl { name }).into(),
                )
            }
        };
        for (v, encoder) in pairs {
            if width(v) != encoder.config.hidden_size {
                return Err(RequestError::EmbeddingWidth {
                    name: ti.name.clone(),
                    trained: width(v),
                    model: encoder.config.hidden_size,
                }
                .into());
            }
        }
    }
    Ok(tis)
}

/// One prompt through one text encoder, each `<name>` of `tis` standing for
/// its vectors (`vectors` of the pair for this encoder).
fn run_encoder(
    encoder: &ClipTextModel,
    te: &TextEncoder,
    text: &str,
    tis: &[(&str, &Tensor)],
    device: &Device,
    clip_skip: usize,
) -> Result<TextOutput, PipelineError> {
    let names: Vec<&str> = tis.iter().map(|(n, _)| *n).collect();
    let parts = embedding::split(text, &names);
    if !parts
        .iter()
        .any(|p| matches!(p, embedding::Part::Embedding(_)))
    {
        return Ok(encoder.forward(&token_ids(te, text, device)?, clip_skip)?);
    }
    let sizes: Vec<usize> = tis.iter().map(|(_, v)| v.dims()[0]).collect();
    let (ids, slots) = te
        .tokenizer
        .encode_parts(&parts, &sizes)
        .map_err(RequestError::from)?;
    let rows = slots
        .iter()
        .map(|(pos, ti, k)| Ok((*pos, tis[*ti].1.get(*k)?)))
        .collect::<Result<Vec<_>, candle_core::Error>>()?;
    let ids = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
    Ok(encoder.forward_with(&ids, &rows, clip_skip)?)
}

/// SDXL's conditioning: each prompt through both text encoders, their
/// penultimate hidden states side by side, and the second's projected pooled
/// output (diffusers' `encode_prompt`). A refiner has only the second. An
/// empty negative prompt is zeros when the pipeline says
/// `force_zeros_for_empty_prompt`.
fn encode_sdxl(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
    adapters: &Adapters,
) -> Result<Conditioning, PipelineError> {
    let tis = embeddings(model, p)?;
    let first: Vec<(&str, &Tensor)> = tis.iter().map(|t| (t.name.as_str(), &t.vectors)).collect();
    let second: Vec<(&str, &Tensor)> = tis
        .iter()
        .filter_map(|t| Some((t.name.as_str(), t.vectors_2.as_ref()?)))
        .collect();
    // (component, encoder, adapter prefix, embedding vectors), in order.
    let encoders = match &model.text2 {
        Some(text2) => vec![
            ("text_encoder", &model.text, "lora_te1_", &first),
            ("text_encoder_2", text2, "lora_te2_", &second),
        ],
        None => vec![("text_encoder_2", &model.text, "lora_te2_", &second)],
    };
    let mut guards = Vec::with_capacity(encoders.len());
    let mut loaded = Vec::with_capacity(encoders.len());
    for (component, config, prefix, tis) in encoders {
        let guard = super::on_device(cache, &model.component(component), p)?;
        let (vb, held) = adapters.weights(cache, &guard, prefix)?;
        let encoder = ClipTextModel::new(vb, &config.config)?;
        loaded.push((encoder, config, tis, guard.device.clone()));
        guards.push((guard, held));
    }
    let device = loaded[0].3.clone();
    let encode = |text: &str| -> Result<(Tensor, Tensor), PipelineError> {
        let mut states = Vec::with_capacity(loaded.len());
        let mut pooled = None;
        for (encoder, config, tis, dev) in &loaded {
            let out = run_encoder(encoder, config, text, tis, dev, p.clip_skip)?;
            states.push(out.penultimate.to_device(&device)?);
            pooled = Some(out.pooled);
        }
        let pooled = pooled.ok_or_else(|| candle_core::Error::Msg("no text encoder".into()))?;
        Ok((Tensor::cat(&states, candle_core::D::Minus1)?, pooled))
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

fn encode_sd(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
    adapters: &Adapters,
) -> Result<Tensor, PipelineError> {
    let te = super::on_device(cache, &model.component("text_encoder"), p)?;
    let (vb, _held) = adapters.weights(cache, &te, "lora_te_")?;
    let encoder = ClipTextModel::new(vb, &model.text.config)?;
    let tis = embeddings(model, p)?;
    let tis: Vec<(&str, &Tensor)> = tis.iter().map(|t| (t.name.as_str(), &t.vectors)).collect();
    let encode = |text: &str| -> Result<Tensor, PipelineError> {
        Ok(run_encoder(&encoder, &model.text, text, &tis, &te.device, p.clip_skip)?.hidden)
    };
    let cond = encode(&p.prompt)?;
    if p.guidance_scale <= 1.0 {
        return Ok(cond);
    }
    let uncond = encode(&p.negative_prompt)?;
    Ok(Tensor::cat(&[uncond, cond], 0)?)
}
