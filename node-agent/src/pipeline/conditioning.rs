//! What conditions a denoising step besides the text: ControlNets (run
//! beside the UNet at every step they act) and T2I-Adapters (run once),
//! locked with their control images for a batch ([`Controls`]), and an
//! IP-Adapter's image tokens ([`image_tokens`]).

use super::control::{self, Control, ControlKind};
use super::ip_adapter::IpAdapter;
use super::nets::clip_vision::ClipVisionModel;
use super::nets::controlnet::{ControlNet, Residuals};
use super::nets::ip_projection::{ImageProjection, ProjectionKind};
use super::nets::t2i_adapter::T2iAdapter;
use super::scheduler::Scheduler;
use super::{GenerateParams, PipelineError};
use crate::cache::{DeviceModel, ModelCache, ModelGuard};
use candle_core::{DType, Device, Tensor};

/// The batch conditioning is locked for: the UNet's device and dtype, the
/// conditioning rows (2 with guidance) and images, and the text
/// conditioning ControlNets attend to.
pub(super) struct Target<'a> {
    pub device: &'a Device,
    pub dtype: DType,
    pub rows: usize,
    pub images: usize,
    pub latent_channels: usize,
    pub context: &'a Tensor,
    pub added: Option<&'a (Tensor, Tensor)>,
}

/// A request's ControlNets and T2I-Adapters, locked for its batch.
#[derive(Default)]
pub(super) struct Controls {
    nets: Vec<Controlling>,
    t2i: Vec<Adapting>,
    /// The first evaluation denoised: spans are shares of the evaluations
    /// from it to the end of the schedule.
    first: usize,
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
    guard: ModelGuard<DeviceModel>,
}

impl Controls {
    /// Locks `controls` (their image embedded, a T2I-Adapter's features
    /// computed) for `target`'s batch, whose denoising starts at evaluation
    /// `first`.
    pub fn lock(
        cache: &ModelCache,
        p: &GenerateParams,
        controls: &[Control],
        target: &Target,
        first: usize,
    ) -> Result<Self, PipelineError> {
        let mut out = Controls {
            first,
            ..Default::default()
        };
        let copies = (target.rows * target.images, 1, 1, 1);
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
                                .to_device(target.device)?
                                .to_dtype(target.dtype)?
                                .repeat(copies)
                        })
                        .collect::<candle_core::Result<_>>()?;
                    out.t2i.push(Adapting {
                        features,
                        start: c.start,
                        end: c.end,
                    });
                    continue;
                }
            };
            let net = ControlNet::new(
                guard.var_builder(),
                target.latent_channels,
                super::nets::controlnet::ControlNetConfig {
                    unet: super::nets::unet_2d::UNet2DConditionModelConfig {
                        seamless: p.seamless,
                        ..config.unet.clone()
                    },
                    ..config.clone()
                },
            )?;
            let added = match target.added {
                Some((pooled, ids)) => Some((on(pooled)?, on(ids)?)),
                None => None,
            };
            let embedded = net.embed_control(&image)?;
            out.nets.push(Controlling {
                net,
                image: embedded.repeat(copies)?,
                context: on(target.context)?,
                added,
                weight: c.weight,
                start: c.start,
                end: c.end,
                guard,
            });
        }
        Ok(out)
    }

    /// The ControlNets' summed residuals and the T2I-Adapters' summed
    /// features at evaluation `s` (each acting there), on `device` at `dtype`.
    pub fn at(
        &self,
        sched: &Scheduler,
        inp: &Tensor,
        s: usize,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<(Option<Residuals>, Option<Vec<Tensor>>)> {
        let len = sched.timesteps().len().saturating_sub(self.first);
        let i = s.saturating_sub(self.first);
        let acts = |start, end| control::acts(i, len, start, end);
        let t = sched.timesteps()[s];
        let mut residuals: Option<Residuals> = None;
        for c in self
            .nets
            .iter()
            .filter(|c| c.weight != 0.0 && acts(c.start, c.end))
        {
            let added = c.added.as_ref().map(|(a, b)| (a, b));
            let x = inp.to_device(&c.guard.device)?.to_dtype(c.guard.dtype)?;
            let r = c
                .net
                .forward(&x, t, &c.context, &c.image, c.weight, added)?;
            let back = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
            let r = Residuals {
                down: r
                    .down
                    .iter()
                    .map(back)
                    .collect::<candle_core::Result<_>>()?,
                mid: back(&r.mid)?,
            };
            residuals = Some(match residuals {
                None => r,
                Some(acc) => acc.plus(r)?,
            });
        }
        let mut features: Option<Vec<Tensor>> = None;
        for a in self.t2i.iter().filter(|a| acts(a.start, a.end)) {
            features = Some(match features {
                None => a.features.clone(),
                Some(acc) => acc
                    .iter()
                    .zip(&a.features)
                    .map(|(x, y)| x + y)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        Ok((residuals, features))
    }
}

/// An IP-Adapter's image tokens `[rows, tokens, width]` (with guidance
/// first those of the unguided row, as diffusers conditions it: a zero
/// image embedding, or for IP-Adapter Plus the hidden states of a zero
/// image), and its weights locked for the UNet's layers.
pub(super) fn image_tokens(
    cache: &ModelCache,
    p: &GenerateParams,
    ip: &IpAdapter,
    guided: bool,
) -> Result<(Tensor, ModelGuard<DeviceModel>), PipelineError> {
    let m = &ip.model;
    let features = {
        let encoder = super::on_device(cache, &m.encoder_key(), p)?;
        let vision = ClipVisionModel::new(encoder.var_builder(), &m.encoder_config)?;
        let pixels = super::ip_adapter::clip_pixels(
            &ip.image,
            m.encoder_config.image_size,
            &encoder.device,
        )?
        .to_dtype(encoder.dtype)?;
        let encode = |px: &Tensor| match m.projection {
            ProjectionKind::Resampler { .. } => vision.penultimate(px),
            ProjectionKind::Linear { .. } => vision.forward(px),
        };
        let image = encode(&pixels)?;
        if guided {
            let unguided = match m.projection {
                ProjectionKind::Resampler { .. } => encode(&pixels.zeros_like()?)?,
                ProjectionKind::Linear { .. } => image.zeros_like()?,
            };
            Tensor::cat(&[&unguided, &image], 0)?
        } else {
            image
        }
    };
    let guard = super::on_device(cache, &m.key(), p)?;
    let projection = ImageProjection::new(
        guard.var_builder().pp("image_proj"),
        m.projection,
        m.cross_dim,
    )?;
    let features = features.to_device(&guard.device)?.to_dtype(guard.dtype)?;
    Ok((projection.forward(&features)?, guard))
}
