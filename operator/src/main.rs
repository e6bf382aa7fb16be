//! `modelcache-operator`: the cluster scheduler for models.

use anyhow::Context;
use clap::{Parser, Subcommand};
use modelcache_operator::leader::Timing;
use modelcache_operator::scheduler::{self, Node, Options, Strategy};
use modelcache_operator::simulate::{self, ClusterSpec, TraceSpec};
use modelcache_operator::{controller, daemon, gateway};
use modelcache_support::{init_logging, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "modelcache-operator",
    version,
    about = "modelcache operator: places ModelDeployments on GPU nodes"
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
    /// Run the operator in a cluster (in-cluster config, or KUBECONFIG): reconcile
    /// ModelDeployments, schedule them onto node agents, and route to them.
    Run(RunArgs),
    /// Serve the OpenAI images API for every ModelDeployment in the cluster at one
    /// base URL: route each request to an agent holding its model Ready (least
    /// wait, then VRAM before RAM, then LoRA affinity), retry on another when one
    /// fails, and scale autoscaled deployments up from zero.
    Gateway(GatewayArgs),
    /// Run the real scheduler on a described cluster and request trace, without a
    /// cluster, and print placement quality and timing (capacity planning).
    Simulate(SimulateArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespace of the agents' node Leases and of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "modelcache")]
    namespace: String,
    /// Where /metrics is served.
    #[arg(
        long,
        env = "MODELCACHE_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    metrics_listen: std::net::SocketAddr,
    /// Where /healthz and /readyz are served.
    #[arg(long, env = "MODELCACHE_HEALTH_LISTEN", default_value = "0.0.0.0:8081")]
    health_listen: std::net::SocketAddr,
    /// Elect a leader through a Lease, so that several replicas can run.
    #[arg(long, env = "MODELCACHE_LEADER_ELECT")]
    leader_elect: bool,
    /// Leader Lease duration: how long a dead leader blocks a takeover. The
    /// leader stops if it cannot renew within 2/3 of it, and renews every 2/15
    /// of it (client-go's 15 s / 10 s / 2 s).
    #[arg(long, env = "MODELCACHE_LEADER_LEASE_SECONDS", default_value_t = 15)]
    leader_lease_seconds: u64,
    /// A node whose agent Lease is older than this is not scheduled to, and its
    /// placements move elsewhere.
    #[arg(
        long,
        env = "MODELCACHE_NODE_LEASE_EXPIRY_SECONDS",
        default_value_t = 40
    )]
    node_lease_expiry_seconds: u64,
    /// Re-reconcile every deployment this often to repair drift.
    #[arg(long, env = "MODELCACHE_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Prefer fuller nodes (keeping others free for big models) instead of spreading.
    #[arg(long, env = "MODELCACHE_BIN_PACK")]
    bin_pack: bool,
    #[command(flatten)]
    source: SourceArgs,
    /// Leader identity and Event reporter instance (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How often the leader reads the agents' load and sets the replicas of
    /// autoscaled deployments (0: never).
    #[arg(
        long,
        env = "MODELCACHE_AUTOSCALE_INTERVAL_SECONDS",
        default_value_t = 5
    )]
    autoscale_interval_seconds: u64,
}

