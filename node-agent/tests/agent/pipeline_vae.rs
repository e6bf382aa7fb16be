//! A VAE in place of the model's own, against diffusers with the same VAE
//! (`tests/fixtures/tiny-sd1-vae`), as a diffusers folder and as the original
//! layout's single file, converted.

use crate::common::{fixtures, max_abs_diff, max_abs_diff_from, reference_params, tiny_cache};
use modelcache_agent::pipeline::{self, DiffusersModel};
use modelcache_agent::store::convert;

#[test]
fn a_vae_override_matches_diffusers_as_a_folder_and_as_a_converted_file() {
    let (r, latents) = crate::common::reference_run(&fixtures().join("tiny-sd1"));
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let cache = tiny_cache();
    let dir = fixtures().join("tiny-sd1-vae");
    let p = pipeline::GenerateParams {
        vae: Some(dir.clone()),
        ..reference_params(&r, latents.clone())
    };
    let folder = pipeline::generate(&cache, &model, &p, &|_| true).unwrap();
    let d = max_abs_diff_from(&folder[0].data, &dir.join("reference_image_f64.npy"));
    eprintln!("vae override: {d:.2e} from diffusers' float64 run");
    assert!(d < 1e-3, "max abs difference {d}");
    let own =
        pipeline::generate(&cache, &model, &reference_params(&r, latents), &|_| true).unwrap();
    assert!(
        max_abs_diff(&own[0].data, &folder[0].data) > 0.1,
        "the override is used"
    );
    let state = tempfile::tempdir().unwrap();
    let converted =
        convert::converted_vae(state.path(), &fixtures().join("tiny-sd1-vae.safetensors")).unwrap();
    let file = pipeline::generate(
        &cache,
        &model,
        &pipeline::GenerateParams {
            vae: Some(converted),
            ..p
        },
        &|_| true,
    )
    .unwrap();
    assert_eq!(file, folder, "the converted file is the same VAE");
}
