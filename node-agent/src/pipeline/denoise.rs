//! The denoising loop's pieces: one UNet locked with its conditioning
//! ([`Denoiser`]), how an inpainting edit enters each evaluation
//! ([`Inpaint`]), and where a base model hands its latents to an SDXL
//! refiner ([`cutoff`], [`base_end`], [`refiner_start`]).

use super::adapters::Adapters;
use super::conditioning::{image_tokens, Controls, Target};
use super::control::Control;
use super::model::DiffusersModel;
use super::nets::attention::IpAttention;
use super::nets::unet_2d::{Inputs, UNet2DConditionModel, UNet2DConditionModelConfig};
use super::scheduler::{ScheduleConfig, Scheduler};
use super::text;
use super::{GenerateParams, PipelineError};
use crate::cache::{DeviceModel, ModelCache, ModelGuard, Reservation};
use candle_core::{DType, Device, Tensor};

/// How an inpainting edit enters the denoising loop of one image.
pub(super) enum Inpaint {
    /// An inpainting UNet takes the latent mask and the masked image's
    /// latents beside the latents, each doubled for guidance.
    UnetInputs(Tensor, Tensor),
    /// A text-to-image UNet: after every step the kept part (`keep` =
    /// 1 − `mask`) is blended back to the image's latents at the next
    /// step's noise level.
    Blend {
        image: Tensor,
        mask: Tensor,
        keep: Tensor,
    },
}

/// A model's UNet, locked in the device tier with the request's adapters
/// applied, and a batch's conditioning on its device: everything one guided
/// noise prediction of the batch needs.
pub(super) struct Denoiser {
    unet: UNet2DConditionModel,
    /// The text conditioning (what ControlNets attend to).
    context: Tensor,
    /// The UNet's: the text, then an IP-Adapter's image tokens.
    unet_context: Tensor,
    /// SDXL's pooled text embeddings and time ids.
    added: Option<(Tensor, Tensor)>,
    pub device: Device,
    pub dtype: DType,
    latent_channels: usize,
    /// Whether the conditioning has a negative row (classifier-free guidance).
    pub guided: bool,
    guidance_scale: f64,
    controls: Controls,
    _patched: Option<Reservation>,
    _ip: Option<ModelGuard<DeviceModel>>,
    _unet: ModelGuard<DeviceModel>,
}

impl Denoiser {
    /// Encodes each request's prompts with `model`'s text encoder(s), one
    /// conditioning row per image (`batch`: the requests and how many of
    /// their images run), then locks the UNet. The settings are the first
    /// request's: a batch shares them.
    pub fn new(
        cache: &ModelCache,
        model: &DiffusersModel,
        batch: &[(&GenerateParams, usize)],
        adapters: &Adapters,
    ) -> Result<Self, PipelineError> {
        let p = batch
            .first()
            .map(|(p, _)| *p)
            .ok_or_else(|| candle_core::Error::Msg("an empty batch".into()))?;
        let mut contexts = Vec::with_capacity(batch.len());
        let mut pooled = Vec::with_capacity(batch.len());
        for (q, images) in batch {
            let c = text::encode_with(cache, model, q, adapters)?;
            contexts.push((c.context, *images));
            pooled.extend(c.pooled.map(|t| (t, *images)));
        }
        let guided = contexts[0].0.dim(0)? == 2;
        let unet_guard = super::on_device(cache, &model.component("unet"), p)?;
        let device = unet_guard.device.clone();
        let dtype = unet_guard.dtype;
        let (vb, patched) = adapters.weights(cache, &unet_guard, "lora_unet_")?;
        let mut unet = UNet2DConditionModel::new(
            vb,
            model.unet_in_channels,
            model.vae.latent_channels,
            false,
            UNet2DConditionModelConfig {
                seamless: p.seamless,
                ..model.unet.clone()
            },
        )?;
        let on_device = |t: &Tensor| t.to_device(&device)?.to_dtype(dtype);
        let images: usize = batch.iter().map(|(_, n)| n).sum();
        let added = if pooled.is_empty() {
            None
        } else {
            let ids = time_ids(model, p, if guided { 2 } else { 1 })?;
            let ids = by_row(&[(ids, images)])?;
            Some((on_device(&by_row(&pooled)?)?, on_device(&ids)?))
        };
        let context = on_device(&by_row(&contexts)?)?;
        let (unet_context, ip_guard) = match &p.ip_adapter {
            Some(ip) => {
                let (tokens, guard) = image_tokens(cache, p, ip, guided)?;
                let tokens = on_device(&by_row(&[(tokens, images)])?)?;
                for (k, attn) in unet.cross_attentions_mut().into_iter().enumerate() {
                    let inner = attn.inner_dim();
                    attn.set_ip(Some(IpAttention::new(
                        guard.var_builder().pp(format!("ip_adapter.{}", 2 * k + 1)),
                        ip.model.cross_dim,
                        inner,
                        ip.weight,
                        ip.model.projection.tokens(),
                    )?));
                }
                (Tensor::cat(&[&context, &tokens], 1)?, Some(guard))
            }
            None => (context.clone(), None),
        };
        Ok(Denoiser {
            unet,
            context,
            unet_context,
            added,
            device,
            dtype,
            latent_channels: model.vae.latent_channels,
            guided,
            guidance_scale: p.guidance_scale,
            controls: Controls::default(),
            _patched: patched,
            _ip: ip_guard,
            _unet: unet_guard,
        })
    }