#[derive(clap::Args)]
struct GatewayArgs {
    /// Namespace a bare `model` name is looked up in (others are named namespace/name).
    #[arg(long, env = "POD_NAMESPACE", default_value = "modelcache")]
    namespace: String,
    /// Where the API is served.
    #[arg(long, env = "MODELCACHE_LISTEN", default_value = "0.0.0.0:8080")]
    listen: std::net::SocketAddr,
    /// Where /metrics is served.
    #[arg(
        long,
        env = "MODELCACHE_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    metrics_listen: std::net::SocketAddr,
    /// File with the bearer token clients must send; the gateway sends it to the
    /// agents too (the agents' own token). An empty file is refused.
    #[arg(long, env = "MODELCACHE_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Agents tried for one request: a connection failure, 503 or 429 moves it to the next.
    #[arg(long, env = "MODELCACHE_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: usize,
    /// How much busier than the mean an agent may be and still receive the LoRA
    /// sets that hash to it.
    #[arg(long, env = "MODELCACHE_LOAD_FACTOR", default_value_t = 1.25)]
    load_factor: f64,
    /// How long a request waits for a deployment without a ready replica
    /// (scaling up from zero, loading) before a 503.
    #[arg(
        long,
        env = "MODELCACHE_SCALE_UP_TIMEOUT_SECONDS",
        default_value_t = 120
    )]
    scale_up_timeout_seconds: u64,
    /// Requests that may wait per deployment; more get 429.
    #[arg(long, env = "MODELCACHE_MAX_HELD_REQUESTS", default_value_t = 100)]
    max_held_requests: usize,
    /// Longest one attempt at an agent may take before a 504.
    #[arg(
        long,
        env = "MODELCACHE_REQUEST_TIMEOUT_SECONDS",
        default_value_t = 600
    )]
    request_timeout_seconds: u64,
    /// Largest JSON body without images, in bytes (413 above it; bodies with control images
    /// or an image prompt, and forms, may reach 32 MiB).
    #[arg(long, env = "MODELCACHE_MAX_BODY_BYTES", default_value_t = 64 << 10)]
    max_body_bytes: usize,
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Cluster description (JSON: {"nodes": [{"name", "ramBytes", "deviceBytes": [...], ...}]}).
    /// Without it: --nodes identical nodes.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Workload (JSON: {"modelBytes": [...], "zipf", "active", "arrivals", "requestsPerArrival", "seed",
    /// and optionally "replicas", "warmVram", "warmRam", "priorities": [...]}).
    /// Without it: --models models of 2–7 GB with Zipf popularity.
    #[arg(long)]
    trace: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    #[arg(long, default_value_t = 200)]
    models: usize,
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    #[arg(long, default_value_t = 5000)]
    arrivals: usize,
    #[arg(long, default_value_t = 4)]
    requests_per_arrival: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Serving replicas per deployment (without --trace).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Share of deployments with warmTier Vram, 0–1 (without --trace).
    #[arg(long, default_value_t = 0.0)]
    warm_vram: f64,
    /// Share of deployments with warmTier Ram, 0–1 (without --trace).
    #[arg(long, default_value_t = 0.0)]
    warm_ram: f64,
    /// Priorities drawn uniformly per deployment, e.g. 0,100 (without --trace; default all 0).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    priorities: Vec<i32>,
    /// Also time a full plan of this many deployments over the cluster.
    #[arg(long, default_value_t = 0)]
    full_plan_deployments: usize,
    /// Compare against the same scheduler with the locality score turned off.
    #[arg(long)]
    compare_locality: bool,
    /// Prefer fuller nodes instead of spreading.
    #[arg(long)]
    bin_pack: bool,
    #[command(flatten)]
    source: SourceArgs,
}

const GIB: u64 = 1 << 30;

/// What a download from a model's remote source costs, for placements of
/// models that have one.
#[derive(clap::Args)]
struct SourceArgs {
    /// Bytes/s one node downloads from remote storage (S3, the hub) at.
    #[arg(long, env = "MODELCACHE_SOURCE_BYTES_PER_SECOND", default_value_t = scheduler::DEFAULT_SOURCE_BPS)]
    source_bytes_per_second: f64,
    /// Seconds before a download's first byte (listing, connecting).
    #[arg(long, env = "MODELCACHE_SOURCE_LATENCY_SECONDS", default_value_t = 1.0)]
    source_latency_seconds: f64,
    /// Bytes/s one node copies a model from another node at.
    #[arg(long, env = "MODELCACHE_PEER_BYTES_PER_SECOND", default_value_t = scheduler::DEFAULT_PEER_BPS)]
    peer_bytes_per_second: f64,
}

impl SourceArgs {
    fn options(&self, locality: bool, strategy: Strategy) -> Options {
        Options {
            locality,
            strategy,
            source_bps: self.source_bytes_per_second.max(1.0),
            source_latency_s: self.source_latency_seconds.max(0.0),
            peer_bps: self.peer_bytes_per_second.max(1.0),
        }
    }
}

