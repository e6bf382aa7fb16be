//! The gateway's cost and its balance, each against its reference measured in
//! the same run: `cargo bench -p modelcache-operator --bench gateway`.
//!
//! The real gateway (its router, picking and HTTP client) runs in-process on
//! stores filled the way its watches fill them, in front of three small
//! agents that answer like the real one (the JSON shape and the
//! `x-modelcache-queue-depth` header). For the balance, each agent runs one
//! generation at a time and pays a patch cost whenever a request's LoRA set
//! differs from the one it has applied, as the real agent patches weights.
//!
//! 1. Overhead: one client, requests alternately through the gateway and
//!    straight to an agent; p50 and p99 of each and of the difference.
//! 2. Throughput: 32 connections of small requests through the gateway for a
//!    few seconds, against the same straight to the agents.
//! 3. Balance: ten clients, a Zipf mix of four models and eight LoRA sets,
//!    through the gateway against a random choice of agent per request (what
//!    a plain Kubernetes Service does): the busiest agent's work over the
//!    least busy one's, and adapter patches per request.

use axum::extract::State;
use axum::http::{HeaderValue, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use modelcache_crds::{ModelDeployment, ModelNode};
use modelcache_operator::gateway::{metrics::GatewayMetrics, router, Gateway, Limits};
use modelcache_support::SplitMix64;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODES: [&str; 3] = ["n1", "n2", "n3"];
const MODELS: [&str; 4] = ["m0", "m1", "m2", "m3"];

/// A stand-in agent: one request at a time when `service` is set.
#[derive(Default)]
struct Agent {
    in_flight: AtomicUsize,
    served: AtomicUsize,
    patches: AtomicUsize,
    busy_us: AtomicU64,
    /// (model, LoRA set) last applied, and the one-at-a-time slot.
    applied: tokio::sync::Mutex<String>,
    /// Time per image, and per patch, in the balance run.
    service: Option<(Duration, Duration)>,
}

async fn generate(State(a): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    a.in_flight.fetch_add(1, Ordering::SeqCst);
    if let Some((image, patch)) = a.service {
        let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let key = format!("{}|{}", req["model"], req["loras"]);
        let mut applied = a.applied.lock().await;
        let started = Instant::now();
        let mut work = image;
        if *applied != key {
            a.patches.fetch_add(1, Ordering::Relaxed);
            *applied = key;
            work += patch;
        }
        tokio::time::sleep(work).await;
        a.busy_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
    a.served.fetch_add(1, Ordering::Relaxed);
    let depth = a.in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
    let mut r = (
        [("content-type", "application/json")],
        r#"{"created":0,"data":[{"b64_json":"iVBORw0KGgo="}]}"#,
    )
        .into_response();
    r.headers_mut()
        .insert("x-modelcache-queue-depth", HeaderValue::from(depth));
    r
}

async fn serve(router: Router) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router).await });
    addr
}

fn object<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// A gateway in front of `agents`, every model placed Ready on every agent.
async fn gateway(agents: &[(String, SocketAddr)]) -> SocketAddr {
    let (deployments, mut dw) = reflector::store::<ModelDeployment>();
    let (slices, mut sw) = reflector::store::<EndpointSlice>();
    let (nodes, mut nw) = reflector::store::<ModelNode>();
    for (node, addr) in agents {
        nw.apply_watcher_event(&Event::Apply(object(json!({
            "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelNode", "metadata": {"name": node},
            "spec": {}, "status": {"agent": {"version": "0", "podName": node, "endpoint": addr.to_string()}},
        }))));
    }
    for m in MODELS {
        let placements: Vec<Value> = agents
            .iter()
            .map(|(n, _)| json!({"node": n, "role": "Serving", "phase": "Ready", "tier": "Vram"}))
            .collect();
        dw.apply_watcher_event(&Event::Apply(object(json!({
            "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": m, "namespace": "ml"},
            "spec": {"model": {"path": m}, "replicas": 3},
            "status": {"placements": placements, "replicas": 3, "readyReplicas": 3},
        }))));
        let endpoints: Vec<Value> = agents
            .iter()
            .map(|(n, a)| json!({"addresses": [a.ip().to_string()], "conditions": {"ready": true}, "nodeName": n}))
            .collect();
        sw.apply_watcher_event(&Event::Apply(object(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": m, "namespace": "ml"},
            "endpoints": endpoints, "ports": [{"port": 8080}],
        }))));
    }
    let (_tx, rx) = tokio::sync::watch::channel(0);
    std::mem::forget(_tx);
    let g = Gateway::new(
        "ml".into(),
        deployments,
        slices,
        nodes,
        rx,
        None,
        None,
        Limits::default(),
        GatewayMetrics::new().unwrap(),
    );
    serve(router(Arc::new(g), Arc::new(AtomicBool::new(true)))).await
}

type Http = Client<HttpConnector, Full<Bytes>>;

fn http() -> Http {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(c)
}

