//! The SDXL refiner: the base denoises to `denoising_end` and hands its
//! latents over unnoised, the refiner (one text encoder, aesthetic-score time
//! ids) finishes and decodes, against diffusers' own two-stage runs of
//! tests/fixtures/tiny-sdxl-refiner (`gen_tiny_refiner.py`), held within 1e-3
//! per pixel of the float64 run, for a first-order, a sigma-space and a
//! second-order scheduler.

use modelcache_agent::pipeline::{self, DiffusersModel, GenerateParams, Refiner};
use modelcache_crds::{BaseModel, SchedulerKind};
use std::path::PathBuf;
use std::sync::Arc;

fn fixture() -> PathBuf {
    crate::common::fixtures().join("tiny-sdxl-refiner")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

/// The fixture's request with `scheduler`, refined from `switch` (or not).
fn run(scheduler: SchedulerKind, switch: Option<f64>) -> Vec<f32> {
    let base_dir = crate::common::fixtures().join("tiny-sdxl");
    let (_, latents) = crate::common::reference_run(&base_dir);
    let r = reference();
    let base = DiffusersModel::open(&base_dir).unwrap();
    let refiner = DiffusersModel::open_refiner(&fixture()).unwrap();
    assert_eq!(refiner.base, BaseModel::SdxlRefiner);
    assert_eq!(refiner.components(), ["text_encoder_2", "unet", "vae"]);
    let p = GenerateParams {
        negative_prompt: r["negative_prompt"].as_str().unwrap().into(),
        scheduler: Some(scheduler),
        refiner: switch.map(|switch| Refiner {
            model: Arc::new(refiner),
            switch,
        }),
        ..crate::common::reference_params(&r, latents)
    };
    let cache = crate::common::tiny_cache();
    let mut steps = Vec::new();
    let progress = std::sync::Mutex::new(&mut steps);
    let image = pipeline::generate(&cache, &base, &p, &|stage| {
        if let pipeline::Stage::Denoising { step, steps, .. } = stage {
            progress.lock().unwrap().push((step, steps));
        }
        true
    })
    .unwrap()
    .remove(0)
    .data;
    // Progress counts the base's and the refiner's evaluations as one run.
    let total = steps.last().unwrap().1;
    assert_eq!(steps, (1..=total).map(|s| (s, total)).collect::<Vec<_>>());
    image
}

#[test]
fn base_then_refiner_matches_diffusers_ensemble_of_experts() {
    let r = reference();
    let switch = r["denoising_end"].as_f64().unwrap();
    for (name, kind) in [
        ("ddim", SchedulerKind::Ddim),
        ("euler", SchedulerKind::Euler),
        ("heun", SchedulerKind::Heun),
    ] {
        let got = run(kind, Some(switch));
        let diff = |suffix: &str| {
            crate::common::max_abs_diff_from(
                &got,
                &fixture().join(format!("reference_{name}{suffix}.npy")),
            )
        };
        let (exact, fp32) = (diff("_f64"), diff(""));
        let own = r["fp32_vs_f64_max_abs_diff"][name].as_f64().unwrap();
        eprintln!(
            "refiner {name}: max abs diff {exact:.2e} from diffusers float64 ({own:.2e} its float32), {fp32:.2e} from float32"
        );
        assert!(exact < 1e-3, "{name}: {exact}");
        assert!(fp32 < 1e-3, "{name}: {fp32}");
    }
}

#[test]
fn the_refiner_changes_the_image_and_a_switch_of_one_skips_it() {
    let refined = run(SchedulerKind::Ddim, Some(0.75));
    let alone = run(SchedulerKind::Ddim, None);
    assert!(crate::common::max_abs_diff(&refined, &alone) > 1e-2);
    // Handing over earlier gives the refiner more of the schedule.
    let earlier = run(SchedulerKind::Ddim, Some(0.2));
    assert!(crate::common::max_abs_diff(&earlier, &refined) > 1e-3);
}

#[test]
fn a_refiner_is_refused_for_other_models_and_as_a_model() {
    let refiner = Arc::new(DiffusersModel::open_refiner(&fixture()).unwrap());
    let sd1 = DiffusersModel::open(&crate::common::fixtures().join("tiny-sd1")).unwrap();
    let p = GenerateParams {
        prompt: "a cat".into(),
        width: 64,
        height: 64,
        steps: 2,
        refiner: Some(Refiner {
            model: refiner,
            switch: 0.8,
        }),
        ..Default::default()
    };
    let err = pipeline::generate(&crate::common::tiny_cache(), &sd1, &p, &|_| true).unwrap_err();
    assert!(
        err.to_string().contains("refines SDXL images, not"),
        "{err}"
    );
    let err = DiffusersModel::open(&fixture()).err().unwrap();
    assert!(err.to_string().contains("refiner"), "{err}");
    let err = DiffusersModel::open_refiner(&crate::common::fixtures().join("tiny-sdxl"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("not an SDXL refiner"), "{err}");
}
