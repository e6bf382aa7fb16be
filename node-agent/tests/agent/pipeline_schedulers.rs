//! Every scheduler against diffusers (`tests/fixtures/*-schedulers`): the same
//! initial latents (and, for Euler ancestral, the same per-step noise),
//! compared with diffusers' float64 run; and a model's own scheduler, named
//! by its `scheduler_config.json`, used when a request names none.

use crate::common::{draws, fixtures, max_abs_diff_from, tiny_cache, tiny_sd1_with_scheduler};
use candle_core::Device;
use modelcache_agent::pipeline::{self, DiffusersModel, GenerateParams};
use modelcache_crds::SchedulerKind;

fn run_all(model: &std::path::Path, fixture: &str) {
    let dir = fixtures().join(fixture);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let latents = candle_core::safetensors::load(dir.join("noise.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("latents")
        .unwrap();
    let draws = draws(&dir.join("noise.safetensors"), "draws");
    let model = DiffusersModel::open(model).unwrap();
    let cache = tiny_cache();
    let runs = r["runs"].as_object().unwrap();
    assert_eq!(
        runs.len(),
        SchedulerKind::ALL.len(),
        "a reference for every scheduler"
    );
    for (name, run) in runs {
        let kind: SchedulerKind = name.parse().unwrap();
        let p = GenerateParams {
            prompt: r["prompt"].as_str().unwrap().into(),
            steps: r["steps"].as_u64().unwrap() as usize,
            guidance_scale: r["guidance_scale"].as_f64().unwrap(),
            width: 64,
            height: 64,
            scheduler: Some(kind),
            latents: Some(latents.clone()),
            draws: Some(draws.clone()),
            ..Default::default()
        };
        let image = pipeline::generate(&cache, &model, &p, &|_| true).unwrap();
        let d = max_abs_diff_from(&image[0].data, &dir.join(format!("{name}_f64.npy")));
        let f32_d = run["fp32_vs_f64_max_abs_diff"].as_f64().unwrap();
        eprintln!(
            "{fixture} {name}: {d:.2e} from diffusers' float64 run (its float32 run: {f32_d:.2e})"
        );
        assert!(d < 1e-3, "{fixture} {name}: max abs difference {d}");
    }
}

#[test]
fn every_scheduler_matches_diffusers_on_an_epsilon_model() {
    run_all(&fixtures().join("tiny-sd1"), "tiny-sd1-schedulers");
}

#[test]
fn every_scheduler_matches_diffusers_on_a_v_prediction_model() {
    // tiny-sd1's weights read as a v-prediction model, as a sidecar YAML
    // with `parameterization: "v"` makes of a checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_sd1_with_scheduler(dir.path(), |v| v["prediction_type"] = "v_prediction".into());
    run_all(&m, "tiny-sd1-schedulers-v");
}

#[test]
fn a_model_s_own_scheduler_is_the_default_and_unknown_names_list_the_known() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_sd1_with_scheduler(dir.path(), |v| {
        v["_class_name"] = "EulerDiscreteScheduler".into()
    });
    let model = DiffusersModel::open(&m).unwrap();
    assert_eq!(model.schedule.default_kind, SchedulerKind::Euler);
    let p = |scheduler| GenerateParams {
        prompt: "a red cat".into(),
        steps: 3,
        width: 64,
        height: 64,
        seed: 4,
        scheduler,
        ..Default::default()
    };
    let cache = tiny_cache();
    let own = pipeline::generate(&cache, &model, &p(None), &|_| true).unwrap();
    let euler =
        pipeline::generate(&cache, &model, &p(Some(SchedulerKind::Euler)), &|_| true).unwrap();
    let ddim =
        pipeline::generate(&cache, &model, &p(Some(SchedulerKind::Ddim)), &|_| true).unwrap();
    assert_eq!(own, euler);
    assert_ne!(own, ddim);
    let e = "karras".parse::<SchedulerKind>().unwrap_err().to_string();
    for name in [
        "ddim",
        "euler",
        "heun",
        "lms",
        "pndm",
        "dpm++2m-karras",
        "unipc",
    ] {
        assert!(e.contains(name), "{e}");
    }
}
