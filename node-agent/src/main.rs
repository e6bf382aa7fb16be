//! `modelcache-agent`: the node agent's command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use modelcache_agent::store;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "modelcache-agent",
    version,
    about = "modelcache node agent: model store, cache, generation and HTTP API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Print the SHA-256 content identity of a model (what `model.sha256` pins).
    Hash {
        path: PathBuf,
        /// Cache hashes under this folder, keyed by path, size and mtime.
        #[arg(long, env = "MODELCACHE_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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
        Command::Hash { path, state_dir } => {
            println!("{}", store::identity::sha256(&path, state_dir.as_deref())?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
