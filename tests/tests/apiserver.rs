//! The emulated API server, driven by kube-rs's own client as the operator and
//! agents drive it: the Kubernetes behaviours the end-to-end test relies on.

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config};
use modelcache_crds::ModelDeployment;
use modelcache_tests::apiserver::ApiServer;
use serde_json::json;
use std::time::Duration;

async fn client(api: &ApiServer) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let path = api.kubeconfig(dir.path());
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let cfg = Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    Client::try_from(cfg).unwrap()
}

fn lease(name: &str) -> Lease {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"holderIdentity": "a"}}))
        .unwrap()
}

fn mdep(name: &str, spec: serde_json::Value) -> ModelDeployment {
    serde_json::from_value(json!({"apiVersion": "modelcache.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name}, "spec": spec})).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_with_a_stale_resource_version_conflict() {
    let api = ApiServer::start();
    let leases: Api<Lease> = Api::namespaced(client(&api).await, "ns");
    let created = leases
        .create(&PostParams::default(), &lease("l"))
        .await
        .unwrap();
    let mut first = created.clone();
    first.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("l", &PostParams::default(), &first)
        .await
        .unwrap();
    let mut stale = created;
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    match leases.replace("l", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("expected 409, got {other:?}"),
    }
    match leases.create(&PostParams::default(), &lease("l")).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 409),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_removes_what_a_manager_stops_applying() {
    let api = ApiServer::start();
    let mds: Api<ModelDeployment> = Api::namespaced(client(&api).await, "default");
    mds.create(
        &PostParams::default(),
        &mdep("m", json!({"model": {"path": "a"}})),
    )
    .await
    .unwrap();
    let pp = PatchParams::apply("op").force();
    let status = |s: serde_json::Value| json!({"apiVersion": "modelcache.io/v1alpha1", "kind": "ModelDeployment", "status": s});
    mds.patch_status(
        "m",
        &pp,
        &Patch::Apply(status(json!({"replicas": 1, "serviceName": "m"}))),
    )
    .await
    .unwrap();
    let m = mds
        .patch_status("m", &pp, &Patch::Apply(status(json!({"replicas": 2}))))
        .await
        .unwrap();
    let st = m.status.unwrap();
    assert_eq!(st.replicas, 2);
    assert_eq!(
        st.service_name, None,
        "a field the manager no longer applies is removed"
    );
    // Status writes leave the spec alone, spec writes leave the status alone.
    assert_eq!(m.spec.model.path, "a");
    let m = mds
        .patch(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}, "status": {"replicas": 9}})),
        )
        .await
        .unwrap();
    assert_eq!((m.spec.replicas, m.status.unwrap().replicas), (3, 2));
    assert_eq!(
        m.metadata.generation,
        Some(2),
        "a spec change bumps the generation"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_custom_resources_get_the_api_servers_422() {
    let api = ApiServer::start();
    let mds: Api<ModelDeployment> = Api::namespaced(client(&api).await, "default");
    match mds
        .create(
            &PostParams::default(),
            &mdep("bad", json!({"model": {"path": "/abs"}, "replicas": 2000})),
        )
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            assert!(
                s.message
                    .starts_with("ModelDeployment.modelcache.io \"bad\" is invalid"),
                "{}",
                s.message
            );
            assert!(s.message.contains("spec.replicas"), "{}", s.message);
        }
        other => panic!("expected 422, got {other:?}"),
    }
    // Defaults are applied as the API server applies them.
    let ok = mds
        .create(
            &PostParams::default(),
            &mdep("ok", json!({"model": {"path": "a"}})),
        )
        .await
        .unwrap();
    assert_eq!(ok.spec.replicas, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn finalizers_hold_deletion_and_owned_objects_are_collected() {
    let api = ApiServer::start();
    let c = client(&api).await;
    let mds: Api<ModelDeployment> = Api::namespaced(c.clone(), "default");
    let services: Api<Service> = Api::namespaced(c, "default");
    let mut m = mdep("m", json!({"model": {"path": "a"}}));
    m.metadata.finalizers = Some(vec!["x/y".into()]);
    let m = mds.create(&PostParams::default(), &m).await.unwrap();
    let owner = json!({"apiVersion": "modelcache.io/v1alpha1", "kind": "ModelDeployment", "name": "m", "uid": m.metadata.uid, "controller": true});
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "m", "ownerReferences": [owner]}, "spec": {"ports": [{"port": 8080}]}})).unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();

    mds.delete("m", &DeleteParams::default()).await.unwrap();
    let held = mds.get("m").await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "held by its finalizer"
    );
    assert!(services.get_opt("m").await.unwrap().is_some());
    mds.patch(
        "m",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(
        mds.get_opt("m").await.unwrap().is_none(),
        "gone once the finalizer is removed"
    );
    assert!(
        services.get_opt("m").await.unwrap().is_none(),
        "its Service was garbage-collected"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watches_replay_from_a_resource_version_and_follow_changes() {
    let api = ApiServer::start();
    let leases: Api<Lease> = Api::namespaced(client(&api).await, "ns");
    leases
        .create(&PostParams::default(), &lease("before"))
        .await
        .unwrap();
    let stream = watcher(leases.clone(), watcher::Config::default()).applied_objects();
    futures::pin_mut!(stream);
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.metadata.name.as_deref(),
        Some("before"),
        "the initial list"
    );
    leases
        .create(&PostParams::default(), &lease("after"))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        next.metadata.name.as_deref(),
        Some("after"),
        "a live change"
    );
    // Label selectors filter lists.
    let mut labelled = lease("labelled");
    labelled.metadata.labels = Some([("team".to_string(), "a".to_string())].into());
    leases
        .create(&PostParams::default(), &labelled)
        .await
        .unwrap();
    let listed = leases
        .list(&kube::api::ListParams::default().labels("team=a"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
}
