//! The agent's allocator (`memory::pool`), installed in this test binary as in
//! the agent: blocks keep their contents through every path, a freed block is
//! reused by the next allocation of its size while work is in progress, and
//! the real agent serves a step's buffers from the pool and holds none when
//! idle.

use crate::api::{http, metric, Agent};
use modelcache_agent::memory::pool;
use proptest::prelude::*;

const MIB: usize = 1 << 20;

#[test]
fn a_freed_block_is_reused_zeroed_when_asked_and_released_on_demand() {
    // A size no other test allocates, so the block found is this test's.
    let size = 3 * MIB + 12_345;
    let busy = pool::busy();
    let mut v = vec![7u8; size];
    let addr = v.as_ptr() as usize;
    v[size - 1] = 9;
    drop(v);
    let before = pool::stats();
    assert!(before.enabled);
    let v = vec![0u8; size];
    assert_eq!(v.as_ptr() as usize, addr, "the freed block was not reused");
    assert!(
        v.iter().all(|b| *b == 0),
        "a reused block asked zeroed is zeroed"
    );
    assert!(pool::stats().hits > before.hits);
    drop(v);
    assert!(pool::stats().pooled_bytes >= size);
    assert!(pool::release() >= size, "release unmaps what the pool held");
    drop(busy);
}

#[test]
fn growing_and_shrinking_across_the_threshold_keeps_the_contents() {
    let _busy = pool::busy();
    let mut v: Vec<u32> = (0..1000).collect();
    for target in [MIB, 5 * MIB, 64 * MIB, 2 * MIB, 1000] {
        let n = target / 4;
        v.resize(n, 0);
        v.shrink_to_fit();
        let keep = n.min(1000);
        assert!(
            v[..keep].iter().enumerate().all(|(i, x)| *x == i as u32),
            "contents lost at {target} bytes"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of allocations, reallocations and frees of sizes around
    /// the 1 MiB threshold hands out blocks that never overlap and keep what
    /// was written to them.
    #[test]
    fn blocks_never_overlap_and_keep_their_contents(
        ops in proptest::collection::vec((0usize..6, 0usize..8, MIB - 4096..3 * MIB), 1..60)
    ) {
        let _busy = pool::busy();
        let mut live: Vec<Option<(Vec<u8>, u8)>> = vec![None; 6];
        for (i, (slot, tag, size)) in ops.into_iter().enumerate() {
            let tag = (i as u8).wrapping_mul(31).wrapping_add(tag as u8);
            match live[slot].take() {
                None => live[slot] = Some((vec![tag; size], tag)),
                Some((mut v, t)) if tag.is_multiple_of(2) => {
                    let old = v.len();
                    v.resize(size, t);
                    v.shrink_to_fit();
                    prop_assert!(v.iter().all(|b| *b == t), "realloc {old} → {size} lost bytes");
                    live[slot] = Some((v, t));
                }
                Some((v, t)) => prop_assert!(v.iter().all(|b| *b == t), "a block was overwritten"),
            }
        }
        for (v, t) in live.into_iter().flatten() {
            prop_assert!(v.iter().all(|b| *b == t));
        }
    }
}

#[test]
fn the_agent_serves_repeated_step_buffers_from_the_pool_and_holds_none_when_idle() {
    let agent = Agent::start(&[]);
    // 256×256 with CFG: the attention scores and activations are over 1 MiB
    // and the same every step.
    let body =
        serde_json::json!({"model": "tiny", "prompt": "a cat", "size": "256x256", "steps": 4});
    let r = http(
        &agent.api,
        "POST",
        "/v1/images/generations",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let hits = metric(&agent, "modelcache_alloc_pool_hits_total").unwrap_or(0.0);
    let misses = metric(&agent, "modelcache_alloc_pool_misses_total").unwrap_or(0.0);
    assert!(
        hits > misses,
        "later steps should reuse the first step's buffers: {hits} hits, {misses} misses"
    );
    assert_eq!(metric(&agent, "modelcache_alloc_pool_bytes"), Some(0.0));
}

#[test]
fn a_malformed_pool_cap_is_reported_at_start_and_the_default_applies() {
    let agent = Agent::start_configured(
        |_| {},
        &[],
        |cmd| {
            cmd.env(pool::ENV, "12MB");
        },
    );
    let logs = agent.logs.lock().unwrap().clone();
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or("").to_string();
    assert!(
        logs.iter().any(|v| v["level"] == "WARN"
            && message(v).contains("MODELCACHE_ALLOC_POOL_BYTES is not a byte count")),
        "no warning about the malformed cap: {logs:?}"
    );
    let started = logs
        .iter()
        .find(|v| message(v).contains("allocation pool"))
        .expect("the pool's settings are logged at start");
    assert_eq!(started["fields"]["enabled"], true);
    assert_eq!(started["fields"]["cap_bytes"], pool::DEFAULT_CAP as u64);
}

#[test]
fn threshold_zero_leaves_glibcs_dynamic_threshold_and_says_so() {
    let agent = Agent::start_configured(
        |_| {},
        &["--malloc-mmap-threshold", "0"],
        |cmd| {
            cmd.env_remove("MALLOC_MMAP_THRESHOLD_");
        },
    );
    assert_eq!(
        metric(&agent, "modelcache_malloc_mmap_threshold_bytes"),
        Some(0.0),
        "the metric the alert watches reads 0"
    );
    let warned = agent.logs.lock().unwrap().iter().any(|v| {
        v["level"] == "WARN"
            && v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("dynamic threshold is in effect"))
    });
    assert!(warned, "no warning that the heap may fragment");
}
