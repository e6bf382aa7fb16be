//! The VAE decoder, adapted from candle-transformers 0.11.1's
//! `stable_diffusion::vae` (MIT OR Apache-2.0, © the candle authors) onto the
//! project's blocks so that its convolutions can tile seamlessly, and the
//! encoder that image editing needs to bring an image into latent space.

use super::conv::{conv2d, Conv2d, Seamless, Tiling};
use super::norm::GroupNorm;
use super::unet_2d_blocks::{
    DownBlock2D, DownBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig, UpDecoderBlock2D,
    UpDecoderBlock2DConfig,
};
use super::{usize_list, ConfigError};
use candle_core::{Module, Result, Tensor};
use candle_nn as nn;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_post_quant_conv: bool,
    pub use_quant_conv: bool,
    /// Latents are divided by this before decoding (SD 0.18215, SDXL 0.13025).
    pub scaling_factor: f64,
    /// Axes along which decoded images tile (a request's choice, not the model's).
    pub seamless: Seamless,
}

impl VaeConfig {
    /// The configuration a diffusers `vae/config.json` describes.
    pub fn from_json(v: &Value) -> std::result::Result<Self, ConfigError> {
        let c = VaeConfig {
            block_out_channels: usize_list(&v["block_out_channels"], 0)
                .filter(|c| !c.is_empty())
                .ok_or(ConfigError::Missing {
                    network: "vae",
                    field: "block_out_channels",
                })?,
            layers_per_block: v["layers_per_block"].as_u64().unwrap_or(2) as usize,
            latent_channels: v["latent_channels"].as_u64().unwrap_or(4) as usize,
            norm_num_groups: v["norm_num_groups"].as_u64().unwrap_or(32) as usize,
            use_post_quant_conv: v["use_post_quant_conv"].as_bool().unwrap_or(true),
            use_quant_conv: v["use_quant_conv"].as_bool().unwrap_or(true),
            scaling_factor: v["scaling_factor"].as_f64().unwrap_or(0.18215),
            seamless: Seamless::NONE,
        };
        let invalid = |problem: String| ConfigError::Invalid {
            network: "vae",
            problem,
        };
        let groups = c.norm_num_groups;
        if groups == 0 || c.block_out_channels.iter().any(|ch| ch % groups != 0) {
            return Err(invalid(format!(
                "norm_num_groups {groups} does not divide block_out_channels {:?}",
                c.block_out_channels
            )));
        }
        // Latents are divided by it: 0 decodes every image to the same flat colour.
        if !(c.scaling_factor.is_finite() && c.scaling_factor > 0.0) {
            return Err(invalid(format!(
                "scaling_factor {} must be a positive number",
                c.scaling_factor
            )));
        }
        if c.latent_channels == 0 {
            return Err(invalid("latent_channels must be at least 1".into()));
        }
        Ok(c)
    }
}

