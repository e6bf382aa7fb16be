//! The denoising loop's pieces: one UNet locked with its conditioning
//! ([`Denoiser`]), how an inpainting edit enters each evaluation
//! ([`Inpaint`]), and where a base model hands its latents to an SDXL
//! refiner ([`cutoff`], [`base_end`], [`refiner_start`]).

use super::adapters::Adapters;
use super::control::{self, Control, ControlKind};
use super::ip_adapter::IpAdapter;
use super::model::DiffusersModel;
use super::nets::attention::IpAttention;
use super::nets::clip_vision::ClipVisionModel;
use super::nets::controlnet::{ControlNet, Residuals};
use super::nets::t2i_adapter::T2iAdapter;
use super::nets::unet_2d::Inputs;
use super::nets::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use super::scheduler::{ScheduleConfig, Scheduler};
use super::text;
use super::{GenerateParams, PipelineError};
use crate::cache::{DeviceModel, ModelCache, ModelGuard, Reservation};
use candle_core::{DType, Device, Tensor};
use candle_nn::Module;

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
    unet_in_channels: usize,
    /// Whether the conditioning has a negative row (classifier-free guidance).
    pub guided: bool,
    guidance_scale: f64,
    controls: Vec<Controlling>,
    t2i: Vec<Adapting>,
    /// The first evaluation denoised: ControlNets' spans are shares of the
    /// evaluations from it to the end of the schedule.
    first: usize,
    _patched: Option<Reservation>,
    _ip: Option<ModelGuard<DeviceModel>>,
    _unet: ModelGuard<DeviceModel>,
}

/// A T2I-Adapter's features for the batch (times its weight, on the
/// UNet's device), computed once, and when they act.
struct Adapting {
    features: Vec<Tensor>,
    start: f64,
    end: f64,
}

