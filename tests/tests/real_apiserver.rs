//! The project against a real Kubernetes control plane (etcd, kube-apiserver
//! with RBAC, kube-controller-manager), built from pinned upstream sources by
//! `tests/k8s/control-plane.sh`: the Helm chart installed, upgraded and
//! uninstalled with the real helm; the end-to-end scenarios with the real
//! operator and agents authenticated as the chart's ServiceAccounts; and a
//! user's kubectl session with the real kubectl.
//!
//! Each test starts its own control plane; they run one at a time (the
//! machines have 2 cores). Without a Go toolchain each prints SKIPPED and
//! passes, unless `MODELCACHE_REQUIRE_K8S` is set, as CI sets it.

use modelcache_tests::control_plane::ControlPlane;
use modelcache_tests::kube::Kube;
use modelcache_tests::{repo, run, scenarios, tool};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn control_plane() -> Option<(std::sync::MutexGuard<'static, ()>, ControlPlane)> {
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let cp = ControlPlane::start()?;
    eprintln!(
        "control plane ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Some((guard, cp))
}

/// Runs the real helm against the control plane; panics with its output on failure.
fn helm(cp: &ControlPlane, args: &[&str]) -> String {
    let (ok, out) = run(Command::new(tool("helm"))
        .args(args)
        .arg("--kubeconfig")
        .arg(cp.admin_kubeconfig())
        .env("HELM_CACHE_HOME", cp.dir().join("helm/cache"))
        .env("HELM_CONFIG_HOME", cp.dir().join("helm/config"))
        .env("HELM_DATA_HOME", cp.dir().join("helm/data")));
    assert!(ok, "helm {args:?}:\n{out}\n{}", cp.logs());
    out
}

fn install(cp: &ControlPlane) {
    helm(
        cp,
        &[
            "install",
            "modelcache",
            &repo().join("charts/modelcache").display().to_string(),
            "--namespace",
            "modelcache",
            "--create-namespace",
        ],
    );
}

/// The objects of the release's manifest: (apiVersion, kind, namespace, name).
fn manifest_objects(manifest: &str) -> Vec<(String, String, String, String)> {
    manifest
        .split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok())
        .filter(|v| v.is_object())
        .map(|v| {
            let s = |p: &str| {
                v.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            (
                s("/apiVersion"),
                s("/kind"),
                s("/metadata/namespace"),
                s("/metadata/name"),
            )
        })
        .collect()
}

/// The REST path of an object of the manifest.
fn object_path(cp: &ControlPlane, api_version: &str, kind: &str, ns: &str, name: &str) -> String {
    // Resource names from discovery, as kubectl finds them.
    let base = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    let (_, list) = cp.send("GET", &base, None);
    let resource = list["resources"]
        .as_array()
        .and_then(|rs| {
            rs.iter()
                .find(|r| r["kind"] == kind && !r["name"].as_str().unwrap_or("").contains('/'))
        })
        .and_then(|r| r["name"].as_str())
        .unwrap_or_else(|| panic!("{api_version} {kind} is not served: {list}"))
        .to_string();
    let namespaced = list["resources"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == resource.as_str()))
        .is_some_and(|r| r["namespaced"] == true);
    if namespaced {
        let ns = if ns.is_empty() { "modelcache" } else { ns };
        format!("{base}/namespaces/{ns}/{resource}/{name}")
    } else {
        format!("{base}/{resource}/{name}")
    }
}

