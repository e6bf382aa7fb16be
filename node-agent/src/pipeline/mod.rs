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
pub mod cpu;
mod denoise;
pub mod edit;
pub mod embedding;
pub mod image;
pub mod lora;
pub mod lora_keys;
pub mod model;
pub mod nets;
pub mod rng;
pub mod scheduler;
pub mod text;
pub mod tokenizer;

pub use edit::{Edit, Mask};
pub use image::Image;
pub use model::{DiffusersModel, ModelError};
pub use nets::conv::Seamless;
pub use text::{encode, encode_text, Conditioning};

use crate::cache::{CacheError, CacheKey, ModelCache};
use adapters::Adapters;
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
        }
    }
}

/// Where a generation is, as its progress callback hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `step` of `steps` of `image` is done.
    Denoising {
        image: usize,
        step: usize,
        steps: usize,
    },
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

/// Runs a generation (text-to-image, or an edit) and returns `n` images.
///
/// Each image is denoised by the model; with a refiner and no mask, the
/// model stops at the switch point and the refiner finishes all images
/// afterwards, so only one UNet is locked at a time.
pub fn generate(
    cache: &ModelCache,
    model: &DiffusersModel,
    p: &GenerateParams,
    progress: Progress,
) -> Result<Vec<Image>, PipelineError> {
    check_params(p)?;
    if let Some(r) = &p.refiner {
        check_refiner(model, &r.model).map_err(RequestError::from)?;
    }
    let adapters = Adapters::lock(cache, model, &p.loras, p.dtype)?;
    let base = Denoiser::new(cache, model, p, &adapters)?;
    let (device, dtype) = (base.device.clone(), base.dtype);
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
    let latents_by_image = p.latents.as_ref();
    let mut pending = Vec::with_capacity(p.n);
    for i in 0..p.n {
        let mut sched = Scheduler::new(kind(model), model.schedule.clone(), p.steps);
        let mut rng = match &p.draws {
            Some(d) => NormalRng::replay(d.clone()),
            None => NormalRng::new(p.seed.wrapping_add(i as u64)),
        };
        let start = match edit {
            Some(e) => edit::start_step(p.steps, e.strength).unwrap_or(0) * sched.order(),
            None => 0,
        };
        let full_strength = start == 0;
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
        // The draws come in diffusers' order: the image's encoding, the
        // noise, the masked image's encoding.
        let image_latents = match edit {
            Some(e) if !model.inpainting() || !full_strength => {
                Some(enc(&edit::image_tensor(&e.image, &Device::Cpu)?, &mut rng)?)
            }
            _ => None,
        };
        let noise = match latents_by_image {
            Some(l) => {
                let l = l.narrow(0, if l.dim(0)? > i { i } else { 0 }, 1)?;
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
        };
        let mut x = match &image_latents {
            Some(img) if !full_strength => sched.add_noise(img, &noise, start)?,
            _ => (&noise * sched.init_noise_sigma())?,
        };
        let inpaint = match edit {
            Some(Edit {
                image,
                mask: Some(mask),
                ..
            }) => {
                let latent_mask = mask.latent(&device)?;
                if model.inpainting() {
                    let masked = enc(
                        &edit::masked_image_tensor(image, mask, &Device::Cpu)?,
                        &mut rng,
                    )?;
                    let double = |t: Tensor| -> candle_core::Result<Tensor> {
                        if base.guided {
                            Tensor::cat(&[&t, &t], 0)
                        } else {
                            Ok(t)
                        }
                    };
                    Some(Inpaint::UnetInputs(
                        double(latent_mask)?.to_dtype(dtype)?,
                        double(masked)?.to_dtype(dtype)?,
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
        for s in start..end {
            let noise_pred = base.predict(&sched, &x, s, inpaint.as_ref())?;
            x = sched.step(&noise_pred, s, &x, &mut rng)?;
            if let Some(Inpaint::Blend { image, mask, keep }) = &inpaint {
                let kept = if s + 1 < evaluations {
                    sched.add_noise(image, &noise, s + 1)?
                } else {
                    image.clone()
                };
                x = (kept.broadcast_mul(keep)? + x.broadcast_mul(mask)?)?;
            }
            let step = s + 1 - start;
            if !progress(Stage::Denoising {
                image: i,
                step,
                steps,
            }) {
                return Err(PipelineError::Cancelled);
            }
        }
        pending.push((x, rng, end - start, steps));
    }
    drop(encoder);
    drop(vae_guard);
    drop(base);
    drop(adapters);
    // The refiner continues each image's latents as they are, without new
    // noise (diffusers' `denoising_start`), from its own fresh scheduler.
    let decoder_model = match (refiner, refining) {
        (Some(r), Some((_, first, _))) => {
            let unadapted = Adapters::lock(cache, &r.model, &[], p.dtype)?;
            let finisher = Denoiser::new(cache, &r.model, p, &unadapted)?;
            for (image, (x, rng, done, steps)) in pending.iter_mut().enumerate() {
                let mut sched = Scheduler::new(kind(&r.model), r.model.schedule.clone(), p.steps);
                *x = x.to_device(&finisher.device)?;
                for s in first..sched.timesteps().len() {
                    let noise_pred = finisher.predict(&sched, x, s, None)?;
                    *x = sched.step(&noise_pred, s, x, rng)?;
                    let step = *done + s + 1 - first;
                    if !progress(Stage::Denoising {
                        image,
                        step,
                        steps: *steps,
                    }) {
                        return Err(PipelineError::Cancelled);
                    }
                }
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
    pending
        .into_iter()
        .enumerate()
        .map(|(image, (l, ..))| {
            let latents = (l.to_device(&vae_guard.device)? / vae.scaling_factor)?
                .to_dtype(vae_guard.dtype)?;
            let mut go_on = |block, blocks| {
                progress(Stage::Decoding {
                    image,
                    block,
                    blocks,
                })
            };
            let img = decoder
                .decode_until(&latents, &mut go_on)?
                .ok_or(PipelineError::Cancelled)?
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
