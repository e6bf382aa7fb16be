//! The generation pipeline: text encoder → UNet denoising loop with
//! classifier-free guidance → VAE decode, for diffusers pipeline folders whose
//! `config.json` files describe the architecture. Every weight comes from the
//! cache; each component is its own cache entry.
//!
//! [`model`] reads a pipeline folder, [`text`] encodes prompts, [`adapters`]
//! applies a request's LoRAs, [`scheduler`] steps the denoising, and the
//! networks themselves are plain structs with a `forward` in [`nets`], with
//! faster CPU kernels in [`cpu`].

pub mod adapters;
pub mod batch;
pub mod canny;
mod conditioning;
pub mod control;
pub mod cpu;
mod denoise;
pub mod edit;
pub mod embedding;
pub mod image;
pub mod ip_adapter;
pub mod lora;
pub mod lora_keys;
pub mod model;
pub mod nets;
pub mod preview;
pub mod rng;
pub mod scheduler;
pub mod text;
pub mod tokenizer;

pub use control::{Control, ControlModel};
pub use edit::{Edit, Mask};
pub use image::Image;
pub use ip_adapter::{IpAdapter, IpAdapterModel};
pub use model::{DiffusersModel, ModelError};
pub use nets::conv::Seamless;
pub use text::{encode, encode_text, Conditioning};

use crate::cache::{CacheError, CacheKey, ModelCache};
use adapters::Adapters;
pub use batch::{BatchKey, Member, Previews};
use candle_core::{DType, Device, Tensor};
use denoise::{Denoiser, Inpaint};
use modelcache_crds::SchedulerKind;
use nets::vae::{VaeDecoder, VaeEncoder};
use rng::NormalRng;
use scheduler::Scheduler;
use std::path::PathBuf;
use std::sync::Arc;

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
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{}: {source}", path.display())]
    Model { path: PathBuf, source: ModelError },
    #[error("invalid request: {0}")]
    Invalid(#[from] RequestError),
    #[error("generation cancelled")]
    Cancelled,
    #[error("{}", crate::store::error::candle_message(.0))]
    Compute(#[from] candle_core::Error),
}

/// What in a request cannot be generated.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("size {width}x{height} must be a positive multiple of 8")]
    Size { width: usize, height: usize },
    #[error("steps and n must be at least 1")]
    Empty,
    #[error("the VAE makes latents of {vae} channels but the model's UNet takes {model}")]
    VaeChannels { vae: usize, model: usize },
    #[error("strength {strength} of {steps} steps runs no step: raise strength or steps")]
    NoStep { strength: f64, steps: usize },
    #[error("the image is {got_w}x{got_h} but the generation is {want_w}x{want_h}")]
    EditSize {
        got_w: usize,
        got_h: usize,
        want_w: usize,
        want_h: usize,
    },
    #[error("denoising_end {0} must be above 0 and below 1 for the refiner to take over")]
    Switch(f64),
    #[error("refiner: {0}")]
    Refiner(#[from] RefinerError),
    #[error("ip_adapter ({}): {source}", name.display())]
    IpAdapter {
        name: PathBuf,
        source: ip_adapter::IpAdapterError,
    },
    #[error("controlnet {index} ({}): {source}", name.display())]
    Control {
        index: usize,
        name: PathBuf,
        source: control::ControlError,
    },
    #[error("requests that differ in more than their prompts, seeds and image counts cannot run as one batch")]
    Unbatchable,
    #[error("latents have shape {got:?}, expected {want:?}")]
    Latents { got: Vec<usize>, want: [usize; 4] },
    #[error("{name} is not a LoRA adapter this model can use: {why}")]
    NotAnAdapter { name: String, why: String },
    #[error("{key}: {source}")]
    Adapter {
        key: CacheKey,
        source: lora::LoraError,
    },
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    #[error(transparent)]
    Prompt(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Embedding(#[from] embedding::EmbeddingError),
    #[error(
        "embedding {name:?} was trained for token dimension {trained} but the model has {model}"
    )]
    EmbeddingWidth {
        name: String,
        trained: usize,
        model: usize,
    },
}

impl PipelineError {
    /// A model folder that cannot be used.
    pub fn model(path: &std::path::Path, source: impl Into<ModelError>) -> Self {
        PipelineError::Model {
            path: path.to_path_buf(),
            source: source.into(),
        }
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
    /// `None`: the model's own (its `scheduler_config.json`'s `_class_name`).
    pub scheduler: Option<SchedulerKind>,
    pub n: usize,
    /// Initial latents `[n or 1, C, h/8, w/8]` instead of seeded noise.
    pub latents: Option<Tensor>,
    pub clip_skip: usize,
    /// LoRA-family adapter files and their weights.
    pub loras: Vec<(PathBuf, f64)>,
    /// Textual inversion embeddings the prompts may use as `<name>`: (name, file).
    pub embeddings: Vec<(String, PathBuf)>,
    /// Axes along which the image tiles seamlessly.
    pub seamless: Seamless,
    /// A diffusers VAE folder used in place of the model's own.
    pub vae: Option<PathBuf>,
    /// The image to edit, if this is an edit.
    pub edit: Option<Edit>,
    /// Every Gaussian draw, in order, instead of the seed's (all images use
    /// the same): reproduces a reference run's noise exactly.
    pub draws: Option<Vec<f32>>,
    /// An SDXL refiner that finishes the denoising.
    pub refiner: Option<Refiner>,
    /// The dtype to compute in on a GPU (a deployment's precision); `None`:
    /// the agent's `--precision`. The CPU always computes in f32.
    pub dtype: Option<DType>,
    /// ControlNets and T2I-Adapters conditioning the denoising.
    pub controls: Vec<Control>,
    /// An image prompt.
    pub ip_adapter: Option<IpAdapter>,
}

/// An SDXL refiner taking over from the model part-way, diffusers'
/// "ensemble of expert denoisers".
#[derive(Clone)]
pub struct Refiner {
    pub model: Arc<DiffusersModel>,
    /// The fraction of the schedule the model denoises before the refiner
    /// takes over (diffusers' `denoising_end` and `denoising_start`), in (0, 1).
    pub switch: f64,
}

impl std::fmt::Debug for Refiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refiner")
            .field("model", &self.model.dir)
            .field("switch", &self.switch)
            .finish()
    }
}

