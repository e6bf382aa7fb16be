//! The gateway's request path: name → deployment → ready agents (holding
//! the request while there are none) → ordered attempts → the agent's answer.

use super::backends::{self, Backend};
use super::metrics::GatewayMetrics;
use super::payload::{self, Payload};
use crate::balance::{self, Candidate};
use crate::scale::{self, ScaleError};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::Api;
use modelcache_crds::{ModelDeployment, ModelNode};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The header agents report their load in.
pub const QUEUE_DEPTH: &str = "x-modelcache-queue-depth";
/// The node whose agent answered, on every proxied response.
pub const BACKEND: &str = "x-modelcache-backend";
/// How long an agent's report of requests from elsewhere is believed.
const REPORT_TTL_MS: u64 = 5_000;
/// How long an agent that refused a connection is tried only after the others.
const DOWN_MS: u64 = 5_000;
/// Least time between two scale-ups of one deployment by this gateway.
const SCALE_UP_EVERY: Duration = Duration::from_secs(5);

/// The gateway's limits and policies (its flags).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Largest form (`/v1/images/edits`, with its image and mask).
    pub max_upload_bytes: usize,
    /// Agents tried for one request (retries on connection failures, 503 and 429).
    pub max_attempts: usize,
    /// How much busier than the mean an agent may be and still take a LoRA set it has.
    pub load_factor: f64,
    /// How long a request waits for a deployment to get a ready replica.
    pub hold_timeout: Duration,
    /// Requests that may wait per deployment; more get 429.
    pub max_held: usize,
    /// Longest one attempt may take.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 << 10,
            max_upload_bytes: 32 << 20,
            max_attempts: 3,
            load_factor: 1.25,
            hold_timeout: Duration::from_secs(120),
            max_held: 100,
            request_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// What the gateway knows of one agent's load.
#[derive(Debug, Default)]
struct AgentLoad {
    /// Requests this gateway has sent it and not yet had answered.
    mine: AtomicU32,
    /// Requests it had from elsewhere (other gateway replicas, direct
    /// clients) at its last reply.
    others: AtomicU32,
    reported_ms: AtomicU64,
    down_until_ms: AtomicU64,
}

impl AgentLoad {
    fn wait(&self, now_ms: u64) -> u32 {
        let others =
            if now_ms.saturating_sub(self.reported_ms.load(Ordering::Relaxed)) < REPORT_TTL_MS {
                self.others.load(Ordering::Relaxed)
            } else {
                0
            };
        self.mine.load(Ordering::Relaxed) + others
    }

    /// An answer said the agent holds `depth` requests besides the one answered,
    /// which is still counted in `mine`.
    fn report(&self, depth: u32, now_ms: u64) {
        let mine = self.mine.load(Ordering::Relaxed).saturating_sub(1);
        self.others
            .store(depth.saturating_sub(mine), Ordering::Relaxed);
        self.reported_ms.store(now_ms, Ordering::Relaxed);
    }

    fn is_down(&self, now_ms: u64) -> bool {
        self.down_until_ms.load(Ordering::Relaxed) > now_ms
    }
}

/// One request counted in an agent's `mine` until dropped.
struct Sent(Arc<AgentLoad>);

