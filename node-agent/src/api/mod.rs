//! The HTTP API: OpenAI's images API plus extensions, a bounded queue,
//! limits, an optional bearer token, OpenAI-shaped errors, and an access-log
//! line with a request id for every API request.
//!
//! [`request`] validates bodies, [`queue`] admits them, [`error`] shapes
//! failures; this module holds the routes and the handlers.

pub mod batcher;
pub mod control;
pub mod edit;
pub mod error;
pub mod peer;
pub mod queue;
pub mod request;
pub mod server;
mod stream;

pub use batcher::{Batcher, Batching};
pub use error::ApiError;
pub use queue::Queue;
pub use request::{GenerationRequest, Limits};

use crate::agent::Agent;
use crate::pipeline;
use crate::routes::Routes;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, Response as HttpResponse, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

/// The request id header: kept when a client or gateway sends one, made
/// otherwise, and returned on every API response.
pub const REQUEST_ID: &str = "x-request-id";

/// On every `/v1` response: the requests this agent has admitted and not
/// finished (running and waiting), the load a gateway balances on.
pub const QUEUE_DEPTH: &str = "x-modelcache-queue-depth";

/// What the HTTP handlers share.
pub struct AppState {
    pub agent: Arc<Agent>,
    /// What a request's `model` names (replaced by the cluster side in cluster mode).
    pub routes: Arc<Routes>,
    pub queue: Arc<Queue>,
    pub limits: Limits,
    /// The bearer token clients must send; `None` when the API is open.
    pub token: Option<String>,
    /// What `/readyz` answers, on both ports.
    pub ready: Arc<AtomicBool>,
    /// The token other agents send to copy models from this one
    /// ([`peer`]); `None`: no copies are served.
    pub peer_token: Option<String>,
    /// Gathers requests into denoising batches.
    pub batcher: Arc<Batcher>,
}

impl AppState {
    pub fn new(
        agent: Arc<Agent>,
        routes: Arc<Routes>,
        queue: Queue,
        limits: Limits,
        token: Option<String>,
    ) -> Self {
        AppState {
            agent,
            routes,
            queue: Arc::new(queue),
            limits,
            token,
            ready: Arc::new(AtomicBool::new(true)),
            peer_token: None,
            batcher: Arc::new(Batcher::new(Batching::default())),
        }
    }

    /// Gathers requests into batches as `batching` says.
    pub fn with_batching(mut self, batching: Batching) -> Self {
        self.batcher = Arc::new(Batcher::new(batching));
        self
    }

    /// Serves copies of this node's models to agents that send `token`.
    pub fn with_peer_token(mut self, token: Option<String>) -> Self {
        self.peer_token = token;
        self
    }
}

/// The API on port 8080. Health probes are left out of the access log, which
/// kubelets would otherwise fill every few seconds.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    let api = Router::new()
        // Bodies with control images may be as large as an edit's form;
        // `generate` holds the others to `--max-body-bytes`.
        .route(
            "/v1/images/generations",
            post(generate).layer(DefaultBodyLimit::max(state.limits.max_upload_bytes)),
        )
        .route(
            "/v1/images/edits",
            post(edit).layer(DefaultBodyLimit::max(state.limits.max_upload_bytes)),
        )
        .route("/v1/models", get(models))
        .route("/openapi.json", get(openapi))
        .merge(peer::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(access_log)
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            report_load,
        ));
    let health = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    api.merge(health)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(limit_request_head))
        .with_state(state)
}

/// Longest request URI, and most bytes of request headers, answered in the
/// OpenAI error shape. (Past hyper's own buffer, far larger, hyper answers
/// with an empty body before any of this code runs.)
const MAX_URI_BYTES: usize = 8 << 10;
const MAX_HEADER_BYTES: usize = 32 << 10;

async fn limit_request_head(req: Request<Body>, next: axum::middleware::Next) -> Response {
    if req.uri().to_string().len() > MAX_URI_BYTES {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("the request URI is longer than {MAX_URI_BYTES} bytes"),
            "invalid_request_error",
            "uri_too_long",
        )
        .into_response();
    }
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request headers are larger than {MAX_HEADER_BYTES} bytes"),
            "invalid_request_error",
            "headers_too_large",
        )
        .into_response();
    }
    next.run(req).await
}

async fn report_load(State(s): State<Arc<AppState>>, mut res: Response) -> Response {
    res.headers_mut()
        .insert(QUEUE_DEPTH, HeaderValue::from(s.queue.in_flight()));
    res
}

/// The span every log line of a request carries, generation included.
fn request_span(req: &Request<Body>) -> Span {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %id,
        model = tracing::field::Empty,
    )
}

fn access_log(res: &HttpResponse<Body>, latency: Duration, _span: &Span) {
    tracing::info!(
        status = res.status().as_u16(),
        latency_ms = latency.as_secs_f64() * 1e3,
        "served"
    );
}

