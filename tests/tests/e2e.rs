//! The end-to-end scenarios (`modelcache_tests::scenarios`, `::gateway`)
//! against the in-repo emulated API server: the fast run of the same scenario
//! lists that `real_apiserver.rs` runs against a real kube-apiserver.
//!
//! One cluster at a time: both depend on leases of a few seconds, which two
//! clusters sharing the machine's two cores could let expire.

use modelcache_tests::apiserver::ApiServer;
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn a_cluster_on_one_machine() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let api = ApiServer::start();
    modelcache_tests::scenarios::run(&api);
    eprintln!(
        "e2e: the emulated API server answered {} requests",
        api.requests()
    );
}

#[test]
fn one_gateway_for_the_cluster() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let api = ApiServer::start();
    modelcache_tests::gateway::run(&api);
}
