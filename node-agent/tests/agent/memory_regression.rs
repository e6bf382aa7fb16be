//! CI-sized fragmentation regression (profile `ci`: budget 512 MiB, 12 models
//! of 75–225 MiB, 4 loader threads, 100 switches), each variant in its own
//! process. The agent's RAM tier must keep RSS and VmHWM within budget + 64 MiB;
//! the heap-buffer control under glibc defaults must fail the same check, which
//! proves the benchmark detects fragmentation. A ratio, never a time.

use std::process::Command;

fn run(variant: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_modelcache-memory-bench"))
        .args(["run", variant, "ci"])
        .env_remove("MALLOC_MMAP_THRESHOLD_")
        .output()
        .expect("benchmark binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("JSON summary")
}

#[test]
fn ram_tier_stays_within_budget_where_heap_buffers_fragment() {
    let region = run("region");
    let budget = region["budget"].as_f64().unwrap();
    assert!(
        region["pass"].as_bool().unwrap(),
        "RAM tier exceeded budget + 64 MiB: {region}"
    );
    assert!(region["hwm"].as_f64().unwrap() / budget < 1.13, "{region}");
    let heap = run("heap");
    assert!(
        !heap["pass"].as_bool().unwrap(),
        "the control did not fragment, so the check proves nothing: {heap}"
    );
    assert!(heap["max_rss"].as_f64().unwrap() / budget > 1.5, "{heap}");
}
