//! The HTTP API (ARCHITECTURE §4 `api`): OpenAI's images API plus extensions,
//! a bounded queue, limits, optional bearer token, and OpenAI-shaped errors.

use crate::cache::{CacheError, ModelCache, TierKind};
use crate::catalog::Catalog;
use crate::metrics::AgentMetrics;
use crate::pipeline::{self, GenerateParams, PipelineError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use modelcache_crds::{GenerationDefaults, LoraSpec, SchedulerKind};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_prompt_chars: usize,
    pub max_n: u32,
    pub max_side: u32,
    pub max_steps: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 << 10,
            max_prompt_chars: 4000,
            max_n: 4,
            max_side: 2048,
            max_steps: 150,
        }
    }
}

/// Admission control: `concurrency` generations run, up to `queue_size` wait,
/// the rest are refused with 429 at once.
pub struct Queue {
    slots: Arc<Semaphore>,
    capacity: usize,
    concurrency: usize,
    admitted: AtomicUsize,
    waiting: AtomicUsize,
}

impl Queue {
    pub fn new(concurrency: usize, queue_size: usize) -> Self {
        let concurrency = concurrency.max(1);
        Queue {
            slots: Arc::new(Semaphore::new(concurrency)),
            capacity: concurrency + queue_size,
            concurrency,
            admitted: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    fn admit(self: &Arc<Self>) -> Option<Ticket> {
        if self.admitted.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Ticket {
            queue: self.clone(),
        })
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// An admitted request; holds its place until dropped.
struct Ticket {
    queue: Arc<Queue>,
}

impl Ticket {
    async fn slot(&self, metrics: &AgentMetrics) -> Result<OwnedSemaphorePermit, ApiError> {
        let q = &self.queue;
        metrics
            .queue_depth
            .set((q.waiting.fetch_add(1, Ordering::SeqCst) + 1) as f64);
        let permit = q.slots.clone().acquire_owned().await;
        metrics
            .queue_depth
            .set((q.waiting.fetch_sub(1, Ordering::SeqCst) - 1) as f64);
        permit.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is shutting down",
                "server_error",
                "shutting_down",
            )
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queue.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A ModelDeployment this agent serves in cluster mode (its placement here is Ready).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// `namespace/name`.
    pub deployment: String,
    /// Catalog name of the model.
    pub model: String,
    /// Adapters applied to every request, before the request's own.
    pub loras: Vec<LoraSpec>,
    /// Values for what a request leaves out.
    pub defaults: GenerationDefaults,
}

/// Shared state of the API handlers.
pub struct AppState {
    pub cache: ModelCache,
    pub catalog: Catalog,
    pub metrics: AgentMetrics,
    pub queue: Arc<Queue>,
    pub limits: Limits,
    pub token: Option<String>,
    pub ready: AtomicBool,
    /// Cluster mode: the deployments served, by `namespace/name`. `None` standalone,
    /// where every model in the catalog is served by name.
    routes: std::sync::RwLock<Option<HashMap<String, Route>>>,
    /// Moving average of generation seconds, for Retry-After.
    avg_seconds: std::sync::Mutex<f64>,
}

impl AppState {
    /// Switches to cluster mode's routing and replaces what is served.
    pub fn set_routes(&self, routes: HashMap<String, Route>) {
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = Some(routes);
    }

    /// The catalog name and, in cluster mode, the deployment a request's
    /// `model` names: `name` or `namespace/name` (standalone also accepts the
    /// `default/` prefix clients of a cluster would send).
    pub fn resolve(&self, requested: &str) -> Result<(String, Option<Route>), ApiError> {
        let not_found = |why: String| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                why,
                "invalid_request_error",
                "model_not_found",
            )
        };
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let Some(routes) = routes.as_ref() else {
            let name = requested.strip_prefix("default/").unwrap_or(requested);
            return match self.catalog.get(name) {
                Some(_) => Ok((name.to_string(), None)),
                None => Err(not_found(format!(
                    "model {requested:?} does not exist; see GET /v1/models"
                ))),
            };
        };
        if let Some(r) = routes.get(requested) {
            return Ok((r.model.clone(), Some(r.clone())));
        }
        let mut by_name = routes
            .values()
            .filter(|r| r.deployment.rsplit('/').next() == Some(requested));
        match (by_name.next(), by_name.next()) {
            (Some(r), None) => Ok((r.model.clone(), Some(r.clone()))),
            (Some(_), Some(_)) => Err(ApiError::invalid(format!(
                "model {requested:?} names ModelDeployments in several namespaces; use \"namespace/name\""
            ))),
            (None, _) => Err(not_found(format!(
                "model {requested:?} is not served here: no ModelDeployment of that name has a Ready placement on this node; see GET /v1/models"
            ))),
        }
    }

    pub fn new(
        cache: ModelCache,
        catalog: Catalog,
        metrics: AgentMetrics,
        queue: Queue,
        limits: Limits,
        token: Option<String>,
    ) -> Self {
        AppState {
            cache,
            catalog,
            metrics,
            queue: Arc::new(queue),
            limits,
            token,
            ready: AtomicBool::new(true),
            routes: std::sync::RwLock::new(None),
            avg_seconds: std::sync::Mutex::new(1.0),
        }
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "code", "param"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: &'static str,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        message: impl Into<String>,
        kind: &'static str,
        code: &'static str,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            code,
            retry_after: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            message,
            "invalid_request_error",
            "invalid_value",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "code": self.code, "param": null}});
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Cache(c @ CacheError::CacheFull { .. }) => {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    c.to_string(),
                    "server_error",
                    "cache_full",
                );
                e.retry_after = Some(5);
                e
            }
            PipelineError::Cache(c) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                c.to_string(),
                "server_error",
                "model_load_failed",
            ),
            PipelineError::Model { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
                "server_error",
                "model_unavailable",
            ),
            PipelineError::Invalid(m) => ApiError::invalid(m),
            PipelineError::Cancelled => ApiError::new(
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "request cancelled",
                "invalid_request_error",
                "cancelled",
            ),
            PipelineError::Compute(m) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                m,
                "server_error",
                "internal_error",
            ),
        }
    }
}

