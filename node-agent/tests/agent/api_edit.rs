//! `POST /v1/images/edits` over HTTP: image-to-image and inpainting from a
//! multipart form (hand-built and from the official openai client), and
//! every bad upload refused with a 400 naming its field.

use crate::api::{decode_b64, http, png_size, run_openai_client, Agent, Reply};
use crate::common::{copy_dir, fixtures};
use std::time::{Duration, Instant};

/// One part of a form: a text field, or a file with its bytes.
pub(crate) enum Part<'a> {
    Text(&'a str),
    File(&'a [u8]),
}

pub(crate) fn edit(addr: &str, parts: &[(&str, Part)]) -> Reply {
    let boundary = "modelcache-test-boundary";
    let mut body = Vec::new();
    for (name, part) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::Text(v) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{v}\r\n")
                    .as_bytes(),
            ),
            Part::File(bytes) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    http(
        addr,
        "POST",
        "/v1/images/edits",
        &[("content-type", &ct)],
        &body,
    )
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("tiny-sd1-edit").join(name)).unwrap()
}

fn agent() -> Agent {
    Agent::start_with(
        |models| {
            copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny"));
            copy_dir(
                &fixtures().join("tiny-sd1-inpaint"),
                &models.join("tiny-inpaint"),
            );
            std::fs::create_dir_all(models.join("vae")).unwrap();
            std::fs::copy(
                fixtures().join("tiny-sd1-vae.safetensors"),
                models.join("vae/other.safetensors"),
            )
            .unwrap();
        },
        &[],
    )
}

pub(crate) fn image_of(r: &Reply) -> Vec<u8> {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    decode_b64(r.json()["data"][0]["b64_json"].as_str().unwrap())
}

#[test]
fn edits_take_the_image_s_size_or_the_one_asked_for_and_the_mask_matters() {
    let agent = agent();
    let (image, mask) = (fixture("image.png"), fixture("mask.png"));
    let base = |extra: Vec<(&'static str, Part<'static>)>| {
        let mut parts = vec![
            ("model", Part::Text("tiny")),
            ("prompt", Part::Text("a red cat")),
            ("steps", Part::Text("4")),
            ("seed", Part::Text("7")),
        ];
        parts.extend(extra);
        parts
    };
    let img: &'static [u8] = image.leak();
    let msk: &'static [u8] = mask.leak();
    let img2img = image_of(&edit(&agent.api, &base(vec![("image", Part::File(img))])));
    assert_eq!(png_size(&img2img), (64, 64), "the image's own size");
    let again = image_of(&edit(&agent.api, &base(vec![("image", Part::File(img))])));
    assert_eq!(img2img, again, "same seed, same edit");
    let stronger = image_of(&edit(
        &agent.api,
        &base(vec![
            ("image", Part::File(img)),
            ("strength", Part::Text("0.5")),
        ]),
    ));
    assert_ne!(stronger, img2img, "strength changes the edit");
    let inpaint = image_of(&edit(
        &agent.api,
        &base(vec![("image", Part::File(img)), ("mask", Part::File(msk))]),
    ));
    assert_ne!(inpaint, img2img, "a mask makes it inpainting");
    let resized = image_of(&edit(
        &agent.api,
        &base(vec![
            ("image", Part::File(img)),
            ("mask", Part::File(msk)),
            ("size", Part::Text("128x96")),
        ]),
    ));
    assert_eq!(png_size(&resized), (128, 96), "the size asked for");
    // An inpainting model, for edits and from text alone.
    let r = edit(
        &agent.api,
        &[
            ("model", Part::Text("tiny-inpaint")),
            ("prompt", Part::Text("a red cat")),
            ("steps", Part::Text("2")),
            ("image", Part::File(img)),
            ("mask", Part::File(msk)),
        ],
    );
    assert_eq!(png_size(&image_of(&r)), (64, 64));
}

