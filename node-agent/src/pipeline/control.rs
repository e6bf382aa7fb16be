//! Control adapters in a generation: the ControlNet and T2I-Adapter folders
//! a request names, checked against the model before any weight is loaded,
//! and when in the denoising each one acts.

use super::image::Image;
use super::model::{DiffusersModel, ModelError};
use super::nets::controlnet::ControlNetConfig;
use super::nets::t2i_adapter::T2iAdapterConfig;
use super::nets::unet_2d::UNet2DConditionModelConfig;
use crate::cache::CacheKey;
use crate::store::{self, read_json};
use modelcache_crds::{BaseModel, ModelType};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What kind of control adapter a folder holds.
#[derive(Debug, Clone)]
pub enum ControlKind {
    /// Runs beside the UNet at every step it acts.
    ControlNet(ControlNetConfig),
    /// Runs once; its features join the UNet's down blocks.
    T2iAdapter(T2iAdapterConfig),
}

/// A diffusers ControlNet or T2I-Adapter folder with its configuration read
/// and checked.
#[derive(Debug)]
pub struct ControlModel {
    pub dir: PathBuf,
    pub base: BaseModel,
    pub kind: ControlKind,
    /// Bytes of its weights at f32.
    pub bytes_f32: u64,
}

impl ControlModel {
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let probe = store::probe(dir)?;
        let config = || read_json(&dir.join("config.json"));
        let kind = match probe.model_type {
            ModelType::ControlNet => {
                ControlKind::ControlNet(ControlNetConfig::from_json(&config()?)?)
            }
            ModelType::T2iAdapter => {
                ControlKind::T2iAdapter(T2iAdapterConfig::from_json(&config()?)?)
            }
            other => return Err(ModelError::NotControl(other)),
        };
        let base = probe.base.ok_or(ModelError::UnknownBase)?;
        Ok(ControlModel {
            dir: dir.to_path_buf(),
            base,
            kind,
            bytes_f32: probe.size_bytes.f32,
        })
    }

    /// Whether its residuals fit a UNet of this configuration.
    pub fn fits(&self, unet: &UNet2DConditionModelConfig) -> bool {
        match &self.kind {
            ControlKind::ControlNet(c) => c.fits(unet),
            // One feature per down block (an SDXL adapter's last after the
            // mid block), each of its block's width.
            ControlKind::T2iAdapter(a) => {
                let n = unet.blocks.len();
                a.channels.len() <= n + 1
                    && a.channels
                        .iter()
                        .enumerate()
                        .all(|(i, c)| unet.blocks[i.min(n - 1)].out_channels == *c)
            }
        }
    }

    /// The multiple image sides must be of.
    pub fn side_multiple(&self) -> usize {
        match &self.kind {
            ControlKind::ControlNet(_) => 8,
            ControlKind::T2iAdapter(a) => a.total_downscale(),
        }
    }

    pub fn key(&self) -> CacheKey {
        CacheKey::from(self.dir.clone())
    }
}

/// One ControlNet of a request: the network, its control image at the
/// generation's size, how strongly its residuals count (diffusers'
/// `controlnet_conditioning_scale`) and the share of the denoising it acts
/// in (`control_guidance_start` and `_end`).
#[derive(Debug, Clone)]
pub struct Control {
    pub model: Arc<ControlModel>,
    pub image: Image,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
}

/// Why a ControlNet cannot condition a generation.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("is for {control} models and the model is {model}")]
    Base {
        control: BaseModel,
        model: BaseModel,
    },
    #[error("needs image sides that are multiples of {0}")]
    Multiple(usize),
    #[error("its blocks do not match the model's UNet (another architecture of the same base)")]
    Shape,
    #[error("start {start} and end {end} must satisfy 0 ≤ start < end ≤ 1")]
    Span { start: f64, end: f64 },
    #[error("the control image is {got_w}x{got_h} but the generation is {want_w}x{want_h}")]
    Size {
        got_w: usize,
        got_h: usize,
        want_w: usize,
        want_h: usize,
    },
    #[error("control adapters need a text-to-image UNet; this model is an inpainting one")]
    Inpainting,
}

/// What can be refused before any weight is loaded.
pub fn check(
    model: &DiffusersModel,
    c: &Control,
    width: usize,
    height: usize,
) -> Result<(), ControlError> {
    if c.model.base != model.base {
        return Err(ControlError::Base {
            control: c.model.base,
            model: model.base,
        });
    }
    if !c.model.fits(&model.unet) {
        return Err(ControlError::Shape);
    }
    let m = c.model.side_multiple();
    if !width.is_multiple_of(m) || !height.is_multiple_of(m) {
        return Err(ControlError::Multiple(m));
    }
    if model.inpainting() {
        return Err(ControlError::Inpainting);
    }
    if !(0.0 <= c.start && c.start < c.end && c.end <= 1.0) {
        return Err(ControlError::Span {
            start: c.start,
            end: c.end,
        });
    }
    if (c.image.width, c.image.height) != (width, height) {
        return Err(ControlError::Size {
            got_w: c.image.width,
            got_h: c.image.height,
            want_w: width,
            want_h: height,
        });
    }
    Ok(())
}

/// Whether a ControlNet acting from `start` to `end` acts at evaluation `i`
/// of `len`: as diffusers decides it, off when the evaluation begins before
/// `start` or ends after `end`.
pub fn acts(i: usize, len: usize, start: f64, end: f64) -> bool {
    let len = len.max(1) as f64;
    !((i as f64) / len < start || (i as f64 + 1.0) / len > end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn acts_as_diffusers_keeps() {
        // Four steps, a ControlNet from 0.25 to 0.75: the middle two.
        let on: Vec<bool> = (0..4).map(|i| acts(i, 4, 0.25, 0.75)).collect();
        assert_eq!(on, [false, true, true, false]);
        assert!((0..4).all(|i| acts(i, 4, 0.0, 1.0)));
        // Ends that fall inside a step switch it off.
        assert!(!acts(0, 3, 0.0, 0.3));
    }

    proptest! {
        #[test]
        fn the_whole_span_acts_at_every_step_and_a_later_start_never_adds_steps(
            len in 1usize..60, a in 0.0f64..1.0, b in 0.0f64..1.0,
        ) {
            let (s1, s2) = (a.min(b), a.max(b));
            for i in 0..len {
                prop_assert!(acts(i, len, 0.0, 1.0));
                prop_assert!(!acts(i, len, s2, 1.0) || acts(i, len, s1, 1.0));
            }
        }
    }
}
