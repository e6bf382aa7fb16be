//! The agent's HTTP API, over real HTTP on 127.0.0.1 against the running binary.

use crate::common::{copy_dir, fixtures};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running agent serving a copy of the tiny-sd1 fixture as `tiny`.
pub(crate) struct Agent {
    child: Child,
    pub(crate) api: String,
    pub(crate) metrics: String,
    /// Every JSON log line the agent has written so far.
    pub(crate) logs: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    _dir: tempfile::TempDir,
}

impl Agent {
    pub(crate) fn start(extra: &[&str]) -> Agent {
        Agent::start_with(
            |models| {
                copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny"));
                copy_dir(&fixtures().join("tiny-sd1-lora"), &models.join("loras"));
            },
            extra,
        )
    }

    /// An agent whose models folder `fill` writes.
    pub(crate) fn start_with(fill: impl FnOnce(&Path), extra: &[&str]) -> Agent {
        Agent::start_configured(fill, extra, |_| {})
    }

    /// [`Agent::start_with`], with `configure` adjusting the command first.
    pub(crate) fn start_configured(
        fill: impl FnOnce(&Path),
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("models")).unwrap();
        fill(&dir.path().join("models"));
        let mut cmd = serve_command(dir.path(), &["--log-format", "json"], extra);
        cmd.env("RUST_LOG", "info");
        configure(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["fields"]["message"] == "serving" {
                        let _ = tx.send((
                            v["fields"]["api"].as_str().unwrap_or("").to_string(),
                            v["fields"]["metrics"].as_str().unwrap_or("").to_string(),
                        ));
                    }
                    kept.lock().unwrap().push(v);
                }
            }
        });
        let (api, metrics) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("agent did not start");
        Agent {
            child,
            api,
            metrics,
            logs,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) struct Reply {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close`.
pub(crate) fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| {
            l.split_once(": ")
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n =
            usize::from_str_radix(std::str::from_utf8(&b[..end]).unwrap().trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[end + 2..end + 2 + n]);
        b = &b[end + 2 + n + 2..];
    }
}

pub(crate) fn post(addr: &str, body: serde_json::Value) -> Reply {
    http(
        addr,
        "POST",
        "/v1/images/generations",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

pub(crate) fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    )
}

pub(crate) fn decode_b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn generates_pngs_of_the_requested_size_and_lists_models() {
    let agent = Agent::start(&[]);
    let r = post(
        &agent.api,
        serde_json::json!({"model": "tiny", "prompt": "a red cat", "size": "64x72", "steps": 2, "n": 2, "seed": 3}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    let data = j["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for d in data {
        assert_eq!(
            png_size(&decode_b64(d["b64_json"].as_str().unwrap())),
            (64, 72)
        );
    }
    // Same seed, same image.
    let again = post(&agent.api, serde_json::json!({"model": "tiny", "prompt": "a red cat", "size": "64x72", "steps": 2, "n": 2, "seed": 3})).json();
    assert_eq!(again["data"][0], j["data"][0]);
    let models = http(&agent.api, "GET", "/v1/models", &[], b"").json();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["tier"], "vram");
    assert_eq!(http(&agent.api, "GET", "/healthz", &[], b"").status, 200);
    assert_eq!(http(&agent.api, "GET", "/readyz", &[], b"").status, 200);
}

/// The access-log line of the request with `id`, once the agent has written it.
fn access_line(agent: &Agent, id: &str) -> serde_json::Value {
    for _ in 0..100 {
        let found = agent.logs.lock().unwrap().iter().find_map(|v| {
            (v["fields"]["message"] == "served" && v["span"]["request_id"] == id).then(|| v.clone())
        });
        if let Some(v) = found {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no access-log line for request {id}");
}

#[test]
fn every_request_gets_an_id_and_an_access_log_line() {
    let agent = Agent::start(&[]);
    let r = post(
        &agent.api,
        serde_json::json!({"model": "tiny", "prompt": "a red cat", "size": "64x64", "steps": 1, "seed": 1}),
    );
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").expect("a request id").to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let line = access_line(&agent, &id);
    let span = &line["span"];
    assert_eq!(
        (&span["method"], &span["path"], &span["model"]),
        (
            &serde_json::json!("POST"),
            &serde_json::json!("/v1/images/generations"),
            &serde_json::json!("tiny")
        ),
        "{line}"
    );
    assert_eq!(line["fields"]["status"], 200, "{line}");
    assert!(
        line["fields"]["latency_ms"].as_f64().unwrap() > 0.0,
        "{line}"
    );
    // The generation's own log lines carry the same id.
    let generation_lines = agent
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter(|v| v["span"]["request_id"] == id.as_str() && v["fields"]["message"] != "served")
        .count();
    assert!(
        generation_lines > 0,
        "no log line of the generation names request {id}"
    );

    // A caller's own id (a gateway's) is kept, errors are logged too, and
    // the probes stay out of the access log.
    let r = http(
        &agent.api,
        "POST",
        "/v1/images/generations",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "gw-42"),
        ],
        b"{not json",
    );
    assert_eq!((r.status, r.header("x-request-id")), (400, Some("gw-42")));
    assert_eq!(access_line(&agent, "gw-42")["fields"]["status"], 400);
    let r = http(
        &agent.api,
        "GET",
        "/nowhere",
        &[("x-request-id", "lost-1")],
        b"",
    );
    assert_eq!((r.status, error_code(&r).as_str()), (404, "not_found"));
    assert_eq!(access_line(&agent, "lost-1")["fields"]["status"], 404);
    assert_eq!(http(&agent.api, "GET", "/healthz", &[], b"").status, 200);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !agent
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|v| v["span"]["path"] == "/healthz"),
        "health probes are not access-logged"
    );
}

pub(crate) fn error_code(r: &Reply) -> String {
    let j = r.json();
    assert!(
        j["error"]["message"].is_string() && j["error"]["type"].is_string(),
        "OpenAI error shape: {j}"
    );
    j["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[test]
fn loras_from_the_models_folder_change_the_image() {
    let agent = Agent::start(&[]);
    let body = |loras: serde_json::Value| serde_json::json!({"model": "tiny", "prompt": "a red cat", "size": "64x64", "steps": 2, "seed": 9, "loras": loras});
    let plain = post(&agent.api, body(serde_json::json!([])));
    let with = post(
        &agent.api,
        body(serde_json::json!([{"path": "loras/tiny-sd1-lora.safetensors", "weight": 0.8}])),
    );
    assert_eq!(
        (plain.status, with.status),
        (200, 200),
        "{}",
        String::from_utf8_lossy(&with.body)
    );
    assert_ne!(plain.json()["data"][0], with.json()["data"][0]);
    for (path, weight) in [
        ("../tiny/unet/diffusion_pytorch_model.safetensors", 1.0),
        ("/etc/passwd", 1.0),
        ("loras/missing.safetensors", 1.0),
        ("loras/tiny-sd1-lora.safetensors", 5.0),
    ] {
        let r = post(
            &agent.api,
            body(serde_json::json!([{"path": path, "weight": weight}])),
        );
        assert_eq!(
            (r.status, error_code(&r).as_str()),
            (400, "invalid_value"),
            "{path}"
        );
    }
}

#[test]
fn every_error_path_has_its_status_and_openai_shape() {
    let agent = Agent::start(&[]);
    let a = &agent.api;
    let base = serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": 1});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    // Each 400 names the field at fault in `param`, as OpenAI's errors do.
    for (field, value) in [
        ("size", "65x64".into()),
        ("size", "4096x4096".into()),
        ("prompt", "   ".into()),
        ("prompt", "x".repeat(5000).into()),
        ("steps", 0.into()),
        ("steps", 151.into()),
        ("n", 5.into()),
        ("guidance_scale", 31.into()),
        ("scheduler", "plms9".into()),
        ("response_format", "url".into()),
        ("seamless", "z".into()),
        ("seamless", 3.into()),
        ("clip_skip", 13.into()),
        ("loras", serde_json::json!([{"path": "a.safetensors"}])),
        ("partial_images", 4.into()),
        ("vae", "tiny".into()),
    ] {
        let body = with(field, value);
        let r = post(a, body.clone());
        assert_eq!(
            (r.status, error_code(&r)),
            (400, "invalid_value".to_string()),
            "{body}"
        );
        assert_eq!(r.json()["error"]["param"], field, "{body}");
    }
    let r = http(
        a,
        "POST",
        "/v1/images/generations",
        &[("content-type", "application/json")],
        b"{not json",
    );
    assert_eq!(r.status, 400);
    error_code(&r);
    let r = post(a, with("model", "nope".into()));
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (404, "model_not_found")
    );
    assert_eq!(r.json()["error"]["param"], "model");
    let big = serde_json::json!({"model": "tiny", "prompt": "x".repeat(100_000)});
    let r = post(a, big);
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (413, "request_too_large")
    );
}

#[test]
fn bearer_token_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let agent = Agent::start(&["--api-token-file", token.to_str().unwrap()]);
    let body = serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": 1})
        .to_string();
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cre"),
        Some("s3cret"),
    ] {
        let mut h = vec![("content-type", "application/json")];
        if let Some(v) = auth {
            h.push(("authorization", v));
        }
        let r = http(
            &agent.api,
            "POST",
            "/v1/images/generations",
            &h,
            body.as_bytes(),
        );
        assert_eq!(
            (r.status, error_code(&r).as_str()),
            (401, "invalid_api_key"),
            "{auth:?}"
        );
    }
    let r = http(
        &agent.api,
        "POST",
        "/v1/images/generations",
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer s3cret"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(http(&agent.api, "GET", "/v1/models", &[], b"").status, 401);
}

/// Runs `serve` with `extra` and waits (at most 60 s) for it to exit; its exit
/// status and stderr. Killed if it is still running then.
fn serve_exits(extra: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let child = serve_command(dir.path(), &[], extra).spawn().unwrap();
    crate::common::wait_exit(child, Duration::from_secs(60))
}

/// `modelcache-agent <global> serve <args>` on ephemeral loopback ports with
/// `models/` and `state/` under `dir`; stderr piped.
fn serve_command(dir: &Path, global: &[&str], args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelcache-agent"));
    cmd.args(global)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--models-dir")
        .arg(dir.join("models"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn an_empty_token_file_refuses_to_start_and_a_short_one_warns() {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in [("empty", ""), ("blank", " \n\t\n")] {
        let token = dir.path().join(name);
        std::fs::write(&token, content).unwrap();
        let (status, err) = serve_exits(&["--api-token-file", token.to_str().unwrap()]);
        assert_eq!(
            status,
            Some(1),
            "{name}: must not serve without authentication: {err}"
        );
        assert!(
            err.contains("--api-token-file") && err.contains("is empty"),
            "{err}"
        );
    }
    let token = dir.path().join("short");
    std::fs::write(&token, "abc\n").unwrap();
    let agent = Agent::start(&["--api-token-file", token.to_str().unwrap()]);
    let warned = agent.logs.lock().unwrap().iter().any(|v| {
        v["level"] == "WARN"
            && v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("shorter than 16 characters"))
    });
    assert!(warned, "no warning about a 3-character token");
}

/// The value of a metric series (a line starting with `series`), if present.
pub(crate) fn metric(agent: &Agent, series: &str) -> Option<f64> {
    let r = http(&agent.metrics, "GET", "/metrics", &[], b"");
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// Sends a generation request and closes the connection after `after`,
/// without reading the reply: a client that gave up.
fn abandon(addr: &str, body: serde_json::Value, after: Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(after);
    drop(s);
}

#[test]
fn clients_that_give_up_leave_the_queue_and_are_counted_as_499() {
    let agent = Agent::start(&["--concurrency", "1", "--queue-size", "4"]);
    let quick = serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": 1});
    assert_eq!(
        post(&agent.api, quick.clone()).status,
        200,
        "warm the model"
    );
    // One long generation holds the only slot...
    let api = agent.api.clone();
    let long = std::thread::spawn(move || {
        post(
            &api,
            serde_json::json!({"model": "tiny", "prompt": "y", "size": "64x64", "steps": 60}),
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(300));
    // ...while three clients queue behind it and give up.
    for _ in 0..3 {
        abandon(&agent.api, quick.clone(), Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(&agent, "modelcache_queue_depth "),
        Some(0.0),
        "requests whose clients left are not waiting any more"
    );
    assert_eq!(
        metric(
            &agent,
            "modelcache_generation_requests_total{code=\"499\",model=\"tiny\"} "
        ),
        Some(3.0)
    );
    assert_eq!(long.join().unwrap(), 200);
    // The queue admits as many as before: nothing leaked.
    let burst: Vec<_> = (0..5)
        .map(|_| {
            let (api, q) = (agent.api.clone(), quick.clone());
            std::thread::spawn(move || post(&api, q).status)
        })
        .collect();
    let codes: Vec<u16> = burst.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
}

#[test]
fn the_load_is_reported_on_every_answer_and_by_model() {
    let agent = Agent::start(&["--concurrency", "1"]);
    let load = || http(&agent.metrics, "GET", "/load", &[], b"").json();
    assert_eq!(
        load(),
        serde_json::json!({"in_flight": 0, "waiting": 0, "concurrency": 1, "models": {}})
    );
    let api = agent.api.clone();
    let long = std::thread::spawn(move || {
        post(
            &api,
            serde_json::json!({"model": "tiny", "prompt": "y", "size": "64x64", "steps": 40}),
        )
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while load()["in_flight"] != 1 {
        assert!(std::time::Instant::now() < deadline, "{}", load());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(load()["models"], serde_json::json!({"tiny": 1}));
    // Answered while the long one runs: one other request in flight here.
    let models = http(&agent.api, "GET", "/v1/models", &[], b"");
    assert_eq!(models.header("x-modelcache-queue-depth"), Some("1"));
    let r = long.join().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-modelcache-queue-depth"),
        Some("0"),
        "its own request is done"
    );
    assert_eq!(load()["models"], serde_json::json!({}));
}

/// The fixture with one value of one component's config replaced.
fn tampered(models: &Path, name: &str, file: &str, key: &str, value: serde_json::Value) {
    let dir = models.join(name);
    copy_dir(&fixtures().join("tiny-sd1"), &dir);
    let path = dir.join(file);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config[key] = value;
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn tampered_model_configs_are_503_naming_the_field() {
    use serde_json::json;
    let cases = [
        ("heads", "unet/config.json", "attention_head_dim", json!(0)),
        ("groups", "unet/config.json", "norm_num_groups", json!(3)),
        (
            "timesteps",
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            json!(0),
        ),
        (
            "betas",
            "scheduler/scheduler_config.json",
            "beta_end",
            json!(2.0),
        ),
        ("scaling", "vae/config.json", "scaling_factor", json!(0)),
        ("vae_groups", "vae/config.json", "norm_num_groups", json!(0)),
        (
            "text_heads",
            "text_encoder/config.json",
            "num_attention_heads",
            json!(0),
        ),
    ];
    let agent = Agent::start_with(
        |models| {
            for (name, file, key, value) in &cases {
                tampered(models, name, file, key, value.clone());
            }
        },
        &[],
    );
    for (name, _, key, _) in &cases {
        let r = post(
            &agent.api,
            json!({"model": name, "prompt": "x", "size": "64x64", "steps": 1}),
        );
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            (r.status, error_code(&r).as_str()),
            (503, "model_unavailable"),
            "{name}: {message}"
        );
        assert!(
            message.contains(key),
            "{name}: the message names {key}: {message}"
        );
        assert!(
            message.starts_with(&format!("{name}: ")) && !message.contains("/tmp"),
            "{name}: paths are relative to the models folder: {message}"
        );
    }
}

#[test]
fn a_fifo_in_the_models_folder_neither_blocks_start_nor_shutdown() {
    let mut agent = Agent::start_with(
        |models| {
            copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny"));
            let fifo =
                std::ffi::CString::new(models.join("pipe.safetensors").to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        },
        &[],
    );
    let models = http(&agent.api, "GET", "/v1/models", &[], b"").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["tiny"]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "SIGTERM did not stop the agent");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn only_files_that_are_adapters_are_loaded_as_adapters() {
    let agent = Agent::start_with(
        |models| {
            copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny"));
            copy_dir(&fixtures().join("tiny-sd1-lora"), &models.join("loras"));
            // 256 MiB of weights that are no adapter (sparse: nothing to read but the header).
            modelcache_agent::store::safetensors::write_sparse(
                &models.join("big.safetensors"),
                &[("some.weight", safetensors::Dtype::F32, &[64 << 20])],
                &[],
            )
            .unwrap();
            std::fs::copy(
                fixtures().join("tiny-sd1-single.safetensors"),
                models.join("main.safetensors"),
            )
            .unwrap();
        },
        &[],
    );
    let ram = || metric(&agent, "modelcache_cache_bytes{tier=\"ram\"} ").unwrap_or(0.0);
    let with = |path: &str| {
        post(
            &agent.api,
            serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": 1, "loras": [{"path": path}]}),
        )
    };
    let r = with("loras/tiny-sd1-lora.safetensors");
    assert_eq!(r.status, 200, "a real adapter still works");
    let before = ram();
    for (path, why) in [
        ("big.safetensors", "not a LoRA adapter"),
        ("main.safetensors", "it is a Main model"),
    ] {
        let r = with(path);
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(r.status, 400, "{path}: {message}");
        assert!(message.contains(why), "{path}: {message}");
    }
    assert_eq!(ram(), before, "refused files never enter the cache");
}

#[test]
fn a_request_past_its_time_budget_is_504_and_stops_working() {
    let agent = Agent::start(&["--request-timeout-seconds", "2", "--concurrency", "1"]);
    let quick = serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": 1});
    assert_eq!(
        post(&agent.api, quick.clone()).status,
        200,
        "warm the model"
    );
    let started = Instant::now();
    // Minutes of work in a debug build.
    let r = post(
        &agent.api,
        serde_json::json!({"model": "tiny", "prompt": "x", "size": "256x256", "steps": 100}),
    );
    assert_eq!((r.status, error_code(&r).as_str()), (504, "timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The generation stops at its next step instead of running its 100 steps.
    let id = r.header("x-request-id").unwrap().to_string();
    let stopped = (0..1200).find_map(|_| {
        let line = agent.logs.lock().unwrap().iter().find_map(|v| {
            (v["span"]["request_id"] == id.as_str()
                && v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("generation stopped")))
            .then(|| v["fields"]["seconds"].as_f64().unwrap_or(f64::MAX))
        });
        if line.is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        line
    });
    let seconds = stopped.expect("the abandoned generation never stopped");
    assert!(seconds < 60.0, "it ran {seconds} s");
    assert_eq!(
        metric(
            &agent,
            "modelcache_generation_requests_total{code=\"504\",model=\"tiny\"} "
        ),
        Some(1.0)
    );
    assert_eq!(
        post(&agent.api, quick).status,
        200,
        "and its slot is free again"
    );
}

#[test]
fn a_request_costing_more_than_the_limit_is_refused_naming_it() {
    let agent = Agent::start(&["--max-pixel-steps", "100000"]);
    let ask = |steps: u32| {
        post(
            &agent.api,
            serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": steps}),
        )
    };
    // 64 × 64 × 25 = 102400 > 100000.
    let r = ask(25);
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(r.status, 400, "{message}");
    assert!(
        message.contains("--max-pixel-steps") && message.contains("102400"),
        "{message}"
    );
    assert_eq!(ask(24).status, 200);
}

#[test]
fn a_flood_of_idle_connections_neither_exhausts_descriptors_nor_silences_health() {
    use std::os::unix::process::CommandExt;
    // 256 descriptors in all, as a small container might allow.
    let agent = Agent::start_configured(
        |models| copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny")),
        &["--header-read-timeout-seconds", "1"],
        |cmd| {
            // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
            unsafe {
                cmd.pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: 256,
                        rlim_max: 256,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        },
    );
    // More idle and trickling connections than the agent has descriptors.
    let mut flood = Vec::new();
    for i in 0..300 {
        if let Ok(mut s) = TcpStream::connect(&agent.api) {
            if i % 2 == 0 {
                let _ = s.write_all(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n");
            }
            flood.push(s);
        }
    }
    // The health probes on the monitoring port answer at once.
    let started = Instant::now();
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            http(&agent.metrics, "GET", path, &[], b"").status,
            200,
            "{path}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Connections that send no complete headers are closed after the timeout.
    std::thread::sleep(Duration::from_secs(2));
    let closed = flood
        .iter_mut()
        .map(|s| {
            s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
            s.read(&mut [0u8; 256]).is_ok()
        })
        .filter(|closed| *closed)
        .count();
    assert!(closed >= 16, "only {closed} idle connections were closed");
    // Once the flood is gone the API serves at once.
    drop(flood);
    let started = Instant::now();
    let r = post(
        &agent.api,
        serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": 1}),
    );
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let exhausted = agent.logs.lock().unwrap().iter().any(|v| {
        v["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Too many open files"))
    });
    assert!(!exhausted, "the agent ran out of descriptors");
}

#[test]
fn small_things_a_careful_client_notices() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tiny-sd1-lora/tiny-sd1-lora.safetensors"),
        outside.path().join("secret.safetensors"),
    )
    .unwrap();
    let state_leftover = std::sync::Mutex::new(None);
    let agent = Agent::start_with(
        |models| {
            copy_dir(&fixtures().join("tiny-sd1"), &models.join("tiny"));
            // What an interrupted write leaves.
            std::fs::create_dir_all(models.join(".demo.partial-4242/unet")).unwrap();
            let state = models
                .parent()
                .unwrap()
                .join("state/converted/.x.partial-4242");
            std::fs::create_dir_all(&state).unwrap();
            *state_leftover.lock().unwrap() = Some(state);
            // A link to a folder outside the models folder.
            std::os::unix::fs::symlink(outside.path(), models.join("link")).unwrap();
            // A checkpoint of an architecture that is not built in, with its configs beside it.
            std::fs::copy(
                fixtures().join("tiny-sd1-single.safetensors"),
                models.join("custom.safetensors"),
            )
            .unwrap();
            crate::common::copy_configs(&models.join("custom.config"));
            copy_dir(
                &fixtures().join("tiny-sd1/tokenizer"),
                &models.join("custom.config/tokenizer"),
            );
        },
        &[],
    );
    let models = agent._dir.path().join("models");
    assert!(
        !models.join(".demo.partial-4242").exists(),
        "leftovers are removed at start"
    );
    assert!(!state_leftover.lock().unwrap().as_ref().unwrap().exists());

    // A wrong method, a long URI and large headers get the OpenAI error shape,
    // not an empty body.
    let r = http(&agent.api, "GET", "/v1/images/generations", &[], b"");
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (405, "method_not_allowed")
    );
    let long = format!("/v1/models?{}", "a".repeat(20_000));
    let r = http(&agent.api, "GET", &long, &[], b"");
    assert_eq!((r.status, error_code(&r).as_str()), (414, "uri_too_long"));
    let big = "b".repeat(8_000);
    let names: Vec<String> = (0..6).map(|i| format!("x-big-{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|k| (k.as_str(), big.as_str())).collect();
    let r = http(&agent.api, "GET", "/v1/models", &headers, b"");
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (431, "headers_too_large")
    );

    // Whether a file exists outside the models folder does not show.
    let message = |path: &str| {
        let r = post(
            &agent.api,
            serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": 1, "loras": [{"path": path}]}),
        );
        assert_eq!(r.status, 400);
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .replace(path, "PATH")
    };
    assert_eq!(
        message("link/secret.safetensors"),
        message("link/nothing.safetensors")
    );

    // The checkpoint is served through its configs, and the folder of configs is no model.
    let ids: Vec<String> = http(&agent.api, "GET", "/v1/models", &[], b"").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["custom", "tiny"]);
    let r = post(
        &agent.api,
        serde_json::json!({"model": "custom", "prompt": "x", "size": "64x64", "steps": 1}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// The (method, path) of every route `api::router` declares with `.route(…)`.
fn declared_routes() -> std::collections::BTreeSet<(String, String)> {
    let src = std::fs::read_to_string(repo().join("node-agent/src/api/mod.rs")).unwrap();
    let body = src
        .split("pub fn router(")
        .nth(1)
        .and_then(|b| b.split("\n}\n").next())
        .expect("api::router");
    let compact: String = body.split_whitespace().collect();
    compact
        .split(".route(\"")
        .skip(1)
        .filter_map(|rest| {
            let (path, rest) = rest.split_once('"')?;
            let method = rest
                .trim_start_matches(',')
                .trim()
                .split('(')
                .next()?
                .trim();
            Some((method.to_string(), path.to_string()))
        })
        .collect()
}

#[test]
fn the_api_matches_its_openapi_document() {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("node-agent/openapi.json")).unwrap(),
    )
    .unwrap();
    let documented: std::collections::BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    assert_eq!(
        declared_routes(),
        documented,
        "every route is documented, and only those"
    );
    let agent = Agent::start_with(
        |models| copy_dir(&fixtures().join("tiny-sd1"), &models.join("demo")),
        &[
            "--max-pixel-steps",
            "65536",
            "--request-timeout-seconds",
            "60",
            "--queue-size",
            "64",
        ],
    );
    let served = http(&agent.api, "GET", "/openapi.json", &[], b"").json();
    assert_eq!(served, doc, "the served document is the committed one");
    // Schemathesis generates requests from the document, valid and invalid,
    // and checks every answer against it.
    let schemathesis = repo().join(".ci/venv/bin/schemathesis");
    assert!(
        schemathesis.exists(),
        "schemathesis is missing: run .ci/install-tools.sh"
    );
    let report = tempfile::tempdir().unwrap();
    let out = Command::new(&schemathesis)
        .current_dir(report.path())
        .args(["run", &format!("http://{}/openapi.json", agent.api)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,unsupported_method,allow_header_conformance",
            "--max-examples",
            "50",
            "--seed",
            "1",
            "--workers",
            "1",
            "--no-color",
            "--generation-database",
            "none",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    // Every generated case passed. (Schemathesis warns that most generated
    // edits are refused: random bytes are rarely an image, and the 400 is
    // the answer the document promises.)
    let cases = text
        .lines()
        .find_map(|l| l.trim().strip_suffix(" passed")?.split_once(" generated, "))
        .unwrap_or_else(|| panic!("no test case count in:\n{text}"));
    assert_eq!(cases.0, cases.1, "{text}");
    assert!(!text.contains("FAILURES"), "{text}");
}

#[test]
fn a_model_that_cannot_fit_is_503_cache_full() {
    let agent = Agent::start(&["--ram-cache-bytes", "2Mi"]);
    let r = post(
        &agent.api,
        serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": 1}),
    );
    assert_eq!((r.status, error_code(&r).as_str()), (503, "cache_full"));
    assert!(r.header("retry-after").is_some());
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap())
        })
        .unwrap()
}

#[test]
fn a_burst_beyond_the_queue_gets_429_with_retry_after() {
    let agent = Agent::start(&["--queue-size", "8", "--concurrency", "1"]);
    // Warm the model so the burst measures queueing, not loading.
    assert_eq!(
        post(
            &agent.api,
            serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": 1})
        )
        .status,
        200
    );
    let rss_before = rss_kb(agent.pid());
    let api = agent.api.clone();
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let api = api.clone();
            std::thread::spawn(move || {
                let r = post(&api, serde_json::json!({"model": "tiny", "prompt": format!("p{i}"), "size": "64x64", "steps": 2}));
                (r.status, r.header("retry-after").map(str::to_string))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let limited: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(
        ok + limited.len(),
        200,
        "only 200 and 429: {:?}",
        results
            .iter()
            .map(|r| r.0)
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert!(ok >= 9, "at least concurrency + queue succeed, got {ok}");
    assert!(
        limited.len() >= 100,
        "most of a 200-request burst is refused, got {}",
        limited.len()
    );
    assert!(limited.iter().all(|r| r
        .1
        .as_deref()
        .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1))));
    assert_eq!(
        http(&agent.api, "GET", "/healthz", &[], b"").status,
        200,
        "still serving"
    );
    let grew_mb = rss_kb(agent.pid()).saturating_sub(rss_before) / 1024;
    assert!(grew_mb < 512, "RSS grew by {grew_mb} MiB during the burst");
}

#[test]
fn metrics_pass_promtool_and_count_requests() {
    let agent = Agent::start(&[]);
    post(
        &agent.api,
        serde_json::json!({"model": "tiny", "prompt": "x", "size": "64x64", "steps": 1}),
    );
    post(
        &agent.api,
        serde_json::json!({"model": "nope", "prompt": "x"}),
    );
    let r = http(&agent.metrics, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    for name in [
        "modelcache_cache_bytes{tier=\"ram\"}",
        "modelcache_cache_capacity_bytes{tier=\"vram\"}",
        "modelcache_cache_models{tier=\"vram\"} 3",
        "modelcache_device_cache_bytes{device=\"cpu\"}",
        "modelcache_device_cache_capacity_bytes{device=\"cpu\"}",
        "modelcache_device_memory_bytes{device=\"cpu\"}",
        "modelcache_device_memory_free_bytes{device=\"cpu\"}",
        "modelcache_build_info{component=\"agent\",version=",
        "process_resident_memory_bytes",
        "process_open_fds",
        "modelcache_cache_requests_total{result=\"miss\",tier=\"ram\"} 3",
        "modelcache_cache_evictions_total{tier=\"ram\"} 0",
        "modelcache_model_load_seconds_count{from=\"disk\",to=\"ram\"} 3",
        "modelcache_generation_seconds_count 1",
        "modelcache_generation_requests_total{code=\"200\",model=\"tiny\"} 1",
        "modelcache_generation_requests_total{code=\"404\",model=\"\"} 1",
        "modelcache_queue_depth 0",
        "modelcache_process_resident_bytes",
        "modelcache_malloc_arena_bytes",
        "modelcache_malloc_mmap_bytes",
        "modelcache_malloc_in_use_bytes",
        "modelcache_malloc_free_bytes",
        "modelcache_malloc_releasable_bytes",
        "modelcache_malloc_fragmentation_ratio",
        "modelcache_malloc_mmap_threshold_bytes 1048576",
        "modelcache_malloc_trim_released_bytes_total",
        "modelcache_alloc_pool_bytes 0",
        "modelcache_alloc_pool_hits_total",
        "modelcache_alloc_pool_misses_total",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/install-tools.sh installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a Python script with the official openai client (`.ci/venv`) and
/// fails the test with its output when the script fails.
pub(crate) fn run_openai_client(script: &str) {
    let python = repo().join(".ci/venv/bin/python");
    assert!(
        python.exists(),
        "the openai client's virtual environment is missing: run .ci/install-tools.sh"
    );
    let out = Command::new(python).arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_official_openai_client_generates_an_image() {
    let agent = Agent::start(&[]);
    run_openai_client(&format!(
        r#"
import base64, openai
client = openai.OpenAI(base_url="http://{}/v1", api_key="unused")
r = client.images.generate(model="tiny", prompt="a red cat", size="64x64", n=1, response_format="b64_json", extra_body={{"steps": 2, "seed": 1}})
png = base64.b64decode(r.data[0].b64_json)
assert png[:8] == b"\x89PNG\r\n\x1a\n"
print(len(png))
"#,
        agent.api
    ));
}

#[test]
fn models_copied_in_or_removed_are_served_without_a_restart() {
    let agent = Agent::start(&["--rescan-seconds", "1"]);
    let ids = |agent: &Agent| -> Vec<String> {
        let models = http(&agent.api, "GET", "/v1/models", &[], b"").json();
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&agent), ["tiny"]);
    let late = agent._dir.path().join("models/late");
    copy_dir(&fixtures().join("tiny-sd1"), &late);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ids(&agent).contains(&"late".to_string()) {
        assert!(Instant::now() < deadline, "the copied model never appeared");
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = br#"{"model": "late", "prompt": "a red cat", "size": "64x64", "steps": 1}"#;
    let r = http(
        &agent.api,
        "POST",
        "/v1/images/generations",
        &[("content-type", "application/json")],
        body,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    std::fs::remove_dir_all(&late).unwrap();
    while ids(&agent).contains(&"late".to_string()) {
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "the removed model is still listed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
