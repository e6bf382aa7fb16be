//! A real Kubernetes control plane for tests, as controller-runtime's envtest
//! runs one: etcd, kube-apiserver and kube-controller-manager built from the
//! upstream versions pinned in `tests/k8s/go.mod` (by `tests/k8s/control-plane.sh`),
//! on loopback ports chosen at run time. No kubelet and no scheduler: Nodes are
//! objects the test creates, and the operator and agents run as host processes
//! with kubeconfigs.
//!
//! The apiserver authenticates for real (client certificates from a CA made
//! here; ServiceAccount tokens signed by a key made here) and authorizes with
//! RBAC; the controller manager runs the garbage collector and the
//! ServiceAccount controllers.

use crate::kube::Kube;
use crate::process::Proc;
use crate::{free_port, repo};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The controllers a cluster without nodes needs: deletion cascades (owner
/// references, namespaces) and ServiceAccounts with their tokens. Node
/// lifecycle stays off: it would taint the test's Nodes, which no kubelet
/// keeps Ready.
const CONTROLLERS: &str = "garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,deployment-controller,replicaset-controller";

pub struct ControlPlane {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    bin: PathBuf,
    dir: tempfile::TempDir,
    // Dropped in reverse order of start: controller manager, apiserver, etcd.
    procs: Vec<Proc>,
}

/// The folder of the built control-plane binaries: builds them on first use
/// (`tests/k8s/control-plane.sh`). `None`, after printing a SKIPPED line, when
/// this machine has no Go toolchain, unless `MODELCACHE_REQUIRE_K8S` is set
/// (CI sets it), which makes that a failure.
pub fn binaries() -> Option<PathBuf> {
    let out = Command::new("bash")
        .arg(repo().join("tests/k8s/control-plane.sh"))
        .output()
        .expect("running tests/k8s/control-plane.sh");
    match out.status.code() {
        Some(0) => Some(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )),
        Some(3) if std::env::var_os("MODELCACHE_REQUIRE_K8S").is_none() => {
            eprintln!(
                "SKIPPED: no Go toolchain, so no real kube-apiserver to test against \
                 (install Go 1.26 and run `bash tests/k8s/control-plane.sh`)"
            );
            None
        }
        _ => panic!(
            "tests/k8s/control-plane.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until
    /// the apiserver is ready and the `default` ServiceAccount exists.
    pub fn start() -> Option<ControlPlane> {
        let bin = binaries()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        make_certificates(&d);
        let (etcd_port, etcd_peer) = (free_port(), free_port());
        let etcd = Proc::spawn(
            Command::new(bin.join("etcd"))
                .arg(format!("--data-dir={}", d.join("etcd").display()))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
                .arg(format!(
                    "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
                ))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"
                ))
                .arg(format!(
                    "--initial-cluster=default=http://127.0.0.1:{etcd_peer}"
                ))
                .args(["--unsafe-no-fsync", "--log-level=warn"]),
            d.join("etcd.log"),
        );
        let port = free_port();
        let file = |name: &str| d.join(name).display().to_string();
        let apiserver = Proc::spawn(
            Command::new(bin.join("kube-apiserver"))
                .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
                .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
                // As envtest: the loopback address cannot back the kubernetes Service.
                .arg("--endpoint-reconciler-type=none")
                .arg(format!("--secure-port={port}"))
                .arg(format!("--cert-dir={}", file("apiserver-certs")))
                .arg(format!("--tls-cert-file={}", file("server.crt")))
                .arg(format!("--tls-private-key-file={}", file("server.key")))
                .arg(format!("--client-ca-file={}", file("ca.crt")))
                .arg("--authorization-mode=RBAC")
                .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
                .arg(format!("--service-account-key-file={}", file("sa.key")))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    file("sa.key")
                ))
                .args([
                    "--service-cluster-ip-range=10.96.0.0/24",
                    "--allow-privileged=true",
                ]),
            d.join("kube-apiserver.log"),
        );
        let mut cp = ControlPlane {
            url: format!("https://127.0.0.1:{port}"),
            bin,
            dir,
            procs: vec![etcd, apiserver],
        };
        cp.write_kubeconfig(
            &cp.dir.path().join("admin.kubeconfig"),
            &format!(
                "client-certificate: {}\n    client-key: {}",
                file("admin.crt"),
                file("admin.key")
            ),
        );
        cp.wait(
            "kube-apiserver to be ready",
            Duration::from_secs(120),
            |cp| (cp.send("GET", "/readyz", None).0 == 200).then_some(()),
        );
        let kcm = Proc::spawn(
            Command::new(cp.bin.join("kube-controller-manager"))
                .arg(format!("--kubeconfig={}", file("admin.kubeconfig")))
                .args(["--leader-elect=false", "--bind-address=127.0.0.1"])
                .arg(format!("--secure-port={}", free_port()))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    file("sa.key")
                ))
                .arg(format!("--root-ca-file={}", file("ca.crt")))
                .arg(format!("--controllers={CONTROLLERS}")),
            d.join("kube-controller-manager.log"),
        );
        cp.procs.push(kcm);
        cp.wait(
            "the default ServiceAccount (the controller manager is running)",
            Duration::from_secs(60),
            |cp| {
                (cp.send(
                    "GET",
                    "/api/v1/namespaces/default/serviceaccounts/default",
                    None,
                )
                .0 == 200)
                    .then_some(())
            },
        );
        Some(cp)
    }

    /// The folder of the test's files (certificates, kubeconfigs, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The test admin's kubeconfig (client certificate in `system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// The upstream kubectl of the same build, as the test admin.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.env("KUBECONFIG", self.admin_kubeconfig());
        cmd
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/name`
    /// with a token from the TokenRequest API, as a pod of it would.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let (code, body) = self.send(
            "POST",
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"),
            Some(&json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 7200}})),
        );
        assert_eq!(code, 201, "a token for {namespace}/{name}: {body}");
        let token = body["status"]["token"]
            .as_str()
            .expect("a token")
            .to_string();
        let path = self
            .dir
            .path()
            .join(format!("{namespace}-{name}.kubeconfig"));
        self.write_kubeconfig(&path, &format!("token: {token}"));
        path
    }

    fn write_kubeconfig(&self, path: &Path, user: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: test\n  user:\n    {user}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test, namespace: default}}\ncurrent-context: test\n",
            self.url,
            self.dir.path().join("ca.crt").display()
        );
        std::fs::write(path, text).expect("writing a kubeconfig");
    }

    fn wait<T>(&mut self, what: &str, timeout: Duration, f: impl Fn(&Self) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            for p in &mut self.procs {
                assert!(
                    !p.exited(),
                    "{what}: {} exited:\n{}",
                    p.log.display(),
                    p.tail(30)
                );
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last lines of every control-plane log, for a failing test.
    pub fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {}\n{}\n", p.log.display(), p.tail(10)))
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(mut p) = self.procs.pop() {
            p.kill();
        }
    }
}

impl Kube for ControlPlane {
    /// One request as the test admin, with curl.
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let d = self.dir.path();
        let content_type = match method {
            "PATCH" => "application/merge-patch+json",
            _ => "application/json",
        };
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-X", method, "-o", "-", "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(d.join("ca.crt"))
            .arg("--cert")
            .arg(d.join("admin.crt"))
            .arg("--key")
            .arg(d.join("admin.key"))
            .args(["-H", &format!("Content-Type: {content_type}")]);
        if let Some(b) = body {
            cmd.args(["--data-binary", &b.to_string()]);
        }
        let out = cmd
            .arg(format!("{}{path}", self.url))
            .output()
            .expect("running curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    fn kubeconfig(&self, component: crate::kube::Component, _: &Path) -> PathBuf {
        self.service_account_kubeconfig("modelcache", component.service_account())
    }
}

/// A CA, the apiserver's serving certificate, the admin's client certificate
/// and the ServiceAccount signing key, made with openssl.
fn make_certificates(d: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=modelcache-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    // Leaves are signed from a CSR with explicit extensions: rustls (kube-rs)
    // refuses an end-entity certificate marked as a CA, which `req -x509` makes.
    let leaf = |name: &str, subject: &str, ext: &str| {
        let file = |x: &str| format!("{name}.{x}");
        let extensions = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{ext}\n"
        );
        std::fs::write(d.join(file("ext")), extensions).expect("writing an extensions file");
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &file("key"),
            "-out",
            &file("csr"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &file("csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &file("ext"),
            "-out",
            &file("crt"),
        ]);
    };
    leaf(
        "server",
        "/CN=kube-apiserver",
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost",
    );
    leaf(
        "admin",
        "/O=system:masters/CN=test-admin",
        "extendedKeyUsage=clientAuth",
    );
    openssl(&["genrsa", "-out", "sa.key", "2048"]);
}
