//! Every manifest in examples/ is accepted by the CRD the chart installs, and
//! every one in examples/invalid/ is refused with the message its first line
//! (`# expect: …`) names, exactly as a user would see it from `kubectl apply`.

use kube::CustomResourceExt;
use modelcache_crds::validation::CrdValidator;
use modelcache_crds::ModelDeployment;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("examples folder")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn validator() -> CrdValidator {
    CrdValidator::new(&ModelDeployment::crd(), "v1alpha1").expect("CRD schema compiles")
}

fn load(path: &Path) -> (String, Value) {
    let text = std::fs::read_to_string(path).expect("readable example");
    let value: Value =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (text, value)
}

#[test]
fn valid_examples_are_accepted_and_typed() {
    let v = validator();
    let files = yaml_files(&examples_dir());
    assert!(files.len() >= 3, "expected at least three examples");
    for path in files {
        let (_, obj) = load(&path);
        let errors = v.validate(&obj, None);
        assert!(errors.is_empty(), "{} refused: {errors:?}", path.display());
        let md: ModelDeployment = serde_json::from_value(v.apply_defaults(&obj))
            .unwrap_or_else(|e| panic!("{} does not deserialize: {e}", path.display()));
        assert!(md.spec.replicas >= 0);
    }
}

#[test]
fn invalid_examples_are_refused_with_their_message() {
    let v = validator();
    let files = yaml_files(&examples_dir().join("invalid"));
    assert!(files.len() >= 15);
    for path in files {
        let (text, obj) = load(&path);
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an `# expect:` first line", path.display()));
        let errors = v.validate(&obj, None);
        let messages: Vec<_> = errors.iter().map(|e| e.message.clone()).collect();
        assert!(
            messages.iter().any(|m| m == expected),
            "{}: expected {expected:?}, got {messages:?}",
            path.display()
        );
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let full = v.invalid_message(name, &errors);
        assert!(
            full.starts_with(&format!(
                "ModelDeployment.modelcache.io \"{name}\" is invalid: "
            )),
            "{full}"
        );
    }
}

#[test]
fn defaults_are_applied_like_the_api_server() {
    let obj = serde_json::json!({
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "d", "namespace": "x"},
        "spec": {"model": {"path": "a.safetensors"}, "loras": [{"path": "l.safetensors"}]}
    });
    let defaulted = validator().apply_defaults(&obj);
    let md: ModelDeployment = serde_json::from_value(defaulted).expect("typed");
    assert_eq!(md.spec.replicas, 1);
    assert_eq!(md.spec.precision, modelcache_crds::Precision::F16);
    assert_eq!(md.spec.warm_tier, modelcache_crds::WarmTier::None);
    assert_eq!(md.spec.placement.max_replicas_per_node, 1);
    assert_eq!(md.spec.loras[0].weight, 1.0);
}

#[test]
fn valid_edge_values_pass() {
    let v = validator();
    for (field, value) in [("replicas", 0), ("replicas", 1000)] {
        let obj = serde_json::json!({"metadata": {"name": "e"}, "spec": {"model": {"path": "a/b..c.safetensors"}, field: value}});
        assert!(v.validate(&obj, None).is_empty(), "{field}={value}");
    }
    let obj = serde_json::json!({"metadata": {"name": "e"}, "spec": {"model": {"path": "x"}, "defaults": {"width": 64, "height": 2048, "steps": 1, "guidanceScale": 0}}});
    assert!(v.validate(&obj, None).is_empty());
}

#[test]
fn model_node_crd_compiles_and_accepts_a_status() {
    let v = CrdValidator::new(&modelcache_crds::ModelNode::crd(), "v1alpha1").expect("schema");
    let obj = serde_json::json!({
        "metadata": {"name": "gpu-1"},
        "spec": {},
        "status": {
            "agent": {"version": "0.1.0", "podName": "agent-x", "endpoint": "10.0.0.5:8080"},
            "cache": {"ramCapacityBytes": 1, "ramUsedBytes": 0, "vramCapacityBytes": 0, "vramUsedBytes": 0,
                      "hits": 0, "misses": 0, "evictions": 0, "diskReadBytesPerSecond": 1, "ramToDeviceBytesPerSecond": 1},
            "models": [{"path": "a", "tier": "Ram", "sizeBytes": 5, "locked": false}],
            "localModels": [{"path": "a", "type": "Main", "base": "Sd1", "format": "Diffusers", "fileBytes": 5, "tensorCount": 2}]
        }
    });
    assert_eq!(v.validate(&obj, None), vec![]);
    let bad = serde_json::json!({"metadata": {"name": "gpu-1"}, "spec": {}, "status": {"models": [{"path": "a", "tier": "Disk2", "sizeBytes": 5, "locked": false}]}});
    assert_eq!(v.validate(&bad, None).len(), 1);
}
