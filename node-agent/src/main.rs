//! `modelcache-agent`: the node agent's command line.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use modelcache_agent::api::{self, AppState, Limits, Queue};
use modelcache_agent::cache::{CacheConfig, DeviceSlot, DiskLoader, ModelCache};
use modelcache_agent::catalog::Catalog;
use modelcache_agent::metrics::AgentMetrics;
use modelcache_agent::pipeline::{self, DiffusersModel, GenerateParams};
use modelcache_agent::{cluster, demo, memory, store};
use modelcache_crds::{Precision, SchedulerKind};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "modelcache-agent",
    version,
    about = "modelcache node agent: model store, cache, generation and HTTP API"
)]
struct Cli {
    /// Log format.
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
    Generate(GenerateArgs),
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
    /// Convert a single-file (A1111/Civitai layout) checkpoint into a diffusers folder.
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
        method: store::merge::Method,
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
    Request(RequestArgs),
}

#[derive(clap::Args)]
struct RequestArgs {
    /// Base URL, http://HOST:PORT.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model (standalone) or ModelDeployment name (cluster).
    #[arg(long)]
    model: String,
    #[arg(long, default_value = "a lighthouse at dusk")]
    prompt: String,
    /// WIDTHxHEIGHT.
    #[arg(long, default_value = "512x512")]
    size: String,
    #[arg(long, default_value_t = 4)]
    steps: u32,
    /// File holding a bearer token to send.
    #[arg(long, env = "MODELCACHE_API_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where to write the PNG.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args)?,
        Command::Generate(args) => generate(args)?,
        Command::Probe { path } => {
            let r = store::probe(&path)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Command::Search { root } => {
            let found = store::search::find_models(&root);
            for (p, why) in &found.skipped {
                eprintln!("skipped {}: {why}", p.display());
            }
            for m in &found.models {
                match store::probe(m) {
                    Ok(r) => println!("{}", serde_json::to_string(&r)?),
                    Err(e) => eprintln!("skipped {}: {e}", m.display()),
                }
            }
        }
        Command::Convert {
            checkpoint,
            out_dir,
            config,
            tokenizer,
        } => {
            let req = store::convert::ConvertRequest {
                checkpoint: &checkpoint,
                out_dir: &out_dir,
                config_dir: config.as_deref(),
                tokenizer_dir: tokenizer.as_deref(),
            };
            let out = store::convert::convert_main(&req)
                .with_context(|| format!("converting {}", checkpoint.display()))?;
            println!("wrote {}", out.display());
        }
        Command::Merge {
            models,
            out,
            method,
            alpha,
            precision,
            force,
        } => {
            let req = store::merge::MergeRequest {
                inputs: &models,
                out: &out,
                method,
                alpha,
                precision,
                force,
            };
            let r = store::merge::merge(&req)?;
            println!(
                "wrote {}: {} tensors merged, {} copied from the first model",
                out.display(),
                r.merged,
                r.copied
            );
            for c in r.skipped_components {
                println!("component {c}: layouts differ, kept the first model's");
            }
        }
        Command::Request(a) => request(a)?,
        Command::Hash { path, state_dir } => {
            println!("{}", store::identity::sha256(&path, state_dir.as_deref())?);
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (source, threshold) = memory::ensure_mmap_threshold(args.malloc_mmap_threshold);
    let compute = modelcache_agent::device::open(&args.device, args.precision)
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    for d in &compute {
        tracing::info!(device = %d.id, name = %d.name, dtype = ?d.dtype, precision = %args.precision, "compute device (the CPU always computes in f32)");
    }
    tracing::info!(?source, threshold, "malloc mmap threshold");
    std::fs::create_dir_all(&args.models_dir)
        .with_context(|| format!("creating {}", args.models_dir.display()))?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state folder {}", args.state_dir.display()))?;
    if args.demo {
        let dir = demo::write_demo(&args.models_dir).context("writing the demo model")?;
        tracing::warn!(path = %dir.display(), "serving the demo model `demo`: tiny random weights, its images are noise");
    }
    let token = match &args.api_token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the API token file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let metrics = AgentMetrics::new()?;
    let cache = ModelCache::new(
        CacheConfig {
            load_threads: args.load_threads,
            trim_on_evict: args.malloc_trim_on_evict,
            devices: compute
                .iter()
                .map(|d| DeviceSlot {
                    device: d.device.clone(),
                    budget: d.budget(args.vram_cache_bytes.0),
                })
                .collect(),
            dtype: compute[0].dtype,
            ..CacheConfig::cpu(args.ram_cache_bytes, 0)
        },
        Box::new(DiskLoader),
        Some(&metrics.registry),
    );
    metrics.register_cache(cache.clone())?;
    let catalog = Catalog::scan(&args.models_dir, &args.state_dir, args.tokenizer.as_deref());
    tracing::info!(models = catalog.entries().len(), dir = %args.models_dir.display(), "model search done");
    let state = Arc::new(AppState::new(
        cache,
        catalog,
        metrics.clone(),
        Queue::new(args.concurrency, args.queue_size),
        Limits::default(),
        token,
    ));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let api = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        if args.rescan_seconds > 0 {
            let (state, every) = (state.clone(), Duration::from_secs(args.rescan_seconds));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let s = state.clone();
                    let before = s.catalog.found().len();
                    let after = tokio::task::spawn_blocking(move || {
                        s.catalog.rescan();
                        s.catalog.found().len()
                    })
                    .await
                    .unwrap_or(before);
                    if after != before {
                        tracing::info!(before, after, "models folder changed");
                    }
                }
            });
        }
        let cluster = if args.kubernetes {
            let client = kube::Client::try_default()
                .await
                .context("--kubernetes: connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            let node_name = args.node_name.clone().unwrap_or_default();
            let renew = Duration::from_secs(args.lease_renew_seconds.max(1));
            let settings = cluster::Settings {
                pod_name: args.pod_name.clone().unwrap_or_else(|| format!("modelcache-agent-{node_name}")),
                node_name,
                pod_ip: args.pod_ip.clone().unwrap_or_default(),
                namespace: args.namespace.clone(),
                api_port: api.local_addr()?.port(),
                lease_renew: renew,
                lease_duration: renew * 4,
                report_interval: Duration::from_secs(args.report_interval_seconds.max(1)),
            };
            tracing::info!(node = %settings.node_name, namespace = %settings.namespace, "cluster mode: serving the ModelDeployments placed on this node");
            let agent = cluster::ClusterAgent::new(state.clone(), settings);
            Some(agent.run(client))
        } else {
            None
        };
        let cluster = async move {
            match cluster {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        let mon = tokio::net::TcpListener::bind(&args.metrics_listen)
            .await
            .with_context(|| format!("binding {}", args.metrics_listen))?;
        tracing::info!(api = %api.local_addr()?, metrics = %mon.local_addr()?, "serving");
        let shutdown = async {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term => {} }
            tracing::info!("shutting down");
        };
        let metrics_server = axum::serve(mon, api::metrics_router(metrics).into_make_service());
        let api_server = axum::serve(api, api::router(state).into_make_service())
            .with_graceful_shutdown(shutdown);
        tokio::select! {
            r = api_server => r.context("API server")?,
            r = metrics_server => r.context("metrics server")?,
            () = cluster => {}
        }
        anyhow::Ok(())
    })
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let loras = a
        .lora
        .iter()
        .map(|spec| {
            let (path, weight) = match spec.rsplit_once(':') {
                Some((p, w)) if w.parse::<f64>().is_ok() => (p, w.parse::<f64>().unwrap_or(1.0)),
                _ => (spec.as_str(), 1.0),
            };
            let path = std::fs::canonicalize(path)
                .with_context(|| format!("--lora {spec}: {path} not found"))?;
            Ok((path.to_string_lossy().into_owned(), weight))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (w, h) = a
        .size
        .split_once('x')
        .context("--size must be WIDTHxHEIGHT")?;
    let (width, height) = (
        w.parse::<usize>().context("--size width")?,
        h.parse::<usize>().context("--size height")?,
    );
    let dir = if a.model.is_dir() {
        a.model.clone()
    } else {
        store::convert::converted(
            &a.state_dir,
            &a.model,
            a.config.as_deref(),
            a.tokenizer.as_deref(),
        )?
    };
    let model = DiffusersModel::open(&dir)?;
    let latents = match &a.latents {
        Some(p) => Some(
            candle_core::safetensors::load(p, &candle_core::Device::Cpu)
                .map_err(|e| {
                    anyhow::anyhow!("{}: {}", p.display(), store::error::candle_message(&e))
                })?
                .remove("latents")
                .with_context(|| format!("{} has no tensor named `latents`", p.display()))?,
        ),
        None => None,
    };
    let p = GenerateParams {
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        steps: a.steps,
        guidance_scale: a.guidance,
        width,
        height,
        seed: a.seed,
        scheduler: a.scheduler,
        n: a.n,
        latents,
        clip_skip: a.clip_skip,
        loras,
        embeddings: a
            .embedding
            .iter()
            .map(|p| (pipeline::embedding::trigger_name(p), p.clone()))
            .collect(),
        seamless: a.seamless,
    };
    // Room for the model's RAM and device copies plus the adapters' device copies.
    let lora_bytes: u64 = p
        .loras
        .iter()
        .filter_map(|(k, _)| std::fs::metadata(k).ok())
        .map(|m| m.len() * 2)
        .sum();
    let budget = store::probe(&dir)?.size_bytes.f32 * 2 + lora_bytes + (64 << 20);
    let compute = modelcache_agent::device::open(&a.device, a.precision)
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?
        .remove(0);
    let cache = ModelCache::new(
        CacheConfig {
            devices: vec![DeviceSlot {
                device: compute.device.clone(),
                budget,
            }],
            dtype: compute.dtype,
            ..CacheConfig::cpu(budget, budget)
        },
        Box::new(DiskLoader),
        None,
    );
    let images = pipeline::generate(&cache, &model, &p, &|i, step, steps| {
        tracing::info!(image = i, step, steps, "denoising");
        true
    })?;
    for (i, img) in images.iter().enumerate() {
        let out = if i == 0 {
            a.out.clone()
        } else {
            numbered(&a.out, i)
        };
        let bytes = match out.extension().and_then(|e| e.to_str()) {
            Some("npy") => img.to_npy(),
            _ => img.to_png()?,
        };
        std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn request(a: RequestArgs) -> anyhow::Result<()> {
    let token = match &a.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let body = serde_json::json!({
        "model": a.model, "prompt": a.prompt, "size": a.size, "steps": a.steps,
        "n": 1, "response_format": "b64_json",
    });
    let started = std::time::Instant::now();
    let (status, reply) = modelcache_agent::client::post_json(
        &a.url,
        "/v1/images/generations",
        &body,
        token.as_deref(),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&reply)
        .with_context(|| format!("HTTP {status}: the reply is not JSON"))?;
    if status != 200 {
        anyhow::bail!(
            "HTTP {status}: {}",
            v["error"]["message"].as_str().unwrap_or("no error message")
        );
    }
    let b64 = v["data"][0]["b64_json"]
        .as_str()
        .context("the reply has no data[0].b64_json")?;
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("data[0].b64_json is not base64")?;
    let (w, h) = pipeline::image::png_size(&png).context("the image is not a PNG")?;
    if format!("{w}x{h}") != a.size {
        anyhow::bail!("asked for {} but got a {w}x{h} image", a.size);
    }
    if let Some(out) = &a.out {
        std::fs::write(out, &png).with_context(|| format!("writing {}", out.display()))?;
    }
    println!(
        "ok: {w}x{h} PNG from {} in {:.1} s",
        a.model,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn numbered(path: &Path, i: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    path.with_file_name(format!("{stem}-{i}{ext}"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
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
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A device budget: `auto` (from the device's free memory) or a byte size.
#[derive(Debug, Clone, Copy)]
struct Budget(Option<u64>);

fn parse_budget(s: &str) -> Result<Budget, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        Ok(Budget(None))
    } else {
        parse_bytes(s).map(|b| Budget(Some(b)))
    }
}

/// Byte sizes: plain bytes or with a Ki/Mi/Gi/Ti (or K/M/G/T, powers of 1000) suffix.
fn parse_bytes(s: &str) -> Result<u64, String> {
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
        .map_err(|_| format!("{s:?} is not a byte size (examples: 1073741824, 8Gi, 512Mi)"))?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err(format!("{s:?} is not a byte size"));
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
    /// File holding the bearer token clients must send; no authentication without it.
    #[arg(long, env = "MODELCACHE_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// M_MMAP_THRESHOLD to apply when MALLOC_MMAP_THRESHOLD_ is not set.
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
    /// Search the models folder again this often, so that models copied in or
    /// removed are served (and reported) without a restart; 0 never.
    #[arg(long, env = "MODELCACHE_RESCAN_SECONDS", default_value_t = 60)]
    rescan_seconds: u64,
}

/// Options of `generate`.
#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers folder or a single-file checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// Compute device: auto (the first GPU in CUDA builds, else the CPU), cpu
    /// or cuda:N (of a list, the first).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Compute precision on a GPU (f16, bf16, f32); the CPU computes in f32.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 25)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// ddim, euler-ancestral or dpm++2m.
    #[arg(long, default_value = "ddim")]
    scheduler: SchedulerKind,
    /// WIDTHxHEIGHT, multiples of 8.
    #[arg(long, default_value = "512x512")]
    size: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of images (written as OUT, OUT-1, …).
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Initial latents (safetensors, key `latents`) instead of seeded noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// LoRA adapters as PATH:WEIGHT.
    #[arg(long)]
    lora: Vec<String>,
    /// Number of final CLIP layers to skip.
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Tile seamlessly along x, y or xy (circular padding in the UNet and VAE).
    #[arg(long, default_value = "none", value_parser = pipeline::unet::conv::Seamless::parse)]
    seamless: pipeline::unet::conv::Seamless,
    /// Textual inversion embedding files (or learned_embeds.bin folders), used in
    /// the prompt as `<name>` where name is the file stem.
    #[arg(long)]
    embedding: Vec<PathBuf>,
    /// Architecture of a single-file checkpoint (a diffusers-layout folder).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Tokenizer folder for a single-file checkpoint (default: the standard CLIP vocabulary).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Where converted checkpoints are cached.
    #[arg(
        long,
        env = "MODELCACHE_STATE_DIR",
        default_value = ".modelcache-state"
    )]
    state_dir: PathBuf,
    /// Output file: .png, or .npy for the float32 HWC image in [0, 1].
    #[arg(long)]
    out: PathBuf,
}
