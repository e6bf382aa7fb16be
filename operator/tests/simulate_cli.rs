//! `modelcache-operator simulate` refuses a cluster or workload it cannot run
//! with a message naming what is wrong, instead of panicking or never ending.

use std::process::Command;

/// Runs `simulate` with `args`; its exit code and stderr.
fn simulate(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modelcache-operator"))
        .arg("simulate")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn impossible_inputs_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, json: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, json).unwrap();
        p.to_string_lossy().into_owned()
    };
    let trace = |fields: &str| {
        file(
            "trace.json",
            &format!(
                r#"{{"modelBytes": [1000000000], "zipf": 1.0, "active": 10, "arrivals": 10, "requestsPerArrival": 1, "seed": 1, {fields}}}"#
            ),
        )
    };
    let zero_bandwidth = file(
        "cluster.json",
        r#"{"nodes": [{"name": "n1", "ramBytes": 1000000000, "deviceBytes": [1000000000], "diskBytesPerSecond": 0}]}"#,
    );
    let empty_models = file(
        "empty.json",
        r#"{"modelBytes": [], "zipf": 1.0, "active": 10, "arrivals": 10, "requestsPerArrival": 1, "seed": 1}"#,
    );
    let endless = trace(r#""arrivals": 18446744073709551615"#);
    let negative_share = file(
        "warm.json",
        r#"{"modelBytes": [1], "zipf": 1.0, "active": 1, "arrivals": 1, "requestsPerArrival": 1, "seed": 1, "warmRam": -0.5}"#,
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--models", "0"], "modelBytes"),
        (vec!["--nodes", "0"], "no nodes"),
        (vec!["--trace", &empty_models], "modelBytes"),
        (vec!["--cluster", &zero_bandwidth], "diskBytesPerSecond"),
        (vec!["--zipf", "NaN"], "zipf"),
        (vec!["--trace", &endless], "arrivals"),
        (vec!["--replicas", "0"], "replicas"),
        (
            vec!["--warm-vram", "0.8", "--warm-ram", "0.8"],
            "warmVram + warmRam",
        ),
        (vec!["--trace", &negative_share], "warmRam"),
    ];
    for (args, field) in cases {
        let (code, err) = simulate(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(field), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn a_small_simulation_still_runs() {
    let (code, err) = simulate(&["--nodes", "3", "--models", "5", "--arrivals", "20"]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn warm_deployments_with_priorities_report_their_preemptions() {
    let out = Command::new(env!("CARGO_BIN_EXE_modelcache-operator"))
        .args([
            "simulate",
            "--nodes",
            "2",
            "--models",
            "20",
            "--arrivals",
            "200",
        ])
        .args([
            "--warm-vram",
            "1",
            "--priorities",
            "0,100",
            "--replicas",
            "2",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // Two nodes of 24 GiB cannot hold 1,000 warm 2–7 GB deployments: the
    // high-priority ones take reservations from the low ones.
    assert!(text.contains("reservations preempted"), "{text}");
    assert!(text.contains("loads when placed"), "{text}");
}
