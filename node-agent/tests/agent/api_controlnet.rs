//! ControlNets, T2I-Adapters and IP-Adapters over HTTP: the `controlnet`
//! and `ip_adapter` fields of both endpoints (base64 images in JSON, form
//! parts in an edit, and through the official openai client), the canny
//! preprocessor, and every bad input refused with a 400 naming the field.

use crate::api::{decode_b64, post, run_openai_client, Agent};
use crate::api_edit::{edit, image_of, param, Part};
use crate::common::{copy_dir, fixtures};
use base64::Engine;
use serde_json::json;

fn agent() -> Agent {
    Agent::start_with(
        |models| {
            copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny"));
            let cn = fixtures().join("tiny-sd1-controlnet");
            copy_dir(&cn.join("controlnet-a"), &models.join("controlnets/a"));
            copy_dir(&cn.join("controlnet-b"), &models.join("controlnets/b"));
            std::fs::copy(
                cn.join("controlnet-a.safetensors"),
                models.join("controlnets/a-single.safetensors"),
            )
            .unwrap();
            copy_dir(
                &fixtures().join("tiny-sdxl-controlnet/controlnet-a"),
                &models.join("controlnets/xl"),
            );
            copy_dir(
                &fixtures().join("tiny-sd1-t2i-adapter/adapter"),
                &models.join("adapters/t2i"),
            );
            copy_dir(&fixtures().join("tiny-sd1-lora"), &models.join("loras"));
            copy_dir(&fixtures().join("tiny-sd1-ip-adapter"), &models.join("ip"));
            copy_dir(
                &fixtures().join("tiny-sdxl-ip-adapter"),
                &models.join("ip-xl"),
            );
            copy_dir(
                &fixtures().join("tiny-sd1-ip-adapter/image_encoder"),
                &models.join("encoders/tiny_image_encoder"),
            );
            std::fs::create_dir_all(models.join("ip-alone")).unwrap();
            std::fs::copy(
                fixtures().join("tiny-sd1-ip-adapter/ip-adapter.safetensors"),
                models.join("ip-alone/ip-adapter.safetensors"),
            )
            .unwrap();
        },
        &[],
    )
}

fn control_png() -> Vec<u8> {
    std::fs::read(fixtures().join("tiny-sd1-controlnet/control.png")).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn request(controlnet: serde_json::Value) -> serde_json::Value {
    json!({"model": "tiny", "prompt": "a red cat", "size": "64x64", "steps": 3, "seed": 7,
           "controlnet": controlnet})
}

/// A `w`×`h` PNG of deterministic noise: large, and full of edges.
fn noise_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    let mut writer = enc.write_header().unwrap();
    let mut x = 0x2545f4914f6cdd1du64;
    let data: Vec<u8> = (0..w * h * 3)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect();
    writer.write_image_data(&data).unwrap();
    writer.finish().unwrap();
    out
}

#[test]
fn control_images_steer_generations_and_edits() {
    let agent = agent();
    let control = b64(&control_png());
    let plain = image_of(&post(&agent.api, request(json!([]))));
    let one = |model: &str| {
        image_of(&post(
            &agent.api,
            request(json!([{"model": model, "image": control, "weight": 0.8}])),
        ))
    };
    let a = one("controlnets/a");
    assert_ne!(a, plain, "the control changes the image");
    assert_eq!(a, one("controlnets/a"), "deterministic");
    // A single-file ControlNet converts to the same network.
    assert_eq!(a, one("controlnets/a-single.safetensors"));
    // Two at once, with a data URL, their own weights and spans.
    let two = image_of(&post(
        &agent.api,
        request(json!([
            {"model": "controlnets/a", "image": format!("data:image/png;base64,{control}"), "weight": 0.8, "end": 0.75},
            {"model": "controlnets/b", "image": control, "weight": 0.5, "start": 0.25},
        ])),
    ));
    assert_ne!(two, a);
    // A T2I-Adapter is named the same way.
    let t2i = one("adapters/t2i");
    assert!(t2i != plain && t2i != a);
    // An edit takes the control image as a form part.
    let spec = json!([{"model": "controlnets/a", "weight": 0.8}]).to_string();
    let png = control_png();
    let image = std::fs::read(fixtures().join("tiny-sd1-edit/image.png")).unwrap();
    let ask = |with_control: bool| {
        let mut parts = vec![
            ("model", Part::Text("tiny")),
            ("prompt", Part::Text("a red cat")),
            ("steps", Part::Text("3")),
            ("seed", Part::Text("7")),
            ("image", Part::File(&image)),
        ];
        if with_control {
            parts.push(("controlnet", Part::Text(&spec)));
            parts.push(("controlnet_image", Part::File(&png)));
        }
        image_of(&edit(&agent.api, &parts))
    };
    assert_ne!(ask(true), ask(false), "the control changes the edit");
}

