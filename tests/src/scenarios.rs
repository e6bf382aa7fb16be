//! The end-to-end scenarios of a whole modelcache cluster on one machine: the
//! real `modelcache-operator` and three real `modelcache-agent` processes in
//! cluster mode with different node names, ports and model folders, against an
//! API server given as a [`Kube`]: the in-repo emulation
//! (`tests/tests/e2e.rs`) or a real kube-apiserver with RBAC on
//! (`tests/tests/real_apiserver.rs`). Lease durations are shortened by flags
//! to keep it fast.
//!
//! One function walks the scenarios in order because they share the cluster:
//! placement on the node that has the model and generation through the
//! EndpointSlice; residency preference; agent death and return; operator
//! restart; scale to zero and back; priority preemption; invalid resources and
//! a missing model; a model no node has, downloaded from S3.

use crate::kube::{Component, Kube};
use crate::process::{binary, Proc};
use crate::s3::{self, Seaweed};
use crate::{copy_dir, free_port, http_get, repo, Prometheus};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The operator and three agents, running against an API server.
pub struct Cluster<'k, K: Kube> {
    pub(crate) api: &'k K,
    operator_kubeconfig: PathBuf,
    agent_kubeconfig: PathBuf,
    /// The agents' address: EndpointSlices refuse loopback addresses.
    pod_ip: String,
    pub(crate) dir: tempfile::TempDir,
    operator: Option<Proc>,
    pub(crate) operator_metrics: u16,
    operator_health: u16,
    /// (node, API port, metrics port, process)
    pub(crate) agents: Vec<(String, u16, u16, Option<Proc>)>,
    /// The gateway's API and metrics ports, once started.
    pub(crate) gateway: Option<(u16, u16, Proc)>,
}

impl<'k, K: Kube> Cluster<'k, K> {
    /// Creates the Nodes n1, n2 and n3 (n3 labelled `pool: small`) with their
    /// model folders (n1: alpha, beta; n2: beta; n3: beta, gamma), starts an
    /// agent on each and the operator, and waits for three Ready ModelNodes.
    pub fn start(api: &'k K) -> Self {
        let mut dir = tempfile::tempdir().unwrap();
        // MODELCACHE_KEEP_LOGS=1 keeps the processes' logs and folders.
        if std::env::var_os("MODELCACHE_KEEP_LOGS").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        let fixture = repo().join("tests/fixtures/tiny-sd1");
        // n1 has alpha and beta; n2 has beta; n3 has beta and gamma. n3 is the "small" pool.
        for (node, models) in [
            ("n1", &["alpha", "beta"][..]),
            ("n2", &["beta"][..]),
            ("n3", &["beta", "gamma"][..]),
        ] {
            for m in models {
                copy_dir(&fixture, &dir.path().join(node).join("models").join(m));
            }
            // The same LoRA on every node, for the gateway's adapter affinity.
            let loras = dir.path().join(node).join("models/loras");
            std::fs::create_dir_all(&loras).unwrap();
            std::fs::copy(
                repo().join("tests/fixtures/tiny-sd1-lora/tiny-sd1-lora.safetensors"),
                loras.join("style.safetensors"),
            )
            .unwrap();
            let labels = if node == "n3" {
                json!({"pool": "small", "kubernetes.io/hostname": node})
            } else {
                json!({"kubernetes.io/hostname": node})
            };
            let obj = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": labels}, "spec": {}});
            let (code, body) = api.send("POST", "/api/v1/nodes", Some(&obj));
            assert_eq!(code, 201, "{body}");
            // A new Node carries the not-ready taint until its kubelet reports
            // Ready and the node lifecycle controller lifts it; neither runs here.
            let (code, body) = api.send(
                "PATCH",
                &format!("/api/v1/nodes/{node}"),
                Some(&json!({"spec": {"taints": null}})),
            );
            assert_eq!(code, 200, "{body}");
        }
        let mut c = Cluster {
            api,
            operator_kubeconfig: api.kubeconfig(Component::Operator, dir.path()),
            agent_kubeconfig: api.kubeconfig(Component::Agent, dir.path()),
            pod_ip: host_ip(),
            dir,
            operator: None,
            operator_metrics: 0,
            operator_health: 0,
            agents: ["n1", "n2", "n3"]
                .iter()
                .map(|n| (n.to_string(), free_port(), free_port(), None))
                .collect(),
            gateway: None,
        };
        for i in 0..3 {
            c.start_agent(i);
        }
        c.start_operator();
        // The leader is ready once its caches have synced (kubelets route
        // and roll out by it).
        let health = format!("127.0.0.1:{}", c.operator_health);
        c.wait("the operator ready", Duration::from_secs(30), || {
            matches!(http_get(&health, "/readyz"), Ok((200, _))).then_some(())
        });
        c.wait("three Ready ModelNodes", Duration::from_secs(60), || {
            (c.api
                .objects("modelnodes")
                .iter()
                .filter(|n| n["status"]["conditions"][0]["status"] == "True")
                .count()
                == 3)
                .then_some(())
        });
        c
    }

