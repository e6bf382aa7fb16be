//! The gateway end to end: the operator (autoscaling every second), the
//! gateway and three agents as processes against an API server given as a
//! [`Kube`], driven through one base URL.
//!
//! In order: three models on different nodes reached with the official openai
//! client, an image edited and one streamed through the same base URL; requests with the same LoRA set landing on one agent; a deployment
//! at zero replicas answering its first request after scaling up and the next
//! one fast; a burst scaling a deployment up and the quiet after it scaling it
//! down after the delay; an agent killed during a burst losing no request.

use crate::kube::Kube;
use crate::scenarios::{assert_panels_have_data, post_generation, Cluster};
use crate::{http_get, metric_sum, tool, Prometheus};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// The official openai client against the gateway: every model listed and
/// generated from, then five requests with one LoRA set. Prints a JSON line.
const CLIENT: &str = r#"
import base64, json, sys, openai
client = openai.OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key="unused", max_retries=0)
ids = sorted(m.id for m in client.models.list().data)
sizes, pngs = {}, {}
for model in ["alpha", "beta", "gamma"]:
    r = client.images.generate(model=model, prompt="a lighthouse", size="64x64", extra_body={"steps": 2, "seed": 1})
    png = base64.b64decode(r.data[0].b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n", model
    sizes[model], pngs[model] = len(png), png
# An edit through the gateway: gamma's image inpainted where it is light.
raw = client.images.with_raw_response.edit(model="gamma", image=("in.png", pngs["gamma"], "image/png"),
    mask=("mask.png", pngs["gamma"], "image/png"), prompt="a lighthouse at night",
    extra_body={"steps": 2, "strength": 0.5})
edited = base64.b64decode(raw.parse().data[0].b64_json)
assert edited[:8] == b"\x89PNG\r\n\x1a\n" and edited != pngs["gamma"]
edit_backend = raw.headers["x-modelcache-backend"]
backends = []
for i in range(5):
    raw = client.images.with_raw_response.generate(model="beta", prompt=f"a cat {i}", size="64x64",
        extra_body={"steps": 2, "loras": [{"path": "loras/style.safetensors", "weight": 0.7}]})
    raw.parse()
    backends.append(raw.headers["x-modelcache-backend"])
# A streamed generation: previews pass through the gateway as they come.
import time
seen = []
for e in client.images.generate(model="alpha", prompt="a lighthouse", size="64x64", stream=True,
        partial_images=2, extra_body={"steps": 40, "seed": 1}):
    seen.append((e.type, time.monotonic()))
kinds = [k for k, _ in seen]
assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
stream_gap = seen[-1][1] - seen[0][1]
print(json.dumps({"ids": ids, "sizes": sizes, "lora_backends": backends, "edit_backend": edit_backend,
    "stream_gap": stream_gap}))
"#;

fn generation(prompt: &str, steps: u32) -> Value {
    json!({"model": "delta", "prompt": prompt, "size": "64x64", "steps": steps, "seed": 3})
}

/// Requests sent at once from threads: each one's status and `x-modelcache-backend`.
/// Each asks for one step more than the one before, so that they cannot
/// share a denoising batch and load the agents one by one, as requests of
/// many users with their own settings do.
fn burst(gateway: &str, model: &str, n: usize, steps: u32) -> Vec<(u16, String, Value)> {
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (gateway, model) = (gateway.to_string(), model.to_string());
            std::thread::spawn(move || {
                let mut req = generation(&format!("burst {i}"), steps + i as u32);
                req["model"] = json!(model);
                let (code, headers, body) = post_generation(&gateway, &req);
                let backend = headers
                    .iter()
                    .find(|(k, _)| k == "x-modelcache-backend")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                (code, backend, body)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn replicas<K: Kube>(c: &Cluster<'_, K>, name: &str) -> i64 {
    c.mdep(name)["spec"]["replicas"].as_i64().unwrap_or(-1)
}

/// Runs the gateway scenarios on a fresh cluster against `api`.
pub fn run<K: Kube>(api: &K) {
    let mut c = Cluster::start(api);
    let gw = c.start_gateway();

    // Three models on three nodes (alpha only on n1, gamma only on n3), and
    // beta on all three for the LoRA requests.
    for (name, spec) in [
        ("alpha", json!({"model": {"path": "alpha"}, "replicas": 1})),
        ("gamma", json!({"model": {"path": "gamma"}, "replicas": 1})),
        (
            "beta",
            json!({"model": {"path": "beta"}, "replicas": 3, "warmTier": "Ram"}),
        ),
    ] {
        let (code, body) = c.create(spec, name);
        assert_eq!(code, 201, "{body}");
    }
    assert_eq!(c.wait_ready("alpha", 1), ["n1"]);
    assert_eq!(c.wait_ready("gamma", 1), ["n3"]);
    assert_eq!(c.wait_ready("beta", 3).len(), 3);
    c.wait(
        "the gateway to see beta's three agents",
        Duration::from_secs(30),
        || (c.endpoints("beta").len() == 3).then_some(()),
    );

    // 1. One base URL, the official client, three models.
    let out = Command::new(tool("python3"))
        .args(["-c", CLIENT, &gw])
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "openai client: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ids"], json!(["alpha", "beta", "gamma"]), "{report}");
    assert_eq!(
        report["edit_backend"], "n3",
        "gamma's edit went to its agent"
    );
    // A gateway that gathered the stream would hand every event over at once.
    assert!(
        report["stream_gap"].as_f64().unwrap_or(0.0) > 0.05,
        "the stream's events came together: {report}"
    );
    // 2. Same LoRA set, one agent, while it is not overloaded (one at a time).
    let backends: Vec<&str> = report["lora_backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(backends.len(), 5);
    assert!(
        backends.iter().all(|b| *b == backends[0]),
        "same-LoRA requests spread over {backends:?}"
    );
    eprintln!(
        "gateway: openai client ok; LoRA requests all on {}",
        backends[0]
    );

    // 3. Scale from zero: the first request waits for a replica, the next is fast.
    let (code, body) = c.create(
        json!({"model": {"path": "beta"}, "replicas": 0,
               "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "targetInFlight": 1, "scaleDownDelaySeconds": 4}}),
        "delta",
    );
    assert_eq!(code, 201, "{body}");
    c.wait("the gateway to list delta", Duration::from_secs(10), || {
        let (_, models) = http_get(&gw, "/v1/models").ok()?;
        String::from_utf8_lossy(&models)
            .contains("\"delta\"")
            .then_some(())
    });
    let gateway_metric = |c: &Cluster<'_, K>, name: &str| -> f64 {
        let (_, metrics) = http_get(
            &format!("127.0.0.1:{}", c.gateway.as_ref().unwrap().1),
            "/metrics",
        )
        .unwrap();
        metric_sum(&String::from_utf8_lossy(&metrics), name)
    };
    let held = |c: &Cluster<'_, K>| gateway_metric(c, "modelcache_gateway_hold_seconds_count");
    let held_before = held(&c);
    let t = Instant::now();
    let (code, _, body) = post_generation(&gw, &generation("first", 2));
    let first = t.elapsed();
    assert_eq!(code, 200, "{body}\n{}", c.logs());
    assert!(replicas(&c, "delta") >= 1, "the gateway scaled delta up");
    assert_eq!(
        gateway_metric(
            &c,
            "modelcache_gateway_scale_from_zero_total{model=\"default/delta\"}"
        ),
        1.0,
        "the first request raised delta from zero"
    );
    assert_eq!(
        held(&c),
        held_before + 1.0,
        "the first request waited for a replica"
    );
    let t = Instant::now();
    let (code, _, body) = post_generation(&gw, &generation("second", 2));
    let second = t.elapsed();
    assert_eq!(code, 200, "{body}");
    // Whether the second is faster in time depends on how fast the replica
    // came up (this model was warm on every node); that it did not wait does not.
    assert_eq!(
        held(&c),
        held_before + 1.0,
        "the second request went straight to the replica"
    );
    eprintln!("gateway: from zero {first:?}, then {second:?}");
    // Quiet: back to zero after the delay.
    c.wait(
        "delta back to zero replicas",
        Duration::from_secs(30),
        || (replicas(&c, "delta") == 0 && c.endpoints("delta").is_empty()).then_some(()),
    );

    // 4. A burst scales up to maxReplicas; the quiet after it scales down.
    let gw2 = gw.clone();
    let load = std::thread::spawn(move || burst(&gw2, "delta", 6, 20));
    c.wait(
        "a burst to scale delta to 2",
        Duration::from_secs(60),
        || (replicas(&c, "delta") == 2).then_some(()),
    );
    let results = load.join().unwrap();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    assert_eq!(
        ok,
        6,
        "every burst request got an image: {:?}",
        results.iter().map(|r| (r.0, &r.2)).collect::<Vec<_>>()
    );
    c.wait(
        "delta scaled down after the burst",
        Duration::from_secs(30),
        || (replicas(&c, "delta") == 0).then_some(()),
    );
    let (_, events) = c
        .api
        .read("/apis/events.k8s.io/v1/namespaces/default/events");
    let rescaled: Vec<&str> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "ScaledUp" && e["regarding"]["name"] == "delta")
        .filter_map(|e| e["note"].as_str())
        .collect();
    assert!(
        rescaled.iter().any(|n| n.contains("replicas")),
        "an Event for the scale-up: {rescaled:?}"
    );

    // 5. An agent killed during a burst: every request still gets an image.
    let gw2 = gw.clone();
    let load = std::thread::spawn(move || burst(&gw2, "beta", 12, 10));
    std::thread::sleep(Duration::from_millis(800));
    c.agents[1].3.as_mut().unwrap().kill();
    let results = load.join().unwrap();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let errors: Vec<_> = results
        .iter()
        .filter(|r| r.0 != 200)
        .map(|r| (r.0, &r.2))
        .collect();
    eprintln!("gateway: burst with n2 killed: {ok} of 12 images, errors {errors:?}");
    assert_eq!(
        ok,
        12,
        "requests lost when n2 died: {errors:?}\n{}",
        c.logs()
    );
    let (_, metrics) = http_get(
        &format!("127.0.0.1:{}", c.gateway.as_ref().unwrap().1),
        "/metrics",
    )
    .unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("modelcache_gateway_requests_total{code=\"200\",model=\"default/beta\"}"),
        "{metrics}"
    );
    // The kill did cut requests off, and they were sent again.
    let retried = metric_sum(
        &metrics,
        "modelcache_gateway_retries_total{reason=\"connect\"}",
    );
    assert!(
        retried >= 1.0,
        "no request was retried after n2 died:\n{metrics}"
    );

    // The Gateway dashboard's panels return data from a real Prometheus
    // scraping the gateway and the operator.
    let (operator, gateway) = (
        format!("127.0.0.1:{}", c.operator_metrics),
        format!("127.0.0.1:{}", c.gateway.as_ref().unwrap().1),
    );
    let labels: &[(&str, &str)] = &[("namespace", "modelcache")];
    let prom = Prometheus::start(&[(&operator, labels), (&gateway, labels)]);
    assert!(
        !prom
            .wait_for("count(up == 1) == 2", Duration::from_secs(30))
            .is_empty(),
        "operator and gateway never both scraped"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_panels_have_data(&prom, "gateway");
    c.assert_nothing_forbidden();
}
