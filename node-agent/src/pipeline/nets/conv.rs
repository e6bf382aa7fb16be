//! 2-D convolutions that can tile seamlessly: along the chosen axes the input
//! is padded circularly instead of with zeros, so the image's left and right
//! (or top and bottom) edges continue each other.
//!
//! Which convolutions wrap is InvokeAI's rule, carried by each network's
//! configuration as a [`Tiling`]: in a UNet `conv_in`, `conv_out`, resnet
//! `conv1` and the down/upsamplers (not resnet `conv2`/`conv_shortcut`, not
//! attention), in a VAE every convolution. Without seamless tiling the padding
//! is the kernel call's own, so parity is untouched. On the CPU the
//! convolution itself is [`cpu_conv`]'s, which is faster than candle's.

use crate::pipeline::cpu::conv as cpu_conv;
use candle_core::{Module, Result, Tensor, D};
use candle_nn as nn;

/// The axes that wrap around.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Seamless {
    pub x: bool,
    pub y: bool,
}

/// A seamless-axes value that is not `x`, `y`, `xy` or `none`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seamless {0:?} must be x, y, xy or none")]
pub struct ParseSeamlessError(pub String);

impl Seamless {
    /// No axis wraps.
    pub const NONE: Seamless = Seamless { x: false, y: false };

    pub fn any(self) -> bool {
        self.x || self.y
    }
}

impl std::str::FromStr for Seamless {
    type Err = ParseSeamlessError;

    /// Parses `x`, `y`, `xy`/`both`/`true`, or `none`/`false`/``.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" | "false" => Ok(Seamless::NONE),
            "x" => Ok(Seamless { x: true, y: false }),
            "y" => Ok(Seamless { x: false, y: true }),
            "xy" | "yx" | "both" | "true" => Ok(Seamless { x: true, y: true }),
            other => Err(ParseSeamlessError(other.to_string())),
        }
    }
}

/// Which axes a network's convolutions wrap: `outer` for a block's first and
/// the network's outermost convolutions and the samplers, `inner` for a
/// resnet's second convolution and its shortcut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tiling {
    pub outer: Seamless,
    pub inner: Seamless,
}

impl Tiling {
    /// A UNet wraps its outer convolutions only.
    pub fn unet(seamless: Seamless) -> Self {
        Tiling {
            outer: seamless,
            inner: Seamless::NONE,
        }
    }

    /// A VAE wraps every convolution.
    pub fn vae(seamless: Seamless) -> Self {
        Tiling {
            outer: seamless,
            inner: seamless,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: nn::Conv2d,
    /// Set when the input is padded here: (padding, axes).
    wrap: Option<(usize, Seamless)>,
}

/// `candle_nn::conv2d`, wrapping around along the axes of `seamless`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: nn::Conv2dConfig,
    vb: nn::VarBuilder,
    seamless: Seamless,
) -> Result<Conv2d> {
    if !seamless.any() || cfg.padding == 0 {
        return Ok(Conv2d {
            inner: nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?,
            wrap: None,
        });
    }
    let inner = nn::conv2d(
        in_channels,
        out_channels,
        kernel,
        nn::Conv2dConfig { padding: 0, ..cfg },
        vb,
    )?;
    Ok(Conv2d {
        inner,
        wrap: Some((cfg.padding, seamless)),
    })
}

/// Pads `p` on both sides of `dim`: circularly, or with zeros.
fn pad(xs: &Tensor, dim: D, p: usize, circular: bool) -> Result<Tensor> {
    if !circular {
        return xs.pad_with_zeros(dim, p, p);
    }
    let n = xs.dim(dim)?;
    Tensor::cat(
        &[&xs.narrow(dim, n - p, p)?, xs, &xs.narrow(dim, 0, p)?],
        dim,
    )
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let wrapped;
        let xs = match self.wrap {
            None => xs,
            Some((p, s)) => {
                wrapped = pad(&pad(xs, D::Minus1, p, s.x)?, D::Minus2, p, s.y)?;
                &wrapped
            }
        };
        let (w, cfg) = (self.inner.weight(), self.inner.config());
        if cpu_conv::applies(xs, w, cfg.groups, cfg.dilation) {
            return cpu_conv::conv2d(xs, w, self.inner.bias(), cfg.stride, cfg.padding);
        }
        self.inner.forward(xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn circular_padding_wraps_and_zero_padding_matches_candle() {
        let xs = Tensor::arange(0f32, 4.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let wrapped = pad(&xs, D::Minus1, 1, true).unwrap();
        assert_eq!(
            wrapped.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [3.0, 0.0, 1.0, 2.0, 3.0, 0.0]
        );
        // Without tiling, a convolution is candle's own.
        let vb = nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
        let cfg = nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let plain = conv2d(1, 1, 3, cfg, vb.clone(), Seamless::NONE).unwrap();
        assert!(plain.wrap.is_none());
        let x = Seamless { x: true, y: false };
        let tiled = conv2d(1, 1, 3, cfg, vb.clone(), x).unwrap();
        assert_eq!(tiled.wrap, Some((1, x)));
        // A 1x1 convolution has no padding to wrap.
        let pointwise = nn::Conv2dConfig::default();
        assert!(conv2d(1, 1, 1, pointwise, vb, x).unwrap().wrap.is_none());
    }

    #[test]
    fn unets_wrap_outer_convolutions_and_vaes_every_one() {
        let xy = Seamless { x: true, y: true };
        assert_eq!(
            Tiling::unet(xy).inner,
            Seamless::NONE,
            "UNet resnet conv2 keeps zero padding"
        );
        assert_eq!(Tiling::unet(xy).outer, xy);
        assert_eq!(
            Tiling::vae(xy),
            Tiling {
                outer: xy,
                inner: xy
            }
        );
        assert_eq!(Tiling::default(), Tiling::unet(Seamless::NONE));
    }

    #[test]
    fn parses_the_axes_users_write() {
        assert_eq!("XY".parse(), Ok(Seamless { x: true, y: true }));
        assert_eq!("y".parse(), Ok(Seamless { x: false, y: true }));
        assert_eq!("none".parse(), Ok(Seamless::NONE));
        assert_eq!(
            "z".parse::<Seamless>().unwrap_err().to_string(),
            "seamless \"z\" must be x, y, xy or none"
        );
    }
}
