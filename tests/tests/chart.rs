//! The Helm chart, alert rules and dashboards, checked with the real tools:
//! `helm lint --strict` and `helm template` (helm v4), PyPI
//! `kubernetes-validate` for Kubernetes 1.35, `promtool check/test rules`, and
//! Grafana's dashboard schema. (A real cluster cannot run here, so `helm
//! install` and `helm test` are only rendered and validated.)

use modelcache_tests::{repo, run, tool};
use std::path::PathBuf;
use std::process::Command;

fn chart() -> PathBuf {
    repo().join("charts/modelcache")
}

fn helm() -> Command {
    let mut c = Command::new(tool("helm"));
    let home = std::env::temp_dir().join("modelcache-helm-home");
    c.env("HELM_CACHE_HOME", &home)
        .env("HELM_CONFIG_HOME", &home)
        .env("HELM_DATA_HOME", &home);
    c
}

/// Renders the chart with `args`; panics with helm's output when it fails.
fn template(args: &[&str]) -> String {
    let (ok, out) = run(helm()
        .args([
            "template",
            "mc",
            "--namespace",
            "modelcache",
            "--include-crds",
        ])
        .arg(chart())
        .args(args));
    assert!(ok, "helm template {args:?} failed:\n{out}");
    out
}

/// The rendered documents as (kind, name, document).
fn documents(yaml: &str) -> Vec<(String, String, String)> {
    yaml.split("\n---")
        .filter_map(|doc| {
            let field = |key: &str| {
                doc.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(|v| v.trim().to_string())
            };
            Some((field("kind: ")?, field("  name: ")?, doc.to_string()))
        })
        .collect()
}

fn kubernetes_validate(yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (ok, out) = run(Command::new(tool("kubernetes-validate"))
        .args(["--strict", "-k", "1.35.0"])
        .arg(&file));
    assert!(ok, "kubernetes-validate --strict -k 1.35.0 failed:\n{out}");
    assert!(!out.contains("ERROR"), "{out}");
}

#[test]
fn lints_strictly() {
    let (ok, out) = run(helm().args(["lint", "--strict"]).arg(chart()));
    assert!(ok, "helm lint --strict:\n{out}");
}

#[test]
fn default_install_renders_valid_manifests_for_kubernetes_1_35() {
    let yaml = template(&[]);
    kubernetes_validate(&yaml);
    let docs = documents(&yaml);
    let kinds: Vec<&str> = docs.iter().map(|(k, _, _)| k.as_str()).collect();
    for want in [
        "CustomResourceDefinition",
        "Deployment",
        "DaemonSet",
        "ClusterRole",
        "Role",
        "NetworkPolicy",
        "ConfigMap",
    ] {
        assert!(kinds.contains(&want), "no {want} in {kinds:?}");
    }
    // Prometheus Operator resources only when asked for and when the CRDs exist.
    for absent in ["ServiceMonitor", "PodMonitor", "PrometheusRule", "Pod"] {
        assert!(!kinds.contains(&absent), "{absent} rendered by default");
    }

    let (_, _, operator) = docs.iter().find(|(k, _, _)| k == "Deployment").unwrap();
    assert!(
        operator.contains("replicas: 2") && operator.contains("- --leader-elect"),
        "{operator}"
    );
    assert!(operator.contains("readinessProbe") && operator.contains("livenessProbe"));

    let (_, _, agent) = docs.iter().find(|(k, _, _)| k == "DaemonSet").unwrap();
    for want in [
        "nvidia.com/gpu.present: \"true\"",
        "name: MALLOC_MMAP_THRESHOLD_\n              value: \"1048576\"",
        "fieldPath: spec.nodeName",
        "fieldPath: status.podIP",
        "nvidia.com/gpu: 1",
        "- --kubernetes",
        "key: nvidia.com/gpu",
        "path: /var/lib/modelcache/models",
        "value: \"32Gi\"",
    ] {
        assert!(
            agent.contains(want),
            "agent DaemonSet lacks {want:?}:\n{agent}"
        );
    }
    // Every container: non-root, read-only root filesystem, no capabilities.
    for (kind, name, doc) in docs
        .iter()
        .filter(|(k, _, _)| k == "Deployment" || k == "DaemonSet")
    {
        for want in [
            "runAsNonRoot: true",
            "readOnlyRootFilesystem: true",
            "allowPrivilegeEscalation: false",
            "drop: [\"ALL\"]",
        ] {
            assert!(doc.contains(want), "{kind}/{name} lacks {want}");
        }
    }
    // Dashboards for Grafana's sidecar.
    let dashboards: Vec<_> = docs
        .iter()
        .filter(|(k, n, _)| k == "ConfigMap" && n.contains("dashboard"))
        .collect();
    assert_eq!(dashboards.len(), 4);
    assert!(dashboards
        .iter()
        .all(|(_, _, d)| d.contains("grafana_dashboard: \"1\"")));
}

