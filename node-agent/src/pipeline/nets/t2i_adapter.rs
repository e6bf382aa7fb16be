//! A T2I-Adapter: a small convolutional network run once per generation on
//! the control image, whose features (one per UNet level) are added inside
//! the UNet's down blocks at every step it acts. Far cheaper than a
//! ControlNet, which runs the UNet's encoder again at every step.

use super::conv::{conv2d, Conv2d, Seamless};
use super::{usize_list, ConfigError};
use candle_core::{Result, Tensor};
use candle_nn as nn;
use candle_nn::Module;
use serde_json::Value;

const NET: &str = "t2i_adapter";

/// The three adapter architectures diffusers' `T2IAdapter` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterType {
    /// SD 1.x: one block per UNet level, each after the first halving the size.
    Full,
    /// SDXL: four blocks, only the third halving the size.
    FullXl,
    /// SD 1.x, fewer weights: bottleneck blocks and one more halving.
    Light,
}

/// A diffusers `T2IAdapter` `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct T2iAdapterConfig {
    pub kind: AdapterType,
    pub channels: Vec<usize>,
    pub in_channels: usize,
    pub num_res_blocks: usize,
    pub downscale_factor: usize,
}

impl T2iAdapterConfig {
    pub fn from_json(v: &Value) -> std::result::Result<Self, ConfigError> {
        let kind = match v["adapter_type"].as_str().unwrap_or("full_adapter") {
            "full_adapter" => AdapterType::Full,
            "full_adapter_xl" => AdapterType::FullXl,
            "light_adapter" => AdapterType::Light,
            other => {
                return Err(ConfigError::Unsupported {
                    network: NET,
                    feature: format!("adapter_type {other:?}"),
                })
            }
        };
        let channels = usize_list(&v["channels"], 0)
            .filter(|c| !c.is_empty() && !c.contains(&0))
            .unwrap_or(vec![320, 640, 1280, 1280]);
        let default_downscale = if kind == AdapterType::FullXl { 16 } else { 8 };
        let c = T2iAdapterConfig {
            kind,
            in_channels: v["in_channels"].as_u64().unwrap_or(3) as usize,
            num_res_blocks: v["num_res_blocks"].as_u64().unwrap_or(2) as usize,
            downscale_factor: v["downscale_factor"].as_u64().unwrap_or(default_downscale) as usize,
            channels,
        };
        if c.downscale_factor == 0 || (kind == AdapterType::FullXl && c.channels.len() != 4) {
            return Err(ConfigError::Invalid {
                network: NET,
                problem: "full_adapter_xl has four channel widths and a downscale factor".into(),
            });
        }
        Ok(c)
    }

    /// How much smaller than the image its smallest feature is: image sides
    /// must be multiples of it.
    pub fn total_downscale(&self) -> usize {
        let halvings = match self.kind {
            AdapterType::Full => self.channels.len() - 1,
            AdapterType::FullXl => 1,
            AdapterType::Light => self.channels.len(),
        };
        self.downscale_factor << halvings
    }

    /// The width of each feature, in order: one per channel width, and a
    /// light adapter's last repeated (its extra halving).
    pub fn feature_channels(&self) -> Vec<usize> {
        let mut c = self.channels.clone();
        if let (AdapterType::Light, Some(&last)) = (self.kind, c.last()) {
            c.push(last);
        }
        c
    }
}

/// `nn.PixelUnshuffle(r)`: `[B, C, H, W]` → `[B, C·r², H/r, W/r]`.
fn pixel_unshuffle(xs: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    xs.reshape((b, c, h / r, r, w / r, r))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * r * r, h / r, w / r))
}

fn conv(c_in: usize, c_out: usize, kernel: usize, vb: nn::VarBuilder) -> Result<Conv2d> {
    let cfg = nn::Conv2dConfig {
        padding: kernel / 2,
        ..Default::default()
    };
    conv2d(c_in, c_out, kernel, cfg, vb, Seamless::NONE)
}

/// A residual block: conv 3×3, ReLU, then conv 3×3 (light) or 1×1 (full).
#[derive(Debug)]
struct ResBlock {
    block1: Conv2d,
    block2: Conv2d,
}

