//! The Helm chart, alert rules and dashboards, checked with the real tools:
//! `helm lint --strict` and `helm template` (helm v4), PyPI
//! `kubernetes-validate` for Kubernetes 1.35, `promtool check/test rules`, and
//! Grafana's dashboard schema. Rendered manifests are read as YAML into
//! k8s-openapi's types, so assertions name fields rather than text.
//! `real_apiserver.rs` installs, upgrades and uninstalls it on a real
//! kube-apiserver.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Pod, PodSpec, PodTemplateSpec, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use modelcache_tests::{repo, run, tool};
use serde::de::DeserializeOwned;
use serde_json::Value;
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

/// The rendered manifests, read with a YAML parser (helm separates them with `---`).
fn manifests(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("rendered YAML: {e}\n{yaml}"))
}

fn kinds(docs: &[Value]) -> Vec<&str> {
    docs.iter().filter_map(|d| d["kind"].as_str()).collect()
}

/// The one manifest of `kind` as its Kubernetes type.
fn one<K: DeserializeOwned>(docs: &[Value], kind: &str) -> K {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}: {found:?}");
    serde_json::from_value(found[0].clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// The one manifest of `kind` for `component` (operator, agent, gateway).
fn of<K: DeserializeOwned>(docs: &[Value], kind: &str, component: &str) -> K {
    let found: Vec<Value> = docs
        .iter()
        .filter(|d| {
            d["kind"] == kind && d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        })
        .cloned()
        .collect();
    one(&found, kind)
}

fn pod_of(template: &PodTemplateSpec) -> PodSpec {
    template.spec.clone().expect("a pod template with a spec")
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
    c.env.iter().flatten().find(|e| e.name == name)
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    env(c, name).and_then(|e| e.value.as_deref())
}

fn field_ref<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    env(c, name)
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str())
}

fn args(c: &Container) -> Vec<&str> {
    c.args.iter().flatten().map(String::as_str).collect()
}

fn gpu_limit(c: &Container) -> Option<String> {
    c.resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("nvidia.com/gpu"))
        .map(|q| q.0.clone())
}

/// Each (resource, verbs) the roles named `name` grant.
fn rules(docs: &[Value], name: &str) -> Vec<(String, Vec<String>)> {
    docs.iter()
        .filter(|d| {
            (d["kind"] == "ClusterRole" || d["kind"] == "Role") && d["metadata"]["name"] == name
        })
        .flat_map(|d| {
            let rules: Vec<PolicyRule> = serde_json::from_value(d["rules"].clone()).unwrap();
            rules.into_iter().flat_map(|r| {
                let verbs = r.verbs;
                r.resources
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |res| (res, verbs.clone()))
            })
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
    let docs = manifests(&yaml);
    let kinds = kinds(&docs);
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

    // The gateway: two replicas behind one Service, a budget of one disruption.
    let gateway: Deployment = of(&docs, "Deployment", "gateway");
    let gateway = gateway.spec;
    assert_eq!(gateway.replicas, Some(2));
    assert_eq!(args(&pod_of(&gateway.template).containers[0])[0], "gateway");
    let svc: Service = of(&docs, "Service", "gateway");
    assert_eq!(svc.metadata.name.as_deref(), Some("mc-modelcache-gateway"));
    let ports = svc.spec.and_then(|s| s.ports).unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.name.as_deref() == Some("http") && p.port == 8080),
        "{ports:?}"
    );
    let _: PodDisruptionBudget = of(&docs, "PodDisruptionBudget", "gateway");
    let _: NetworkPolicy = of(&docs, "NetworkPolicy", "gateway");

    let operator: Deployment = of(&docs, "Deployment", "operator");
    let spec = operator.spec;
    assert_eq!(spec.replicas, Some(2));
    let operator_pod = pod_of(&spec.template);
    let c = &operator_pod.containers[0];
    assert!(args(c).contains(&"--leader-elect"), "{:?}", args(c));
    assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());

    let agent: DaemonSet = one(&docs, "DaemonSet");
    let agent_pod = pod_of(&agent.spec.template);
    let selector = agent_pod.node_selector.clone().unwrap_or_default();
    assert_eq!(
        selector.get("nvidia.com/gpu.present").map(String::as_str),
        Some("true")
    );
    assert!(agent_pod
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.key.as_deref() == Some("nvidia.com/gpu")));
    let c = &agent_pod.containers[0];
    assert_eq!(env_value(c, "MALLOC_MMAP_THRESHOLD_"), Some("1048576"));
    assert_eq!(env_value(c, "MODELCACHE_ALLOC_POOL_BYTES"), Some("1Gi"));
    assert_eq!(env_value(c, "MODELCACHE_RAM_CACHE_BYTES"), Some("32Gi"));
    assert_eq!(field_ref(c, "NODE_NAME"), Some("spec.nodeName"));
    assert_eq!(field_ref(c, "POD_IP"), Some("status.podIP"));
    assert_eq!(gpu_limit(c).as_deref(), Some("1"));
    assert!(args(c).contains(&"--kubernetes"), "{:?}", args(c));
    // The agent's probes ask the monitoring port, which a flood of the API port cannot starve.
    for probe in [&c.readiness_probe, &c.liveness_probe] {
        let port = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|g| g.port.clone());
        assert_eq!(port, Some(IntOrString::String("metrics".into())));
    }
    let models = agent_pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "models")
        .and_then(|v| v.host_path.as_ref())
        .map(|h| h.path.clone());
    assert_eq!(models.as_deref(), Some("/var/lib/modelcache/models"));

    // Every container: non-root, read-only root filesystem, no capabilities.
    for (what, pod) in [("operator", &operator_pod), ("agent", &agent_pod)] {
        let run_as_non_root = pod
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root);
        assert_eq!(run_as_non_root, Some(true), "{what}");
        for c in &pod.containers {
            let s = c.security_context.clone().unwrap_or_default();
            assert_eq!(s.run_as_non_root, Some(true), "{what}");
            assert_eq!(s.read_only_root_filesystem, Some(true), "{what}");
            assert_eq!(s.allow_privilege_escalation, Some(false), "{what}");
            let drop = s.capabilities.and_then(|c| c.drop);
            assert_eq!(drop, Some(vec!["ALL".to_string()]), "{what}");
        }
    }
    // Dashboards for Grafana's sidecar.
    let dashboards: Vec<ConfigMap> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| serde_json::from_value(d.clone()).unwrap())
        .filter(|c: &ConfigMap| {
            c.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.contains("dashboard"))
        })
        .collect();
    assert_eq!(dashboards.len(), 5);
    for d in &dashboards {
        let labels = d.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("grafana_dashboard").map(String::as_str),
            Some("1")
        );
    }
}

