//! The conditional UNet: from a noisy latent, the timestep and the text
//! context it predicts the noise (or the velocity, or the sample).

use super::attention::CrossAttention;
use super::conv::{conv2d, Conv2d, Seamless, Tiling};
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::norm::GroupNorm;
use super::unet_2d_blocks::*;
use super::{usize_list, ConfigError};
use candle_core::{Result, Tensor};
use candle_nn as nn;
use candle_nn::Module;
use serde_json::Value;

#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub out_channels: usize,
    /// When `None` no cross-attn is used, when `Some(d)` then cross-attn is used and `d` is the
    /// number of transformer blocks to be used.
    pub use_cross_attn: Option<usize>,
    pub attention_head_dim: usize,
}

#[derive(Debug, Clone)]
pub struct UNet2DConditionModelConfig {
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub blocks: Vec<BlockConfig>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub sliced_attention_size: Option<usize>,
    pub use_linear_projection: bool,
    /// SDXL's added conditioning (`addition_embed_type: text_time`).
    pub addition: Option<AdditionConfig>,
    /// Axes along which generated images tile (a request's choice, not the model's).
    pub seamless: Seamless,
}

/// SDXL's added text and time embeddings: the pooled text embedding and six
/// size/crop numbers, each projected to `time_embed_dim` sinusoids, go through
/// `add_embedding` and are added to the timestep embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdditionConfig {
    /// `addition_time_embed_dim`: sinusoid width per time id.
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim`: pooled width + 6 × time_embed_dim.
    pub input_dim: usize,
}

impl Default for UNet2DConditionModelConfig {
    fn default() -> Self {
        Self {
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.,
            blocks: vec![
                BlockConfig {
                    out_channels: 320,
                    use_cross_attn: Some(1),
                    attention_head_dim: 8,
                },
                BlockConfig {
                    out_channels: 640,
                    use_cross_attn: Some(1),
                    attention_head_dim: 8,
                },
                BlockConfig {
                    out_channels: 1280,
                    use_cross_attn: Some(1),
                    attention_head_dim: 8,
                },
                BlockConfig {
                    out_channels: 1280,
                    use_cross_attn: None,
                    attention_head_dim: 8,
                },
            ],
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            sliced_attention_size: None,
            use_linear_projection: false,
            addition: None,
            seamless: Seamless::NONE,
        }
    }
}

impl UNet2DConditionModelConfig {
    /// Width of the timestep embedding: four times the first block's channels.
    pub fn time_embed_dim(&self) -> usize {
        self.blocks.first().map_or(0, |b| b.out_channels * 4)
    }

    /// The configuration a diffusers `unet/config.json` describes.
    pub fn from_json(v: &Value) -> std::result::Result<Self, ConfigError> {
        const NET: &str = "unet";
        let missing = |field| ConfigError::Missing {
            network: NET,
            field,
        };
        let channels = usize_list(&v["block_out_channels"], 0)
            .filter(|c| !c.is_empty())
            .ok_or(missing("block_out_channels"))?;
        let n = channels.len();
        let types: Vec<&str> = v["down_block_types"]
            .as_array()
            .ok_or(missing("down_block_types"))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if types.len() != n {
            return Err(ConfigError::Invalid {
                network: NET,
                problem: "down_block_types and block_out_channels differ in length".into(),
            });
        }
        // diffusers quirk: `attention_head_dim` holds the number of heads unless `num_attention_heads` is set.
        let heads = usize_list(&v["num_attention_heads"], n)
            .or_else(|| usize_list(&v["attention_head_dim"], n))
            .unwrap_or(vec![8; n]);
        let layers = usize_list(&v["transformer_layers_per_block"], n).unwrap_or(vec![1; n]);
        if heads.len() != n || layers.len() != n || heads.contains(&0) {
            return Err(ConfigError::Invalid {
                network: NET,
                problem:
                    "attention_head_dim / transformer_layers_per_block do not match the blocks"
                        .into(),
            });
        }
        if v["class_embed_type"].as_str().is_some() {
            return Err(ConfigError::Unsupported {
                network: NET,
                feature: "class embeddings".into(),
            });
        }
        let addition = match v["addition_embed_type"].as_str() {
            None => None,
            Some("text_time") => Some(AdditionConfig {
                time_embed_dim: v["addition_time_embed_dim"]
                    .as_u64()
                    .ok_or(missing("addition_time_embed_dim"))?
                    as usize,
                input_dim: v["projection_class_embeddings_input_dim"]
                    .as_u64()
                    .ok_or(missing("projection_class_embeddings_input_dim"))?
                    as usize,
            }),
            Some(other) => {
                return Err(ConfigError::Unsupported {
                    network: NET,
                    feature: format!("addition_embed_type {other:?} (only SDXL's text_time)"),
                })
            }
        };
        let blocks = (0..n)
            .map(|i| BlockConfig {
                out_channels: channels[i],
                use_cross_attn: types[i].starts_with("CrossAttn").then_some(layers[i]),
                attention_head_dim: heads[i],
            })
            .collect();
        let norm_num_groups = v["norm_num_groups"].as_u64().unwrap_or(32) as usize;
        if norm_num_groups == 0 || channels.iter().any(|c| c % norm_num_groups != 0) {
            return Err(ConfigError::Invalid {
                network: NET,
                problem: format!(
                    "norm_num_groups {norm_num_groups} does not divide block_out_channels {channels:?}"
                ),
            });
        }
        let layers_per_block = v["layers_per_block"].as_u64().unwrap_or(2) as usize;
        if layers_per_block == 0 {
            return Err(ConfigError::Invalid {
                network: NET,
                problem: "layers_per_block must be at least 1".into(),
            });
        }
        Ok(UNet2DConditionModelConfig {
            center_input_sample: v["center_input_sample"].as_bool().unwrap_or(false),
            flip_sin_to_cos: v["flip_sin_to_cos"].as_bool().unwrap_or(true),
            freq_shift: v["freq_shift"].as_f64().unwrap_or(0.0),
            blocks,
            layers_per_block,
            downsample_padding: v["downsample_padding"].as_u64().unwrap_or(1) as usize,
            mid_block_scale_factor: v["mid_block_scale_factor"].as_f64().unwrap_or(1.0),
            norm_num_groups,
            norm_eps: v["norm_eps"].as_f64().unwrap_or(1e-5),
            cross_attention_dim: usize_list(&v["cross_attention_dim"], 1)
                .and_then(|c| c.first().copied())
                .ok_or(missing("cross_attention_dim"))?,
            sliced_attention_size: None,
            use_linear_projection: v["use_linear_projection"].as_bool().unwrap_or(false),
            addition,
            seamless: Seamless::NONE,
        })
    }
}

#[derive(Debug)]
pub(crate) enum UNetDownBlock {
    Basic(DownBlock2D),
    CrossAttn(CrossAttnDownBlock2D),
}

#[derive(Debug)]
enum UNetUpBlock {
    Basic(UpBlock2D),
    CrossAttn(CrossAttnUpBlock2D),
}

/// The UNet's encoding half: the timestep (and SDXL's added) embeddings,
/// `conv_in`, the down blocks and the mid block. A ControlNet is a copy of
/// it, so both build it here.
#[derive(Debug)]
pub(crate) struct Encoder {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_time_proj: Option<Timesteps>,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<UNetDownBlock>,
    mid_block: UNetMidBlock2DCrossAttn,
}

impl Encoder {
    pub(crate) fn new(
        vs: &nn::VarBuilder,
        in_channels: usize,
        use_flash_attn: bool,
        config: &UNet2DConditionModelConfig,
    ) -> Result<Self> {
        let n_blocks = config.blocks.len();
        let (Some(first), Some(last)) = (config.blocks.first(), config.blocks.last()) else {
            return Err(candle_core::Error::Msg("the UNet has no blocks".into()));
        };
        let b_channels = first.out_channels;
        let tiling = Tiling::unet(config.seamless);
        let time_embed_dim = config.time_embed_dim();
        let conv_cfg = nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = conv2d(
            in_channels,
            b_channels,
            3,
            conv_cfg,
            vs.pp("conv_in"),
            tiling.outer,
        )?;

        let time_proj = Timesteps::new(b_channels, config.flip_sin_to_cos, config.freq_shift);
        let time_embedding =
            TimestepEmbedding::new(vs.pp("time_embedding"), b_channels, time_embed_dim)?;
        let (add_time_proj, add_embedding) = match config.addition {
            Some(a) => (
                Some(Timesteps::new(
                    a.time_embed_dim,
                    config.flip_sin_to_cos,
                    config.freq_shift,
                )),
                Some(TimestepEmbedding::new(
                    vs.pp("add_embedding"),
                    a.input_dim,
                    time_embed_dim,
                )?),
            ),
            None => (None, None),
        };

        let vs_db = vs.pp("down_blocks");
        let down_blocks = (0..n_blocks)
            .map(|i| {
                let BlockConfig {
                    out_channels,
                    use_cross_attn,
                    attention_head_dim,
                } = config.blocks[i];

                // Enable automatic attention slicing if the config sliced_attention_size is set to 0.
                let sliced_attention_size = match config.sliced_attention_size {
                    Some(0) => Some(attention_head_dim / 2),
                    _ => config.sliced_attention_size,
                };

                let in_channels = if i > 0 {
                    config.blocks[i - 1].out_channels
                } else {
                    b_channels
                };
                let db_cfg = DownBlock2DConfig {
                    num_layers: config.layers_per_block,
                    resnet_eps: config.norm_eps,
                    resnet_groups: config.norm_num_groups,
                    add_downsample: i < n_blocks - 1,
                    downsample_padding: config.downsample_padding,
                    tiling,
                    ..Default::default()
                };
                if let Some(transformer_layers_per_block) = use_cross_attn {
                    let config = CrossAttnDownBlock2DConfig {
                        downblock: db_cfg,
                        attn_num_head_channels: attention_head_dim,
                        cross_attention_dim: config.cross_attention_dim,
                        sliced_attention_size,
                        use_linear_projection: config.use_linear_projection,
                        transformer_layers_per_block,
                    };
                    let block = CrossAttnDownBlock2D::new(
                        vs_db.pp(i.to_string()),
                        in_channels,
                        out_channels,
                        Some(time_embed_dim),
                        use_flash_attn,
                        config,
                    )?;
                    Ok(UNetDownBlock::CrossAttn(block))
                } else {
                    let block = DownBlock2D::new(
                        vs_db.pp(i.to_string()),
                        in_channels,
                        out_channels,
                        Some(time_embed_dim),
                        db_cfg,
                    )?;
                    Ok(UNetDownBlock::Basic(block))
                }
            })
            .collect::<Result<Vec<_>>>()?;

        // https://github.com/huggingface/diffusers/blob/a76f2ad538e73b34d5fe7be08c8eb8ab38c7e90c/src/diffusers/models/unet_2d_condition.py#L462
        let mid_cfg = UNetMidBlock2DCrossAttnConfig {
            resnet_eps: config.norm_eps,
            output_scale_factor: config.mid_block_scale_factor,
            cross_attn_dim: config.cross_attention_dim,
            attn_num_head_channels: last.attention_head_dim,
            resnet_groups: Some(config.norm_num_groups),
            use_linear_projection: config.use_linear_projection,
            transformer_layers_per_block: last.use_cross_attn.unwrap_or(1),
            tiling,
            ..Default::default()
        };
        let mid_block = UNetMidBlock2DCrossAttn::new(
            vs.pp("mid_block"),
            last.out_channels,
            Some(time_embed_dim),
            use_flash_attn,
            mid_cfg,
        )?;
        Ok(Encoder {
            conv_in,
            time_proj,
            time_embedding,
            add_time_proj,
            add_embedding,
            down_blocks,
            mid_block,
        })
    }

    /// The timestep embedding for a batch of `bsize` (with SDXL's pooled text
    /// embeddings and time ids added).
    pub(crate) fn embed_time(
        &self,
        bsize: usize,
        timestep: f64,
        like: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let emb = (Tensor::ones(bsize, like.dtype(), like.device())? * timestep)?;
        let emb = self.time_proj.forward(&emb)?;
        let emb = self.time_embedding.forward(&emb)?;
        match (&self.add_time_proj, &self.add_embedding, added) {
            (Some(proj), Some(embed), Some((text_embeds, time_ids))) => {
                let time = proj
                    .forward(&time_ids.flatten_all()?.to_dtype(emb.dtype())?)?
                    .reshape((bsize, ()))?;
                let add = Tensor::cat(&[&text_embeds.to_dtype(emb.dtype())?, &time], 1)?;
                emb + embed.forward(&add)?
            }
            (Some(_), _, None) => {
                candle_core::bail!("this UNet (SDXL) needs pooled text embeddings and time ids")
            }
            _ => Ok(emb),
        }
    }

    pub(crate) fn conv_in(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv_in.forward(xs)
    }

    /// The down blocks from `conv_in`'s output `xs`: the mid block's input
    /// and every skip connection (`xs` first), and the `intrablock` features
    /// left over. Each block adds the next feature to its output (a
    /// cross-attention block before its downsampler), as diffusers adds a
    /// T2I-Adapter's.
    pub(crate) fn down<'f>(
        &self,
        xs: Tensor,
        emb: &Tensor,
        encoder_hidden_states: &Tensor,
        intrablock: &'f [Tensor],
    ) -> Result<(Tensor, Vec<Tensor>, &'f [Tensor])> {
        let mut res = vec![xs.clone()];
        let mut xs = xs;
        let mut features = intrablock;
        for down_block in self.down_blocks.iter() {
            let feature = features.split_first().map(|(f, rest)| {
                features = rest;
                f
            });
            let (next, res_xs) = match down_block {
                UNetDownBlock::Basic(b) => {
                    let (mut next, mut res_xs) = b.forward(&xs, Some(emb))?;
                    // The block's output is its last skip connection too.
                    if let Some(f) = feature {
                        next = (next + f)?;
                        if let Some(last) = res_xs.last_mut() {
                            *last = next.clone();
                        }
                    }
                    (next, res_xs)
                }
                UNetDownBlock::CrossAttn(b) => {
                    b.forward(&xs, Some(emb), Some(encoder_hidden_states), feature)?
                }
            };
            res.extend(res_xs);
            xs = next;
        }
        Ok((xs, res, features))
    }

    pub(crate) fn mid(
        &self,
        xs: &Tensor,
        emb: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.mid_block
            .forward(xs, Some(emb), Some(encoder_hidden_states))
    }
}

/// What an evaluation may take besides the latents, timestep and text.
#[derive(Debug, Default, Clone, Copy)]
pub struct Inputs<'a> {
    /// SDXL: the pooled text embeddings `[batch, pooled]` and the time ids
    /// `[batch, 6]` (original size, crop top-left, target size).
    pub added: Option<(&'a Tensor, &'a Tensor)>,
    /// ControlNet residuals, one per skip connection.
    pub down: Option<&'a [Tensor]>,
    /// The ControlNet residual of the mid block.
    pub mid: Option<&'a Tensor>,
    /// T2I-Adapter features: one added inside each down block, in order
    /// (and after the mid block, when one is left of its shape).
    pub intrablock: Option<&'a [Tensor]>,
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    encoder: Encoder,
    up_blocks: Vec<UNetUpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    span: tracing::Span,
    config: UNet2DConditionModelConfig,
}

impl UNet2DConditionModel {
    pub fn new(
        vs: nn::VarBuilder,
        in_channels: usize,
        out_channels: usize,
        use_flash_attn: bool,
        config: UNet2DConditionModelConfig,
    ) -> Result<Self> {
        let encoder = Encoder::new(&vs, in_channels, use_flash_attn, &config)?;
        let n_blocks = config.blocks.len();
        let (Some(first), Some(last)) = (config.blocks.first(), config.blocks.last()) else {
            return Err(candle_core::Error::Msg("the UNet has no blocks".into()));
        };
        let b_channels = first.out_channels;
        let bl_channels = last.out_channels;
        let tiling = Tiling::unet(config.seamless);
        let time_embed_dim = config.time_embed_dim();
        let conv_cfg = nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };

        let vs_ub = vs.pp("up_blocks");
        let up_blocks = (0..n_blocks)
            .map(|i| {
                let BlockConfig {
                    out_channels,
                    use_cross_attn,
                    attention_head_dim,
                } = config.blocks[n_blocks - 1 - i];

                // Enable automatic attention slicing if the config sliced_attention_size is set to 0.
                let sliced_attention_size = match config.sliced_attention_size {
                    Some(0) => Some(attention_head_dim / 2),
                    _ => config.sliced_attention_size,
                };

                let prev_out_channels = if i > 0 {
                    config.blocks[n_blocks - i].out_channels
                } else {
                    bl_channels
                };
                let in_channels = {
                    let index = if i == n_blocks - 1 {
                        0
                    } else {
                        n_blocks - i - 2
                    };
                    config.blocks[index].out_channels
                };
                let ub_cfg = UpBlock2DConfig {
                    num_layers: config.layers_per_block + 1,
                    resnet_eps: config.norm_eps,
                    resnet_groups: config.norm_num_groups,
                    add_upsample: i < n_blocks - 1,
                    tiling,
                    ..Default::default()
                };
                if let Some(transformer_layers_per_block) = use_cross_attn {
                    let config = CrossAttnUpBlock2DConfig {
                        upblock: ub_cfg,
                        attn_num_head_channels: attention_head_dim,
                        cross_attention_dim: config.cross_attention_dim,
                        sliced_attention_size,
                        use_linear_projection: config.use_linear_projection,
                        transformer_layers_per_block,
                    };
                    let block = CrossAttnUpBlock2D::new(
                        vs_ub.pp(i.to_string()),
                        in_channels,
                        prev_out_channels,
                        out_channels,
                        Some(time_embed_dim),
                        use_flash_attn,
                        config,
                    )?;
                    Ok(UNetUpBlock::CrossAttn(block))
                } else {
                    let block = UpBlock2D::new(
                        vs_ub.pp(i.to_string()),
                        in_channels,
                        prev_out_channels,
                        out_channels,
                        Some(time_embed_dim),
                        ub_cfg,
                    )?;
                    Ok(UNetUpBlock::Basic(block))
                }
            })
            .collect::<Result<Vec<_>>>()?;

        let conv_norm_out = GroupNorm::new(
            config.norm_num_groups,
            b_channels,
            config.norm_eps,
            vs.pp("conv_norm_out"),
        )?;
        let conv_out = conv2d(
            b_channels,
            out_channels,
            3,
            conv_cfg,
            vs.pp("conv_out"),
            tiling.outer,
        )?;
        let span = tracing::span!(tracing::Level::TRACE, "unet2d");
        Ok(Self {
            encoder,
            up_blocks,
            conv_norm_out,
            conv_out,
            span,
            config,
        })
    }

    /// Every cross-attention layer in the order diffusers numbers their
    /// processors (down blocks, up blocks, then the mid block), which is
    /// how IP-Adapter files name their layers.
    pub fn cross_attentions_mut(&mut self) -> Vec<&mut CrossAttention> {
        let mut out = Vec::new();
        for b in &mut self.encoder.down_blocks {
            if let UNetDownBlock::CrossAttn(b) = b {
                out.extend(b.transformers_mut().flat_map(|t| t.cross_attentions_mut()));
            }
        }
        for b in &mut self.up_blocks {
            if let UNetUpBlock::CrossAttn(b) = b {
                out.extend(
                    b.attentions
                        .iter_mut()
                        .flat_map(|t| t.cross_attentions_mut()),
                );
            }
        }
        out.extend(
            self.encoder
                .mid_block
                .transformers_mut()
                .flat_map(|t| t.cross_attentions_mut()),
        );
        out
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(xs, timestep, encoder_hidden_states, Inputs::default())
    }

    /// An evaluation with SDXL's added embeddings and the residuals of
    /// ControlNets and T2I-Adapters.
    pub fn forward_with(
        &self,
        xs: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        inputs: Inputs,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let Inputs {
            added,
            down: down_block_additional_residuals,
            mid: mid_block_additional_residual,
            intrablock,
        } = inputs;
        let (bsize, _channels, height, width) = xs.dims4()?;
        let n_blocks = self.config.blocks.len();
        let num_upsamplers = n_blocks - 1;
        let default_overall_up_factor = 2usize.pow(num_upsamplers as u32);
        let forward_upsample_size =
            height % default_overall_up_factor != 0 || width % default_overall_up_factor != 0;
        // 0. center input if necessary
        let xs = if self.config.center_input_sample {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs.clone()
        };
        // 1. time
        let emb = self.encoder.embed_time(bsize, timestep, &xs, added)?;
        // 2. pre-process, 3. down
        let xs = self.encoder.conv_in(&xs)?;
        let (xs, mut down_block_res_xs, unused) = self.encoder.down(
            xs,
            &emb,
            encoder_hidden_states,
            intrablock.unwrap_or_default(),
        )?;
        // A ControlNet's residuals are added to the skip connections (not to
        // the mid block's input).
        if let Some(extra) = down_block_additional_residuals {
            if extra.len() != down_block_res_xs.len() {
                candle_core::bail!(
                    "{} additional residuals for {} skip connections",
                    extra.len(),
                    down_block_res_xs.len()
                );
            }
            for (res, extra) in down_block_res_xs.iter_mut().zip(extra) {
                *res = (&*res + extra)?;
            }
        }
        // 4. mid
        let xs = self.encoder.mid(&xs, &emb, encoder_hidden_states)?;
        // An SDXL T2I-Adapter's last feature goes after the mid block.
        let xs = match unused.first() {
            Some(f) if f.dims() == xs.dims() => (xs + f)?,
            _ => xs,
        };
        let xs = match mid_block_additional_residual {
            None => xs,
            Some(m) => (m + xs)?,
        };
        // 5. up
        let mut xs = xs;
        let mut upsample_size = None;
        for (i, up_block) in self.up_blocks.iter().enumerate() {
            let n_resnets = match up_block {
                UNetUpBlock::Basic(b) => b.resnets.len(),
                UNetUpBlock::CrossAttn(b) => b.upblock.resnets.len(),
            };
            let res_xs = down_block_res_xs.split_off(down_block_res_xs.len() - n_resnets);
            if i < n_blocks - 1 && forward_upsample_size {
                let Some(skip) = down_block_res_xs.last() else {
                    return Err(candle_core::Error::Msg(
                        "UNet skip connections ran out".into(),
                    ));
                };
                let (_, _, h, w) = skip.dims4()?;
                upsample_size = Some((h, w))
            }
            xs = match up_block {
                UNetUpBlock::Basic(b) => b.forward(&xs, &res_xs, Some(&emb), upsample_size)?,
                UNetUpBlock::CrossAttn(b) => b.forward(
                    &xs,
                    &res_xs,
                    Some(&emb),
                    upsample_size,
                    Some(encoder_hidden_states),
                )?,
            };
        }
        // 6. post-process
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
