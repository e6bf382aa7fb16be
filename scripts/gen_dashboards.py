#!/usr/bin/env python3
"""Writes charts/modelcache/dashboards/*.json, the Grafana dashboards (metric names:
docs/architecture.md).

The JSON files are committed; edit this script and run it again
(`python3 scripts/gen_dashboards.py`) rather than editing them by hand; the
chart tests run it with `--check`. Every
panel is templated by data source, namespace and (for agent panels) node, and
`tests/tests/dashboards.rs` runs each query against a real Prometheus.
"""
import json
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent.parent / "charts/modelcache/dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
AGENT = 'namespace=~"$namespace", node=~"$node"'
OPERATOR = 'namespace=~"$namespace"'
RI = "$__rate_interval"


def variables(agent):
    v = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
        {
            "name": "namespace",
            "label": "Namespace",
            "type": "query",
            "datasource": DS,
            "query": {"query": "label_values(%s, namespace)" % ("modelcache_cache_bytes" if agent else "modelcache_nodes"), "refId": "namespace"},
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
        },
    ]
    if agent:
        v.append(
            {
                "name": "node",
                "label": "Node",
                "type": "query",
                "datasource": DS,
                "query": {"query": 'label_values(modelcache_cache_bytes{namespace=~"$namespace"}, node)', "refId": "node"},
                "refresh": 2,
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
            }
        )
    return {"list": v}


def panel(pid, title, targets, x, y, w=12, h=8, unit="short", kind="timeseries", description=""):
    p = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }
    return p


