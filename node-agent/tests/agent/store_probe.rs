//! Probing real model families from header-faithful synthetic files: real key
//! names and shapes, tensor data left as holes so a "7 GB" checkpoint costs no disk.

use crate::common::fixtures;
use modelcache_agent::store::{self, safetensors::write_sparse};
use modelcache_crds::{BaseModel, ModelFormat, ModelType, ModelVariant, PredictionType};
use safetensors::Dtype::{self, F16, F32, I64};
use std::path::{Path, PathBuf};

const UNET: &str = "model.diffusion_model.";

fn file(dir: &Path, name: &str, tensors: &[(&str, Dtype, &[usize])]) -> PathBuf {
    let p = dir.join(name);
    write_sparse(&p, tensors, &[]).expect("write");
    p
}

/// Keys shared by SD 1.x/2.x main checkpoints, with `width` the cross-attention width,
/// plus a filler tensor so the file has the real size (about 7 GB of holes).
fn sd_main(width: usize, in_ch: usize, te: &str) -> Vec<(String, Dtype, Vec<usize>)> {
    vec![
        (
            format!("{UNET}input_blocks.0.0.weight"),
            F16,
            vec![320, in_ch, 3, 3],
        ),
        (
            format!("{UNET}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"),
            F16,
            vec![320, width],
        ),
        (
            format!("{UNET}input_blocks.1.1.proj_in.weight"),
            F16,
            vec![320, 320, 1, 1],
        ),
        (
            "first_stage_model.encoder.conv_in.weight".into(),
            F16,
            vec![128, 3, 3, 3],
        ),
        (
            format!("{te}token_embedding.weight"),
            F16,
            vec![49408, width],
        ),
        ("filler".into(), F32, vec![7 << 28]),
    ]
}

fn write_owned(
    dir: &Path,
    name: &str,
    t: &[(String, Dtype, Vec<usize>)],
    md: &[(&str, &str)],
) -> PathBuf {
    let refs: Vec<(&str, Dtype, &[usize])> = t
        .iter()
        .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
        .collect();
    let p = dir.join(name);
    write_sparse(&p, &refs, md).expect("write");
    p
}

#[test]
fn sd15_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_owned(
        dir.path(),
        "sd15.safetensors",
        &sd_main(
            768,
            4,
            "cond_stage_model.transformer.text_model.embeddings.",
        ),
        &[],
    );
    let r = store::probe(&p).unwrap();
    assert_eq!(
        (r.model_type, r.base, r.variant),
        (
            ModelType::Main,
            Some(BaseModel::Sd1),
            Some(ModelVariant::Normal)
        )
    );
    assert_eq!(r.prediction_type, Some(PredictionType::Epsilon));
    assert_eq!(
        (r.image_size, r.upcast_attention, r.format),
        (Some(512), false, ModelFormat::Checkpoint)
    );
    assert!(r.file_bytes > 7_000_000_000, "sparse 7 GB file");
    assert_eq!(r.size_bytes.f32, r.size_bytes.f16 * 2);
}

#[test]
fn sd2_inpaint_defaults_to_v_prediction_and_global_step_decides_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_owned(
        dir.path(),
        "sd2.safetensors",
        &sd_main(1024, 9, "cond_stage_model.model."),
        &[],
    );
    let r = store::probe(&p).unwrap();
    assert_eq!(
        (r.base, r.variant),
        (Some(BaseModel::Sd2), Some(ModelVariant::Inpaint))
    );
    assert_eq!(r.prediction_type, Some(PredictionType::VPrediction));
    assert_eq!((r.upcast_attention, r.image_size), (true, Some(768)));
    // safetensors carry no global_step, but modelspec metadata decides.
    let p = write_owned(
        dir.path(),
        "sd2b.safetensors",
        &sd_main(1024, 4, "cond_stage_model.model."),
        &[("modelspec.prediction_type", "epsilon")],
    );
    let r = store::probe(&p).unwrap();
    assert_eq!(
        (r.prediction_type, r.image_size),
        (Some(PredictionType::Epsilon), Some(512))
    );
}

#[test]
fn depth_and_bad_channel_counts() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_owned(
        dir.path(),
        "d.safetensors",
        &sd_main(1024, 5, "cond_stage_model.model."),
        &[],
    );
    assert_eq!(store::probe(&p).unwrap().variant, Some(ModelVariant::Depth));
    let p = write_owned(
        dir.path(),
        "bad.safetensors",
        &sd_main(768, 7, "cond_stage_model.transformer."),
        &[],
    );
    let e = store::probe(&p).unwrap_err().to_string();
    assert!(e.contains("7 input channels"), "{e}");
}