#[test]
fn rbac_grants_each_component_only_what_it_uses() {
    let docs = manifests(&template(&[]));
    let read: Vec<String> = ["get", "list", "watch"].map(String::from).to_vec();
    let agent = rules(&docs, "mc-modelcache-agent");
    assert!(
        agent.contains(&("modeldeployments".to_string(), read.clone())),
        "agents only read deployments: {agent:?}"
    );
    for (resource, _) in &agent {
        assert!(
            !["services", "endpointslices"].contains(&resource.as_str()),
            "agents must not touch {resource}"
        );
    }
    let operator = rules(&docs, "mc-modelcache-operator");
    assert!(
        operator.contains(&("modelnodes".to_string(), read)),
        "the operator only reads ModelNodes: {operator:?}"
    );
    let resources: Vec<&str> = operator.iter().map(|(r, _)| r.as_str()).collect();
    assert!(
        resources.contains(&"endpointslices") && resources.contains(&"modeldeployments/status"),
        "{resources:?}"
    );
    assert!(
        operator.contains(&(
            "modeldeployments/scale".to_string(),
            vec!["get".to_string(), "update".to_string()]
        )),
        "the autoscaler writes replicas through the scale subresource: {operator:?}"
    );
    // The gateway reads by watches only, and raises replicas from zero.
    let watch = vec!["list".to_string(), "watch".to_string()];
    let mut gateway = rules(&docs, "mc-modelcache-gateway");
    gateway.sort();
    assert_eq!(
        gateway,
        vec![
            ("endpointslices".to_string(), watch.clone()),
            ("modeldeployments".to_string(), watch.clone()),
            (
                "modeldeployments/scale".to_string(),
                vec!["get".to_string(), "update".to_string()]
            ),
            ("modelnodes".to_string(), watch),
        ]
    );
    for (resource, verbs) in agent.iter().chain(&operator) {
        assert!(
            resource != "*" && !verbs.iter().any(|v| v == "*"),
            "no wildcards: {resource} {verbs:?}"
        );
    }
    // Agents read source credentials only from the Secrets the values name.
    let secrets = |docs: &[Value]| -> Vec<(Vec<String>, Vec<String>)> {
        docs.iter()
            .filter(|d| d["kind"] == "Role" && d["metadata"]["name"] == "mc-modelcache-agent")
            .flat_map(|d| serde_json::from_value::<Vec<PolicyRule>>(d["rules"].clone()).unwrap())
            .filter(|r| r.resources.iter().flatten().any(|res| res == "secrets"))
            .map(|r| (r.resource_names.unwrap_or_default(), r.verbs))
            .collect()
    };
    assert_eq!(
        secrets(&docs),
        [(
            vec!["modelcache-source-credentials".to_string()],
            vec!["get".to_string()]
        )]
    );
    let none = manifests(&template(&[
        "--set",
        "agent.sourceCredentials.secretNames=null",
    ]));
    assert!(secrets(&none).is_empty(), "{:?}", secrets(&none));
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
    let docs = manifests(&yaml);
    let kinds = kinds(&docs);
    for want in ["ServiceMonitor", "PodMonitor", "PrometheusRule", "Pod"] {
        assert!(kinds.contains(&want), "no {want} in {kinds:?}");
    }
    assert!(!kinds.contains(&"NetworkPolicy"));
    let agent: DaemonSet = one(&docs, "DaemonSet");
    let pod = pod_of(&agent.spec.template);
    let volume = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .cloned()
    };
    let claim = volume("models")
        .and_then(|v| v.persistent_volume_claim)
        .map(|c| c.claim_name);
    assert_eq!(claim.as_deref(), Some("models"));
    let secret = volume("api-token")
        .and_then(|v| v.secret)
        .and_then(|s| s.secret_name);
    assert_eq!(secret.as_deref(), Some("api-token"));
    let c = &pod.containers[0];
    assert_eq!(gpu_limit(c).as_deref(), Some("2"));
    assert_eq!(env_value(c, "MALLOC_MMAP_THRESHOLD_"), Some("2097152"));
    assert_eq!(env_value(c, "MODELCACHE_DEVICE"), Some("cuda:0,cuda:1"));
    assert_eq!(env_value(c, "MODELCACHE_VRAM_CACHE_BYTES"), Some("auto"));
    // The gateway takes the agents' token and sends it on.
    let gateway: Deployment = of(&docs, "Deployment", "gateway");
    let gateway_pod = pod_of(&gateway.spec.template);
    assert_eq!(
        env_value(&gateway_pod.containers[0], "MODELCACHE_API_TOKEN_FILE"),
        Some("/var/run/secrets/modelcache/token")
    );
    assert!(gateway_pod.volumes.iter().flatten().any(|v| v
        .secret
        .as_ref()
        .and_then(|s| s.secret_name.as_deref())
        == Some("api-token")));
    let operator: Deployment = of(&docs, "Deployment", "operator");
    let operator_pod = pod_of(&operator.spec.template);
    let a = args(&operator_pod.containers[0]);
    assert!(
        a.contains(&"--bin-pack") && !a.contains(&"--leader-elect"),
        "{a:?}"
    );
    // The PrometheusRule carries the same groups promtool tests.
    let rule = docs.iter().find(|d| d["kind"] == "PrometheusRule").unwrap();
    let alert = rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .find(|r| r["alert"] == "ModelcacheMmapThresholdNotInForce")
        .expect("the mmap threshold alert");
    assert!(
        alert["annotations"]
            .to_string()
            .contains("{{ $labels.instance }}"),
        "{alert}"
    );
    // helm test sends one request to the named deployment's Service.
    let test: Pod = one(&docs, "Pod");
    let hook = test.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(hook.get("helm.sh/hook").map(String::as_str), Some("test"));
    let c = &test.spec.expect("a Pod spec").containers[0];
    assert!(
        args(c).contains(&"--url=http://sd15.modelcache.svc:8080"),
        "{:?}",
        args(c)
    );
}

