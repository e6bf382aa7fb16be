//! An IP-Adapter's image projection: CLIP's image embedding (or, for IP-Adapter
//! Plus, its penultimate hidden states) as context tokens of the UNet's
//! cross-attention width. The original releases' layout (`image_proj.*`).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear, VarBuilder};

/// The shape of a projection, read from its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionKind {
    /// `proj` to `tokens` × width, then a layer norm (IP-Adapter).
    Linear { embed_dim: usize, tokens: usize },
    /// A Perceiver resampler of `tokens` learned queries of width `dim`
    /// over the hidden states (IP-Adapter Plus).
    Resampler {
        embed_dim: usize,
        tokens: usize,
        dim: usize,
        heads: usize,
        depth: usize,
        ff_dim: usize,
    },
}

impl ProjectionKind {
    pub fn tokens(&self) -> usize {
        match *self {
            ProjectionKind::Linear { tokens, .. } | ProjectionKind::Resampler { tokens, .. } => {
                tokens
            }
        }
    }
}

/// diffusers' head width in IP-Adapter Plus's Perceiver attention.
pub const RESAMPLER_HEAD_DIM: usize = 64;

/// One Perceiver layer: the queries attend to the hidden states and
/// themselves, then a feed-forward, each with a residual.
struct PerceiverLayer {
    norm_x: LayerNorm,
    norm_latents: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    ff_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    heads: usize,
}

impl PerceiverLayer {
    fn forward(&self, x: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let x = self.norm_x.forward(x)?;
        let l = self.norm_latents.forward(latents)?;
        let (b, n, _) = l.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            let (b, n, c) = t.dims3()?;
            t.reshape((b, n, self.heads, c / self.heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.to_q.forward(&l)?)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&x, &l], 1)?)?;
        let half = kv.dim(D::Minus1)? / 2;
        let k = split(kv.narrow(D::Minus1, 0, half)?)?;
        let v = split(kv.narrow(D::Minus1, half, half)?)?;
        let head = q.dim(D::Minus1)? as f64;
        let w = (q.matmul(&k.t()?)? / head.sqrt())?;
        let w = candle_nn::ops::softmax_last_dim(&w)?;
        let out = w.matmul(&v)?.transpose(1, 2)?.reshape((b, n, ()))?;
        let latents = (self.to_out.forward(&out)? + latents)?;
        let ff = self.ff_norm.forward(&latents)?;
        let ff = self.ff_out.forward(&self.ff_in.forward(&ff)?.gelu_erf()?)?;
        ff + latents
    }
}

enum Projection {
    Linear {
        proj: Linear,
        norm: LayerNorm,
    },
    Resampler {
        latents: Tensor,
        proj_in: Linear,
        layers: Vec<PerceiverLayer>,
        proj_out: Linear,
        norm_out: LayerNorm,
    },
}

pub struct ImageProjection {
    projection: Projection,
    tokens: usize,
    width: usize,
}

impl ImageProjection {
    /// The projection under `vb` (`image_proj`) to tokens of `width`.
    pub fn new(vb: VarBuilder, kind: ProjectionKind, width: usize) -> Result<Self> {
        let projection = match kind {
            ProjectionKind::Linear { embed_dim, tokens } => Projection::Linear {
                proj: linear(embed_dim, width * tokens, vb.pp("proj"))?,
                norm: layer_norm(width, 1e-5, vb.pp("norm"))?,
            },
            ProjectionKind::Resampler {
                embed_dim,
                tokens,
                dim,
                heads,
                depth,
                ff_dim,
            } => {
                let inner = heads * RESAMPLER_HEAD_DIM;
                let layers = (0..depth)
                    .map(|i| {
                        let l = vb.pp("layers").pp(i);
                        let (a, f) = (l.pp(0), l.pp(1));
                        Ok(PerceiverLayer {
                            norm_x: layer_norm(dim, 1e-5, a.pp("norm1"))?,
                            norm_latents: layer_norm(dim, 1e-5, a.pp("norm2"))?,
                            to_q: linear_no_bias(dim, inner, a.pp("to_q"))?,
                            to_kv: linear_no_bias(dim, 2 * inner, a.pp("to_kv"))?,
                            to_out: linear_no_bias(inner, dim, a.pp("to_out"))?,
                            ff_norm: layer_norm(dim, 1e-5, f.pp(0))?,
                            ff_in: linear_no_bias(dim, ff_dim, f.pp(1))?,
                            ff_out: linear_no_bias(ff_dim, dim, f.pp(3))?,
                            heads,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Projection::Resampler {
                    latents: vb.get((1, tokens, dim), "latents")?,
                    proj_in: linear(embed_dim, dim, vb.pp("proj_in"))?,
                    layers,
                    proj_out: linear(dim, width, vb.pp("proj_out"))?,
                    norm_out: layer_norm(width, 1e-5, vb.pp("norm_out"))?,
                }
            }
        };
        Ok(ImageProjection {
            projection,
            tokens: kind.tokens(),
            width,
        })
    }

    /// Tokens `[B, tokens, width]` from image embeddings `[B, embed]`
    /// (linear) or hidden states `[B, N, embed]` (resampler).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.projection {
            Projection::Linear { proj, norm } => {
                let b = xs.dim(0)?;
                norm.forward(&proj.forward(xs)?.reshape((b, self.tokens, self.width))?)
            }
            Projection::Resampler {
                latents,
                proj_in,
                layers,
                proj_out,
                norm_out,
            } => {
                let b = xs.dim(0)?;
                let x = proj_in.forward(xs)?;
                let mut l = latents.to_dtype(x.dtype())?.repeat((b, 1, 1))?;
                for layer in layers {
                    l = layer.forward(&x, &l)?;
                }
                norm_out.forward(&proj_out.forward(&l)?)
            }
        }
    }
}
