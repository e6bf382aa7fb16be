//! The networks of a Stable Diffusion pipeline as plain structs with a
//! `forward`, each configured from its diffusers `config.json` by a
//! `from_json` beside it: the CLIP text encoder (`clip`), the UNet
//! (`unet_2d` on `unet_2d_blocks`, `resnet`, `attention`, `embeddings`) and
//! the VAE decoder (`vae`), with the convolution (`conv`), group norm
//! (`norm`) and batch-independent linear layer (`linear`) they share.
//!
//! The UNet and VAE are adapted from candle-transformers 0.11.1's
//! `models::stable_diffusion` (MIT OR Apache-2.0, © the candle authors) and
//! kept here because the upstream code differs from diffusers where parity
//! matters: its GEGLU feed-forward uses the tanh approximation of GELU where
//! diffusers uses the exact (erf) one, which alone puts the tiny fixture 5e-4
//! (and with a LoRA 1.6e-3) away from diffusers' image. They also have SDXL's
//! added text/time embeddings and seamless tiling, which upstream lacks, and
//! take the CPU kernels of [`crate::pipeline::cpu`] where those apply.

pub mod attention;
pub mod clip;
pub mod clip_vision;
pub mod controlnet;
pub mod conv;
pub mod embeddings;
pub mod ip_projection;
pub mod linear;
pub mod norm;
pub mod resnet;
pub mod t2i_adapter;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;

use serde_json::Value;

/// Why a network's `config.json` cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{network} config.json lacks {field}")]
    Missing {
        network: &'static str,
        field: &'static str,
    },
    #[error("{network} config.json: {problem}")]
    Invalid {
        network: &'static str,
        problem: String,
    },
    #[error("{network}: {feature} is not supported")]
    Unsupported {
        network: &'static str,
        feature: String,
    },
}

/// A diffusers per-block setting: one number for every block, or a list.
fn usize_list(v: &Value, n: usize) -> Option<Vec<usize>> {
    match v {
        Value::Number(x) => x.as_u64().map(|x| vec![x as usize; n]),
        Value::Array(a) => a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect(),
        _ => None,
    }
}
