//! Reconcile scenarios in the style of kube-rs's controller-rs: a tower-test
//! mock API server receives the controller's requests, and each scenario
//! verifies them in order (method, path, the bodies that matter) and answers
//! as the API server would. The last tests drive the whole Controller loop
//! (`Controller::for_stream` and `watches_stream`) from channels.

use futures::StreamExt;
use http::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer, ObjectRef};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use modelcache_crds::*;
use modelcache_operator::cluster::fixtures::{deployment, lease, local, model_node, G};
use modelcache_operator::controller::{self, Config, Context};
use modelcache_operator::metrics::Metrics;
use modelcache_operator::scheduler::Options;
use modelcache_operator::stores::Stores;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

struct Harness {
    ctx: Arc<Context>,
    handle: Handle,
    requeues: futures::stream::BoxStream<'static, ObjectRef<ModelDeployment>>,
    writers: Writers,
}

struct Writers {
    deployments: Writer<ModelDeployment>,
    model_nodes: Writer<ModelNode>,
    nodes: Writer<Node>,
    leases: Writer<Lease>,
}

fn harness() -> Harness {
    let mut h = harness_listing();
    synced(&mut h.writers.deployments);
    synced(&mut h.writers.model_nodes);
    synced(&mut h.writers.nodes);
    synced(&mut h.writers.leases);
    h
}

/// A harness whose caches are still in their first list, as in a fresh operator.
fn harness_listing() -> Harness {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(mock, "default");
    let (dr, dw) = reflector::store();
    let (mr, mw) = reflector::store();
    let (nr, nw) = reflector::store();
    let (lr, lw) = reflector::store();
    let stores = Stores {
        deployments: dr,
        model_nodes: mr,
        nodes: nr,
        leases: lr,
    };
    let config = Config {
        lease_expiry: Duration::from_secs(40),
        options: Options::default(),
        resync: Duration::from_secs(300),
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: OPERATOR_MANAGER.into(),
            instance: None,
        },
    );
    let (ctx, requeues) = Context::new(client, stores, config, Metrics::new().unwrap(), recorder);
    Harness {
        ctx,
        handle,
        requeues: requeues.boxed(),
        writers: Writers {
            deployments: dw,
            model_nodes: mw,
            nodes: nw,
            leases: lw,
        },
    }
}

/// Ends a store's first list (empty), as the watch's initial list does.
fn synced<K>(w: &mut Writer<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Default,
{
    w.apply_watcher_event(&watcher::Event::Init);
    w.apply_watcher_event(&watcher::Event::InitDone);
}

fn put<K>(w: &mut Writer<K>, obj: K)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Default,
{
    w.apply_watcher_event(&watcher::Event::Apply(obj));
}

/// Three healthy agents; all have `sd15` on disk (1 G parameters = 2 GiB at F16).
fn cluster(h: &mut Harness) {
    for (n, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")] {
        put(
            &mut h.writers.model_nodes,
            model_node(n, ip, 24, vec![local("sd15", G)]),
        );
        put(&mut h.writers.leases, lease(n, 1));
    }
}

async fn body(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.unwrap();
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    }
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, v: &Value) {
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(v).unwrap()))
            .unwrap(),
    );
}

/// Takes the next request, checks method and path, answers with `reply(body)`.
async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
    reply: impl FnOnce(&Value) -> Value,
) -> Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("expected {method} {path}, got nothing"))
        .expect("client dropped");
    assert_eq!(req.method(), method, "method of {}", req.uri());
    assert_eq!(req.uri().path(), path);
    let b = body(req).await;
    respond(send, &reply(&b));
    b
}

fn echo(b: &Value) -> Value {
    b.clone()
}

