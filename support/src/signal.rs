//! Both binaries stop gracefully on SIGINT (Ctrl-C) and on SIGTERM, which is
//! what Kubernetes sends a pod before it kills it.

/// Resolves when the process is asked to stop.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