#[test]
fn rbac_grants_each_component_only_what_it_uses() {
    let yaml = template(&[]);
    let docs = documents(&yaml);
    let rules = |name: &str| {
        docs.iter()
            .find(|(k, n, _)| (k == "ClusterRole" || k == "Role") && n == name)
            .map(|(_, _, d)| d.clone())
            .unwrap_or_else(|| panic!("no role {name}"))
    };
    let agent = rules("mc-modelcache-agent");
    assert!(
        agent.contains(
            "resources: [\"modeldeployments\"]\n    verbs: [\"get\", \"list\", \"watch\"]"
        ),
        "agents only read deployments:\n{agent}"
    );
    assert!(
        !agent.contains("services")
            && !agent.contains("endpointslices")
            && !agent.contains("\"*\"")
    );
    let operator = rules("mc-modelcache-operator");
    assert!(
        operator.contains("resources: [\"modelnodes\"]\n    verbs: [\"get\", \"list\", \"watch\"]"),
        "the operator only reads ModelNodes"
    );
    assert!(operator.contains("endpointslices") && operator.contains("modeldeployments/status"));
    assert!(
        !yaml.contains("verbs: [\"*\"]") && !yaml.contains("resources: [\"*\"]"),
        "no wildcards"
    );
}

#[test]
fn non_default_values_render_valid_manifests() {
    let yaml = template(&[
        "--api-versions",
        "monitoring.coreos.com/v1",
        "--set",
        "monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true,monitoring.prometheusRule.enabled=true",
        "--set",
        "agent.models.existingClaim=models,agent.gpu.count=2,agent.malloc.mmapThreshold=2097152,agent.apiTokenSecret=api-token",
        "--set",
        "operator.strategy=BinPack,operator.leaderElect=false,operator.replicas=1,networkPolicy.enabled=false",
        "--set",
        "test.modelDeployment=sd15,grafana.dashboards.namespace=monitoring",
        "--set",
        "agent.device=cuda:0\\,cuda:1,agent.cache.vramBytes=auto",
    ]);
    kubernetes_validate(&yaml);
    let docs = documents(&yaml);
    let kinds: Vec<&str> = docs.iter().map(|(k, _, _)| k.as_str()).collect();
    for want in ["ServiceMonitor", "PodMonitor", "PrometheusRule", "Pod"] {
        assert!(kinds.contains(&want), "no {want} in {kinds:?}");
    }
    assert!(!kinds.contains(&"NetworkPolicy"));
    let (_, _, agent) = docs.iter().find(|(k, _, _)| k == "DaemonSet").unwrap();
    assert!(agent.contains("claimName: models") && agent.contains("nvidia.com/gpu: 2"));
    assert!(agent.contains("value: \"2097152\"") && agent.contains("secretName: api-token"));
    assert!(
        agent.contains("value: \"cuda:0,cuda:1\"") && agent.contains("value: \"auto\""),
        "{agent}"
    );
    let (_, _, operator) = docs.iter().find(|(k, _, _)| k == "Deployment").unwrap();
    assert!(operator.contains("- --bin-pack") && !operator.contains("--leader-elect"));
    // The PrometheusRule carries the same groups promtool tests.
    let (_, _, rule) = docs.iter().find(|(k, _, _)| k == "PrometheusRule").unwrap();
    assert!(
        rule.contains("alert: ModelcacheMmapThresholdNotInForce")
            && rule.contains("{{ $labels.instance }}")
    );
    // helm test sends one request to the named deployment's Service.
    let (_, _, pod) = docs.iter().find(|(k, _, _)| k == "Pod").unwrap();
    assert!(
        pod.contains("helm.sh/hook: test") && pod.contains("--url=http://sd15.modelcache.svc:8080"),
        "{pod}"
    );
}

