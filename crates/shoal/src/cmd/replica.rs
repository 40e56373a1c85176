//! `shoal replica`: serve models, standalone (`--model`) or synced with a
//! control plane (`--control`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use shoal_core::ModelName;
use shoal_replica::{ModelSpec, ReplicaConfig, ReplicaServer};
use shoal_runtime::LoadOptions;
use shoal_runtime::engines::Engines;
use shoal_sync::SyncConfig;

use crate::cli::Global;

#[derive(Debug, clap::Args)]
pub(crate) struct ReplicaArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090", env = "SHOAL_ADDR")]
    addr: SocketAddr,

    /// Also serve the Open Inference Protocol over gRPC
    /// (inference.GRPCInferenceService, as tritonclient.grpc speaks it) on
    /// this address (port 0: any free port).
    #[arg(long, env = "SHOAL_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,

    /// Directory for the replica's state: its id, artifact cache and last desired state.
    #[arg(long, default_value = ".shoal/replica", env = "SHOAL_DATA_DIR")]
    data_dir: PathBuf,

    /// Region this replica runs in.
    #[arg(long, default_value = "default", env = "SHOAL_REGION")]
    region: String,
    /// Be a standby: load and warm what the fleet serves, but take traffic
    /// only while the region is short of active replicas (one is dead or
    /// ejected). Needs --control.
    #[arg(long)]
    standby: bool,
    /// What kind of capacity this replica runs on: spot (preemptible,
    /// may vanish at any time) or on-demand. Placement keeps a model's
    /// `--min-on-demand` copies on on-demand replicas.
    #[arg(long, default_value = "on-demand", env = "SHOAL_TIER")]
    tier: shoal_api::scale::Tier,

    /// Address other processes reach this replica at [default: the bound address].
    #[arg(long)]
    advertise: Option<String>,

    /// Seconds between polls of the control plane (±10 % jitter); the
    /// fallback when the watch stream is down.
    #[arg(long, default_value_t = 10.0)]
    poll_interval: f64,

    /// A model to serve standalone: NAME=PATH[@VERSION] (version defaults to 1). Repeat for more.
    #[arg(long = "model", value_name = "NAME=PATH[@VERSION]")]
    models: Vec<ModelSpec>,

    /// The engine that runs the --model models: tract (built in), ort
    /// (ONNX Runtime, from the onnxruntime Python package or
    /// ORT_DYLIB_PATH), or auto (both timed at load, the faster kept).
    /// Versions from a control plane carry their own.
    #[arg(long, default_value = "tract", value_name = "tract|ort|auto")]
    engine: shoal_core::Engine,

    /// Override a model input's shape: MODEL:INPUT=D,D,… with -1 for a
    /// dynamic dimension, e.g. ocr:x=-1,3,48,192; with one --model,
    /// INPUT=D,D,… as `shoal model push` takes it. Repeat for more.
    #[arg(long = "input-shape", value_name = "[MODEL:]INPUT=DIMS")]
    input_shapes: Vec<String>,

    /// Replica id shown in metrics, status and the x-shoal-replica header
    /// [default: kept in DATA_DIR/replica-id, generated on first start].
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

    /// Requests admitted beyond those running; past it a request is
    /// answered 503 with Retry-After before its body is read [default:
    /// 64 per thread].
    #[arg(long)]
    max_queue: Option<usize>,

    /// Tokens (one per line) that open the replica's admin API, besides the
    /// fleet token it holds when synced with a control plane.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,

    /// Longest an inference may wait for a thread and run, in milliseconds:
    /// past it the request gets 503 (never started) or 504 (abandoned).
    #[arg(long, default_value_t = 30_000)]
    inference_timeout_ms: u64,
    /// Requests a model runs in at most this many microseconds (its cost
    /// measured at load) run on the request's own task instead of being
    /// handed to an inference thread; 0: always hand off.
    #[arg(long, default_value_t = 25)]
    inline_max_us: u64,
    /// Live sequences of stateful models this replica holds at most; a
    /// sequence_start beyond it is answered 429.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_sequences: u64,
    /// Seconds a sequence may go without a step before its state is freed.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    sequence_idle_secs: u64,
    /// Where sequences' state lives: memory (this replica only: a sequence
    /// dies with its replica) or redis://HOST:PORT[/DB], written through
    /// after every step so that any replica can continue it.
    #[arg(long, default_value = "memory", env = "SHOAL_SESSION_STORE", value_parser = crate::cli::session_store_url)]
    session_store: String,

    /// Serve /admin/faults, which makes the replica slow, fail or hang on
    /// demand: for drills, tests and benchmarks, never in production.
    #[arg(long)]
    allow_fault_injection: bool,

    /// NATS server with JetStream (nats://HOST:PORT) carrying desired
    /// states and routing tables: followed instead of the control plane's watch stream (polling stays the fallback).
    #[arg(long, env = "SHOAL_EVENTS", value_parser = crate::cli::events_url)]
    events: Option<String>,

    #[command(flatten)]
    tls: crate::cli::ServeTls,

    #[command(flatten)]
    connections: crate::cli::ServeConnections,
}

