//! Every agent dashboard panel's query, with Grafana's variables substituted,
//! runs against a real Prometheus server that scrapes a running agent which
//! has downloaded a model from a real S3 server, served requests, switched
//! models and shed load; a panel whose query
//! returns nothing fails. The Scheduler dashboard is checked here to parse
//! (promtool) and to name only operator metrics; `e2e.rs` runs its queries
//! against a Prometheus scraping the operator of the end-to-end cluster.

use modelcache_agent::agent::Agent;
use modelcache_agent::api::{self, AppState, Limits, Queue};
use modelcache_agent::cache::CacheConfig;
use modelcache_agent::catalog::Catalog;
use modelcache_agent::fetch::disk::DiskTier;
use modelcache_agent::fetch::{Access, Source};
use modelcache_agent::routes::Routes;
use modelcache_tests::s3::{Seaweed, KEY, SECRET};
use modelcache_tests::{copy_dir, repo, run, tool, Prometheus};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// (panel title, expression) of every target of a dashboard.
fn queries(name: &str) -> Vec<(String, String)> {
    let path = repo().join(format!("charts/modelcache/dashboards/{name}.json"));
    let d: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(!out.is_empty());
    out
}

/// Grafana's substitutions for a namespace and node the test scrapes.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$namespace", "modelcache")
        .replace("$node", "n1")
}

fn post(addr: &str, body: &Value) -> u16 {
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw[9..12]).parse().unwrap()
}

#[test]
fn agent_dashboard_panels_return_data_from_a_real_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = repo().join("tests/fixtures/tiny-sd1");
    copy_dir(&fixture, &dir.path().join("models/tiny"));
    copy_dir(&fixture, &dir.path().join("models/tiny2"));
    // A model for the disk tier to download, for the download panels.
    let s3 = Seaweed::start();
    s3.upload_dir(&fixture, "sd/tiny");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (api_addr, metrics_addr, agent) = rt.block_on(async {
        let downloads = dir.path().join("downloads");
        let disk = DiskTier::open(&downloads, 1 << 30).unwrap();
        let catalog = Catalog::scan_with(
            &dir.path().join("models"),
            Some(&downloads),
            &dir.path().join("state"),
            None,
        );
        // Room for about one tiny pipeline per tier: switching models evicts.
        let agent = Arc::new(
            Agent::new(CacheConfig::cpu(24 << 20, 24 << 20), catalog)
                .unwrap()
                .with_downloads(disk, Default::default())
                .unwrap(),
        );
        let metrics = agent.metrics.clone();
        let state = Arc::new(AppState::new(
            agent,
            Arc::new(Routes::default()),
            Queue::new(1, 1),
            Limits::default(),
            None,
        ));
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mon = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = (
            api.local_addr().unwrap().to_string(),
            mon.local_addr().unwrap().to_string(),
        );
        let (queue, ready) = (state.queue.clone(), state.ready.clone());
        let agent = state.agent.clone();
        tokio::spawn(
            async move { axum::serve(mon, api::metrics_router(metrics, queue, ready)).await },
        );
        tokio::spawn(async move { axum::serve(api, api::router(state)).await });
        (addrs.0, addrs.1, agent)
    });
    let prom = Prometheus::start(&[(
        &metrics_addr,
        &[("namespace", "modelcache"), ("node", "n1")],
    )]);

    // Scraping first, so that the rate windows see the counters move.
    assert!(
        !prom.wait_for("up == 1", Duration::from_secs(30)).is_empty(),
        "agent never scraped"
    );

    // Download a model into the disk tier.
    let access = Access {
        endpoint: Some(s3.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some(KEY.into()),
        secret_access_key: Some(SECRET.into()),
        token: None,
    };
    let source: Source = "s3://models/sd/tiny".parse().unwrap();
    let fetcher = agent.fetcher.as_ref().unwrap();
    rt.block_on(fetcher.fetch("hub/tiny", &source, &access, &[], &|_| false))
        .unwrap();

    // Serve, switch models (loads, moves, evictions), then overload the queue (429s).
    let req = |model: &str, steps: u32| json!({"model": model, "prompt": "a lighthouse", "size": "64x64", "steps": steps, "seed": 3});
    for model in ["tiny", "tiny2", "tiny", "tiny2"] {
        assert_eq!(post(&api_addr, &req(model, 2)), 200);
    }
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let (addr, body) = (api_addr.clone(), req("tiny2", 30));
            std::thread::spawn(move || post(&addr, &body))
        })
        .collect();
    let codes: Vec<u16> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(codes.contains(&429) && codes.contains(&200), "{codes:?}");

    // Prometheus has scraped what the requests did (a label set seen for the
    // first time starts its series, so give the rate windows two more scrapes).
    assert!(
        !prom
            .wait_for(
                r#"modelcache_generation_requests_total{code="429"} > 0"#,
                Duration::from_secs(30)
            )
            .is_empty(),
        "prometheus never saw the 429s"
    );
    std::thread::sleep(Duration::from_secs(3));
    let mut empty = Vec::new();
    for dashboard in ["cache", "memory", "generation"] {
        for (title, expr) in queries(dashboard) {
            let q = substitute(&expr);
            if prom.query(&q).is_empty() {
                empty.push(format!("{dashboard} / {title}: {q}"));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    drop(rt);
}

#[test]
fn scheduler_dashboard_queries_parse_and_name_operator_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: scheduler-dashboard\n    rules:\n");
    for (i, (_, expr)) in queries("scheduler").iter().enumerate() {
        rules.push_str(&format!(
            "      - record: panel:{i}\n        expr: {:?}\n",
            substitute(expr)
        ));
    }
    let file = dir.path().join("panels.yaml");
    std::fs::write(&file, rules).unwrap();
    let (ok, out) = run(Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(&file));
    assert!(ok, "{out}");
    let operator_src = std::fs::read_to_string(repo().join("operator/src/metrics.rs")).unwrap();
    for (title, expr) in queries("scheduler") {
        let metric = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .find(|w| w.starts_with("modelcache_"))
            .unwrap()
            .trim_end_matches("_bucket")
            .to_string();
        assert!(
            operator_src.contains(&format!("\"{metric}\"")),
            "{title}: {metric} is not an operator metric"
        );
    }
}
