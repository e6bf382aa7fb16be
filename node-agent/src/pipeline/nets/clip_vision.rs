//! CLIP's image encoder with projection (transformers'
//! `CLIPVisionModelWithProjection`): the image embedding an IP-Adapter turns
//! into extra cross-attention tokens. A ViT: patches plus a class token
//! through the same transformer layers as CLIP's text encoder, without a
//! mask; the class token, normed and projected, is the embedding.

use super::clip::{Activation, EncoderShape, Layer};
use super::ConfigError;
use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, linear_no_bias, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use serde_json::Value;

const NET: &str = "image encoder";

/// What a `CLIPVisionModelWithProjection` `config.json` says.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub projection_dim: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl ClipVisionConfig {
    pub fn from_json(v: &Value) -> std::result::Result<Self, ConfigError> {
        // A full CLIPConfig nests the vision part.
        let v = if v["vision_config"].is_object() {
            &v["vision_config"]
        } else {
            v
        };
        let get = |field: &'static str| {
            v[field]
                .as_u64()
                .filter(|&x| x > 0)
                .map(|x| x as usize)
                .ok_or(ConfigError::Missing {
                    network: NET,
                    field,
                })
        };
        let activation = match v["hidden_act"].as_str() {
            Some("quick_gelu") | None => Activation::QuickGelu,
            Some("gelu") => Activation::Gelu,
            Some(other) => {
                return Err(ConfigError::Unsupported {
                    network: NET,
                    feature: format!("activation {other:?}"),
                })
            }
        };
        let c = ClipVisionConfig {
            hidden_size: get("hidden_size")?,
            intermediate_size: get("intermediate_size")?,
            num_hidden_layers: get("num_hidden_layers")?,
            num_attention_heads: get("num_attention_heads")?,
            image_size: get("image_size")?,
            patch_size: get("patch_size")?,
            projection_dim: get("projection_dim")?,
            layer_norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-5),
            activation,
        };
        if !c.hidden_size.is_multiple_of(c.num_attention_heads)
            || !c.image_size.is_multiple_of(c.patch_size)
        {
            return Err(ConfigError::Invalid {
                network: NET,
                problem: "hidden_size must divide into heads and image_size into patches".into(),
            });
        }
        Ok(c)
    }
}

pub struct ClipVisionModel {
    patch_embedding: candle_nn::Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<Layer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
}

impl ClipVisionModel {
    pub fn new(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let h = c.hidden_size;
        let patches = (c.image_size / c.patch_size).pow(2);
        let patch_embedding = candle_nn::conv2d_no_bias(
            3,
            h,
            c.patch_size,
            Conv2dConfig {
                stride: c.patch_size,
                ..Default::default()
            },
            emb.pp("patch_embedding"),
        )?;
        let shape = EncoderShape {
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
            activation: c.activation,
        };
        let enc = vm.pp("encoder.layers");
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::new(enc.pp(i), h, &shape))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVisionModel {
            patch_embedding,
            class_embedding: emb.get(h, "class_embedding")?,
            position_embedding: emb.get((patches + 1, h), "position_embedding.weight")?,
            pre_layrnorm: layer_norm(h, c.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            layers,
            post_layernorm: layer_norm(h, c.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection: linear_no_bias(h, c.projection_dim, vb.pp("visual_projection"))?,
        })
    }

    /// The hidden states after `layers` of the transformer layers
    /// `[B, patches + 1, hidden]` (no final norm).
    fn hidden(&self, pixels: &Tensor, layers: usize) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let h = patches.dim(2)?;
        let class = self
            .class_embedding
            .reshape((1, 1, h))?
            .broadcast_as((b, 1, h))?
            .to_dtype(patches.dtype())?;
        let xs = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut xs = self.pre_layrnorm.forward(&xs)?;
        for layer in self.layers.iter().take(layers) {
            xs = layer.forward(&xs, None)?;
        }
        Ok(xs)
    }

    /// The projected image embeddings `[B, projection_dim]` of normalised
    /// pixels `[B, 3, image_size, image_size]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let xs = self.hidden(pixels, self.layers.len())?;
        let pooled = self
            .post_layernorm
            .forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        self.visual_projection.forward(&pooled)
    }

    /// The penultimate layer's hidden states (transformers'
    /// `hidden_states[-2]`), what IP-Adapter Plus conditions on.
    pub fn penultimate(&self, pixels: &Tensor) -> Result<Tensor> {
        self.hidden(pixels, self.layers.len().saturating_sub(1))
    }
}
