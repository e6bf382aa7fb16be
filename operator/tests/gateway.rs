//! The gateway's request path over real HTTP, without an API server: its
//! watched objects filled by hand (`gateway::fixtures`), stand-in agents that
//! answer as told, and the client a user would see.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use modelcache_crds::Tier;
use modelcache_operator::gateway::payload::{self, Payload};
use modelcache_operator::gateway::{fixtures, router, Gateway, Limits};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a stand-in agent answers.
#[derive(Clone, Copy)]
enum Reply {
    Image,
    Unavailable,
    Busy(u64),
}

struct Agent {
    node: &'static str,
    reply: Reply,
    /// What it reports in `x-modelcache-queue-depth`.
    depth: AtomicU32,
    hits: AtomicUsize,
    /// The last request's `x-request-id`, `authorization` and `model`.
    seen: Mutex<(String, String, String)>,
}

async fn answer(
    State(a): State<Arc<Agent>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    a.hits.fetch_add(1, Ordering::SeqCst);
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let model = if payload::is_form(&headers) {
        // An edit: the form's model, and the size of its image as the last word.
        let form = Payload::read(&headers, body).await.unwrap();
        let Payload::Form(parts) = &form else {
            unreachable!()
        };
        let image = parts.iter().find(|p| p.name == "image").unwrap();
        format!("{} {}", form.model().unwrap_or_default(), image.data.len())
    } else {
        serde_json::from_slice::<Value>(&body).unwrap_or_default()["model"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    *a.seen.lock().unwrap() = (h("x-request-id"), h("authorization"), model);
    let mut r = match a.reply {
        Reply::Image => axum::Json(json!({"created": 0, "data": [{"b64_json": a.node}]})).into_response(),
        Reply::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": {"code": "cache_full", "message": "full", "type": "server_error", "param": null}})),
        )
            .into_response(),
        Reply::Busy(secs) => {
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                axum::Json(json!({"error": {"code": "queue_full", "message": "full", "type": "rate_limit_error", "param": null}})),
            )
                .into_response();
            r.headers_mut().insert("retry-after", HeaderValue::from(secs));
            r
        }
    };
    r.headers_mut().insert(
        "x-modelcache-queue-depth",
        HeaderValue::from(a.depth.load(Ordering::SeqCst)),
    );
    r
}

async fn listen(router: Router) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router).await });
    addr
}

async fn agent(node: &'static str, reply: Reply) -> (Arc<Agent>, SocketAddr) {
    let a = Arc::new(Agent {
        node,
        reply,
        depth: AtomicU32::new(0),
        hits: AtomicUsize::new(0),
        seen: Mutex::new(Default::default()),
    });
    let addr = listen(
        Router::new()
            .route("/v1/images/generations", post(answer))
            .route("/v1/images/edits", post(answer))
            .with_state(a.clone()),
    )
    .await;
    (a, addr)
}

