//! Merging models, checked element-wise.

use candle_core::{Device, Tensor};
use modelcache_agent::store::merge::{merge, MergeRequest, Method};
use modelcache_agent::store::{self, load::read_bytes, safetensors::write_sparse};
use modelcache_crds::Precision;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn file(dir: &Path, name: &str, w: &[f32]) -> PathBuf {
    let p = dir.join(name);
    let mut m = HashMap::new();
    m.insert(
        "model.diffusion_model.input_blocks.0.0.weight".to_string(),
        Tensor::from_vec(w.to_vec(), (1, 4, 1, 1), &Device::Cpu).unwrap(),
    );
    m.insert(
        "cond_stage_model.transformer.text_model.embeddings.position_ids".to_string(),
        Tensor::new(&[0i64, 1, 2], &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&m, &p).unwrap();
    p
}

fn values(p: &Path, name: &str) -> Vec<f32> {
    let idx = store::open_weights(p).unwrap();
    let t = idx.get(name).unwrap();
    let b = read_bytes(&idx, t).unwrap();
    match t.dtype {
        safetensors::Dtype::F16 => b
            .chunks(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => b
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

const W: &str = "model.diffusion_model.input_blocks.0.0.weight";

#[test]
fn single_files_merge_element_wise() {
    let d = tempfile::tempdir().unwrap();
    let a = file(d.path(), "a.safetensors", &[0.0, 1.0, 2.0, 3.0]);
    let b = file(d.path(), "b.safetensors", &[10.0, 11.0, 12.0, 13.0]);
    let c = file(d.path(), "c.safetensors", &[4.0, 4.0, 4.0, 4.0]);
    let out = d.path().join("out.safetensors");
    let run = |inputs: &[PathBuf], method, alpha, precision| {
        merge(&MergeRequest {
            inputs,
            out: &out,
            method,
            alpha,
            precision,
            force: false,
        })
        .unwrap();
        values(&out, W)
    };
    assert_eq!(
        run(
            &[a.clone(), b.clone()],
            Method::WeightedSum,
            0.8,
            Precision::F32
        ),
        [8.0, 9.0, 10.0, 11.0]
    );
    assert_eq!(
        run(
            &[a.clone(), b.clone()],
            Method::Sigmoid,
            0.5,
            Precision::F32
        ),
        [5.0, 6.0, 7.0, 8.0]
    );
    // θ0 + (θ1 − θ2)(1 − α) with α = 0.25
    assert_eq!(
        run(
            &[a.clone(), b.clone(), c.clone()],
            Method::AddDifference,
            0.25,
            Precision::F16
        ),
        [4.5, 6.25, 8.0, 9.75]
    );
    let idx = store::open_weights(&out).unwrap();
    assert_eq!(idx.get(W).unwrap().dtype, safetensors::Dtype::F16);
    assert_eq!(
        idx.get("cond_stage_model.transformer.text_model.embeddings.position_ids")
            .unwrap()
            .dtype,
        safetensors::Dtype::I64,
        "integer buffers are copied"
    );
    // Wrong counts and ranges are refused.
    let err = |inputs: &[PathBuf], method, alpha| {
        merge(&MergeRequest {
            inputs,
            out: &out,
            method,
            alpha,
            precision: Precision::F32,
            force: false,
        })
        .unwrap_err()
        .to_string()
    };
    assert!(
        err(&[a.clone(), b.clone(), c.clone()], Method::WeightedSum, 0.5).contains("exactly 3")
    );
    assert!(err(&[a.clone(), b.clone()], Method::WeightedSum, 1.5).contains("alpha"));
}

#[test]
fn different_bases_need_force() {
    let d = tempfile::tempdir().unwrap();
    let sd1 = d.path().join("sd1.safetensors");
    let sd2 = d.path().join("sd2.safetensors");
    let k21 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
    write_sparse(
        &sd1,
        &[
            (W, safetensors::Dtype::F16, &[320, 4, 3, 3]),
            (k21, safetensors::Dtype::F16, &[320, 768]),
        ],
        &[],
    )
    .unwrap();
    write_sparse(
        &sd2,
        &[
            (W, safetensors::Dtype::F16, &[320, 4, 3, 3]),
            (k21, safetensors::Dtype::F16, &[320, 1024]),
        ],
        &[],
    )
    .unwrap();
    let out = d.path().join("m.safetensors");
    let inputs = [sd1, sd2];
    let e = merge(&MergeRequest {
        inputs: &inputs,
        out: &out,
        method: Method::WeightedSum,
        alpha: 0.5,
        precision: Precision::F16,
        force: false,
    })
    .unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    let r = merge(&MergeRequest {
        inputs: &inputs,
        out: &out,
        method: Method::WeightedSum,
        alpha: 0.5,
        precision: Precision::F16,
        force: true,
    })
    .unwrap();
    assert_eq!(
        (r.merged, r.copied),
        (1, 1),
        "the attention weight has other shapes and is copied"
    );
}

#[test]
fn diffusers_folders_merge_component_by_component() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-sd1");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("merged");
    let inputs = [f.clone(), f.clone()];
    let r = merge(&MergeRequest {
        inputs: &inputs,
        out: &out,
        method: Method::WeightedSum,
        alpha: 0.3,
        precision: Precision::F32,
        force: false,
    })
    .unwrap();
    assert!(r.merged > 900 && r.skipped_components.is_empty(), "{r:?}");
    assert!(out.join("tokenizer/tokenizer.json").exists() && out.join("unet/config.json").exists());
    let a = values(
        &f.join("unet/diffusion_pytorch_model.safetensors"),
        "conv_in.weight",
    );
    let m = values(
        &out.join("unet/diffusion_pytorch_model.safetensors"),
        "conv_in.weight",
    );
    assert!(a
        .iter()
        .zip(&m)
        .all(|(x, y)| (x - y).abs() <= 1e-6 * x.abs().max(1.0)));
    assert!(modelcache_agent::pipeline::DiffusersModel::open(&out).is_ok());
}
