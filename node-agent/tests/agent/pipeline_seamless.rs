//! Seamless tiling. A tiling image has no edge along the wrapped axis: shifting
//! the starting noise around that axis shifts the image the same way. With the
//! VAE (every convolution wraps) this holds exactly; through the whole pipeline
//! (InvokeAI's rule leaves a UNet resnet's second convolution zero-padded) it
//! holds far better than without tiling. Random tiny weights give no smooth
//! image whose edge columns could be compared by eye, so this is the measure.

use candle_core::{Device, Tensor};
use modelcache_agent::cache::{CacheConfig, DiskLoader, ModelCache};
use modelcache_agent::pipeline::nets::vae::{VaeConfig, VaeDecoder};
use modelcache_agent::pipeline::rng::NormalRng;
use modelcache_agent::pipeline::{self, DiffusersModel, GenerateParams, Seamless};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    crate::common::fixtures().join("tiny-sd1")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Rolls the last (x) axis by `k` to the right.
fn roll_x(t: &Tensor, k: usize) -> Tensor {
    let n = t.dim(candle_core::D::Minus1).unwrap();
    Tensor::cat(
        &[
            &t.narrow(3, n - k, k).unwrap(),
            &t.narrow(3, 0, n - k).unwrap(),
        ],
        3,
    )
    .unwrap()
}

#[test]
fn the_vae_wraps_exactly() {
    let model = DiffusersModel::open(&fixture()).unwrap();
    let cache = ModelCache::new(
        CacheConfig::cpu(64 << 20, 64 << 20),
        Box::new(DiskLoader),
        None,
    );
    let vae = cache.get_device(&model.component("vae")).unwrap();
    let latents = NormalRng::new(5)
        .tensor(&[1, 4, 8, 16], &Device::Cpu)
        .unwrap();
    let decode = |s: Seamless, l: &Tensor| {
        let config = VaeConfig {
            seamless: s,
            ..model.vae.clone()
        };
        let d = VaeDecoder::new(vae.var_builder(), 3, &config).unwrap();
        d.decode(l).unwrap()
    };
    for (s, name) in [
        (Seamless { x: true, y: false }, "seamless x"),
        (Seamless::NONE, "plain"),
    ] {
        let shifted = decode(s, &roll_x(&latents, 3));
        let rolled = roll_x(&decode(s, &latents), 24);
        let err = max_diff(&shifted, &rolled);
        eprintln!("{name}: decode(roll(latents)) vs roll(decode(latents)): {err:.2e}");
        if s.x {
            assert!(err < 1e-4, "{err}");
        } else {
            assert!(err > 1e-2, "zero padding must show an edge: {err}");
        }
    }
}

#[test]
fn whole_images_wrap_around() {
    let model = DiffusersModel::open(&fixture()).unwrap();
    let cache = ModelCache::new(
        CacheConfig::cpu(64 << 20, 64 << 20),
        Box::new(DiskLoader),
        None,
    );
    // 256 px wide: latents 32 wide, shifted by 8 = one cell of the UNet's coarsest grid.
    let latents = NormalRng::new(9)
        .tensor(&[1, 4, 8, 32], &Device::Cpu)
        .unwrap();
    let image = |s: Seamless, l: Tensor| {
        let p = GenerateParams {
            prompt: "a red cat".into(),
            steps: 4,
            width: 256,
            height: 64,
            latents: Some(l),
            seamless: s,
            ..Default::default()
        };
        let img = pipeline::generate(&cache, &model, &p, &|_| true)
            .unwrap()
            .remove(0);
        Tensor::from_vec(img.data, (1, img.height, img.width, 3), &Device::Cpu)
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let err = |s: Seamless| {
        let a = image(s, latents.clone());
        let b = image(s, roll_x(&latents, 8));
        let diff = (&b - &roll_x(&a, 64)).unwrap().abs().unwrap();
        diff.mean_all().unwrap().to_scalar::<f32>().unwrap()
    };
    let (tiled, plain) = (err(Seamless { x: true, y: false }), err(Seamless::NONE));
    eprintln!("mean shift error: seamless x {tiled:.4}, plain {plain:.4}");
    assert!(tiled < 0.5 * plain, "seamless {tiled} vs plain {plain}");
}
