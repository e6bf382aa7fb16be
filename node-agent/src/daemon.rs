//! `modelcache-agent serve`: applies the malloc threshold, opens the compute
//! devices, builds the [`Agent`], serves the API and `/metrics`, searches the
//! models folder again on a timer, runs the cluster side when asked, and stops
//! gracefully on SIGTERM or Ctrl-C.

use crate::agent::Agent;
use crate::api::server::{self, ConnectionLimits};
use crate::api::{self, AppState, Limits, Queue};
use crate::cache::{CacheConfig, DeviceSlot};
use crate::catalog::Catalog;
use crate::cluster::{self, ClusterAgent};
use crate::fetch::disk::DiskTier;
use crate::routes::Routes;
use crate::{demo, device, memory};
use anyhow::Context;
use modelcache_crds::Precision;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Tokens shorter than this are accepted with a warning.
const MIN_TOKEN_CHARS: usize = 16;

/// What `serve` was asked for.
#[derive(Debug, Clone)]
pub struct Settings {
    pub models_dir: PathBuf,
    /// The disk tier's folder (cluster mode).
    pub download_dir: PathBuf,
    /// The disk tier's budget; `None`: half its volume's free space at start.
    pub disk_cache_bytes: Option<u64>,
    /// The cluster's token for copies between agents.
    pub peer_token_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub listen: String,
    pub metrics_listen: String,
    pub ram_cache_bytes: u64,
    /// Each device tier's budget; `None`: from the device's free memory.
    pub device_cache_bytes: Option<u64>,
    pub device: String,
    pub precision: Precision,
    pub queue_size: usize,
    pub concurrency: usize,
    pub batching: crate::api::Batching,
    /// Open connections per port, and how long a client may take to send its headers.
    pub connections: ConnectionLimits,
    /// Most width × height × steps × n a request may ask for.
    pub max_pixel_steps: u64,
    /// Longest a request may take, queueing included; `None`: no limit.
    pub request_timeout: Option<Duration>,
    pub api_token_file: Option<PathBuf>,
    pub malloc_mmap_threshold: u64,
    pub malloc_trim_on_evict: bool,
    pub load_threads: usize,
    pub tokenizer: Option<PathBuf>,
    pub demo: bool,
    pub rescan: Option<Duration>,
    /// Cluster mode, when set.
    pub cluster: Option<ClusterSettings>,
}

/// Cluster mode's settings from the command line and the downward API.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub node_name: String,
    pub pod_ip: String,
    pub pod_name: Option<String>,
    pub namespace: String,
    pub lease_renew: Duration,
    pub report_interval: Duration,
}

/// Raises the soft limit on open files to the hard one and returns it: each
/// connection and each model file being read holds a descriptor.
fn open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read a plain struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Connections per port that the open-files limit allows: both ports at
/// their cap, with 256 descriptors left for model files and the rest.
fn connections_within(limits: ConnectionLimits, open_files: u64) -> ConnectionLimits {
    let room = (open_files.saturating_sub(256) / 2).max(16) as usize;
    if limits.max_connections > room {
        tracing::warn!(
            configured = limits.max_connections,
            open_files,
            used = room,
            "--max-connections is more than the open-files limit allows; using fewer"
        );
    }
    ConnectionLimits {
        max_connections: limits.max_connections.min(room),
        ..limits
    }
}

