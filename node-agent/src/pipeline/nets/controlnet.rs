//! A ControlNet: a trainable copy of the UNet's encoding half that reads a
//! control image (edges, depth, pose…) and returns residuals for each of the
//! UNet's skip connections and for its mid block, each through a 1×1
//! convolution trained from zero, so that an untrained ControlNet changes
//! nothing.

use super::conv::{conv2d, Conv2d, Tiling};
use super::unet_2d::{Encoder, UNet2DConditionModelConfig};
use super::{usize_list, ConfigError};
use candle_core::{Result, Tensor, D};
use candle_nn as nn;
use candle_nn::Module;
use serde_json::Value;

const NET: &str = "controlnet";

/// A diffusers `ControlNetModel` `config.json`.
#[derive(Debug, Clone)]
pub struct ControlNetConfig {
    /// The copied UNet half (same fields as the UNet's config).
    pub unet: UNet2DConditionModelConfig,
    /// Channels of the control image embedding's convolutions, first to last.
    pub conditioning_channels_out: Vec<usize>,
    /// Channels of the control image (3).
    pub conditioning_channels: usize,
    /// The network was trained on BGR control images (`controlnet_conditioning_channel_order`).
    pub bgr: bool,
    /// Residuals are averaged over the image (shuffle ControlNets).
    pub global_pool: bool,
}

impl ControlNetConfig {
    pub fn from_json(v: &Value) -> std::result::Result<Self, ConfigError> {
        let unet = UNet2DConditionModelConfig::from_json(v).map_err(|e| match e {
            ConfigError::Missing { field, .. } => ConfigError::Missing {
                network: NET,
                field,
            },
            ConfigError::Invalid { problem, .. } => ConfigError::Invalid {
                network: NET,
                problem,
            },
            ConfigError::Unsupported { feature, .. } => ConfigError::Unsupported {
                network: NET,
                feature,
            },
        })?;
        if let Some(t) = v["mid_block_type"]
            .as_str()
            .filter(|t| *t != "UNetMidBlock2DCrossAttn")
        {
            return Err(ConfigError::Unsupported {
                network: NET,
                feature: format!("mid_block_type {t:?}"),
            });
        }
        let conditioning_channels_out = match &v["conditioning_embedding_out_channels"] {
            Value::Null => vec![16, 32, 96, 256],
            other => usize_list(other, 0)
                .filter(|c| !c.is_empty() && !c.contains(&0))
                .ok_or(ConfigError::Invalid {
                    network: NET,
                    problem: "conditioning_embedding_out_channels must be a list of widths".into(),
                })?,
        };
        let bgr = match v["controlnet_conditioning_channel_order"].as_str() {
            None | Some("rgb") => false,
            Some("bgr") => true,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    network: NET,
                    problem: format!(
                        "controlnet_conditioning_channel_order {other:?} is not rgb or bgr"
                    ),
                })
            }
        };
        Ok(ControlNetConfig {
            unet,
            conditioning_channels_out,
            conditioning_channels: v["conditioning_channels"].as_u64().unwrap_or(3) as usize,
            bgr,
            global_pool: v["global_pool_conditions"].as_bool().unwrap_or(false),
        })
    }

    /// Whether its residuals fit the skip connections of a UNet of `unet`'s
    /// configuration: same blocks, same layers, same text width.
    pub fn fits(&self, unet: &UNet2DConditionModelConfig) -> bool {
        let shape = |c: &UNet2DConditionModelConfig| {
            let channels: Vec<usize> = c.blocks.iter().map(|b| b.out_channels).collect();
            (channels, c.layers_per_block, c.cross_attention_dim)
        };
        shape(&self.unet) == shape(unet) && self.unet.addition == unet.addition
    }
}

/// The control image's embedding: strided convolutions from image size down
/// to the latents' size, into `conv_in`'s width.
#[derive(Debug)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(
        vs: nn::VarBuilder,
        in_channels: usize,
        channels: &[usize],
        out_channels: usize,
        tiling: Tiling,
    ) -> Result<Self> {
        let pad = |stride| nn::Conv2dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let (Some(&first), Some(&last)) = (channels.first(), channels.last()) else {
            candle_core::bail!("a ControlNet without conditioning channels");
        };
        let conv_in = conv2d(
            in_channels,
            first,
            3,
            pad(1),
            vs.pp("conv_in"),
            tiling.outer,
        )?;
        let vb = vs.pp("blocks");
        let mut blocks = Vec::new();
        for (i, pair) in channels.windows(2).enumerate() {
            let (c_in, c_out) = (pair[0], pair[1]);
            blocks.push(conv2d(c_in, c_in, 3, pad(1), vb.pp(2 * i), tiling.outer)?);
            blocks.push(conv2d(
                c_in,
                c_out,
                3,
                pad(2),
                vb.pp(2 * i + 1),
                tiling.outer,
            )?);
        }
        let conv_out = conv2d(
            last,
            out_channels,
            3,
            pad(1),
            vs.pp("conv_out"),
            tiling.outer,
        )?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = nn::ops::silu(&self.conv_in.forward(xs)?)?;
        for b in &self.blocks {
            xs = nn::ops::silu(&b.forward(&xs)?)?;
        }
        self.conv_out.forward(&xs)
    }
}

