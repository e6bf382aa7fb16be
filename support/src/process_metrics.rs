//! The metrics every Prometheus-instrumented process exposes: the standard
//! `process_*` family (CPU, memory, open files, start time) and a
//! `modelcache_build_info` that says which build is running, so dashboards and
//! alerts can tell versions apart during a rollout.

use prometheus::{IntGaugeVec, Opts, Registry};

/// Registers `process_*` and `modelcache_build_info{component,version}` (1).
pub fn register(registry: &Registry, component: &str) -> Result<(), prometheus::Error> {
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let info = IntGaugeVec::new(
        Opts::new(
            "modelcache_build_info",
            "The running build: 1, labelled with the component and its version",
        ),
        &["component", "version"],
    )?;
    info.with_label_values(&[component, env!("CARGO_PKG_VERSION")])
        .set(1);
    registry.register(Box::new(info))
}

#[cfg(test)]
mod tests {
    #[test]
    fn process_metrics_and_build_info_are_gathered() {
        let r = prometheus::Registry::new();
        super::register(&r, "agent").unwrap();
        let names: Vec<String> = r.gather().iter().map(|f| f.name().to_string()).collect();
        for n in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
            "modelcache_build_info",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
    }
}