#[test]
fn names_service_accounts_disruption_budget_and_gitops_monitoring() {
    // Defaults: two operator replicas with a budget of one disruption.
    let docs = manifests(&template(&[]));
    let pdb: PodDisruptionBudget = of(&docs, "PodDisruptionBudget", "operator");
    let spec = pdb.spec.unwrap_or_default();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        spec.selector
            .and_then(|s| s.match_labels)
            .unwrap_or_default()["app.kubernetes.io/component"],
        "operator"
    );
    // One replica: no budget that would block every drain.
    let one_replica = manifests(&template(&[
        "--set",
        "operator.replicas=1,gateway.replicas=1",
    ]));
    assert!(!kinds(&one_replica).contains(&"PodDisruptionBudget"));

    // Overridden names, an existing operator ServiceAccount, IAM annotations on the agent's.
    let yaml = template(&[
        "--set",
        "fullnameOverride=mc-prod,nameOverride=imagegen",
        "--set",
        "operator.serviceAccount.create=false,operator.serviceAccount.name=platform-ops",
        "--set",
        "agent.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/x",
        "--set",
        "gateway.enabled=false",
        // GitOps: no cluster to ask whether the Prometheus Operator is there.
        "--set",
        "monitoring.assumePrometheusOperator=true,monitoring.serviceMonitor.enabled=true",
    ]);
    kubernetes_validate(&yaml);
    let docs = manifests(&yaml);
    assert!(kinds(&docs).contains(&"ServiceMonitor"));
    let accounts: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .collect();
    assert_eq!(accounts.len(), 1, "only the agent's is made: {accounts:?}");
    assert_eq!(accounts[0]["metadata"]["name"], "mc-prod-agent");
    assert_eq!(
        accounts[0]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::1:role/x"
    );
    let operator: Deployment = of(&docs, "Deployment", "operator");
    assert_eq!(operator.metadata.name.as_deref(), Some("mc-prod-operator"));
    assert_eq!(
        pod_of(&operator.spec.template)
            .service_account_name
            .as_deref(),
        Some("platform-ops")
    );
    let bound: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
        .filter_map(|d| d["subjects"][0]["name"].as_str())
        .collect();
    assert!(
        bound.contains(&"platform-ops") && bound.contains(&"mc-prod-agent"),
        "{bound:?}"
    );
    for d in &docs {
        if let Some(name) = d["metadata"]["labels"]["app.kubernetes.io/name"].as_str() {
            assert_eq!(name, "imagegen", "{}", d["kind"]);
        }
    }
}

