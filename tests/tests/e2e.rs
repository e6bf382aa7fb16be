//! The end-to-end scenarios (`modelcache_tests::scenarios`) against the
//! in-repo emulated API server: the fast run of the same scenario list that
//! `real_apiserver.rs` runs against a real kube-apiserver.

use modelcache_tests::apiserver::ApiServer;

#[test]
fn a_cluster_on_one_machine() {
    let api = ApiServer::start();
    modelcache_tests::scenarios::run(&api);
    eprintln!(
        "e2e: the emulated API server answered {} requests",
        api.requests()
    );
}