/// A grey PNG of `w`×`h` whose pixels are all zero: compresses a thousandfold.
pub(crate) fn zeros_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_compression(png::Compression::High);
    let mut writer = enc.write_header().unwrap();
    writer
        .write_image_data(&vec![0u8; (w * h) as usize])
        .unwrap();
    writer.finish().unwrap();
    out
}

pub(crate) fn param(r: &Reply) -> String {
    let j = r.json();
    assert_eq!(r.status, 400, "{j}");
    j["error"]["param"].as_str().unwrap_or_default().to_string()
}

#[test]
fn bad_uploads_are_400_naming_the_field() {
    let agent = agent();
    let (image, mask) = (fixture("image.png"), fixture("mask.png"));
    let ask = |parts: Vec<(&str, Part)>| {
        let mut all = vec![
            ("model", Part::Text("tiny")),
            ("prompt", Part::Text("a red cat")),
            ("steps", Part::Text("2")),
        ];
        all.extend(parts);
        edit(&agent.api, &all)
    };
    assert_eq!(param(&ask(vec![])), "image", "no image");
    let r = ask(vec![("image", Part::File(b"GIF89a not really"))]);
    assert_eq!(param(&r), "image");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("PNG, JPEG or WebP"),
        "{}",
        r.json()
    );
    let truncated = &image[..image.len() / 2];
    assert_eq!(param(&ask(vec![("image", Part::File(truncated))])), "image");
    let small_mask = zeros_png(32, 32);
    let r = ask(vec![
        ("image", Part::File(&image)),
        ("mask", Part::File(&small_mask)),
    ]);
    assert_eq!(param(&r), "mask", "a mask of another size");
    let odd = zeros_png(60, 60);
    assert_eq!(param(&ask(vec![("image", Part::File(&odd))])), "image");
    for (field, value) in [
        ("strength", "1.5"),
        ("strength", "0.1"),
        ("n", "two"),
        ("partial_images", "4"),
        ("size", "63x64"),
        ("scheduler", "nonesuch"),
    ] {
        let r = ask(vec![
            ("image", Part::File(&image)),
            (field, Part::Text(value)),
        ]);
        assert_eq!(param(&r), field, "{field}={value}");
    }
    // A decompression bomb: 16 Mpixels in a few kilobytes, refused from its
    // header, before it is decoded.
    let bomb = zeros_png(4096, 4096);
    assert!(bomb.len() < 100 << 10, "{} bytes", bomb.len());
    let started = Instant::now();
    let r = ask(vec![
        ("image", Part::File(&bomb)),
        ("mask", Part::File(&mask)),
    ]);
    assert_eq!(param(&r), "image");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("4096x4096") && msg.contains("pixels"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A body over the upload limit, and one that is not a form.
    let big = vec![0u8; 33 << 20];
    let r = ask(vec![("image", Part::File(&big))]);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let r = http(
        &agent.api,
        "POST",
        "/v1/images/edits",
        &[("content-type", "application/json")],
        b"{}",
    );
    assert_eq!(r.status, 400);
    // The agent is still well.
    let ok = ask(vec![("image", Part::File(&image))]);
    assert_eq!(ok.status, 200);
}