#[derive(Debug)]
pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// `vs` is the VAE's root (`decoder.*`, `post_quant_conv.*`).
    pub fn new(vs: nn::VarBuilder, out_channels: usize, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let last = *channels
            .last()
            .ok_or_else(|| candle_core::Error::Msg("vae has no blocks".into()))?;
        let tiling = Tiling::vae(config.seamless);
        let pad1 = nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(
                config.latent_channels,
                config.latent_channels,
                1,
                Default::default(),
                vs.pp("post_quant_conv"),
                tiling.outer,
            )?)
        } else {
            None
        };
        let vs = vs.pp("decoder");
        let conv_in = conv2d(
            config.latent_channels,
            last,
            3,
            pad1,
            vs.pp("conv_in"),
            tiling.outer,
        )?;
        let mid_block = UNetMidBlock2D::new(
            vs.pp("mid_block"),
            last,
            None,
            UNetMidBlock2DConfig {
                resnet_eps: 1e-6,
                output_scale_factor: 1.,
                attn_num_head_channels: None,
                resnet_groups: Some(config.norm_num_groups),
                tiling,
                ..Default::default()
            },
        )?;
        let reversed: Vec<usize> = channels.iter().copied().rev().collect();
        let up_blocks = (0..reversed.len())
            .map(|i| {
                let in_channels = if i > 0 { reversed[i - 1] } else { reversed[0] };
                UpDecoderBlock2D::new(
                    vs.pp("up_blocks").pp(i.to_string()),
                    in_channels,
                    reversed[i],
                    UpDecoderBlock2DConfig {
                        num_layers: config.layers_per_block + 1,
                        resnet_eps: 1e-6,
                        resnet_groups: config.norm_num_groups,
                        add_upsample: i + 1 != reversed.len(),
                        tiling,
                        ..Default::default()
                    },
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out = GroupNorm::new(
            config.norm_num_groups,
            channels[0],
            1e-6,
            vs.pp("conv_norm_out"),
        )?;
        let conv_out = conv2d(
            channels[0],
            out_channels,
            3,
            pad1,
            vs.pp("conv_out"),
            tiling.outer,
        )?;
        Ok(VaeDecoder {
            post_quant_conv,
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// Latents (already divided by the scaling factor) → image in [-1, 1].
    pub fn decode(&self, xs: &Tensor) -> Result<Tensor> {
        self.decode_until(xs, &mut |_, _| true)?
            .ok_or_else(|| candle_core::Error::Msg("decoding stopped".into()))
    }

    /// [`Self::decode`], asking `go_on(block, blocks)` before each of its
    /// blocks (the middle block, then each up block) and returning `None` as
    /// soon as it says stop: a large image takes seconds per block on a CPU.
    pub fn decode_until(
        &self,
        xs: &Tensor,
        go_on: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Option<Tensor>> {
        let blocks = self.up_blocks.len() + 1;
        if !go_on(0, blocks) {
            return Ok(None);
        }
        let xs = match &self.post_quant_conv {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let mut xs = self.mid_block.forward(&self.conv_in.forward(&xs)?, None)?;
        for (i, b) in self.up_blocks.iter().enumerate() {
            if !go_on(i + 1, blocks) {
                return Ok(None);
            }
            xs = b.forward(&xs)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs).map(Some)
    }
}

/// The VAE encoder: image in [-1, 1] → the mean and log-variance of the
/// latent distribution (diffusers' `AutoencoderKL.encode`).
#[derive(Debug)]
pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    latent_channels: usize,
}

impl VaeEncoder {
    /// `vs` is the VAE's root (`encoder.*`, `quant_conv.*`).
    pub fn new(vs: nn::VarBuilder, in_channels: usize, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let (first, last) = match (channels.first(), channels.last()) {
            (Some(f), Some(l)) => (*f, *l),
            _ => return Err(candle_core::Error::Msg("vae has no blocks".into())),
        };
        let pad1 = nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let none = Seamless::NONE;
        let latent2 = 2 * config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(
                latent2,
                latent2,
                1,
                Default::default(),
                vs.pp("quant_conv"),
                none,
            )?)
        } else {
            None
        };
        let vs = vs.pp("encoder");
        let conv_in = conv2d(in_channels, first, 3, pad1, vs.pp("conv_in"), none)?;
        let down_blocks = channels
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let input = if i == 0 { first } else { channels[i - 1] };
                DownBlock2D::new(
                    vs.pp("down_blocks").pp(i.to_string()),
                    input,
                    out,
                    None,
                    DownBlock2DConfig {
                        num_layers: config.layers_per_block,
                        resnet_eps: 1e-6,
                        resnet_groups: config.norm_num_groups,
                        add_downsample: i + 1 != channels.len(),
                        downsample_padding: 0,
                        ..Default::default()
                    },
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_block = UNetMidBlock2D::new(
            vs.pp("mid_block"),
            last,
            None,
            UNetMidBlock2DConfig {
                resnet_eps: 1e-6,
                output_scale_factor: 1.,
                attn_num_head_channels: None,
                resnet_groups: Some(config.norm_num_groups),
                ..Default::default()
            },
        )?;
        let conv_norm_out =
            GroupNorm::new(config.norm_num_groups, last, 1e-6, vs.pp("conv_norm_out"))?;
        let conv_out = conv2d(last, latent2, 3, pad1, vs.pp("conv_out"), none)?;
        Ok(VaeEncoder {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
            quant_conv,
            latent_channels: config.latent_channels,
        })
    }

    /// Image `[1, 3, H, W]` in [-1, 1] → (mean, std) of the latent
    /// distribution, each `[1, C, H/8, W/8]`, before the scaling factor.
    pub fn encode(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut xs = self.conv_in.forward(xs)?;
        for b in &self.down_blocks {
            xs = b.forward(&xs, None)?.0;
        }
        let xs = self.mid_block.forward(&xs, None)?;
        let xs = self
            .conv_out
            .forward(&self.conv_norm_out.forward_silu(&xs)?)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&xs)?,
            None => xs,
        };
        let c = self.latent_channels;
        let mean = moments.narrow(1, 0, c)?;
        // diffusers' DiagonalGaussianDistribution clamps the log-variance.
        let std = (moments.narrow(1, c, c)?.clamp(-30f32, 20f32)? * 0.5)?.exp()?;
        Ok((mean, std))
    }
}