    /// Waits until the deployment's status satisfies `f`.
    pub fn wait_status(&self, name: &str, f: impl Fn(&Value) -> bool) {
        self.wait(&format!("{name}'s status"), Duration::from_secs(60), || {
            f(&self.mdep(name)["status"]).then_some(())
        });
    }

    fn start_operator(&mut self) {
        let dir = self.dir.path().to_path_buf();
        let n = self.operator_starts();
        self.operator_metrics = free_port();
        self.operator_health = free_port();
        let mut cmd = Command::new(binary("modelcache-operator"));
        cmd.args([
            "run",
            "--namespace",
            "modelcache",
            "--leader-elect",
            "--leader-lease-seconds",
            "3",
        ])
        .args(["--node-lease-expiry-seconds", "4", "--resync-seconds", "30"])
        .args(["--autoscale-interval-seconds", "1"])
        .arg(format!(
            "--metrics-listen=127.0.0.1:{}",
            self.operator_metrics
        ))
        .arg(format!(
            "--health-listen=127.0.0.1:{}",
            self.operator_health
        ))
        .arg(format!("--identity=operator-{n}"))
        .env("KUBECONFIG", &self.operator_kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("MODELCACHE_TEST_LOG").unwrap_or("info,kube=warn".into()),
        );
        self.operator = Some(Proc::spawn(&mut cmd, dir.join(format!("operator-{n}.log"))));
    }

    /// Starts `modelcache-operator gateway` as the chart's gateway ServiceAccount.
    pub(crate) fn start_gateway(&mut self) -> String {
        let (port, metrics) = (free_port(), free_port());
        let mut cmd = Command::new(binary("modelcache-operator"));
        cmd.args([
            "gateway",
            "--namespace",
            "default",
            "--scale-up-timeout-seconds",
            "60",
        ])
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--metrics-listen=127.0.0.1:{metrics}"))
        .env(
            "KUBECONFIG",
            self.api.kubeconfig(Component::Gateway, self.dir.path()),
        )
        .env(
            "RUST_LOG",
            std::env::var("MODELCACHE_TEST_LOG").unwrap_or("info,kube=warn".into()),
        );
        let log = self.dir.path().join("gateway.log");
        self.gateway = Some((port, metrics, Proc::spawn(&mut cmd, log)));
        let addr = format!("127.0.0.1:{port}");
        self.wait("the gateway ready", Duration::from_secs(30), || {
            matches!(http_get(&addr, "/readyz"), Ok((200, _))).then_some(())
        });
        addr
    }