    /// Locks `controls` beside the UNet for the batch, whose denoising
    /// starts at evaluation `first`.
    pub fn control(
        mut self,
        cache: &ModelCache,
        p: &GenerateParams,
        controls: &[Control],
        images: usize,
        first: usize,
    ) -> Result<Self, PipelineError> {
        let target = Target {
            device: &self.device,
            dtype: self.dtype,
            rows: if self.guided { 2 } else { 1 },
            images,
            latent_channels: self.latent_channels,
            context: &self.context,
            added: self.added.as_ref(),
        };
        self.controls = Controls::lock(cache, p, controls, &target, first)?;
        Ok(self)
    }

    /// The guided noise predictions (f32) for a batch of latents `x` at
    /// evaluation `s` of `sched`.
    pub fn predict(
        &self,
        sched: &Scheduler,
        x: &Tensor,
        s: usize,
        inpaint: Option<&Inpaint>,
    ) -> candle_core::Result<Tensor> {
        let inp = sched.scale_model_input(x, s)?;
        let inp = if self.guided {
            Tensor::cat(&[&inp, &inp], 0)?
        } else {
            inp
        };
        let inp = match inpaint {
            Some(Inpaint::UnetInputs(mask, masked)) => {
                Tensor::cat(&[&inp.to_dtype(self.dtype)?, mask, masked], 1)?
            }
            _ => inp.to_dtype(self.dtype)?,
        };
        let t = sched.timesteps()[s];
        let (residuals, features) = self.controls.at(sched, &inp, s, &self.device, self.dtype)?;
        let noise_pred = self
            .unet
            .forward_with(
                &inp,
                t,
                &self.unet_context,
                Inputs {
                    added: self.added.as_ref().map(|(a, b)| (a, b)),
                    down: residuals.as_ref().map(|r| r.down.as_slice()),
                    mid: residuals.as_ref().map(|r| &r.mid),
                    intrablock: features.as_deref(),
                },
            )?
            .to_dtype(DType::F32)?;
        if !self.guided {
            return Ok(noise_pred);
        }
        let b = x.dim(0)?;
        let (u, c) = (noise_pred.narrow(0, 0, b)?, noise_pred.narrow(0, b, b)?);
        &u + ((c - &u)? * self.guidance_scale)?
    }
}

/// Conditioning rows batched the way the guided UNet input is (every
/// image's first row, then every image's second): each tensor's rows, each
/// repeated for its images.
fn by_row(parts: &[(Tensor, usize)]) -> candle_core::Result<Tensor> {
    let rows = parts.first().map_or(Ok(0), |(t, _)| t.dim(0))?;
    let mut out = Vec::new();
    for r in 0..rows {
        for (t, images) in parts {
            let row = t.narrow(0, r, 1)?;
            out.extend(std::iter::repeat_n(row, *images));
        }
    }
    Tensor::cat(&out, 0)
}

/// SDXL's time ids, one row per conditioning row: the original size, the
/// crop's top-left corner (0, 0), then the target size; a refiner instead
/// ends with the aesthetic score, 2.5 for the negative prompt and 6 for the
/// prompt (diffusers' defaults).
fn time_ids(
    model: &DiffusersModel,
    p: &GenerateParams,
    rows: usize,
) -> candle_core::Result<Tensor> {
    let (h, w) = (p.height as f32, p.width as f32);
    let ids: Vec<f32> = (0..rows)
        .flat_map(|row| {
            let mut ids = vec![h, w, 0.0, 0.0];
            match (model.refiner, rows == 2 && row == 0) {
                (true, true) => ids.push(2.5),
                (true, false) => ids.push(6.0),
                (false, _) => ids.extend([h, w]),
            }
            ids
        })
        .collect();
    let width = ids.len() / rows.max(1);
    Tensor::from_vec(ids, (rows, width), &Device::Cpu)
}

/// The timestep where a base model hands over to the refiner,
/// `round(T − switch·T)` of the `T` training timesteps (diffusers'
/// `discrete_timestep_cutoff`).
pub(super) fn cutoff(schedule: &ScheduleConfig, switch: f64) -> f64 {
    let t = schedule.num_train_timesteps as f64;
    (t - switch * t).round_ties_even()
}

/// How many of its evaluations the base runs: those at or above the cutoff.
pub(super) fn base_end(sched: &Scheduler, cutoff: f64) -> usize {
    sched.timesteps().iter().filter(|&&t| t >= cutoff).count()
}

/// The evaluation the refiner starts at: the first below the cutoff. A
/// second-order scheduler evaluates every timestep but the first twice, so
/// an even count would start halfway through a step: it starts one earlier.
pub(super) fn refiner_start(sched: &Scheduler, cutoff: f64) -> usize {
    let ts = sched.timesteps();
    let mut n = ts.iter().filter(|&&t| t < cutoff).count();
    if sched.order() == 2 && n.is_multiple_of(2) {
        n += 1;
    }
    ts.len().saturating_sub(n)
}