/// The API's OpenAPI document, `node-agent/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this endpoint does not take that method; see POST /v1/images/generations, POST /v1/images/edits and GET /v1/models",
        "invalid_request_error",
        "method_not_allowed",
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint; see POST /v1/images/generations, POST /v1/images/edits and GET /v1/models",
        "invalid_request_error",
        "not_found",
    )
}

/// The monitoring port: `/metrics` and `/load`, on a port of its own so that
/// a NetworkPolicy can open it to Prometheus and the operator alone, and the
/// health probes again, so that they answer even while the API port is flooded.
pub fn metrics_router(
    metrics: crate::metrics::AgentMetrics,
    queue: Arc<Queue>,
    ready: Arc<AtomicBool>,
) -> Router {
    Router::new()
        .route("/load", get(move || std::future::ready(Json(queue.load()))))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || std::future::ready(readiness(&ready))),
        )
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    readiness(&s.ready)
}

fn readiness(ready: &AtomicBool) -> Response {
    if ready.load(Ordering::Relaxed) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// The bearer token, compared in constant time.
fn check_token(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if modelcache_support::bearer_allowed(s.token.as_deref(), sent) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid bearer token",
            "invalid_request_error",
            "invalid_api_key",
        ))
    }
}

/// Sets a flag when dropped: the handler future is dropped when the client goes
/// away, and the generation then stops at its next step.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Counts a generation request in `modelcache_generation_requests_total` once,
/// with its status; a request dropped before it answered (its client went
/// away) counts as 499, as proxies log it.
struct Counted {
    /// `None` once the count is handed on (to a stream, which counts itself).
    state: Option<Arc<AppState>>,
    label: String,
    status: Option<StatusCode>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let Some(state) = &self.state else { return };
        let code = self.status.map_or("499".into(), |s| s.as_str().to_string());
        state
            .agent
            .metrics
            .generation_requests
            .with_label_values(&[self.label.as_str(), code.as_str()])
            .inc();
    }
}

async fn generate(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = read_generation(&s.limits, &headers, body);
    answer(&s, &headers, body.map(|r| (r, None))).await
}

/// A generation's JSON body. Only a body carrying images may be larger than
/// `--max-body-bytes` (up to `--max-upload-bytes`).
fn read_generation(
    limits: &Limits,
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<GenerationRequest, ApiError> {
    let too_large = |limit: usize| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
            "invalid_request_error",
            "request_too_large",
        )
    };
    let bytes = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(limits.max_upload_bytes)
        } else {
            ApiError::invalid(format!("invalid body: {}", rej.body_text()))
        }
    })?;
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|m| {
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        });
    if !json {
        return Err(ApiError::invalid(
            "invalid JSON body: Expected request with `Content-Type: application/json`",
        ));
    }
    let Json(r) = Json::<GenerationRequest>::from_bytes(&bytes)
        .map_err(|rej| ApiError::invalid(format!("invalid JSON body: {}", rej.body_text())))?;
    if bytes.len() > limits.max_body_bytes && !r.carries_images() {
        return Err(too_large(limits.max_body_bytes));
    }
    Ok(r)
}

/// `POST /v1/images/edits`: the same answer as a generation, from a form.
async fn edit(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    form: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let form = match form {
        Ok(m) => edit::read_form(m, &s.limits).await,
        Err(rej) => Err(ApiError::invalid(format!(
            "the body must be multipart/form-data: {}",
            rej.body_text()
        ))),
    };
    answer(&s, &headers, form.map(|(r, upload)| (r, Some(upload)))).await
}

/// Runs a request read from either endpoint, counts it, and shapes its answer.
async fn answer(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    body: Result<(GenerationRequest, Option<edit::Upload>), ApiError>,
) -> Response {
    let started = Instant::now();
    let mut counted = Counted {
        state: Some(s.clone()),
        label: String::new(),
        status: None,
    };
    let result = match body {
        Ok((req, upload)) => {
            // The metric's label: the deployment in cluster mode, else the model.
            counted.label = s
                .routes
                .resolve(&s.agent.catalog, &req.model)
                .map(|t| t.label().to_string())
                .unwrap_or_default();
            Span::current().record("model", counted.label.as_str());
            run_generation(s, headers, req, upload, started).await
        }
        Err(e) => Err(e),
    };
    let (status, response) = match result {
        Ok(Answer::Images(body, secs)) => {
            let mut r = Json(body).into_response();
            // Like OpenAI's `openai-processing-ms`: lets clients separate model time from transport.
            if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", secs * 1e3)) {
                r.headers_mut().insert("x-modelcache-generation-ms", v);
            }
            s.queue.record(started.elapsed().as_secs_f64());
            (StatusCode::OK, r)
        }
        // A stream counts itself (and its time) when it ends.
        Ok(Answer::Stream(r)) => {
            counted.state = None;
            return r;
        }
        Err(e) => (e.status, e.redacted(&s.agent.catalog).into_response()),
    };
    counted.status = Some(status);
    response
}

