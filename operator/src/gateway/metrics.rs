//! The gateway's Prometheus metrics (names are a contract with the Gateway
//! dashboard and the alerts).

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

#[derive(Clone)]
pub struct GatewayMetrics {
    registry: Registry,
    /// Requests by deployment (`namespace/name`, empty when unknown) and status code.
    pub requests: IntCounterVec,
    pub duration: Histogram,
    /// First choices by reason: only, least_wait, residency, affinity.
    pub picks: IntCounterVec,
    /// Further attempts by why the previous one failed: connect, unavailable, busy.
    pub retries: IntCounterVec,
    /// Requests waiting for a deployment to get a ready replica.
    pub held: IntGaugeVec,
    pub hold_seconds: Histogram,
    /// Deployments the gateway raised from zero replicas.
    pub scale_ups: IntCounterVec,
}

impl GatewayMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        modelcache_support::process_metrics::register(&registry, "gateway")?;
        let requests = IntCounterVec::new(
            Opts::new(
                "modelcache_gateway_requests_total",
                "Requests by deployment and HTTP status (499: the client went away)",
            ),
            &["model", "code"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "modelcache_gateway_request_duration_seconds",
                "Time from a request's arrival to its answer, holding and retries included",
            )
            .buckets(exponential_buckets(1e-3, 2.5, 14)?),
        )?;
        let picks = IntCounterVec::new(
            Opts::new(
                "modelcache_gateway_picks_total",
                "Agent choices by what decided them (only, least_wait, residency, affinity)",
            ),
            &["reason"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "modelcache_gateway_retries_total",
                "Requests sent again to another agent, by why the last attempt failed (connect, unavailable, busy)",
            ),
            &["reason"],
        )?;
        let held = IntGaugeVec::new(
            Opts::new(
                "modelcache_gateway_held_requests",
                "Requests waiting for their deployment to get a ready replica (scale from zero, loading)",
            ),
            &["model"],
        )?;
        let hold_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "modelcache_gateway_hold_seconds",
                "How long held requests waited for a ready replica, timeouts included",
            )
            .buckets(exponential_buckets(0.1, 2.0, 12)?),
        )?;
        let scale_ups = IntCounterVec::new(
            Opts::new(
                "modelcache_gateway_scale_from_zero_total",
                "Times the gateway raised a deployment from zero replicas for a request",
            ),
            &["model"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(picks.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(held.clone()))?;
        registry.register(Box::new(hold_seconds.clone()))?;
        registry.register(Box::new(scale_ups.clone()))?;
        Ok(GatewayMetrics {
            registry,
            requests,
            duration,
            picks,
            retries,
            held,
            hold_seconds,
            scale_ups,
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