/// The default share of the schedule a model denoises before its refiner
/// takes over (diffusers' documented 0.8).
pub const DEFAULT_REFINER_SWITCH: f64 = 0.8;

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
            scheduler: None,
            n: 1,
            latents: None,
            clip_skip: 0,
            loras: Vec::new(),
            embeddings: Vec::new(),
            seamless: Seamless::NONE,
            vae: None,
            edit: None,
            draws: None,
            refiner: None,
            dtype: None,
            controls: Vec::new(),
            ip_adapter: None,
        }
    }
}

/// Where a generation is, as its progress callback hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `step` of `steps` is done, for all of a request's images at once
    /// (a request whose images need more than one batch hears each batch's steps).
    Denoising { step: usize, steps: usize },
    /// `image` is about to decode `block` of the VAE's `blocks`.
    Decoding {
        image: usize,
        block: usize,
        blocks: usize,
    },
}

/// Progress callback, told every step and every VAE block; returns false to
/// cancel, and the generation then stops before its next piece of work.
pub type Progress<'a> = &'a (dyn Fn(Stage) -> bool + Sync);

/// Why a refiner cannot finish a model's images.
#[derive(Debug, thiserror::Error)]
pub enum RefinerError {
    #[error("refines SDXL images, not {0} ones")]
    Base(modelcache_crds::BaseModel),
    #[error("takes {refiner}-channel latents but the model makes {model}")]
    Channels { refiner: usize, model: usize },
}

/// Whether `refiner` can continue `model`'s latents: an SDXL model whose
/// latents have the refiner's channels.
pub fn check_refiner(model: &DiffusersModel, refiner: &DiffusersModel) -> Result<(), RefinerError> {
    if model.base != modelcache_crds::BaseModel::Sdxl {
        return Err(RefinerError::Base(model.base));
    }
    if refiner.vae.latent_channels != model.vae.latent_channels {
        return Err(RefinerError::Channels {
            refiner: refiner.vae.latent_channels,
            model: model.vae.latent_channels,
        });
    }
    Ok(())
}

