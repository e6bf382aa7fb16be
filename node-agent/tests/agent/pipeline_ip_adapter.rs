//! IP-Adapters against diffusers (`tests/fixtures/tiny-sd1-ip-adapter`,
//! `tiny-sdxl-ip-adapter`): the image encoder, the image projection and the
//! decoupled cross-attention in every layer, compared with diffusers'
//! float64 run.

use crate::common::{fixtures, max_abs_diff_from, reference_params, reference_run, tiny_cache};
use modelcache_agent::pipeline::image::decode_image;
use modelcache_agent::pipeline::{self, DiffusersModel, GenerateParams, IpAdapter, IpAdapterModel};
use std::sync::Arc;

fn params(base: &str) -> (GenerateParams, std::path::PathBuf, f64) {
    let dir = fixtures().join(format!("{base}-ip-adapter"));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let (base_ref, latents) = reference_run(&fixtures().join(base));
    let model = IpAdapterModel::open(
        &dir.join("ip-adapter.safetensors"),
        &dir.join("image_encoder"),
    )
    .unwrap();
    let p = GenerateParams {
        ip_adapter: Some(IpAdapter {
            model: Arc::new(model),
            image: decode_image(&std::fs::read(dir.join("ip_image.png")).unwrap(), 1 << 22)
                .unwrap(),
            weight: r["scale"].as_f64().unwrap(),
        }),
        negative_prompt: r["negative_prompt"].as_str().unwrap().into(),
        ..reference_params(&base_ref, latents)
    };
    (p, dir, r["fp32_vs_f64_max_abs_diff"].as_f64().unwrap())
}

#[test]
fn ip_adapter_plus_matches_diffusers() {
    let (mut p, dir, _) = params("tiny-sd1");
    let plus = dir.join("plus");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plus.join("reference_plus.json")).unwrap())
            .unwrap();
    let ip = p.ip_adapter.as_mut().unwrap();
    ip.model = Arc::new(
        IpAdapterModel::open(
            &plus.join("ip-adapter-plus.safetensors"),
            &dir.join("image_encoder"),
        )
        .unwrap(),
    );
    ip.weight = r["scale"].as_f64().unwrap();
    let image = generate("tiny-sd1", &p);
    let d = max_abs_diff_from(&image, &plus.join("reference_plus_f64.npy"));
    let f32_run = r["fp32_vs_f64_max_abs_diff"].as_f64().unwrap();
    eprintln!("tiny-sd1 IP-Adapter Plus: {d:.2e} from diffusers' float64 run (its float32 run: {f32_run:.2e})");
    assert!(d < 1e-3, "max abs difference {d}");
}

fn generate(base: &str, p: &GenerateParams) -> Vec<f32> {
    let model = DiffusersModel::open(&fixtures().join(base)).unwrap();
    pipeline::generate(&tiny_cache(), &model, p, &|_| true)
        .unwrap()
        .remove(0)
        .data
}

#[test]
fn ip_adapters_match_diffusers() {
    for base in ["tiny-sd1", "tiny-sdxl"] {
        let (p, dir, f32_run) = params(base);
        let image = generate(base, &p);
        let d = max_abs_diff_from(&image, &dir.join("reference_f64.npy"));
        eprintln!("{base} IP-Adapter: {d:.2e} from diffusers' float64 run (its float32 run: {f32_run:.2e})");
        assert!(d < 1e-3, "{base}: max abs difference {d}");
    }
}

#[test]
fn the_command_line_takes_an_ip_adapter_file_or_invokeai_folder() {
    let out = tempfile::tempdir().unwrap();
    let dir = fixtures().join("tiny-sd1-ip-adapter");
    let run = |spec: &str, file: &str| {
        let o = crate::common::generate_reference_cli(
            &["--ip-adapter".into(), spec.into()],
            &out.path().join("state"),
            &out.path().join(file),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (_, image) = modelcache_agent::pipeline::image::read_npy(
            &std::fs::read(out.path().join(file)).unwrap(),
        )
        .unwrap();
        image
    };
    let image = dir.join("ip_image.png");
    let file = run(
        &format!(
            "model={},image={},weight=0.6",
            dir.join("ip-adapter.safetensors").display(),
            image.display()
        ),
        "a.npy",
    );
    let d = max_abs_diff_from(&file, &dir.join("reference_f64.npy"));
    assert!(d < 1e-3, "{d}");
    let folder = run(
        &format!(
            "model={},image={},weight=0.6,encoder={}",
            dir.join("invokeai").display(),
            image.display(),
            dir.join("image_encoder").display()
        ),
        "b.npy",
    );
    assert_eq!(file, folder, "the pickled folder is the same adapter");
}

#[test]
fn ip_adapter_files_that_cannot_be_used_are_refused_with_the_reason() {
    use modelcache_agent::store::safetensors::write_sparse;
    use safetensors::Dtype::F32;
    let dir = tempfile::tempdir().unwrap();
    let encoder = fixtures().join("tiny-sd1-ip-adapter/image_encoder");
    let open = |name: &str, tensors: &[(&str, safetensors::Dtype, &[usize])]| {
        let file = dir.path().join(name);
        write_sparse(&file, tensors, &[]).unwrap();
        IpAdapterModel::open(&file, &encoder)
            .unwrap_err()
            .to_string()
    };
    let layer = ("ip_adapter.1.to_k_ip.weight", F32, &[32usize, 32][..]);
    // FaceID's projection is not CLIP's.
    let e = open(
        "faceid.safetensors",
        &[("image_proj.proj.0.weight", F32, &[64, 512]), layer],
    );
    assert!(
        e.contains("is not supported") && e.contains("FaceID"),
        "{e}"
    );
    // A projection made for another encoder's embeddings (this one makes 24).
    let e = open(
        "wide.safetensors",
        &[
            ("image_proj.proj.weight", F32, &[128, 1024]),
            ("image_proj.norm.weight", F32, &[32]),
            layer,
        ],
    );
    assert!(e.contains("width 1024") && e.contains("24"), "{e}");
    // No attention layers.
    let e = open(
        "nolayers.safetensors",
        &[
            ("image_proj.proj.weight", F32, &[128, 24]),
            ("image_proj.norm.weight", F32, &[32]),
        ],
    );
    assert!(e.contains("no ip_adapter.N.to_k_ip.weight"), "{e}");
}
