//! Brings a model named by a deployment onto this node's disk tier from its
//! remote source: one download per model at a time (a second placement of
//! the same model waits for the first and finds it done), room made under
//! the budget first, progress readable while it runs, and what it did
//! counted in the metrics.

use super::disk::{DiskError, DiskTier};
use super::download::{download, DownloadError, Options, RemoteFile};
use super::peer::{self, Peer, PeerError};
use super::store::{open, Access, StoreError};
use super::Source;
use object_store::ObjectStore;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Why a model could not be fetched; each names the model and never a credential.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("model path {0:?} cannot name a download: it must be relative, without '.' or '..' segments or hidden names")]
    BadName(String),
    #[error("listing the source: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("downloading: {0}")]
    Download(#[from] DownloadError),
    #[error("copying from a neighbour: {0}")]
    Peer(#[from] PeerError),
}

/// The download metrics (names are a contract with the dashboards and the alert).
#[derive(Clone)]
pub struct FetchMetrics {
    bytes: IntCounterVec,
    seconds: HistogramVec,
    downloads: IntCounterVec,
    in_progress: IntGauge,
    disk_bytes: IntGauge,
    disk_capacity: IntGauge,
}

impl FetchMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = FetchMetrics {
            bytes: IntCounterVec::new(
                Opts::new(
                    "modelcache_download_bytes_total",
                    "Bytes of model files downloaded, by where from (s3, hf, http, peer)",
                ),
                &["source"],
            )?,
            seconds: HistogramVec::new(
                HistogramOpts::new(
                    "modelcache_download_seconds",
                    "Seconds one model download took, listing and verification included",
                )
                .buckets(vec![
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                ]),
                &["source"],
            )?,
            downloads: IntCounterVec::new(
                Opts::new(
                    "modelcache_downloads_total",
                    "Model downloads finished, by where from and result (ok, failed)",
                ),
                &["source", "result"],
            )?,
            in_progress: IntGauge::new(
                "modelcache_downloads_in_progress",
                "Model downloads running now",
            )?,
            disk_bytes: IntGauge::new(
                "modelcache_disk_cache_bytes",
                "Bytes of downloaded models in the disk tier, downloads in progress included",
            )?,
            disk_capacity: IntGauge::new(
                "modelcache_disk_cache_capacity_bytes",
                "Byte budget of the disk tier (--disk-cache-bytes)",
            )?,
        };
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.seconds.clone()))?;
        registry.register(Box::new(m.downloads.clone()))?;
        registry.register(Box::new(m.in_progress.clone()))?;
        registry.register(Box::new(m.disk_bytes.clone()))?;
        registry.register(Box::new(m.disk_capacity.clone()))?;
        Ok(m)
    }
}

/// Bytes on disk and in all, of a download in progress.
pub type Progress = (u64, u64);

/// What [`Fetcher::fetch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Where the model's folder is.
    pub dir: PathBuf,
    /// Bytes transferred by this call (0 when another call, or an earlier
    /// run, had downloaded it).
    pub transferred: u64,
}

/// The disk tier with its downloads in flight.
pub struct Fetcher {
    disk: DiskTier,
    options: Options,
    /// Copies from neighbours give up sooner: the source is behind them.
    peer_options: Options,
    /// The cluster's token for neighbours' copies; `None`: never asked.
    peer_token: Option<String>,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    progress: Arc<Mutex<HashMap<String, Progress>>>,
    metrics: Option<FetchMetrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The label a source's bytes are counted under.
fn kind(source: &Source) -> &'static str {
    match source {
        Source::S3 { .. } => "s3",
        Source::Hf { .. } => "hf",
        Source::Http { .. } => "http",
    }
}

/// A deployment's `model.path` as the catalog and the disk tier name it.
pub fn normalize(path: &str) -> &str {
    path.trim_start_matches("./").trim_end_matches('/')
}

/// Whether `name` stays inside the downloads folder and is not hidden
/// (hidden names are staging folders and markers).
fn valid_name(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty()
        && p.components().all(|c| match c {
            Component::Normal(s) => !s.to_string_lossy().starts_with('.'),
            _ => false,
        })
}

impl Fetcher {
    pub fn new(disk: DiskTier, options: Options, metrics: Option<FetchMetrics>) -> Self {
        let f = Fetcher {
            disk,
            peer_options: Options {
                idle_timeout: std::time::Duration::from_secs(10),
                attempts: 2,
                ..options.clone()
            },
            options,
            peer_token: None,
            flights: Mutex::default(),
            progress: Arc::default(),
            metrics,
        };
        f.update_gauges();
        f
    }

    /// Copies models from neighbours that accept `token`.
    pub fn with_peer_token(mut self, token: Option<String>) -> Self {
        self.peer_token = token;
        self
    }

