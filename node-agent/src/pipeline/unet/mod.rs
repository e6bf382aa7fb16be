//! The Stable Diffusion UNet, adapted from candle-transformers 0.11.1's
//! `models::stable_diffusion` (MIT OR Apache-2.0, © the candle authors).
//!
//! Kept in the project because the upstream code differs from diffusers where
//! parity matters: its GEGLU feed-forward uses the tanh approximation of GELU
//! where diffusers uses the exact (erf) one, which alone puts the tiny fixture
//! 5e-4 (and with a LoRA 1.6e-3) away from diffusers' image. It also has
//! SDXL's added text/time embeddings and seamless tiling (`conv`), which the
//! upstream UNet lacks. `vae` is the decoder half of upstream's VAE on these
//! blocks, so that it can tile too.

pub mod attention;
pub mod conv;
pub mod cpu_attention;
pub mod cpu_conv;
pub mod cpu_ops;
pub mod embeddings;
pub mod norm;
pub mod resnet;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;