#[test]
fn the_chart_installs_upgrades_and_uninstalls_cleanly() {
    let Some((_serial, cp)) = control_plane() else {
        return;
    };
    install(&cp);
    // The CRDs were accepted (their CEL rules compiled within the cost budget) and are served.
    for crd in ["modeldeployments.modelcache.io", "modelnodes.modelcache.io"] {
        let (code, body) = cp.send(
            "GET",
            &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}"),
            None,
        );
        assert_eq!(code, 200, "{crd}: {body}");
        let established = body["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        });
        assert!(established, "{crd} is not Established: {}", body["status"]);
    }
    // Every rendered object exists.
    let manifest = helm(&cp, &["get", "manifest", "modelcache", "-n", "modelcache"]);
    let objects = manifest_objects(&manifest);
    assert!(objects.len() >= 15, "{} objects rendered", objects.len());
    let paths: Vec<String> = objects
        .iter()
        .map(|(v, k, ns, n)| object_path(&cp, v, k, ns, n))
        .collect();
    for p in &paths {
        let (code, body) = cp.send("GET", p, None);
        assert_eq!(code, 200, "{p}: {body}");
    }

    // An upgrade with changed values changes the objects.
    helm(
        &cp,
        &[
            "upgrade",
            "modelcache",
            &repo().join("charts/modelcache").display().to_string(),
            "--namespace",
            "modelcache",
            "--set",
            "operator.replicas=3",
            "--set",
            "agent.cache.ramBytes=8Gi",
        ],
    );
    let (_, operator) = cp.send(
        "GET",
        "/apis/apps/v1/namespaces/modelcache/deployments/modelcache-operator",
        None,
    );
    assert_eq!(operator["spec"]["replicas"], 3, "{operator}");
    let (_, agent) = cp.send(
        "GET",
        "/apis/apps/v1/namespaces/modelcache/daemonsets/modelcache-agent",
        None,
    );
    assert!(agent.to_string().contains("8Gi"), "{agent}");

    // Uninstall removes every object of the release, and the garbage collector
    // removes what controllers made from them (ReplicaSets, Pods).
    helm(
        &cp,
        &["uninstall", "modelcache", "-n", "modelcache", "--wait"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<&String> = paths
            .iter()
            .filter(|p| !p.contains("customresourcedefinitions"))
            .filter(|p| cp.send("GET", p, None).0 != 404)
            .collect();
        let mut owned = Vec::new();
        for list in [
            "/apis/apps/v1/namespaces/modelcache/replicasets",
            "/api/v1/namespaces/modelcache/pods",
        ] {
            let (_, body) = cp.send("GET", list, None);
            owned.extend(
                body["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|o| format!("{list}/{}", o["metadata"]["name"])),
            );
        }
        if left.is_empty() && owned.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after uninstall: {left:?} {owned:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_scenarios_pass_under_the_charts_rbac() {
    let Some((_serial, cp)) = control_plane() else {
        return;
    };
    install(&cp);
    let started = Instant::now();
    scenarios::run(&cp);
    eprintln!(
        "the scenarios took {:.0} s against the real apiserver",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn the_gateway_routes_and_scales_under_the_charts_rbac() {
    let Some((_serial, cp)) = control_plane() else {
        return;
    };
    install(&cp);
    let started = Instant::now();
    modelcache_tests::gateway::run(&cp);
    eprintln!(
        "the gateway scenarios took {:.0} s against the real apiserver",
        started.elapsed().as_secs_f64()
    );
}

/// `kubectl`, as the test admin, expecting success; returns its output.
fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    let (ok, out) = run(cp.kubectl().args(args).current_dir(repo()));
    assert!(ok, "kubectl {args:?}:\n{out}");
    out
}

#[test]
fn a_users_kubectl_session() {
    let Some((_serial, cp)) = control_plane() else {
        return;
    };
    install(&cp);
    let cluster = scenarios::Cluster::start(&cp);

    // Every example applies; every invalid one is refused with its expected message.
    let out = kubectl(&cp, &["apply", "-n", "default", "-f", "examples/"]);
    assert!(out.contains("created"), "{out}");
    let invalid = repo().join("examples/invalid");
    let (mut checked, mut wrong) = (0, Vec::new());
    for e in std::fs::read_dir(&invalid).expect("examples/invalid") {
        let path = e.expect("an entry").path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("an example");
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );
        let (ok, out) = run(cp
            .kubectl()
            .args(["apply", "-n", "default", "--dry-run=server", "-f"])
            .arg(&path));
        assert!(!ok, "{} was accepted:\n{out}", path.display());
        for e in expected {
            if !out.contains(e) {
                wrong.push(format!("{}: expected {e:?} in:\n{out}\n", path.display()));
            }
        }
        checked += 1;
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(checked >= 3, "only {checked} invalid examples");

    // A deployment of a model the cluster has, then the usual verbs.
    let md = json!({"apiVersion": "modelcache.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "alpha", "namespace": "default"},
        "spec": {"model": {"path": "alpha"}, "replicas": 1, "warmTier": "Ram"}});
    let file = cp.dir().join("alpha.json");
    std::fs::write(&file, md.to_string()).expect("writing alpha.json");
    kubectl(&cp, &["apply", "-f", &file.display().to_string()]);
    let wait_ready = || {
        kubectl(
            &cp,
            &[
                "wait",
                "--for=condition=Ready",
                "mdep/alpha",
                "-n",
                "default",
                "--timeout=120s",
            ],
        )
    };
    let scale_status = || {
        let path = "/apis/modelcache.io/v1alpha1/namespaces/default/modeldeployments/alpha/scale";
        cp.send("GET", path, None).1["status"].clone()
    };
    wait_ready();
    let table = kubectl(&cp, &["get", "mdep", "alpha", "-n", "default"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "BASE", "SIZE", "WARM", "NODES", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(&row[..3], ["alpha", "1/1", "Sd1"], "{table}");
    assert!(row[3] == "7.4Mi", "SIZE is readable: {table}");
    assert_eq!(row[5], "n1", "{table}");
    let explain = kubectl(&cp, &["explain", "modeldeployment.spec.model"]);
    assert!(
        explain.contains("path") && explain.contains("format"),
        "{explain}"
    );

    // Scale to zero and back through the scale subresource.
    kubectl(
        &cp,
        &["scale", "mdep/alpha", "-n", "default", "--replicas=0"],
    );
    cluster.wait_status("alpha", |s| s["ready"] == "0/0");
    assert_eq!(scale_status()["replicas"], 0);
    kubectl(
        &cp,
        &["scale", "mdep/alpha", "-n", "default", "--replicas=1"],
    );
    wait_ready();
    let scale = scale_status();
    assert_eq!(scale["replicas"], 1, "{scale}");
    assert!(
        scale["selector"].as_str().is_some_and(|s| !s.is_empty()),
        "{scale}"
    );

    // describe shows the conditions and the Events.
    let described = kubectl(&cp, &["describe", "mdep", "alpha", "-n", "default"]);
    for expected in ["Ready", "Scheduled", "Events:", "modelcache-operator"] {
        assert!(
            described.contains(expected),
            "{expected:?} in:\n{described}"
        );
    }
    drop(cluster);
}
