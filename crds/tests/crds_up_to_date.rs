//! The chart ships the CRDs as files; they must be exactly what the code generates.

#[test]
fn committed_crds_match_the_code() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (rel, generated) in modelcache_crds::crdgen::manifests().expect("CRDs render") {
        let committed = std::fs::read_to_string(root.join(rel)).unwrap_or_default();
        assert!(
            committed == generated,
            "{rel} differs from what the code generates; run `cargo run -p modelcache-crds --bin crdgen` and commit the result"
        );
    }
}