/// A generation's answer: the images in one JSON body (and the generation's
/// seconds), or an event stream.
enum Answer {
    Images(serde_json::Value, f64),
    Stream(Response),
}

/// What a request holds while it waits for and runs in its batch: its place
/// in the queue, and the flag that cancels its images when this is dropped
/// (its client went away, or its time ran out).
struct InFlight {
    reply: tokio::sync::oneshot::Receiver<batcher::Reply>,
    _ticket: queue::Ticket,
    _waiting: queue::SharedWaiting,
    _cancel_on_drop: CancelOnDrop,
}

impl InFlight {
    /// The images, or the request's error; a batch that ended without an
    /// answer is an internal error.
    async fn images(&mut self) -> batcher::Reply {
        (&mut self.reply)
            .await
            .map_err(|_| ApiError::internal("the generation ended without an answer"))?
    }
}

/// The 504 for a request past `--request-timeout-seconds`.
fn timed_out(limit: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "the request took longer than this agent's limit of {} s (--request-timeout-seconds); ask for fewer or smaller images, or fewer steps",
            limit.as_secs()
        ),
        "server_error",
        "timeout",
    )
}

async fn run_generation(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    req: GenerationRequest,
    upload: Option<edit::Upload>,
    started: Instant,
) -> Result<Answer, ApiError> {
    check_token(s, headers)?;
    let target = s.routes.resolve(&s.agent.catalog, &req.model)?;
    let stream = req.stream == Some(true);
    let partial_images = req.partial_images.unwrap_or(0) as usize;
    let editing = upload.is_some();
    let p = match upload {
        // Decoding an upload is CPU work: off the async workers.
        Some(upload) => {
            let (agent, limits, target) = (s.agent.clone(), s.limits.clone(), target.clone());
            tokio::task::spawn_blocking(move || {
                edit::validate_edit(req, upload, &target, &agent.catalog, &limits)
            })
            .await
            .map_err(|e| ApiError::internal(format!("reading the upload failed: {e}")))??
        }
        None => request::validate(&req, &target, &s.agent.catalog, &s.limits)?,
    };
    let ticket = s.queue.admit(target.label())?;
    let cancelled = Arc::new(AtomicBool::new(false));
    let (reply, rx) = tokio::sync::oneshot::channel();
    let (previews, preview_rx) = match stream && partial_images > 0 {
        true => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let previews: Arc<dyn pipeline::Previews + Send> =
                Arc::new(stream::Previews::new(partial_images, tx));
            (Some(previews), Some(rx))
        }
        false => (None, None),
    };
    let (width, height) = (p.width, p.height);
    let waiting = queue::SharedWaiting::start(&s.queue, &s.agent.metrics);
    s.batcher.submit(
        s,
        target.clone(),
        batcher::Job {
            params: p,
            cancelled: cancelled.clone(),
            previews,
            reply,
            span: Span::current(),
            waiting: waiting.clone(),
            submitted: Instant::now(),
        },
    );
    let mut in_flight = InFlight {
        reply: rx,
        _ticket: ticket,
        _waiting: waiting,
        _cancel_on_drop: CancelOnDrop(cancelled),
    };
    let deadline = s.limits.timeout.map(|t| (started + t, t));
    if stream {
        return Ok(Answer::Stream(stream::respond(
            s.clone(),
            target.label().to_string(),
            in_flight,
            preview_rx,
            stream::Shape {
                edit: editing,
                width,
                height,
            },
            deadline,
            started,
        )));
    }
    let (pngs, secs) = match deadline {
        None => in_flight.images().await?,
        Some((at, limit)) => tokio::time::timeout_at(at.into(), in_flight.images())
            .await
            .map_err(|_| timed_out(limit))??,
    };
    let data: Vec<_> = pngs
        .iter()
        .map(|png| json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(png)}))
        .collect();
    Ok(Answer::Images(
        json!({"created": unix_now(), "data": data}),
        secs,
    ))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_token(&s, &headers) {
        return e.into_response();
    }
    let catalog = &s.agent.catalog;
    let resident = s.agent.cache.entries();
    // Cluster mode lists the deployments served here; standalone, the catalog.
    let served: Vec<(String, crate::catalog::CatalogEntry)> = match s.routes.deployments() {
        Some(routes) => routes
            .into_iter()
            .filter_map(|r| catalog.get(&r.model).map(|e| (r.deployment, e)))
            .collect(),
        None => catalog
            .entries()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect(),
    };
    let data: Vec<_> = served
        .into_iter()
        .map(|(id, e)| {
            json!({
                "id": id, "object": "model", "created": 0, "owned_by": "modelcache",
                "base": e.probe.base, "format": e.probe.format, "prediction_type": e.probe.prediction_type,
                "tier": s.agent.tier(&e.name, &resident).as_flag(), "size_bytes": e.probe.size_bytes.f32,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}
