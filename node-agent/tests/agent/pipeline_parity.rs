//! Numerical parity with diffusers on the reference fixtures.

use crate::common::{fixtures, max_abs_diff, reference_params as params, tiny_cache as cache};
use candle_core::{Device, Tensor};
use modelcache_agent::cache::{CacheConfig, DeviceSlot, DiskLoader, ModelCache, TierKind};
use modelcache_agent::pipeline::{self, image::read_npy, DiffusersModel, GenerateParams, Stage};
use modelcache_agent::store::convert;
use modelcache_crds::SchedulerKind;

fn reference() -> (serde_json::Value, Tensor, Vec<f32>) {
    let f = fixtures().join("tiny-sd1");
    let (r, latents) = crate::common::reference_run(&f);
    let (shape, image) = read_npy(&std::fs::read(f.join("reference_image.npy")).unwrap()).unwrap();
    assert_eq!(shape, vec![64, 64, 3]);
    (r, latents, image)
}

#[test]
fn components_spread_over_several_devices_reproduce_the_reference_image() {
    let (r, latents, want) = reference();
    // Three device tiers (a three-GPU node, here three CPU tiers): each
    // component goes to the one with the most room, so all three are apart.
    let slot = || DeviceSlot {
        device: Device::Cpu,
        budget: 64 << 20,
    };
    let config = CacheConfig {
        devices: vec![slot(), slot(), slot()],
        ..CacheConfig::cpu(64 << 20, 0)
    };
    let cache = ModelCache::new(config, Box::new(DiskLoader), None);
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let images = pipeline::generate(&cache, &model, &params(&r, latents), &|_| true).unwrap();
    let mut slots: Vec<usize> = cache
        .entries()
        .iter()
        .filter(|e| e.tier == TierKind::Device)
        .map(|e| e.slot)
        .collect();
    slots.sort();
    assert_eq!(slots, [0, 1, 2], "one component per device");
    let d = max_abs_diff(&images[0].data, &want);
    assert!(d < 1e-3, "max abs difference {d}");
}