#[test]
fn sdxl_and_refiner() {
    let dir = tempfile::tempdir().unwrap();
    for (width, te, base) in [
        (2048, "conditioner.embedders.1.model.", BaseModel::Sdxl),
        (
            1280,
            "conditioner.embedders.0.model.",
            BaseModel::SdxlRefiner,
        ),
    ] {
        let t = vec![
            (
                format!("{UNET}input_blocks.0.0.weight"),
                F16,
                vec![320, 4, 3, 3],
            ),
            (
                format!("{UNET}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
                F16,
                vec![640, width],
            ),
            (
                format!("{te}token_embedding.weight"),
                F16,
                vec![49408, 1280],
            ),
        ];
        let p = write_owned(dir.path(), &format!("{base}.safetensors"), &t, &[]);
        let r = store::probe(&p).unwrap();
        assert_eq!(
            (r.model_type, r.base, r.image_size),
            (ModelType::Main, Some(base), Some(1024))
        );
    }
}

#[test]
fn unknown_width_without_structure_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let t = vec![
        (
            format!("{UNET}input_blocks.0.0.weight"),
            F16,
            vec![320, 4, 3, 3],
        ),
        (
            format!("{UNET}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"),
            F16,
            vec![320, 512],
        ),
    ];
    let p = write_owned(dir.path(), "x.safetensors", &t, &[]);
    let e = store::probe(&p).unwrap_err().to_string();
    assert!(e.contains("cannot determine base type"), "{e}");
}

#[test]
fn a_sidecar_yaml_decides_the_prediction_type_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // An SD 2.x checkpoint whose metadata says epsilon: its YAML says v.
    let p = write_owned(
        dir.path(),
        "foo.safetensors",
        &sd_main(1024, 4, "cond_stage_model.model."),
        &[("modelspec.prediction_type", "epsilon")],
    );
    let yaml = dir.path().join("foo.yaml");
    std::fs::write(
        &yaml,
        "model:\n  params:\n    parameterization: \"v\"\n    image_size: 64\n",
    )
    .unwrap();
    let r = store::probe(&p).unwrap();
    assert_eq!(
        (r.prediction_type, r.image_size),
        (Some(PredictionType::VPrediction), Some(768))
    );
    assert!(
        r.evidence.iter().any(|e| e.contains("foo.yaml")),
        "{:?}",
        r.evidence
    );
    std::fs::write(&yaml, "model:\n  params:\n    linear_start: 0.00085\n").unwrap();
    let r = store::probe(&p).unwrap();
    assert_eq!(
        (r.prediction_type, r.image_size),
        (Some(PredictionType::Epsilon), Some(512))
    );
    std::fs::write(&yaml, "model: {params: {parameterization: velocity}}").unwrap();
    let e = store::probe(&p).unwrap_err().to_string();
    assert!(e.contains("foo.yaml") && e.contains("velocity"), "{e}");
}

#[test]
fn vae_lora_embedding_controlnet_files() {
    let dir = tempfile::tempdir().unwrap();
    let vae = file(
        dir.path(),
        "vae.safetensors",
        &[("encoder.conv_in.weight", F16, &[128, 3, 3, 3])],
    );
    let r = store::probe(&vae).unwrap();
    assert_eq!(
        (r.model_type, r.base),
        (ModelType::Vae, Some(BaseModel::Sd1))
    );
    let xl = file(
        dir.path(),
        "sdxl_vae.safetensors",
        &[("decoder.conv_in.weight", F16, &[512, 4, 3, 3])],
    );
    assert_eq!(store::probe(&xl).unwrap().base, Some(BaseModel::Sdxl));

    for (width, base) in [(768, Some(BaseModel::Sd1)), (1024, Some(BaseModel::Sd2))] {
        let name = format!("l{width}.safetensors");
        let p = file(dir.path(), &name, &[("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight", F16, &[4, width])]);
        let r = store::probe(&p).unwrap();
        assert_eq!((r.model_type, r.base), (ModelType::Lora, base));
    }
    let p = file(
        dir.path(),
        "l1280.safetensors",
        &[("lora_unet_x_attn2_to_k.lora_down.weight", F16, &[4, 1280])],
    );
    assert!(store::probe(&p)
        .unwrap_err()
        .to_string()
        .contains("unknown LoRA type"));
    // SDXL: te1 768 + te2 1280 = 2048; needs a lora_unet_ key to be a LoRA at all.
    let p = file(
        dir.path(),
        "xl.safetensors",
        &[
            ("lora_unet_a.lora_down.weight", F16, &[4, 64]),
            (
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                F16,
                &[4, 768],
            ),
            (
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                F16,
                &[4, 1280],
            ),
        ],
    );
    assert_eq!(store::probe(&p).unwrap().base, Some(BaseModel::Sdxl));

    let p = file(
        dir.path(),
        "emb.safetensors",
        &[("emb_params", F32, &[2, 768])],
    );
    let r = store::probe(&p).unwrap();
    assert_eq!(
        (r.model_type, r.base),
        (ModelType::Embedding, Some(BaseModel::Sd1))
    );
    let p = file(
        dir.path(),
        "emb3.safetensors",
        &[("a", F32, &[1, 4]), ("b", F32, &[1]), ("c", I64, &[2])],
    );
    assert_eq!(store::probe(&p).unwrap().model_type, ModelType::Embedding);
    let many: Vec<(String, Dtype, Vec<usize>)> =
        (0..12).map(|i| (format!("t{i}"), F32, vec![1])).collect();
    let p = write_owned(dir.path(), "many.safetensors", &many, &[]);
    assert!(store::probe(&p)
        .unwrap_err()
        .to_string()
        .contains("unable to determine model type"));

    let p = file(
        dir.path(),
        "cn.safetensors",
        &[(
            "control_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
            F16,
            &[320, 1024],
        )],
    );
    let r = store::probe(&p).unwrap();
    assert_eq!(
        (r.model_type, r.base),
        (ModelType::ControlNet, Some(BaseModel::Sd2))
    );
}

