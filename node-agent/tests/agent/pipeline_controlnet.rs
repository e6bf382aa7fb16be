//! ControlNets against diffusers (`tests/fixtures/tiny-sd1-controlnet` and
//! `tiny-sdxl-controlnet`): one ControlNet, and two at once with their own
//! weights and start/end fractions, each compared with diffusers' float64 run.

use crate::common::{fixtures, max_abs_diff_from, reference_params, reference_run, tiny_cache};
use modelcache_agent::pipeline::image::decode_image;
use modelcache_agent::pipeline::{self, Control, ControlModel, DiffusersModel, GenerateParams};
use std::sync::Arc;

fn dir(base: &str) -> std::path::PathBuf {
    fixtures().join(format!("{base}-controlnet"))
}

fn reference(base: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(base).join("reference.json")).unwrap())
        .unwrap()
}

/// A number or the `i`-th of a list, as diffusers takes either.
fn nth(v: &serde_json::Value, i: usize) -> f64 {
    v.as_f64().unwrap_or_else(|| v[i].as_f64().unwrap())
}

/// The reference run `name` as a request on the tiny `base` model.
fn params(base: &str, name: &str) -> GenerateParams {
    let (r, latents) = reference_run(&fixtures().join(base));
    let reference = reference(base);
    let run = &reference["runs"][name];
    let dir = dir(base);
    let image = decode_image(&std::fs::read(dir.join("control.png")).unwrap(), 1 << 22).unwrap();
    let controls = run["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, n)| Control {
            model: Arc::new(ControlModel::open(&dir.join(n.as_str().unwrap())).unwrap()),
            image: image.clone(),
            weight: nth(&run["conditioning_scale"], i),
            start: nth(&run["control_guidance_start"], i),
            end: nth(&run["control_guidance_end"], i),
        })
        .collect();
    GenerateParams {
        controls,
        negative_prompt: reference["negative_prompt"].as_str().unwrap().into(),
        ..reference_params(&r, latents)
    }
}

fn generate(base: &str, p: &GenerateParams) -> Vec<f32> {
    let model = DiffusersModel::open(&fixtures().join(base)).unwrap();
    pipeline::generate(&tiny_cache(), &model, p, &|_| true)
        .unwrap()
        .remove(0)
        .data
}

fn check(base: &str, name: &str) -> Vec<f32> {
    let image = generate(base, &params(base, name));
    let d = max_abs_diff_from(&image, &dir(base).join(format!("reference_{name}_f64.npy")));
    let f32_run = reference(base)["runs"][name]["fp32_vs_f64_max_abs_diff"]
        .as_f64()
        .unwrap();
    eprintln!("{base} controlnet {name}: {d:.2e} from diffusers' float64 run (its float32 run: {f32_run:.2e})");
    assert!(d < 1e-3, "{base} {name}: max abs difference {d}");
    image
}

#[test]
fn one_controlnet_matches_diffusers() {
    for base in ["tiny-sd1", "tiny-sd2", "tiny-sdxl"] {
        check(base, "single");
    }
}

#[test]
fn two_controlnets_with_their_own_weights_and_spans_match_diffusers() {
    for base in ["tiny-sd1", "tiny-sd2", "tiny-sdxl"] {
        check(base, "multi");
    }
}

#[test]
fn the_canny_preprocessor_finds_opencv_s_edges() {
    let dir = fixtures().join("canny");
    let photo = decode_image(&std::fs::read(dir.join("photo.png")).unwrap(), 1 << 22).unwrap();
    let want = decode_image(
        &std::fs::read(dir.join("canny_100_200.png")).unwrap(),
        1 << 22,
    )
    .unwrap();
    let got = modelcache_agent::pipeline::canny::canny(&photo, 100.0, 200.0);
    let differ = got
        .data
        .iter()
        .zip(&want.data)
        .filter(|(a, b)| a != b)
        .count();
    let edges = want.data.iter().filter(|v| **v > 0.5).count() / 3;
    assert!(edges > 100, "the fixture has edges: {edges}");
    assert_eq!(differ, 0, "{differ} values differ from cv2.Canny's");
}

