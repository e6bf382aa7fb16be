//! Single-file checkpoint → diffusers conversion: key maps one by one (UNet,
//! VAE, OpenCLIP with its fused q/k/v) and the fixture converted bit-exactly.

use crate::common::fixtures;
use modelcache_agent::store::convert::{
    self, openclip_key, unet_key, vae_key, ConvertRequest, Op, UnetLayout,
};
use modelcache_agent::store::{self, load::read_bytes, safetensors::write_sparse};

const SD1: UnetLayout = UnetLayout {
    layers_per_block: 2,
    text_time: false,
};

#[test]
fn unet_key_map_sd1() {
    let up = |i: usize, j: usize| (i, j) == (2, 1) || (i, j) == (5, 2);
    let m = |k: &str| unet_key(k, SD1, &up).unwrap();
    assert_eq!(
        m("input_blocks.1.0.in_layers.0.weight"),
        "down_blocks.0.resnets.0.norm1.weight"
    );
    assert_eq!(
        m("input_blocks.3.0.op.weight"),
        "down_blocks.0.downsamplers.0.conv.weight"
    );
    assert_eq!(
        m("input_blocks.4.1.proj_in.weight"),
        "down_blocks.1.attentions.0.proj_in.weight"
    );
    assert_eq!(
        m("middle_block.2.out_layers.3.bias"),
        "mid_block.resnets.1.conv2.bias"
    );
    assert_eq!(
        m("output_blocks.2.1.conv.weight"),
        "up_blocks.0.upsamplers.0.conv.weight"
    );
    assert_eq!(
        m("output_blocks.5.2.conv.bias"),
        "up_blocks.1.upsamplers.0.conv.bias"
    );
    assert_eq!(
        m("output_blocks.5.1.norm.weight"),
        "up_blocks.1.attentions.2.norm.weight"
    );
    assert_eq!(m("time_embed.2.weight"), "time_embedding.linear_2.weight");
    assert_eq!(m("out.2.weight"), "conv_out.weight");
    let xl = UnetLayout {
        layers_per_block: 2,
        text_time: true,
    };
    assert_eq!(
        unet_key("label_emb.0.0.weight", xl, &up).unwrap(),
        "add_embedding.linear_1.weight"
    );
    assert_eq!(
        unet_key("label_emb.0.2.bias", SD1, &up).unwrap(),
        "class_embedding.linear_2.bias"
    );
}

#[test]
fn vae_key_map() {
    assert_eq!(
        vae_key("encoder.mid.attn_1.q.weight", 4).unwrap(),
        "encoder.mid_block.attentions.0.to_q.weight"
    );
    assert_eq!(
        vae_key("encoder.mid.attn_1.proj_out.bias", 4).unwrap(),
        "encoder.mid_block.attentions.0.to_out.0.bias"
    );
    assert_eq!(
        vae_key("encoder.mid.attn_1.norm.weight", 4).unwrap(),
        "encoder.mid_block.attentions.0.group_norm.weight"
    );
    assert_eq!(
        vae_key("decoder.up.3.block.0.conv1.weight", 4).unwrap(),
        "decoder.up_blocks.0.resnets.0.conv1.weight"
    );
    assert_eq!(
        vae_key("decoder.up.1.upsample.conv.weight", 4).unwrap(),
        "decoder.up_blocks.2.upsamplers.0.conv.weight"
    );
    assert_eq!(
        vae_key("encoder.down.0.block.1.nin_shortcut.weight", 4).unwrap(),
        "encoder.down_blocks.0.resnets.1.conv_shortcut.weight"
    );
    assert_eq!(
        vae_key("decoder.norm_out.bias", 4).unwrap(),
        "decoder.conv_norm_out.bias"
    );
    assert_eq!(
        vae_key("post_quant_conv.weight", 4).unwrap(),
        "post_quant_conv.weight"
    );
}

#[test]
fn vae_attention_is_reshaped_to_linear() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vae.safetensors");
    write_sparse(
        &p,
        &[(
            "first_stage_model.encoder.mid.attn_1.q.weight",
            safetensors::Dtype::F32,
            &[512, 512, 1, 1],
        )],
        &[],
    )
    .unwrap();
    let index = store::open_weights(&p).unwrap();
    let plan = convert::plan_vae_keys(&index, "first_stage_model.", 4);
    assert_eq!(plan[0].dst, "encoder.mid_block.attentions.0.to_q.weight");
    assert_eq!(
        plan[0].op,
        Op::Copy {
            shape: vec![512, 512]
        }
    );
}

