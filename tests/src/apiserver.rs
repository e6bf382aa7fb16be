//! An emulated Kubernetes API server for the fast end-to-end tests.
//!
//! The same scenarios run against a real kube-apiserver
//! (`control_plane`), which takes minutes to build and seconds to start; this
//! starts in a millisecond. It speaks
//! the Kubernetes REST protocol over HTTP on 127.0.0.1, enough for kube-rs
//! clients and kube-runtime controllers to run unmodified against it, with the
//! same code paths as in production (the binaries just get a kubeconfig):
//!
//! - discovery (`/api`, `/apis`, resource lists, `/version`);
//! - get, list and watch with resourceVersions, bookmarks, timeouts, and 410
//!   Gone for a resourceVersion older than the kept history;
//! - create, update (409 Conflict on a stale resourceVersion), JSON patch,
//!   merge patch and server-side apply with field managers (a manager's fields
//!   that it stops applying are removed; lists are atomic);
//! - status and scale subresources (writes to the main resource leave status
//!   alone and vice versa; `metadata.generation` counts spec changes);
//! - label selectors (`=`, `==`, `!=`, sets of those) and `metadata.name` /
//!   `metadata.namespace` field selectors;
//! - finalizers and `deletionTimestamp`, deletecollection, and garbage
//!   collection of objects whose ownerReferences name a deleted object;
//! - the ModelDeployment CRD's openAPIV3Schema and CEL rules, answered with the
//!   API server's 422 Status shape and messages (via `modelcache_crds::validation`);
//! - the not-ready taint admission puts on new Nodes, and the EndpointSlice
//!   rule that refuses loopback and link-local addresses.
//!
//! It is one process-local store rather than etcd: revisions and watch history
//! are kept in memory, which is what the tests need (docs/real-cluster.md lists
//! what is and is not reproduced).