/// A LoRA named in a request.
#[derive(Debug, Deserialize)]
pub struct LoraRequest {
    pub path: String,
    #[serde(default)]
    pub weight: Option<f64>,
}

/// `POST /v1/images/generations` body. Unknown OpenAI fields (quality, style,
/// user) are accepted and ignored, as other image backends do.
#[derive(Debug, Deserialize)]
pub struct GenerationRequest {
    pub model: String,
    pub prompt: String,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub response_format: Option<String>,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub loras: Option<Vec<LoraRequest>>,
    #[serde(default)]
    pub seamless: Option<serde_json::Value>,
    #[serde(default)]
    pub clip_skip: Option<u32>,
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/images/generations", post(generate))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

pub fn metrics_router(metrics: AgentMetrics) -> Router {
    Router::new().route(
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
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

fn check_token(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = &s.token else { return Ok(()) };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time over the token's length: no early exit on the first differing byte.
    let (a, b) = (want.as_bytes(), got.as_bytes());
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    if diff == 0 {
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

fn parse_size(size: &str, max: u32) -> Result<(usize, usize), ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "size {size:?} must be WIDTHxHEIGHT, multiples of 8 from 64 to {max}"
        ))
    };
    let (w, h) = size.split_once('x').ok_or_else(bad)?;
    let (w, h): (u32, u32) = (
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    );
    if w % 8 != 0 || h % 8 != 0 || !(64..=max).contains(&w) || !(64..=max).contains(&h) {
        return Err(bad());
    }
    Ok((w as usize, h as usize))
}

/// Validates a request into generation parameters; a deployment's defaults fill
/// in what the request leaves out, and its adapters come before the request's.
/// Without a size, the model's native one (512, 768 for SD 2.x-v, 1024 for SDXL).
fn params(
    s: &AppState,
    r: &GenerationRequest,
    route: Option<&Route>,
    model: &str,
) -> Result<GenerateParams, ApiError> {
    let l = &s.limits;
    let native = s
        .catalog
        .get(model)
        .and_then(|e| e.probe.image_size)
        .map_or(512, |n| n.min(l.max_side) as usize);
    let defaults = route.map(|r| r.defaults.clone()).unwrap_or_default();
    let negative_prompt = r
        .negative_prompt
        .clone()
        .or(defaults.negative_prompt)
        .unwrap_or_default();
    if r.prompt.trim().is_empty() {
        return Err(ApiError::invalid("prompt must not be empty"));
    }
    if r.prompt.chars().count() > l.max_prompt_chars
        || negative_prompt.chars().count() > l.max_prompt_chars
    {
        return Err(ApiError::invalid(format!(
            "prompt is longer than {} characters",
            l.max_prompt_chars
        )));
    }
    let n = r.n.unwrap_or(1);
    if !(1..=l.max_n).contains(&n) {
        return Err(ApiError::invalid(format!(
            "n must be from 1 to {}",
            l.max_n
        )));
    }
    match r.response_format.as_deref() {
        None | Some("b64_json") => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "response_format {other:?} is not supported; use b64_json"
            )))
        }
    }
    let (width, height) = match (&r.size, defaults.width, defaults.height) {
        (Some(sz), _, _) => parse_size(sz, l.max_side)?,
        (None, w, h) => (
            w.map_or(native, |w| w.max(8) as usize),
            h.map_or(native, |h| h.max(8) as usize),
        ),
    };
    let steps = r
        .steps
        .or(defaults.steps.map(|v| v.max(1) as u32))
        .unwrap_or(25);
    if !(1..=l.max_steps).contains(&steps) {
        return Err(ApiError::invalid(format!(
            "steps must be from 1 to {}",
            l.max_steps
        )));
    }
    let guidance = r.guidance_scale.or(defaults.guidance_scale).unwrap_or(7.5);
    if !(0.0..=30.0).contains(&guidance) {
        return Err(ApiError::invalid("guidance_scale must be from 0 to 30"));
    }
    let scheduler = match &r.scheduler {
        Some(name) => name
            .parse::<SchedulerKind>()
            .map_err(|e| ApiError::invalid(e.to_string()))?,
        None => defaults.scheduler.unwrap_or(SchedulerKind::Ddim),
    };
    let requested = r.loras.as_deref().unwrap_or_default();
    if requested.len() > 16 {
        return Err(ApiError::invalid("at most 16 loras per request"));
    }
    let deployment_loras = route.map_or(&[][..], |r| r.loras.as_slice());
    let loras = deployment_loras
        .iter()
        .map(|l| (l.path.as_str(), Some(l.weight)))
        .chain(requested.iter().map(|l| (l.path.as_str(), l.weight)))
        .map(|(path, weight)| {
            let weight = weight.unwrap_or(1.0);
            if !(-4.0..=4.0).contains(&weight) {
                return Err(ApiError::invalid(format!(
                    "lora {path:?}: weight must be from -4 to 4"
                )));
            }
            let path = s.catalog.resolve_file(path).map_err(ApiError::invalid)?;
            Ok((path.to_string_lossy().into_owned(), weight))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let seamless = match &r.seamless {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {
            pipeline::unet::conv::Seamless::default()
        }
        Some(serde_json::Value::Bool(true)) => pipeline::unet::conv::Seamless { x: true, y: true },
        Some(serde_json::Value::String(axes)) => {
            pipeline::unet::conv::Seamless::parse(axes).map_err(ApiError::invalid)?
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "seamless must be true, false, \"x\", \"y\" or \"xy\"",
            ))
        }
    };
    let clip_skip = r.clip_skip.unwrap_or(0);
    if clip_skip > 12 {
        return Err(ApiError::invalid("clip_skip must be from 0 to 12"));
    }
    let seed = r.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    // `<name>` in a prompt uses the embedding of that name under the models folder.
    let mut embeddings: Vec<(String, std::path::PathBuf)> = Vec::new();
    for name in pipeline::embedding::triggers(&r.prompt)
        .into_iter()
        .chain(pipeline::embedding::triggers(&negative_prompt))
    {
        if let Some(e) = s.catalog.embedding(&name) {
            if !embeddings.iter().any(|(n, _)| *n == name) {
                embeddings.push((name, e.path.clone()));
            }
        }
    }
    Ok(GenerateParams {
        prompt: r.prompt.clone(),
        negative_prompt,
        steps: steps as usize,
        guidance_scale: guidance,
        width,
        height,
        seed,
        scheduler,
        n: n as usize,
        latents: None,
        clip_skip: clip_skip as usize,
        loras,
        embeddings,
        seamless,
    })
}

