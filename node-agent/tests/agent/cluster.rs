//! Cluster mode with kube-rs's own tools: ModelDeployment watch events fed from
//! a channel, a tower-test mock API server that verifies the agent's writes
//! (ModelNode status, Lease) and answers some with errors, and the API served
//! over real HTTP on 127.0.0.1.

use crate::common::{copy_dir, fixtures};

use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::watcher;
use kube::Client;
use modelcache_agent::agent::Agent;
use modelcache_agent::api::{self, AppState, Limits, Queue};
use modelcache_agent::cache::{CacheConfig, TierKind};
use modelcache_agent::catalog::Catalog;
use modelcache_agent::cluster::{ClusterAgent, Settings};
use modelcache_agent::routes::Routes;
use modelcache_crds::*;
use modelcache_tests::s3::{files, Seaweed, KEY, SECRET};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Events = futures::channel::mpsc::UnboundedSender<
    Result<watcher::Event<ModelDeployment>, watcher::Error>,
>;

struct Node {
    agent: Arc<ClusterAgent>,
    api: String,
    _dir: tempfile::TempDir,
}

fn settings() -> Settings {
    Settings {
        node_name: "n1".into(),
        pod_name: "agent-n1".into(),
        pod_ip: "10.1.2.3".into(),
        namespace: "modelcache".into(),
        api_port: 8080,
        metrics_port: 9090,
        lease_renew: Duration::from_millis(200),
        lease_duration: Duration::from_secs(40),
        report_interval: Duration::from_millis(100),
    }
}

/// An agent on node `n1` with tiny-sd1 as `tiny`, its API on a real port.
async fn node() -> Node {
    node_with(true, None).await
}

/// An agent on node `n1`, with tiny-sd1 as `tiny` if `tiny`, and a disk
/// tier of `downloads` bytes in `.modelcache/downloads` if given.
async fn node_with(tiny: bool, downloads: Option<u64>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    if tiny {
        copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny"));
    }
    let disk = downloads.map(|budget| {
        modelcache_agent::fetch::disk::DiskTier::open(&models.join(".modelcache/downloads"), budget)
            .unwrap()
    });
    let catalog = Catalog::scan_with(
        &models,
        disk.as_ref().map(|d| d.root()),
        &dir.path().join("state"),
        None,
    );
    let mut core = Agent::new(CacheConfig::cpu(256 << 20, 256 << 20), catalog).unwrap();
    if let Some(disk) = disk {
        core = core.with_downloads(disk, Default::default()).unwrap();
    }
    let core = Arc::new(core);
    let routes = Arc::new(Routes::default());
    let state = Arc::new(AppState::new(
        core.clone(),
        routes.clone(),
        Queue::new(1, 4),
        Limits::default(),
        None,
    ));
    let agent = ClusterAgent::new(core, routes, settings());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, api::router(state)).await });
    Node {
        agent,
        api,
        _dir: dir,
    }
}

fn deployment(name: &str, path: &str, spec: Value, nodes: &[&str]) -> ModelDeployment {
    let mut s = json!({"model": {"path": path}});
    if let (Some(dst), Some(src)) = (s.as_object_mut(), spec.as_object()) {
        dst.extend(src.clone());
    }
    let mut md = ModelDeployment::new(name, serde_json::from_value(s).unwrap());
    md.metadata.namespace = Some("ml".into());
    md.metadata.resource_version = Some("1".into());
    md.status = Some(ModelDeploymentStatus {
        placements: nodes
            .iter()
            .map(|n| Placement {
                node: n.to_string(),
                role: PlacementRole::Serving,
                phase: PlacementPhase::Assigned,
                tier: Tier::Disk,
                message: None,
                since: None,
                download: None,
            })
            .collect(),
        ..Default::default()
    });
    md
}

