//! Several requests' images denoised as one batch: which requests may share
//! a UNet forward pass ([`BatchKey`]), what each is told while the batch runs
//! ([`Member`], [`Previews`]), and how many images fit beside the weights
//! ([`activation_bytes`]).
//!
//! A UNet evaluation of B images costs far less than B evaluations of one
//! (the weights are read once, the matrix products are larger), so requests
//! that differ only in their prompts, seeds and image counts run together.
//! Every image keeps its own generator, so it is the image it would have
//! been alone.

use super::{DiffusersModel, GenerateParams, Progress, Seamless};
use candle_core::DType;
#[cfg(test)]
use candle_core::Tensor;
use modelcache_crds::SchedulerKind;
use std::path::{Path, PathBuf};

/// What requests must share to run as one batch: the model and every
/// setting but their prompts, seeds and image counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    model: PathBuf,
    steps: usize,
    guidance_scale: u64,
    width: usize,
    height: usize,
    scheduler: Option<SchedulerKind>,
    clip_skip: usize,
    loras: Vec<(PathBuf, u64)>,
    seamless: Seamless,
    vae: Option<PathBuf>,
    refiner: Option<(PathBuf, u64)>,
    dtype: Option<DType>,
}

impl BatchKey {
    /// The batch `p` may join for `model`; `None` for a request that runs
    /// alone: an edit (its image and strength are its own), one conditioned
    /// on images of its own (control adapters, an IP-Adapter), or one that
    /// brings its own latents or noise.
    pub fn of(model: &Path, p: &GenerateParams) -> Option<Self> {
        if p.edit.is_some()
            || p.latents.is_some()
            || p.draws.is_some()
            || !p.controls.is_empty()
            || p.ip_adapter.is_some()
        {
            return None;
        }
        Some(BatchKey {
            model: model.to_path_buf(),
            steps: p.steps,
            guidance_scale: p.guidance_scale.to_bits(),
            width: p.width,
            height: p.height,
            scheduler: p.scheduler,
            clip_skip: p.clip_skip,
            loras: p
                .loras
                .iter()
                .map(|(f, w)| (f.clone(), w.to_bits()))
                .collect(),
            seamless: p.seamless,
            vae: p.vae.clone(),
            refiner: p
                .refiner
                .as_ref()
                .map(|r| (r.model.dir.clone(), r.switch.to_bits())),
            dtype: p.dtype,
        })
    }
}

/// One request of a batch.
pub struct Member<'a> {
    pub params: &'a GenerateParams,
    /// Told every step and VAE block; returning false cancels this request
    /// alone (the batch stops when all of its requests have).
    pub progress: Progress<'a>,
    pub previews: Option<&'a dyn Previews>,
}

/// Where a request's previews go while it is denoised.
pub trait Previews: Sync {
    /// Whether to preview after `step` of `steps`.
    fn wants(&self, step: usize, steps: usize) -> bool;
    /// A preview of image `image` after `step`, at the image's size
    /// ([`super::preview`]).
    fn show(&self, image: usize, step: usize, preview: super::Image);
}

/// Device memory one more image's denoising needs at `width`×`height`
/// (both conditioning rows under guidance): the attention scores of the
/// highest-resolution transformer (heads × tokens², materialised on a GPU)
/// plus the widest level's feature maps a UNet keeps for its skip
/// connections, and as many again for each ControlNet (its residuals wait
/// for the UNet). An estimate that errs high; the budget's headroom has
/// always held one image's.
pub fn activation_bytes(model: &DiffusersModel, p: &GenerateParams, dtype: DType) -> u64 {
    let tokens = ((p.width / 8) * (p.height / 8)) as u64;
    let rows = if p.guidance_scale > 1.0 { 2 } else { 1 };
    let first = model.unet.blocks.first();
    let channels = first.map_or(320, |b| b.out_channels) as u64;
    let heads = first
        .filter(|b| b.use_cross_attn.is_some())
        .map_or(0, |b| (b.out_channels / b.attention_head_dim.max(1)).max(1))
        as u64;
    // Skip connections: 3 × layers_per_block + 1 maps per level, the first
    // level the largest; each level down has a quarter of the tokens.
    let maps = (3 * model.unet.layers_per_block as u64 + 1) * channels * tokens * 4 / 3;
    let controlnets = p
        .controls
        .iter()
        .filter(|c| matches!(c.model.kind, super::control::ControlKind::ControlNet(_)))
        .count() as u64;
    rows * (heads * tokens * tokens + maps * (1 + controlnets)) * dtype.size_in_bytes() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_differing_only_in_prompt_seed_and_count_share_a_batch() {
        let model = Path::new("/models/sd15");
        let a = GenerateParams {
            prompt: "a cat".into(),
            seed: 1,
            ..Default::default()
        };
        let b = GenerateParams {
            prompt: "a dog".into(),
            negative_prompt: "blurry".into(),
            seed: 99,
            n: 3,
            ..Default::default()
        };
        assert_eq!(BatchKey::of(model, &a), BatchKey::of(model, &b));
        assert_ne!(
            BatchKey::of(model, &a),
            BatchKey::of(Path::new("/models/other"), &a)
        );
        let differ: [fn(&mut GenerateParams); 8] = [
            |p| p.steps += 1,
            |p| p.guidance_scale = 3.0,
            |p| p.width = 256,
            |p| p.scheduler = Some(SchedulerKind::Euler),
            |p| p.clip_skip = 2,
            |p| p.loras = vec![("/l.safetensors".into(), 0.5)],
            |p| p.seamless = Seamless { x: true, y: false },
            |p| p.dtype = Some(DType::F16),
        ];
        for change in differ {
            let mut c = a.clone();
            change(&mut c);
            assert_ne!(BatchKey::of(model, &a), BatchKey::of(model, &c), "{c:?}");
        }
        let edit = GenerateParams {
            latents: Some(
                Tensor::zeros((1, 4, 8, 8), DType::F32, &candle_core::Device::Cpu).unwrap(),
            ),
            ..a
        };
        assert_eq!(BatchKey::of(model, &edit), None);
    }
}
