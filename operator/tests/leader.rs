//! Leader election against a tower-test mock API server: who may take the
//! Lease, and that every takeover is an optimistic-concurrency replace.

use http::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::{Api, Client};
use modelcache_operator::leader::LeaderElector;
use serde_json::{json, Value};
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn elector() -> (LeaderElector, Handle) {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api: Api<Lease> = Api::namespaced(Client::new(mock, "default"), "modelcache");
    (
        LeaderElector::new(api, "leader", "me", Duration::from_secs(15)),
        handle,
    )
}

fn lease(holder: &str, renewed_secs_ago: i64) -> Value {
    let t = Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago);
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "leader", "namespace": "modelcache", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": t.to_string(), "leaseTransitions": 2}
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
    let t = tokio::spawn(async move { e.try_acquire_or_renew().await });
    answer(&mut h, Method::GET, 404, not_found()).await;
    let created = answer(&mut h, Method::POST, 201, lease("me", 0)).await;
    assert_eq!(created["spec"]["holderIdentity"], "me");
    assert!(t.await.unwrap().unwrap());
}

#[tokio::test]
async fn stands_by_while_another_holder_renews() {
    let (e, mut h) = elector();
    let t = tokio::spawn(async move { e.try_acquire_or_renew().await });
    answer(&mut h, Method::GET, 200, lease("other", 3)).await;
    assert!(
        !t.await.unwrap().unwrap(),
        "a fresh lease of another holder is respected"
    );
}

#[tokio::test]
async fn takes_over_an_expired_lease_with_its_resource_version() {
    let (e, mut h) = elector();
    let t = tokio::spawn(async move { e.try_acquire_or_renew().await });
    answer(&mut h, Method::GET, 200, lease("other", 60)).await;
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
async fn losing_the_race_for_an_expired_lease_is_not_an_error() {
    let (e, mut h) = elector();
    let t = tokio::spawn(async move { e.try_acquire_or_renew().await });
    answer(&mut h, Method::GET, 200, lease("other", 60)).await;
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"});
    answer(&mut h, Method::PUT, 409, conflict).await;
    assert!(!t.await.unwrap().unwrap());
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