    pub fn disk(&self) -> &DiskTier {
        &self.disk
    }

    /// How far the download of `name` has come, while one runs.
    pub fn progress(&self, name: &str) -> Option<Progress> {
        lock(&self.progress).get(name).copied()
    }

    fn update_gauges(&self) {
        if let Some(m) = &self.metrics {
            let (used, budget) = self.disk.usage();
            m.disk_bytes.set(used as i64);
            m.disk_capacity.set(budget as i64);
        }
    }

    /// Brings the model `name` (a deployment's `model.path`) into the disk
    /// tier unless it is there: copied from the first of `peers` that
    /// answers (with [`Self::with_peer_token`]), else downloaded from
    /// `source`. Room is made by deleting least recently used downloads that
    /// `protected` does not name.
    pub async fn fetch(
        &self,
        name: &str,
        source: &Source,
        access: &Access,
        peers: &[Peer],
        protected: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<Fetched, FetchError> {
        let name = normalize(name);
        if !valid_name(name) {
            return Err(FetchError::BadName(name.to_string()));
        }
        let flight = lock(&self.flights)
            .entry(name.to_string())
            .or_default()
            .clone();
        let _only = flight.lock().await;
        let dir = self.disk.path_of(name);
        if self.disk.has(name) {
            self.disk.touch(name);
            return Ok(Fetched {
                dir,
                transferred: 0,
            });
        }
        if let Some(m) = &self.metrics {
            m.in_progress.inc();
        }
        let mut copied = None;
        if let Some(token) = self.peer_token.as_deref() {
            for p in peers {
                let started = Instant::now();
                let attempt = match peer::open(p, name, token).await {
                    Ok((store, files)) => {
                        let from = format!("node {}", p.node);
                        self.transfer(
                            name,
                            &from,
                            store,
                            files,
                            &self.peer_options,
                            protected,
                            &dir,
                        )
                        .await
                    }
                    Err(e) => Err(e.into()),
                };
                self.count("peer", &attempt, started);
                match attempt {
                    Ok(t) => {
                        copied = Some(t);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(model = name, peer = %p.node, error = %e, "copying from a neighbour failed; trying the next, then the source")
                    }
                }
            }
        }
        let result = match copied {
            Some(t) => Ok(t),
            None => {
                let started = Instant::now();
                let result = match open(source, access).await {
                    Ok((store, files)) => {
                        let from = source.to_string();
                        self.transfer(name, &from, store, files, &self.options, protected, &dir)
                            .await
                    }
                    Err(e) => Err(e.into()),
                };
                self.count(kind(source), &result, started);
                result
            }
        };
        lock(&self.progress).remove(name);
        self.update_gauges();
        if let Some(m) = &self.metrics {
            m.in_progress.dec();
        }
        Ok(Fetched {
            dir,
            transferred: result?,
        })
    }

    /// Counts one attempt from `label` in the metrics.
    fn count(&self, label: &str, result: &Result<u64, FetchError>, started: Instant) {
        let Some(m) = &self.metrics else { return };
        let ok = result.is_ok();
        m.downloads
            .with_label_values(&[label, if ok { "ok" } else { "failed" }])
            .inc();
        if let Ok(transferred) = result {
            // Counted when complete: what a resumed download had is not counted twice.
            m.bytes.with_label_values(&[label]).inc_by(*transferred);
            m.seconds
                .with_label_values(&[label])
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// Makes room for `files` and downloads them from `store` into `dir`.
    #[allow(clippy::too_many_arguments)]
    async fn transfer(
        &self,
        name: &str,
        from: &str,
        store: Arc<dyn ObjectStore>,
        files: Vec<RemoteFile>,
        options: &Options,
        protected: &(dyn Fn(&str) -> bool + Send + Sync),
        dir: &Path,
    ) -> Result<u64, FetchError> {
        let total: u64 = files.iter().map(|f| f.size).sum();
        lock(&self.progress).insert(name.to_string(), (0, total));
        let room = self.disk.make_room(name, total, protected)?;
        self.update_gauges();
        tracing::info!(
            model = name,
            from,
            files = files.len(),
            bytes = total,
            "downloading"
        );
        let started = Instant::now();
        let progress = self.progress.clone();
        let key = name.to_string();
        let report = move |done: u64, total: u64| {
            lock(&progress).insert(key.clone(), (done, total));
        };
        let transferred = download(store, &files, dir, options, &report).await?;
        self.disk.finished(name, from, room)?;
        tracing::info!(
            model = name,
            from,
            transferred,
            seconds = started.elapsed().as_secs_f64(),
            "downloaded"
        );
        Ok(transferred)
    }

    /// Deletes the download of `name` (a copy that failed verification).
    pub fn remove(&self, name: &str) {
        self.disk.remove(name);
        self.update_gauges();
    }
}