#[test]
fn openclip_keys_and_qkv_split() {
    assert_eq!(
        openclip_key("transformer.resblocks.0.mlp.c_fc.weight").unwrap(),
        "text_model.encoder.layers.0.mlp.fc1.weight"
    );
    assert_eq!(
        openclip_key("transformer.resblocks.0.ln_1.bias").unwrap(),
        "text_model.encoder.layers.0.layer_norm1.bias"
    );
    assert_eq!(
        openclip_key("transformer.resblocks.3.attn.out_proj.weight").unwrap(),
        "text_model.encoder.layers.3.self_attn.out_proj.weight"
    );

    // Real data: q/k/v rows and a transposed projection, checked element-wise.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("clip.safetensors");
    let d = 4usize;
    let fused: Vec<f32> = (0..3 * d * d).map(|i| i as f32).collect();
    let proj: Vec<f32> = (0..d * 2).map(|i| i as f32).collect();
    let mut data = std::collections::HashMap::new();
    let fused_t =
        candle_core::Tensor::from_vec(fused.clone(), (3 * d, d), &candle_core::Device::Cpu)
            .unwrap();
    let proj_t =
        candle_core::Tensor::from_vec(proj.clone(), (d, 2), &candle_core::Device::Cpu).unwrap();
    data.insert(
        "m.transformer.resblocks.0.attn.in_proj_weight".to_string(),
        fused_t,
    );
    data.insert("m.text_projection".to_string(), proj_t);
    candle_core::safetensors::save(&data, &p).unwrap();
    let index = store::open_weights(&p).unwrap();
    let plan = convert::openclip_plan(&index, "m.", None, true).unwrap();
    let out = dir.path().join("out.safetensors");
    convert::write_component(&index, &plan, &out).unwrap();
    let conv = store::open_weights(&out).unwrap();
    let get = |n: &str| -> Vec<f32> {
        read_bytes(&conv, conv.get(n).unwrap())
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(
        get("text_model.encoder.layers.0.self_attn.k_proj.weight"),
        fused[d * d..2 * d * d].to_vec()
    );
    assert_eq!(conv.shape("text_projection.weight"), Some(&[2usize, 4][..]));
    let t = get("text_projection.weight");
    for i in 0..d {
        for j in 0..2 {
            assert_eq!(t[j * d + i], proj[i * 2 + j]);
        }
    }
}

#[test]
fn fixture_checkpoint_converts_bit_exactly() {
    let f = fixtures();
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("tiny");
    convert::convert_main(&ConvertRequest {
        checkpoint: &f.join("tiny-sd1-single.safetensors"),
        out_dir: &dst,
        config_dir: Some(&f.join("tiny-sd1")),
        tokenizer_dir: None,
    })
    .unwrap();
    for (comp, file) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        let want =
            store::open_weights(&f.join(format!("tiny-sd1/{comp}/{file}.safetensors"))).unwrap();
        let got = store::open_weights(&dst.join(format!("{comp}/{file}.safetensors"))).unwrap();
        assert_eq!(want.tensors.len(), got.tensors.len(), "{comp}");
        for t in &want.tensors {
            let g = got
                .get(&t.name)
                .unwrap_or_else(|| panic!("{comp}: missing {}", t.name));
            assert_eq!(
                (g.dtype, &g.shape),
                (t.dtype, &t.shape),
                "{comp}/{}",
                t.name
            );
            assert_eq!(
                read_bytes(&got, g).unwrap(),
                read_bytes(&want, t).unwrap(),
                "{comp}/{} differs",
                t.name
            );
        }
    }
    assert!(dst.join("tokenizer/tokenizer.json").exists());
    // The converted folder probes like the original.
    let r = store::probe(&dst).unwrap();
    assert_eq!(
        (r.base, r.tensor_count),
        (Some(modelcache_crds::BaseModel::Sd1), 964)
    );
}

