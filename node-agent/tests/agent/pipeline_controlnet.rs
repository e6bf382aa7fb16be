//! ControlNets against diffusers (`tests/fixtures/tiny-sd1-controlnet`): one
//! ControlNet, and two at once with their own weights and start/end
//! fractions, each compared with diffusers' float64 run.

use crate::common::{fixtures, max_abs_diff_from, reference_params, reference_run, tiny_cache};
use modelcache_agent::pipeline::image::decode_image;
use modelcache_agent::pipeline::{self, Control, ControlModel, DiffusersModel, GenerateParams};
use std::sync::Arc;

fn dir() -> std::path::PathBuf {
    fixtures().join("tiny-sd1-controlnet")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap()
}

/// A number or the `i`-th of a list, as diffusers takes either.
fn nth(v: &serde_json::Value, i: usize) -> f64 {
    v.as_f64().unwrap_or_else(|| v[i].as_f64().unwrap())
}

/// The reference run `name` as a request on tiny-sd1.
fn params(name: &str) -> GenerateParams {
    let (r, latents) = reference_run(&fixtures().join("tiny-sd1"));
    let run = &reference()["runs"][name];
    let image = decode_image(&std::fs::read(dir().join("control.png")).unwrap(), 1 << 22).unwrap();
    let controls = run["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, n)| Control {
            model: Arc::new(ControlModel::open(&dir().join(n.as_str().unwrap())).unwrap()),
            image: image.clone(),
            weight: nth(&run["conditioning_scale"], i),
            start: nth(&run["control_guidance_start"], i),
            end: nth(&run["control_guidance_end"], i),
        })
        .collect();
    GenerateParams {
        controls,
        ..reference_params(&r, latents)
    }
}

fn check(name: &str) -> Vec<f32> {
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let images = pipeline::generate(&tiny_cache(), &model, &params(name), &|_| true).unwrap();
    let d = max_abs_diff_from(
        &images[0].data,
        &dir().join(format!("reference_{name}_f64.npy")),
    );
    let f32_run = reference()["runs"][name]["fp32_vs_f64_max_abs_diff"]
        .as_f64()
        .unwrap();
    eprintln!(
        "controlnet {name}: {d:.2e} from diffusers' float64 run (its float32 run: {f32_run:.2e})"
    );
    assert!(d < 1e-3, "{name}: max abs difference {d}");
    images.into_iter().next().unwrap().data
}

#[test]
fn one_controlnet_matches_diffusers() {
    check("single");
}

#[test]
fn two_controlnets_with_their_own_weights_and_spans_match_diffusers() {
    check("multi");
}