// Errors here are HTTP responses, returned as they are.
#![allow(clippy::result_large_err)]

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use kube::CustomResourceExt;
use modelcache_crds::validation::CrdValidator;
use modelcache_crds::{ModelDeployment, ModelNode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// A resource type the emulator serves.
struct Kind {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// A custom resource with a status subresource: main-resource writes keep
    /// the stored status, and status writes change nothing else.
    status_subresource: bool,
}

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const KINDS: &[Kind] = &[
    Kind {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status_subresource: false,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        status_subresource: false,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        status_subresource: false,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        status_subresource: false,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
    },
    Kind {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
    },
    Kind {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        status_subresource: false,
    },
    Kind {
        group: "modelcache.io",
        version: "v1alpha1",
        plural: "modeldeployments",
        kind: "ModelDeployment",
        namespaced: true,
        status_subresource: true,
    },
    Kind {
        group: "modelcache.io",
        version: "v1alpha1",
        plural: "modelnodes",
        kind: "ModelNode",
        namespaced: false,
        status_subresource: true,
    },
];

/// How many changes the watch history keeps; older resourceVersions get 410 Gone.
const HISTORY: usize = 50_000;

type Key = (usize, String, String);

#[derive(Debug)]
struct Change {
    rv: u64,
    kind: usize,
    kind_type: &'static str,
    object: Value,
}

#[derive(Default)]
struct Db {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Change>>,
    /// Highest resourceVersion dropped from the history.
    compacted: u64,
    /// Last applied configuration per (object, field manager, subresource).
    applied: HashMap<(Key, String, bool), Value>,
}

struct Server {
    db: Mutex<Db>,
    changes: broadcast::Sender<Arc<Change>>,
    validators: HashMap<usize, CrdValidator>,
    /// Requests served, for the tests' logs.
    requests: std::sync::atomic::AtomicU64,
}

/// A running emulated API server, on a thread with its own runtime (so tests
/// may be sync or async). Dropping it stops it.
pub struct ApiServer {
    pub url: String,
    server: Arc<Server>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl ApiServer {
    pub fn start() -> ApiServer {
        let mut validators = HashMap::new();
        for (crd, plural) in [
            (ModelDeployment::crd(), "modeldeployments"),
            (ModelNode::crd(), "modelnodes"),
        ] {
            let idx = KINDS.iter().position(|k| k.plural == plural).expect("kind");
            validators.insert(
                idx,
                CrdValidator::new(&crd, "v1alpha1").expect("CRD schema"),
            );
        }
        let server = Arc::new(Server {
            db: Mutex::default(),
            changes: broadcast::channel(4096).0,
            validators,
            requests: Default::default(),
        });
        let app = Router::new().fallback(handle).with_state(server.clone());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let _ = addr_tx.send(listener.local_addr().expect("addr"));
                // Stopping drops the runtime, and with it every open watch.
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stopped => {}
                }
            });
        });
        let addr = addr_rx.recv().expect("API server thread started");
        ApiServer {
            url: format!("http://{addr}"),
            server,
            stop: Some(stop),
        }
    }

    /// A kubeconfig file pointing at this server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulated\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {{token: test}}\ncontexts:\n- name: emulated\n  context: {{cluster: emulated, user: test, namespace: default}}\ncurrent-context: emulated\n",
            self.url
        );
        std::fs::write(&path, text).expect("writing kubeconfig");
        path
    }

    /// The stored object, if any (`ns` empty for cluster-scoped kinds).
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let kind = KINDS.iter().position(|k| k.plural == plural)?;
        lock(&self.server.db)
            .objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Every stored object of a kind.
    pub fn list(&self, plural: &str) -> Vec<Value> {
        let Some(kind) = KINDS
            .iter()
            .position(|k| k.plural == plural && k.group != "events.k8s.io")
        else {
            return Vec::new();
        };
        lock(&self.server.db)
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn requests(&self) -> u64 {
        self.server
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The apiserver's EndpointSlice address rule: an endpoint must be
/// reachable from other nodes, so loopback and link-local addresses are refused.
fn invalid_endpoint_address(name: &str, obj: &Value) -> Option<Response> {
    let endpoints = obj["endpoints"].as_array()?;
    for (i, e) in endpoints.iter().enumerate() {
        for (j, a) in e["addresses"].as_array().into_iter().flatten().enumerate() {
            let Some(ip) = a.as_str().and_then(|a| a.parse::<std::net::IpAddr>().ok()) else {
                continue;
            };
            let why = if ip.is_loopback() {
                "may not be in the loopback range (127.0.0.0/8, ::1/128)"
            } else if matches!(ip, std::net::IpAddr::V4(v4) if v4.is_link_local()) {
                "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
            } else {
                continue;
            };
            let field = format!("endpoints[{i}].addresses[{j}]");
            return Some(status(
                422,
                "Invalid",
                format!("EndpointSlice.discovery.k8s.io \"{name}\" is invalid: {field}: Invalid value: \"{ip}\": {why}"),
                Some(json!({"name": name, "group": "discovery.k8s.io", "kind": "EndpointSlice", "causes": [{"reason": "FieldValueInvalid", "message": format!("Invalid value: \"{ip}\": {why}"), "field": field}]})),
            ));
        }
    }
    None
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The API server's `Status` error body.
fn status(code: u16, reason: &str, message: String, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn created(v: &Value) -> Response {
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn not_found(kind: &Kind, name: &str) -> Response {
    status(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", kind.resource()),
        Some(json!({"name": name, "group": kind.group, "kind": kind.plural})),
    )
}

/// What a request addresses.
struct Target {
    kind: usize,
    ns: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match seg.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] => (ns.to_string(), [&[*plural][..], tail].concat()),
        _ => (String::new(), rest.to_vec()),
    };
    let plural = *rest.first()?;
    let kind = KINDS
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)?;
    // Namespaced kinds are listed across namespaces without one; nothing else lacks one.
    let namespaced = KINDS[kind].namespaced;
    if (!namespaced && !ns.is_empty()) || (namespaced && ns.is_empty() && rest.len() > 1) {
        return None;
    }
    Some(Target {
        kind,
        ns,
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (!k.is_empty()).then(|| (k.to_string(), decode(v)))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=b,c!=d,e` label selector (equality-based, plus existence).
fn labels_match(obj: &Value, selector: &str) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels[k.trim()].as_str() == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            labels.get(k.trim()).is_none()
        } else {
            labels.get(term.trim()).is_some()
        }
    })
}

fn fields_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v, eq) = match term.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((k, v)) => (k, v, true),
                None => return false,
            },
        };
        let have = match k.trim() {
            "metadata.name" => obj["metadata"]["name"].as_str(),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str(),
            _ => None,
        };
        (have == Some(v.trim())) == eq
    })
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn handle(
    State(s): State<Arc<Server>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = uri.path();
    if let Some(r) = discovery(path) {
        return r;
    }
    let Some(t) = parse_path(path) else {
        return status(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
            None,
        );
    };
    let q = query(&uri);
    let body: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                return status(
                    400,
                    "BadRequest",
                    format!("the body of the request was in an unknown format: {e}"),
                    None,
                )
            }
        }
    };
    let kind = &KINDS[t.kind];
    match (&method, &t.name) {
        (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(s, t, q).await
        }
        (&Method::GET, None) => list(&s, &t, &q),
        (&Method::GET, Some(name)) => {
            match lock(&s.db)
                .objects
                .get(&(t.kind, t.ns.clone(), name.clone()))
            {
                Some(obj) if t.sub.as_deref() == Some("scale") => ok(&scale_of(obj)),
                Some(obj) => ok(obj),
                None => not_found(kind, name),
            }
        }
        (&Method::POST, None) => match body {
            Some(obj) => s.create(&t, obj),
            None => status(400, "BadRequest", "empty body".into(), None),
        },
        (&Method::PUT, Some(name)) => match body {
            Some(obj) => s.update(&t, name, |_| Ok(obj), false),
            None => status(400, "BadRequest", "empty body".into(), None),
        },
        (&Method::PATCH, Some(name)) => {
            let ct = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let Some(patch) = body else {
                return status(400, "BadRequest", "empty patch".into(), None);
            };
            s.patch(&t, name, &ct, patch, &q)
        }
        (&Method::DELETE, Some(name)) => {
            let mut db = lock(&s.db);
            match s.delete(&mut db, &(t.kind, t.ns.clone(), name.clone())) {
                Some(obj) => ok(&obj),
                None => not_found(kind, name),
            }
        }
        (&Method::DELETE, None) => {
            let mut db = lock(&s.db);
            let keys: Vec<Key> = db
                .objects
                .iter()
                .filter(|((k, ns, _), v)| {
                    *k == t.kind
                        && (t.ns.is_empty() || *ns == t.ns)
                        && q.get("labelSelector")
                            .is_none_or(|sel| labels_match(v, sel))
                })
                .map(|(k, _)| k.clone())
                .collect();
            let items: Vec<Value> = keys.iter().filter_map(|k| s.delete(&mut db, k)).collect();
            ok(
                &json!({"apiVersion": kind.api_version(), "kind": format!("{}List", kind.kind), "metadata": {"resourceVersion": db.rv.to_string()}, "items": items}),
            )
        }
        _ => status(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
            None,
        ),
    }
}

/// The autoscaling/v1 Scale of an object. As in the API server (Go's
/// `omitempty`), zero replicas are left out of `spec`.
fn scale_of(obj: &Value) -> Value {
    let replicas = obj["spec"]["replicas"].as_i64().unwrap_or(0);
    let spec = if replicas == 0 {
        json!({})
    } else {
        json!({"replicas": replicas})
    };
    json!({
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {"name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"], "resourceVersion": obj["metadata"]["resourceVersion"]},
        "spec": spec,
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": obj["status"]["selector"]},
    })
}

fn discovery(path: &str) -> Option<Response> {
    let resources = |group: &str, version: &str| {
        let list: Vec<Value> = KINDS
            .iter()
            .filter(|k| k.group == group && k.version == version)
            .flat_map(|k| {
                let verbs = json!(["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]);
                let mut v = vec![json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced, "kind": k.kind, "verbs": verbs})];
                if k.status_subresource {
                    v.push(json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"]}));
                }
                v
            })
            .collect();
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        ok(
            &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
        )
    };
    match path.trim_end_matches('/') {
        "/version" => Some(ok(
            &json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0-modelcache-emulated", "platform": "linux/amd64"}),
        )),
        "/api" => Some(ok(
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        )),
        "/api/v1" => Some(resources("", "v1")),
        "/apis" => {
            let mut groups: Vec<(&str, &str)> = KINDS
                .iter()
                .filter(|k| !k.group.is_empty())
                .map(|k| (k.group, k.version))
                .collect();
            groups.dedup();
            let groups: Vec<Value> = groups
                .iter()
                .map(|(g, v)| json!({"name": g, "versions": [{"groupVersion": format!("{g}/{v}"), "version": v}], "preferredVersion": {"groupVersion": format!("{g}/{v}"), "version": v}}))
                .collect();
            Some(ok(
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ))
        }
        p => {
            let seg: Vec<&str> = p.trim_matches('/').split('/').collect();
            match seg.as_slice() {
                ["apis", g, v] if KINDS.iter().any(|k| k.group == *g && k.version == *v) => {
                    Some(resources(g, v))
                }
                _ => None,
            }
        }
    }
}

fn list(s: &Server, t: &Target, q: &HashMap<String, String>) -> Response {
    let kind = &KINDS[t.kind];
    let db = lock(&s.db);
    let items: Vec<Value> = db
        .objects
        .iter()
        .filter(|((k, ns, _), v)| {
            *k == t.kind
                && (t.ns.is_empty() || *ns == t.ns)
                && q.get("labelSelector")
                    .is_none_or(|sel| labels_match(v, sel))
                && q.get("fieldSelector")
                    .is_none_or(|sel| fields_match(v, sel))
        })
        .map(|(_, v)| v.clone())
        .collect();
    ok(&json!({
        "apiVersion": kind.api_version(), "kind": format!("{}List", kind.kind),
        "metadata": {"resourceVersion": db.rv.to_string()}, "items": items,
    }))
}

async fn watch(s: Arc<Server>, t: Target, q: HashMap<String, String>) -> Response {
    let kind = &KINDS[t.kind];
    let matches = {
        let (ns, labels, fields) = (
            t.ns.clone(),
            q.get("labelSelector").cloned(),
            q.get("fieldSelector").cloned(),
        );
        move |k: usize, obj: &Value| {
            k == t.kind
                && (ns.is_empty() || obj["metadata"]["namespace"].as_str() == Some(ns.as_str()))
                && labels.as_deref().is_none_or(|sel| labels_match(obj, sel))
                && fields.as_deref().is_none_or(|sel| fields_match(obj, sel))
        }
    };
    let from: Option<u64> = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    // Subscribe under the lock, so nothing falls between the backlog and the live feed.
    let (mut rx, backlog, gone) = {
        let db = lock(&s.db);
        let rx = s.changes.subscribe();
        match from {
            Some(rv) if rv < db.compacted => (rx, Vec::new(), true),
            Some(rv) => (
                rx,
                db.history
                    .iter()
                    .filter(|c| c.rv > rv && matches(c.kind, &c.object))
                    .map(|c| (c.rv, c.kind_type, c.object.clone()))
                    .collect(),
                false,
            ),
            None => (
                rx,
                db.objects
                    .iter()
                    .filter(|((k, _, _), v)| matches(*k, v))
                    .map(|(_, v)| (rv_of(v), "ADDED", v.clone()))
                    .collect::<Vec<_>>(),
                false,
            ),
        }
    };
    let (tx, body_rx) =
        futures::channel::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
    let (kind_name, api_version) = (kind.kind, kind.api_version());
    let current_rv = move || lock(&s.db).rv;
    tokio::spawn(async move {
        use futures::SinkExt;
        let mut tx = tx;
        let line = |ty: &str, obj: &Value| {
            Ok(Bytes::from(format!(
                "{}\n",
                json!({"type": ty, "object": obj})
            )))
        };
        if gone {
            let st = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410});
            let _ = tx.send(line("ERROR", &st)).await;
            return;
        }
        let mut last = from.unwrap_or(0);
        for (rv, ty, obj) in backlog {
            last = last.max(rv);
            if tx.send(line(ty, &obj)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                change = rx.recv() => match change {
                    Ok(c) if c.rv > last && matches(c.kind, &c.object) => {
                        last = c.rv;
                        if tx.send(line(c.kind_type, &c.object)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Too slow a reader: end the watch; the client resumes from its last rv.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let rv = current_rv().max(last);
                    let mark = json!({"kind": kind_name, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(line("BOOKMARK", &mark)).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => return,
            }
        }
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(body_rx),
    )
        .into_response()
}

/// Removes from `live` what `prev` applied and `new` no longer does (lists are atomic).
fn remove_unapplied(live: &mut Value, prev: &Value, new: &Value) {
    let (Value::Object(live), Value::Object(prev)) = (live, prev) else {
        return;
    };
    for (k, pv) in prev {
        match new.get(k) {
            None => {
                live.remove(k);
            }
            Some(nv) if pv.is_object() && nv.is_object() => {
                if let Some(lv) = live.get_mut(k) {
                    remove_unapplied(lv, pv, nv);
                }
            }
            Some(_) => {}
        }
    }
}

/// Server-side apply's merge: objects merge by key, everything else replaces.
fn merge_applied(live: &mut Value, new: &Value) {
    match (live, new) {
        (Value::Object(l), Value::Object(n)) => {
            for (k, nv) in n {
                match l.get_mut(k) {
                    Some(lv) if lv.is_object() && nv.is_object() => merge_applied(lv, nv),
                    _ => {
                        l.insert(k.clone(), nv.clone());
                    }
                }
            }
        }
        (l, n) => *l = n.clone(),
    }
}

impl Server {
    fn record(&self, db: &mut Db, kind: usize, kind_type: &'static str, object: Value) {
        let change = Arc::new(Change {
            rv: db.rv,
            kind,
            kind_type,
            object,
        });
        db.history.push_back(change.clone());
        while db.history.len() > HISTORY {
            if let Some(old) = db.history.pop_front() {
                db.compacted = old.rv;
            }
        }
        let _ = self.changes.send(change);
    }

    fn invalid(
        &self,
        kind: usize,
        name: &str,
        obj: &Value,
        old: Option<&Value>,
    ) -> Option<Response> {
        if KINDS[kind].plural == "endpointslices" {
            return invalid_endpoint_address(name, obj);
        }
        let v = self.validators.get(&kind)?;
        let errors = v.validate(obj, old);
        if errors.is_empty() {
            return None;
        }
        let k = &KINDS[kind];
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({"reason": e.reason, "message": e.message, "field": e.path}))
            .collect();
        Some(status(
            422,
            "Invalid",
            v.invalid_message(name, &errors),
            Some(json!({"name": name, "group": k.group, "kind": k.kind, "causes": causes})),
        ))
    }

    fn create(&self, t: &Target, mut obj: Value) -> Response {
        let kind = &KINDS[t.kind];
        let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
            return status(400, "BadRequest", "metadata is required".into(), None);
        };
        let mut db = lock(&self.db);
        let name = match (meta.get("name").and_then(Value::as_str), meta.get("generateName").and_then(Value::as_str)) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(prefix)) => format!("{prefix}{:05x}", db.uid + 1),
            _ => return status(422, "Invalid", format!("{} \"\" is invalid: metadata.name: Required value: name or generateName is required", kind.kind), None),
        };
        if kind.namespaced {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or(&t.ns)
                .to_string();
            if ns != t.ns {
                return status(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request".into(), None);
            }
            meta.insert("namespace".into(), t.ns.clone().into());
        }
        meta.insert("name".into(), name.clone().into());
        let key = (t.kind, t.ns.clone(), name.clone());
        if db.objects.contains_key(&key) {
            return status(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.resource()),
                Some(json!({"name": name, "group": kind.group, "kind": kind.plural})),
            );
        }
        if kind.status_subresource {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        // The TaintNodesByCondition admission plugin: a new Node is not Ready
        // until its kubelet says so (the node lifecycle controller then lifts it).
        if kind.plural == "nodes" {
            let taint = json!({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"});
            if let Some(spec) = obj
                .as_object_mut()
                .map(|m| m.entry("spec").or_insert_with(|| json!({})))
                .and_then(Value::as_object_mut)
            {
                let taints = spec.entry("taints").or_insert_with(|| json!([]));
                if let Some(list) = taints.as_array_mut() {
                    list.push(taint);
                }
            }
        }
        if let Some(r) = self.invalid(t.kind, &name, &obj, None) {
            return r;
        }
        if let Some(v) = self.validators.get(&t.kind) {
            obj = v.apply_defaults(&obj);
        }
        db.rv += 1;
        db.uid += 1;
        let (rv, uid) = (db.rv, db.uid);
        obj["apiVersion"] = kind.api_version().into();
        obj["kind"] = kind.kind.into();
        let meta = &mut obj["metadata"];
        meta["uid"] = format!("00000000-0000-4000-8000-{uid:012x}").into();
        meta["creationTimestamp"] = now().into();
        meta["resourceVersion"] = rv.to_string().into();
        if self.validators.contains_key(&t.kind) {
            meta["generation"] = 1.into();
        }
        db.objects.insert(key, obj.clone());
        self.record(&mut db, t.kind, "ADDED", obj.clone());
        created(&obj)
    }

    /// Replaces an object with `f(current)`, with the API server's rules for
    /// subresources, resourceVersion conflicts, generation and finalizers.
    fn update(
        &self,
        t: &Target,
        name: &str,
        f: impl FnOnce(&Value) -> Result<Value, Response>,
        ignore_rv: bool,
    ) -> Response {
        let kind = &KINDS[t.kind];
        let key = (t.kind, t.ns.clone(), name.to_string());
        let mut db = lock(&self.db);
        let Some(current) = db.objects.get(&key).cloned() else {
            return not_found(kind, name);
        };
        let incoming = match f(&current) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let sent_rv = incoming["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if !ignore_rv
            && !sent_rv.is_empty()
            && sent_rv
                != current["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
        {
            return status(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", kind.resource()),
                Some(json!({"name": name, "group": kind.group, "kind": kind.plural})),
            );
        }
        let mut new = match t.sub.as_deref() {
            Some("status") => {
                let mut n = current.clone();
                n["status"] = incoming.get("status").cloned().unwrap_or(Value::Null);
                if n["status"].is_null() {
                    n.as_object_mut().map(|m| m.remove("status"));
                }
                n
            }
            Some("scale") => {
                let mut n = current.clone();
                n["spec"]["replicas"] = incoming["spec"]["replicas"].as_i64().unwrap_or(0).into();
                n
            }
            _ => {
                let mut n = incoming;
                if kind.status_subresource {
                    match current.get("status") {
                        Some(st) => n["status"] = st.clone(),
                        None => {
                            n.as_object_mut().map(|m| m.remove("status"));
                        }
                    }
                }
                n
            }
        };
        // What the server owns stays as stored.
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "namespace",
            "name",
            "generation",
            "resourceVersion",
        ] {
            match current["metadata"].get(k) {
                Some(v) => new["metadata"][k] = v.clone(),
                None => {
                    new["metadata"].as_object_mut().map(|m| m.remove(k));
                }
            }
        }
        new["apiVersion"] = kind.api_version().into();
        new["kind"] = kind.kind.into();
        if let Some(v) = self.validators.get(&t.kind) {
            new = v.apply_defaults(&new);
        }
        if let Some(r) = self.invalid(t.kind, name, &new, Some(&current)) {
            return r;
        }
        if new == current {
            return ok(&current);
        }
        if self.validators.contains_key(&t.kind) && new.get("spec") != current.get("spec") {
            new["metadata"]["generation"] =
                (current["metadata"]["generation"].as_i64().unwrap_or(0) + 1).into();
        }
        db.rv += 1;
        new["metadata"]["resourceVersion"] = db.rv.to_string().into();
        let finalized = new["metadata"]["deletionTimestamp"].is_string()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        db.objects.insert(key.clone(), new.clone());
        self.record(&mut db, t.kind, "MODIFIED", new.clone());
        if finalized {
            self.delete(&mut db, &key);
        }
        if t.sub.as_deref() == Some("scale") {
            return ok(&scale_of(&new));
        }
        ok(&new)
    }

    fn patch(
        &self,
        t: &Target,
        name: &str,
        content_type: &str,
        patch: Value,
        q: &HashMap<String, String>,
    ) -> Response {
        let kind = &KINDS[t.kind];
        let key = (t.kind, t.ns.clone(), name.to_string());
        let is_status = t.sub.as_deref() == Some("status");
        if content_type.starts_with("application/apply-patch") {
            let Some(manager) = q.get("fieldManager").filter(|m| !m.is_empty()).cloned() else {
                return status(
                    400,
                    "BadRequest",
                    "PATCH requests with apply content type require fieldManager".into(),
                    None,
                );
            };
            let exists = lock(&self.db).objects.contains_key(&key);
            if !exists {
                if is_status {
                    return not_found(kind, name);
                }
                let mut obj = patch.clone();
                obj["metadata"]["name"] = name.into();
                let r = self.create(t, obj);
                if r.status() == StatusCode::CREATED {
                    lock(&self.db).applied.insert((key, manager, false), patch);
                }
                return r;
            }
            let prev = lock(&self.db)
                .applied
                .get(&(key.clone(), manager.clone(), is_status))
                .cloned();
            let applied = patch.clone();
            let r = self.update(
                t,
                name,
                |current| {
                    let mut live = current.clone();
                    // Only the fields this request may set take part.
                    let (scope_new, scope_prev) = if is_status {
                        (json!({"status": patch.get("status").cloned().unwrap_or(json!({}))}), prev.map(|p| json!({"status": p.get("status").cloned().unwrap_or(json!({}))})))
                    } else {
                        let strip = |v: &Value| {
                            let mut v = v.clone();
                            v.as_object_mut().map(|m| m.remove("status"));
                            v
                        };
                        (strip(&patch), prev.as_ref().map(strip))
                    };
                    if let Some(p) = scope_prev {
                        remove_unapplied(&mut live, &p, &scope_new);
                    }
                    merge_applied(&mut live, &scope_new);
                    Ok(live)
                },
                true,
            );
            if r.status().is_success() {
                lock(&self.db)
                    .applied
                    .insert((key, manager, is_status), applied);
            }
            return r;
        }
        let json_patch = content_type.starts_with("application/json-patch");
        self.update(
            t,
            name,
            |current| {
                let mut doc = if t.sub.as_deref() == Some("scale") { scale_of(current) } else { current.clone() };
                if json_patch {
                    // As in the API server (evanphx/json-patch), testing a missing path
                    // for null succeeds: kube-runtime's finalizer helper relies on it.
                    let ops: Vec<Value> = patch
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|op| {
                            !(op["op"] == "test"
                                && op["value"].is_null()
                                && op["path"].as_str().is_some_and(|p| doc.pointer(p).is_none()))
                        })
                        .collect();
                    let ops: json_patch::Patch = serde_json::from_value(Value::Array(ops)).map_err(|e| status(400, "BadRequest", format!("invalid JSON patch: {e}"), None))?;
                    json_patch::patch(&mut doc, &ops).map_err(|e| status(422, "Invalid", format!("the server rejected our request due to an error in our request: {e}"), None))?;
                } else {
                    json_patch::merge(&mut doc, &patch);
                }
                Ok(doc)
            },
            false,
        )
    }

    /// Deletes (or, with finalizers, marks for deletion) and collects what it owned.
    fn delete(&self, db: &mut Db, key: &Key) -> Option<Value> {
        let mut obj = db.objects.get(key)?.clone();
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if !obj["metadata"]["deletionTimestamp"].is_string() {
                db.rv += 1;
                obj["metadata"]["deletionTimestamp"] = now().into();
                obj["metadata"]["resourceVersion"] = db.rv.to_string().into();
                db.objects.insert(key.clone(), obj.clone());
                self.record(db, key.0, "MODIFIED", obj.clone());
            }
            return Some(obj);
        }
        db.objects.remove(key);
        db.applied.retain(|(k, _, _), _| k != key);
        db.rv += 1;
        obj["metadata"]["resourceVersion"] = db.rv.to_string().into();
        self.record(db, key.0, "DELETED", obj.clone());
        // Garbage collection (background propagation) of dependents.
        if let Some(uid) = obj["metadata"]["uid"].as_str() {
            let owned: Vec<Key> = db
                .objects
                .iter()
                .filter(|(_, v)| {
                    v["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in owned {
                self.delete(db, &k);
            }
        }
        Some(obj)
    }
}

impl crate::kube::Kube for ApiServer {
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        use std::io::{Read, Write};
        let addr = self.url.trim_start_matches("http://").to_string();
        let content_type = match method {
            "PATCH" => "application/merge-patch+json",
            _ => "application/json",
        };
        let body = body.map(Value::to_string).unwrap_or_default();
        let Ok(mut s) = std::net::TcpStream::connect(&addr) else {
            return (0, Value::Null);
        };
        let sent = write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let mut raw = Vec::new();
        if sent.is_err() || s.read_to_end(&mut raw).is_err() {
            return (0, Value::Null);
        }
        let text = String::from_utf8_lossy(&raw);
        let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text
            .find("\r\n\r\n")
            .and_then(|i| serde_json::from_str(&text[i + 4..]).ok())
            .unwrap_or(Value::Null);
        (code, body)
    }

    /// The emulation authorizes everyone: one kubeconfig for all.
    fn kubeconfig(&self, _: crate::kube::Component, dir: &std::path::Path) -> std::path::PathBuf {
        self.kubeconfig(dir)
    }
}
