//! Command-line definitions (clap) and dispatch to the role crates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use shoal_core::ModelName;
use shoal_replica::{ModelSpec, ReplicaConfig, ReplicaServer};
use shoal_runtime::LoadOptions;
use shoal_runtime::tract::TractBackend;

/// Shoal keeps machine-learning models available everywhere, all the time.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about, propagate_version = true)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "SHOAL_LOG_JSON")]
    log_json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a replica: serve ONNX models over the Open Inference Protocol v2.
    Replica(ReplicaArgs),
    /// Benchmarks, side by side with reference systems (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// tract against ONNX Runtime on the bundled models (build with --features ort).
    Runtime {
        /// Path of libonnxruntime.so (from the onnxruntime wheel).
        #[arg(long, env = "ORT_DYLIB_PATH")]
        ort_lib: PathBuf,
        /// Alternating rounds per model.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A replica's serving overhead: HTTP end-to-end p50 minus raw inference p50.
    Overhead {
        /// Bundled model file to serve.
        #[arg(long, default_value = "digits-v1.onnx")]
        model: String,
        /// Alternating rounds.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Requests per round and series.
        #[arg(long, default_value_t = 3000)]
        iterations: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

async fn run_bench(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Runtime {
            ort_lib,
            rounds,
            json,
        } => {
            let ort = shoal_bench::runtime::ort_backend(&ort_lib)?;
            let results = tokio::task::spawn_blocking(move || {
                shoal_bench::runtime::compare(ort.as_ref(), rounds)
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                println!(
                    "{:<38} {:>14} {:>12} {:>12} {:>12} {:>12} {:>10}",
                    "model", "shape", "tract p50", "tract p99", "ORT p50", "ORT p99", "p50 ratio"
                );
                for r in results {
                    println!(
                        "{:<38} {:>14} {:>10.1}µs {:>10.1}µs {:>10.1}µs {:>10.1}µs {:>9.2}×",
                        r.model,
                        format!("{:?}", r.shape),
                        r.tract.p50_us,
                        r.tract.p99_us,
                        r.onnxruntime.p50_us,
                        r.onnxruntime.p99_us,
                        r.p50_ratio
                    );
                }
            }
        }
        BenchCommand::Overhead {
            model,
            rounds,
            iterations,
            json,
        } => {
            let r = shoal_bench::overhead::measure(&model, rounds, iterations).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "model {}: {} rounds x {} requests",
                    r.model, rounds, iterations
                );
                println!(
                    "  raw inference  p50 {:>8.1}µs  p99 {:>8.1}µs",
                    r.raw.p50_us, r.raw.p99_us
                );
                println!(
                    "  HTTP end-to-end p50 {:>8.1}µs  p99 {:>8.1}µs",
                    r.http.p50_us, r.http.p99_us
                );
                println!(
                    "  GET /health     p50 {:>8.1}µs  p99 {:>8.1}µs  (HTTP floor, no work)",
                    r.floor.p50_us, r.floor.p99_us
                );
                println!(
                    "  serving overhead (median of per-round p50 differences): {:.1}µs",
                    r.overhead_p50_us
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
struct ReplicaArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090", env = "SHOAL_ADDR")]
    addr: SocketAddr,

    /// Directory for the replica's state (its artifact cache).
    #[arg(long, default_value = ".shoal/replica", env = "SHOAL_DATA_DIR")]
    data_dir: PathBuf,

    /// A model to serve: NAME=PATH[@VERSION] (version defaults to 1). Repeat for more.
    #[arg(long = "model", value_name = "NAME=PATH[@VERSION]")]
    models: Vec<ModelSpec>,

    /// Override a model input's shape: NAME:INPUT=D,D,… with -1 for a dynamic
    /// dimension, e.g. ocr:x=-1,3,48,192. Repeat for more.
    #[arg(long = "input-shape", value_name = "NAME:INPUT=DIMS")]
    input_shapes: Vec<String>,

    /// Replica id shown in metrics and the x-shoal-replica header
    /// [default: replica-PORT].
    #[arg(long)]
    id: Option<String>,

    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = shoal_replica::DEFAULT_BODY_LIMIT)]
    body_limit: usize,

    /// Most tensor elements accepted in one request.
    #[arg(long, default_value_t = shoal_oip::Limits::default().max_elements)]
    max_elements: usize,

    /// Inferences run at once [default: number of cores].
    #[arg(long)]
    threads: Option<usize>,
}

/// Parses `NAME:INPUT=D,D,…` flags into per-model load options.
fn parse_input_shapes(flags: &[String]) -> anyhow::Result<BTreeMap<ModelName, LoadOptions>> {
    let mut out: BTreeMap<ModelName, LoadOptions> = BTreeMap::new();
    for flag in flags {
        let parse = || -> anyhow::Result<(ModelName, String, Vec<Option<usize>>)> {
            let (target, dims) = flag.split_once('=').context("missing '='")?;
            let (model, input) = target
                .split_once(':')
                .context("missing ':' between model and input")?;
            let dims = dims
                .split(',')
                .map(|d| match d.trim() {
                    "-1" => Ok(None),
                    d => d
                        .parse::<usize>()
                        .map(Some)
                        .with_context(|| format!("bad dimension {d:?}")),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((ModelName::new(model)?, input.to_owned(), dims))
        };
        let (model, input, dims) = parse().with_context(|| {
            format!("--input-shape {flag:?}: expected NAME:INPUT=D,D,… (e.g. ocr:x=-1,3,48,192)")
        })?;
        out.entry(model)
            .or_default()
            .input_shapes
            .insert(input, dims);
    }
    Ok(out)
}

async fn run_replica(args: ReplicaArgs) -> anyhow::Result<()> {
    if args.models.is_empty() {
        bail!(
            "nothing to serve: give at least one --model NAME=PATH[@VERSION] (e.g. --model digits=models/digits-v1.onnx)"
        );
    }
    for m in &args.models {
        if !m.path.is_file() {
            bail!(
                "model file {} (for --model {}) does not exist",
                m.path.display(),
                m.name
            );
        }
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let config = ReplicaConfig {
        id: args.id,
        addr: args.addr,
        load_options: parse_input_shapes(&args.input_shapes)?,
        models: args.models,
        body_limit: args.body_limit,
        limits: shoal_oip::Limits {
            max_elements: args.max_elements,
        },
        threads: args.threads,
        max_queue: None,
    };
    let mut server = ReplicaServer::start(config, Arc::new(TractBackend::default())).await?;
    tracing::info!(addr = %server.addr, id = server.replica.id(), "replica listening");
    // Tools that start replicas on port 0 read the address from this line.
    println!("shoal replica listening on http://{}", server.addr);
    let ended = tokio::select! {
        () = shoal_http::shutdown_signal() => None,
        result = server.join() => Some(result),
    };
    match ended {
        Some(result) => result?,
        None => {
            tracing::info!("shutting down: finishing requests in flight");
            server.stop().await?;
        }
    }
    Ok(())
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    shoal_telemetry::init_logging(cli.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Replica(args) => run_replica(args).await,
            Command::Bench(command) => run_bench(command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