#[test]
fn a_controlnet_at_weight_zero_or_outside_its_span_changes_nothing() {
    let plain = generate("tiny-sd1", &params("tiny-sd1", "single"));
    let mut p = params("tiny-sd1", "single");
    let controls = std::mem::take(&mut p.controls);
    let uncontrolled = generate("tiny-sd1", &p);
    assert!(
        crate::common::max_abs_diff(&plain, &uncontrolled) > 0.01,
        "the control moves the image"
    );
    p.controls = controls.clone();
    p.controls[0].weight = 0.0;
    assert_eq!(generate("tiny-sd1", &p), uncontrolled);
    // Four steps, acting only within (0.1, 0.2): no step lies inside.
    p.controls = controls;
    (p.controls[0].start, p.controls[0].end) = (0.1, 0.2);
    assert_eq!(generate("tiny-sd1", &p), uncontrolled);
}

#[test]
fn controlnets_that_cannot_condition_the_model_are_refused_before_any_work() {
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let cache = tiny_cache();
    let refused = |p: &GenerateParams| {
        let e = pipeline::generate(&cache, &model, p, &|_| true).unwrap_err();
        assert!(cache.entries().is_empty(), "nothing was loaded");
        e.to_string()
    };
    // An SDXL ControlNet on an SD 1.x model.
    let mut p = params("tiny-sd1", "single");
    p.controls[0].model =
        Arc::new(ControlModel::open(&dir("tiny-sdxl").join("controlnet-a")).unwrap());
    let e = refused(&p);
    assert!(e.contains("is for Sdxl models and the model is Sd1"), "{e}");
    let mut p = params("tiny-sd1", "single");
    p.controls[0].image = p.controls[0].image.resized(72, 64);
    let e = refused(&p);
    assert!(e.contains("72x64") && e.contains("64x64"), "{e}");
    let mut p = params("tiny-sd1", "multi");
    p.controls[1].start = 0.9;
    p.controls[1].end = 0.5;
    let e = refused(&p);
    assert!(e.contains("controlnet 1") && e.contains("start 0.9"), "{e}");
}

