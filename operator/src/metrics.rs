//! The operator's Prometheus metrics (their names are a contract with the
//! dashboards and alerts; docs/architecture.md lists them).
//!
//! Counters and histograms are updated by the controller; the gauges that
//! describe the whole cluster (`modelcache_deployments`,
//! `modelcache_unschedulable_deployments`, `modelcache_nodes`) are computed at
//! scrape time from the reflector stores, so they can never drift from what the
//! API server holds.

use crate::cluster::NodeState;
use crate::stores::Stores;
use modelcache_crds::{condition, ModelDeployment};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// Metrics written by the reconciler.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub decisions: IntCounterVec,
    pub scheduler_duration: Histogram,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: IntCounter,
    pub autoscaler: AutoscalerMetrics,
}

/// What the autoscaler measured and decided, per deployment.
#[derive(Clone)]
pub struct AutoscalerMetrics {
    /// Requests in flight or queued at a deployment's agents, for every deployment
    /// (what KEDA or an HPA can scale on instead).
    pub inflight: GaugeVec,
    pub desired: IntGaugeVec,
    pub current: IntGaugeVec,
    pub rescales: IntCounterVec,
}

impl AutoscalerMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let labels = &["namespace", "deployment"];
        let inflight = GaugeVec::new(
            Opts::new(
                "modelcache_deployment_inflight_requests",
                "Requests in flight or queued at a deployment's agents, as last polled",
            ),
            labels,
        )?;
        let desired = IntGaugeVec::new(
            Opts::new(
                "modelcache_autoscaler_desired_replicas",
                "Replicas the autoscaler wants for an autoscaled deployment",
            ),
            labels,
        )?;
        let current = IntGaugeVec::new(
            Opts::new(
                "modelcache_autoscaler_current_replicas",
                "spec.replicas of an autoscaled deployment when the autoscaler last looked",
            ),
            labels,
        )?;
        let rescales = IntCounterVec::new(
            Opts::new(
                "modelcache_autoscaler_rescales_total",
                "Replica changes the autoscaler wrote, by direction (up, down)",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(inflight.clone()))?;
        registry.register(Box::new(desired.clone()))?;
        registry.register(Box::new(current.clone()))?;
        registry.register(Box::new(rescales.clone()))?;
        Ok(AutoscalerMetrics {
            inflight,
            desired,
            current,
            rescales,
        })
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        modelcache_support::process_metrics::register(&registry, "operator")?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "modelcache_scheduler_decisions_total",
                "Scheduling decisions by result (scheduled, unschedulable, preempting)",
            ),
            &["result"],
        )?;
        let scheduler_duration = Histogram::with_opts(
            HistogramOpts::new(
                "modelcache_scheduler_duration_seconds",
                "Time to decide one deployment's placements",
            )
            .buckets(exponential_buckets(1e-5, 4.0, 10)?),
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "modelcache_reconcile_duration_seconds",
                "Time of one ModelDeployment reconcile, API calls included",
            )
            .buckets(exponential_buckets(1e-3, 2.0, 14)?),
        )?;
        let reconcile_errors = IntCounter::new(
            "modelcache_reconcile_errors_total",
            "Reconciles that failed and were retried",
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(scheduler_duration.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        let autoscaler = AutoscalerMetrics::new(&registry)?;
        Ok(Metrics {
            autoscaler,
            registry,
            decisions,
            scheduler_duration,
            reconcile_duration,
            reconcile_errors,
        })
    }

    /// Adds the scrape-time cluster gauges, read from the controller's stores.
    pub fn register_cluster(&self, view: ClusterCollector) -> Result<(), prometheus::Error> {
        self.registry.register(Box::new(view))
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Computes the cluster gauges from the stores at scrape time.
pub struct ClusterCollector {
    stores: Stores,
    lease_expiry: Duration,
    by_condition: GaugeVec,
    unschedulable: GaugeVec,
    node_states: GaugeVec,
    descs: Vec<Desc>,
}

impl ClusterCollector {
    /// Reads `stores`; a node whose Lease is older than `lease_expiry` counts as stale.
    pub fn new(stores: Stores, lease_expiry: Duration) -> Result<Self, prometheus::Error> {
        let by_condition = GaugeVec::new(
            Opts::new(
                "modelcache_deployments",
                "ModelDeployments whose condition is True, by condition",
            ),
            &["condition"],
        )?;
        let unschedulable = GaugeVec::new(
            Opts::new(
                "modelcache_unschedulable_deployments",
                "ModelDeployments that are not fully placed, by the condition reason (snake_case)",
            ),
            &["reason"],
        )?;
        let node_states = GaugeVec::new(
            Opts::new(
                "modelcache_nodes",
                "Node agents by state (ready, stale, cordoned)",
            ),
            &["state"],
        )?;
        let descs = [&by_condition, &unschedulable, &node_states]
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Ok(ClusterCollector {
            stores,
            lease_expiry,
            by_condition,
            unschedulable,
            node_states,
            descs,
        })
    }
}

/// `InsufficientVram` → `insufficient_vram`: metric label values are lowercase.
pub fn snake(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len() + 4);
    for (i, c) in reason.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Why a deployment is not fully placed, if it is not: the reason of its first
/// condition among Resolved and Scheduled that is not True.
pub fn unschedulable_reason(md: &ModelDeployment) -> Option<String> {
    let status = md.status.as_ref()?;
    [condition::RESOLVED, condition::SCHEDULED]
        .iter()
        .find_map(|t| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == *t && c.status != "True")
                .map(|c| snake(&c.reason))
        })
}

impl Collector for ClusterCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let deployments = self.stores.deployments.state();
        self.by_condition.reset();
        for c in condition::DEPLOYMENT {
            let n = deployments
                .iter()
                .filter(|d| {
                    d.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|x| x.type_ == c && x.status == "True")
                    })
                })
                .count();
            self.by_condition.with_label_values(&[c]).set(n as f64);
        }
        self.unschedulable.reset();
        let mut reasons: BTreeMap<String, u32> = BTreeMap::new();
        for d in &deployments {
            if let Some(r) = unschedulable_reason(d) {
                *reasons.entry(r).or_default() += 1;
            }
        }
        for (r, n) in reasons {
            self.unschedulable
                .with_label_values(&[&r])
                .set(f64::from(n));
        }
        let cluster = self.stores.cluster(self.lease_expiry);
        for s in [NodeState::Ready, NodeState::Stale, NodeState::Cordoned] {
            let n = cluster
                .model_nodes
                .iter()
                .filter(|m| cluster.state(m) == s)
                .count();
            self.node_states
                .with_label_values(&[s.label()])
                .set(n as f64);
        }
        let mut out = self.by_condition.collect();
        out.extend(self.unschedulable.collect());
        out.extend(self.node_states.collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_become_snake_case_labels() {
        assert_eq!(snake("InsufficientVram"), "insufficient_vram");
        assert_eq!(snake("ModelNotFound"), "model_not_found");
    }
}