def dashboard(uid, title, description, agent, panels):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["modelcache"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": variables(agent),
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def quantiles(metric, by, sel, legend):
    return [
        ("histogram_quantile(%s, sum by (le, %s) (rate(%s_bucket{%s}[%s])))" % (q, by, metric, sel, RI), "p%d %s" % (round(q * 100), legend))
        for q in (0.5, 0.99)
    ]


cache = dashboard(
    "modelcache-cache",
    "modelcache / Cache",
    "The model cache on each node: the RAM and VRAM tiers' use against capacity, hit ratio, evictions, load and move latency; the disk tier's downloads.",
    True,
    [
        panel(1, "RAM tier: used vs capacity", [
            ('sum by (node) (modelcache_cache_bytes{tier="ram", %s})' % AGENT, "used {{node}}"),
            ('sum by (node) (modelcache_cache_capacity_bytes{tier="ram", %s})' % AGENT, "capacity {{node}}"),
        ], 0, 0, unit="bytes"),
        panel(2, "VRAM tier: used vs capacity", [
            ('sum by (node) (modelcache_cache_bytes{tier="vram", %s})' % AGENT, "used {{node}}"),
            ('sum by (node) (modelcache_cache_capacity_bytes{tier="vram", %s})' % AGENT, "capacity {{node}}"),
        ], 12, 0, unit="bytes"),
        panel(3, "Hit ratio", [
            ('sum by (node, tier) (rate(modelcache_cache_requests_total{result="hit", %s}[%s])) / sum by (node, tier) (rate(modelcache_cache_requests_total{%s}[%s]))' % (AGENT, RI, AGENT, RI), "{{tier}} {{node}}"),
        ], 0, 8, unit="percentunit"),
        panel(4, "Evictions per minute", [
            ("sum by (node, tier) (rate(modelcache_cache_evictions_total{%s}[%s])) * 60" % (AGENT, RI), "{{tier}} {{node}}"),
        ], 12, 8),
        panel(5, "Load and move latency (disk→RAM, RAM→VRAM)",
              quantiles("modelcache_model_load_seconds", "from, to", AGENT, "{{from}}→{{to}}"), 0, 16, unit="s"),
        panel(6, "Models resident", [
            ("sum by (node, tier) (modelcache_cache_models{%s})" % AGENT, "{{tier}} {{node}}"),
        ], 12, 16),
        panel(7, "Per device: cached vs budget, and free memory", [
            ("sum by (node, device) (modelcache_device_cache_bytes{%s})" % AGENT, "cached {{device}} {{node}}"),
            ("sum by (node, device) (modelcache_device_cache_capacity_bytes{%s})" % AGENT, "budget {{device}} {{node}}"),
            ('sum by (node, device) (modelcache_device_memory_free_bytes{%s})' % AGENT, "free {{device}} {{node}}"),
        ], 0, 24, w=24, unit="bytes", description="One device tier per GPU. Free memory is the driver's figure (on CPU-only nodes, the host's available memory); cached bytes stay under the budget."),
        panel(8, "Downloads: disk tier used vs budget", [
            ("sum by (node) (modelcache_disk_cache_bytes{%s})" % AGENT, "used {{node}}"),
            ("sum by (node) (modelcache_disk_cache_capacity_bytes{%s})" % AGENT, "budget {{node}}"),
        ], 0, 32, unit="bytes", description="Models downloaded from spec.model.source (and room held for downloads in progress) against --disk-cache-bytes; the least recently used unplaced downloads are deleted for room."),
        panel(9, "Downloads: bytes per second by source", [
            ("sum by (node, source) (rate(modelcache_download_bytes_total{%s}[%s]))" % (AGENT, RI), "{{source}} {{node}}"),
        ], 12, 32, unit="Bps", description="Counted when a download completes; a resumed download counts only what it fetched."),
        panel(10, "Downloads: duration", quantiles("modelcache_download_seconds", "source", AGENT, "{{source}}"), 0, 40, unit="s"),
        panel(11, "Downloads: finished in the last hour, and running", [
            ("sum by (node, source, result) (increase(modelcache_downloads_total{%s}[1h]))" % AGENT, "{{result}} {{source}} {{node}}"),
            ("sum by (node) (modelcache_downloads_in_progress{%s})" % AGENT, "running {{node}}"),
        ], 12, 40, description="Failed downloads keep their placement Failed (retried with backoff); the ModelcacheDownloadsFailing alert fires at three in 30 minutes."),
    ],
)

memory = dashboard(
    "modelcache-memory",
    "modelcache / Memory",
    "Process memory against cached bytes, glibc malloc arenas and fragmentation, the mmap threshold in force, what malloc_trim released and the allocation pool.",
    True,
    [
        panel(1, "RSS vs cached weights", [
            ("sum by (node) (modelcache_process_resident_bytes{%s})" % AGENT, "RSS {{node}}"),
            ('sum by (node) (modelcache_cache_bytes{tier="ram", %s})' % AGENT, "cached in RAM {{node}}"),
            ('sum by (node) (modelcache_process_resident_bytes{%s}) - sum by (node) (modelcache_cache_bytes{tier="ram", %s})' % (AGENT, AGENT), "overhead {{node}}"),
        ], 0, 0, unit="bytes", description="Cached weights live outside malloc, so RSS minus the RAM tier is the overhead to watch."),
        panel(2, "malloc: arena, mmap and free bytes", [
            ("sum by (node) (modelcache_malloc_arena_bytes{%s})" % AGENT, "arena {{node}}"),
            ("sum by (node) (modelcache_malloc_mmap_bytes{%s})" % AGENT, "mmap {{node}}"),
            ("sum by (node) (modelcache_malloc_free_bytes{%s})" % AGENT, "free (held) {{node}}"),
            ("sum by (node) (modelcache_malloc_in_use_bytes{%s})" % AGENT, "in use {{node}}"),
        ], 12, 0, unit="bytes"),
        panel(3, "Fragmentation ratio", [
            ("max by (node) (modelcache_malloc_fragmentation_ratio{%s})" % AGENT, "{{node}}"),
        ], 0, 8, unit="percentunit", description="Free-but-held ÷ all malloc memory. The alert fires above 0.5 for 15 minutes."),
        panel(4, "mmap threshold in force", [
            ("min by (node) (modelcache_malloc_mmap_threshold_bytes{%s})" % AGENT, "{{node}}"),
        ], 12, 8, w=6, unit="bytes", kind="stat", description="0 means glibc's dynamic threshold: the heap will fragment. Expect 1 MiB."),
        panel(5, "Released by malloc_trim", [
            ("sum by (node) (increase(modelcache_malloc_trim_released_bytes_total{%s}[%s]))" % (AGENT, RI), "{{node}}"),
        ], 18, 8, w=6, unit="bytes"),
        panel(6, "Releasable (top of heap)", [
            ("sum by (node) (modelcache_malloc_releasable_bytes{%s})" % AGENT, "{{node}}"),
        ], 0, 16, unit="bytes"),
        panel(7, "Allocation pool: held bytes", [
            ("sum by (node) (modelcache_alloc_pool_bytes{%s})" % AGENT, "{{node}}"),
        ], 12, 16, w=6, unit="bytes", description="Freed blocks of 1 MiB and more kept for the next allocation of the same size while the agent works (a step's buffers); released when it is idle. They count in RSS."),
        panel(8, "Allocation pool: hit ratio", [
            ("sum by (node) (rate(modelcache_alloc_pool_hits_total{%s}[%s])) / (sum by (node) (rate(modelcache_alloc_pool_hits_total{%s}[%s])) + sum by (node) (rate(modelcache_alloc_pool_misses_total{%s}[%s])))" % (AGENT, RI, AGENT, RI, AGENT, RI), "{{node}}"),
        ], 18, 16, w=6, unit="percentunit", description="Share of large allocations served from the pool: each hit costs no system call and no page faults."),
    ],
)

generation = dashboard(
    "modelcache-generation",
    "modelcache / Generation",
    "Image generation requests by model and status code, latency, queue depth, load shedding (429) and batching.",
    True,
    [
        panel(1, "Requests by model and code", [
            ("sum by (model, code) (rate(modelcache_generation_requests_total{%s}[%s]))" % (AGENT, RI), "{{model}} {{code}}"),
        ], 0, 0, unit="reqps"),
        panel(2, "Generation latency", quantiles("modelcache_generation_seconds", "node", AGENT, "{{node}}"), 12, 0, unit="s"),
        panel(3, "Queue depth", [
            ("sum by (node) (modelcache_queue_depth{%s})" % AGENT, "{{node}}"),
        ], 0, 8),
        panel(4, "Rejected with 429 (queue full)", [
            ('sum by (node) (rate(modelcache_generation_requests_total{code="429", %s}[%s]))' % (AGENT, RI), "{{node}}"),
        ], 12, 8, unit="reqps"),
        panel(5, "Images per denoising batch", [
            ("sum by (node) (rate(modelcache_batch_size_sum{%s}[%s])) / sum by (node) (rate(modelcache_batch_size_count{%s}[%s]))" % (AGENT, RI, AGENT, RI), "mean {{node}}"),
        ] + quantiles("modelcache_batch_size", "node", AGENT, "{{node}}")[1:], 0, 16,
            description="Requests that share a model and settings are denoised together; batches grow when requests wait for a slot."),
        panel(6, "Wait for a batch to start", quantiles("modelcache_batch_wait_seconds", "node", AGENT, "{{node}}"), 12, 16, unit="s",
            description="From admission to the start of the request's batch: the batching window, then the wait for a free slot."),
    ],
)

scheduler = dashboard(
    "modelcache-scheduler",
    "modelcache / Scheduler",
    "The operator: scheduling decisions and their duration, unschedulable deployments by reason, nodes by state, reconcile errors.",
    False,
    [
        panel(1, "Scheduling decisions", [
            ("sum by (result) (rate(modelcache_scheduler_decisions_total{%s}[%s]))" % (OPERATOR, RI), "{{result}}"),
        ], 0, 0, unit="ops"),
        panel(2, "Decision and reconcile duration", [
            ("histogram_quantile(0.99, sum by (le) (rate(modelcache_scheduler_duration_seconds_bucket{%s}[%s])))" % (OPERATOR, RI), "decision p99"),
            ("histogram_quantile(0.99, sum by (le) (rate(modelcache_reconcile_duration_seconds_bucket{%s}[%s])))" % (OPERATOR, RI), "reconcile p99"),
        ], 12, 0, unit="s"),
        panel(3, "Unschedulable deployments by reason", [
            ("sum by (reason) (modelcache_unschedulable_deployments{%s})" % OPERATOR, "{{reason}}"),
        ], 0, 8),
        panel(4, "Deployments by condition", [
            ("sum by (condition) (modelcache_deployments{%s})" % OPERATOR, "{{condition}}"),
        ], 12, 8),
        panel(5, "Nodes by state", [
            ("sum by (state) (modelcache_nodes{%s})" % OPERATOR, "{{state}}"),
        ], 0, 16),
        panel(6, "Reconcile errors", [
            ("sum (rate(modelcache_reconcile_errors_total{%s}[%s]))" % (OPERATOR, RI), "errors"),
        ], 12, 16, unit="ops"),
    ],
)

gateway = dashboard(
    "modelcache-gateway",
    "modelcache / Gateway",
    "The cluster's one base URL: requests by model and code, latency, how agents were picked, retries, requests held while a deployment scales up from zero, and the autoscaler's decisions.",
    False,
    [
        panel(1, "Requests by model and code", [
            ("sum by (model, code) (rate(modelcache_gateway_requests_total{%s}[%s]))" % (OPERATOR, RI), "{{model}} {{code}}"),
        ], 0, 0, unit="reqps"),
        panel(2, "Request latency (holding and retries included)", quantiles("modelcache_gateway_request_duration_seconds", "namespace", OPERATOR, ""), 12, 0, unit="s"),
        panel(3, "Picks by reason", [
            ("sum by (reason) (rate(modelcache_gateway_picks_total{%s}[%s]))" % (OPERATOR, RI), "{{reason}}"),
        ], 0, 8, unit="reqps", description="What decided each first choice: least_wait, residency (VRAM before RAM), affinity (LoRA set or model hash), only (one holder)."),
        panel(4, "Retries by reason", [
            ("sum by (reason) (rate(modelcache_gateway_retries_total{%s}[%s]))" % (OPERATOR, RI), "{{reason}}"),
        ], 12, 8, unit="reqps", description="Requests sent again to another agent: connect (unreachable), unavailable (503 or the deployment gone from it), busy (429)."),
        panel(5, "Held while scaling up", [
            ("sum by (model) (modelcache_gateway_held_requests{%s})" % OPERATOR, "{{model}}"),
        ], 0, 16, description="Requests waiting for a deployment to get a ready replica (scale from zero, loading)."),
        panel(6, "Hold time", quantiles("modelcache_gateway_hold_seconds", "namespace", OPERATOR, ""), 12, 16, unit="s"),
        panel(7, "Autoscaler: desired and current replicas", [
            ("sum by (deployment) (modelcache_autoscaler_desired_replicas{%s})" % OPERATOR, "desired {{deployment}}"),
            ("sum by (deployment) (modelcache_autoscaler_current_replicas{%s})" % OPERATOR, "current {{deployment}}"),
        ], 0, 24),
        panel(8, "Load per deployment and rescales", [
            ("sum by (deployment) (modelcache_deployment_inflight_requests{%s})" % OPERATOR, "in flight {{deployment}}"),
            ("sum by (direction) (increase(modelcache_autoscaler_rescales_total{%s}[%s]))" % (OPERATOR, RI), "rescaled {{direction}}"),
        ], 12, 24),
    ],
)

# --check: fail, naming them, when the committed files differ from what this writes.
check = "--check" in sys.argv[1:]
stale = []
for name, d in [("cache", cache), ("memory", memory), ("generation", generation), ("scheduler", scheduler), ("gateway", gateway)]:
    path = OUT / f"{name}.json"
    text = json.dumps(d, indent=2, ensure_ascii=False) + "\n"
    if check:
        if not path.exists() or path.read_text() != text:
            stale.append(str(path))
    else:
        path.write_text(text)
        print(f"wrote {path}")
if stale:
    sys.exit("not what scripts/gen_dashboards.py writes (run it again): " + ", ".join(stale))