#[test]
fn nonstandard_checkpoint_without_config_asks_for_it() {
    let f = fixtures();
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("tiny");
    let err = convert::convert_main(&ConvertRequest {
        checkpoint: &f.join("tiny-sd1-single.safetensors"),
        out_dir: &dst,
        config_dir: None,
        tokenizer_dir: None,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("pass --config DIR"), "{err}");
    assert!(!dst.exists(), "a failed conversion leaves nothing behind");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn converted_checkpoints_are_cached_under_the_state_dir() {
    let f = fixtures();
    let state = tempfile::tempdir().unwrap();
    let ckpt = f.join("tiny-sd1-single.safetensors");
    let a = convert::converted(state.path(), &ckpt, Some(&f.join("tiny-sd1")), None).unwrap();
    assert!(a.starts_with(state.path()));
    let mtime = std::fs::metadata(a.join("unet/diffusion_pytorch_model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let b = convert::converted(state.path(), &ckpt, Some(&f.join("tiny-sd1")), None).unwrap();
    assert_eq!(a, b);
    let mtime2 = std::fs::metadata(b.join("unet/diffusion_pytorch_model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(mtime, mtime2, "second call reuses the cache");
}

#[test]
fn a_checkpoint_without_a_tokenizer_gets_the_standard_clip_vocabulary() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    // The fixture's architecture, but no tokenizer anywhere: a config folder without one.
    let cfg = dir.path().join("cfg");
    for c in ["unet", "vae", "text_encoder", "scheduler"] {
        std::fs::create_dir_all(cfg.join(c)).unwrap();
        let name = if c == "scheduler" {
            "scheduler_config.json"
        } else {
            "config.json"
        };
        std::fs::copy(
            f.join("tiny-sd1").join(c).join(name),
            cfg.join(c).join(name),
        )
        .unwrap();
    }
    std::fs::copy(
        f.join("tiny-sd1/model_index.json"),
        cfg.join("model_index.json"),
    )
    .unwrap();
    let ckpt = dir.path().join("m.safetensors");
    std::fs::copy(f.join("tiny-sd1-single.safetensors"), &ckpt).unwrap();
    let out = dir.path().join("out");
    convert::convert_main(&ConvertRequest {
        checkpoint: &ckpt,
        out_dir: &out,
        config_dir: Some(&cfg),
        tokenizer_dir: None,
    })
    .unwrap();
    let tok =
        modelcache_agent::pipeline::tokenizer::ClipTokenizer::load(&out.join("tokenizer"), 77)
            .unwrap();
    assert_eq!(
        &tok.encode("a red cat").unwrap()[..5],
        &[49406, 320, 736, 2368, 49407]
    );
}

#[test]
fn a_sidecar_yaml_sets_the_converted_model_s_prediction_type_and_a_new_one_converts_anew() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("m.safetensors");
    std::fs::copy(f.join("tiny-sd1-single.safetensors"), &ckpt).unwrap();
    let state = dir.path().join("state");
    let prediction = |out: &std::path::Path| {
        modelcache_agent::pipeline::DiffusersModel::open(out)
            .unwrap()
            .schedule
            .prediction_type
    };
    let plain = convert::converted(&state, &ckpt, Some(&f.join("tiny-sd1")), None).unwrap();
    assert_eq!(prediction(&plain), modelcache_crds::PredictionType::Epsilon);
    std::fs::write(
        dir.path().join("m.yaml"),
        "model:\n  params:\n    parameterization: \"v\"\n",
    )
    .unwrap();
    let v = convert::converted(&state, &ckpt, Some(&f.join("tiny-sd1")), None).unwrap();
    assert_ne!(plain, v, "a new sidecar is a new conversion");
    assert_eq!(prediction(&v), modelcache_crds::PredictionType::VPrediction);
}

#[test]
fn a_vae_file_without_the_tensors_a_vae_has_is_refused_naming_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.safetensors");
    let t = candle_core::Tensor::zeros(
        (32, 3, 3, 3),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("encoder.down.0.block.0.conv1.weight".to_string(), t)]),
        &path,
    )
    .unwrap();
    let e = convert::converted_vae(&dir.path().join("state"), &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("decoder.conv_in.weight"), "{e}");
    assert!(
        !dir.path().join("state/converted").exists()
            || std::fs::read_dir(dir.path().join("state/converted"))
                .unwrap()
                .next()
                .is_none(),
        "nothing is left behind"
    );
}

#[test]
fn a_single_file_controlnet_converts_bit_exactly_and_generates_the_folder_s_image() {
    let f = fixtures().join("tiny-sd1-controlnet");
    let state = tempfile::tempdir().unwrap();
    let dst =
        convert::converted_controlnet(state.path(), &f.join("controlnet-a.safetensors")).unwrap();
    let file = "diffusion_pytorch_model.safetensors";
    let want = store::open_weights(&f.join("controlnet-a").join(file)).unwrap();
    let got = store::open_weights(&dst.join(file)).unwrap();
    assert_eq!(want.tensors.len(), got.tensors.len());
    for t in &want.tensors {
        let g = got
            .get(&t.name)
            .unwrap_or_else(|| panic!("missing {}", t.name));
        assert_eq!((g.dtype, &g.shape), (t.dtype, &t.shape), "{}", t.name);
        assert_eq!(
            read_bytes(&got, g).unwrap(),
            read_bytes(&want, t).unwrap(),
            "{} differs",
            t.name
        );
    }
    // The configuration read from the shapes describes the same network.
    let open = |dir: &std::path::Path| modelcache_agent::pipeline::ControlModel::open(dir).unwrap();
    let (a, b) = (open(&f.join("controlnet-a")), open(&dst));
    assert_eq!(a.base, b.base);
    assert_eq!(
        format!("{:?}", a.kind),
        format!("{:?}", b.kind),
        "same configuration"
    );
    // Converted once: a second call finds the folder.
    let again =
        convert::converted_controlnet(state.path(), &f.join("controlnet-a.safetensors")).unwrap();
    assert_eq!(again, dst);
}

#[test]
fn a_controlnet_file_missing_what_a_controlnet_has_is_refused_naming_it() {
    use safetensors::Dtype::F16;
    let dir = tempfile::tempdir().unwrap();
    // Cross-attention enough to be probed as an SD 1.x ControlNet, but no
    // blocks, hint or zero convolutions.
    let file = dir.path().join("cn.safetensors");
    write_sparse(
        &file,
        &[(
            "control_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
            F16,
            &[320, 768],
        )],
        &[],
    )
    .unwrap();
    let e = convert::converted_controlnet(&dir.path().join("state"), &file)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ControlNet has no control_model.input_blocks.0.0.weight"),
        "{e}"
    );
    assert!(
        !dir.path().join("state/converted").exists()
            || std::fs::read_dir(dir.path().join("state/converted"))
                .unwrap()
                .next()
                .is_none(),
        "nothing half-written is left"
    );
}