/// The events, Service, EndpointSlice and status requests of one apply reconcile.
/// Returns (event reasons, slice body, status body or None when not written).
async fn expect_apply(
    h: &mut Harness,
    md: &ModelDeployment,
    events: usize,
) -> (Vec<String>, Value, Option<Value>) {
    let mut reasons = Vec::new();
    for _ in 0..events {
        let ev = expect(
            &mut h.handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/ml/events",
            echo,
        )
        .await;
        reasons.push(ev["reason"].as_str().unwrap_or_default().to_string());
    }
    let name = md.name_any();
    let svc = expect(
        &mut h.handle,
        Method::PATCH,
        &format!("/api/v1/namespaces/ml/services/{name}"),
        echo,
    )
    .await;
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    assert!(
        svc["spec"].get("selector").is_none(),
        "the Service must have no selector"
    );
    let slice = expect(
        &mut h.handle,
        Method::PATCH,
        &format!("/apis/discovery.k8s.io/v1/namespaces/ml/endpointslices/{name}"),
        echo,
    )
    .await;
    let status_path =
        format!("/apis/modelcache.io/v1alpha1/namespaces/ml/modeldeployments/{name}/status");
    let next = tokio::time::timeout(Duration::from_millis(300), h.handle.next_request()).await;
    let status = match next {
        Ok(Some((req, send))) => {
            assert_eq!(
                (req.method(), req.uri().path()),
                (&Method::PATCH, status_path.as_str())
            );
            assert!(req
                .uri()
                .query()
                .unwrap_or_default()
                .contains("fieldManager=modelcache-operator"));
            let b = body(req).await;
            let mut out = serde_json::to_value(md).unwrap();
            out["status"] = b["status"].clone();
            respond(send, &out);
            Some(b["status"].clone())
        }
        Ok(None) => panic!("client dropped"),
        Err(_) => None,
    };
    (reasons, slice, status)
}

/// Runs one reconcile of `md` on its own task, so the test can answer its requests.
fn spawn_reconcile(
    h: &Harness,
    md: &ModelDeployment,
) -> tokio::task::JoinHandle<Result<Action, controller::Error>> {
    let (ctx, md) = (h.ctx.clone(), md.clone());
    tokio::spawn(async move { controller::reconcile(Arc::new(md), ctx).await })
}

/// One whole apply reconcile of `md`: its requests answered and checked by
/// [`expect_apply`], and the reconcile succeeding.
async fn reconcile_applying(
    h: &mut Harness,
    md: &ModelDeployment,
    events: usize,
) -> (Vec<String>, Value, Option<Value>) {
    let task = spawn_reconcile(h, md);
    let out = expect_apply(h, md, events).await;
    task.await.unwrap().unwrap();
    out
}

/// The JSON patch that takes an earlier version's finalizer off, answered.
async fn expect_legacy_finalizer_removed(h: &mut Harness, md: &ModelDeployment) {
    let patch = expect(
        &mut h.handle,
        Method::PATCH,
        &format!(
            "/apis/modelcache.io/v1alpha1/namespaces/ml/modeldeployments/{}",
            md.name_any()
        ),
        |_| {
            let mut m = serde_json::to_value(md).unwrap();
            m["metadata"]["finalizers"] = json!([]);
            m
        },
    )
    .await;
    assert_eq!(
        patch,
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": LEGACY_FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ])
    );
}

fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == t))
        .unwrap_or_else(|| panic!("no {t} condition in {status}"))
}

