//! CLIP text encoder (Hugging Face `CLIPTextModel` / `CLIPTextModelWithProjection`),
//! written here because candle's general CLIP only knows quick-GELU (SD 1.x) and
//! its SD-specific one has private configuration fields. Configured from the
//! model's `text_encoder/config.json`; reads weights with or without the
//! `text_model.` prefix (transformers 5 drops it).

use super::ConfigError;
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{
    embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder,
};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

/// What the text encoder's `config.json` says.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    pub projection_dim: Option<usize>,
    pub eos_token_id: Option<u32>,
}

impl ClipConfig {
    /// The configuration a transformers text encoder `config.json` describes.
    pub fn from_json(v: &Value) -> std::result::Result<Self, ConfigError> {
        const NET: &str = "text encoder";
        let get = |field: &'static str| {
            v[field]
                .as_u64()
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
        let with_projection = v["architectures"][0].as_str() == Some("CLIPTextModelWithProjection");
        let (hidden, heads) = (get("hidden_size")?, get("num_attention_heads")?);
        if heads == 0 || hidden % heads != 0 {
            return Err(ConfigError::Invalid {
                network: NET,
                problem: format!(
                    "hidden_size {hidden} is not divisible into num_attention_heads {heads}"
                ),
            });
        }
        Ok(ClipConfig {
            vocab_size: get("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: get("intermediate_size")?,
            num_hidden_layers: get("num_hidden_layers")?,
            num_attention_heads: heads,
            max_position_embeddings: get("max_position_embeddings")?,
            layer_norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-5),
            activation,
            projection_dim: if with_projection {
                v["projection_dim"].as_u64().map(|x| x as usize)
            } else {
                None
            },
            eos_token_id: v["eos_token_id"].as_u64().map(|x| x as u32),
        })
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let hd = c / self.heads;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q.forward(xs)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let w = q.matmul(&k.t()?)?;
        let w = match mask {
            Some(m) => w.broadcast_add(m)?,
            None => w,
        };
        let w = candle_nn::ops::softmax_last_dim(&w)?;
        let o = w.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out.forward(&o)
    }
}

/// What a CLIP encoder layer's shape needs besides its width.
pub(super) struct EncoderShape {
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f64,
    pub activation: Activation,
}

pub(super) struct Layer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Layer {
    /// Layer `vb` of a CLIP encoder (text or vision: the same transformer).
    pub(super) fn new(vb: VarBuilder, hidden: usize, c: &EncoderShape) -> Result<Self> {
        let a = vb.pp("self_attn");
        Ok(Layer {
            ln1: layer_norm(hidden, c.eps, vb.pp("layer_norm1"))?,
            attn: Attention {
                q: linear(hidden, hidden, a.pp("q_proj"))?,
                k: linear(hidden, hidden, a.pp("k_proj"))?,
                v: linear(hidden, hidden, a.pp("v_proj"))?,
                out: linear(hidden, hidden, a.pp("out_proj"))?,
                heads: c.heads,
            },
            ln2: layer_norm(hidden, c.eps, vb.pp("layer_norm2"))?,
            fc1: linear(hidden, c.intermediate, vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate, hidden, vb.pp("mlp.fc2"))?,
            act: c.activation,
        })
    }

    pub(super) fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = (xs + self.attn.forward(&self.ln1.forward(xs)?, mask)?)?;
        let m = self.fc1.forward(&self.ln2.forward(&h)?)?;
        let m = match self.act {
            Activation::QuickGelu => (&m * candle_nn::ops::sigmoid(&(&m * 1.702)?)?)?,
            Activation::Gelu => m.gelu_erf()?,
        };
        h + self.fc2.forward(&m)?
    }
}