#[test]
fn the_official_openai_client_edits_an_image() {
    let agent = agent();
    let dir = fixtures().join("tiny-sd1-edit");
    run_openai_client(&format!(
        r#"
import base64, openai
client = openai.OpenAI(base_url="http://{addr}/v1", api_key="unused")
with open("{dir}/image.png", "rb") as image, open("{dir}/mask.png", "rb") as mask:
    r = client.images.edit(model="tiny", image=image, mask=mask, prompt="a red cat", n=2,
                           size="64x64", response_format="b64_json", extra_body={{"steps": 2, "seed": 1}})
assert len(r.data) == 2
for d in r.data:
    png = base64.b64decode(d.b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
with open("{dir}/image.png", "rb") as image:
    try:
        client.images.edit(model="tiny", image=image, prompt="a red cat", extra_body={{"strength": 7}})
        raise SystemExit("a strength of 7 was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "strength", e.body
print("ok")
"#,
        addr = agent.api,
        dir = dir.display()
    ));
}

#[test]
fn a_request_may_name_a_vae_under_the_models_folder() {
    let agent = agent();
    let ask = |vae: Option<&str>| {
        let mut body = serde_json::json!({"model": "tiny", "prompt": "a red cat", "size": "64x64", "steps": 2, "seed": 1});
        if let Some(v) = vae {
            body["vae"] = v.into();
        }
        crate::api::post(&agent.api, body)
    };
    let own = image_of(&ask(None));
    let other = image_of(&ask(Some("vae/other.safetensors")));
    assert_ne!(own, other, "the named VAE decodes");
    assert_eq!(other, image_of(&ask(Some("vae/other.safetensors"))));
    // In an edit too.
    let image = fixture("image.png");
    let r = edit(
        &agent.api,
        &[
            ("model", Part::Text("tiny")),
            ("prompt", Part::Text("a red cat")),
            ("steps", Part::Text("2")),
            ("vae", Part::Text("vae/other.safetensors")),
            ("image", Part::File(&image)),
        ],
    );
    assert_eq!(png_size(&image_of(&r)), (64, 64));
    for bad in ["tiny", "vae/none.safetensors", "../vae/other.safetensors"] {
        assert_eq!(param(&ask(Some(bad))), "vae", "{bad}");
    }
}

#[test]
fn a_request_may_name_an_sdxl_refiner_to_finish_its_images() {
    let agent = Agent::start_with(
        |models| {
            copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny"));
            copy_dir(&fixtures().join("tiny-sdxl"), &models.join("xl"));
            copy_dir(
                &fixtures().join("tiny-sdxl-refiner"),
                &models.join("xl-refiner"),
            );
        },
        &[],
    );
    let ask = |extra: serde_json::Value| {
        let mut body = serde_json::json!({"model": "xl", "prompt": "a red cat", "size": "64x64", "steps": 5, "seed": 1});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        crate::api::post(&agent.api, body)
    };
    let alone = image_of(&ask(serde_json::json!({})));
    let refined = image_of(&ask(serde_json::json!({"refiner": "xl-refiner"})));
    assert_ne!(alone, refined, "the refiner finishes the image");
    let skipped = ask(serde_json::json!({"refiner": "xl-refiner", "denoising_end": 1.0}));
    assert_eq!(
        image_of(&skipped),
        alone,
        "denoising_end 1 skips the refiner"
    );
    // In an image-to-image edit too.
    let image = fixture("image.png");
    let r = edit(
        &agent.api,
        &[
            ("model", Part::Text("xl")),
            ("prompt", Part::Text("a red cat")),
            ("steps", Part::Text("5")),
            ("refiner", Part::Text("xl-refiner")),
            ("denoising_end", Part::Text("0.7")),
            ("image", Part::File(&image)),
        ],
    );
    assert_eq!(png_size(&image_of(&r)), (64, 64));
    // The refiner is not a model of its own.
    let r = crate::api::post(
        &agent.api,
        serde_json::json!({"model": "xl-refiner", "prompt": "a red cat"}),
    );
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    for (extra, field) in [
        (serde_json::json!({"refiner": "tiny"}), "refiner"),
        (serde_json::json!({"refiner": "nothing"}), "refiner"),
        (
            serde_json::json!({"refiner": "xl-refiner", "model": "tiny"}),
            "refiner",
        ),
        (
            serde_json::json!({"refiner": "xl-refiner", "denoising_end": 0.0}),
            "denoising_end",
        ),
        (serde_json::json!({"denoising_end": 1.5}), "denoising_end"),
    ] {
        assert_eq!(param(&ask(extra.clone())), field, "{extra}");
    }
}