/// Starts following a channel of watch events that begins with `initial`.
fn follow(agent: &Arc<ClusterAgent>, initial: Vec<ModelDeployment>) -> Events {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tx.unbounded_send(Ok(watcher::Event::Init)).unwrap();
    for md in initial {
        tx.unbounded_send(Ok(watcher::Event::InitApply(md)))
            .unwrap();
    }
    tx.unbounded_send(Ok(watcher::Event::InitDone)).unwrap();
    tokio::spawn(agent.clone().follow(rx));
    tx
}

async fn placement(
    agent: &ClusterAgent,
    key: &str,
    done: impl Fn(&NodePlacement) -> bool,
) -> NodePlacement {
    for _ in 0..600 {
        if let Some(p) = agent.placements().into_iter().find(|p| p.deployment == key) {
            if done(&p) {
                return p;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("placement {key} never settled: {:?}", agent.placements());
}

/// POST over real HTTP (a blocking client on the blocking pool); returns the
/// status and JSON body.
/// The placement once it is no longer downloading or loading.
async fn settled(agent: &ClusterAgent, key: &str) -> NodePlacement {
    placement(agent, key, |p| {
        !matches!(
            p.phase,
            NodePlacementPhase::Loading | NodePlacementPhase::Downloading
        )
    })
    .await
}

async fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let (addr, path, body) = (
        addr.to_string(),
        path.to_string(),
        serde_json::to_vec(body).unwrap(),
    );
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status: u16 = text[9..12].parse().unwrap();
        let json_start = text.find("\r\n\r\n").unwrap() + 4;
        (status, serde_json::from_str(&text[json_start..]).unwrap_or(Value::Null))
    })
    .await
    .unwrap()
}