#[test]
fn bad_values_are_refused_by_the_schema() {
    for (set, why) in [
        ("operator.replicas=two", "got string, want integer"),
        ("gateway.replicas=0", "minimum"),
        ("gateway.service.type=ExternalName", "value must be one of"),
        ("gateway.maxAttempts=0", "minimum"),
        ("agent.precision=f8", "value must be one of"),
        ("agent.malloc.mmapThreshold=100", "minimum"),
        ("agent.cache.ramBytes=lots", "does not match pattern"),
        ("agent.cache.ramBytes=auto", "does not match pattern"),
        ("agent.device=gpu0", "does not match pattern"),
        ("agent.typo=1", "additional properties 'typo' not allowed"),
        ("image.pullPolicy=Sometimes", "value must be one of"),
        ("test.modelDeployment=Bad_Name", "does not match pattern"),
        (
            "operator.serviceAccount.create=maybe",
            "got string, want boolean",
        ),
        (
            "agent.serviceAccount.role=x",
            "additional properties 'role' not allowed",
        ),
        (
            "monitoring.assumePrometheusOperator=yes",
            "got string, want boolean",
        ),
        (
            "fullnameOverride=a-name-longer-than-sixty-three-characters-which-cannot-name-objects",
            "maxLength",
        ),
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
    let alerts = std::fs::read_to_string(chart().join("rules/alerts.yaml"))
        .unwrap()
        .matches("- alert: ")
        .count();
    assert!(
        ok && out.contains(&format!("SUCCESS: {alerts} rules found")),
        "{out}"
    );
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
    assert_eq!(rules.matches("summary:").count(), alerts);
    assert_eq!(rules.matches("description:").count(), alerts);
    // Every runbook link points at a section of docs/runbooks.md.
    let runbooks = std::fs::read_to_string(repo().join("docs/runbooks.md")).unwrap();
    let urls: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert_eq!(urls.len(), alerts, "{urls:?}");
    for url in urls {
        let anchor = url
            .trim_matches('"')
            .strip_prefix("https://github.com/modelcache/modelcache/blob/main/docs/runbooks.md#")
            .unwrap_or_else(|| panic!("{url} is not a runbook in docs/runbooks.md"));
        assert!(
            runbooks.lines().any(|l| l
                .strip_prefix("## ")
                .is_some_and(|h| h.to_lowercase() == anchor)),
            "docs/runbooks.md has no section for {anchor}"
        );
    }
}

#[test]
fn dashboards_are_what_their_generator_writes() {
    let (ok, out) = run(Command::new("python3")
        .arg(repo().join("scripts/gen_dashboards.py"))
        .arg("--check"));
    assert!(ok, "{out}");
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
    assert_eq!(
        dashboards.len(),
        5,
        "Cache, Memory, Generation, Scheduler, Gateway"
    );
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
    let rendered: Vec<String> = manifests(&template(&[]))
        .into_iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .map(|d| serde_json::from_value::<CustomResourceDefinition>(d).unwrap())
        .filter_map(|crd| crd.metadata.name)
        .collect();
    for file in [
        "modelcache.io_modeldeployments.yaml",
        "modelcache.io_modelnodes.yaml",
    ] {
        let text = std::fs::read_to_string(chart().join("crds").join(file)).unwrap();
        let committed: CustomResourceDefinition = serde_saphyr::from_str(&text).unwrap();
        let name = committed.metadata.name.unwrap();
        assert!(
            rendered.contains(&name),
            "{file} ({name}) not rendered: {rendered:?}"
        );
    }
}