/// Locks the device copy of `key` at the dtype a generation computes in.
fn on_device(
    cache: &ModelCache,
    key: &CacheKey,
    p: &GenerateParams,
) -> Result<crate::cache::ModelGuard<crate::cache::DeviceModel>, CacheError> {
    cache.get_device_as(key, cache.dtype_for(p.dtype))
}

/// What can be refused before any weight is loaded.
fn check_params(p: &GenerateParams) -> Result<(), RequestError> {
    if !p.width.is_multiple_of(8) || !p.height.is_multiple_of(8) || p.width == 0 || p.height == 0 {
        return Err(RequestError::Size {
            width: p.width,
            height: p.height,
        });
    }
    if p.steps == 0 || p.n == 0 {
        return Err(RequestError::Empty);
    }
    if let Some(r) = &p.refiner {
        if !(r.switch > 0.0 && r.switch < 1.0) {
            return Err(RequestError::Switch(r.switch));
        }
    }
    if let Some(e) = &p.edit {
        let sizes = [(e.image.width, e.image.height)]
            .into_iter()
            .chain(e.mask.as_ref().map(|m| (m.width, m.height)));
        for (w, h) in sizes {
            if (w, h) != (p.width, p.height) {
                return Err(RequestError::EditSize {
                    got_w: w,
                    got_h: h,
                    want_w: p.width,
                    want_h: p.height,
                });
            }
        }
        if edit::start_step(p.steps, e.strength).is_none() {
            return Err(RequestError::NoStep {
                strength: e.strength,
                steps: p.steps,
            });
        }
    }
    Ok(())
}

/// The VAE a generation uses (the request's override, else the model's
/// own): its cache key and configuration. An override must make latents of
/// the model's channel count; its own scaling factor applies, as in diffusers.
fn vae_of(
    model: &DiffusersModel,
    p: &GenerateParams,
) -> Result<(CacheKey, nets::vae::VaeConfig), PipelineError> {
    let Some(dir) = &p.vae else {
        return Ok((model.component("vae"), model.vae.clone()));
    };
    let config = crate::store::read_json(&dir.join("config.json"))
        .map_err(|e| PipelineError::model(dir, e))?;
    let config =
        nets::vae::VaeConfig::from_json(&config).map_err(|e| PipelineError::model(dir, e))?;
    if config.latent_channels != model.vae.latent_channels {
        return Err(RequestError::VaeChannels {
            vae: config.latent_channels,
            model: model.vae.latent_channels,
        }
        .into());
    }
    Ok((CacheKey::from(dir.clone()), config))
}

/// The VAE encoder's sample of an image's latents (diffusers' `retrieve_latents`
/// in sample mode), times the scaling factor.
fn encode_image(
    encoder: &VaeEncoder,
    image: &Tensor,
    scaling_factor: f64,
    rng: &mut NormalRng,
    dtype: DType,
) -> Result<Tensor, PipelineError> {
    let (mean, std) = encoder.encode(&image.to_dtype(dtype)?)?;
    let (mean, std) = (mean.to_dtype(DType::F32)?, std.to_dtype(DType::F32)?);
    let eps = rng.tensor(mean.dims(), mean.device())?;
    Ok(((mean + (std * eps)?)? * scaling_factor)?)
}

/// Runs a generation (text-to-image, or an edit) and returns `n` images,
/// denoised together as one batch as far as the device tier has room.
pub fn generate(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
    progress: Progress,
) -> Result<Vec<Image>, PipelineError> {
    let member = Member {
        params: p,
        progress,
        previews: None,
    };
    generate_batch(cache, model, &[member], usize::MAX)?
        .pop()
        .flatten()
        .ok_or(PipelineError::Cancelled)
}

/// One image of a batch: its request and its index among that request's images.
#[derive(Clone, Copy)]
struct Slot {
    member: usize,
    image: usize,
}

