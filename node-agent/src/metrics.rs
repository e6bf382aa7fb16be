//! The agent's Prometheus metrics (their names are a contract with the
//! dashboards and alerts; docs/architecture.md lists them), registered once. Cache and
//! memory figures are read at scrape time by a collector, so they are never stale
//! and never double-counted; request metrics are updated as requests finish.

use crate::cache::{ModelCache, TierStats};
use crate::memory;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Request-path metrics plus the registry that also holds the scrape-time collector.
#[derive(Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    pub generation_seconds: Histogram,
    pub generation_requests: IntCounterVec,
    pub queue_depth: Gauge,
    /// Images per denoising batch.
    pub batch_images: Histogram,
    /// Seconds from a request's admission to the start of its batch.
    pub batch_wait_seconds: Histogram,
}

impl AgentMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        modelcache_support::process_metrics::register(&registry, "agent")?;
        let generation_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "modelcache_generation_seconds",
                "Seconds to generate the images of one request, queueing excluded",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
            ]),
        )?;
        let generation_requests = IntCounterVec::new(
            Opts::new(
                "modelcache_generation_requests_total",
                "Image generation requests by model and HTTP status code",
            ),
            &["model", "code"],
        )?;
        let queue_depth = Gauge::new(
            "modelcache_queue_depth",
            "Generation requests waiting for a free slot",
        )?;
        registry.register(Box::new(generation_seconds.clone()))?;
        registry.register(Box::new(generation_requests.clone()))?;
        let batch_images = Histogram::with_opts(
            HistogramOpts::new(
                "modelcache_batch_size",
                "Images denoised together in one batch",
            )
            .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]),
        )?;
        let batch_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "modelcache_batch_wait_seconds",
                "Seconds a generation request waited for its batch to start (the batching window and a free slot)",
            )
            .buckets(vec![
                0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
        )?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(batch_images.clone()))?;
        registry.register(Box::new(batch_wait_seconds.clone()))?;
        Ok(AgentMetrics {
            registry,
            generation_seconds,
            generation_requests,
            queue_depth,
            batch_images,
            batch_wait_seconds,
        })
    }

    /// Registers the scrape-time collector of the cache's and the process's memory figures.
    pub fn register_cache(&self, cache: ModelCache) -> Result<(), prometheus::Error> {
        self.registry
            .register(Box::new(CacheCollector::new(cache)?))
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Counters kept by the memory module, exported at scrape time.
const PROCESS_COUNTERS: [(&str, &str); 3] = [
    (
        "modelcache_malloc_trim_released_bytes_total",
        "Bytes returned to the system by malloc_trim after evictions",
    ),
    (
        "modelcache_alloc_pool_hits_total",
        "Large allocations served from the allocation pool",
    ),
    (
        "modelcache_alloc_pool_misses_total",
        "Large allocations that mapped fresh memory",
    ),
];

struct CacheCollector {
    cache: ModelCache,
    bytes: IntGaugeVec,
    capacity: IntGaugeVec,
    models: IntGaugeVec,
    requests: IntCounterVec,
    evictions: IntCounterVec,
    device_bytes: IntGaugeVec,
    device_capacity: IntGaugeVec,
    device_memory: IntGaugeVec,
    device_memory_free: IntGaugeVec,
    process: [Gauge; 9],
    descs: Vec<Desc>,
}

impl CacheCollector {
    fn new(cache: ModelCache) -> Result<Self, prometheus::Error> {
        let tier = &["tier"];
        let bytes = IntGaugeVec::new(
            Opts::new("modelcache_cache_bytes", "Bytes held by each cache tier"),
            tier,
        )?;
        let capacity = IntGaugeVec::new(
            Opts::new(
                "modelcache_cache_capacity_bytes",
                "Byte budget of each cache tier",
            ),
            tier,
        )?;
        let models = IntGaugeVec::new(
            Opts::new(
                "modelcache_cache_models",
                "Models resident in each cache tier",
            ),
            tier,
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "modelcache_cache_requests_total",
                "Cache lookups by tier and result",
            ),
            &["tier", "result"],
        )?;
        let evictions = IntCounterVec::new(
            Opts::new(
                "modelcache_cache_evictions_total",
                "Models evicted from each tier to make room or on request",
            ),
            tier,
        )?;
        // Per device tier (one per GPU); the `tier="vram"` series above are their sums.
        let device_bytes = IntGaugeVec::new(
            Opts::new(
                "modelcache_device_cache_bytes",
                "Bytes held by each device's cache tier",
            ),
            &["device"],
        )?;
        let device_capacity = IntGaugeVec::new(
            Opts::new(
                "modelcache_device_cache_capacity_bytes",
                "Byte budget of each device's cache tier",
            ),
            &["device"],
        )?;
        // Total and free are two quantities (summing them means nothing), so
        // two metrics rather than one with a `state` label.
        let device_memory = IntGaugeVec::new(
            Opts::new(
                "modelcache_device_memory_bytes",
                "Each compute device's memory: a GPU's from its driver, the CPU's from /proc/meminfo",
            ),
            &["device"],
        )?;
        let device_memory_free = IntGaugeVec::new(
            Opts::new(
                "modelcache_device_memory_free_bytes",
                "Each compute device's free memory: a GPU's from its driver, the CPU's MemAvailable",
            ),
            &["device"],
        )?;
        let g = |n: &str, h: &str| Gauge::new(n, h);
        let process = [
            g("modelcache_process_resident_bytes", "Resident set size of the agent process")?,
            g("modelcache_malloc_arena_bytes", "Bytes glibc malloc holds in heap arenas (mallinfo2 arena)")?,
            g("modelcache_malloc_mmap_bytes", "Bytes glibc malloc holds in mmapped chunks (mallinfo2 hblkhd)")?,
            g("modelcache_malloc_in_use_bytes", "Bytes of malloc allocations in use (mallinfo2 uordblks + hblkhd)")?,
            g("modelcache_malloc_free_bytes", "Free bytes malloc holds without returning them (mallinfo2 fordblks)")?,
            g("modelcache_malloc_releasable_bytes", "Free bytes at the top of the heap that malloc_trim could release (mallinfo2 keepcost)")?,
            g("modelcache_malloc_fragmentation_ratio", "malloc's free-but-held bytes divided by all bytes it holds; 0 when unavailable")?,
            g("modelcache_malloc_mmap_threshold_bytes", "Static M_MMAP_THRESHOLD in force; 0 when glibc's dynamic threshold is in effect")?,
            g("modelcache_alloc_pool_bytes", "Freed large blocks the allocation pool keeps for reuse (released when the agent is idle)")?,
        ];
        let mut descs = Vec::new();
        for c in [
            &bytes as &dyn Collector,
            &capacity,
            &models,
            &requests,
            &evictions,
            &device_bytes,
            &device_capacity,
            &device_memory,
            &device_memory_free,
        ] {
            descs.extend(c.desc().into_iter().cloned());
        }
        for p in &process {
            descs.extend(p.desc().into_iter().cloned());
        }
        for (name, help) in PROCESS_COUNTERS {
            descs.extend(
                prometheus::Counter::new(name, help)?
                    .desc()
                    .into_iter()
                    .cloned(),
            );
        }
        Ok(CacheCollector {
            cache,
            bytes,
            capacity,
            models,
            requests,
            evictions,
            device_bytes,
            device_capacity,
            device_memory,
            device_memory_free,
            process,
            descs,
        })
    }
}