#[test]
fn token_ids_match_the_reference() {
    let (r, _, _) = reference();
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let ids = model
        .text
        .tokenizer
        .encode(r["prompt"].as_str().unwrap())
        .unwrap();
    let want: Vec<u32> = r["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want);
}

#[test]
fn diffusers_folder_reproduces_the_reference_image() {
    let (r, latents, want) = reference();
    let cache = cache();
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let images = pipeline::generate(&cache, &model, &params(&r, latents), &|_| true).unwrap();
    let d = max_abs_diff(&images[0].data, &want);
    eprintln!("tiny-sd1: max abs diff {d:.2e} from diffusers float32");
    assert!(d < 1e-3, "max abs difference {d}");
}

#[test]
fn single_file_checkpoint_reproduces_the_reference_image() {
    let (r, latents, want) = reference();
    let state = tempfile::tempdir().unwrap();
    let f = fixtures();
    let dir = convert::converted(
        state.path(),
        &f.join("tiny-sd1-single.safetensors"),
        Some(&f.join("tiny-sd1")),
        None,
    )
    .unwrap();
    let model = DiffusersModel::open(&dir).unwrap();
    let images = pipeline::generate(&cache(), &model, &params(&r, latents), &|_| true).unwrap();
    let d = max_abs_diff(&images[0].data, &want);
    assert!(d < 1e-3, "max abs difference {d}");
}

#[test]
fn seeds_reproduce_and_differ_and_cancellation_stops() {
    let cache = cache();
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    for scheduler in [
        SchedulerKind::Ddim,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPlusPlus2M,
    ] {
        let p = GenerateParams {
            prompt: "a robot".into(),
            steps: 3,
            width: 64,
            height: 64,
            seed: 5,
            scheduler: Some(scheduler),
            n: 2,
            ..Default::default()
        };
        let a = pipeline::generate(&cache, &model, &p, &|_| true).unwrap();
        let b = pipeline::generate(&cache, &model, &p, &|_| true).unwrap();
        assert_eq!(a, b, "{scheduler}: same seed, same images");
        assert_ne!(
            a[0], a[1],
            "{scheduler}: images of one request use different seeds"
        );
        assert!(a[0].data.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    let p = GenerateParams {
        prompt: "x".into(),
        steps: 3,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let err = pipeline::generate(&cache, &model, &p, &|stage| {
        !matches!(stage, Stage::Denoising { step: 2, .. })
    })
    .unwrap_err();
    assert!(matches!(err, pipeline::PipelineError::Cancelled));
    // Cancelled in the middle of decoding the first of three images, nothing
    // more is decoded: no VAE block runs after the one that said stop.
    let seen = std::sync::Mutex::new(Vec::new());
    let three = GenerateParams { n: 3, ..p.clone() };
    let err = pipeline::generate(&cache, &model, &three, &|stage| {
        seen.lock().unwrap().push(stage);
        !matches!(
            stage,
            Stage::Decoding {
                image: 0,
                block: 2,
                ..
            }
        )
    })
    .unwrap_err();
    assert!(matches!(err, pipeline::PipelineError::Cancelled));
    let seen = seen.into_inner().unwrap();
    assert_eq!(
        seen.last(),
        Some(&Stage::Decoding {
            image: 0,
            block: 2,
            blocks: 5
        }),
        "{seen:?}"
    );
    let denoised = seen
        .iter()
        .filter(|s| matches!(s, Stage::Denoising { .. }))
        .count();
    assert_eq!(
        denoised, 3,
        "three images denoised as one batch of three steps, then the decode"
    );
    let bad = GenerateParams { width: 60, ..p };
    assert!(pipeline::generate(&cache, &model, &bad, &|_| true)
        .unwrap_err()
        .to_string()
        .contains("multiple of 8"));
}

fn lora_params(weight: f64) -> GenerateParams {
    let (r, latents, _) = reference();
    let lora = fixtures().join("tiny-sd1-lora/tiny-sd1-lora.safetensors");
    GenerateParams {
        loras: vec![(lora, weight)],
        embeddings: Vec::new(),
        seamless: Default::default(),
        ..params(&r, latents)
    }
}

#[test]
fn kohya_lora_reproduces_diffusers_and_weight_zero_is_the_base_image() {
    let cache = cache();
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let (want, _) = {
        let (shape, data) = read_npy(
            &std::fs::read(fixtures().join("tiny-sd1-lora/reference_image_lora.npy")).unwrap(),
        )
        .unwrap();
        (data, shape)
    };
    let img = pipeline::generate(&cache, &model, &lora_params(0.8), &|_| true).unwrap();
    let d = max_abs_diff(&img[0].data, &want);
    assert!(d < 1e-3, "max abs difference {d}");
    let (r, latents, _) = reference();
    let base = pipeline::generate(&cache, &model, &params(&r, latents), &|_| true).unwrap();
    let zero = pipeline::generate(&cache, &model, &lora_params(0.0), &|_| true).unwrap();
    assert_eq!(
        zero[0], base[0],
        "weight 0 reproduces the base image exactly"
    );
}

#[test]
fn concurrent_requests_with_and_without_a_lora_never_mix() {
    let cache = cache();
    let model = std::sync::Arc::new(DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap());
    let (r, latents, _) = reference();
    let base = pipeline::generate(&cache, &model, &params(&r, latents.clone()), &|_| true).unwrap();
    let with = pipeline::generate(&cache, &model, &lora_params(0.8), &|_| true).unwrap();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let (cache, model, latents, r) =
                (cache.clone(), model.clone(), latents.clone(), r.clone());
            std::thread::spawn(move || {
                let p = if i % 2 == 0 {
                    lora_params(0.8)
                } else {
                    params(&r, latents)
                };
                (
                    i,
                    pipeline::generate(&cache, &model, &p, &|_| true).unwrap(),
                )
            })
        })
        .collect();
    for h in handles {
        let (i, img) = h.join().unwrap();
        assert_eq!(
            img[0],
            if i % 2 == 0 {
                with[0].clone()
            } else {
                base[0].clone()
            },
            "request {i}"
        );
    }
    // The cached base weights are bit-for-bit the file's.
    let unet = cache.get_device(&model.component("unet")).unwrap();
    let index = modelcache_agent::store::open_weights(
        &fixtures().join("tiny-sd1/unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    for t in index
        .tensors
        .iter()
        .filter(|t| t.name.contains("attn"))
        .take(20)
    {
        let want = modelcache_agent::store::load::read_bytes(&index, t).unwrap();
        let got: Vec<u8> = unet.tensors[&t.name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(got, want, "{}", t.name);
    }
}

/// The fixture's kohya LoRA rewritten in diffusers' PEFT layout
/// (`unet.<module>.lora_A/lora_B.weight`, `text_encoder.<module>…`, no alpha:
/// the alpha/rank scale folded into lora_B) gives diffusers' image too.
#[test]
fn peft_layout_lora_reproduces_diffusers() {
    use std::collections::HashMap;
    let f = fixtures();
    let kohya = candle_core::safetensors::load(
        f.join("tiny-sd1-lora/tiny-sd1-lora.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    // Module paths from the model's own weight names.
    let mut modules: HashMap<String, String> = HashMap::new();
    for (component, prefix, peft) in [
        ("unet", "lora_unet_", "unet"),
        ("text_encoder", "lora_te_", "text_encoder"),
    ] {
        let dir = f.join("tiny-sd1").join(component);
        let file = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .unwrap();
        for name in candle_core::safetensors::load(&file, &Device::Cpu)
            .unwrap()
            .into_keys()
        {
            if let Some(module) = name.strip_suffix(".weight") {
                modules.insert(
                    format!("{prefix}{}", module.replace('.', "_")),
                    format!("{peft}.{module}"),
                );
            }
        }
    }
    let mut peft: HashMap<String, Tensor> = HashMap::new();
    for (key, t) in &kohya {
        let (layer, leaf) = key.split_once('.').unwrap();
        if leaf == "alpha" {
            continue;
        }
        let module = &modules[layer];
        let t = if leaf == "lora_up.weight" {
            let rank = kohya[&format!("{layer}.lora_down.weight")].dim(0).unwrap() as f64;
            let alpha = kohya[&format!("{layer}.alpha")]
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            (t * (alpha / rank)).unwrap()
        } else {
            t.clone()
        };
        let leaf = if leaf == "lora_up.weight" {
            "lora_B.weight"
        } else {
            "lora_A.weight"
        };
        peft.insert(format!("{module}.{leaf}"), t);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peft.safetensors");
    candle_core::safetensors::save(&peft, &path).unwrap();
    let p = GenerateParams {
        loras: vec![(path.clone(), 0.8)],
        ..lora_params(0.8)
    };
    let img = pipeline::generate(
        &cache(),
        &DiffusersModel::open(&f.join("tiny-sd1")).unwrap(),
        &p,
        &|_| true,
    )
    .unwrap();
    let (_, want) =
        read_npy(&std::fs::read(f.join("tiny-sd1-lora/reference_image_lora.npy")).unwrap())
            .unwrap();
    let d = max_abs_diff(&img[0].data, &want);
    assert!(d < 1e-3, "max abs difference {d}");
}

/// The patched weight copies a LoRA makes for a request are held in the device
/// tier's budget while the request denoises, and released after it (before
/// the VAE decodes, which needs none of them).
#[test]
fn lora_copies_count_against_the_device_budget() {
    let cache = cache();
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1")).unwrap();
    let (r, latents, _) = reference();
    let during = |p: &GenerateParams| {
        let seen = std::sync::Mutex::new(0u64);
        pipeline::generate(&cache, &model, p, &|_| {
            let mut most = seen.lock().unwrap();
            *most = (*most).max(cache.stats().1.used);
            true
        })
        .unwrap();
        let v = *seen.lock().unwrap();
        v
    };
    let plain = during(&params(&r, latents));
    let with = during(&lora_params(0.8));
    assert!(
        with > plain,
        "device bytes during a LoRA request {with} vs without {plain}"
    );
    let after = cache.stats().1.used;
    assert!(after < with, "released after the request: {after}");
}