impl Sent {
    fn start(load: Arc<AgentLoad>) -> Self {
        load.mine.fetch_add(1, Ordering::Relaxed);
        Sent(load)
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        self.0.mine.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An OpenAI-shaped error.
#[derive(Debug)]
pub struct GatewayError {
    pub status: StatusCode,
    pub message: String,
    pub code: &'static str,
    pub param: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl GatewayError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        GatewayError {
            status,
            message: message.into(),
            code,
            param: None,
            retry_after: None,
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// The gateway: what it watches, whom it sends to, and what it counts.
pub struct Gateway {
    /// Where a bare `model` name is looked up.
    pub namespace: String,
    pub deployments: Store<ModelDeployment>,
    pub slices: Store<EndpointSlice>,
    /// The agents' own reports: their addresses.
    pub nodes: Store<ModelNode>,
    /// Bumped on every watch event: held requests look again.
    pub changes: watch::Receiver<u64>,
    /// For scaling up from zero; `None` turns that off (benchmarks).
    pub kube: Option<kube::Client>,
    /// The bearer token clients must send, and the gateway sends to agents.
    pub token: Option<String>,
    pub limits: Limits,
    pub metrics: GatewayMetrics,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    started: Instant,
    agents: Mutex<HashMap<SocketAddr, Arc<AgentLoad>>>,
    held: Mutex<HashMap<String, usize>>,
    scaled: Mutex<HashMap<String, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gateway {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        namespace: String,
        deployments: Store<ModelDeployment>,
        slices: Store<EndpointSlice>,
        nodes: Store<ModelNode>,
        changes: watch::Receiver<u64>,
        kube: Option<kube::Client>,
        token: Option<String>,
        limits: Limits,
        metrics: GatewayMetrics,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.connect_timeout));
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Gateway {
            namespace,
            deployments,
            slices,
            nodes,
            changes,
            kube,
            token,
            limits,
            metrics,
            http,
            started: Instant::now(),
            agents: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            scaled: Mutex::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn agent(&self, addr: SocketAddr) -> Arc<AgentLoad> {
        lock(&self.agents).entry(addr).or_default().clone()
    }

    /// The bearer token, compared in constant time.
    pub fn check_token(&self, headers: &HeaderMap) -> Result<(), GatewayError> {
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if modelcache_support::bearer_allowed(self.token.as_deref(), sent) {
            Ok(())
        } else {
            Err(GatewayError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or invalid bearer token",
            ))
        }
    }

    fn lookup(&self, ns: &str, name: &str) -> Option<Arc<ModelDeployment>> {
        self.deployments.get(&ObjectRef::new(name).within(ns))
    }

    fn ready_now(&self, md: &ModelDeployment, ns: &str, name: &str) -> Vec<Backend> {
        let slice = self.slices.get(&ObjectRef::new(name).within(ns));
        backends::backends(md, slice.as_deref(), |node| {
            self.nodes
                .get(&ObjectRef::new(node))?
                .status
                .as_ref()?
                .agent
                .as_ref()?
                .endpoint
                .parse()
                .ok()
        })
    }

    /// Sends a request (JSON or a form) for a deployment to one of its agents. `label` is
    /// set to the deployment once it is known (the metrics' `model`).
    pub async fn forward(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: Body,
        label: &mut String,
    ) -> Result<Response, GatewayError> {
        self.check_token(headers)?;
        let too_large = |limit: usize| {
            GatewayError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("request body is larger than {limit} bytes"),
            )
        };
        // Forms, and JSON bodies with images, may be as large as an upload.
        let limit = self.limits.max_upload_bytes;
        let bytes = axum::body::to_bytes(body, limit)
            .await
            .map_err(|_| too_large(limit))?;
        let size = bytes.len();
        let mut req = Payload::read(headers, bytes).await.map_err(|e| {
            GatewayError::new(StatusCode::BAD_REQUEST, "invalid_value", e.to_string())
        })?;
        if size > self.limits.max_body_bytes && !payload::is_form(headers) && !req.carries_images()
        {
            return Err(too_large(self.limits.max_body_bytes));
        }
        let model = req.model().ok_or_else(|| GatewayError {
            param: Some("model"),
            ..GatewayError::new(
                StatusCode::BAD_REQUEST,
                "invalid_value",
                "model is required: the name of a ModelDeployment, or namespace/name",
            )
        })?;
        let not_found = || {
            GatewayError {
            param: Some("model"),
            ..GatewayError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "no ModelDeployment {model:?}: name one in namespace {} or as namespace/name (GET /v1/models lists them)",
                    self.namespace
                ),
            )
        }
        };
        let (ns, name) =
            backends::deployment_name(&model, &self.namespace).ok_or_else(not_found)?;
        let (ns, name) = (ns.to_string(), name.to_string());
        let md = self.lookup(&ns, &name).ok_or_else(not_found)?;
        let key = format!("{ns}/{name}");
        *label = key.clone();
        req.set_model(&key);
        let body = req.encode().map_err(|e| {
            GatewayError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                e.to_string(),
            )
        })?;
        let breq = backends::balance_request(&key, &req.balance_view());
        let ready = self.ready_or_hold(md, &ns, &name, &key).await?;
        let request_id = headers
            .get("x-request-id")
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static(""));
        self.attempts(path, &key, ready, breq, body, request_id)
            .await
    }

    /// The ready agents, waiting for one when there are none yet and the
    /// deployment is coming up (or is raised from zero here).
    async fn ready_or_hold(
        &self,
        md: Arc<ModelDeployment>,
        ns: &str,
        name: &str,
        key: &str,
    ) -> Result<Vec<Backend>, GatewayError> {
        let ready = self.ready_now(&md, ns, name);
        if !ready.is_empty() {
            return Ok(ready);
        }
        if md.spec.replicas == 0 && md.spec.autoscaling().is_none() {
            return Err(GatewayError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_scaled_to_zero",
                format!("ModelDeployment {key} has 0 replicas and no autoscaling: scale it up (kubectl scale mdep {name} -n {ns} --replicas=1) or enable spec.autoscaling"),
            ));
        }
        let _held = Held::enter(self, key)?;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.limits.hold_timeout;
        let mut changes = self.changes.clone();
        let result = loop {
            changes.borrow_and_update();
            let Some(md) = self.lookup(ns, name) else {
                break Err(GatewayError::new(
                    StatusCode::NOT_FOUND,
                    "model_not_found",
                    format!("ModelDeployment {key} was deleted while the request waited"),
                ));
            };
            let ready = self.ready_now(&md, ns, name);
            if !ready.is_empty() {
                break Ok(ready);
            }
            if md.spec.replicas == 0 {
                self.scale_from_zero(&md, ns, name, key).await;
            }
            // Woken by any watch event, and every second regardless, so that a
            // scale-up that someone undid is tried again.
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            match tokio::time::timeout_at(wake, changes.changed()).await {
                Ok(Ok(())) => continue,
                Err(_) if wake < deadline => continue,
                Ok(Err(_)) => {
                    break Err(GatewayError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "shutting_down",
                        "the gateway is shutting down",
                    ))
                }
                Err(_) => {
                    let why = backends::not_ready_reason(&md)
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default();
                    break Err(GatewayError {
                        retry_after: Some(10),
                        ..GatewayError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "model_unavailable",
                            format!(
                                "ModelDeployment {key} had no ready replica within {} s{why}",
                                self.limits.hold_timeout.as_secs()
                            ),
                        )
                    });
                }
            }
        };
        self.metrics
            .hold_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Raises `replicas` from 0 to `max(1, minReplicas)`, at most every few
    /// seconds per deployment; a failure is logged and the request keeps
    /// waiting (another gateway replica, or a person, may succeed).
    async fn scale_from_zero(&self, md: &ModelDeployment, ns: &str, name: &str, key: &str) {
        let Some(client) = &self.kube else { return };
        {
            let mut scaled = lock(&self.scaled);
            if scaled
                .get(key)
                .is_some_and(|t| t.elapsed() < SCALE_UP_EVERY)
            {
                return;
            }
            scaled.insert(key.to_string(), Instant::now());
        }
        let to = md.spec.autoscaling().map_or(1, |a| a.min_replicas.max(1));
        let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
        match scale::set_replicas(&api, name, 0, to).await {
            Ok(()) => {
                tracing::info!(deployment = %key, replicas = to, "scaled up from zero for a waiting request");
                self.metrics.scale_ups.with_label_values(&[key]).inc();
            }
            Err(ScaleError::Changed) => {}
            Err(e) => tracing::warn!(deployment = %key, error = %e, "could not scale up from zero"),
        }
    }

    /// Tries the agents in balance order until one answers with something
    /// other than a connection failure, 503 or 429.
    async fn attempts(
        &self,
        path: &str,
        key: &str,
        ready: Vec<Backend>,
        breq: balance::Request,
        body: (HeaderValue, Bytes),
        request_id: HeaderValue,
    ) -> Result<Response, GatewayError> {
        let now = self.now_ms();
        let loads: Vec<Arc<AgentLoad>> = ready.iter().map(|b| self.agent(b.addr)).collect();
        // Agents that just refused a connection go after all the others.
        let (up, down): (Vec<usize>, Vec<usize>) =
            (0..ready.len()).partition(|&i| !loads[i].is_down(now));
        let mut order = Vec::with_capacity(ready.len());
        for group in [up, down] {
            let cands: Vec<Candidate> = group
                .iter()
                .map(|&i| Candidate {
                    node: ready[i].node.clone(),
                    wait: loads[i].wait(now),
                    tier: ready[i].tier,
                })
                .collect();
            let (o, reason) = balance::order(&cands, breq, self.limits.load_factor);
            if order.is_empty() && !o.is_empty() {
                self.metrics
                    .picks
                    .with_label_values(&[reason.as_label()])
                    .inc();
            }
            order.extend(o.into_iter().map(|j| group[j]));
        }
        let mut busy: Option<Response> = None;
        let mut unavailable: Option<Response> = None;
        let mut failures = Vec::new();
        for (n, &i) in order
            .iter()
            .take(self.limits.max_attempts.max(1))
            .enumerate()
        {
            let b = &ready[i];
            let sent = Sent::start(loads[i].clone());
            match self.send(path, b.addr, &body, &request_id).await {
                Err(e) => {
                    if e.status == StatusCode::GATEWAY_TIMEOUT {
                        return Err(e);
                    }
                    tracing::warn!(deployment = %key, node = %b.node, addr = %b.addr, error = %e.message, "agent unreachable; trying another");
                    loads[i]
                        .down_until_ms
                        .store(self.now_ms() + DOWN_MS, Ordering::Relaxed);
                    failures.push(format!("{}: {}", b.node, e.message));
                    self.retried(n, &order, "connect");
                }
                Ok(mut res) => {
                    if let Some(d) = res
                        .headers()
                        .get(QUEUE_DEPTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                    {
                        sent.0.report(d, self.now_ms());
                    }
                    if let Ok(v) = HeaderValue::from_str(&b.node) {
                        res.headers_mut()
                            .insert(HeaderName::from_static(BACKEND), v);
                    }
                    if is_event_stream(res.headers()) {
                        // A stream's agent stays busy with it until it ends.
                        let (parts, body) = res.into_parts();
                        let events = body.into_data_stream().map(move |chunk| {
                            let _sent = &sent;
                            chunk
                        });
                        return Ok(Response::from_parts(parts, Body::from_stream(events)));
                    }
                    match res.status() {
                        // 404: the agent dropped the deployment after the
                        // EndpointSlice was read (a scale-down, a move).
                        StatusCode::SERVICE_UNAVAILABLE | StatusCode::NOT_FOUND => {
                            unavailable = Some(res);
                            self.retried(n, &order, "unavailable");
                        }
                        StatusCode::TOO_MANY_REQUESTS => {
                            busy = Some(shorter_retry(busy, res));
                            self.retried(n, &order, "busy");
                        }
                        _ => return Ok(res),
                    }
                }
            }
        }
        if let Some(r) = unavailable.or(busy) {
            return Ok(r);
        }
        Err(GatewayError {
            retry_after: Some(1),
            ..GatewayError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_unavailable",
                format!(
                    "no agent serving {key} could be reached: {}",
                    failures.join("; ")
                ),
            )
        })
    }

    /// Counts a retry when another attempt follows attempt `n`.
    fn retried(&self, n: usize, order: &[usize], reason: &str) {
        if n + 1 < order.len().min(self.limits.max_attempts.max(1)) {
            self.metrics.retries.with_label_values(&[reason]).inc();
        }
    }

    /// One attempt: the whole answer, or a transport failure (504 when the
    /// agent took longer than the request timeout).
    async fn send(
        &self,
        path: &str,
        addr: SocketAddr,
        (content_type, body): &(HeaderValue, Bytes),
        request_id: &HeaderValue,
    ) -> Result<Response, GatewayError> {
        let mut req = hyper::Request::post(format!("http://{addr}{path}"))
            .header(header::CONTENT_TYPE, content_type)
            .header("x-request-id", request_id);
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(body.clone())).map_err(|e| {
            GatewayError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                e.to_string(),
            )
        })?;
        let unreachable =
            |e: String| GatewayError::new(StatusCode::BAD_GATEWAY, "backend_unavailable", e);
        let exchange = async {
            let res = self
                .http
                .request(req)
                .await
                .map_err(|e| unreachable(format!("{e:#}")))?;
            let (mut parts, body) = res.into_parts();
            for h in [header::CONNECTION, header::TRANSFER_ENCODING] {
                parts.headers.remove(h);
            }
            if is_event_stream(&parts.headers) {
                // Server-Sent Events (`stream: true`) pass through as they
                // come: previews are worth nothing at the end.
                return Ok(Response::from_parts(parts, Body::new(body)));
            }
            // The whole body, so that the agent counts as busy until it is sent
            // and a connection cut mid-answer is retried like any other failure.
            let bytes = body
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(Response::from_parts(parts, Body::from(bytes)))
        };
        tokio::time::timeout(self.limits.request_timeout, exchange)
            .await
            .map_err(|_| {
                GatewayError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!(
                        "the agent did not answer within {} s (--request-timeout-seconds)",
                        self.limits.request_timeout.as_secs()
                    ),
                )
            })?
    }
}