async fn post_to(http: &Http, addr: SocketAddr, body: &Value) -> u16 {
    let req = Request::post(format!("http://{addr}/v1/images/generations"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let res = http.request(req).await.unwrap();
    let status = res.status().as_u16();
    res.into_body().collect().await.unwrap();
    status
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

async fn agents(
    service: Option<(Duration, Duration)>,
) -> (Vec<Arc<Agent>>, Vec<(String, SocketAddr)>) {
    let mut state = Vec::new();
    let mut addrs = Vec::new();
    for n in NODES {
        let a = Arc::new(Agent {
            service,
            ..Default::default()
        });
        let r = Router::new()
            .route("/v1/images/generations", post(generate))
            .with_state(a.clone());
        addrs.push((n.to_string(), serve(r).await));
        state.push(a);
    }
    (state, addrs)
}

async fn overhead() {
    let (_, addrs) = agents(None).await;
    let gw = gateway(&addrs).await;
    let http = http();
    let body = json!({"model": "m0", "prompt": "x"});
    let direct_body = json!({"model": "ml/m0", "prompt": "x"});
    for _ in 0..500 {
        post_to(&http, gw, &body).await;
        post_to(&http, addrs[0].1, &direct_body).await;
    }
    let (mut via, mut direct, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5000 {
        let t = Instant::now();
        assert_eq!(post_to(&http, gw, &body).await, 200);
        let g = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        post_to(&http, addrs[0].1, &direct_body).await;
        let d = t.elapsed().as_secs_f64() * 1e3;
        via.push(g);
        direct.push(d);
        diff.push(g - d);
    }
    println!(
        "overhead: through the gateway p50 {:.3} ms p99 {:.3} ms; straight to the agent p50 {:.3} ms p99 {:.3} ms; added p50 {:.3} ms p99 {:.3} ms (goal: p99 < 1 ms)",
        percentile(&mut via, 0.5),
        percentile(&mut via, 0.99),
        percentile(&mut direct, 0.5),
        percentile(&mut direct, 0.99),
        percentile(&mut diff, 0.5),
        percentile(&mut diff, 0.99),
    );
}

async fn requests_per_second(targets: Vec<SocketAddr>, body: Value, secs: u64) -> f64 {
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (done, body, target) = (done.clone(), body.clone(), targets[i % targets.len()]);
            tokio::spawn(async move {
                let http = http();
                while Instant::now() < stop {
                    post_to(&http, target, &body).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

async fn throughput() {
    let (_, addrs) = agents(None).await;
    let gw = gateway(&addrs).await;
    let via = requests_per_second(vec![gw], json!({"model": "m0", "prompt": "x"}), 5).await;
    let direct = requests_per_second(
        addrs.iter().map(|a| a.1).collect(),
        json!({"model": "ml/m0", "prompt": "x"}),
        5,
    )
    .await;
    println!(
        "throughput: {via:.0} requests/s through the gateway, {direct:.0} straight to the agents ({:.2}×; goal ≥ 2,000/s)",
        via / direct
    );
}

/// Index drawn from a Zipf(1.1) distribution over `n` items.
fn zipf(rng: &mut SplitMix64, n: usize) -> usize {
    let w: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(1.1)).collect();
    let mut x = rng.unit() * w.iter().sum::<f64>();
    for (i, wi) in w.iter().enumerate() {
        if x < *wi {
            return i;
        }
        x -= wi;
    }
    n - 1
}

/// Ten clients, `per_client` requests each: (busiest ÷ least busy agent's
/// work, patches per request, seconds).
async fn balance_run(through_gateway: bool, per_client: usize) -> (f64, f64, f64) {
    let (state, addrs) = agents(Some((Duration::from_millis(4), Duration::from_millis(12)))).await;
    let gw = gateway(&addrs).await;
    let started = Instant::now();
    let picks = Arc::new(Mutex::new(SplitMix64::new(7)));
    let clients: Vec<_> = (0..10u64)
        .map(|c| {
            let (addrs, picks) = (addrs.clone(), picks.clone());
            tokio::spawn(async move {
                let http = http();
                let mut rng = SplitMix64::new(100 + c);
                for _ in 0..per_client {
                    let model = MODELS[zipf(&mut rng, MODELS.len())];
                    let set = zipf(&mut rng, 9);
                    let loras = if set == 0 {
                        json!([])
                    } else {
                        json!([{"path": format!("loras/style{set}.safetensors"), "weight": 0.8}])
                    };
                    if through_gateway {
                        post_to(
                            &http,
                            gw,
                            &json!({"model": model, "prompt": "x", "loras": loras}),
                        )
                        .await;
                    } else {
                        let i = (picks.lock().unwrap().next_u64() % 3) as usize;
                        let body =
                            json!({"model": format!("ml/{model}"), "prompt": "x", "loras": loras});
                        post_to(&http, addrs[i].1, &body).await;
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let busy: Vec<f64> = state
        .iter()
        .map(|a| a.busy_us.load(Ordering::Relaxed) as f64)
        .collect();
    let patches: usize = state
        .iter()
        .map(|a| a.patches.load(Ordering::Relaxed))
        .sum();
    let served: usize = state.iter().map(|a| a.served.load(Ordering::Relaxed)).sum();
    let max = busy.iter().cloned().fold(0.0, f64::max);
    let min = busy.iter().cloned().fold(f64::MAX, f64::min).max(1.0);
    (
        max / min,
        patches as f64 / served as f64,
        started.elapsed().as_secs_f64(),
    )
}

async fn balance() {
    let (g_ratio, g_patch, g_secs) = balance_run(true, 150).await;
    let (s_ratio, s_patch, s_secs) = balance_run(false, 150).await;
    println!(
        "balance (3 agents, 10 clients, Zipf over 4 models × 9 LoRA sets, 4 ms per image + 12 ms per patch):\n  gateway: busiest/least busy {g_ratio:.2}, {g_patch:.2} patches per request, {g_secs:.1} s\n  random choice (a Service): busiest/least busy {s_ratio:.2}, {s_patch:.2} patches per request, {s_secs:.1} s\n  patches {:.2}× of a Service's, wall time {:.2}×",
        g_patch / s_patch,
        g_secs / s_secs
    );
}

fn main() {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if run("overhead") {
        rt.block_on(overhead());
    }
    if run("throughput") {
        rt.block_on(throughput());
    }
    if run("balance") {
        rt.block_on(balance());
    }
}
