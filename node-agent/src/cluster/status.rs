//! The ModelNode status this agent reports: what it holds, what it found,
//! its devices, cache and memory, and its view of its placements.

use super::Settings;
use crate::agent::Agent;
use crate::{device, memory};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use modelcache_crds::*;
use std::collections::HashMap;

/// The status to report now. `hashes` are the content hashes verified this
/// run, by model path; `started` is when the agent became Ready.
pub fn node_status(
    agent: &Agent,
    settings: &Settings,
    placements: Vec<NodePlacement>,
    hashes: &HashMap<String, String>,
    started: Timestamp,
) -> ModelNodeStatus {
    let (ram, dev) = agent.cache.stats();
    let cfg = agent.cache.config();
    let endpoint = |port| match settings.pod_ip.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{}:{port}", settings.pod_ip),
    };
    let now = Timestamp::now();
    let entries = agent.cache.entries();
    let found = agent.catalog.found();
    let mut models: Vec<ResidentModel> = found
        .iter()
        .flat_map(|e| {
            agent
                .residency(&e.name, &entries)
                .into_iter()
                .map(|r| ResidentModel {
                    path: e.rel_path.clone(),
                    tier: r.tier.into(),
                    size_bytes: r.bytes as i64,
                    locked: r.locked,
                    last_used: SignedDuration::try_from(r.idle)
                        .ok()
                        .and_then(|d| now.checked_sub(d).ok())
                        .map(Time),
                })
        })
        .collect();
    let models_truncated = models.len() > MAX_REPORTED_MODELS;
    models.truncate(MAX_REPORTED_MODELS);
    let mut local: Vec<LocalModel> = found
        .iter()
        .map(|e| LocalModel {
            path: e.rel_path.clone(),
            model_type: e.probe.model_type,
            base: e.probe.base,
            variant: e.probe.variant,
            prediction_type: e.probe.prediction_type,
            format: e.probe.format,
            file_bytes: e.probe.file_bytes as i64,
            tensor_count: e.probe.tensor_count as i64,
            parameter_count: Some((e.probe.size_bytes.f32 / 4) as i64),
            sha256: hashes.get(&e.rel_path).cloned(),
        })
        .collect();
    let local_truncated = local.len() > MAX_REPORTED_MODELS;
    local.truncate(MAX_REPORTED_MODELS);
    let mi = memory::mallinfo2();
    let placed = placements.len();
    ModelNodeStatus {
        agent: Some(AgentInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            pod_name: settings.pod_name.clone(),
            endpoint: endpoint(settings.api_port),
            metrics_endpoint: Some(endpoint(settings.metrics_port)),
        }),
        devices: cfg
            .devices
            .iter()
            .map(|slot| {
                let (free, total) = device::memory_or_host(&slot.device);
                DeviceInfo {
                    id: device::id(&slot.device),
                    name: device::name(&slot.device),
                    memory_bytes: total as i64,
                    free_bytes: free as i64,
                    cache_budget_bytes: slot.budget as i64,
                }
            })
            .collect(),
        cache: Some(CacheStatus {
            ram_capacity_bytes: ram.budget as i64,
            ram_used_bytes: ram.used as i64,
            vram_capacity_bytes: dev.budget as i64,
            vram_used_bytes: dev.used as i64,
            hits: (ram.hits + dev.hits) as i64,
            misses: (ram.misses + dev.misses) as i64,
            evictions: (ram.evictions + dev.evictions) as i64,
            disk_read_bytes_per_second: ram.bandwidth as i64,
            // Until a move has been measured, the slowest GPU's PCIe link.
            ram_to_device_bytes_per_second: if dev.bandwidth > 0.0 {
                dev.bandwidth as i64
            } else {
                cfg.devices
                    .iter()
                    .filter_map(|d| device::pcie_bandwidth(&d.device))
                    .map(|b| b as i64)
                    .min()
                    .unwrap_or(0)
            },
        }),
        models,
        models_truncated,
        placements,
        local_models: local,
        local_models_truncated: local_truncated,
        memory: Some(MemoryStatus {
            resident_bytes: memory::resident_bytes() as i64,
            malloc_arena_bytes: mi.map_or(0, |m| m.arena as i64),
            malloc_mmap_bytes: mi.map_or(0, |m| m.hblkhd as i64),
            malloc_free_bytes: mi.map_or(0, |m| m.fordblks as i64),
            fragmentation_ratio: mi.map_or(0.0, |m| m.fragmentation_ratio()),
            mmap_threshold_bytes: memory::mmap_threshold() as i64,
        }),
        conditions: vec![Condition {
            type_: condition::READY.into(),
            status: "True".into(),
            reason: reason::AGENT_SERVING.into(),
            message: format!(
                "{} model(s) found under the model root; {placed} placement(s) on this node",
                found.len(),
            ),
            observed_generation: None,
            last_transition_time: Time(started),
        }],
    }
}

/// The status without what changes all the time (memory to the last 256 MiB and
/// 0.05 of fragmentation, free device memory, last-use times), so that reports
/// are written on change and not as a heartbeat.
pub fn significant(s: &ModelNodeStatus) -> ModelNodeStatus {
    let mut s = s.clone();
    for d in &mut s.devices {
        d.free_bytes = 0;
    }
    for m in &mut s.models {
        m.last_used = None;
    }
    // A download's progress is written in steps of 5%, not on every chunk.
    for p in &mut s.placements {
        if let Some(d) = p.download.as_mut() {
            d.bytes_done = d.bytes_done.saturating_mul(20) / d.bytes_total.max(1);
            d.bytes_total = 0;
        }
    }
    if let Some(m) = s.memory.as_mut() {
        let q = |v: i64| v >> 28;
        m.resident_bytes = q(m.resident_bytes);
        m.malloc_arena_bytes = q(m.malloc_arena_bytes);
        m.malloc_mmap_bytes = q(m.malloc_mmap_bytes);
        m.malloc_free_bytes = q(m.malloc_free_bytes);
        m.fragmentation_ratio = (m.fragmentation_ratio * 20.0).round();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significant_ignores_what_drifts_and_keeps_what_matters() {
        let mut a = ModelNodeStatus {
            memory: Some(MemoryStatus {
                resident_bytes: 1 << 30,
                fragmentation_ratio: 0.10,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut b = a.clone();
        if let Some(m) = b.memory.as_mut() {
            m.resident_bytes += 10 << 20;
            m.fragmentation_ratio = 0.11;
        }
        assert_eq!(
            significant(&a),
            significant(&b),
            "10 MiB and 0.01 are noise"
        );
        if let Some(m) = a.memory.as_mut() {
            m.resident_bytes += 1 << 30;
        }
        assert_ne!(significant(&a), significant(&b), "a GiB is news");
        b.placements.push(NodePlacement {
            deployment: "ml/a".into(),
            phase: NodePlacementPhase::Ready,
            tier: Tier::Ram,
            message: None,
            download: None,
        });
        assert_ne!(
            significant(&b),
            significant(&ModelNodeStatus {
                memory: b.memory.clone(),
                ..Default::default()
            })
        );
    }
}
