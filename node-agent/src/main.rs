//! `modelcache-agent`: the node agent's command line. Parses arguments and
//! hands each command to the library (`daemon` for `serve`, `commands` for
//! the rest).

use clap::{Parser, Subcommand};
use modelcache_agent::api::server::ConnectionLimits;
use modelcache_agent::store::convert::ConvertRequest;
use modelcache_agent::store::merge::{MergeRequest, Method};
use modelcache_agent::{commands, daemon};
use modelcache_crds::Precision;
use modelcache_support::{init_logging, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: modelcache_agent::memory::pool::PoolAllocator =
    modelcache_agent::memory::pool::PoolAllocator;

#[derive(Parser)]
#[command(
    name = "modelcache-agent",
    version,
    about = "modelcache node agent: model store, cache, generation and HTTP API"
)]
struct Cli {
    /// Log format: text for people, json for log collectors.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "MODELCACHE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models under --models-dir over HTTP (standalone mode).
    Serve(ServeArgs),
    /// Generate images from a model without the server.
    Generate(commands::GenerateOptions),
    /// Print what a model file or diffusers folder is, as JSON (type, base, variant,
    /// prediction type, format, size per precision, tensor count, and the evidence).
    Probe {
        /// A .safetensors/.ckpt/.pt/.pth/.bin file or a diffusers folder.
        path: PathBuf,
    },
    /// List every model under a folder with its probe result (JSON lines); unreadable
    /// entries are reported on stderr and skipped.
    Search {
        /// The model root to search.
        root: PathBuf,
    },
    /// Convert a single-file (A1111/Civitai layout) checkpoint or ControlNet into a diffusers
    /// folder (a ControlNet's configuration comes from its tensors).
    Convert {
        /// The checkpoint file.
        checkpoint: PathBuf,
        /// Where to write the diffusers folder (replaced if it exists).
        out_dir: PathBuf,
        /// A diffusers-layout folder whose config.json files and tokenizer describe the
        /// architecture (weights in it are ignored). Without it, the standard SD 1.5,
        /// SD 2.x and SDXL configurations are used.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A tokenizer folder to include when --config has none.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Merge 2 or 3 models (single files or diffusers folders) tensor by tensor.
    Merge {
        /// Two models, or three for add-difference (θ0 + (θ1 − θ2)·(1 − α)).
        #[arg(num_args = 2..=3, required = true)]
        models: Vec<PathBuf>,
        /// Output: a .safetensors file for single files, a folder for diffusers models.
        #[arg(long)]
        out: PathBuf,
        /// weighted-sum, sigmoid, inv-sigmoid or add-difference.
        #[arg(long, default_value = "weighted-sum")]
        method: Method,
        /// Interpolation weight from 0 to 1 (weighted-sum: share of the second model).
        #[arg(long, default_value_t = 0.5)]
        alpha: f64,
        /// Precision of the merged weights.
        #[arg(long, default_value = "f16")]
        precision: Precision,
        /// Merge models of different bases or layouts anyway.
        #[arg(long)]
        force: bool,
    },
    /// Print the SHA-256 content identity of a model (what `model.sha256` pins).
    Hash {
        path: PathBuf,
        /// Cache hashes under this folder, keyed by path, size and mtime.
        #[arg(long, env = "MODELCACHE_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Send one generation request to a running agent (or a ModelDeployment's Service)
    /// and check that a PNG of the requested size comes back: the chart's `helm test`.
    Request(commands::RequestOptions),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => daemon::serve(a.into()),
        Command::Generate(a) => commands::generate(a),
        Command::Request(a) => commands::request(a),
        Command::Probe { path } => commands::probe(&path),
        Command::Search { root } => commands::search(&root),
        Command::Convert {
            checkpoint,
            out_dir,
            config,
            tokenizer,
        } => commands::convert(&ConvertRequest {
            checkpoint: &checkpoint,
            out_dir: &out_dir,
            config_dir: config.as_deref(),
            tokenizer_dir: tokenizer.as_deref(),
        }),
        Command::Merge {
            models,
            out,
            method,
            alpha,
            precision,
            force,
        } => commands::merge(&MergeRequest {
            inputs: &models,
            out: &out,
            method,
            alpha,
            precision,
            force,
        }),
        Command::Hash { path, state_dir } => commands::hash(&path, state_dir.as_deref()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    modelcache_agent::pipeline::pin_cpu_threads();
    if !matches!(cli.command, Command::Serve(_)) {
        // Commands that print (probe | head) end quietly on a closed pipe, like
        // other Unix tools; the server keeps Rust's default of ignoring SIGPIPE.
        // SAFETY: setting a signal disposition before any threads are started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

impl From<ServeArgs> for daemon::Settings {
    fn from(a: ServeArgs) -> Self {
        daemon::Settings {
            cluster: a.kubernetes.then(|| daemon::ClusterSettings {
                node_name: a.node_name.clone().unwrap_or_default(),
                pod_ip: a.pod_ip.clone().unwrap_or_default(),
                pod_name: a.pod_name.clone(),
                namespace: a.namespace.clone(),
                lease_renew: Duration::from_secs(a.lease_renew_seconds),
                report_interval: Duration::from_secs(a.report_interval_seconds),
            }),
            download_dir: a
                .download_dir
                .unwrap_or_else(|| a.models_dir.join(".modelcache/downloads")),
            disk_cache_bytes: a.disk_cache_bytes.0,
            peer_token_file: a.peer_token_file,
            models_dir: a.models_dir,
            state_dir: a.state_dir,
            listen: a.listen,
            metrics_listen: a.metrics_listen,
            ram_cache_bytes: a.ram_cache_bytes,
            device_cache_bytes: a.vram_cache_bytes.0,
            device: a.device,
            precision: a.precision,
            queue_size: a.queue_size,
            concurrency: a.concurrency,
            batching: modelcache_agent::api::Batching {
                window: Duration::from_millis(a.batch_window_ms),
                max_images: a.max_batch_size as usize,
            },
            connections: ConnectionLimits {
                max_connections: a.max_connections,
                header_read_timeout: Duration::from_secs(a.header_read_timeout_seconds.max(1)),
                ..ConnectionLimits::default()
            },
            max_pixel_steps: a.max_pixel_steps,
            request_timeout: (a.request_timeout_seconds > 0)
                .then(|| Duration::from_secs(a.request_timeout_seconds)),
            api_token_file: a.api_token_file,
            malloc_mmap_threshold: a.malloc_mmap_threshold,
            malloc_trim_on_evict: a.malloc_trim_on_evict,
            load_threads: a.load_threads,
            tokenizer: a.tokenizer,
            demo: a.demo,
            rescan: (a.rescan_seconds > 0).then(|| Duration::from_secs(a.rescan_seconds)),
        }
    }
}

/// A device budget: `auto` (from the device's free memory) or a byte size.
#[derive(Debug, Clone, Copy)]
struct Budget(Option<u64>);

fn parse_budget(s: &str) -> Result<Budget, ByteSizeError> {
    if s.trim().eq_ignore_ascii_case("auto") {
        Ok(Budget(None))
    } else {
        parse_bytes(s).map(|b| Budget(Some(b)))
    }
}

/// A flag value that is not a byte size.
/// The error and its causes, each cause left out when the message before
/// already says it (library errors often include their source's text).
fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a byte size (examples: 1073741824, 8Gi, 512Mi)")]
struct ByteSizeError(String);

/// Byte sizes: plain bytes or with a Ki/Mi/Gi/Ti (or K/M/G/T, powers of 1000) suffix.
fn parse_bytes(s: &str) -> Result<u64, ByteSizeError> {
    let s = s.trim();
    let units = [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
        ("T", 1_000_000_000_000),
        ("G", 1_000_000_000),
        ("M", 1_000_000),
        ("K", 1000),
    ];
    let (num, mult) = units
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| ByteSizeError(s.to_string()))?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err(ByteSizeError(s.to_string()));
    }
    Ok((n * mult as f64) as u64)
}

/// Options of `serve`; every flag can also come from `MODELCACHE_<FLAG>`.
#[derive(clap::Args)]
struct ServeArgs {
    /// Folder of models to serve (diffusers folders and single-file checkpoints, searched recursively).
    #[arg(long, env = "MODELCACHE_MODELS_DIR", default_value = "models")]
    models_dir: PathBuf,
    /// Writable folder for converted checkpoints and content hashes (never the model folder).
    #[arg(
        long,
        env = "MODELCACHE_STATE_DIR",
        default_value = ".modelcache-state"
    )]
    state_dir: PathBuf,
    /// Address of the generation API.
    #[arg(long, env = "MODELCACHE_LISTEN", default_value = "0.0.0.0:8080")]
    listen: String,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(
        long,
        env = "MODELCACHE_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    metrics_listen: String,
    /// Byte budget of the RAM tier (e.g. 16Gi).
    #[arg(long, env = "MODELCACHE_RAM_CACHE_BYTES", default_value = "8Gi", value_parser = parse_bytes)]
    ram_cache_bytes: u64,
    /// Byte budget of each device's tier (GPU memory; a second copy in RAM on
    /// CPU-only machines); auto: 90% of each GPU's free memory at start, 4Gi on the CPU.
    #[arg(long, env = "MODELCACHE_VRAM_CACHE_BYTES", default_value = "auto", value_parser = parse_budget)]
    vram_cache_bytes: Budget,
    /// Compute devices: auto (every GPU in CUDA builds, else the CPU), cpu,
    /// cuda:N, or a list such as cuda:0,cuda:1. Each GPU gets its own cache
    /// tier; each model goes to the one with room.
    #[arg(long, env = "MODELCACHE_DEVICE", default_value = "auto")]
    device: String,
    /// Compute precision on GPUs (f16, bf16, f32); the CPU always computes in f32.
    #[arg(long, env = "MODELCACHE_PRECISION", default_value = "f16")]
    precision: Precision,
    /// Requests that may wait for a free slot; more are refused with 429.
    #[arg(long, env = "MODELCACHE_QUEUE_SIZE", default_value_t = 8)]
    queue_size: usize,
    /// Generations that run at once.
    #[arg(long, env = "MODELCACHE_CONCURRENCY", default_value_t = 1)]
    concurrency: usize,
    /// How long a denoising batch waits for more requests after its first
    /// (milliseconds); 0: requests batch only while they wait for a slot.
    #[arg(long, env = "MODELCACHE_BATCH_WINDOW_MS", default_value_t = 20)]
    batch_window_ms: u64,
    /// Most images denoised together in one batch (fewer when the device
    /// tier has no room for their activations); 1 turns batching off.
    #[arg(long, env = "MODELCACHE_MAX_BATCH_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64))]
    max_batch_size: u64,
    /// Connections open at once on each port; more clients wait to be accepted.
    #[arg(long, env = "MODELCACHE_MAX_CONNECTIONS", default_value_t = 512)]
    max_connections: usize,
    /// A client must send each request's headers within this many seconds
    /// (idle keep-alive connections close after it too).
    #[arg(
        long,
        env = "MODELCACHE_HEADER_READ_TIMEOUT_SECONDS",
        default_value_t = 10
    )]
    header_read_timeout_seconds: u64,
    /// Most width × height × steps × n one request may ask for (400 above it).
    #[arg(long, env = "MODELCACHE_MAX_PIXEL_STEPS", default_value_t = modelcache_agent::api::request::DEFAULT_MAX_PIXEL_STEPS)]
    max_pixel_steps: u64,
    /// Longest a request may take, queueing included, before it is stopped and
    /// answered 504; 0: no limit.
    #[arg(
        long,
        env = "MODELCACHE_REQUEST_TIMEOUT_SECONDS",
        default_value_t = 600
    )]
    request_timeout_seconds: u64,
    /// File holding the bearer token clients must send; no authentication without it.
    #[arg(long, env = "MODELCACHE_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// M_MMAP_THRESHOLD to apply when MALLOC_MMAP_THRESHOLD_ is not set; 0 leaves glibc's
    /// dynamic threshold in effect (only to measure what the threshold buys).
    #[arg(
        long,
        env = "MODELCACHE_MALLOC_MMAP_THRESHOLD",
        default_value_t = 1_048_576
    )]
    malloc_mmap_threshold: u64,
    /// Call malloc_trim(0) after evictions.
    #[arg(long, env = "MODELCACHE_MALLOC_TRIM_ON_EVICT")]
    malloc_trim_on_evict: bool,
    /// Threads that read a model into the RAM tier.
    #[arg(long, env = "MODELCACHE_LOAD_THREADS", default_value_t = 2)]
    load_threads: usize,
    /// Tokenizer folder for single-file checkpoints, which carry none (default: the
    /// standard CLIP vocabulary shipped with the agent).
    #[arg(long, env = "MODELCACHE_TOKENIZER")]
    tokenizer: Option<PathBuf>,
    /// Write the built-in demo model (tiny, random weights: its images are noise) into the
    /// models folder as `demo` before serving.
    #[arg(long, env = "MODELCACHE_DEMO")]
    demo: bool,
    /// Cluster mode: report this node's ModelNode, renew its Lease, and serve the
    /// ModelDeployments the operator places here (in-cluster config or KUBECONFIG).
    #[arg(long, env = "MODELCACHE_KUBERNETES")]
    kubernetes: bool,
    /// Kubernetes node name (downward API `spec.nodeName`); required with --kubernetes.
    #[arg(long, env = "NODE_NAME", required_if_eq("kubernetes", "true"))]
    node_name: Option<String>,
    /// This pod's IP (downward API `status.podIP`): the address the operator routes to.
    #[arg(long, env = "POD_IP", required_if_eq("kubernetes", "true"))]
    pod_ip: Option<String>,
    /// This pod's name, the Lease holder (downward API `metadata.name`).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Namespace of the node Lease (the operator's; downward API `metadata.namespace`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "modelcache")]
    namespace: String,
    /// How often the node Lease is renewed; the operator treats a Lease older than
    /// its --node-lease-expiry-seconds as a dead node.
    #[arg(long, env = "MODELCACHE_LEASE_RENEW_SECONDS", default_value_t = 10)]
    lease_renew_seconds: u64,
    /// Least seconds between two ModelNode status writes.
    #[arg(long, env = "MODELCACHE_REPORT_INTERVAL_SECONDS", default_value_t = 2)]
    report_interval_seconds: u64,
    /// Folder of the disk tier that models named by a source are downloaded
    /// into in cluster mode (default: `.modelcache/downloads` in the models folder).
    #[arg(long, env = "MODELCACHE_DOWNLOAD_DIR")]
    download_dir: Option<PathBuf>,
    /// Byte budget of the disk tier: least recently used downloads are deleted
    /// to make room; auto: half the free space of its volume at start.
    #[arg(long, env = "MODELCACHE_DISK_CACHE_BYTES", default_value = "auto", value_parser = parse_budget)]
    disk_cache_bytes: Budget,
    /// File holding the cluster's peer token: agents that send it may copy
    /// this node's models, and this agent copies from neighbours with it
    /// before it downloads from a source (cluster mode).
    #[arg(long, env = "MODELCACHE_PEER_TOKEN_FILE")]
    peer_token_file: Option<PathBuf>,
    /// Search the models folder again this often, so that models copied in or
    /// removed are served (and reported) without a restart; 0 never.
    #[arg(long, env = "MODELCACHE_RESCAN_SECONDS", default_value_t = 60)]
    rescan_seconds: u64,
}