/// The disk tier at `--download-dir`, with `--disk-cache-bytes` (auto: half
/// of the volume's free space now).
fn disk_tier(s: &Settings) -> anyhow::Result<DiskTier> {
    let dir = &s.download_dir;
    // Inside the models folder it must be hidden, or its models would be found twice.
    if let Ok(rel) = dir.strip_prefix(&s.models_dir) {
        let hidden = rel
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
        if !hidden {
            anyhow::bail!(
                "--download-dir {} is inside --models-dir {} but not in a hidden folder (one whose name starts with '.'); use e.g. {}",
                dir.display(),
                s.models_dir.display(),
                s.models_dir.join(".modelcache/downloads").display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let budget = match s.disk_cache_bytes {
        Some(b) => b,
        None => {
            free_bytes(dir).with_context(|| {
                format!(
                    "--disk-cache-bytes auto: the free space of {}",
                    dir.display()
                )
            })? / 2
        }
    };
    let disk =
        DiskTier::open(dir, budget).with_context(|| format!("--download-dir {}", dir.display()))?;
    let (used, _) = disk.usage();
    tracing::info!(dir = %dir.display(), budget, used, downloads = disk.downloads().len(), "disk tier for downloads");
    Ok(disk)
}

/// Bytes free for an unprivileged user on the volume of `dir`.
fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs fills a plain struct we own from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Runs the agent until a signal stops it or a server fails.
pub fn serve(mut s: Settings) -> anyhow::Result<()> {
    s.connections = connections_within(s.connections, open_files_limit());
    let (source, threshold) = memory::ensure_mmap_threshold(s.malloc_mmap_threshold);
    tracing::info!(?source, threshold, "malloc mmap threshold");
    if let Ok(v) = std::env::var(memory::pool::ENV) {
        if memory::pool::parse_cap(v.as_bytes()).is_none() {
            tracing::warn!(value = %v, default = memory::pool::DEFAULT_CAP, "{} is not a byte count (digits, optionally Ki, Mi or Gi); the default cap applies", memory::pool::ENV);
        }
    }
    let pool = memory::pool::stats();
    tracing::info!(
        enabled = pool.enabled,
        cap_bytes = pool.cap_bytes,
        "allocation pool for blocks of 1 MiB and more"
    );
    let compute = device::open(&s.device, s.precision).context("--device")?;
    for d in &compute {
        tracing::info!(device = %d.id, name = %d.name, dtype = ?d.dtype, precision = %s.precision, "compute device (the CPU always computes in f32)");
    }
    tracing::info!(
        max_connections = s.connections.max_connections,
        header_read_timeout = ?s.connections.header_read_timeout,
        "connection limits per port"
    );
    std::fs::create_dir_all(&s.models_dir)
        .with_context(|| format!("creating {}", s.models_dir.display()))?;
    std::fs::create_dir_all(&s.state_dir)
        .with_context(|| format!("creating the state folder {}", s.state_dir.display()))?;
    for dir in [s.models_dir.clone(), s.state_dir.join("converted")] {
        let removed = crate::store::remove_partials(&dir);
        if removed > 0 {
            tracing::info!(dir = %dir.display(), removed, "removed what interrupted writes left");
        }
    }
    if s.demo {
        let dir = demo::write_demo(&s.models_dir).context("writing the demo model")?;
        tracing::warn!(path = %dir.display(), "serving the demo model `demo`: tiny random weights, its images are noise");
    }
    let token = s
        .api_token_file
        .as_deref()
        .map(modelcache_support::read_secret)
        .transpose()
        .context("--api-token-file")?;
    if let Some(t) = token
        .as_ref()
        .filter(|t| t.chars().count() < MIN_TOKEN_CHARS)
    {
        tracing::warn!(
            chars = t.chars().count(),
            "the API token is shorter than {MIN_TOKEN_CHARS} characters and can be guessed; use a longer random one"
        );
    }
    let cache = CacheConfig {
        load_threads: s.load_threads,
        trim_on_evict: s.malloc_trim_on_evict,
        devices: compute
            .iter()
            .map(|d| DeviceSlot {
                device: d.device.clone(),
                budget: d.budget(s.device_cache_bytes),
            })
            .collect(),
        dtype: compute[0].dtype,
        ..CacheConfig::cpu(s.ram_cache_bytes, 0)
    };
    // Models named by a source are downloaded only for placements.
    let disk = match &s.cluster {
        Some(_) => Some(disk_tier(&s)?),
        None => None,
    };
    let catalog = Catalog::scan_with(
        &s.models_dir,
        disk.as_ref().map(|d| d.root()),
        &s.state_dir,
        s.tokenizer.as_deref(),
    );
    tracing::info!(models = catalog.entries().len(), dir = %s.models_dir.display(), "model search done");
    let peer_token = match (&s.cluster, &s.peer_token_file) {
        (Some(_), Some(f)) => {
            Some(modelcache_support::read_secret(f).context("--peer-token-file")?)
        }
        _ => None,
    };
    let mut agent = Agent::new(cache, catalog).context("registering metrics")?;
    if let Some(disk) = disk {
        agent = agent
            .with_downloads(disk, Default::default())
            .context("registering metrics")?;
        agent.fetcher = agent.fetcher.map(|f| f.with_peer_token(peer_token.clone()));
    }
    let agent = Arc::new(agent);
    let routes = Arc::new(Routes::default());
    let state = Arc::new(
        AppState::new(
            agent.clone(),
            routes.clone(),
            Queue::new(s.concurrency, s.queue_size),
            Limits {
                max_pixel_steps: s.max_pixel_steps,
                timeout: s.request_timeout,
                ..Limits::default()
            },
            token,
        )
        .with_peer_token(peer_token)
        .with_batching(s.batching),
    );
    tokio::runtime::Runtime::new()?.block_on(run(s, agent, routes, state))
}

async fn run(
    s: Settings,
    agent: Arc<Agent>,
    routes: Arc<Routes>,
    state: Arc<AppState>,
) -> anyhow::Result<()> {
    let api = tokio::net::TcpListener::bind(&s.listen)
        .await
        .with_context(|| format!("binding {}", s.listen))?;
    let metrics = tokio::net::TcpListener::bind(&s.metrics_listen)
        .await
        .with_context(|| format!("binding {}", s.metrics_listen))?;
    if let Some(every) = s.rescan {
        tokio::spawn(rescan(agent.clone(), every));
    }
    let cluster = match s.cluster {
        Some(c) => {
            let client = kube::Client::try_default().await.context(
                "--kubernetes: connecting to the Kubernetes API (in-cluster config or KUBECONFIG)",
            )?;
            let renew = c.lease_renew.max(Duration::from_secs(1));
            let settings = cluster::Settings {
                pod_name: c
                    .pod_name
                    .unwrap_or_else(|| format!("modelcache-agent-{}", c.node_name)),
                node_name: c.node_name,
                pod_ip: c.pod_ip,
                namespace: c.namespace,
                api_port: api.local_addr()?.port(),
                metrics_port: metrics.local_addr()?.port(),
                lease_renew: renew,
                lease_duration: renew * 4,
                report_interval: c.report_interval.max(Duration::from_secs(1)),
            };
            tracing::info!(node = %settings.node_name, namespace = %settings.namespace, "cluster mode: serving the ModelDeployments placed on this node");
            Some(ClusterAgent::new(agent.clone(), routes, settings).run(client))
        }
        None => None,
    };
    let cluster = async move {
        match cluster {
            Some(f) => f.await,
            None => std::future::pending().await,
        }
    };
    tracing::info!(api = %api.local_addr()?, metrics = %metrics.local_addr()?, "serving");
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut s = stopping.clone();
        async move {
            let _ = s.wait_for(|stop| *stop).await;
        }
    };
    let metrics_app = api::metrics_router(
        agent.metrics.clone(),
        state.queue.clone(),
        state.ready.clone(),
    );
    let metrics_server = server::serve(metrics, metrics_app, s.connections, stopped());
    let api_server = server::serve(api, api::router(state), s.connections, stopped());
    let signal = async {
        modelcache_support::shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
        std::future::pending::<()>().await
    };
    tokio::select! {
        ((), ()) = async { tokio::join!(api_server, metrics_server) } => {}
        () = cluster => {}
        () = signal => {}
    }
    Ok(())
}

/// Searches the models folder every `every`, so that models copied in or
/// removed are served (and reported) without a restart.
async fn rescan(agent: Arc<Agent>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let a = agent.clone();
        let before = a.catalog.found().len();
        let after = tokio::task::spawn_blocking(move || {
            a.catalog.rescan();
            a.catalog.found().len()
        })
        .await
        .unwrap_or(before);
        if after != before {
            tracing::info!(before, after, "models folder changed");
        }
    }
}