/// A ControlNet locked in the device tier with the batch's control image
/// and conditioning on its device.
struct Controlling {
    net: ControlNet,
    /// The control image embedded (once), `[rows × images, C, h, w]`.
    image: Tensor,
    context: Tensor,
    added: Option<(Tensor, Tensor)>,
    weight: f64,
    start: f64,
    end: f64,
    device: Device,
    dtype: DType,
    _net: ModelGuard<DeviceModel>,
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
                        ip.model.tokens,
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
            unet_in_channels: model.vae.latent_channels,
            guided,
            guidance_scale: p.guidance_scale,
            controls: Vec::new(),
            t2i: Vec::new(),
            first: 0,
            _patched: patched,
            _ip: ip_guard,
            _unet: unet_guard,
        })
    }

    /// Locks `controls` beside the UNet for a batch of `images` whose
    /// denoising starts at evaluation `first`.
    pub fn control(
        mut self,
        cache: &ModelCache,
        p: &GenerateParams,
        controls: &[Control],
        images: usize,
        first: usize,
    ) -> Result<Self, PipelineError> {
        self.first = first;
        let rows = if self.guided { 2 } else { 1 };
        for c in controls {
            let guard = super::on_device(cache, &c.model.key(), p)?;
            let (device, dtype) = (guard.device.clone(), guard.dtype);
            let on = |t: &Tensor| t.to_device(&device)?.to_dtype(dtype);
            let image = on(&super::edit::control_tensor(&c.image, &Device::Cpu)?)?;
            let config = match &c.model.kind {
                ControlKind::ControlNet(config) => config,
                ControlKind::T2iAdapter(config) => {
                    // Run once; the adapter is not needed after.
                    let net = T2iAdapter::new(guard.var_builder(), config)?;
                    let features = net
                        .forward(&image)?
                        .iter()
                        .map(|f| {
                            (f * c.weight)?
                                .to_device(&self.device)?
                                .to_dtype(self.dtype)?
                                .repeat((rows * images, 1, 1, 1))
                        })
                        .collect::<candle_core::Result<_>>()?;
                    self.t2i.push(Adapting {
                        features,
                        start: c.start,
                        end: c.end,
                    });
                    continue;
                }
            };
            let net = ControlNet::new(
                guard.var_builder(),
                self.unet_in_channels,
                super::nets::controlnet::ControlNetConfig {
                    unet: super::nets::unet_2d::UNet2DConditionModelConfig {
                        seamless: p.seamless,
                        ..config.unet.clone()
                    },
                    ..config.clone()
                },
            )?;
            let added = match &self.added {
                Some((pooled, ids)) => Some((on(pooled)?, on(ids)?)),
                None => None,
            };
            let embedded = net.embed_control(&image)?;
            self.controls.push(Controlling {
                net,
                image: embedded.repeat((rows * images, 1, 1, 1))?,
                context: on(&self.context)?,
                added,
                weight: c.weight,
                start: c.start,
                end: c.end,
                device,
                dtype,
                _net: guard,
            });
        }
        Ok(self)
    }

    /// The summed features of the T2I-Adapters acting at evaluation `s`.
    fn features(&self, sched: &Scheduler, s: usize) -> candle_core::Result<Option<Vec<Tensor>>> {
        let len = sched.timesteps().len().saturating_sub(self.first);
        let i = s.saturating_sub(self.first);
        let mut sum: Option<Vec<Tensor>> = None;
        for a in &self.t2i {
            if !control::acts(i, len, a.start, a.end) {
                continue;
            }
            sum = Some(match sum {
                None => a.features.clone(),
                Some(acc) => acc
                    .iter()
                    .zip(&a.features)
                    .map(|(x, y)| x + y)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        Ok(sum)
    }

    /// The summed residuals of the ControlNets acting at evaluation `s`.
    fn residuals(
        &self,
        sched: &Scheduler,
        inp: &Tensor,
        s: usize,
    ) -> candle_core::Result<Option<Residuals>> {
        let len = sched.timesteps().len().saturating_sub(self.first);
        let i = s.saturating_sub(self.first);
        let t = sched.timesteps()[s];
        let mut sum: Option<Residuals> = None;
        for c in &self.controls {
            if c.weight == 0.0 || !control::acts(i, len, c.start, c.end) {
                continue;
            }
            let added = c.added.as_ref().map(|(a, b)| (a, b));
            let x = inp.to_device(&c.device)?.to_dtype(c.dtype)?;
            let r = c
                .net
                .forward(&x, t, &c.context, &c.image, c.weight, added)?;
            let back = |t: &Tensor| t.to_device(&self.device)?.to_dtype(self.dtype);
            let r = Residuals {
                down: r
                    .down
                    .iter()
                    .map(back)
                    .collect::<candle_core::Result<_>>()?,
                mid: back(&r.mid)?,
            };
            sum = Some(match sum {
                None => r,
                Some(acc) => acc.plus(r)?,
            });
        }
        Ok(sum)
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
        let residuals = self.residuals(sched, &inp, s)?;
        let features = self.features(sched, s)?;
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

/// An IP-Adapter's image tokens `[rows, tokens, width]` (with guidance
/// first those of a zero image embedding, as diffusers conditions the
/// unguided row), and its weights locked for the UNet's layers.
fn image_tokens(
    cache: &ModelCache,
    p: &GenerateParams,
    ip: &IpAdapter,
    guided: bool,
) -> Result<(Tensor, ModelGuard<DeviceModel>), PipelineError> {
    let m = &ip.model;
    let embeds = {
        let encoder = super::on_device(cache, &m.encoder_key(), p)?;
        let vision = ClipVisionModel::new(encoder.var_builder(), &m.encoder_config)?;
        let pixels = super::ip_adapter::clip_pixels(
            &ip.image,
            m.encoder_config.image_size,
            &encoder.device,
        )?
        .to_dtype(encoder.dtype)?;
        vision.forward(&pixels)?
    };
    let guard = super::on_device(cache, &m.key(), p)?;
    let vb = guard.var_builder().pp("image_proj");
    let proj = candle_nn::linear(
        m.encoder_config.projection_dim,
        m.cross_dim * m.tokens,
        vb.pp("proj"),
    )?;
    let norm = candle_nn::layer_norm(m.cross_dim, 1e-5, vb.pp("norm"))?;
    let embeds = embeds.to_device(&guard.device)?.to_dtype(guard.dtype)?;
    let embeds = if guided {
        Tensor::cat(&[&embeds.zeros_like()?, &embeds], 0)?
    } else {
        embeds
    };
    let rows = embeds.dim(0)?;
    let tokens = proj
        .forward(&embeds)?
        .reshape((rows, m.tokens, m.cross_dim))?;
    Ok((norm.forward(&tokens)?, guard))
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
