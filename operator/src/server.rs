//! Serving an axum router on an address, as every server of the operator's
//! binary does: bound up front so that a taken port fails at start, logged,
//! and stopped by `shutdown` after the requests in flight.

use anyhow::Context as _;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;

pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .with_context(|| format!("serving {addr}"))
}