/// Outputs of the text encoder.
pub struct TextOutput {
    /// Hidden states after `clip_skip` layers are skipped (final layer norm applied
    /// when none are), `[batch, tokens, hidden]`: the UNet's context.
    pub hidden: Tensor,
    /// The penultimate layer's hidden states (SDXL's context), `[batch, tokens, hidden]`.
    pub penultimate: Tensor,
    /// The pooled EOS token, projected when the model has a projection (SDXL).
    pub pooled: Tensor,
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    projection: Option<Linear>,
    config: ClipConfig,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, config: &ClipConfig) -> Result<Self> {
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let c = config;
        let eps = c.layer_norm_eps;
        let emb = tm.pp("embeddings");
        let enc = tm.pp("encoder.layers");
        let shape = EncoderShape {
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            eps,
            activation: c.activation,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::new(enc.pp(i), c.hidden_size, &shape))
            .collect::<Result<Vec<_>>>()?;
        let projection = match c.projection_dim {
            Some(p) => Some(linear_no_bias(c.hidden_size, p, vb.pp("text_projection"))?),
            None => None,
        };
        Ok(ClipTextModel {
            token_embedding: embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: embedding(
                c.max_position_embeddings,
                c.hidden_size,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: layer_norm(c.hidden_size, eps, tm.pp("final_layer_norm"))?,
            projection,
            config: config.clone(),
        })
    }

    fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(v, (n, n), device)?.to_dtype(dtype)
    }

    /// Encodes token ids `[batch, tokens]`. `clip_skip` = number of final layers to
    /// skip (0: use the last layer), as A1111 and diffusers define it.
    pub fn forward(&self, ids: &Tensor, clip_skip: usize) -> Result<TextOutput> {
        self.forward_with(ids, &[], clip_skip)
    }

    /// Like [`Self::forward`] for one sequence `[1, tokens]`, with the token
    /// embeddings at some positions replaced by given vectors `[width]`
    /// (textual inversion).
    pub fn forward_with(
        &self,
        ids: &Tensor,
        rows: &[(usize, Tensor)],
        clip_skip: usize,
    ) -> Result<TextOutput> {
        let (_, n) = ids.dims2()?;
        let positions = Tensor::arange(0u32, n as u32, ids.device())?;
        let mut tokens = self.token_embedding.forward(ids)?;
        if !rows.is_empty() {
            let width = tokens.dim(D::Minus1)?;
            let per_position = (0..n)
                .map(|j| match rows.iter().find(|(p, _)| *p == j) {
                    Some((_, v)) if v.dims() == [width] => {
                        v.to_dtype(tokens.dtype())?.to_device(tokens.device())?.unsqueeze(0)
                    }
                    Some((_, v)) => candle_core::bail!(
                        "an embedding vector of width {:?} does not fit this text encoder's {width}",
                        v.dims()
                    ),
                    None => tokens.i((0, j))?.unsqueeze(0),
                })
                .collect::<Result<Vec<_>>>()?;
            tokens = Tensor::cat(&per_position, 0)?.unsqueeze(0)?;
        }
        let mut xs = tokens.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(n, xs.dtype(), ids.device())?;
        let keep = self.layers.len().saturating_sub(clip_skip).max(1);
        let mut states = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            xs = layer.forward(&xs, Some(&mask))?;
            states.push(xs.clone());
        }
        let last = self.final_layer_norm.forward(&xs)?;
        let hidden = if keep == self.layers.len() {
            last.clone()
        } else {
            self.final_layer_norm.forward(&states[keep - 1])?
        };
        // SDXL conditions on the hidden states before the last layer (no final
        // norm), `clip_skip` layers further back.
        let penultimate = states[states.len().saturating_sub(2 + clip_skip)].clone();
        // Pool at the first EOS token (or the highest id, as CLIP's original code does).
        let eos_pos = match self.config.eos_token_id {
            Some(eos) => ids.eq(eos)?.to_dtype(DType::U32)?.argmax(D::Minus1)?,
            None => ids.argmax(D::Minus1)?,
        };
        let b = ids.dim(0)?;
        let pooled = (0..b)
            .map(|i| {
                let p = eos_pos.i(i)?.to_scalar::<u32>()? as usize;
                last.i((i, p))
            })
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        let pooled = match &self.projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(TextOutput {
            hidden,
            penultimate,
            pooled,
        })
    }
}