/// The tokens of `--admin-token-file`: one per line, blank lines and
/// `#` comments skipped.
fn admin_tokens(path: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --admin-token-file {}", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        bail!("--admin-token-file {} holds no token", path.display());
    }
    Ok(tokens)
}

/// Parses `--input-shape` flags into per-model load options. A flag is
/// `MODEL:INPUT=D,D,…`, or `INPUT=D,D,…` (what `shoal model push` takes)
/// when one `--model` is served; the dimensions are read as for a push.
fn parse_input_shapes(
    flags: &[String],
    models: &[ModelSpec],
) -> anyhow::Result<BTreeMap<ModelName, LoadOptions>> {
    let mut per_model: BTreeMap<ModelName, Vec<String>> = BTreeMap::new();
    for flag in flags {
        let target = flag.split_once('=').map_or(flag.as_str(), |(t, _)| t);
        // An input name may hold ':' itself (TensorFlow's "input:0"): the
        // part before it names a model only when it is a served one.
        let named = target.split_once(':').and_then(|(model, _)| {
            models
                .iter()
                .find(|m| m.name.as_str() == model)
                .map(|m| (m.name.clone(), flag[model.len() + 1..].to_owned()))
        });
        let (model, shape) = match (named, models) {
            (Some(named), _) => named,
            (None, [only]) => (only.name.clone(), flag.clone()),
            (None, _) => bail!(
                "--input-shape {flag:?}: say which model it is for, as MODEL:INPUT=D,D,… \
                 (e.g. ocr:x=-1,3,48,192), naming one of the --model models"
            ),
        };
        per_model.entry(model).or_default().push(shape);
    }
    per_model
        .into_iter()
        .map(|(model, flags)| {
            let dims = super::client::shapes(&flags, "input-shape", "-1 for dynamic")?;
            let options = LoadOptions::from_dims(&dims)
                .map_err(|e| anyhow::anyhow!("--input-shape for {model}: {e}"))?;
            Ok((model, options))
        })
        .collect()
}