/// The residuals a ControlNet adds to a UNet's evaluation.
#[derive(Debug)]
pub struct Residuals {
    /// One per skip connection, in the UNet's order.
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl Residuals {
    /// The sum of several ControlNets' residuals.
    pub fn plus(self, other: Residuals) -> Result<Residuals> {
        let down = self
            .down
            .iter()
            .zip(&other.down)
            .map(|(a, b)| a + b)
            .collect::<Result<Vec<_>>>()?;
        Ok(Residuals {
            down,
            mid: (self.mid + other.mid)?,
        })
    }
}

#[derive(Debug)]
pub struct ControlNet {
    encoder: Encoder,
    cond_embedding: ConditioningEmbedding,
    down_zero: Vec<Conv2d>,
    mid_zero: Conv2d,
    config: ControlNetConfig,
}

impl ControlNet {
    pub fn new(vs: nn::VarBuilder, in_channels: usize, config: ControlNetConfig) -> Result<Self> {
        let unet = &config.unet;
        let encoder = Encoder::new(&vs, in_channels, false, unet)?;
        let tiling = Tiling::unet(unet.seamless);
        let (Some(first), Some(last)) = (unet.blocks.first(), unet.blocks.last()) else {
            candle_core::bail!("a ControlNet without blocks");
        };
        let cond_embedding = ConditioningEmbedding::new(
            vs.pp("controlnet_cond_embedding"),
            config.conditioning_channels,
            &config.conditioning_channels_out,
            first.out_channels,
            tiling,
        )?;
        // One zero convolution per skip connection: conv_in's output, then
        // each block's resnets and its downsampler (all but the last block).
        let mut widths = vec![first.out_channels];
        for (i, b) in unet.blocks.iter().enumerate() {
            widths.extend(std::iter::repeat_n(b.out_channels, unet.layers_per_block));
            if i + 1 < unet.blocks.len() {
                widths.push(b.out_channels);
            }
        }
        let one = nn::Conv2dConfig::default();
        let vb = vs.pp("controlnet_down_blocks");
        let down_zero = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| conv2d(c, c, 1, one, vb.pp(i), tiling.outer))
            .collect::<Result<Vec<_>>>()?;
        let mid_zero = conv2d(
            last.out_channels,
            last.out_channels,
            1,
            one,
            vs.pp("controlnet_mid_block"),
            tiling.outer,
        )?;
        Ok(ControlNet {
            encoder,
            cond_embedding,
            down_zero,
            mid_zero,
            config,
        })
    }

    /// The control image `[batch, 3, H, W]` (in [0, 1], RGB) embedded to the
    /// latents' size. It depends on nothing else, so a generation computes
    /// it once, not at every step as diffusers does (the same numbers).
    pub fn embed_control(&self, cond: &Tensor) -> Result<Tensor> {
        let cond = if self.config.bgr {
            cond.flip(&[1])?
        } else {
            cond.clone()
        };
        self.cond_embedding.forward(&cond)
    }

    /// The residuals for latents `xs` (already scaled for the scheduler) at
    /// `timestep`, with the embedded control image `control` (see
    /// [`ControlNet::embed_control`]) and each residual times `scale`.
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        control: &Tensor,
        scale: f64,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Residuals> {
        let bsize = xs.dim(0)?;
        let emb = self.encoder.embed_time(bsize, timestep, xs, added)?;
        let xs = (self.encoder.conv_in(xs)? + control)?;
        let (xs, res, _) = self.encoder.down(xs, &emb, encoder_hidden_states, &[])?;
        let mid = self.encoder.mid(&xs, &emb, encoder_hidden_states)?;
        let out = |conv: &Conv2d, x: &Tensor| -> Result<Tensor> {
            let r = (conv.forward(x)? * scale)?;
            if self.config.global_pool {
                r.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)
            } else {
                Ok(r)
            }
        };
        let down = res
            .iter()
            .zip(&self.down_zero)
            .map(|(r, conv)| out(conv, r))
            .collect::<Result<Vec<_>>>()?;
        Ok(Residuals {
            down,
            mid: out(&self.mid_zero, &mid)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_refusals() {
        let mut v: Value = serde_json::json!({
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "cross_attention_dim": 32,
        });
        let c = ControlNetConfig::from_json(&v).unwrap();
        assert_eq!(c.conditioning_channels_out, [16, 32, 96, 256]);
        assert!(!c.bgr && !c.global_pool);
        assert!(c.fits(&c.unet));
        v["controlnet_conditioning_channel_order"] = "bgr".into();
        assert!(ControlNetConfig::from_json(&v).unwrap().bgr);
        v["mid_block_type"] = "UNetMidBlock2D".into();
        let e = ControlNetConfig::from_json(&v).unwrap_err();
        assert!(e.to_string().contains("mid_block_type"), "{e}");
        v["mid_block_type"] = Value::Null;
        v["cross_attention_dim"] = Value::Null;
        let e = ControlNetConfig::from_json(&v).unwrap_err();
        assert_eq!(
            e.to_string(),
            "controlnet config.json lacks cross_attention_dim"
        );
    }
}