    fn operator_starts(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("operator-"))
                })
                .count()
            })
            .unwrap_or(0)
    }

    pub(crate) fn start_agent(&mut self, i: usize) {
        let (node, api_port, metrics_port, _) = &self.agents[i];
        let root = self.dir.path().join(node);
        let mut cmd = Command::new(binary("modelcache-agent"));
        cmd.args(["--log-format", "json", "serve", "--kubernetes"])
            .arg("--models-dir")
            .arg(root.join("models"))
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg(format!("--listen={}:{api_port}", self.pod_ip))
            .arg(format!("--metrics-listen={}:{metrics_port}", self.pod_ip))
            .args([
                "--node-name",
                node,
                "--pod-ip",
                &self.pod_ip,
                "--pod-name",
                &format!("agent-{node}"),
            ])
            .args([
                "--namespace",
                "modelcache",
                "--lease-renew-seconds",
                "1",
                "--report-interval-seconds",
                "1",
            ])
            .args(["--ram-cache-bytes", "64Mi", "--vram-cache-bytes", "20Mi"])
            .arg("--peer-token-file")
            .arg(self.peer_token())
            .env("KUBECONFIG", &self.agent_kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("MODELCACHE_TEST_LOG").unwrap_or("info,kube=warn".into()),
            );
        let log = self.dir.path().join(format!("{node}.log"));
        self.agents[i].3 = Some(Proc::spawn(&mut cmd, log));
    }

    /// The agents' shared token for copies between them.
    fn peer_token(&self) -> PathBuf {
        let path = self.dir.path().join("peer-token");
        if !path.exists() {
            std::fs::write(&path, "peer-token-of-the-test-cluster-7c1d").unwrap();
        }
        path
    }

    pub(crate) fn logs(&self) -> String {
        let mut out = String::new();
        if let Some(op) = &self.operator {
            out.push_str(&format!("--- operator\n{}\n", op.tail(60)));
        }
        if let Some((_, _, g)) = &self.gateway {
            out.push_str(&format!("--- gateway\n{}\n", g.tail(30)));
        }
        for (node, _, _, p) in &self.agents {
            if let Some(p) = p {
                out.push_str(&format!("--- agent {node}\n{}\n", p.tail(15)));
            }
        }
        out
    }

    /// Every line every process of the cluster has logged.
    fn logs_whole(&self) -> String {
        std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect()
    }

    /// Fails when any process was refused by the API server's authorizer.
    pub(crate) fn assert_nothing_forbidden(&self) {
        let refused: Vec<String> = self
            .logs_whole()
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains("forbidden"))
            .map(str::to_string)
            .collect();
        assert!(
            refused.is_empty(),
            "refused by the authorizer:\n{}",
            refused.join("\n")
        );
    }

    /// Polls `f` until it returns Some, or fails with the processes' logs.
    pub(crate) fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() > deadline {
                let deployments: Vec<String> = self
                    .api
                    .objects("modeldeployments")
                    .iter()
                    .map(|d| format!("{}: {}", d["metadata"]["name"], d["status"]))
                    .collect();
                panic!(
                    "timed out waiting for {what}\n{}\n--- deployments\n{}",
                    self.logs(),
                    deployments.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(crate) fn mdep(&self, name: &str) -> Value {
        self.api
            .object("modeldeployments", "default", name)
            .unwrap_or(Value::Null)
    }

    pub(crate) fn condition(&self, name: &str, t: &str) -> Value {
        self.mdep(name)["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == t).cloned())
            .unwrap_or(Value::Null)
    }

    pub(crate) fn placements(&self, name: &str) -> Vec<(String, String, String)> {
        self.mdep(name)["status"]["placements"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        (
                            p["node"].as_str().unwrap_or("").to_string(),
                            p["role"].as_str().unwrap_or("").to_string(),
                            p["phase"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits for READY "n/n" and returns the serving nodes.
    pub(crate) fn wait_ready(&self, name: &str, n: usize) -> Vec<String> {
        self.wait(
            &format!("{name} ready {n}/{n}"),
            Duration::from_secs(60),
            || {
                let md = self.mdep(name);
                (md["status"]["ready"] == format!("{n}/{n}")
                    && md["status"]["observedGeneration"] == md["metadata"]["generation"])
                    .then(|| {
                        self.placements(name)
                            .into_iter()
                            .filter(|p| p.1 == "Serving")
                            .map(|p| p.0)
                            .collect()
                    })
            },
        )
    }

    /// Endpoints (`ip:port`) of the deployment's EndpointSlice.
    pub(crate) fn endpoints(&self, name: &str) -> Vec<String> {
        let Some(slice) = self.api.object("endpointslices", "default", name) else {
            return Vec::new();
        };
        let port = slice["ports"][0]["port"].as_i64().unwrap_or(0);
        slice["endpoints"]
            .as_array()
            .map(|eps| {
                eps.iter()
                    .map(|e| format!("{}:{port}", e["addresses"][0].as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn node_of_port(&self, endpoint: &str) -> String {
        self.agents
            .iter()
            .find(|(_, port, _, _)| endpoint.ends_with(&format!(":{port}")))
            .map(|(n, _, _, _)| n.clone())
            .unwrap_or_default()
    }

    pub(crate) fn metrics(&self, node: &str) -> String {
        let (_, _, port, _) = self.agents.iter().find(|a| a.0 == node).unwrap();
        http_get(&format!("{}:{port}", self.pod_ip), "/metrics")
            .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub(crate) fn create(&self, spec: Value, name: &str) -> (u16, Value) {
        let obj = json!({"apiVersion": "modelcache.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name, "namespace": "default"}, "spec": spec});
        self.api.send(
            "POST",
            "/apis/modelcache.io/v1alpha1/namespaces/default/modeldeployments",
            Some(&obj),
        )
    }

    pub(crate) fn patch_spec(&self, name: &str, spec: Value) {
        let (code, body) = self.api.send(
            "PATCH",
            &format!("/apis/modelcache.io/v1alpha1/namespaces/default/modeldeployments/{name}"),
            Some(&json!({"spec": spec})),
        );
        assert_eq!(code, 200, "{body}");
    }

    pub(crate) fn delete(&self, name: &str) {
        let (code, body) = self.api.send(
            "DELETE",
            &format!("/apis/modelcache.io/v1alpha1/namespaces/default/modeldeployments/{name}"),
            None,
        );
        assert_eq!(code, 200, "{body}");
    }
}

/// This machine's address on its network (not loopback), which the agents
/// listen on as pods do on theirs.
fn host_ip() -> String {
    let routed = ["10.255.255.254:9", "192.0.2.1:9", "172.31.255.254:9"]
        .iter()
        .filter_map(|target| {
            // Connecting a UDP socket sends nothing; it picks the source address.
            let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            s.connect(target).ok()?;
            Some(s.local_addr().ok()?.ip())
        })
        .chain(
            // Else any address the host has (`hostname -I`).
            Command::new("hostname")
                .arg("-I")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|a| a.parse().ok())
                .collect::<Vec<std::net::IpAddr>>(),
        )
        .find(|ip| ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified());
    routed
        .map(|ip| ip.to_string())
        .expect("these tests need a non-loopback IPv4 address: EndpointSlices refuse loopback ones")
}

fn generate(endpoint: &str, model: &str) -> (u16, Value) {
    let (code, _, body) = post_generation(
        endpoint,
        &json!({"model": model, "prompt": "a lighthouse", "size": "64x64", "steps": 2, "seed": 1}),
    );
    (code, body)
}

/// One generation request: status, response headers (lowercase names) and body.
pub(crate) fn post_generation(endpoint: &str, body: &Value) -> (u16, Vec<(String, String)>, Value) {
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(endpoint).unwrap();
    write!(s, "POST /v1/images/generations HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let Some(end) = text.find("\r\n\r\n") else {
        return (0, Vec::new(), Value::Null);
    };
    let headers = text[..end]
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (
        text[9..12].parse().unwrap_or(0),
        headers,
        serde_json::from_str(&text[end + 4..]).unwrap_or(Value::Null),
    )
}

fn disk_loads(metrics: &str) -> f64 {
    crate::metric_sum(metrics, "modelcache_model_load_seconds_count{from=\"disk\"")
}

/// Every query of the dashboard `name` returns data from `prom`, whose
/// targets carry `namespace="modelcache"`.
pub(crate) fn assert_panels_have_data(prom: &Prometheus, name: &str) {
    let file = repo().join(format!("charts/modelcache/dashboards/{name}.json"));
    let dashboard: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    let mut empty = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let q = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$namespace", "modelcache");
            if prom.query(&q).is_empty() {
                empty.push(format!("{}: {q}", p["title"]));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "{name} panels without data:\n{}",
        empty.join("\n")
    );
}

/// The seven scenarios, in order, on a cluster of three agents and the
/// operator that this starts against `api`; asserts that no process was ever
/// refused by the API server's authorizer.
pub fn run<K: Kube>(api: &K) {
    let mut c = Cluster::start(api);

    // 1. Placed on the node that has the model, Ready, routed, and it generates.
    let (code, body) = c.create(json!({"model": {"path": "alpha"}, "replicas": 1}), "alpha");
    assert_eq!(code, 201, "{body}");
    assert_eq!(c.wait_ready("alpha", 1), ["n1"], "only n1 has alpha");
    assert_eq!(c.condition("alpha", "Resolved")["status"], "True");
    let endpoints = c.wait("alpha's EndpointSlice", Duration::from_secs(30), || {
        Some(c.endpoints("alpha")).filter(|e| !e.is_empty())
    });
    assert_eq!(c.node_of_port(&endpoints[0]), "n1");
    let (code, reply) = generate(&endpoints[0], "alpha");
    assert_eq!(code, 200, "{reply}");
    assert!(reply["data"][0]["b64_json"]
        .as_str()
        .is_some_and(|b| b.len() > 100));
    assert!(
        c.api.object("services", "default", "alpha").is_some(),
        "a Service per deployment"
    );

    // 2. A deployment prefers the node where its model is already resident.
    let (code, _) = c.create(json!({"model": {"path": "beta"}, "replicas": 1, "warmTier": "Ram", "placement": {"nodeSelector": {"pool": "small"}}}), "beta-warmup");
    assert_eq!(code, 201);
    assert_eq!(c.wait_ready("beta-warmup", 1), ["n3"]);
    c.delete("beta-warmup");
    c.wait(
        "beta-warmup gone with its Service",
        // The garbage collector of a real controller manager learns of a new
        // CRD when it next syncs discovery (every 30 s).
        Duration::from_secs(90),
        || {
            (c.api
                .object("modeldeployments", "default", "beta-warmup")
                .is_none()
                && c.api.object("services", "default", "beta-warmup").is_none())
            .then_some(())
        },
    );
    c.wait(
        "n3 reporting beta resident",
        Duration::from_secs(30),
        || {
            c.api
                .object("modelnodes", "", "n3")
                .and_then(|n| n["status"]["models"].as_array().cloned())
                .filter(|m| m.iter().any(|m| m["path"] == "beta"))
                .map(|_| ())
        },
    );
    let (code, _) = c.create(json!({"model": {"path": "beta"}, "replicas": 1}), "beta");
    assert_eq!(code, 201);
    assert_eq!(
        c.wait_ready("beta", 1),
        ["n3"],
        "beta is on every node's disk but resident on n3"
    );

    // 3. Kill an agent: its Lease expires, its placements move, routing drops it.
    let before = c.endpoints("beta");
    c.agents[2].3.as_mut().unwrap().kill();
    let moved = c.wait("beta to leave n3", Duration::from_secs(60), || {
        let nodes: Vec<String> = c.placements("beta").into_iter().map(|p| p.0).collect();
        (!nodes.is_empty() && !nodes.contains(&"n3".to_string())).then_some(nodes)
    });
    assert!(moved[0] == "n1" || moved[0] == "n2");
    c.wait_ready("beta", 1);
    let after = c.wait(
        "beta's EndpointSlice to move",
        Duration::from_secs(30),
        || Some(c.endpoints("beta")).filter(|e| !e.is_empty() && *e != before),
    );
    assert_ne!(c.node_of_port(&after[0]), "n3");
    // The agent comes back: nothing moves (no churn).
    c.start_agent(2);
    c.wait("n3 Ready again", Duration::from_secs(30), || {
        c.api
            .object("modelnodes", "", "n3")
            .filter(|n| n["status"]["agent"]["podName"] == "agent-n3")
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        c.placements("beta")
            .into_iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        moved,
        "no churn when n3 returns"
    );

    // 4. Restart the operator: no placement changes. While it is down, a
    // deployment is deleted, and its Service and EndpointSlice go with it
    // (owner references; nothing waits for the operator).
    let snapshot = c.placements("beta");
    c.operator.as_mut().unwrap().stop();
    c.delete("alpha");
    c.wait(
        "alpha, its Service and EndpointSlice gone while the operator is down",
        Duration::from_secs(30),
        || {
            ["modeldeployments", "services", "endpointslices"]
                .iter()
                .all(|kind| c.api.object(kind, "default", "alpha").is_none())
                .then_some(())
        },
    );
    c.start_operator();
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        snapshot,
        c.placements("beta"),
        "an operator restart moves nothing"
    );

    // 5. Scale to 0 with warmTier Ram: not routed, still resident; scale up: Ready without a disk load.
    let (code, _) = c.create(
        json!({"model": {"path": "gamma"}, "replicas": 1, "warmTier": "Ram"}),
        "gamma",
    );
    assert_eq!(code, 201);
    assert_eq!(c.wait_ready("gamma", 1), ["n3"], "only n3 has gamma");
    c.patch_spec("gamma", json!({"replicas": 0}));
    c.wait("gamma scaled to zero", Duration::from_secs(30), || {
        let p = c.placements("gamma");
        (c.mdep("gamma")["status"]["ready"] == "0/0"
            && p.len() == 1
            && p[0].1 == "Warm"
            && c.endpoints("gamma").is_empty())
        .then_some(())
    });
    assert_eq!(c.condition("gamma", "Available")["reason"], "ScaledToZero");
    let loads = disk_loads(&c.metrics("n3"));
    c.patch_spec("gamma", json!({"replicas": 1}));
    assert_eq!(c.wait_ready("gamma", 1), ["n3"]);
    assert_eq!(
        disk_loads(&c.metrics("n3")),
        loads,
        "scaling up from a warm copy reads nothing from disk"
    );

    // 6. Priority preemption, with the reason in both deployments' conditions.
    // F32 copies of the tiny pipeline (~15 MiB) and n3's 20 MiB device budget: one fits.
    let (code, _) = c.create(json!({"model": {"path": "beta"}, "replicas": 1, "warmTier": "Vram", "precision": "F32", "priority": -10, "placement": {"nodeSelector": {"pool": "small"}}}), "low");
    assert_eq!(code, 201);
    assert_eq!(c.wait_ready("low", 1), ["n3"]);
    let (code, _) = c.create(json!({"model": {"path": "gamma"}, "replicas": 1, "warmTier": "Vram", "precision": "F32", "priority": 100, "placement": {"nodeSelector": {"pool": "small"}}}), "high");
    assert_eq!(code, 201);
    assert_eq!(c.wait_ready("high", 1), ["n3"]);
    let low = c.wait(
        &format!(
            "low to be preempted; low: {}; high: {}",
            c.mdep("low")["status"],
            c.mdep("high")["status"]
        ),
        Duration::from_secs(30),
        || {
            let cond = c.condition("low", "Scheduled");
            (cond["reason"] == "Preempted").then_some(cond)
        },
    );
    assert!(
        low["message"].as_str().unwrap().contains("default/high"),
        "{low}"
    );
    let high = c.condition("high", "Scheduled");
    assert!(
        high["message"]
            .as_str()
            .unwrap()
            .contains("preempted warm reservations of default/low"),
        "{high}"
    );

    // 7. Invalid resources are refused with the CRD's message; a missing model says where it looked.
    let (code, body) = c.create(json!({"model": {"path": "../etc/passwd"}}), "evil");
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["reason"], "Invalid");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("ModelDeployment.modelcache.io \"evil\" is invalid"),
        "{body}"
    );
    let (code, body) = c.create(json!({"model": {"path": "x"}, "replicas": 5000}), "toomany");
    assert_eq!(code, 422);
    assert!(
        body["message"].as_str().unwrap().contains("spec.replicas"),
        "{body}"
    );
    let (code, _) = c.create(
        json!({"model": {"path": "sdxl/missing.safetensors"}}),
        "missing",
    );
    assert_eq!(code, 201);
    let resolved = c.wait("missing to be unresolved", Duration::from_secs(30), || {
        let cond = c.condition("missing", "Resolved");
        (cond["status"] == "False").then_some(cond)
    });
    assert_eq!(resolved["reason"], "ModelNotFound");
    let msg = resolved["message"].as_str().unwrap();
    assert!(
        msg.contains("sdxl/missing.safetensors") && msg.contains("n1, n2, n3"),
        "{msg}"
    );

    // 8. A model no node has, named by its S3 source: placed anyway,
    // downloaded with the labelled Secret the chart lets the agents read, then
    // Ready, reported and serving; a second replica copies it from the first
    // node instead of the bucket.
    let s3 = Seaweed::start();
    s3.upload_dir(&repo().join("tests/fixtures/tiny-sd1"), "sd/tiny-sd1");
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "modelcache-source-credentials", "namespace": "modelcache",
            "labels": {"modelcache.io/source-credentials": "true"}},
        "stringData": {"AWS_ACCESS_KEY_ID": s3::KEY, "AWS_SECRET_ACCESS_KEY": s3::SECRET}});
    let (code, body) = c.api.send(
        "POST",
        "/api/v1/namespaces/modelcache/secrets",
        Some(&secret),
    );
    assert_eq!(code, 201, "{body}");
    let source = json!({"url": "s3://models/sd/tiny-sd1", "endpoint": s3.endpoint,
        "secretName": "modelcache-source-credentials"});
    let (code, body) = c.create(
        json!({"model": {"path": "hub/tiny-sd1", "source": source}, "replicas": 1}),
        "remote",
    );
    assert_eq!(code, 201, "{body}");
    let first = c.wait_ready("remote", 1);
    let downloaded = |node: &str, source: &str| {
        c.metrics(node).contains(&format!(
            "modelcache_downloads_total{{result=\"ok\",source=\"{source}\"}} 1"
        ))
    };
    assert!(downloaded(&first[0], "s3"), "from the bucket");
    c.patch_spec("remote", json!({"replicas": 2}));
    let both = c.wait_ready("remote", 2);
    let second = both.iter().find(|n| **n != first[0]).unwrap();
    assert!(
        downloaded(second, "peer") && !downloaded(second, "s3"),
        "the second node copies from the first: {}",
        c.metrics(second)
    );
    let resolved = c.condition("remote", "Resolved");
    assert_eq!(resolved["reason"], "ModelFound", "{resolved}");
    let endpoints = c.wait("remote's EndpointSlice", Duration::from_secs(30), || {
        Some(c.endpoints("remote")).filter(|e| e.len() == 2)
    });
    let (code, reply) = generate(&endpoints[0], "remote");
    assert_eq!(code, 200, "{reply}");

    // The Scheduler dashboard's panels return data from a real Prometheus scraping this operator.
    let target = format!("127.0.0.1:{}", c.operator_metrics);
    let prom = Prometheus::start(&[(&target, &[("namespace", "modelcache")])]);
    assert!(
        !prom.wait_for("up == 1", Duration::from_secs(30)).is_empty(),
        "operator never scraped"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_panels_have_data(&prom, "scheduler");
    let unschedulable = prom.query("modelcache_unschedulable_deployments");
    let reasons: Vec<&str> = unschedulable
        .iter()
        .filter_map(|r| r["metric"]["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"model_not_found") && reasons.contains(&"preempted"),
        "{reasons:?}"
    );
    c.assert_nothing_forbidden();
}