#[test]
fn the_canny_preprocessor_equals_sending_the_edges() {
    let agent = agent();
    let photo = noise_png(96, 80);
    let decoded = modelcache_agent::pipeline::image::decode_image(&photo, 1 << 22).unwrap();
    let edges = modelcache_agent::pipeline::canny::canny(&decoded, 100.0, 200.0);
    let edges_png = edges.to_png().unwrap();
    let with = |spec: serde_json::Value| image_of(&post(&agent.api, request(json!([spec]))));
    let preprocessed =
        with(json!({"model": "controlnets/a", "image": b64(&photo), "preprocess": "canny"}));
    let sent = with(json!({"model": "controlnets/a", "image": b64(&edges_png)}));
    assert_eq!(preprocessed, sent);
    let raw = with(json!({"model": "controlnets/a", "image": b64(&photo)}));
    assert_ne!(
        preprocessed, raw,
        "the edges are the control, not the photo"
    );
}

#[test]
fn bodies_with_control_images_may_exceed_the_json_limit_and_others_may_not() {
    let agent = agent();
    let big = noise_png(200, 200);
    assert!(b64(&big).len() > 64 << 10);
    let r = post(
        &agent.api,
        request(json!([{"model": "controlnets/a", "image": b64(&big)}])),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let png = decode_b64(r.json()["data"][0]["b64_json"].as_str().unwrap());
    assert_eq!(
        crate::api::png_size(&png),
        (64, 64),
        "resized to the output"
    );
    let padded = json!({"model": "tiny", "prompt": "a red cat", "user": "x".repeat(100_000)});
    assert_eq!(post(&agent.api, padded).status, 413);
}

#[test]
fn bad_controlnets_are_400_naming_the_field() {
    let agent = agent();
    let control = b64(&control_png());
    let huge = b64(&crate::api_edit::zeros_png(4096, 4096));
    let cases = [
        (
            json!([{"model": "controlnets/none", "image": control}]),
            "controlnet[0].model",
        ),
        (
            json!([{"model": "loras/lora.safetensors", "image": control}]),
            "not a ControlNet",
        ),
        (
            json!([{"model": "tiny", "image": control}]),
            "not a ControlNet",
        ),
        (
            json!([{"model": "controlnets/xl", "image": control}]),
            "is for Sdxl models and the model is Sd1",
        ),
        (
            json!([{"model": "controlnets/a", "image": "!!!"}]),
            "controlnet[0].image: is not base64",
        ),
        (
            json!([{"model": "controlnets/a", "image": b64(b"not an image")}]),
            "controlnet[0].image",
        ),
        (
            json!([{"model": "controlnets/a", "image": huge}]),
            "controlnet[0].image",
        ),
        (
            json!([{"model": "controlnets/a"}]),
            "controlnet[0].image: is required",
        ),
        (
            json!([{"model": "controlnets/a", "image": control, "weight": 3}]),
            "controlnet[0].weight",
        ),
        (
            json!([{"model": "controlnets/a", "image": control}, {"model": "controlnets/b", "image": control, "start": 0.5, "end": 0.5}]),
            "controlnet[1].start",
        ),
        (
            json!([{"model": "controlnets/a", "image": control, "preprocess": "depth"}]),
            "controlnet[0].preprocess",
        ),
        (
            json!([{"model": "controlnets/a", "image": control, "preprocess": "canny", "low_threshold": 300, "high_threshold": 200}]),
            "controlnet[0].low_threshold",
        ),
        (
            json!(vec![json!({"model": "controlnets/a", "image": control}); 5]),
            "at most 4",
        ),
    ];
    for (spec, says) in cases {
        let r = post(&agent.api, request(spec.clone()));
        assert_eq!(param(&r), "controlnet", "{spec}");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "{says:?} not in {message:?}");
        assert!(!message.contains("/tmp"), "no host paths: {message}");
    }
    // A misspelt field is named.
    let r = post(
        &agent.api,
        request(json!([{"model": "controlnets/a", "image": control, "wieght": 1}])),
    );
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("wieght"));
}

#[test]
fn the_official_openai_client_sends_controlnets() {
    let agent = agent();
    let dir = fixtures().join("tiny-sd1-controlnet");
    run_openai_client(&format!(
        r#"
import base64, openai
client = openai.OpenAI(base_url="http://{addr}/v1", api_key="unused")
control = base64.b64encode(open("{dir}/control.png", "rb").read()).decode()
def gen(**extra):
    r = client.images.generate(model="tiny", prompt="a red cat", size="64x64", response_format="b64_json",
                               extra_body={{"steps": 2, "seed": 3, **extra}})
    return r.data[0].b64_json
plain = gen()
assert gen(controlnet=[{{"model": "controlnets/a", "image": control}}]) != plain
ip = base64.b64encode(open("{ip}", "rb").read()).decode()
assert gen(ip_adapter={{"model": "ip/ip-adapter.safetensors", "image": ip, "weight": 0.5}}) != plain
try:
    gen(controlnet=[{{"model": "controlnets/xl", "image": control}}])
    raise SystemExit("an SDXL ControlNet was accepted for an SD 1.x model")
except openai.BadRequestError as e:
    assert e.body["param"] == "controlnet", e.body
print("ok")
"#,
        addr = agent.api,
        dir = dir.display(),
        ip = fixtures()
            .join("tiny-sd1-ip-adapter/ip_image.png")
            .display()
    ));
}