#[test]
fn conditioning_models_are_probed_with_their_base() {
    let dir = tempfile::tempdir().unwrap();
    // An IP-Adapter file: its base from its image tokens' width.
    let ip = |name: &str, width: usize| {
        file(
            dir.path(),
            name,
            &[
                ("image_proj.proj.weight", F16, &[4 * width, 1024]),
                ("image_proj.norm.weight", F16, &[width]),
                ("ip_adapter.1.to_k_ip.weight", F16, &[320, width]),
            ],
        )
    };
    for (width, base) in [
        (768, Some(BaseModel::Sd1)),
        (2048, Some(BaseModel::Sdxl)),
        (80, None),
    ] {
        let r = store::probe(&ip(&format!("ip{width}.safetensors"), width)).unwrap();
        assert_eq!((r.model_type, r.base), (ModelType::IpAdapter, base));
    }
    // The fixtures: ControlNets of a width no release has take the base their
    // structure shows; T2I-Adapters from adapter_type; CLIP Vision is any base;
    // InvokeAI's IP-Adapter folder (pickled sections) is an IP-Adapter.
    let f = fixtures();
    for (path, kind, base) in [
        (
            "tiny-sd1-controlnet/controlnet-a",
            ModelType::ControlNet,
            Some(BaseModel::Sd1),
        ),
        (
            "tiny-sd1-controlnet/controlnet-a.safetensors",
            ModelType::ControlNet,
            Some(BaseModel::Sd1),
        ),
        (
            "tiny-sdxl-controlnet/controlnet-a",
            ModelType::ControlNet,
            Some(BaseModel::Sdxl),
        ),
        (
            "tiny-sd1-t2i-adapter/adapter",
            ModelType::T2iAdapter,
            Some(BaseModel::Sd1),
        ),
        (
            "tiny-sdxl-t2i-adapter/adapter",
            ModelType::T2iAdapter,
            Some(BaseModel::Sdxl),
        ),
        (
            "tiny-sd1-ip-adapter/image_encoder",
            ModelType::ClipVision,
            None,
        ),
        ("tiny-sd1-ip-adapter/invokeai", ModelType::IpAdapter, None),
    ] {
        let r = store::probe(&f.join(path)).unwrap();
        assert_eq!((r.model_type, r.base), (kind, base), "{path}");
    }
    let r = store::probe(&f.join("tiny-sd1-ip-adapter/invokeai")).unwrap();
    assert_eq!(r.tensor_count, 36, "the pickle's two sections, flattened");
    // A folder that says it is an IP-Adapter but has no weights.
    let empty = dir.path().join("ip-empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("image_encoder.txt"), "ViT-H\n").unwrap();
    let e = store::probe(&empty).unwrap_err().to_string();
    assert!(e.contains("ip_adapter.bin"), "{e}");
}

#[test]
fn flax_metadata_is_refused_and_unknown_suffix_too() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.safetensors");
    write_sparse(&p, &[("x", F32, &[1])], &[("format", "flax")]).unwrap();
    assert!(store::probe(&p)
        .unwrap_err()
        .to_string()
        .contains("only PyTorch-layout"));
    let t = dir.path().join("notes.txt");
    std::fs::write(&t, "hi").unwrap();
    assert!(store::probe(&t)
        .unwrap_err()
        .to_string()
        .contains("unsupported model file type"));
}