#[tokio::test]
async fn an_earlier_versions_finalizer_is_removed_and_the_deployment_reconciled() {
    let mut h = harness();
    cluster(&mut h);
    let mut md = deployment("sd15", "sd15", json!({}));
    md.metadata.finalizers = Some(vec![LEGACY_FINALIZER.into()]);
    let task = spawn_reconcile(&h, &md);
    expect_legacy_finalizer_removed(&mut h, &md).await;
    let (_, _, status) = expect_apply(&mut h, &md, 1).await;
    assert!(status.is_some(), "then reconciled as usual");
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_fresh_operator_acts_only_once_its_caches_have_listed() {
    // Before the first lists finish, every node would look gone and a
    // restarted operator would move placements that are fine.
    let mut h = harness_listing();
    let md = deployment("sd15", "sd15", json!({}));
    let task = spawn_reconcile(&h, &md);
    let early = tokio::time::timeout(Duration::from_millis(300), h.handle.next_request()).await;
    assert!(early.is_err(), "an API request before the caches listed");
    assert!(!task.is_finished());
    synced(&mut h.writers.deployments);
    synced(&mut h.writers.model_nodes);
    synced(&mut h.writers.nodes);
    synced(&mut h.writers.leases);
    cluster(&mut h);
    let (_, _, status) = expect_apply(&mut h, &md, 1).await;
    assert!(status.is_some());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn places_on_the_node_where_the_model_is_resident_and_writes_status() {
    let mut h = harness();
    cluster(&mut h);
    // b holds the model in RAM already: the cheapest place to make it ready.
    let mut b = model_node("b", "10.0.0.2", 24, vec![local("sd15", G)]);
    b.status.as_mut().unwrap().models.push(ResidentModel {
        path: "sd15".into(),
        tier: Tier::Ram,
        size_bytes: 2 * G,
        locked: false,
        last_used: None,
    });
    put(&mut h.writers.model_nodes, b);
    let md = deployment("sd15", "sd15", json!({"replicas": 1, "warmTier": "Ram"}));
    let task = spawn_reconcile(&h, &md);
    let (events, slice, status) = expect_apply(&mut h, &md, 1).await;
    assert_eq!(events, ["Scheduled"]);
    assert!(task.await.unwrap().is_ok());
    let status = status.expect("status written");
    assert_eq!(status["placements"][0]["node"], "b");
    assert_eq!(status["placements"][0]["role"], "Serving");
    assert_eq!(status["placements"][0]["phase"], "Assigned");
    assert_eq!(status["placements"][0]["tier"], "Ram");
    assert_eq!(status["model"]["sizeBytes"], 2 * G, "1 G parameters at F16");
    assert_eq!(status["model"]["base"], "Sd1");
    assert_eq!(status["ready"], "0/1");
    assert_eq!(status["serviceName"], "sd15");
    assert_eq!(condition(&status, "Resolved")["status"], "True");
    assert_eq!(condition(&status, "Scheduled")["status"], "True");
    assert_eq!(condition(&status, "Available")["reason"], "NoReadyReplicas");
    assert_eq!(condition(&status, "Progressing")["reason"], "Loading");
    // Not ready yet: nothing is routed.
    assert_eq!(slice["endpoints"], json!([]));
    assert_eq!(slice["metadata"]["labels"][SERVICE_NAME_LABEL], "sd15");
}

#[tokio::test]
async fn ready_placements_are_routed_and_an_unchanged_status_is_not_rewritten() {
    let mut h = harness();
    cluster(&mut h);
    let mut b = model_node("b", "10.0.0.2", 24, vec![local("sd15", G)]);
    b.status.as_mut().unwrap().placements.push(NodePlacement {
        deployment: "ml/sd15".into(),
        phase: NodePlacementPhase::Ready,
        tier: Tier::Vram,
        message: None,
        download: None,
    });
    put(&mut h.writers.model_nodes, b);
    let mut md = deployment("sd15", "sd15", json!({"replicas": 1}));
    md.status = Some(ModelDeploymentStatus {
        placements: vec![Placement {
            node: "b".into(),
            role: PlacementRole::Serving,
            phase: PlacementPhase::Assigned,
            tier: Tier::Disk,
            message: None,
            since: None,
            download: None,
        }],
        ..Default::default()
    });
    let (events, slice, status) = reconcile_applying(&mut h, &md, 0).await;
    assert!(
        events.is_empty(),
        "the placement did not move: no Scheduled event"
    );
    let status = status.expect("status written");
    assert_eq!(status["readyReplicas"], 1);
    assert_eq!(status["ready"], "1/1");
    assert_eq!(status["placements"][0]["phase"], "Ready");
    assert_eq!(status["placements"][0]["tier"], "Vram");
    assert_eq!(condition(&status, "Available")["status"], "True");
    assert_eq!(condition(&status, "Progressing")["reason"], "Complete");
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(slice["endpoints"][0]["addresses"], json!(["10.0.0.2"]));
    assert_eq!(slice["endpoints"][0]["nodeName"], "b");
    assert_eq!(slice["ports"][0]["port"], 8080);

    // Feeding the written status back changes nothing: no status write, no event.
    md.status = Some(serde_json::from_value(status).unwrap());
    let (events, _, status) = reconcile_applying(&mut h, &md, 0).await;
    assert!(events.is_empty());
    assert!(
        status.is_none(),
        "an unchanged status must not be written: {status:?}"
    );
}

#[tokio::test]
async fn a_missing_model_says_where_it_looked() {
    let mut h = harness();
    cluster(&mut h);
    let md = deployment("ghost", "sdxl/missing.safetensors", json!({}));
    let (events, _, status) = reconcile_applying(&mut h, &md, 1).await;
    assert_eq!(events, ["FailedResolve"]);
    let status = status.unwrap();
    let resolved = condition(&status, "Resolved");
    assert_eq!(
        (resolved["status"].as_str(), resolved["reason"].as_str()),
        (Some("False"), Some("ModelNotFound"))
    );
    let msg = resolved["message"].as_str().unwrap();
    assert!(
        msg.contains("\"sdxl/missing.safetensors\"")
            && msg.contains("a, b, c")
            && msg.contains("--models-dir"),
        "{msg}"
    );
    assert_eq!(
        condition(&status, "Scheduled")["reason"],
        "ModelNotResolved"
    );
    assert!(status.get("placements").is_none());
}

#[tokio::test]
async fn unschedulable_replicas_get_a_kube_scheduler_style_reason() {
    let mut h = harness();
    for (n, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")] {
        // 1 GiB of VRAM budget: the 2 GiB model fits nowhere.
        put(
            &mut h.writers.model_nodes,
            model_node(n, ip, 1, vec![local("sd15", G)]),
        );
        put(&mut h.writers.leases, lease(n, 1));
    }
    let md = deployment("sd15", "sd15", json!({"warmTier": "Vram"}));
    let (events, _, status) = reconcile_applying(&mut h, &md, 1).await;
    assert_eq!(events, ["FailedScheduling"]);
    let sched = condition(status.as_ref().unwrap(), "Scheduled");
    assert_eq!(sched["reason"], "InsufficientVram");
    assert!(
        sched["message"]
            .as_str()
            .unwrap()
            .contains("0/3 nodes are available: 3 Insufficient VRAM."),
        "{sched}"
    );
    let metrics = h.ctx.metrics.render();
    assert!(
        metrics.contains("modelcache_scheduler_decisions_total{result=\"unschedulable\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn placements_leave_a_node_whose_lease_expired() {
    let mut h = harness();
    cluster(&mut h);
    put(&mut h.writers.leases, lease("a", 120));
    let mut md = deployment("sd15", "sd15", json!({}));
    md.status = Some(ModelDeploymentStatus {
        placements: vec![Placement {
            node: "a".into(),
            role: PlacementRole::Serving,
            phase: PlacementPhase::Ready,
            tier: Tier::Vram,
            message: None,
            since: None,
            download: None,
        }],
        ..Default::default()
    });
    let (events, slice, status) = reconcile_applying(&mut h, &md, 1).await;
    assert_eq!(events, ["Scheduled"]);
    let node = status.unwrap()["placements"][0]["node"].clone();
    assert!(node == "b" || node == "c", "moved off a: {node}");
    assert_eq!(slice["endpoints"], json!([]), "a is no longer routed");
}

#[tokio::test]
async fn a_cordoned_node_keeps_nothing_new() {
    let mut h = harness();
    cluster(&mut h);
    for n in ["a", "b"] {
        let mut node = Node::default();
        node.metadata.name = Some(n.into());
        node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        put(&mut h.writers.nodes, node);
    }
    let md = deployment("sd15", "sd15", json!({}));
    let (_, _, status) = reconcile_applying(&mut h, &md, 1).await;
    assert_eq!(status.unwrap()["placements"][0]["node"], "c");
}

#[tokio::test]
async fn higher_priority_preempts_and_both_deployments_say_why() {
    let mut h = harness();
    // One node with room for one 2 GiB warm copy in VRAM.
    put(
        &mut h.writers.model_nodes,
        model_node("a", "10.0.0.1", 3, vec![local("low", G), local("high", G)]),
    );
    put(&mut h.writers.leases, lease("a", 1));
    let mut low = deployment("low", "low", json!({"warmTier": "Vram", "priority": -5}));
    low.status = Some(ModelDeploymentStatus {
        model: Some(ModelInfo {
            model_type: ModelType::Main,
            base: BaseModel::Sd1,
            variant: None,
            format: ModelFormat::Checkpoint,
            prediction_type: None,
            size_bytes: 2 * G,
            cpu_size_bytes: None,
            ram_size_bytes: None,
            tensor_count: 1,
        }),
        placements: vec![Placement {
            node: "a".into(),
            role: PlacementRole::Serving,
            phase: PlacementPhase::Ready,
            tier: Tier::Vram,
            message: None,
            since: None,
            download: None,
        }],
        ..Default::default()
    });
    put(&mut h.writers.deployments, low.clone());
    let high = deployment("high", "high", json!({"warmTier": "Vram", "priority": 100}));
    put(&mut h.writers.deployments, high.clone());

    let task = spawn_reconcile(&h, &high);
    // The victim hears first, then the preemptor's own placement.
    let ev = expect(
        &mut h.handle,
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/ml/events",
        echo,
    )
    .await;
    assert_eq!(
        (ev["reason"].as_str(), ev["regarding"]["name"].as_str()),
        (Some("Preempted"), Some("low"))
    );
    assert!(
        ev["note"]
            .as_str()
            .unwrap()
            .contains("preempted by ml/high"),
        "{ev}"
    );
    let (events, _, status) = expect_apply(&mut h, &high, 1).await;
    task.await.unwrap().unwrap();
    assert_eq!(events, ["Scheduled"]);
    let status = status.unwrap();
    assert_eq!(status["placements"][0]["node"], "a");
    assert!(condition(&status, "Scheduled")["message"]
        .as_str()
        .unwrap()
        .contains("preempted warm reservations of ml/low"));
    // The victim was requeued…
    let requeued = tokio::time::timeout(Duration::from_secs(1), h.requeues.next())
        .await
        .unwrap();
    assert_eq!(requeued, Some(ObjectRef::from_obj(&low)));

    // …and its reconcile, with high now holding the node, gives the reason.
    let mut high_now = high.clone();
    high_now.status = Some(serde_json::from_value(status).unwrap());
    put(&mut h.writers.deployments, high_now);
    let (events, _, status) = reconcile_applying(&mut h, &low, 1).await;
    assert_eq!(events, ["FailedScheduling"]);
    let sched = condition(status.as_ref().unwrap(), "Scheduled");
    assert_eq!(sched["reason"], "Preempted");
    assert!(
        sched["message"]
            .as_str()
            .unwrap()
            .contains("higher-priority ml/high"),
        "{sched}"
    );
    assert!(
        status.unwrap().get("placements").is_none(),
        "no placement left"
    );
}

#[tokio::test]
async fn a_deleted_deployment_is_left_to_the_garbage_collector() {
    // Owner references make the Service and EndpointSlice go with it; the
    // operator only takes off an earlier version's finalizer, so deletion
    // never waits for it.
    let mut h = harness();
    cluster(&mut h);
    let mut md = deployment("sd15", "sd15", json!({}));
    md.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    md.metadata.finalizers = Some(vec![LEGACY_FINALIZER.into()]);
    let task = spawn_reconcile(&h, &md);
    expect_legacy_finalizer_removed(&mut h, &md).await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    let more = tokio::time::timeout(Duration::from_millis(200), h.handle.next_request()).await;
    assert!(more.is_err(), "nothing else is written or deleted");
}

#[tokio::test]
async fn api_errors_are_returned_for_the_error_policy() {
    let mut h = harness();
    cluster(&mut h);
    let md = deployment("sd15", "sd15", json!({}));
    let task = spawn_reconcile(&h, &md);
    expect(
        &mut h.handle,
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/ml/events",
        echo,
    )
    .await;
    let (_, send) = h.handle.next_request().await.unwrap();
    send.send_response(
        Response::builder()
            .status(500)
            .body(Body::from(
                serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd down", "reason": "InternalError", "code": 500})).unwrap(),
            ))
            .unwrap(),
    );
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("etcd down"), "{err}");
    let action = controller::error_policy(Arc::new(md), &err, h.ctx.clone());
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert!(h
        .ctx
        .metrics
        .render()
        .contains("modelcache_reconcile_errors_total 1"));
}

/// Answers every request the way the API server would for these tests.
async fn serve_generically(
    mut handle: Handle,
    md: ModelDeployment,
    statuses: tokio::sync::mpsc::UnboundedSender<Value>,
) {
    while let Some((req, send)) = handle.next_request().await {
        let path = req.uri().path().to_string();
        let b = body(req).await;
        if path.ends_with("/status") {
            let _ = statuses.send(b["status"].clone());
            let mut out = serde_json::to_value(&md).unwrap();
            out["status"] = b["status"].clone();
            respond(send, &out);
        } else {
            respond(send, &b);
        }
    }
}

#[tokio::test]
async fn the_controller_loop_reacts_to_deployments_and_agent_reports() {
    let mut h = harness();
    cluster(&mut h);
    let md = deployment("sd15", "sd15", json!({}));
    let (statuses_tx, mut statuses) = tokio::sync::mpsc::unbounded_channel();
    let Harness {
        ctx,
        handle,
        requeues,
        writers,
    } = h;
    let Writers {
        deployments: dw,
        mut model_nodes,
        ..
    } = writers;
    tokio::spawn(serve_generically(handle, md.clone(), statuses_tx));

    let (md_tx, md_rx) = futures::channel::mpsc::unbounded::<watcher::Event<ModelDeployment>>();
    let (mn_tx, mn_rx) = futures::channel::mpsc::unbounded::<ModelNode>();
    let (_node_tx, node_rx) = futures::channel::mpsc::unbounded::<Node>();
    let deployments =
        reflector::reflector(dw, md_rx.map(Ok::<_, watcher::Error>)).applied_objects();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ctx2 = ctx.clone();
    let run = tokio::spawn(
        controller::controller(
            ctx2,
            deployments,
            mn_rx.map(Ok),
            node_rx.map(Ok),
            requeues,
            async move {
                let _ = stop_rx.await;
            },
        )
        .for_each(|_| async {}),
    );

    // The initial list holds a new deployment, which is placed.
    md_tx.unbounded_send(watcher::Event::Init).unwrap();
    md_tx
        .unbounded_send(watcher::Event::InitApply(md.clone()))
        .unwrap();
    md_tx.unbounded_send(watcher::Event::InitDone).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), statuses.recv())
        .await
        .unwrap()
        .unwrap();
    let node = first["placements"][0]["node"].as_str().unwrap().to_string();
    assert_eq!(first["placements"][0]["phase"], "Assigned");

    // The status write comes back through the watch…
    let mut placed = md.clone();
    placed.status = Some(serde_json::from_value(first).unwrap());
    placed.metadata.resource_version = Some("2".into());
    md_tx.unbounded_send(watcher::Event::Apply(placed)).unwrap();

    // …and when that node's agent reports the model Ready, the deployment follows.
    let ip = match node.as_str() {
        "a" => "10.0.0.1",
        "b" => "10.0.0.2",
        _ => "10.0.0.3",
    };
    let mut mn = model_node(&node, ip, 24, vec![local("sd15", G)]);
    mn.status.as_mut().unwrap().placements.push(NodePlacement {
        deployment: "ml/sd15".into(),
        phase: NodePlacementPhase::Ready,
        tier: Tier::Vram,
        message: None,
        download: None,
    });
    put(&mut model_nodes, mn.clone());
    mn_tx.unbounded_send(mn).unwrap();
    let ready = loop {
        let s = tokio::time::timeout(Duration::from_secs(5), statuses.recv())
            .await
            .unwrap()
            .unwrap();
        if s["readyReplicas"] == 1 {
            break s;
        }
    };
    assert_eq!(ready["placements"][0]["node"], node.as_str());
    assert_eq!(condition(&ready, "Available")["status"], "True");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap();
    let m = ctx.metrics.render();
    assert!(
        m.contains("modelcache_reconcile_duration_seconds_count"),
        "{m}"
    );
}