/// Sets a flag when dropped: the handler future is dropped when the client goes
/// away, and the generation then stops at its next step.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn generate(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<GenerationRequest>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let (model, result) = match body {
        Ok(Json(req)) => {
            // The metric's label: the deployment in cluster mode, else the model.
            let label = s
                .resolve(&req.model)
                .map(|(name, route)| route.map_or(name, |r| r.deployment))
                .unwrap_or_default();
            (label, run_generation(&s, &headers, req).await)
        }
        Err(rej) => {
            let status = rej.status();
            let err = if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    format!(
                        "request body is larger than {} bytes",
                        s.limits.max_body_bytes
                    ),
                    "invalid_request_error",
                    "request_too_large",
                )
            } else {
                ApiError::invalid(format!("invalid JSON body: {}", rej.body_text()))
            };
            ("".to_string(), Err(err))
        }
    };
    let (status, response) = match result {
        Ok((body, secs)) => {
            let mut r = Json(body).into_response();
            // Like OpenAI's `openai-processing-ms`: lets clients separate model time from transport.
            if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", secs * 1e3)) {
                r.headers_mut().insert("x-modelcache-generation-ms", v);
            }
            (StatusCode::OK, r)
        }
        Err(e) => (e.status, e.into_response()),
    };
    s.metrics
        .generation_requests
        .with_label_values(&[model.as_str(), status.as_str()])
        .inc();
    if status == StatusCode::OK {
        let secs = started.elapsed().as_secs_f64();
        let mut avg = s.avg_seconds.lock().unwrap_or_else(|p| p.into_inner());
        *avg = 0.8 * *avg + 0.2 * secs;
    }
    response
}