/// Whether an agent answered with Server-Sent Events.
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// Of two 429 answers, the one that asks the client to wait less.
fn shorter_retry(prev: Option<Response>, next: Response) -> Response {
    let secs = |r: &Response| {
        r.headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    };
    match prev {
        Some(p) if secs(&p) <= secs(&next) => p,
        _ => next,
    }
}

/// A request on a deployment's held count; refused past the bound.
struct Held<'a> {
    gateway: &'a Gateway,
    key: String,
}

impl<'a> Held<'a> {
    fn enter(gateway: &'a Gateway, key: &str) -> Result<Self, GatewayError> {
        let mut held = lock(&gateway.held);
        let n = held.entry(key.to_string()).or_default();
        if *n >= gateway.limits.max_held {
            return Err(GatewayError {
                retry_after: Some(5),
                ..GatewayError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_waiting",
                    format!(
                        "{} requests already wait for {key} to get a ready replica (--max-held-requests); retry later",
                        gateway.limits.max_held
                    ),
                )
            });
        }
        *n += 1;
        gateway
            .metrics
            .held
            .with_label_values(&[key])
            .set(*n as i64);
        Ok(Held {
            gateway,
            key: key.to_string(),
        })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.gateway.held);
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            self.gateway
                .metrics
                .held
                .with_label_values(&[&self.key])
                .set(*n as i64);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_wait_is_our_requests_plus_its_recent_report_of_others() {
        let a = AgentLoad::default();
        a.mine.store(2, Ordering::Relaxed);
        // Answering one of our two: it holds 4 others besides, 1 of them ours.
        a.report(4, 1_000);
        assert_eq!(a.others.load(Ordering::Relaxed), 3);
        assert_eq!(a.wait(1_500), 5);
        // A report ages out.
        assert_eq!(a.wait(1_000 + REPORT_TTL_MS), 2);
    }

    #[test]
    fn the_shorter_retry_after_is_kept() {
        let r = |s: &str| {
            let mut r = StatusCode::TOO_MANY_REQUESTS.into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_str(s).unwrap());
            r
        };
        let kept = shorter_retry(Some(r("7")), r("3"));
        assert_eq!(kept.headers()[header::RETRY_AFTER], "3");
        let kept = shorter_retry(Some(r("2")), r("3"));
        assert_eq!(kept.headers()[header::RETRY_AFTER], "2");
    }
}