/// A gateway whose deployment `ml/alpha` is held Ready in VRAM by one
/// stand-in agent per `(node, reply)`, and those agents.
async fn alpha_on(limits: Limits, holders: &[(&'static str, Reply)]) -> (Gateway, Vec<Arc<Agent>>) {
    let (g, mut objects) = fixtures::gateway(limits);
    let mut agents = Vec::new();
    for (node, reply) in holders {
        let (a, addr) = agent(node, *reply).await;
        objects.agent(node, addr);
        agents.push(a);
    }
    let ready: Vec<(&str, Tier)> = holders.iter().map(|(n, _)| (*n, Tier::Vram)).collect();
    objects.deployment("alpha", holders.len() as i32, false, &ready, None);
    // The objects do not change during these tests.
    std::mem::forget(objects);
    (g, agents)
}

/// An address where nothing listens: an agent that died.
async fn dead() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn serve(g: Gateway) -> (String, Arc<Gateway>) {
    let g = Arc::new(g);
    let addr = listen(router(g.clone(), Arc::new(AtomicBool::new(true)))).await;
    (format!("http://{addr}"), g)
}

struct Answer {
    status: u16,
    headers: client::Headers,
    body: Value,
}

/// A tiny HTTP/1.1 client over hyper, as a user's client would send.
mod client {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    pub type Headers = hyper::HeaderMap;

    pub async fn send(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (u16, Headers, Vec<u8>) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut req = hyper::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = client
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes().to_vec();
        (parts.status.as_u16(), parts.headers, bytes)
    }
}

async fn generate(base: &str, body: Value, headers: &[(&str, &str)]) -> Answer {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    let (status, headers, bytes) = client::send(
        "POST",
        &format!("{base}/v1/images/generations"),
        &h,
        body.to_string().into_bytes(),
    )
    .await;
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn metric(g: &Gateway, name_and_labels: &str) -> f64 {
    g.metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn names_models_and_bad_requests_are_answered_like_openai() {
    let (g, agents) = alpha_on(Limits::default(), &[("n1", Reply::Image)]).await;
    let a = &agents[0];
    let (base, _g) = serve(g).await;

    for name in ["alpha", "ml/alpha"] {
        let r = generate(&base, json!({"model": name, "prompt": "x"}), &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.headers["x-modelcache-backend"], "n1");
        assert_eq!(
            a.seen.lock().unwrap().2,
            "ml/alpha",
            "the agent gets namespace/name"
        );
    }
    let (status, _, body) = client::send("GET", &format!("{base}/v1/models"), &[], vec![]).await;
    let models: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "alpha");
    assert_eq!(models["data"][0]["ready"], true);

    let cases = [
        (
            json!({"model": "nope", "prompt": "x"}),
            404,
            "model_not_found",
        ),
        (
            json!({"model": "other/alpha", "prompt": "x"}),
            404,
            "model_not_found",
        ),
        (
            json!({"model": "Not A Name", "prompt": "x"}),
            404,
            "model_not_found",
        ),
        (json!({"prompt": "x"}), 400, "invalid_value"),
    ];
    for (body, status, code) in cases {
        let r = generate(&base, body.clone(), &[]).await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let (status, _, body) = client::send(
        "POST",
        &format!("{base}/v1/images/generations"),
        &[("content-type", "application/json")],
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let big = json!({"model": "alpha", "prompt": "x".repeat(70_000)});
    assert_eq!(generate(&base, big, &[]).await.status, 413);
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        2,
        "bad requests never reach an agent"
    );
    // A body with control images or an image prompt may be larger.
    let image = "A".repeat(200_000);
    for with_images in [
        json!({"model": "alpha", "prompt": "x", "controlnet": [{"model": "cn", "image": image}]}),
        json!({"model": "alpha", "prompt": "x", "ip_adapter": {"model": "ip", "image": image}}),
    ] {
        assert_eq!(generate(&base, with_images, &[]).await.status, 200);
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn edits_are_forwarded_as_forms_with_the_model_named_and_the_image_intact() {
    let (g, agents) = alpha_on(Limits::default(), &[("n1", Reply::Image)]).await;
    let (base, _g) = serve(g).await;
    let image: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let form = Payload::Form(vec![
        payload::Part {
            name: "model".into(),
            filename: None,
            content_type: None,
            data: "alpha".into(),
        },
        payload::Part {
            name: "image".into(),
            filename: Some("cat.png".into()),
            content_type: Some("image/png".into()),
            data: image.into(),
        },
    ]);
    let (ct, body) = form.encode().unwrap();
    let (status, _, answer) = client::send(
        "POST",
        &format!("{base}/v1/images/edits"),
        &[("content-type", ct.to_str().unwrap())],
        body.to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(agents[0].seen.lock().unwrap().2, "ml/alpha 100000");
    // A form without a model, and one that is not a form, never reach an agent.
    let (no_model, empty) = Payload::Form(vec![]).encode().unwrap();
    for (ct, body) in [
        (no_model.to_str().unwrap().to_string(), empty.to_vec()),
        (
            "multipart/form-data; boundary=x".to_string(),
            b"garbage".to_vec(),
        ),
    ] {
        let (status, _, _) = client::send(
            "POST",
            &format!("{base}/v1/images/edits"),
            &[("content-type", &ct)],
            body,
        )
        .await;
        assert_eq!(status, 400, "{ct}");
    }
    assert_eq!(agents[0].hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dead_agent_and_a_503_are_retried_on_another_holder() {
    let (busy, busy_addr) = agent("n2", Reply::Unavailable).await;
    let (ok, ok_addr) = agent("n3", Reply::Image).await;
    let (g, mut objects) = fixtures::gateway(Limits::default());
    objects.agent("n1", dead().await);
    objects.agent("n2", busy_addr);
    objects.agent("n3", ok_addr);
    // n3 holds the model in RAM only, so it comes last.
    objects.deployment(
        "alpha",
        3,
        false,
        &[("n1", Tier::Vram), ("n2", Tier::Vram), ("n3", Tier::Ram)],
        None,
    );
    let (base, g) = serve(g).await;
    let r = generate(
        &base,
        json!({"model": "alpha", "prompt": "x"}),
        &[("x-request-id", "req-42")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-modelcache-backend"], "n3");
    assert_eq!(r.headers["x-request-id"], "req-42");
    assert_eq!(
        ok.seen.lock().unwrap().0,
        "req-42",
        "the request id reaches the agent"
    );
    assert_eq!(busy.hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        metric(&g, "modelcache_gateway_retries_total{reason=\"connect\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &g,
            "modelcache_gateway_retries_total{reason=\"unavailable\"}"
        ),
        1.0
    );
    // The dead agent is now tried last: the next request does not wait on it.
    let r = generate(&base, json!({"model": "alpha", "prompt": "x"}), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        metric(&g, "modelcache_gateway_retries_total{reason=\"connect\"}"),
        1.0
    );
}

#[tokio::test]
async fn when_every_holder_is_busy_the_client_gets_429_with_the_shortest_wait() {
    let busy = [
        ("n1", Reply::Busy(7)),
        ("n2", Reply::Busy(3)),
        ("n3", Reply::Busy(5)),
    ];
    let (g, agents) = alpha_on(Limits::default(), &busy).await;
    let (base, _g) = serve(g).await;
    let r = generate(&base, json!({"model": "alpha", "prompt": "x"}), &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "3");
    assert_eq!(r.body["error"]["code"], "queue_full");
    for a in &agents {
        assert_eq!(a.hits.load(Ordering::SeqCst), 1, "each holder asked once");
    }
}

#[tokio::test]
async fn attempts_are_bounded() {
    let limits = Limits {
        max_attempts: 2,
        ..Limits::default()
    };
    let unavailable = [
        ("n1", Reply::Unavailable),
        ("n2", Reply::Unavailable),
        ("n3", Reply::Unavailable),
    ];
    let (g, agents) = alpha_on(limits, &unavailable).await;
    let (base, _g) = serve(g).await;
    let r = generate(&base, json!({"model": "alpha", "prompt": "x"}), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body["error"]["code"], "cache_full",
        "the agent's own answer"
    );
    let hits: usize = agents.iter().map(|a| a.hits.load(Ordering::SeqCst)).sum();
    assert_eq!(hits, 2);
}

#[tokio::test]
async fn an_agents_reported_queue_sends_the_next_request_elsewhere() {
    let (g, agents) = alpha_on(
        Limits::default(),
        &[("n1", Reply::Image), ("n2", Reply::Image)],
    )
    .await;
    let (base, _g) = serve(g).await;
    let body = json!({"model": "alpha", "prompt": "x"});
    let first = generate(&base, body.clone(), &[]).await;
    let again = generate(&base, body.clone(), &[]).await;
    assert_eq!(
        first.headers["x-modelcache-backend"], again.headers["x-modelcache-backend"],
        "idle agents: the same one, by the deployment's hash"
    );
    // That agent now reports five requests from elsewhere.
    let home = agents
        .iter()
        .find(|a| a.node == first.headers["x-modelcache-backend"])
        .unwrap();
    home.depth.store(5, Ordering::SeqCst);
    generate(&base, body.clone(), &[]).await;
    let next = generate(&base, body, &[]).await;
    assert_ne!(next.headers["x-modelcache-backend"], home.node);
}

#[tokio::test]
async fn a_request_for_a_deployment_without_replicas_waits_for_one() {
    let (_a, addr) = agent("n1", Reply::Image).await;
    let (g, mut objects) = fixtures::gateway(Limits::default());
    objects.agent("n1", addr);
    objects.deployment("alpha", 0, true, &[], None);
    let (base, g) = serve(g).await;
    let waiting = tokio::spawn({
        let base = base.clone();
        async move { generate(&base, json!({"model": "alpha", "prompt": "x"}), &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    assert_eq!(
        metric(&g, "modelcache_gateway_held_requests{model=\"ml/alpha\"}"),
        1.0
    );
    // The operator placed it and the agent became Ready.
    objects.deployment("alpha", 1, true, &[("n1", Tier::Ram)], None);
    let r = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("answered once a replica is ready")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        metric(&g, "modelcache_gateway_held_requests{model=\"ml/alpha\"}"),
        0.0
    );
}

#[tokio::test]
async fn holding_is_bounded_in_time_and_number_and_says_why() {
    let (g, mut objects) = fixtures::gateway(Limits {
        hold_timeout: Duration::from_millis(400),
        max_held: 1,
        ..Limits::default()
    });
    objects.deployment(
        "alpha",
        1,
        true,
        &[],
        Some("0/3 nodes can hold the model: 3 InsufficientVram"),
    );
    objects.deployment("beta", 0, false, &[], None);
    let (base, _g) = serve(g).await;
    let first = tokio::spawn({
        let base = base.clone();
        async move { generate(&base, json!({"model": "alpha", "prompt": "x"}), &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = generate(&base, json!({"model": "alpha", "prompt": "x"}), &[]).await;
    assert_eq!(second.status, 429);
    assert_eq!(second.body["error"]["code"], "too_many_waiting");
    assert!(second.headers.contains_key("retry-after"));
    let first = first.await.unwrap();
    assert_eq!(first.status, 503);
    assert_eq!(first.body["error"]["code"], "model_unavailable");
    let msg = first.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Unschedulable: 0/3 nodes can hold the model: 3 InsufficientVram"),
        "{msg}"
    );
    // At zero without autoscaling: nothing to wait for.
    let r = generate(&base, json!({"model": "beta", "prompt": "x"}), &[]).await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (503, Some("model_scaled_to_zero"))
    );
}

#[tokio::test]
async fn the_token_is_required_and_passed_on() {
    let (mut g, agents) = alpha_on(Limits::default(), &[("n1", Reply::Image)]).await;
    let a = &agents[0];
    g.token = Some("s3cret-token-for-tests".into());
    let (base, _g) = serve(g).await;
    let body = json!({"model": "alpha", "prompt": "x"});
    for auth in [None, Some("Bearer wrong")] {
        let headers: Vec<(&str, &str)> = auth.map(|v| ("authorization", v)).into_iter().collect();
        let r = generate(&base, body.clone(), &headers).await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (401, Some("invalid_api_key"))
        );
    }
    let (status, _, _) = client::send("GET", &format!("{base}/v1/models"), &[], vec![]).await;
    assert_eq!(status, 401);
    let r = generate(
        &base,
        body,
        &[("authorization", "Bearer s3cret-token-for-tests")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(a.seen.lock().unwrap().1, "Bearer s3cret-token-for-tests");
}
