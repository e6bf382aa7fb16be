//! IP-Adapter: an image as a prompt. CLIP's image encoder embeds the image,
//! the adapter's projection turns the embedding (IP-Adapter Plus: the
//! encoder's penultimate hidden states, through a resampler) into a few
//! extra context tokens, and each of the UNet's cross-attention layers attends to them
//! through the adapter's own keys and values (decoupled cross-attention).
//! The adapter file (the original layout: `image_proj.*`, `ip_adapter.N.*`)
//! and its image encoder (a `CLIPVisionModelWithProjection` folder) are
//! each a cache entry.

use super::image::Image;
use super::model::{DiffusersModel, ModelError};
use super::nets::clip_vision::ClipVisionConfig;
use super::nets::ip_projection::{ProjectionKind, RESAMPLER_HEAD_DIM};
use super::nets::unet_2d::UNet2DConditionModelConfig;
use super::nets::ConfigError;
use crate::cache::CacheKey;
use crate::store::{self, read_json};
use candle_core::{Device, Result as CandleResult, Tensor};
use modelcache_crds::BaseModel;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const NET: &str = "ip-adapter";

/// CLIP's pixel normalisation (transformers' `OPENAI_CLIP_MEAN` / `_STD`).
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// An IP-Adapter file and its image encoder, read and checked.
#[derive(Debug)]
pub struct IpAdapterModel {
    pub file: PathBuf,
    pub encoder: PathBuf,
    /// From the width of its keys; `None` for a width no release has.
    pub base: Option<BaseModel>,
    pub encoder_config: ClipVisionConfig,
    /// The cross-attention width its tokens have (the UNet's).
    pub cross_dim: usize,
    /// How the image becomes context tokens.
    pub projection: ProjectionKind,
    /// Cross-attention layers it has keys and values for.
    pub layers: usize,
    /// Bytes of the adapter's and the encoder's weights at f32.
    pub bytes_f32: u64,
}

impl IpAdapterModel {
    /// Reads the adapter at `file` and the encoder folder `encoder`.
    pub fn open(file: &Path, encoder: &Path) -> Result<Self, ModelError> {
        let index = store::open_weights(file)?;
        let invalid = |problem: String| {
            ModelError::Config(ConfigError::Invalid {
                network: NET,
                problem,
            })
        };
        let encoder_config =
            ClipVisionConfig::from_json(&read_json(&encoder.join("config.json"))?)?;
        let dims = |name: &str| index.shape(name).map(<[usize]>::to_vec);
        let two = |name: &'static str| match dims(name).as_deref() {
            Some([a, b]) => Ok((*a, *b)),
            other => Err(invalid(format!("{name} has shape {other:?}"))),
        };
        let (projection, cross_dim) = if let Some(latents) = dims("image_proj.latents") {
            // IP-Adapter Plus: a Perceiver resampler over the hidden states.
            let (tokens, dim) = match latents.as_slice() {
                [1, t, d] => (*t, *d),
                other => return Err(invalid(format!("image_proj.latents has shape {other:?}"))),
            };
            let (_, embed_dim) = two("image_proj.proj_in.weight")?;
            let (cross_dim, _) = two("image_proj.proj_out.weight")?;
            let (inner, _) = two("image_proj.layers.0.0.to_q.weight")?;
            let (ff_dim, _) = two("image_proj.layers.0.1.1.weight")?;
            let depth = (0..)
                .take_while(|i| index.contains(&format!("image_proj.layers.{i}.0.to_q.weight")))
                .count();
            if !inner.is_multiple_of(RESAMPLER_HEAD_DIM) || embed_dim != encoder_config.hidden_size
            {
                return Err(invalid(format!(
                    "a resampler of {inner} attention channels (heads of {RESAMPLER_HEAD_DIM}) over hidden states of width {embed_dim}, for an encoder of width {}",
                    encoder_config.hidden_size
                )));
            }
            let kind = ProjectionKind::Resampler {
                embed_dim,
                tokens,
                dim,
                heads: inner / RESAMPLER_HEAD_DIM,
                depth,
                ff_dim,
            };
            (kind, cross_dim)
        } else if let Some(proj) = dims("image_proj.proj.weight") {
            let cross_dim = index
                .shape("image_proj.norm.weight")
                .and_then(|s| s.first().copied())
                .filter(|&c| c > 0)
                .ok_or_else(|| invalid("no image_proj.norm.weight".into()))?;
            let (rows, embed_dim) = match proj.as_slice() {
                [rows, cols] => (*rows, *cols),
                other => {
                    return Err(invalid(format!(
                        "image_proj.proj.weight has shape {other:?}"
                    )))
                }
            };
            if !rows.is_multiple_of(cross_dim) {
                return Err(invalid(format!(
                    "image_proj.proj makes {rows} values, not tokens of width {cross_dim}"
                )));
            }
            if encoder_config.projection_dim != embed_dim {
                return Err(invalid(format!(
                    "its projection takes image embeddings of width {embed_dim} but the image encoder makes {}",
                    encoder_config.projection_dim
                )));
            }
            let tokens = rows / cross_dim;
            (ProjectionKind::Linear { embed_dim, tokens }, cross_dim)
        } else {
            return Err(ModelError::Config(ConfigError::Unsupported {
                network: NET,
                feature:
                    "this image projection (FaceID, or no image_proj.proj / image_proj.latents)"
                        .into(),
            }));
        };
        let layers = index
            .names()
            .filter(|n| n.starts_with("ip_adapter.") && n.ends_with(".to_k_ip.weight"))
            .count();
        if layers == 0 {
            return Err(invalid("no ip_adapter.N.to_k_ip.weight".into()));
        }
        let base = match cross_dim {
            768 => Some(BaseModel::Sd1),
            1024 => Some(BaseModel::Sd2),
            2048 => Some(BaseModel::Sdxl),
            _ => None,
        };
        let encoder_bytes = store::probe(encoder)?.size_bytes.f32;
        Ok(IpAdapterModel {
            file: file.to_path_buf(),
            encoder: encoder.to_path_buf(),
            base,
            encoder_config,
            cross_dim,
            projection,
            layers,
            bytes_f32: store::SizeByPrecision::of(&index).f32 + encoder_bytes,
        })
    }

    pub fn key(&self) -> CacheKey {
        CacheKey::from(self.file.clone())
    }

    pub fn encoder_key(&self) -> CacheKey {
        CacheKey::from(self.encoder.clone())
    }
}

