//! Scheduler invariants over random clusters and deployments.

use modelcache_crds::{PlacementRole, Tier, WarmTier};
use modelcache_operator::scheduler::{plan, Deployment, Node, Options, Sizes, Taint, Toleration};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

const G: u64 = 1 << 30;

fn node() -> impl Strategy<Value = (bool, bool, bool, u64, Vec<u64>, bool, u8)> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0..64u64,
        proptest::collection::vec(0..24u64, 1..3),
        any::<bool>(),
        0..3u8,
    )
}

fn deployment() -> impl Strategy<Value = (u8, u64, u32, u8, i32, bool, bool, u32)> {
    (
        0..6u8,
        1..12u64,
        0..4u32,
        0..3u8,
        -2..3i32,
        any::<bool>(),
        any::<bool>(),
        1..3u32,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn placements_respect_filters_and_capacity(
        nodes in proptest::collection::vec(node(), 1..10),
        deps in proptest::collection::vec(deployment(), 1..16),
    ) {
        let nodes: Vec<Node> = nodes.into_iter().enumerate().map(|(i, (healthy, schedulable, tainted, ram, devs, gpu_label, resident))| Node {
            name: format!("n{i}"),
            labels: if gpu_label { BTreeMap::from([("pool".to_string(), "gpu".to_string())]) } else { BTreeMap::new() },
            taints: if tainted { vec![Taint { key: "nvidia.com/gpu".into(), value: String::new(), effect: "NoSchedule".into() }] } else { Vec::new() },
            schedulable,
            healthy,
            ram_budget: ram * G,
            device_budgets: devs.iter().map(|d| d * G).collect(),
            // Every third agent has no GPU: it holds weights at F32.
            cpu_only: i % 3 == 0,
            resident: match resident { 0 => HashMap::new(), 1 => HashMap::from([("m0".to_string(), Tier::Ram)]), _ => HashMap::from([("m1".to_string(), Tier::Vram)]) },
            local: None,
            disk_bps: 2e9,
            ram_to_device_bps: 20e9,
            serving_bytes: 0,
        }).collect();
        let deps: Vec<Deployment> = deps.into_iter().enumerate().map(|(i, (m, size, replicas, warm, priority, selector, tolerate, per_node))| Deployment {
            key: format!("ns/d{i}"),
            model: format!("m{m}"),
            size: Sizes { gpu: size * G, cpu: 2 * size * G, ram: size * G + G / 2 },
            replicas,
            warm: [WarmTier::None, WarmTier::Ram, WarmTier::Vram][warm as usize],
            priority,
            node_selector: if selector { BTreeMap::from([("pool".to_string(), "gpu".to_string())]) } else { BTreeMap::new() },
            tolerations: if tolerate { vec![Toleration { key: "nvidia.com/gpu".into(), operator: "Exists".into(), ..Default::default() }] } else { Vec::new() },
            max_per_node: per_node,
            spread_key: None,
            current: Vec::new(), fetch: None,
        }).collect();
        let out = plan(&nodes, &deps, Options::default());
        prop_assert_eq!(&out, &plan(&nodes, &deps, Options::default()), "deterministic");
        let mut ram_used: HashMap<&str, u64> = HashMap::new();
        let mut vram_used: HashMap<&str, u64> = HashMap::new();
        for (d, dec) in deps.iter().zip(&out) {
            let mut per_node: HashMap<&str, u32> = HashMap::new();
            for a in &dec.assignments {
                let n = nodes.iter().find(|n| n.name == a.node).unwrap();
                prop_assert!(n.healthy && n.schedulable, "{} on an unavailable node", d.key);
                prop_assert!(d.node_selector.iter().all(|(k, v)| n.labels.get(k) == Some(v)), "selector");
                prop_assert!(n.taints.is_empty() || !d.tolerations.is_empty(), "untolerated taint");
                let on_device = if n.cpu_only { d.size.cpu } else { d.size.gpu };
                prop_assert_eq!(d.device_bytes(n), on_device);
                prop_assert!(n.device_budgets.iter().any(|b| *b >= on_device), "model fits a device");
                match d.warm {
                    WarmTier::Ram => *ram_used.entry(&n.name).or_default() += d.size.ram,
                    WarmTier::Vram => *vram_used.entry(&n.name).or_default() += on_device,
                    WarmTier::None => {}
                }
                if a.role == PlacementRole::Serving {
                    *per_node.entry(&n.name).or_default() += 1;
                }
            }
            prop_assert!(per_node.values().all(|c| *c <= d.max_per_node), "per-node cap");
            let serving = dec.assignments.iter().filter(|a| a.role == PlacementRole::Serving).count() as u32;
            prop_assert!(serving <= d.replicas);
            if dec.preempted_by.is_none() {
                prop_assert_eq!(serving + dec.unplaced, d.replicas, "{}: every replica placed or explained", d.key);
            }
            prop_assert_eq!(dec.unplaced > 0, dec.reason.is_some());
        }
        for n in &nodes {
            prop_assert!(ram_used.get(n.name.as_str()).copied().unwrap_or(0) <= n.ram_budget, "RAM over budget on {}", n.name);
            prop_assert!(vram_used.get(n.name.as_str()).copied().unwrap_or(0) <= n.device_budgets.iter().sum::<u64>(), "VRAM over budget on {}", n.name);
        }
    }
}