fn simulate_cmd(a: SimulateArgs) -> anyhow::Result<()> {
    let cluster = match &a.cluster {
        Some(p) => serde_json::from_str::<ClusterSpec>(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => ClusterSpec::synthetic(a.nodes, 64 * GIB, vec![24 * GIB]),
    };
    let trace = match &a.trace {
        Some(p) => serde_json::from_str::<TraceSpec>(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => TraceSpec {
            model_bytes: (0..a.models)
                .map(|m| (2 * GIB) + (m as u64 * 7919 % 5) * GIB)
                .collect(),
            zipf: a.zipf,
            active: 1000,
            arrivals: a.arrivals,
            requests_per_arrival: a.requests_per_arrival,
            seed: a.seed,
            replicas: a.replicas,
            warm_vram: a.warm_vram,
            warm_ram: a.warm_ram,
            priorities: a.priorities.clone(),
        },
    };
    let strategy = if a.bin_pack {
        Strategy::BinPack
    } else {
        Strategy::Spread
    };
    println!(
        "cluster: {} nodes; workload: {} models (Zipf {}), {} arrivals × {} requests",
        cluster.nodes.len(),
        trace.model_bytes.len(),
        trace.zipf,
        trace.arrivals,
        trace.requests_per_arrival
    );
    let with = simulate::run(&cluster, &trace, a.source.options(true, strategy))?;
    print_report("residency-aware scheduler", &with);
    if a.compare_locality {
        let without = simulate::run(&cluster, &trace, a.source.options(false, strategy))?;
        print_report("same scheduler, locality score off", &without);
        let fewer = 1.0 - with.cold_loads as f64 / without.cold_loads.max(1) as f64;
        println!(
            "cold loads: {} vs {} ({:.0}% fewer with the residency score; goal >= 50%)",
            with.cold_loads,
            without.cold_loads,
            fewer * 100.0
        );
    }
    if a.full_plan_deployments > simulate::MAX_ARRIVALS {
        anyhow::bail!(
            "--full-plan-deployments {} is more than {}",
            a.full_plan_deployments,
            simulate::MAX_ARRIVALS
        );
    }
    if a.full_plan_deployments > 0 {
        let nodes: Vec<Node> = plan_nodes(&cluster);
        let deps = simulate::synthetic_deployments(
            a.full_plan_deployments,
            trace.model_bytes.len().max(1),
            a.seed,
        );
        let t = Instant::now();
        let decisions = scheduler::plan(&nodes, &deps, a.source.options(true, strategy));
        let secs = t.elapsed().as_secs_f64();
        let unplaced = decisions.iter().filter(|d| d.unplaced > 0).count();
        println!("full plan: {} nodes × {} deployments in {secs:.3} s ({unplaced} with unplaced replicas; goal <= 1 s)", nodes.len(), deps.len());
    }
    Ok(())
}

/// The cluster with a few models resident per node, so the full plan scores residency.
fn plan_nodes(cluster: &ClusterSpec) -> Vec<Node> {
    let mut nodes = cluster.scheduler_nodes();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.resident = (0..8)
            .map(|k| {
                (
                    format!("models/m{}", (i * 8 + k) % 200),
                    modelcache_crds::Tier::Ram,
                )
            })
            .collect();
    }
    nodes
}

fn print_report(title: &str, r: &simulate::Report) {
    println!("\n{title}:");
    println!(
        "  placed {} of {} deployments ({} with fewer replicas than asked); unschedulable {}",
        r.placements, r.arrivals, r.partial, r.unschedulable
    );
    for (reason, n) in &r.reasons {
        println!("    {n} × {reason}");
    }
    if r.warm_loads > 0 || r.preemptions > 0 {
        println!(
            "  warm deployments: {} loads when placed; {} reservations preempted ({} placed again elsewhere, {} not)",
            r.warm_loads, r.preemptions, r.preempted_replaced, r.preempted_unplaced
        );
    }
    println!(
        "  requests {}: cold loads {}, RAM→VRAM moves {}",
        r.requests, r.cold_loads, r.ram_moves
    );
    if r.downloads > 0 {
        println!(
            "  downloads {}: {} copied from another node, {:.1} GiB of egress from remote storage",
            r.downloads,
            r.peer_copies,
            r.source_bytes as f64 / (1u64 << 30) as f64
        );
    }
    println!(
        "  switch latency p50 {:.3} s, p99 {:.3} s",
        r.latency_p50, r.latency_p99
    );
    println!(
        "  incremental decisions: {:.0} per second at {} nodes (goal >= 900/s)",
        r.decisions_per_second, r.nodes
    );
}

fn run_cmd(a: RunArgs) -> anyhow::Result<()> {
    let identity = a.identity.unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let settings = daemon::Settings {
        namespace: a.namespace,
        metrics_listen: a.metrics_listen,
        health_listen: a.health_listen,
        leader_elect: a.leader_elect,
        leader_timing: Timing::from_lease(Duration::from_secs(a.leader_lease_seconds.max(3))),
        identity,
        autoscale_interval: (a.autoscale_interval_seconds > 0)
            .then(|| Duration::from_secs(a.autoscale_interval_seconds)),
        controller: controller::Config {
            lease_expiry: Duration::from_secs(a.node_lease_expiry_seconds.max(1)),
            options: a.source.options(
                true,
                if a.bin_pack {
                    Strategy::BinPack
                } else {
                    Strategy::Spread
                },
            ),
            resync: Duration::from_secs(a.resync_seconds.max(1)),
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon::run(settings))
}

fn gateway_cmd(a: GatewayArgs) -> anyhow::Result<()> {
    if !(1.0..=10.0).contains(&a.load_factor) {
        anyhow::bail!(
            "--load-factor must be between 1 and 10, not {}",
            a.load_factor
        );
    }
    let token = match &a.api_token_file {
        Some(p) => Some(modelcache_support::read_secret(p).context("--api-token-file")?),
        None => None,
    };
    let settings = gateway::Settings {
        namespace: a.namespace,
        listen: a.listen,
        metrics_listen: a.metrics_listen,
        token,
        limits: gateway::Limits {
            max_body_bytes: a.max_body_bytes,
            max_attempts: a.max_attempts.max(1),
            load_factor: a.load_factor,
            hold_timeout: Duration::from_secs(a.scale_up_timeout_seconds),
            max_held: a.max_held_requests,
            request_timeout: Duration::from_secs(a.request_timeout_seconds.max(1)),
            ..gateway::Limits::default()
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(gateway::run(settings))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(a) => run_cmd(a),
        Command::Gateway(a) => gateway_cmd(a),
        Command::Simulate(a) => simulate_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