/// A request's IP-Adapter: the adapter, the image and its scale.
#[derive(Debug, Clone)]
pub struct IpAdapter {
    pub model: Arc<IpAdapterModel>,
    pub image: Image,
    /// diffusers' `set_ip_adapter_scale`: how strongly the image counts.
    pub weight: f64,
}

/// Why an IP-Adapter cannot condition a model.
#[derive(Debug, thiserror::Error)]
pub enum IpAdapterError {
    #[error("is for {adapter} models and the model is {model}")]
    Base {
        adapter: BaseModel,
        model: BaseModel,
    },
    #[error("makes tokens of width {adapter} but the model's cross-attention takes {model}")]
    Width { adapter: usize, model: usize },
    #[error("has keys and values for {adapter} cross-attention layers but the model has {model}")]
    Layers { adapter: usize, model: usize },
}

/// The number of cross-attention layers of a UNet of this configuration.
pub fn cross_attention_layers(unet: &UNet2DConditionModelConfig) -> usize {
    let depth = |b: &super::nets::unet_2d::BlockConfig| b.use_cross_attn.unwrap_or(0);
    let down: usize = unet
        .blocks
        .iter()
        .map(|b| depth(b) * unet.layers_per_block)
        .sum();
    let up: usize = unet
        .blocks
        .iter()
        .map(|b| depth(b) * (unet.layers_per_block + 1))
        .sum();
    let mid = unet
        .blocks
        .last()
        .map_or(0, |b| b.use_cross_attn.unwrap_or(1));
    down + up + mid
}

/// What can be refused before any weight is loaded.
pub fn check(model: &DiffusersModel, ip: &IpAdapterModel) -> Result<(), IpAdapterError> {
    if let Some(adapter) = ip.base.filter(|b| *b != model.base) {
        return Err(IpAdapterError::Base {
            adapter,
            model: model.base,
        });
    }
    if ip.cross_dim != model.unet.cross_attention_dim {
        return Err(IpAdapterError::Width {
            adapter: ip.cross_dim,
            model: model.unet.cross_attention_dim,
        });
    }
    let layers = cross_attention_layers(&model.unet);
    if ip.layers != layers {
        return Err(IpAdapterError::Layers {
            adapter: ip.layers,
            model: layers,
        });
    }
    Ok(())
}

/// An image as CLIP's image processor prepares it (transformers'
/// `CLIPImageProcessor` at the encoder's size, as diffusers builds it):
/// the shorter side resized to `size` (bicubic), the centre `size` × `size`
/// cropped, normalised with CLIP's mean and deviation; `[1, 3, size, size]`.
pub fn clip_pixels(image: &Image, size: usize, device: &Device) -> CandleResult<Tensor> {
    let (w, h) = (image.width, image.height);
    let short = w.min(h).max(1);
    let (rw, rh) = if w <= h {
        (size, (size * h / short).max(size))
    } else {
        ((size * w / short).max(size), size)
    };
    let resized = image.resampled(rw, rh, image::imageops::FilterType::CatmullRom);
    let (top, left) = ((rh - size) / 2, (rw - size) / 2);
    let mut data = vec![0f32; 3 * size * size];
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                // Rounded to 8 bits first, as the processor works on uint8 pixels.
                let v = resized.data[((top + y) * rw + left + x) * 3 + c];
                let v = (v * 255.0).round() / 255.0;
                data[(c * size + y) * size + x] = (v - CLIP_MEAN[c]) / CLIP_STD[c];
            }
        }
    }
    Tensor::from_vec(data, (1, 3, size, size), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_attention_layers_of_sd15_and_sdxl() {
        let sd15 = UNet2DConditionModelConfig::default();
        // SD 1.5's config (the default here is SD 1.5's block layout).
        assert_eq!(cross_attention_layers(&sd15), 16);
        let mut xl = sd15.clone();
        xl.blocks.truncate(3);
        xl.blocks[0].use_cross_attn = None;
        xl.blocks[1].use_cross_attn = Some(2);
        xl.blocks[2].use_cross_attn = Some(10);
        assert_eq!(cross_attention_layers(&xl), 70);
    }

    #[test]
    fn clip_pixels_resize_the_short_side_and_crop_the_centre() {
        let img = Image {
            width: 6,
            height: 4,
            data: (0..6 * 4).flat_map(|i| [(i % 6) as f32 / 5.0; 3]).collect(),
        };
        let t = clip_pixels(&img, 4, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), [1, 3, 4, 4]);
        // Already at the size: columns 1..5 of the image, normalised.
        let px = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = ((1.0f32 / 5.0 * 255.0).round() / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert!((px[0] - want).abs() < 1e-6, "{} vs {want}", px[0]);
    }
}
