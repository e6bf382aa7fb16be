//! 2-D convolutions that can tile seamlessly (seed-spec §12): along the chosen
//! axes the input is padded circularly instead of with zeros, so the image's
//! left and right (or top and bottom) edges continue each other.
//!
//! The networks are built per generation, on the generating thread, so the
//! choice is passed to the constructors through [`with_seamless`] instead of
//! through every block's configuration; which convolutions follow it is the
//! reference's: in a UNet `conv_in`, `conv_out`, resnet `conv1` and the
//! down/upsamplers (not resnet `conv2`/`conv_shortcut`, not attention), in a
//! VAE every convolution. Without seamless tiling the padding is the kernel
//! call's own, so parity is untouched. On the CPU the convolution itself is
//! [`cpu_conv`]'s, which is faster than candle's.

use super::cpu_conv;
use candle_core::{Module, Result, Tensor, D};
use candle_nn as nn;
use std::cell::Cell;

/// The axes that wrap around.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seamless {
    pub x: bool,
    pub y: bool,
}

impl Seamless {
    pub fn any(self) -> bool {
        self.x || self.y
    }

    /// Parses `x`, `y`, `xy`/`both`/`true`, or `none`/`false`/``.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" | "false" => Ok(Seamless::default()),
            "x" => Ok(Seamless { x: true, y: false }),
            "y" => Ok(Seamless { x: false, y: true }),
            "xy" | "yx" | "both" | "true" => Ok(Seamless { x: true, y: true }),
            other => Err(format!("seamless {other:?} must be x, y, xy or none")),
        }
    }
}

/// Which network is being built: they follow different rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Unet,
    Vae,
}

/// Which convolution of a block: resnet `conv2` and shortcuts wrap only in a VAE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Outer,
    ResnetSecond,
}

thread_local! {
    static BUILDING: Cell<Option<(Net, Seamless)>> = const { Cell::new(None) };
}

/// Builds a network with `f` under the given tiling.
pub fn with_seamless<T>(net: Net, seamless: Seamless, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<(Net, Seamless)>);
    impl Drop for Reset {
        fn drop(&mut self) {
            BUILDING.with(|b| b.set(self.0));
        }
    }
    let _reset = Reset(BUILDING.with(|b| b.replace(Some((net, seamless)))));
    f()
}

fn current(role: Role) -> Seamless {
    match BUILDING.with(Cell::get) {
        Some((Net::Vae, s)) => s,
        Some((Net::Unet, s)) if role == Role::Outer => s,
        _ => Seamless::default(),
    }
}

#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: nn::Conv2d,
    /// Set when the input is padded here: (padding, axes).
    wrap: Option<(usize, Seamless)>,
}

/// `candle_nn::conv2d`, tiling seamlessly when the network is built so.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: nn::Conv2dConfig,
    vb: nn::VarBuilder,
    role: Role,
) -> Result<Conv2d> {
    let seamless = current(role);
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
        let plain = conv2d(1, 1, 3, cfg, vb.clone(), Role::Outer).unwrap();
        assert!(plain.wrap.is_none());
        let tiled = with_seamless(Net::Unet, Seamless { x: true, y: false }, || {
            conv2d(1, 1, 3, cfg, vb.clone(), Role::Outer)
        })
        .unwrap();
        assert_eq!(tiled.wrap, Some((1, Seamless { x: true, y: false })));
        let second = with_seamless(Net::Unet, Seamless { x: true, y: true }, || {
            conv2d(1, 1, 3, cfg, vb.clone(), Role::ResnetSecond)
        })
        .unwrap();
        assert!(
            second.wrap.is_none(),
            "UNet resnet conv2 keeps zero padding"
        );
        let vae = with_seamless(Net::Vae, Seamless { x: true, y: true }, || {
            conv2d(1, 1, 3, cfg, vb, Role::ResnetSecond)
        })
        .unwrap();
        assert!(vae.wrap.is_some(), "every VAE convolution wraps");
        assert_eq!(
            Seamless::parse("XY").unwrap(),
            Seamless { x: true, y: true }
        );
        assert!(Seamless::parse("z").is_err());
    }
}