#[test]
fn folder_probes() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("xl");
    std::fs::create_dir_all(m.join("unet")).unwrap();
    std::fs::create_dir_all(m.join("scheduler")).unwrap();
    std::fs::write(m.join("model_index.json"), r#"{"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}"#).unwrap();
    std::fs::write(
        m.join("unet/config.json"),
        r#"{"cross_attention_dim": 2048, "in_channels": 4}"#,
    )
    .unwrap();
    std::fs::write(
        m.join("scheduler/scheduler_config.json"),
        r#"{"prediction_type": "epsilon"}"#,
    )
    .unwrap();
    write_sparse(
        &m.join("unet/diffusion_pytorch_model.fp16.safetensors"),
        &[("conv_in.weight", F16, &[320, 4, 3, 3])],
        &[],
    )
    .unwrap();
    let r = store::probe(&m).unwrap();
    assert_eq!(
        (r.model_type, r.base, r.variant, r.prediction_type),
        (
            ModelType::Main,
            Some(BaseModel::Sdxl),
            Some(ModelVariant::Normal),
            Some(PredictionType::Epsilon)
        )
    );
    // An fp16-only folder is sized from its fp16 files (InvokeAI estimated 0).
    assert_eq!(r.size_bytes.f16, 320 * 4 * 9 * 2);

    let vae = dir.path().join("sdxl-vae-fp16");
    std::fs::create_dir_all(&vae).unwrap();
    std::fs::write(
        vae.join("config.json"),
        r#"{"_class_name": "AutoencoderKL", "scaling_factor": 0.18215, "sample_size": 512}"#,
    )
    .unwrap();
    assert_eq!(store::probe(&vae).unwrap().base, Some(BaseModel::Sdxl));
    let nested = dir.path().join("my-xl/vae");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::write(
        nested.join("config.json"),
        r#"{"_class_name": "AutoencoderKL", "scaling_factor": 0.18215}"#,
    )
    .unwrap();
    assert_eq!(store::probe(&nested).unwrap().base, Some(BaseModel::Sdxl));
    let not = dir.path().join("mixlture/vae");
    std::fs::create_dir_all(&not).unwrap();
    std::fs::write(
        not.join("config.json"),
        r#"{"_class_name": "AutoencoderKL", "scaling_factor": 0.13025, "sample_size": 256}"#,
    )
    .unwrap();
    assert_eq!(store::probe(&not).unwrap().base, Some(BaseModel::Sd1));

    let t2i = dir.path().join("t2i");
    std::fs::create_dir_all(&t2i).unwrap();
    std::fs::write(
        t2i.join("config.json"),
        r#"{"_class_name": "T2IAdapter", "adapter_type": "full_adapter_xl"}"#,
    )
    .unwrap();
    assert_eq!(store::probe(&t2i).unwrap().base, Some(BaseModel::Sdxl));
    std::fs::write(t2i.join("config.json"), r#"{"_class_name": "T2IAdapter"}"#).unwrap();
    assert!(store::probe(&t2i).is_err());

    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("model_index.json"), "{not json").unwrap();
    assert!(store::probe(&bad)
        .unwrap_err()
        .to_string()
        .contains("invalid JSON in model_index.json"));
}

#[test]
fn fixtures_probe_as_sd1() {
    let f = fixtures();
    let folder = store::probe(&f.join("tiny-sd1")).unwrap();
    let single = store::probe(&f.join("tiny-sd1-single.safetensors")).unwrap();
    for r in [&folder, &single] {
        assert_eq!(
            (r.model_type, r.base, r.variant),
            (
                ModelType::Main,
                Some(BaseModel::Sd1),
                Some(ModelVariant::Normal)
            )
        );
        assert_eq!(r.prediction_type, Some(PredictionType::Epsilon));
        assert!(!r.evidence.is_empty());
    }
    assert_eq!(folder.tensor_count, single.tensor_count);
    assert_eq!(folder.size_bytes, single.size_bytes);
    let lora = store::probe(&f.join("tiny-sd1-lora/tiny-sd1-lora.safetensors")).unwrap();
    assert_eq!((lora.model_type, lora.base), (ModelType::Lora, None));
    assert!(lora.evidence[0].contains("not a standard width"));
}
