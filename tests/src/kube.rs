//! What the end-to-end scenarios need of an API server, so that the same
//! scenarios run against the in-repo emulation and a real kube-apiserver.

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Who a kubeconfig authenticates as.
#[derive(Clone, Copy, Debug)]
pub enum Component {
    Operator,
    Agent,
    Gateway,
}

impl Component {
    /// The chart's ServiceAccount of the component (release `modelcache`).
    pub fn service_account(self) -> &'static str {
        match self {
            Component::Operator => "modelcache-operator",
            Component::Agent => "modelcache-agent",
            Component::Gateway => "modelcache-gateway",
        }
    }
}

pub trait Kube {
    /// One request as `kubectl` would send it (a PATCH is a JSON merge patch):
    /// status and JSON body.
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value);

    /// A GET that waits out 429s, as clients do: a real apiserver answers 429
    /// "storage is (re)initializing" for a moment after a CRD is established.
    fn read(&self, path: &str) -> (u16, Value) {
        for _ in 0..60 {
            let (code, body) = self.send("GET", path, None);
            if code != 429 {
                return (code, body);
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        self.send("GET", path, None)
    }

    /// A kubeconfig for one of the project's processes, written under `dir`.
    fn kubeconfig(&self, component: Component, dir: &Path) -> PathBuf;

    /// The object, if it exists (`ns` empty for cluster-scoped kinds).
    fn object(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let (code, body) = self.read(&path(plural, ns, Some(name)));
        (code == 200).then_some(body)
    }

    /// Every object of a kind, in all namespaces.
    fn objects(&self, plural: &str) -> Vec<Value> {
        let (code, body) = self.read(&path(plural, "", None));
        assert_eq!(code, 200, "listing {plural}: {body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }
}

/// The REST path of a kind (`ns` empty: cluster-scoped, or all namespaces).
pub fn path(plural: &str, ns: &str, name: Option<&str>) -> String {
    let prefix = match plural {
        "modeldeployments" | "modelnodes" => "/apis/modelcache.io/v1alpha1",
        "endpointslices" => "/apis/discovery.k8s.io/v1",
        "leases" => "/apis/coordination.k8s.io/v1",
        "events" => "/apis/events.k8s.io/v1",
        _ => "/api/v1",
    };
    let mut p = prefix.to_string();
    if !ns.is_empty() {
        p.push_str(&format!("/namespaces/{ns}"));
    }
    p.push('/');
    p.push_str(plural);
    if let Some(name) = name {
        p.push('/');
        p.push_str(name);
    }
    p
}
