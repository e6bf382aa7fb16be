//! `modelcache-operator gateway`: one OpenAI-compatible base URL for every
//! ModelDeployment in the cluster.
//!
//! It is stateless: what it routes by comes from watches of ModelDeployments
//! (spec, placements and their tiers), of the operator's EndpointSlices (the
//! Ready agents) and of ModelNodes (each agent's address), never from an API
//! call per request. [`backends`] reads
//! those objects, [`crate::balance`] orders the agents, [`proxy`] holds,
//! sends and retries, [`metrics`] counts.

pub mod backends;
#[cfg(feature = "testing")]
pub mod fixtures;
pub mod metrics;
pub mod payload;
pub mod proxy;

pub use proxy::{Gateway, GatewayError, Limits};

use crate::server::serve;
use anyhow::Context as _;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use metrics::GatewayMetrics;
use modelcache_crds::{ModelDeployment, ModelNode, MANAGED_BY_LABEL, OPERATOR_MANAGER};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

/// What `gateway` was asked for.
pub struct Settings {
    pub namespace: String,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub token: Option<String>,
    pub limits: Limits,
}

/// The API (port 8080): generations, models and health.
pub fn router(gateway: Arc<Gateway>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/models", get(models))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "watches not synced")
                    }
                }
            }),
        )
        .fallback(|| async {
            GatewayError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint; see POST /v1/images/generations, POST /v1/images/edits and GET /v1/models"
                    .into(),
                code: "not_found",
                param: None,
                retry_after: None,
            }
        })
        .with_state(gateway)
}

/// Counts a request once, with its status (499 when the client went away first).
struct Counted<'a> {
    gateway: &'a Gateway,
    model: String,
    code: Option<StatusCode>,
    started: Instant,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let code = self.code.map_or("499".into(), |c| c.as_str().to_string());
        let m = &self.gateway.metrics;
        m.requests.with_label_values(&[&self.model, &code]).inc();
        m.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

async fn generations(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    proxied(&g, "/v1/images/generations", &headers, body).await
}

async fn edits(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    proxied(&g, "/v1/images/edits", &headers, body).await
}

/// Forwards a request to an agent of its deployment, counted once.
async fn proxied(g: &Gateway, path: &str, headers: &HeaderMap, body: Body) -> Response {
    let mut counted = Counted {
        gateway: g,
        model: String::new(),
        code: None,
        started: Instant::now(),
    };
    let res = g
        .forward(path, headers, body, &mut counted.model)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    counted.code = Some(res.status());
    res
}

async fn models(State(g): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(e) = g.check_token(&headers) {
        return e.into_response();
    }
    let mut data: Vec<_> = g
        .deployments
        .state()
        .iter()
        .map(|md| backends::model_object(md, &g.namespace))
        .collect();
    data.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

/// Watches, serves, and stops on SIGTERM after the requests in flight.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let metrics = GatewayMetrics::new().context("registering metrics")?;
    let (md_reader, md_writer) = reflector::store();
    let (slice_reader, slice_writer) = reflector::store();
    let (node_reader, node_writer) = reflector::store();
    let (changed, changes) = tokio::sync::watch::channel(0u64);
    let changed = Arc::new(changed);
    let deployments = reflector(
        md_writer,
        watcher(Api::<ModelDeployment>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects()
    .inspect_err(|e| tracing::warn!(kind = "ModelDeployments", error = %e, "watch failed; retrying with backoff"))
    .for_each({
        let changed = changed.clone();
        move |_| {
            changed.send_modify(|n| *n += 1);
            std::future::ready(())
        }
    });
    let slices = reflector(
        slice_writer,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default()
                .labels(&format!("{MANAGED_BY_LABEL}={OPERATOR_MANAGER}")),
        ),
    )
    .default_backoff()
    .touched_objects()
    .inspect_err(|e| tracing::warn!(kind = "EndpointSlices", error = %e, "watch failed; retrying with backoff"))
    .for_each(move |_| {
        changed.send_modify(|n| *n += 1);
        std::future::ready(())
    });
    let nodes = reflector(
        node_writer,
        watcher(
            Api::<ModelNode>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .inspect_err(
        |e| tracing::warn!(kind = "ModelNodes", error = %e, "watch failed; retrying with backoff"),
    )
    .for_each(|_| std::future::ready(()));
    tokio::spawn(deployments);
    tokio::spawn(slices);
    tokio::spawn(nodes);
    let ready = Arc::new(AtomicBool::new(false));
    {
        let (md, sl, mn, ready) = (
            md_reader.clone(),
            slice_reader.clone(),
            node_reader.clone(),
            ready.clone(),
        );
        tokio::spawn(async move {
            if md.wait_until_ready().await.is_ok()
                && sl.wait_until_ready().await.is_ok()
                && mn.wait_until_ready().await.is_ok()
            {
                tracing::info!("watches synced");
                ready.store(true, Ordering::Relaxed);
            }
        });
    }
    let gateway = Arc::new(Gateway::new(
        settings.namespace,
        md_reader,
        slice_reader,
        node_reader,
        changes,
        Some(client),
        settings.token,
        settings.limits,
        metrics.clone(),
    ));
    let metrics_router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let api = serve(
        settings.listen,
        router(gateway, ready),
        modelcache_support::shutdown_signal(),
    );
    let mon = serve(
        settings.metrics_listen,
        metrics_router,
        modelcache_support::shutdown_signal(),
    );
    tokio::try_join!(api, mon)?;
    tracing::info!("stopped");
    Ok(())
}