fn ip_png() -> Vec<u8> {
    std::fs::read(fixtures().join("tiny-sd1-ip-adapter/ip_image.png")).unwrap()
}

#[test]
fn an_image_prompt_steers_generations_and_edits() {
    let agent = agent();
    let ip = b64(&ip_png());
    let ask = |ip_adapter: serde_json::Value| {
        let mut body = request(json!([]));
        body["ip_adapter"] = ip_adapter;
        image_of(&post(&agent.api, body))
    };
    let plain = image_of(&post(&agent.api, request(json!([]))));
    let half = ask(json!({"model": "ip/ip-adapter.safetensors", "image": ip, "weight": 0.5}));
    assert_ne!(half, plain);
    assert_eq!(
        ask(json!({"model": "ip/ip-adapter.safetensors", "image": ip, "weight": 0.0})),
        plain,
        "weight 0 is no image prompt"
    );
    // The encoder named explicitly, for an adapter without one beside it.
    assert_eq!(
        ask(
            json!({"model": "ip-alone/ip-adapter.safetensors", "image": ip, "weight": 0.5,
                   "image_encoder": "ip/image_encoder"})
        ),
        half
    );
    // InvokeAI's folder: the original release's pickled sections, and the
    // encoder named in image_encoder.txt.
    assert_eq!(
        ask(json!({"model": "ip/invokeai", "image": ip, "weight": 0.5})),
        half
    );
    // With a ControlNet at once.
    let mut body = request(json!([{"model": "controlnets/a", "image": b64(&control_png())}]));
    body["ip_adapter"] = json!({"model": "ip/ip-adapter.safetensors", "image": ip, "weight": 0.5});
    assert_ne!(image_of(&post(&agent.api, body)), half);
    // An edit takes the image as a form part.
    let png = ip_png();
    let image = std::fs::read(fixtures().join("tiny-sd1-edit/image.png")).unwrap();
    let spec = json!({"model": "ip/ip-adapter.safetensors", "weight": 0.5}).to_string();
    let edit_with = |with_ip: bool| {
        let mut parts = vec![
            ("model", Part::Text("tiny")),
            ("prompt", Part::Text("a red cat")),
            ("steps", Part::Text("3")),
            ("seed", Part::Text("7")),
            ("image", Part::File(&image)),
        ];
        if with_ip {
            parts.push(("ip_adapter", Part::Text(&spec)));
            parts.push(("ip_adapter_image", Part::File(&png)));
        }
        image_of(&edit(&agent.api, &parts))
    };
    assert_ne!(edit_with(true), edit_with(false));
}

#[test]
fn bad_image_prompts_are_400_naming_the_field() {
    let agent = agent();
    let ip = b64(&ip_png());
    let cases = [
        (
            json!({"model": "ip/none.safetensors", "image": ip}),
            "ip_adapter.model",
        ),
        (
            json!({"model": "controlnets/a", "image": ip}),
            "not an IP-Adapter",
        ),
        (
            json!({"model": "ip-alone/ip-adapter.safetensors", "image": ip}),
            "needs its CLIP Vision image encoder",
        ),
        (
            json!({"model": "ip/ip-adapter.safetensors", "image": ip, "image_encoder": "tiny"}),
            "not a CLIP Vision",
        ),
        (
            json!({"model": "ip-xl/ip-adapter.safetensors", "image": ip}),
            "cross-attention",
        ),
        (
            json!({"model": "ip/ip-adapter.safetensors"}),
            "ip_adapter.image: is required",
        ),
        (
            json!({"model": "ip/ip-adapter.safetensors", "image": "%%%"}),
            "ip_adapter.image: is not base64",
        ),
        (
            json!({"model": "ip/ip-adapter.safetensors", "image": b64(b"GIF89a")}),
            "ip_adapter.image",
        ),
        (
            json!({"model": "ip/ip-adapter.safetensors", "image": ip, "weight": -1}),
            "ip_adapter.weight",
        ),
    ];
    for (spec, says) in cases {
        let mut body = request(json!([]));
        body["ip_adapter"] = spec.clone();
        let r = post(&agent.api, body);
        assert_eq!(param(&r), "ip_adapter", "{spec}");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "{says:?} not in {message:?}");
        assert!(!message.contains("/tmp"), "no host paths: {message}");
    }
}
