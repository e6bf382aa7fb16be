//! Image editing against diffusers: image-to-image at two strengths, and
//! inpainting with a text-to-image UNet and with an inpainting UNet, each
//! replaying diffusers' exact Gaussian draws and compared with its float64
//! run (`tests/fixtures/tiny-sd1-edit`).

use crate::common::{draws, fixtures, max_abs_diff_from, tiny_cache};
use modelcache_agent::pipeline::image::{decode_image, decode_mask};
use modelcache_agent::pipeline::{self, DiffusersModel, Edit, GenerateParams, Stage};

const MAX_PIXELS: u64 = 1 << 22;

fn edit_fixture() -> (std::path::PathBuf, serde_json::Value) {
    let dir = fixtures().join("tiny-sd1-edit");
    let r = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    (dir, r)
}

/// The reference run `name`: diffusers' parameters, its draws, the image and
/// (for inpainting) the mask as the API decodes them.
fn params(name: &str) -> (GenerateParams, std::path::PathBuf, f64) {
    let (dir, r) = edit_fixture();
    let run = &r["runs"][name];
    let draws = draws(&dir.join("draws.safetensors"), "draws");
    let image = decode_image(&std::fs::read(dir.join("image.png")).unwrap(), MAX_PIXELS).unwrap();
    let mask = name
        .starts_with("inpaint")
        .then(|| decode_mask(&std::fs::read(dir.join("mask.png")).unwrap(), MAX_PIXELS).unwrap());
    let p = GenerateParams {
        prompt: r["prompt"].as_str().unwrap().into(),
        steps: r["steps"].as_u64().unwrap() as usize,
        guidance_scale: r["guidance_scale"].as_f64().unwrap(),
        width: 64,
        height: 64,
        edit: Some(Edit {
            image,
            mask,
            strength: run["strength"].as_f64().unwrap(),
        }),
        draws: Some(draws),
        ..Default::default()
    };
    let model = fixtures().join(run["model"].as_str().unwrap());
    (p, model, run["fp32_vs_f64_max_abs_diff"].as_f64().unwrap())
}

fn check(name: &str) -> pipeline::Image {
    let (p, model, diffusers_f32) = params(name);
    let model = DiffusersModel::open(&model).unwrap();
    let steps = std::sync::Mutex::new(0);
    let images = pipeline::generate(&tiny_cache(), &model, &p, &|s| {
        if matches!(s, Stage::Denoising { .. }) {
            *steps.lock().unwrap() += 1;
        }
        true
    })
    .unwrap();
    let (dir, _) = edit_fixture();
    let d = max_abs_diff_from(&images[0].data, &dir.join(format!("{name}_f64.npy")));
    eprintln!("{name}: {d:.2e} from diffusers' float64 run (its float32 run: {diffusers_f32:.2e})");
    assert!(d < 1e-3, "{name}: max abs difference {d}");
    let strength = p.edit.as_ref().unwrap().strength;
    assert_eq!(
        *steps.lock().unwrap(),
        (p.steps as f64 * strength) as usize,
        "{name}: an edit at strength s runs s of the steps"
    );
    images.into_iter().next().unwrap()
}

#[test]
fn image_to_image_matches_diffusers_at_two_strengths() {
    let half = check("img2img_0.5");
    let more = check("img2img_0.75");
    assert_ne!(half, more, "strength changes the image");
}

#[test]
fn inpainting_with_a_text_to_image_unet_matches_diffusers_at_two_strengths() {
    check("inpaint");
    check("inpaint_0.75");
}

#[test]
fn inpainting_with_an_inpainting_unet_matches_diffusers() {
    check("inpaint_unet");
}

#[test]
fn an_inpainting_model_also_generates_from_text() {
    let model = DiffusersModel::open(&fixtures().join("tiny-sd1-inpaint")).unwrap();
    assert!(model.inpainting());
    let p = GenerateParams {
        prompt: "a red cat".into(),
        steps: 2,
        width: 64,
        height: 64,
        seed: 3,
        ..Default::default()
    };
    let a = pipeline::generate(&tiny_cache(), &model, &p, &|_| true).unwrap();
    let b = pipeline::generate(&tiny_cache(), &model, &p, &|_| true).unwrap();
    assert_eq!(a, b);
    assert!(a[0].data.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn edits_that_cannot_run_are_refused_before_any_work() {
    let (mut p, model, _) = params("img2img_0.5");
    let model = DiffusersModel::open(&model).unwrap();
    p.edit.as_mut().unwrap().strength = 0.1;
    let e = pipeline::generate(&tiny_cache(), &model, &p, &|_| true).unwrap_err();
    assert!(e.to_string().contains("raise strength or steps"), "{e}");
    let (mut p, _, _) = params("inpaint");
    p.width = 128;
    let e = pipeline::generate(&tiny_cache(), &model, &p, &|_| true).unwrap_err();
    assert!(e.to_string().contains("64x64"), "{e}");
}

#[test]
fn the_command_line_edits_with_init_image_mask_and_strength() {
    let (dir, _) = edit_fixture();
    let out = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], file: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_modelcache-agent"))
            .arg("generate")
            .arg("--model")
            .arg(fixtures().join("tiny-sd1"))
            .args(["--prompt", "a red cat", "--steps", "4", "--out"])
            .arg(out.path().join(file))
            .arg("--init-image")
            .arg(dir.join("image.png"))
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let mask = dir.join("mask.png");
    let mask = mask.to_str().unwrap();
    assert!(run(&["--strength", "0.5"], "a.png").0);
    assert!(run(&["--mask", mask], "b.png").0);
    let read = |f: &str| std::fs::read(out.path().join(f)).unwrap();
    assert_eq!(
        modelcache_agent::pipeline::image::png_size(&read("a.png")),
        Some((64, 64)),
        "the image's own size"
    );
    assert_ne!(read("a.png"), read("b.png"));
    let (ok, err) = run(&["--strength", "1.5"], "c.png");
    assert!(!ok && err.contains("--strength"), "{err}");
    let (ok, err) = run(
        &["--mask", dir.join("reference.json").to_str().unwrap()],
        "c.png",
    );
    assert!(
        !ok && err.contains("--mask") && err.contains("PNG, JPEG or WebP"),
        "{err}"
    );
}