#[test]
fn bad_values_are_refused_by_the_schema() {
    for (set, why) in [
        ("operator.replicas=two", "got string, want integer"),
        ("agent.precision=f8", "value must be one of"),
        ("agent.malloc.mmapThreshold=100", "minimum"),
        ("agent.cache.ramBytes=lots", "does not match pattern"),
        ("agent.cache.ramBytes=auto", "does not match pattern"),
        ("agent.device=gpu0", "does not match pattern"),
        ("agent.typo=1", "additional properties 'typo' not allowed"),
        ("image.pullPolicy=Sometimes", "value must be one of"),
        ("test.modelDeployment=Bad_Name", "does not match pattern"),
    ] {
        let (ok, out) = run(helm()
            .args(["template", "mc"])
            .arg(chart())
            .args(["--set", set]));
        assert!(!ok, "--set {set} was accepted");
        assert!(
            out.contains(why),
            "--set {set}: expected {why:?} in:\n{out}"
        );
    }
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    let (ok, out) = run(Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(chart().join("rules/alerts.yaml")));
    assert!(ok && out.contains("SUCCESS: 7 rules found"), "{out}");
    let (ok, out) = run(Command::new(tool("promtool"))
        .args(["test", "rules"])
        .arg(repo().join("tests/rules/alerts_test.yaml")));
    assert!(ok, "promtool test rules:\n{out}");
    // Every alert has a unit test and tells the reader what to do.
    let rules = std::fs::read_to_string(chart().join("rules/alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(repo().join("tests/rules/alerts_test.yaml")).unwrap();
    for name in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "{name} has no promtool test"
        );
    }
    assert_eq!(rules.matches("summary:").count(), 7);
    assert_eq!(rules.matches("description:").count(), 7);
}

#[test]
fn dashboards_match_grafanas_schema() {
    let mut cmd = Command::new(tool("python"));
    cmd.arg(repo().join("tests/scripts/check_dashboards.py"))
        .arg(repo().join("tests/fixtures/grafana/dashboard.schema.json"));
    let dashboards: Vec<PathBuf> = std::fs::read_dir(chart().join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(dashboards.len(), 4, "Cache, Memory, Generation, Scheduler");
    let (ok, out) = run(cmd.args(&dashboards));
    assert!(ok, "{out}");
    // And the schema check does catch mistakes.
    let dir = tempfile::tempdir().unwrap();
    let mut bad: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&dashboards[0]).unwrap()).unwrap();
    bad["panels"][0]["gridPos"]["w"] = "wide".into();
    let bad_path = dir.path().join("bad.json");
    std::fs::write(&bad_path, bad.to_string()).unwrap();
    let (ok, out) = run(Command::new(tool("python"))
        .arg(repo().join("tests/scripts/check_dashboards.py"))
        .arg(repo().join("tests/fixtures/grafana/dashboard.schema.json"))
        .arg(&bad_path));
    assert!(!ok && out.contains("/panels/0/gridPos/w"), "{out}");
}

#[test]
fn the_chart_ships_the_generated_crds() {
    for crd in [
        "modelcache.io_modeldeployments.yaml",
        "modelcache.io_modelnodes.yaml",
    ] {
        let yaml = template(&[]);
        let committed = std::fs::read_to_string(chart().join("crds").join(crd)).unwrap();
        let name_line = committed
            .lines()
            .find(|l| l.trim_start().starts_with("name: "))
            .unwrap();
        assert!(yaml.contains(name_line.trim()), "{crd} not rendered");
    }
}
