//! A diffusers pipeline folder: its configurations read and checked once, so
//! that a generation only has to fetch weights from the cache.

use super::nets::clip::ClipConfig;
use super::nets::unet_2d::UNet2DConditionModelConfig;
use super::nets::vae::VaeConfig;
use super::nets::ConfigError;
use super::scheduler::ScheduleConfig;
use super::tokenizer::{ClipTokenizer, TokenizerError};
use crate::cache::CacheKey;
use crate::store::{self, read_json, StoreError};
use modelcache_crds::{text_to_image, BaseModel, NotTextToImage};
use std::path::{Path, PathBuf};

/// Why a folder is not a pipeline this agent can run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    NotTextToImage(#[from] NotTextToImage),
    #[error("cannot determine the base model")]
    UnknownBase,
    #[error("is a {0} model, not a ControlNet or T2I-Adapter")]
    NotControl(modelcache_crds::ModelType),
    #[error("the UNet takes {0} input channels; the latents' 4 (text-to-image) or 9 (inpainting) are served")]
    LatentChannels(u64),
    #[error("text_encoder_2 is not a CLIPTextModelWithProjection (SDXL needs its pooled, projected output)")]
    NoProjection,
    #[error("the UNet's added text/time embeddings and a second text encoder go together (SDXL); this folder has one without the other")]
    HalfSdxl,
    #[error("the tokenizer has {tokens} tokens but the text encoder only {vocab}: they do not belong together")]
    VocabMismatch { tokens: usize, vocab: usize },
    #[error(
        "is not an SDXL refiner (one text encoder, text_encoder_2, and aesthetic-score time ids)"
    )]
    NotARefiner,
}

/// A text encoder's configuration and the tokenizer that feeds it.
pub struct TextEncoder {
    pub config: ClipConfig,
    pub tokenizer: ClipTokenizer,
}

/// A diffusers pipeline folder, with its configurations read and checked.
pub struct DiffusersModel {
    pub dir: PathBuf,
    pub base: BaseModel,
    pub unet: UNet2DConditionModelConfig,
    /// The latent channels (text-to-image), or twice them and one more: an
    /// inpainting UNet, which also takes the mask and the masked image.
    pub unet_in_channels: usize,
    pub vae: VaeConfig,
    pub text: TextEncoder,
    /// SDXL's second text encoder (with projection).
    pub text2: Option<TextEncoder>,
    pub schedule: ScheduleConfig,
    /// SDXL: an empty negative prompt conditions on zeros, not on "".
    pub force_zeros_for_empty_prompt: bool,
    /// An SDXL refiner: it only continues a base model's denoising, its one
    /// text encoder (`text`) is the folder's `text_encoder_2`, and its time
    /// ids end with an aesthetic score instead of the target size.
    pub refiner: bool,
    /// Bytes of all its weights at f32: no adapter of it can be larger.
    pub bytes_f32: u64,
}

impl DiffusersModel {
    /// Reads and checks a diffusers txt2img pipeline folder.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let probe = store::probe(dir)?;
        text_to_image(probe.model_type, probe.base, probe.variant)?;
        Self::read(dir, probe, false)
    }

    /// Reads and checks a diffusers SDXL refiner folder.
    pub fn open_refiner(dir: &Path) -> Result<Self, ModelError> {
        let probe = store::probe(dir)?;
        if probe.base != Some(BaseModel::SdxlRefiner) {
            return Err(ModelError::NotARefiner);
        }
        Self::read(dir, probe, true)
    }

    fn read(dir: &Path, probe: store::ProbeResult, refiner: bool) -> Result<Self, ModelError> {
        let base = probe.base.ok_or(ModelError::UnknownBase)?;
        let config = |c: &str| read_json(&dir.join(c));
        let unet_json = config("unet/config.json")?;
        let unet = UNet2DConditionModelConfig::from_json(&unet_json)?;
        let vae = VaeConfig::from_json(&config("vae/config.json")?)?;
        let latent = vae.latent_channels;
        let unet_in_channels = match unet_json["in_channels"].as_u64() {
            None => latent,
            Some(c) if c as usize == latent || c as usize == 2 * latent + 1 => c as usize,
            Some(c) => return Err(ModelError::LatentChannels(c)),
        };
        let text = if refiner {
            text_encoder(dir, "text_encoder_2", "tokenizer_2")?
        } else {
            text_encoder(dir, "text_encoder", "tokenizer")?
        };
        if text.tokenizer.vocab_size() > text.config.vocab_size {
            return Err(ModelError::VocabMismatch {
                tokens: text.tokenizer.vocab_size(),
                vocab: text.config.vocab_size,
            });
        }
        if refiner && (text.config.projection_dim.is_none() || unet.addition.is_none()) {
            return Err(ModelError::NotARefiner);
        }
        let text2 = if !refiner && dir.join("text_encoder_2/config.json").exists() {
            let t = text_encoder(dir, "text_encoder_2", "tokenizer_2")?;
            if t.config.projection_dim.is_none() {
                return Err(ModelError::NoProjection);
            }
            Some(t)
        } else {
            None
        };
        if !refiner && unet.addition.is_some() != text2.is_some() {
            return Err(ModelError::HalfSdxl);
        }
        // A folder without a scheduler config gets the standard schedule.
        let schedule = match config("scheduler/scheduler_config.json") {
            Ok(v) => ScheduleConfig::from_json(&v)?,
            Err(StoreError::Io { .. }) => ScheduleConfig::default(),
            Err(e) => return Err(e.into()),
        };
        let force_zeros_for_empty_prompt = config("model_index.json")
            .ok()
            .and_then(|v| v["force_zeros_for_empty_prompt"].as_bool())
            .unwrap_or(false);
        Ok(DiffusersModel {
            dir: dir.to_path_buf(),
            base,
            unet,
            unet_in_channels,
            vae,
            text,
            text2,
            schedule,
            force_zeros_for_empty_prompt,
            refiner,
            bytes_f32: probe.size_bytes.f32,
        })
    }

    /// Whether the UNet is an inpainting one (mask and masked image as input).
    pub fn inpainting(&self) -> bool {
        self.unet_in_channels != self.vae.latent_channels
    }

    /// The components a generation loads, each a cache entry.
    pub fn components(&self) -> Vec<&'static str> {
        if self.refiner {
            return vec!["text_encoder_2", "unet", "vae"];
        }
        let mut c = vec!["text_encoder", "unet", "vae"];
        if self.text2.is_some() {
            c.insert(1, "text_encoder_2");
        }
        c
    }

    /// Cache key of a component.
    pub fn component(&self, name: &str) -> CacheKey {
        CacheKey::from(self.dir.join(name))
    }

    /// Cache keys of every component.
    pub fn component_keys(&self) -> Vec<CacheKey> {
        self.components()
            .into_iter()
            .map(|c| self.component(c))
            .collect()
    }
}

/// A text encoder's configuration and its tokenizer.
fn text_encoder(dir: &Path, encoder: &str, tokenizer: &str) -> Result<TextEncoder, ModelError> {
    let config = ClipConfig::from_json(&read_json(&dir.join(encoder).join("config.json"))?)?;
    let tokenizer = ClipTokenizer::load(&dir.join(tokenizer), config.max_position_embeddings)?;
    Ok(TextEncoder { config, tokenizer })
}
