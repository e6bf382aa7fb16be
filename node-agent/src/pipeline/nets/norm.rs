//! Group normalisation that takes the fused CPU kernel where it applies.

use crate::pipeline::cpu::ops as cpu_ops;
use candle_core::{Result, Tensor};
use candle_nn as nn;
use candle_nn::Module;

/// `candle_nn::GroupNorm` with the same weights and results, computed in one
/// parallel pass on the CPU ([`cpu_ops::group_norm`]), optionally with the
/// SiLU that follows it in resnets and at the UNet's and VAE's outputs.
#[derive(Debug)]
pub struct GroupNorm {
    inner: nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (`[channels]`) from `vs`, as
    /// `candle_nn::group_norm` does.
    pub fn new(groups: usize, channels: usize, eps: f64, vs: nn::VarBuilder) -> Result<Self> {
        let weight = vs.get_with_hints(channels, "weight", nn::Init::Const(1.))?;
        let bias = vs.get_with_hints(channels, "bias", nn::Init::Const(0.))?;
        let inner = nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            inner,
            weight,
            bias,
            groups,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }

    /// `silu(self.forward(xs))` in one pass.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if cpu_ops::applies(xs) && self.weight.dtype() == xs.dtype() {
            return cpu_ops::group_norm(xs, self.groups, self.eps, &self.weight, &self.bias, silu);
        }
        let ys = self.inner.forward(xs)?;
        if silu {
            nn::ops::silu(&ys)
        } else {
            Ok(ys)
        }
    }
}