/// The replica id: given, or kept in the data directory across restarts.
fn replica_id(given: Option<String>, data_dir: &Path) -> anyhow::Result<String> {
    if let Some(id) = given {
        return Ok(id);
    }
    let path = data_dir.join("replica-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_owned();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = format!("replica-{:08x}", rand::random::<u32>());
    std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

pub(crate) async fn run(args: ReplicaArgs, global: &Global) -> anyhow::Result<()> {
    args.connections.apply()?;
    let args_scheme = args.tls.scheme();
    if args.models.is_empty() && global.control.is_none() {
        bail!(
            "nothing to serve: give --control URL to serve what the control plane deploys, \
             or at least one --model NAME=PATH[@VERSION] (e.g. --model digits=models/digits-v1.onnx)"
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
    let id = replica_id(args.id.clone(), &args.data_dir)?;
    let mut load_options = parse_input_shapes(&args.input_shapes, &args.models)?;
    for m in &args.models {
        load_options.entry(m.name.clone()).or_default().engine = args.engine;
    }
    let config = ReplicaConfig {
        id: Some(id.clone()),
        addr: args.addr,
        grpc_addr: args.grpc_addr,
        load_options,
        models: args.models,
        body_limit: args.body_limit,
        limits: shoal_oip::Limits {
            max_elements: args.max_elements,
        },
        threads: args.threads,
        max_queue: args.max_queue,
        admin_tokens: admin_tokens(args.admin_token_file.as_deref())?,
        allow_fault_injection: args.allow_fault_injection,
        tls: args.tls.server(global)?,
        inference_timeout: Duration::from_millis(args.inference_timeout_ms.max(1)),
        inline_max: Duration::from_micros(args.inline_max_us),
        sequences: shoal_replica::sequences::SequenceLimits {
            max: usize::try_from(args.max_sequences).unwrap_or(usize::MAX),
            idle: Duration::from_secs(args.sequence_idle_secs),
        },
        session_store: match args.session_store.as_str() {
            "memory" => None,
            url => Some(std::sync::Arc::new(
                shoal_replica::session_store::RedisStore::new(
                    url,
                    Duration::from_secs(args.sequence_idle_secs),
                )?,
            )),
        },
    };
    if args.allow_fault_injection {
        tracing::warn!(
            "fault injection is on: /admin/faults can make this replica slow, fail or hang"
        );
    }
    let backend = Arc::new(Engines::default());
    if args.standby && global.control.is_none() {
        anyhow::bail!(
            "--standby needs --control: gateways learn which replicas are standbys from the control plane"
        );
    }
    let mut server = match global.control.clone() {
        None => ReplicaServer::start(config, backend).await?,
        Some(control) => {
            let sync = SyncConfig {
                control,
                token: global.role_token()?,
                id: id.clone(),
                region: args.region.clone(),
                advertise: args.advertise.clone().unwrap_or_default(),
                data_dir: args.data_dir.clone(),
                poll_interval: Duration::from_secs_f64(args.poll_interval.max(0.05)),
                labels: BTreeMap::new(),
                standby: args.standby,
                tier: args.tier,
                events: args.events.clone(),
            };
            shoal_sync::start_replica(config, sync, backend).await?
        }
    };
    tracing::info!(id = server.replica.id(), "replica id");
    super::announce("replica", args_scheme, server.addr, server.grpc_addr);
    run_until_signal!(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models(names: &[&str]) -> Vec<ModelSpec> {
        names
            .iter()
            .map(|n| format!("{n}=/m/{n}.onnx").parse().unwrap())
            .collect()
    }

    fn flags(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn one_model_takes_the_push_syntax() {
        let out = parse_input_shapes(&flags(&["x=-1,3,48,192"]), &models(&["ocr"])).unwrap();
        let ocr = ModelName::new("ocr").unwrap();
        assert_eq!(
            out[&ocr].input_shapes["x"],
            vec![None, Some(3), Some(48), Some(192)]
        );
        // A colon belongs to the input's name unless it names a model.
        let out = parse_input_shapes(&flags(&["input:0=1,64"]), &models(&["ocr"])).unwrap();
        assert_eq!(out[&ocr].input_shapes["input:0"], vec![Some(1), Some(64)]);
    }

    #[test]
    fn several_models_need_the_model_named() {
        let two = models(&["ocr", "digits"]);
        let out =
            parse_input_shapes(&flags(&["ocr:x=-1,3,48,192", "digits:input=1,64"]), &two).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[&ModelName::new("digits").unwrap()].input_shapes["input"],
            vec![Some(1), Some(64)]
        );
        let e = parse_input_shapes(&flags(&["x=1"]), &two).unwrap_err();
        assert!(e.to_string().contains("say which model"), "{e}");
        let e = parse_input_shapes(&flags(&["ocr:x=1,-2"]), &two).unwrap_err();
        assert!(e.to_string().contains("-1 (dynamic) or a size"), "{e:#}");
        let e = parse_input_shapes(&flags(&["ocr:x"]), &two).unwrap_err();
        assert!(e.to_string().contains("expected K=V"), "{e:#}");
    }
}