impl ResBlock {
    fn new(channels: usize, second_kernel: usize, vb: nn::VarBuilder) -> Result<Self> {
        Ok(ResBlock {
            block1: conv(channels, channels, 3, vb.pp("block1"))?,
            block2: conv(channels, channels, second_kernel, vb.pp("block2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.block1.forward(xs)?.relu()?;
        self.block2.forward(&h)? + xs
    }
}

/// One level: an optional 2×2 average pool, a 1×1 convolution into the
/// level's (or, light, the bottleneck's) width, residual blocks, and for
/// light adapters a 1×1 convolution out.
#[derive(Debug)]
struct Block {
    down: bool,
    in_conv: Option<Conv2d>,
    resnets: Vec<ResBlock>,
    out_conv: Option<Conv2d>,
}

impl Block {
    fn full(c_in: usize, c_out: usize, n: usize, down: bool, vb: nn::VarBuilder) -> Result<Self> {
        let in_conv = if c_in != c_out {
            Some(conv(c_in, c_out, 1, vb.pp("in_conv"))?)
        } else {
            None
        };
        let resnets = (0..n)
            .map(|i| ResBlock::new(c_out, 1, vb.pp("resnets").pp(i)))
            .collect::<Result<_>>()?;
        Ok(Block {
            down,
            in_conv,
            resnets,
            out_conv: None,
        })
    }

    fn light(c_in: usize, c_out: usize, n: usize, down: bool, vb: nn::VarBuilder) -> Result<Self> {
        let mid = c_out / 4;
        let resnets = (0..n)
            .map(|i| ResBlock::new(mid, 3, vb.pp("resnets").pp(i)))
            .collect::<Result<_>>()?;
        Ok(Block {
            down,
            in_conv: Some(conv(c_in, mid, 1, vb.pp("in_conv"))?),
            resnets,
            out_conv: Some(conv(mid, c_out, 1, vb.pp("out_conv"))?),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = if self.down {
            xs.avg_pool2d(2)?
        } else {
            xs.clone()
        };
        if let Some(c) = &self.in_conv {
            xs = c.forward(&xs)?;
        }
        for r in &self.resnets {
            xs = r.forward(&xs)?;
        }
        match &self.out_conv {
            Some(c) => c.forward(&xs),
            None => Ok(xs),
        }
    }
}

#[derive(Debug)]
pub struct T2iAdapter {
    conv_in: Option<Conv2d>,
    body: Vec<Block>,
    downscale: usize,
}

impl T2iAdapter {
    pub fn new(vb: nn::VarBuilder, c: &T2iAdapterConfig) -> Result<Self> {
        let vb = vb.pp("adapter");
        let ch = &c.channels;
        let n = c.num_res_blocks;
        let unshuffled = c.in_channels * c.downscale_factor * c.downscale_factor;
        let body = vb.pp("body");
        let (conv_in, blocks) = match c.kind {
            AdapterType::Full => {
                let mut blocks = vec![Block::full(ch[0], ch[0], n, false, body.pp(0))?];
                for i in 1..ch.len() {
                    blocks.push(Block::full(ch[i - 1], ch[i], n, true, body.pp(i))?);
                }
                (Some(conv(unshuffled, ch[0], 3, vb.pp("conv_in"))?), blocks)
            }
            AdapterType::FullXl => {
                let blocks = (0..4)
                    .map(|i| {
                        let (c_in, down) = match i {
                            1 | 2 => (ch[i - 1], i == 2),
                            _ => (ch[i], false),
                        };
                        Block::full(c_in, ch[i], n, down, body.pp(i))
                    })
                    .collect::<Result<_>>()?;
                (Some(conv(unshuffled, ch[0], 3, vb.pp("conv_in"))?), blocks)
            }
            AdapterType::Light => {
                let mut blocks = vec![Block::light(unshuffled, ch[0], n, false, body.pp(0))?];
                for i in 1..ch.len() {
                    blocks.push(Block::light(ch[i - 1], ch[i], n, true, body.pp(i))?);
                }
                let last = ch[ch.len() - 1];
                blocks.push(Block::light(last, last, n, true, body.pp(ch.len()))?);
                (None, blocks)
            }
        };
        Ok(T2iAdapter {
            conv_in,
            body: blocks,
            downscale: c.downscale_factor,
        })
    }

    /// The features of a control image `[B, 3, H, W]` in [0, 1], largest first.
    pub fn forward(&self, image: &Tensor) -> Result<Vec<Tensor>> {
        let mut xs = pixel_unshuffle(image, self.downscale)?;
        if let Some(c) = &self.conv_in {
            xs = c.forward(&xs)?;
        }
        let mut features = Vec::with_capacity(self.body.len());
        for b in &self.body {
            xs = b.forward(&xs)?;
            features.push(xs.clone());
        }
        Ok(features)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pixel_unshuffle_orders_channels_as_pytorch() {
        // One channel, 2×2 → four channels of 1×1 in row-major order of the block.
        let x = Tensor::arange(0f32, 4.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 2))
            .unwrap();
        let y = pixel_unshuffle(&x, 2).unwrap();
        assert_eq!(y.dims(), [1, 4, 1, 1]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 1.0, 2.0, 3.0]
        );
    }

    #[test]
    fn downscale_per_architecture() {
        let c = |t: &str, ch: Vec<usize>| {
            T2iAdapterConfig::from_json(&serde_json::json!({"adapter_type": t, "channels": ch}))
                .unwrap()
        };
        assert_eq!(
            c("full_adapter", vec![320, 640, 1280, 1280]).total_downscale(),
            64
        );
        assert_eq!(
            c("full_adapter_xl", vec![320, 640, 1280, 1280]).total_downscale(),
            32
        );
        assert_eq!(
            c("light_adapter", vec![320, 640, 1280]).total_downscale(),
            64
        );
        let e =
            T2iAdapterConfig::from_json(&serde_json::json!({"adapter_type": "style"})).unwrap_err();
        assert!(e.to_string().contains("style"), "{e}");
    }
}