async fn run_generation(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    req: GenerationRequest,
) -> Result<(serde_json::Value, f64), ApiError> {
    check_token(s, headers)?;
    let (name, route) = s.resolve(&req.model)?;
    let p = params(s, &req, route.as_ref(), &name)?;
    let Some(ticket) = s.queue.admit() else {
        let per = *s.avg_seconds.lock().unwrap_or_else(|p| p.into_inner());
        let wait = (per * (s.queue.waiting() as f64 + 1.0) / s.queue.concurrency as f64)
            .ceil()
            .max(1.0) as u64;
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "the generation queue is full; retry later",
            "rate_limit_error",
            "queue_full",
        );
        e.retry_after = Some(wait);
        return Err(e);
    };
    let permit = ticket.slot(&s.metrics).await?;
    let cancelled = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(cancelled.clone());
    let state = s.clone();
    let (pngs, secs) = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _ticket = ticket;
        let started = Instant::now();
        let model = state.catalog.open(&name)?;
        let images = pipeline::generate(&state.cache, &model, &p, &|_, _, _| {
            !cancelled.load(Ordering::Relaxed)
        })?;
        let pngs = images
            .iter()
            .map(|img| img.to_png())
            .collect::<Result<Vec<_>, _>>();
        Ok::<_, PipelineError>((pngs, started.elapsed().as_secs_f64()))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("generation task failed: {e}"),
            "server_error",
            "internal_error",
        )
    })??;
    s.metrics.generation_seconds.observe(secs);
    let pngs = pngs.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("PNG encoding: {e}"),
            "server_error",
            "internal_error",
        )
    })?;
    let data: Vec<_> = pngs
        .iter()
        .map(|png| json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(png)}))
        .collect();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok((json!({"created": created, "data": data}), secs))
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_token(&s, &headers) {
        return e.into_response();
    }
    let resident = s.cache.entries();
    // Cluster mode lists the deployments served here; standalone, the catalog.
    let served: Vec<(String, crate::catalog::CatalogEntry)> = {
        let routes = s.routes.read().unwrap_or_else(|p| p.into_inner());
        match routes.as_ref() {
            Some(routes) => {
                let mut v: Vec<_> = routes
                    .values()
                    .filter_map(|r| s.catalog.get(&r.model).map(|e| (r.deployment.clone(), e)))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            }
            None => s
                .catalog
                .entries()
                .into_iter()
                .map(|e| (e.name.clone(), e))
                .collect(),
        }
    };
    let data: Vec<_> = served
        .into_iter()
        .map(|(id, e)| {
            // Opened models know their UNet's cache key (converted checkpoints live in the state folder).
            let unet = s.catalog.opened_component(&e.name, "unet").unwrap_or_default();
            let tier = if resident.iter().any(|r| r.key == unet && r.tier == TierKind::Device) {
                "vram"
            } else if resident.iter().any(|r| r.key == unet && r.tier == TierKind::Ram) {
                "ram"
            } else {
                "disk"
            };
            json!({
                "id": id, "object": "model", "created": 0, "owned_by": "modelcache",
                "base": e.probe.base, "format": e.probe.format, "prediction_type": e.probe.prediction_type,
                "tier": tier, "size_bytes": e.probe.size_bytes.f32,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}