fn png_size(b64: &str) -> (u32, u32) {
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let be = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placements_on_this_node_are_warmed_reported_and_served_with_their_defaults() {
    let n = node().await;
    let md = deployment(
        "painter",
        "tiny",
        json!({"warmTier": "Ram", "defaults": {"steps": 2, "width": 64, "height": 64, "guidanceScale": 3.0}}),
        &["n1"],
    );
    let elsewhere = deployment("other", "tiny", json!({}), &["n2"]);
    let events = follow(&n.agent, vec![md.clone(), elsewhere]);

    let p = settled(&n.agent, "ml/painter").await;
    assert_eq!(
        (p.phase, p.tier),
        (NodePlacementPhase::Ready, Tier::Ram),
        "{p:?}"
    );
    assert!(
        p.message.unwrap_or_default().contains("F32"),
        "CPU precision is explained"
    );
    assert!(
        n.agent
            .placements()
            .iter()
            .all(|p| p.deployment != "ml/other"),
        "placements on other nodes are ignored"
    );
    let pinned: Vec<_> = n
        .agent
        .agent
        .cache
        .entries()
        .into_iter()
        .filter(|e| e.tier == TierKind::Ram && e.pinned)
        .map(|e| e.key)
        .collect();
    assert_eq!(
        pinned.len(),
        3,
        "text encoder, UNet and VAE kept warm: {pinned:?}"
    );

    let status = n.agent.status();
    assert_eq!(status.agent.as_ref().unwrap().endpoint, "10.1.2.3:8080");
    let local = status
        .local_models
        .iter()
        .find(|l| l.path == "tiny")
        .expect("tiny reported");
    let f32_bytes = n
        .agent
        .agent
        .catalog
        .by_path("tiny")
        .unwrap()
        .probe
        .size_bytes
        .f32 as i64;
    assert_eq!(
        local.parameter_count,
        Some(f32_bytes / 4),
        "lets the operator size any precision"
    );
    let resident = status
        .models
        .iter()
        .find(|m| m.path == "tiny")
        .expect("resident model reported");
    assert_eq!(resident.tier, Tier::Ram);
    assert!(resident.size_bytes > 0);
    assert_eq!(status.placements[0].phase, NodePlacementPhase::Ready);

    // Served by name and by namespace/name, with the deployment's defaults.
    let (code, body) = post(
        &n.api,
        "/v1/images/generations",
        &json!({"model": "painter", "prompt": "a lighthouse", "seed": 1}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        png_size(body["data"][0]["b64_json"].as_str().unwrap()),
        (64, 64)
    );
    let (code, _) = post(
        &n.api,
        "/v1/images/generations",
        &json!({"model": "ml/painter", "prompt": "x", "size": "64x64", "steps": 1}),
    )
    .await;
    assert_eq!(code, 200);
    let (code, body) = post(
        &n.api,
        "/v1/images/generations",
        &json!({"model": "tiny", "prompt": "x"}),
    )
    .await;
    assert_eq!(
        code, 404,
        "in cluster mode only placed deployments are served: {body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not served here"));

    // The operator moves the placement away: no longer served, no longer pinned.
    let mut moved = md.clone();
    moved.status.as_mut().unwrap().placements[0].node = "n2".into();
    events
        .unbounded_send(Ok(watcher::Event::Apply(moved)))
        .unwrap();
    for _ in 0..100 {
        if n.agent.placements().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(n.agent.placements().is_empty());
    let (code, _) = post(
        &n.api,
        "/v1/images/generations",
        &json!({"model": "painter", "prompt": "x"}),
    )
    .await;
    assert_eq!(code, 404);
    assert!(
        n.agent.agent.cache.entries().iter().all(|e| !e.pinned),
        "released models are evictable"
    );
}

/// An agent on node `n1` with tiny-sdxl as `xl`, its refiner as
/// `xl-refiner`, tiny-sd1 as `tiny` and a VAE file as `vae/other.safetensors`.
async fn sdxl_node() -> Node {
    let n = node().await;
    let models = n._dir.path().join("models");
    copy_dir(&fixtures().join("tiny-sdxl"), &models.join("xl"));
    copy_dir(
        &fixtures().join("tiny-sdxl-refiner"),
        &models.join("xl-refiner"),
    );
    std::fs::create_dir_all(models.join("vae")).unwrap();
    std::fs::copy(
        fixtures().join("tiny-sd1-vae.safetensors"),
        models.join("vae/other.safetensors"),
    )
    .unwrap();
    n.agent.agent.catalog.rescan();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refiner_and_a_vae_are_warmed_with_the_model_and_finish_its_images() {
    let n = sdxl_node().await;
    let md = deployment(
        "xl",
        "xl",
        json!({"warmTier": "Vram", "refiner": "xl-refiner", "vae": "vae/other.safetensors",
               "defaults": {"steps": 5, "width": 64, "height": 64, "denoisingEnd": 0.7}}),
        &["n1"],
    );
    let wrong = deployment("sd", "tiny", json!({"refiner": "xl-refiner"}), &["n1"]);
    let events = follow(&n.agent, vec![md.clone(), wrong]);
    let p = settled(&n.agent, "ml/xl").await;
    assert_eq!(p.phase, NodePlacementPhase::Ready, "{p:?}");
    let pinned = |n: &Node| -> Vec<String> {
        let mut v: Vec<String> = n
            .agent
            .agent
            .cache
            .entries()
            .into_iter()
            .filter(|e| e.tier == TierKind::Device && e.pinned)
            .map(|e| e.key.to_string())
            .collect();
        v.sort();
        v
    };
    let warm = pinned(&n);
    assert_eq!(
        warm.len(),
        4 + 3 + 1,
        "model, refiner and VAE kept warm: {warm:?}"
    );
    assert!(
        warm.iter().all(|k| k.ends_with("(f32)")),
        "the CPU holds F32: {warm:?}"
    );
    let p = settled(&n.agent, "ml/sd").await;
    assert_eq!(p.phase, NodePlacementPhase::Failed, "{p:?}");
    let message = p.message.unwrap_or_default();
    assert!(
        message.contains("spec.refiner \"xl-refiner\"") && message.contains("not Sd1"),
        "{message}"
    );

    // The deployment's refiner and switch apply; a request may skip the refiner.
    let body = json!({"model": "xl", "prompt": "a red cat", "seed": 3});
    let (code, refined) = post(&n.api, "/v1/images/generations", &body).await;
    assert_eq!(code, 200, "{refined}");
    let mut skip = body.clone();
    skip["denoising_end"] = json!(1.0);
    let (code, alone) = post(&n.api, "/v1/images/generations", &skip).await;
    assert_eq!(code, 200, "{alone}");
    assert_ne!(refined["data"][0], alone["data"][0]);

    // Moved away: nothing stays pinned.
    let mut moved = md.clone();
    moved.status.as_mut().unwrap().placements[0].node = "n2".into();
    events
        .unbounded_send(Ok(watcher::Event::Apply(moved)))
        .unwrap();
    for _ in 0..100 {
        if pinned(&n).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pinned(&n).is_empty(), "{:?}", pinned(&n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlnets_and_an_ip_adapter_are_warmed_with_the_model() {
    let n = node().await;
    let models = n._dir.path().join("models");
    let cn = fixtures().join("tiny-sd1-controlnet");
    copy_dir(&cn.join("controlnet-a"), &models.join("cn/a"));
    std::fs::copy(
        cn.join("controlnet-a.safetensors"),
        models.join("cn/a-single.safetensors"),
    )
    .unwrap();
    copy_dir(
        &fixtures().join("tiny-sd1-t2i-adapter/adapter"),
        &models.join("t2i"),
    );
    copy_dir(&fixtures().join("tiny-sd1-ip-adapter"), &models.join("ip"));
    copy_dir(
        &fixtures().join("tiny-sdxl-controlnet/controlnet-a"),
        &models.join("cn/xl"),
    );
    n.agent.agent.catalog.rescan();
    let md = deployment(
        "sd",
        "tiny",
        json!({"warmTier": "Ram", "controlnets": ["cn/a", "cn/a-single.safetensors", "t2i"],
               "ipAdapter": {"path": "ip/ip-adapter.safetensors"}}),
        &["n1"],
    );
    let wrong = deployment("wrong", "tiny", json!({"controlnets": ["cn/xl"]}), &["n1"]);
    let _events = follow(&n.agent, vec![md, wrong]);
    let p = settled(&n.agent, "ml/sd").await;
    assert_eq!(p.phase, NodePlacementPhase::Ready, "{p:?}");
    let pinned: Vec<String> = n
        .agent
        .agent
        .cache
        .entries()
        .into_iter()
        .filter(|e| e.tier == TierKind::Ram && e.pinned)
        .map(|e| e.key.to_string())
        .collect();
    for part in [
        "cn/a",
        "converted",
        "t2i",
        "ip-adapter.safetensors",
        "image_encoder",
    ] {
        assert!(
            pinned.iter().any(|k| k.contains(part)),
            "{part} warm: {pinned:?}"
        );
    }
    assert_eq!(
        pinned.len(),
        3 + 5,
        "the model's components and the five: {pinned:?}"
    );
    let p = settled(&n.agent, "ml/wrong").await;
    assert_eq!(p.phase, NodePlacementPhase::Failed, "{p:?}");
    let message = p.message.unwrap_or_default();
    assert!(
        message.contains("spec.controlnets[0]") && message.contains("Sdxl"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_hash_is_verified_before_ready() {
    let n = node().await;
    let wrong = "0".repeat(64);
    let _events = follow(
        &n.agent,
        vec![deployment(
            "pinned",
            "tiny",
            json!({"model": {"path": "tiny", "sha256": wrong}}),
            &["n1"],
        )],
    );
    let p = settled(&n.agent, "ml/pinned").await;
    assert_eq!(p.phase, NodePlacementPhase::Failed);
    let msg = p.message.unwrap();
    assert!(
        msg.contains("sha256 mismatch") && msg.contains(&wrong),
        "{msg}"
    );
    let have = msg.rsplit(' ').next().unwrap().to_string();
    assert_eq!(have.len(), 64, "both hashes are named: {msg}");
    let (code, _) = post(
        &n.api,
        "/v1/images/generations",
        &json!({"model": "pinned", "prompt": "x"}),
    )
    .await;
    assert_eq!(code, 404, "a Failed placement is not served");

    // With the right hash it becomes Ready, and the verified hash is reported.
    let n2 = node().await;
    let _events = follow(
        &n2.agent,
        vec![deployment(
            "pinned",
            "tiny",
            json!({"model": {"path": "tiny", "sha256": have.to_uppercase()}}),
            &["n1"],
        )],
    );
    let p = settled(&n2.agent, "ml/pinned").await;
    assert_eq!(p.phase, NodePlacementPhase::Ready, "{p:?}");
    let status = n2.agent.status();
    assert_eq!(
        status.local_models[0].sha256.as_deref(),
        Some(have.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_no_node_has_are_downloaded_from_s3_converted_and_served() {
    // A diffusers folder, and a single-file checkpoint with the folder of
    // configs its tiny architecture needs beside it.
    let folder = files(&fixtures().join("tiny-sd1"));
    let mut objects: Vec<(String, Vec<u8>)> = folder
        .iter()
        .map(|(rel, b)| (format!("sd/tiny-sd1/{rel}"), b.clone()))
        .collect();
    objects.push((
        "ckpt/tiny/tiny.safetensors".into(),
        std::fs::read(fixtures().join("tiny-sd1-single.safetensors")).unwrap(),
    ));
    objects.extend(
        folder
            .iter()
            .filter(|(rel, _)| !rel.ends_with(".safetensors"))
            .map(|(rel, b)| (format!("ckpt/tiny/tiny.config/{rel}"), b.clone())),
    );
    let s3 = tokio::task::spawn_blocking(move || {
        let s3 = Seaweed::start();
        s3.upload(&objects);
        s3
    })
    .await
    .unwrap();
    let folder_bytes: u64 = folder.iter().map(|(_, b)| b.len() as u64).sum();

    let n = node_with(false, Some(8 * folder_bytes)).await;
    // The API server answers only the credentials Secret.
    let (client, mut handle) = mock();
    n.agent.use_client(client);
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let labelled = json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "s3-keys", "namespace": "modelcache",
                    "labels": {"modelcache.io/source-credentials": "true"}},
                "stringData": {}, "data": {
                    "AWS_ACCESS_KEY_ID": base64(KEY),
                    "AWS_SECRET_ACCESS_KEY": base64(SECRET)}});
            match req.uri().path() {
                "/api/v1/namespaces/modelcache/secrets/s3-keys" => reply(send, 200, &labelled),
                _ => reply(
                    send,
                    404,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "secrets not found"}),
                ),
            }
        }
    });
    let remote = |name: &str, path: &str, url: &str, extra: Value| {
        let mut model = json!({"path": path, "source": {"url": url, "endpoint": s3.endpoint, "secretName": "s3-keys"}});
        let m = model.as_object_mut().unwrap();
        m.extend(extra.as_object().unwrap().clone());
        deployment(
            name,
            path,
            json!({"model": model, "defaults": {"steps": 2, "width": 64, "height": 64}}),
            &["n1"],
        )
    };
    let wrong = "0".repeat(64);
    let _events = follow(
        &n.agent,
        vec![
            remote("folder", "hub/tiny", "s3://models/sd/tiny-sd1", json!({})),
            remote("twice", "hub/tiny", "s3://models/sd/tiny-sd1", json!({})),
            remote("ckpt", "hub/ckpt", "s3://models/ckpt/tiny", json!({})),
            remote(
                "pinned",
                "hub/pinned",
                "s3://models/sd/tiny-sd1",
                json!({"sha256": wrong}),
            ),
            remote(
                "nokeys",
                "hub/other",
                "s3://models/sd/tiny-sd1",
                json!({"source": {"url": "s3://models/sd/tiny-sd1", "endpoint": s3.endpoint, "secretName": "absent"}}),
            ),
        ],
    );
    for key in ["ml/folder", "ml/twice", "ml/ckpt"] {
        let p = settled(&n.agent, key).await;
        assert_eq!(p.phase, NodePlacementPhase::Ready, "{p:?}");
        assert_eq!(p.download, None, "progress is shown only while downloading");
    }
    let status = n.agent.status();
    let format = |path: &str| {
        status
            .local_models
            .iter()
            .find(|l| l.path == path)
            .map(|l| l.format)
    };
    assert_eq!(format("hub/tiny"), Some(ModelFormat::Diffusers));
    assert_eq!(
        format("hub/ckpt"),
        Some(ModelFormat::Checkpoint),
        "reported under the deployment's path"
    );
    for model in ["folder", "ckpt"] {
        let (code, body) = post(
            &n.api,
            "/v1/images/generations",
            &json!({"model": model, "prompt": "a lighthouse"}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            png_size(body["data"][0]["b64_json"].as_str().unwrap()),
            (64, 64)
        );
    }

    // A pinned hash the download does not have: both hashes, nothing left behind.
    let p = settled(&n.agent, "ml/pinned").await;
    assert_eq!(p.phase, NodePlacementPhase::Failed);
    let msg = p.message.unwrap_or_default();
    assert!(
        msg.contains(&wrong) && msg.contains("the download was deleted"),
        "{msg}"
    );
    let downloads = n._dir.path().join("models/.modelcache/downloads/hub");
    let mut left: Vec<String> = std::fs::read_dir(&downloads)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["ckpt", "tiny"], "only the good downloads stay");

    // A Secret that is not there: named, with nothing secret in the message.
    let p = settled(&n.agent, "ml/nokeys").await;
    let msg = p.message.unwrap_or_default();
    assert!(msg.contains("\"absent\"") && !msg.contains(SECRET), "{msg}");

    // Two placements of one model, one download: three in all succeeded.
    let metrics = n.agent.agent.metrics.render();
    assert!(
        metrics.contains("modelcache_downloads_total{result=\"ok\",source=\"s3\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modelcache_disk_cache_capacity_bytes"),
        "{metrics}"
    );
}

fn base64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_fails_with_an_actionable_message_and_watch_errors_are_survived() {
    let n = node().await;
    let events = follow(&n.agent, vec![]);
    events
        .unbounded_send(Err(watcher::Error::NoResourceVersion))
        .unwrap();
    events
        .unbounded_send(Ok(watcher::Event::Apply(deployment(
            "ghost",
            "sdxl/nope.safetensors",
            json!({}),
            &["n1"],
        ))))
        .unwrap();
    let p = settled(&n.agent, "ml/ghost").await;
    assert_eq!(p.phase, NodePlacementPhase::Failed);
    let msg = p.message.unwrap();
    assert!(
        msg.contains("\"sdxl/nope.safetensors\"") && msg.contains("models folder"),
        "{msg}"
    );

    // A model copied in after the agent started is found on the next attempt.
    let root = n.agent.agent.catalog.root().to_path_buf();
    copy_dir(&fixtures().join("tiny-sd1"), &root.join("late"));
    tokio::time::sleep(Duration::from_millis(5200)).await;
    events
        .unbounded_send(Ok(watcher::Event::Apply(deployment(
            "late",
            "late",
            json!({}),
            &["n1"],
        ))))
        .unwrap();
    let p = settled(&n.agent, "ml/late").await;
    assert_eq!(p.phase, NodePlacementPhase::Ready, "{p:?}");
    assert!(
        n.agent
            .status()
            .local_models
            .iter()
            .any(|l| l.path == "late"),
        "reported to the operator too"
    );
}

fn mock() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

async fn next(
    handle: &mut Handle,
) -> (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("a request in time")
        .expect("client alive")
}

async fn json_body(req: Request<Body>) -> Value {
    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap()
}

fn reply(send: tower_test::mock::SendResponse<Response<Body>>, code: u16, v: &Value) {
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(v).unwrap()))
            .unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_node_status_is_applied_and_retried_after_api_errors() {
    let n = node().await;
    let (client, mut handle) = mock();
    tokio::spawn(n.agent.clone().report(client));

    // The API server is away at first: the agent backs off and tries again.
    let (req, send) = next(&mut handle).await;
    assert_eq!(
        (req.method(), req.uri().path()),
        (&Method::PATCH, "/apis/modelcache.io/v1alpha1/modelnodes/n1")
    );
    reply(
        send,
        503,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "message": "apiserver unavailable", "reason": "ServiceUnavailable"}),
    );

    let (req, send) = next(&mut handle).await;
    assert_eq!(
        (req.method(), req.uri().path()),
        (&Method::PATCH, "/apis/modelcache.io/v1alpha1/modelnodes/n1")
    );
    let query = req.uri().query().unwrap_or_default().to_string();
    assert!(
        query.contains("fieldManager=modelcache-agent") && query.contains("force=true"),
        "{query}"
    );
    let obj = json_body(req).await;
    assert_eq!(obj["spec"], json!({}));
    reply(
        send,
        200,
        &json!({"apiVersion": "modelcache.io/v1alpha1", "kind": "ModelNode", "metadata": {"name": "n1"}, "spec": {}}),
    );

    let (req, send) = next(&mut handle).await;
    assert_eq!(
        (req.method(), req.uri().path()),
        (
            &Method::PATCH,
            "/apis/modelcache.io/v1alpha1/modelnodes/n1/status"
        )
    );
    let patch = json_body(req).await;
    let status = &patch["status"];
    assert_eq!(status["agent"]["endpoint"], "10.1.2.3:8080");
    assert_eq!(status["localModels"][0]["path"], "tiny");
    assert_eq!(status["localModels"][0]["base"], "Sd1");
    assert_eq!(status["devices"][0]["id"], "cpu");
    assert_eq!(status["cache"]["ramCapacityBytes"], 256 << 20);
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert!(status["memory"]["mmapThresholdBytes"].is_number());
    reply(
        send,
        200,
        &json!({"apiVersion": "modelcache.io/v1alpha1", "kind": "ModelNode", "metadata": {"name": "n1"}, "spec": {}, "status": status}),
    );

    // Nothing changed: no heartbeat writes.
    let quiet = tokio::time::timeout(Duration::from_millis(600), handle.next_request()).await;
    assert!(quiet.is_err(), "an unchanged status must not be rewritten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_lease_is_renewed_by_server_side_apply() {
    let n = node().await;
    let (client, mut handle) = mock();
    tokio::spawn(n.agent.clone().renew_lease(client));
    let mut renewals = Vec::new();
    for i in 0..2 {
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.method(), Method::PATCH);
        assert_eq!(
            req.uri().path(),
            "/apis/coordination.k8s.io/v1/namespaces/modelcache/leases/modelcache-node-n1"
        );
        let lease = json_body(req).await;
        assert_eq!(lease["spec"]["holderIdentity"], "agent-n1");
        assert_eq!(lease["spec"]["leaseDurationSeconds"], 40);
        renewals.push(lease["spec"]["renewTime"].as_str().unwrap().to_string());
        if i == 0 {
            // A failed renewal is retried, not fatal.
            reply(
                send,
                500,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "message": "etcd timeout", "reason": "InternalError"}),
            );
        } else {
            reply(send, 200, &lease);
        }
    }
    assert!(
        renewals[1] > renewals[0],
        "renewTime moves forward: {renewals:?}"
    );
    let third = next(&mut handle).await;
    drop(third);
}

#[tokio::test]
async fn desired_placements_follow_the_operator() {
    let mine = deployment(
        "a",
        "m",
        json!({"warmTier": "Vram", "loras": [{"path": "l.safetensors", "weight": 0.5}]}),
        &["n1", "n2"],
    );
    let mut gone = deployment("b", "m", json!({}), &["n1"]);
    gone.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let other = deployment("c", "m", json!({}), &["n2"]);
    let d = modelcache_agent::cluster::desired(
        "n1",
        &[Arc::new(mine), Arc::new(gone), Arc::new(other)],
    );
    assert_eq!(d.keys().collect::<Vec<_>>(), ["ml/a"]);
    assert_eq!(d["ml/a"].warm, WarmTier::Vram);
    assert_eq!(d["ml/a"].loras[0].weight, 0.5);
}