#[test]
fn the_command_line_takes_controlnets_and_matches_diffusers() {
    let out = tempfile::tempdir().unwrap();
    let d = dir("tiny-sd1");
    let run = |controlnet: &str| {
        crate::common::generate_reference_cli(
            &["--controlnet".into(), controlnet.into()],
            &out.path().join("state"),
            &out.path().join("out.npy"),
        )
    };
    let image = d.join("control.png");
    // The single file, converted on the way, with diffusers' multi run's first net.
    let o = run(&format!(
        "model={},image={},weight=0.8",
        d.join("controlnet-a.safetensors").display(),
        image.display()
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, got) = modelcache_agent::pipeline::image::read_npy(
        &std::fs::read(out.path().join("out.npy")).unwrap(),
    )
    .unwrap();
    let diff = max_abs_diff_from(&got, &d.join("reference_single_f64.npy"));
    assert!(diff < 1e-3, "{diff}");
    for (bad, says) in [
        (format!("model={}", d.display()), "image=PNG is required"),
        (
            "model=a,image=b,weight=x".to_string(),
            "weight=\"x\" is not a number",
        ),
        ("model=a,image=b,preprocess=depth".to_string(), "only canny"),
    ] {
        let o = run(&bad);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{bad}: {err}");
    }
}

/// The T2I-Adapter reference run `fixture` (`tiny-sd1-t2i-adapter`…) on
/// the tiny `base` model.
fn t2i_run(base: &str, fixture: &str) -> (GenerateParams, std::path::PathBuf, f64) {
    let dir = fixtures().join(fixture);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let (base_ref, latents) = reference_run(&fixtures().join(base));
    let image = decode_image(&std::fs::read(dir.join("control.png")).unwrap(), 1 << 22).unwrap();
    let p = GenerateParams {
        controls: vec![Control {
            model: Arc::new(ControlModel::open(&dir.join("adapter")).unwrap()),
            image,
            weight: r["adapter_conditioning_scale"].as_f64().unwrap(),
            start: 0.0,
            end: r["adapter_conditioning_factor"].as_f64().unwrap(),
        }],
        negative_prompt: r["negative_prompt"].as_str().unwrap().into(),
        ..reference_params(&base_ref, latents)
    };
    (p, dir, r["fp32_vs_f64_max_abs_diff"].as_f64().unwrap())
}

/// The full T2I-Adapter reference run on the tiny `base` model.
fn t2i_params(base: &str) -> (GenerateParams, std::path::PathBuf, f64) {
    t2i_run(base, &format!("{base}-t2i-adapter"))
}

#[test]
fn t2i_adapters_match_diffusers() {
    for (base, fixture) in [
        ("tiny-sd1", "tiny-sd1-t2i-adapter"),
        ("tiny-sd1", "tiny-sd1-t2i-light-adapter"),
        ("tiny-sdxl", "tiny-sdxl-t2i-adapter"),
    ] {
        let (p, dir, f32_run) = t2i_run(base, fixture);
        let image = generate(base, &p);
        let d = max_abs_diff_from(&image, &dir.join("reference_f64.npy"));
        eprintln!(
            "{fixture}: {d:.2e} from diffusers' float64 run (its float32 run: {f32_run:.2e})"
        );
        assert!(d < 1e-3, "{fixture}: max abs difference {d}");
    }
}

#[test]
fn a_controlnet_and_a_t2i_adapter_act_together() {
    let (mut p, _, _) = t2i_params("tiny-sd1");
    let adapter_only = generate("tiny-sd1", &p);
    p.controls.extend(params("tiny-sd1", "single").controls);
    let both = generate("tiny-sd1", &p);
    assert!(crate::common::max_abs_diff(&both, &adapter_only) > 0.01);
    // An adapter needs sides that are multiples of its downscale (64 here).
    p.width = 72;
    for c in &mut p.controls {
        c.image = c.image.resized(72, 64);
    }
    p.latents = None;
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let e = pipeline::generate(&tiny_cache(), &model, &p, &|_| true).unwrap_err();
    assert!(e.to_string().contains("multiples of 64"), "{e}");
}

mod cache_invariants {
    use super::*;
    use modelcache_agent::cache::{CacheConfig, CacheError, DiskLoader, ModelCache, TierKind};
    use modelcache_agent::pipeline::{IpAdapter, IpAdapterModel, PipelineError};
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A request on tiny-sd1 with the conditioning models `which` selects:
    /// ControlNet a, ControlNet b, the T2I-Adapter, the IP-Adapter.
    fn request(which: [bool; 4]) -> GenerateParams {
        let mut p = params("tiny-sd1", "multi");
        let mut controls = Vec::new();
        for (i, c) in p.controls.drain(..).enumerate() {
            if which[i] {
                controls.push(c);
            }
        }
        if which[2] {
            controls.extend(t2i_params("tiny-sd1").0.controls);
        }
        p.controls = controls;
        if which[3] {
            let dir = fixtures().join("tiny-sd1-ip-adapter");
            p.ip_adapter = Some(IpAdapter {
                model: Arc::new(
                    IpAdapterModel::open(
                        &dir.join("ip-adapter.safetensors"),
                        &dir.join("image_encoder"),
                    )
                    .unwrap(),
                ),
                image: decode_image(&std::fs::read(dir.join("ip_image.png")).unwrap(), 1 << 22)
                    .unwrap(),
                weight: 0.6,
            });
        }
        p.steps = 2;
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

        /// Generations with any mix of ControlNets, a T2I-Adapter and an
        /// IP-Adapter through small RAM and device tiers: no tier ever holds
        /// more than its budget, nothing stays locked after a generation, a
        /// generation that does not fit fails with "cache full" (and leaves
        /// nothing locked), and one that runs makes the image it makes with
        /// room to spare, whatever was evicted for it.
        #[test]
        fn conditioned_generations_keep_the_cache_s_invariants(
            ram_mib in 8u64..48, device_mib in 8u64..48,
            requests in proptest::collection::vec(any::<[bool; 4]>(), 1..6),
        ) {
            static ROOMY: Mutex<Option<HashMap<[bool; 4], Vec<f32>>>> = Mutex::new(None);
            let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
            let cache = ModelCache::new(
                CacheConfig::cpu(ram_mib << 20, device_mib << 20),
                Box::new(DiskLoader),
                None,
            );
            for which in requests {
                let p = request(which);
                let r = pipeline::generate(&cache, &model, &p, &|_| true);
                let (ram, dev) = cache.stats();
                prop_assert!(ram.used <= ram.budget, "RAM {}/{}", ram.used, ram.budget);
                prop_assert!(dev.used <= dev.budget, "device {}/{}", dev.used, dev.budget);
                let entries = cache.entries();
                prop_assert!(entries.iter().all(|e| !e.locked), "locked after: {:?}", entries);
                let on_device = entries
                    .iter()
                    .filter(|e| e.tier == TierKind::Device)
                    .count();
                match r {
                    Ok(images) => {
                        prop_assert!(on_device > 0, "the generation left its models cached");
                        let mut roomy = ROOMY.lock().unwrap();
                        let want = roomy
                            .get_or_insert_with(HashMap::new)
                            .entry(which)
                            .or_insert_with(|| generate("tiny-sd1", &p))
                            .clone();
                        prop_assert_eq!(&images[0].data, &want);
                    }
                    Err(PipelineError::Cache(CacheError::CacheFull { .. })) => {}
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }
        }
    }
}

#[test]
fn a_controlnet_reserves_room_for_its_residuals_beside_each_image() {
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let per_image =
        |p: &GenerateParams| pipeline::batch::activation_bytes(&model, p, candle_core::DType::F32);
    let mut p = params("tiny-sd1", "multi");
    let two = per_image(&p);
    p.controls.truncate(1);
    let one = per_image(&p);
    p.controls.clear();
    let none = per_image(&p);
    assert!(none < one && one < two, "{none} < {one} < {two}");
    // A T2I-Adapter's features are computed once and cost a step nothing more.
    let (adapted, _, _) = t2i_params("tiny-sd1");
    assert_eq!(per_image(&adapted), none);
}

#[test]
fn the_catalog_opens_a_conditioning_model_once_until_the_folder_is_searched_again() {
    use modelcache_agent::catalog::Catalog;
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    crate::common::copy_dir(&dir("tiny-sd1").join("controlnet-a"), &models.join("cn"));
    crate::common::copy_dir(&fixtures().join("tiny-sd1-ip-adapter"), &models.join("ip"));
    let catalog = Catalog::scan(&models, &tmp.path().join("state"), None);
    let cn = catalog.controlnet("cn").unwrap();
    assert!(Arc::ptr_eq(&cn, &catalog.controlnet("./cn/").unwrap()));
    let ip = catalog
        .ip_adapter("ip/ip-adapter.safetensors", None)
        .unwrap();
    let again = catalog
        .ip_adapter("ip/ip-adapter.safetensors", None)
        .unwrap();
    assert!(Arc::ptr_eq(&ip, &again));
    // A named encoder is another adapter; a rescan forgets them all.
    let named = catalog
        .ip_adapter("ip/ip-adapter.safetensors", Some("ip/image_encoder"))
        .unwrap();
    assert!(!Arc::ptr_eq(&ip, &named));
    catalog.rescan();
    assert!(!Arc::ptr_eq(&cn, &catalog.controlnet("cn").unwrap()));
    // A failure is not kept: a model copied in later is found.
    assert!(catalog.controlnet("cn2").is_err());
    crate::common::copy_dir(&dir("tiny-sd1").join("controlnet-b"), &models.join("cn2"));
    catalog.rescan();
    assert!(catalog.controlnet("cn2").is_ok());
}
