//! Leader election against a tower-test mock API server: who may take the
//! Lease and when (on this replica's clock, never the holder's timestamps),
//! that every takeover is an optimistic-concurrency replace, and that a leader
//! whose API server stops answering stops within its renew deadline. The
//! timing is scaled down to a 1.5 s lease (1 s renew deadline, 200 ms retry).

use http::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::{Api, Client};
use modelcache_operator::leader::{ElectionError, LeaderElector, Timing};
use serde_json::{json, Value};
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn elector() -> (LeaderElector, Handle) {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api: Api<Lease> = Api::namespaced(Client::new(mock, "default"), "modelcache");
    (LeaderElector::new(api, "leader", "me", timing()), handle)
}

fn timing() -> Timing {
    Timing::from_lease(Duration::from_millis(1500))
}

const LIMIT: Duration = Duration::from_millis(300);

fn lease(holder: &str, renewed_secs_ago: i64) -> Value {
    // A fixed clock: the same arguments give the same record.
    let base: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
    let t = base - SignedDuration::from_secs(renewed_secs_ago);
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "leader", "namespace": "modelcache", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 1, "renewTime": t.to_string(), "leaseTransitions": 2}
    })
}

async fn answer(handle: &mut Handle, method: Method, status: u16, reply: Value) -> Value {
    let (req, send) = handle.next_request().await.expect("a request");
    assert_eq!(req.method(), method, "{}", req.uri());
    assert_eq!(
        req.uri().path().trim_end_matches("/leader"),
        "/apis/coordination.k8s.io/v1/namespaces/modelcache/leases"
    );
    let bytes = req.into_body().collect_bytes().await.unwrap();
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    }
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

#[tokio::test]
async fn creates_the_lease_when_there_is_none() {
    let (e, mut h) = elector();
    let t = tokio::spawn(async move { e.try_acquire_or_renew(LIMIT).await });
    answer(&mut h, Method::GET, 404, not_found()).await;
    let created = answer(&mut h, Method::POST, 201, lease("me", 0)).await;
    assert_eq!(created["spec"]["holderIdentity"], "me");
    assert!(t.await.unwrap().unwrap());
}

#[tokio::test]
async fn stands_by_while_another_holder_renews() {
    let (e, mut h) = elector();
    let t = tokio::spawn(async move { e.try_acquire_or_renew(LIMIT).await });
    answer(&mut h, Method::GET, 200, lease("other", 3)).await;
    assert!(
        !t.await.unwrap().unwrap(),
        "a fresh lease of another holder is respected"
    );
}

#[tokio::test]
async fn takes_over_a_lease_unchanged_for_its_duration_with_its_resource_version() {
    let (e, mut h) = elector();
    let e = std::sync::Arc::new(e);
    // Renewed long ago by the holder's clock: not a reason to take over before
    // this replica has seen the record unchanged for a whole lease duration.
    let first = tokio::spawn({
        let e = e.clone();
        async move { e.try_acquire_or_renew(LIMIT).await }
    });
    answer(&mut h, Method::GET, 200, lease("other", 3600)).await;
    assert!(!first.await.unwrap().unwrap(), "first sight: not expired");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let early = tokio::spawn({
        let e = e.clone();
        async move { e.try_acquire_or_renew(LIMIT).await }
    });
    answer(&mut h, Method::GET, 200, lease("other", 3600)).await;
    assert!(!early.await.unwrap().unwrap(), "0.7 s unchanged: not yet");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let t = tokio::spawn(async move { e.try_acquire_or_renew(LIMIT).await });
    answer(&mut h, Method::GET, 200, lease("other", 3600)).await;
    let put = answer(&mut h, Method::PUT, 200, lease("me", 0)).await;
    assert_eq!(
        put["metadata"]["resourceVersion"], "7",
        "replace is conditional on what was read"
    );
    assert_eq!(put["spec"]["holderIdentity"], "me");
    assert_eq!(put["spec"]["leaseTransitions"], 3);
    assert!(t.await.unwrap().unwrap());
}

#[tokio::test]
async fn a_holder_that_keeps_renewing_is_never_taken_over_whatever_its_clock_says() {
    let (e, mut h) = elector();
    let e = std::sync::Arc::new(e);
    for i in 0..8 {
        let t = tokio::spawn({
            let e = e.clone();
            async move { e.try_acquire_or_renew(LIMIT).await }
        });
        // A holder whose clock is an hour behind, renewing every 200 ms.
        answer(&mut h, Method::GET, 200, lease("other", 3600 - i)).await;
        assert!(!t.await.unwrap().unwrap(), "round {i}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn losing_the_race_for_an_expired_lease_is_not_an_error() {
    let (e, mut h) = elector();
    let e = std::sync::Arc::new(e);
    let first = tokio::spawn({
        let e = e.clone();
        async move { e.try_acquire_or_renew(LIMIT).await }
    });
    answer(&mut h, Method::GET, 200, lease("other", 60)).await;
    assert!(!first.await.unwrap().unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t = tokio::spawn(async move { e.try_acquire_or_renew(LIMIT).await });
    answer(&mut h, Method::GET, 200, lease("other", 60)).await;
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"});
    answer(&mut h, Method::PUT, 409, conflict).await;
    assert!(!t.await.unwrap().unwrap());
}

#[tokio::test]
async fn an_api_server_that_does_not_answer_is_a_timeout_not_a_hang() {
    let (e, mut h) = elector();
    let t = tokio::spawn(async move { e.try_acquire_or_renew(LIMIT).await });
    let (_req, _never_answered) = h.next_request().await.expect("a request");
    let started = tokio::time::Instant::now();
    let result = t.await.unwrap();
    assert!(
        matches!(result, Err(ElectionError::Timeout(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < LIMIT * 2, "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_stops_within_its_renew_deadline() {
    let (e, mut h) = elector();
    let renewed = tokio::time::Instant::now();
    let held = tokio::spawn(async move { e.hold(renewed).await });
    // Requests arrive and are never answered.
    let mut pending = Vec::new();
    while !held.is_finished() {
        tokio::select! {
            r = h.next_request() => pending.extend(r),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let stopped = renewed.elapsed();
    assert!(
        stopped <= timing().renew_deadline + Duration::from_millis(100),
        "stopped {stopped:?} after its last renewal"
    );
    assert!(
        stopped < timing().lease,
        "a standby may take over only after {:?}",
        timing().lease
    );
    assert!(!pending.is_empty(), "it kept trying until then");
}

#[tokio::test]
async fn release_hands_the_lease_over_at_once() {
    let (e, mut h) = elector();
    let t = tokio::spawn(async move { e.release().await });
    answer(&mut h, Method::GET, 200, lease("me", 1)).await;
    let put = answer(&mut h, Method::PUT, 200, lease("", 0)).await;
    assert!(put["spec"]
        .get("holderIdentity")
        .is_none_or(|v| v.is_null()));
    assert_eq!(put["spec"]["leaseDurationSeconds"], 1);
    t.await.unwrap();
}
