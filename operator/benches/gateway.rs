//! The gateway's cost and its balance, each against its reference measured in
//! the same run: `cargo bench -p modelcache-operator --bench gateway`.
//!
//! The real gateway (its router, picking and HTTP client) runs in-process on
//! stores filled the way its watches fill them, in front of three small
//! agents that answer like the real one (the JSON shape and the
//! `x-modelcache-queue-depth` header). For the balance, each agent runs one
//! generation at a time and, like the real agent's cache, holds two models on
//! its GPU and three adapter files, least recently used first out: a request
//! whose model or adapter is not held pays for loading it.
//!
//! 1. Overhead: one client, requests alternately through the gateway and
//!    straight to an agent; p50 and p99 of each and of the difference.
//! 2. Throughput: 32 connections of small requests through the gateway for a
//!    few seconds, against the same straight to the agents.
//! 3. Balance: ten clients, a Zipf mix of four models and eight LoRA sets,
//!    through the gateway against a random choice of agent per request (what
//!    a plain Kubernetes Service does): the busiest agent's work over the
//!    least busy one's, and adapter and model loads per request.

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
use modelcache_crds::Tier;
use modelcache_operator::gateway::{fixtures, router, Limits};
use modelcache_support::SplitMix64;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODES: [&str; 3] = ["n1", "n2", "n3"];
const MODELS: [&str; 4] = ["m0", "m1", "m2", "m3"];

/// Costs of the balance run: one image, loading a model to the GPU, loading
/// an adapter file.
#[derive(Clone, Copy)]
struct Costs {
    image: Duration,
    model: Duration,
    adapter: Duration,
}

/// What a stand-in agent holds, most recently used last.
#[derive(Default)]
struct Held {
    models: std::collections::VecDeque<String>,
    adapters: std::collections::VecDeque<String>,
}

/// Whether `key` was held; it is the most recent afterwards.
fn touch(list: &mut std::collections::VecDeque<String>, key: &str, capacity: usize) -> bool {
    let hit = list.iter().position(|k| k == key).map(|i| list.remove(i));
    list.push_back(key.to_string());
    if list.len() > capacity {
        list.pop_front();
    }
    hit.is_some()
}

/// A stand-in agent: one request at a time when `costs` is set.
#[derive(Default)]
struct Agent {
    in_flight: AtomicUsize,
    served: AtomicUsize,
    model_loads: AtomicUsize,
    adapter_loads: AtomicUsize,
    busy_us: AtomicU64,
    /// The one-at-a-time slot, and what the agent holds.
    held: tokio::sync::Mutex<Held>,
    costs: Option<Costs>,
}

async fn generate(State(a): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    a.in_flight.fetch_add(1, Ordering::SeqCst);
    if let Some(costs) = a.costs {
        let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut held = a.held.lock().await;
        let started = Instant::now();
        let mut work = costs.image;
        if !touch(&mut held.models, &req["model"].to_string(), 2) {
            a.model_loads.fetch_add(1, Ordering::Relaxed);
            work += costs.model;
        }
        for l in req["loras"].as_array().into_iter().flatten() {
            if !touch(&mut held.adapters, &l["path"].to_string(), 3) {
                a.adapter_loads.fetch_add(1, Ordering::Relaxed);
                work += costs.adapter;
            }
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

/// A gateway in front of `agents`, every model placed Ready in VRAM on each.
async fn gateway(agents: &[(String, SocketAddr)]) -> SocketAddr {
    let (g, mut objects) = fixtures::gateway(Limits::default());
    let ready: Vec<(&str, Tier)> = agents
        .iter()
        .map(|(n, _)| (n.as_str(), Tier::Vram))
        .collect();
    for (node, addr) in agents {
        objects.agent(node, *addr);
    }
    for m in MODELS {
        objects.deployment(m, 3, false, &ready, None);
    }
    // The objects never change during a run; their writers live as long as the process.
    std::mem::forget(objects);
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

async fn agents(costs: Option<Costs>) -> (Vec<Arc<Agent>>, Vec<(String, SocketAddr)>) {
    let mut state = Vec::new();
    let mut addrs = Vec::new();
    for n in NODES {
        let a = Arc::new(Agent {
            costs,
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

const COSTS: Costs = Costs {
    image: Duration::from_millis(4),
    model: Duration::from_millis(20),
    adapter: Duration::from_millis(8),
};

/// What one balance run measured.
struct Balance {
    /// Busiest ÷ least busy agent's busy time.
    spread: f64,
    adapter_loads: f64,
    model_loads: f64,
    seconds: f64,
}

/// Ten clients, `per_client` requests each, through the gateway or to a
/// random agent.
async fn balance_run(through_gateway: bool, per_client: usize) -> Balance {
    let (state, addrs) = agents(Some(COSTS)).await;
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
    let sum = |f: fn(&Agent) -> usize| state.iter().map(|a| f(a)).sum::<usize>() as f64;
    let served = sum(|a| a.served.load(Ordering::Relaxed));
    let max = busy.iter().cloned().fold(0.0, f64::max);
    let min = busy.iter().cloned().fold(f64::MAX, f64::min).max(1.0);
    Balance {
        spread: max / min,
        adapter_loads: sum(|a| a.adapter_loads.load(Ordering::Relaxed)) / served,
        model_loads: sum(|a| a.model_loads.load(Ordering::Relaxed)) / served,
        seconds: started.elapsed().as_secs_f64(),
    }
}

async fn balance() {
    let g = balance_run(true, 150).await;
    let s = balance_run(false, 150).await;
    println!("balance: 3 agents (each: 2 models on its GPU, 3 adapter files), 10 clients × 150 requests, Zipf(1.1) over 4 models and 9 LoRA sets (one of them none); 4 ms per image, 20 ms per model load, 8 ms per adapter load");
    for (name, b) in [("gateway", &g), ("random choice (a Service)", &s)] {
        println!(
            "  {name}: busiest/least busy {:.2}, adapter loads {:.3} and model loads {:.3} per request, {:.1} s",
            b.spread, b.adapter_loads, b.model_loads, b.seconds
        );
    }
    println!(
        "  gateway vs Service: adapter loads {:.2}×, model loads {:.2}×, wall time {:.2}×",
        g.adapter_loads / s.adapter_loads,
        g.model_loads / s.model_loads,
        g.seconds / s.seconds
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