fn set_tier(c: &CacheCollector, label: &str, s: &TierStats) {
    c.bytes.with_label_values(&[label]).set(s.used as i64);
    c.capacity.with_label_values(&[label]).set(s.budget as i64);
    c.models.with_label_values(&[label]).set(s.models as i64);
    let set_counter = |v: &IntCounterVec, labels: &[&str], value: u64| {
        let ctr = v.with_label_values(labels);
        ctr.reset();
        ctr.inc_by(value);
    };
    set_counter(&c.requests, &[label, "hit"], s.hits);
    set_counter(&c.requests, &[label, "miss"], s.misses);
    set_counter(&c.evictions, &[label], s.evictions);
}

impl Collector for CacheCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (ram, dev) = self.cache.stats();
        set_tier(self, "ram", &ram);
        set_tier(self, "vram", &dev);
        let slots = &self.cache.config().devices;
        for (slot, s) in slots.iter().zip(self.cache.device_stats()) {
            let id = crate::device::id(&slot.device);
            self.device_bytes
                .with_label_values(&[&id])
                .set(s.used as i64);
            self.device_capacity
                .with_label_values(&[&id])
                .set(s.budget as i64);
            let (free, total) = crate::device::memory_or_host(&slot.device);
            self.device_memory_free
                .with_label_values(&[&id])
                .set(free as i64);
            self.device_memory
                .with_label_values(&[&id])
                .set(total as i64);
        }
        let mi = memory::mallinfo2();
        let pool = memory::pool::stats();
        let values = [
            memory::resident_bytes() as f64,
            mi.map_or(0.0, |m| m.arena as f64),
            mi.map_or(0.0, |m| m.hblkhd as f64),
            mi.map_or(0.0, |m| (m.uordblks + m.hblkhd) as f64),
            mi.map_or(0.0, |m| m.fordblks as f64),
            mi.map_or(0.0, |m| m.keepcost as f64),
            mi.map_or(0.0, |m| m.fragmentation_ratio()),
            memory::mmap_threshold() as f64,
            pool.pooled_bytes as f64,
        ];
        for (g, v) in self.process.iter().zip(values) {
            g.set(v);
        }
        let mut out = Vec::new();
        for c in [
            &self.bytes as &dyn Collector,
            &self.capacity,
            &self.models,
            &self.requests,
            &self.evictions,
            &self.device_bytes,
            &self.device_capacity,
            &self.device_memory,
            &self.device_memory_free,
        ] {
            out.extend(c.collect());
        }
        for g in &self.process {
            out.extend(g.collect());
        }
        // Counters whose values live in the memory module.
        let values = [
            memory::trim_released_total() as f64,
            pool.hits as f64,
            pool.misses as f64,
        ];
        for ((name, help), value) in PROCESS_COUNTERS.into_iter().zip(values) {
            let mut family = prometheus::proto::MetricFamily::default();
            family.set_name(name.into());
            family.set_help(help.into());
            family.set_field_type(prometheus::proto::MetricType::COUNTER);
            let mut m = prometheus::proto::Metric::default();
            let mut c = prometheus::proto::Counter::default();
            c.set_value(value);
            m.set_counter(c);
            family.mut_metric().push(m);
            out.push(family);
        }
        out
    }
}
