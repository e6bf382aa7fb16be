//! Helpers for the tests of the whole system in this crate's `tests/` folder:
//! locating the real tools CI installs (`.ci/install-tools.sh`), running a
//! real Prometheus server, and plain HTTP on 127.0.0.1.
//!
//! `tests/fixtures/` holds the data every crate's tests share: tiny reference
//! models made with diffusers, a LoRA, the malformed-input corpus
//! (`fixtures/gen_malformed.py` regenerates it) and Grafana's dashboard schema.

pub mod apiserver;
pub mod control_plane;
pub mod gateway;
pub mod kube;
pub mod layers;
pub mod process;
pub mod s3;
pub mod scenarios;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool the test suite drives, from `.ci/` (where `.ci/install-tools.sh` puts
/// it) or from PATH. Panics with the command that installs it when missing:
/// these tests must not pass by skipping.
pub fn tool(name: &str) -> PathBuf {
    let candidates = [
        repo().join(".ci/tools").join(name),
        repo().join(".ci/venv/bin").join(name),
    ];
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return p.clone();
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed; run `bash .ci/install-tools.sh`"))
}

/// Copies a folder tree (a fixture model into a test's models folder).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("creating a folder");
    for e in std::fs::read_dir(src).expect("reading a fixture folder") {
        let e = e.expect("a folder entry");
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).expect("copying a fixture file");
        }
    }
}

/// Runs a command; returns (success, stdout + stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The sum of the samples in a Prometheus text exposition whose line starts
/// with `series` (a name, or a name and the first labels of the sets to add).
pub fn metric_sum(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One HTTP/1.1 GET; returns status and body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
    Ok((status, raw[end + 4..].to_vec()))
}

/// Percent-encodes a query value.
pub fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus server (Debian package `prometheus`) scraping the given
/// targets every second, each with extra labels.
pub struct Prometheus {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// `targets`: (`host:port`, labels) pairs.
    pub fn start(targets: &[(&str, &[(&str, &str)])]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = String::from(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n",
        );
        for (i, (target, labels)) in targets.iter().enumerate() {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v:?}")).collect();
            config.push_str(&format!(
                "  - job_name: job{i}\n    static_configs: [{{targets: [{target:?}], labels: {{{}}}}}]\n",
                labels.join(", ")
            ));
        }
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("writing config");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(tool("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(&p.addr, "/-/ready").map(|r| r.0).ok() != Some(200) {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// An instant query's `data.result` (panics on a query error).
    pub fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let (status, body) = http_get(&self.addr, &format!("/api/v1/query?query={}", encode(q)))
            .expect("querying prometheus");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("prometheus JSON");
        assert_eq!(status, 200, "query {q:?} failed: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `q` returns something.
    pub fn wait_for(&self, q: &str, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.query(q);
            if !r.is_empty() || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