/// Runs requests that share a [`BatchKey`] as one batch: every image of
/// every request in one UNet evaluation per step, in chunks of at most
/// `max_images` and of what the device tier has room for (one image's
/// activations always fit, as they did alone; each further image reserves
/// [`activation_bytes`] in the tier, evicting idle models for it). Returns
/// each request's images, `None` for a request its progress cancelled.
///
/// Each image is denoised by the model; with a refiner and no mask, the
/// model stops at the switch point and the refiner finishes all images
/// afterwards, so only one UNet is locked at a time.
pub fn generate_batch(
    cache: &ModelCache,
    model: &DiffusersModel,
    members: &[Member],
    max_images: usize,
) -> Result<Vec<Option<Vec<Image>>>, PipelineError> {
    let Some(p) = members.first().map(|m| m.params) else {
        return Ok(Vec::new());
    };
    for m in members {
        check_params(m.params)?;
    }
    // Every step frees and allocates the same large buffers: keep them.
    let _reuse = crate::memory::pool::busy();
    if members.len() > 1 {
        let key = BatchKey::of(&model.dir, p);
        if key.is_none()
            || members
                .iter()
                .any(|m| BatchKey::of(&model.dir, m.params) != key)
        {
            return Err(RequestError::Unbatchable.into());
        }
    }
    if let Some(r) = &p.refiner {
        check_refiner(model, &r.model).map_err(RequestError::from)?;
    }
    for (index, c) in p.controls.iter().enumerate() {
        control::check(model, c, p.width, p.height).map_err(|source| RequestError::Control {
            index,
            name: c.model.dir.clone(),
            source,
        })?;
    }
    if let Some(ip) = &p.ip_adapter {
        ip_adapter::check(model, &ip.model).map_err(|source| RequestError::IpAdapter {
            name: ip.model.file.clone(),
            source,
        })?;
    }
    let adapters = Adapters::lock(cache, model, &p.loras, p.dtype)?;
    let (lh, lw) = (p.height / 8, p.width / 8);
    let shape = [1, model.vae.latent_channels, lh, lw];
    let (vae_key, vae_config) = vae_of(model, p)?;
    // Inpainting models without an image to edit generate from text with
    // everything masked, as other front ends run them.
    let blank;
    let edit = match (&p.edit, model.inpainting()) {
        (Some(e), _) => Some(e),
        (None, true) => {
            blank = Edit {
                image: Image {
                    width: p.width,
                    height: p.height,
                    data: vec![0.5; p.width * p.height * 3],
                },
                mask: Some(Mask::full(p.width, p.height)),
                strength: 1.0,
            };
            Some(&blank)
        }
        (None, false) => None,
    };
    // Masked edits are finished by the model alone: the refiner is not an
    // inpainting model.
    let refiner = p
        .refiner
        .as_ref()
        .filter(|_| edit.is_none_or(|e| e.mask.is_none()));
    let kind = |m: &DiffusersModel| p.scheduler.unwrap_or(m.schedule.default_kind);
    let refining = refiner.map(|r| {
        let cut = denoise::cutoff(&model.schedule, r.switch);
        let sched = Scheduler::new(kind(&r.model), r.model.schedule.clone(), p.steps);
        let first = denoise::refiner_start(&sched, cut);
        (cut, first, sched.timesteps().len() - first)
    });
    let vae_guard = match edit {
        Some(_) => Some(on_device(cache, &vae_key, p)?),
        None => None,
    };
    let encoder = match &vae_guard {
        Some(g) => Some(VaeEncoder::new(g.var_builder(), 3, &vae_config)?),
        None => None,
    };
    let slots: Vec<Slot> = members
        .iter()
        .enumerate()
        .flat_map(|(member, m)| (0..m.params.n).map(move |image| Slot { member, image }))
        .collect();
    let mut rngs: Vec<NormalRng> = slots
        .iter()
        .map(|s| match &members[s.member].params.draws {
            Some(d) => NormalRng::replay(d.clone()),
            None => NormalRng::new(members[s.member].params.seed.wrapping_add(s.image as u64)),
        })
        .collect();
    let mut live = vec![true; members.len()];
    let start = match edit {
        Some(e) => {
            edit::start_step(p.steps, e.strength).unwrap_or(0)
                * Scheduler::new(kind(model), model.schedule.clone(), p.steps).order()
        }
        None => 0,
    };
    let full_strength = start == 0;
    let unet_key = model.component("unet");
    let mut pending: Vec<Tensor> = Vec::with_capacity(slots.len());
    let mut steps_of = (0, 0);
    let mut from = 0;
    while from < slots.len() {
        let (to, _room) = chunk(cache, &unet_key, model, p, from, slots.len(), max_images)?;
        let chunk = &slots[from..to];
        let base = Denoiser::new(cache, model, &batch_of(members, chunk), &adapters)?.control(
            cache,
            p,
            &p.controls,
            chunk.len(),
            start,
        )?;
        let (device, dtype) = (base.device.clone(), base.dtype);
        let mut sched = Scheduler::new(kind(model), model.schedule.clone(), p.steps);
        let rng = &mut rngs[from..to];
        let enc = |image: &Tensor, rng: &mut NormalRng| -> Result<Tensor, PipelineError> {
            let (Some(encoder), Some(g)) = (&encoder, &vae_guard) else {
                return Err(PipelineError::Compute(candle_core::Error::Msg(
                    "no VAE encoder for an edit".into(),
                )));
            };
            let img = image.to_device(&g.device)?;
            encode_image(encoder, &img, vae_config.scaling_factor, rng, g.dtype)?
                .to_device(&device)
                .map_err(Into::into)
        };
        // Each image's draws come in diffusers' order, from its own
        // generator: the image's encoding, the noise, the masked image's
        // encoding.
        let mut image_latents = Vec::new();
        let mut noise = Vec::with_capacity(chunk.len());
        let mut masked = Vec::new();
        for (slot, rng) in chunk.iter().zip(rng.iter_mut()) {
            if let Some(e) = edit.filter(|_| !model.inpainting() || !full_strength) {
                image_latents.push(enc(&edit::image_tensor(&e.image, &Device::Cpu)?, rng)?);
            }
            noise.push(match &members[slot.member].params.latents {
                Some(l) => {
                    let l = l.narrow(
                        0,
                        if l.dim(0)? > slot.image {
                            slot.image
                        } else {
                            0
                        },
                        1,
                    )?;
                    if l.dims() != shape {
                        return Err(RequestError::Latents {
                            got: l.dims().to_vec(),
                            want: shape,
                        }
                        .into());
                    }
                    l.to_device(&device)?.to_dtype(DType::F32)?
                }
                None => rng.tensor(&shape, &device)?,
            });
            if let Some(Edit {
                image,
                mask: Some(mask),
                ..
            }) = edit.filter(|_| model.inpainting())
            {
                masked.push(enc(
                    &edit::masked_image_tensor(image, mask, &Device::Cpu)?,
                    rng,
                )?);
            }
        }
        let images = chunk.len();
        let noise = Tensor::cat(&noise, 0)?;
        let image_latents = match image_latents.is_empty() {
            true => None,
            false => Some(Tensor::cat(&image_latents, 0)?),
        };
        let mut x = match &image_latents {
            Some(img) if !full_strength => sched.add_noise(img, &noise, start)?,
            _ => (&noise * sched.init_noise_sigma())?,
        };
        let inpaint = match edit {
            Some(Edit {
                mask: Some(mask), ..
            }) => {
                let latent_mask = mask.latent(&device)?.repeat((images, 1, 1, 1))?;
                if model.inpainting() {
                    let double = |t: Tensor| -> candle_core::Result<Tensor> {
                        if base.guided {
                            Tensor::cat(&[&t, &t], 0)
                        } else {
                            Ok(t)
                        }
                    };
                    Some(Inpaint::UnetInputs(
                        double(latent_mask)?.to_dtype(dtype)?,
                        double(Tensor::cat(&masked, 0)?)?.to_dtype(dtype)?,
                    ))
                } else {
                    image_latents
                        .map(|image| -> candle_core::Result<Inpaint> {
                            Ok(Inpaint::Blend {
                                image,
                                keep: (1.0 - &latent_mask)?,
                                mask: latent_mask,
                            })
                        })
                        .transpose()?
                }
            }
            _ => None,
        };
        let evaluations = sched.timesteps().len();
        let (end, refined) = match refining {
            Some((cut, _, refined)) => (denoise::base_end(&sched, cut).max(start), refined),
            None => (evaluations, 0),
        };
        let steps = end - start + refined;
        steps_of = (end - start, steps);
        for s in start..end {
            let noise_pred = base.predict(&sched, &x, s, inpaint.as_ref())?;
            let step = s + 1 - start;
            show_previews(model.base, members, chunk, &live, step, steps, || {
                sched.denoised(&noise_pred, s, &x)
            })?;
            x = sched.step(&noise_pred, s, &x, &mut &mut *rng)?;
            if let Some(Inpaint::Blend { image, mask, keep }) = &inpaint {
                let kept = if s + 1 < evaluations {
                    sched.add_noise(image, &noise, s + 1)?
                } else {
                    image.clone()
                };
                x = (kept.broadcast_mul(keep)? + x.broadcast_mul(mask)?)?;
            }
            tell(members, chunk, &mut live, Stage::Denoising { step, steps })?;
        }
        for i in 0..images {
            pending.push(x.narrow(0, i, 1)?);
        }
        from = to;
    }
    drop(encoder);
    drop(vae_guard);
    drop(adapters);
    // The refiner continues each image's latents as they are, without new
    // noise (diffusers' `denoising_start`), from its own fresh scheduler.
    let decoder_model = match (refiner, refining) {
        (Some(r), Some((_, first, _))) => {
            let unadapted = Adapters::lock(cache, &r.model, &[], p.dtype)?;
            let (done, steps) = steps_of;
            let refiner_unet = r.model.component("unet");
            let mut from = 0;
            while from < slots.len() {
                let (to, _room) = chunk(
                    cache,
                    &refiner_unet,
                    &r.model,
                    p,
                    from,
                    slots.len(),
                    max_images,
                )?;
                let chunk = &slots[from..to];
                let finisher =
                    Denoiser::new(cache, &r.model, &batch_of(members, chunk), &unadapted)?;
                let mut sched = Scheduler::new(kind(&r.model), r.model.schedule.clone(), p.steps);
                let mut x = Tensor::cat(&pending[from..to], 0)?.to_device(&finisher.device)?;
                for s in first..sched.timesteps().len() {
                    let noise_pred = finisher.predict(&sched, &x, s, None)?;
                    let step = done + s + 1 - first;
                    show_previews(r.model.base, members, chunk, &live, step, steps, || {
                        sched.denoised(&noise_pred, s, &x)
                    })?;
                    x = sched.step(&noise_pred, s, &x, &mut &mut rngs[from..to])?;
                    tell(members, chunk, &mut live, Stage::Denoising { step, steps })?;
                }
                for i in 0..chunk.len() {
                    pending[from + i] = x.narrow(0, i, 1)?;
                }
                from = to;
            }
            &*r.model
        }
        _ => model,
    };
    let (vae_key, vae_config) = vae_of(decoder_model, p)?;
    let vae_guard = on_device(cache, &vae_key, p)?;
    let vae = nets::vae::VaeConfig {
        seamless: p.seamless,
        ..vae_config
    };
    let decoder = VaeDecoder::new(vae_guard.var_builder(), 3, &vae)?;
    let mut out: Vec<Option<Vec<Image>>> = members.iter().map(|_| Some(Vec::new())).collect();
    for (slot, l) in slots.iter().zip(pending) {
        if !live[slot.member] {
            continue;
        }
        let latents =
            (l.to_device(&vae_guard.device)? / vae.scaling_factor)?.to_dtype(vae_guard.dtype)?;
        let progress = members[slot.member].progress;
        let mut go_on = |block, blocks| {
            progress(Stage::Decoding {
                image: slot.image,
                block,
                blocks,
            })
        };
        let Some(img) = decoder.decode_until(&latents, &mut go_on)? else {
            live[slot.member] = false;
            if live.iter().all(|l| !l) {
                return Err(PipelineError::Cancelled);
            }
            continue;
        };
        let img = ((img.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let img = img.squeeze(0)?.permute((1, 2, 0))?.contiguous()?;
        let (h, w, _) = img.dims3()?;
        if let Some(images) = &mut out[slot.member] {
            images.push(Image {
                width: w,
                height: h,
                data: img.flatten_all()?.to_vec1::<f32>()?,
            });
        }
    }
    for (o, live) in out.iter_mut().zip(&live) {
        if !live {
            *o = None;
        }
    }
    Ok(out)
}

/// The requests of a chunk of slots and how many of their images it holds.
fn batch_of<'a>(members: &'a [Member], chunk: &[Slot]) -> Vec<(&'a GenerateParams, usize)> {
    let mut batch: Vec<(usize, usize)> = Vec::new();
    for s in chunk {
        match batch.last_mut() {
            Some((m, n)) if *m == s.member => *n += 1,
            _ => batch.push((s.member, 1)),
        }
    }
    batch
        .into_iter()
        .map(|(m, n)| (members[m].params, n))
        .collect()
}

/// How far the chunk of slots starting at `from` reaches (at most
/// `max_images`, and one image plus as many as the device tier holding the
/// UNet has room for), with the room reserved for the extra images.
fn chunk(
    cache: &ModelCache,
    unet: &CacheKey,
    model: &DiffusersModel,
    p: &GenerateParams,
    from: usize,
    len: usize,
    max_images: usize,
) -> Result<(usize, Option<crate::cache::Reservation>), PipelineError> {
    let wanted = (len - from).min(max_images.max(1));
    if wanted == 1 {
        return Ok((from + 1, None));
    }
    // Where the UNet is (or will be) held, and at which dtype it computes.
    let guard = on_device(cache, unet, p)?;
    let per_image = batch::activation_bytes(model, p, guard.dtype).max(1);
    let room = cache.device_headroom(guard.slot());
    let images = wanted.min(1 + (room / per_image) as usize);
    let reservation = match images {
        1 => None,
        n => Some(cache.reserve_device(unet, guard.slot(), per_image * (n as u64 - 1))?),
    };
    Ok((from + images, reservation))
}

/// Previews for the requests of a chunk that want one after `step`, from
/// each image's predicted clean latents (computed once for the chunk).
fn show_previews(
    base: modelcache_crds::BaseModel,
    members: &[Member],
    chunk: &[Slot],
    live: &[bool],
    step: usize,
    steps: usize,
    denoised: impl FnOnce() -> candle_core::Result<Tensor>,
) -> Result<(), PipelineError> {
    let wanted = |s: &Slot| {
        live[s.member]
            && members[s.member]
                .previews
                .is_some_and(|v| v.wants(step, steps))
    };
    if !chunk.iter().any(wanted) {
        return Ok(());
    }
    let x0 = denoised()?;
    for (i, s) in chunk.iter().enumerate() {
        if let (true, Some(v)) = (wanted(s), members[s.member].previews) {
            let p = members[s.member].params;
            v.show(
                s.image,
                step,
                preview::preview(&x0.narrow(0, i, 1)?, base, p.width, p.height)?,
            );
        }
    }
    Ok(())
}

/// Tells each live request of a chunk where it is; a request that answers
/// false is cancelled, and the batch stops when none is left.
fn tell(
    members: &[Member],
    chunk: &[Slot],
    live: &mut [bool],
    stage: Stage,
) -> Result<(), PipelineError> {
    let mut told = None;
    for s in chunk {
        if told == Some(s.member) || !live[s.member] {
            continue;
        }
        told = Some(s.member);
        live[s.member] = (members[s.member].progress)(stage);
    }
    if live.iter().all(|l| !l) {
        return Err(PipelineError::Cancelled);
    }
    Ok(())
}
