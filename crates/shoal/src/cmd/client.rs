//! Client commands: talk to the control plane's API and print tables (or
//! JSON with `--json`).

use shoal_telemetry::say;
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use futures::StreamExt;
use shoal_api::deploy::{DeployRequest, Deployment, RolloutView};
use shoal_api::registry::{Batching, NewVersion};
use shoal_client::ApiClient;
use shoal_core::ModelRef;

use crate::cli::Global;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ModelCommand {
    /// Upload a model file as a new version; prints the version and its SHA-256.
    Push(Box<PushArgs>),
    /// Every model in the registry.
    List,
    /// One model and its versions, or one version: NAME[:VERSION].
    Show {
        /// NAME or NAME:VERSION.
        model: ModelRef,
    },
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token; its secret is printed once (with --json: {"token": …}).
    Create {
        /// Name, as the audit log will show it (letters, digits, . _ -).
        #[arg(long)]
        name: String,
        /// viewer (reads), deployer (push, deploy, traffic, rollouts,
        /// rollback), admin (everything) or fleet (replicas and gateways).
        #[arg(long)]
        role: shoal_api::auth::Role,
    },
    /// Every token: name, role, when and by whom it was created.
    List,
    /// Revoke a token: it stops working at once.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// How replicas serve a version, set at push and changed at deploy.
#[derive(Debug, clap::Args)]
pub(crate) struct ServingFlags {
    /// Dynamic batching: requests that arrive together run as one
    /// inference of up to N rows, each answered with its own rows. For
    /// models whose inputs and outputs all have a batch dimension first.
    #[arg(long, value_name = "N")]
    max_batch: Option<u32>,
    /// With --max-batch: how long a request may wait for others
    /// (e.g. 500us, 2ms).
    #[arg(long, value_parser = parse_duration, requires = "max_batch", default_value = "500us")]
    batch_delay: f64,
    /// With --max-batch: batch sizes that run at once when reached
    /// (e.g. 8,16).
    #[arg(
        long,
        value_delimiter = ',',
        requires = "max_batch",
        value_name = "N,N"
    )]
    preferred_batch: Vec<u32>,
    /// The engine replicas run it on: tract (built in), ort (ONNX Runtime,
    /// from the onnxruntime Python package or ORT_DYLIB_PATH), or auto
    /// (both timed at load, the faster kept; tract where ONNX Runtime is
    /// missing) [default: tract at push, unchanged at deploy].
    #[arg(long, value_name = "tract|ort|auto")]
    engine: Option<shoal_core::Engine>,
}

impl ServingFlags {
    /// The batching the flags ask for, if any.
    fn batching(&self) -> Option<Batching> {
        self.max_batch.map(|max_batch| Batching {
            max_batch,
            delay_us: (self.batch_delay * 1e6).round() as u64,
            preferred: self.preferred_batch.clone(),
        })
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct PushArgs {
    /// Model name.
    name: String,
    /// The ONNX file.
    file: PathBuf,
    /// Version name [default: the next number].
    #[arg(long)]
    version: Option<String>,
    /// A label: k=v. Repeat for more.
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    /// An offline metric: k=v with a number. Repeat for more.
    #[arg(long = "metric", value_name = "K=V")]
    metrics: Vec<String>,
    /// The version this one derives from.
    #[arg(long)]
    lineage: Option<String>,
    /// Input shape the replicas should use: INPUT=D,D,… (-1 dynamic). Repeat for more.
    #[arg(long = "input-shape", value_name = "INPUT=DIMS")]
    input_shapes: Vec<String>,
    /// The largest request shape an input takes: INPUT=D,D,… (-1 for the
    /// default bound of 4096 on a dynamic dimension). Repeat for more.
    #[arg(long = "max-shape", value_name = "INPUT=DIMS")]
    max_shapes: Vec<String>,
    /// A stateful model's state: INPUT=OUTPUT, the input fed from that
    /// output of the previous step of a sequence (e.g. --state h=hn
    /// --state c=cn). Clients then send sequence_id/sequence_start/
    /// sequence_end and only the other inputs. Repeat for more.
    #[arg(long = "state", value_name = "INPUT=OUTPUT")]
    state: Vec<String>,
    #[command(flatten)]
    serving: ServingFlags,
    /// Check only that the file is an ONNX model, not that the engine
    /// can prepare and warm it up: for models meant for an engine the
    /// control plane does not have.
    #[arg(long)]
    skip_engine_check: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct DeployArgs {
    /// NAME:VERSION to deploy.
    target: ModelRef,
    /// Change how replicas serve the version first (batching, engine):
    /// replicas serving it load it again with the new options and swap it
    /// in without failing a request.
    #[command(flatten)]
    serving: ServingFlags,
    /// Turn the version's batching off first.
    #[arg(long, conflicts_with = "max_batch")]
    no_batching: bool,
    /// How to roll it out: rolling, canary, blue-green, shadow, ab or bandit.
    #[arg(long, default_value = "rolling")]
    strategy: String,
    /// Replicas moved at once [default: a quarter of the fleet].
    #[arg(long)]
    max_surge: Option<u32>,
    /// Rolling: hold while more than this many replicas are down [default: no limit].
    #[arg(long)]
    max_unavailable: Option<u32>,
    /// Serve the model only in these regions (comma-separated).
    #[arg(long, value_delimiter = ',')]
    regions: Option<Vec<String>>,
    /// Why, for the audit log.
    #[arg(long)]
    reason: Option<String>,
    /// Canary: traffic percentages of the steps, e.g. 1,10,50,100.
    #[arg(long, value_delimiter = ',')]
    steps: Option<Vec<u32>>,
    /// Canary: how long each step bakes before it is judged, e.g. 30s; or one
    /// time per step before 100% for a gradual schedule, e.g. 10m,30m,1h,1h.
    #[arg(long, value_parser = parse_duration, value_delimiter = ',')]
    bake: Option<Vec<f64>>,
    /// Canary: spread the steps evenly over this long, e.g. 4h (instead of --bake).
    #[arg(long, value_parser = parse_duration, conflicts_with = "bake")]
    over: Option<f64>,
    /// Canary: roll back when the canary's error rate exceeds this multiple of the baseline's.
    #[arg(long)]
    max_error_ratio: Option<f64>,
    /// Canary: roll back when the canary's p99 exceeds this multiple of the baseline's.
    #[arg(long)]
    max_p99_ratio: Option<f64>,
    /// Canary: roll back when the canary's mean reward (feedback) is significantly below this multiple of the baseline's, e.g. 0.95.
    #[arg(long)]
    min_reward_ratio: Option<f64>,
    /// Canary: requests the canary must serve in a step before it is judged.
    #[arg(long)]
    min_requests: Option<u64>,
    /// Canary: p99 increases below this never roll back (noise), e.g. 1ms.
    #[arg(long, value_parser = parse_duration)]
    min_p99_increase: Option<f64>,
    /// How long the replaced version stays loaded for an instant switch back, e.g. 5m.
    #[arg(long, value_parser = parse_duration)]
    keep_warm: Option<f64>,
    /// Shadow: percent of requests mirrored to the new version [default: 100].
    #[arg(long)]
    percent: Option<u32>,
    /// A/B and bandit: the other versions in the experiment, comma-separated [default: the one in production].
    #[arg(long, value_delimiter = ',')]
    against: Option<Vec<String>>,
    /// Bandit: the least traffic any version keeps, percent [default: 5].
    #[arg(long)]
    floor: Option<u32>,
}

/// Parses `30s`, `2m`, `1h` or plain seconds into seconds.
pub(crate) fn parse_duration(s: &str) -> Result<f64, String> {
    let (number, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 2m or 1h"))?;
    let scale = match unit {
        "us" => 0.000_001,
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use us, ms, s, m or h"
            ));
        }
    };
    Ok(n * scale)
}

#[derive(Debug, clap::Args)]
pub(crate) struct TrafficArgs {
    /// The model.
    name: String,
    /// Weights by version: V=W,V=W (e.g. 1=90,2=10).
    #[arg(long, value_delimiter = ',', required = true)]
    weights: Vec<String>,
    /// Mirror a share of requests to a version: VERSION@PERCENT (e.g. 2@20).
    #[arg(long)]
    shadow: Option<String>,
    /// Header whose value keeps a user on one version.
    #[arg(long)]
    split_header: Option<String>,
    /// Why, for the audit log.
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct RollbackArgs {
    /// The model.
    name: String,
    /// Why, for the audit log.
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum RolloutCommand {
    /// Where a model's rollout stands.
    Status {
        /// The model.
        name: String,
    },
    /// Finish a canary now, skipping its remaining steps.
    Promote {
        /// The model.
        name: String,
    },
    /// Stop a rollout; traffic returns to the version it was replacing.
    Abort {
        /// The model.
        name: String,
    },
}

pub(crate) fn client(global: &Global) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::control(
        &global.control_url(),
        global.client_token()?,
    ))
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    say!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn key_values(flags: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    flags
        .iter()
        .map(|f| {
            f.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--{what} {f:?}: expected K=V"))
        })
        .collect()
}

/// `INPUT=D,D,…` flags as the registry takes them; `what` names the flag.
pub(crate) fn shapes(
    flags: &[String],
    what: &str,
    minus_one: &str,
) -> anyhow::Result<BTreeMap<String, Vec<i64>>> {
    key_values(flags, what)?
        .into_iter()
        .map(|(k, v)| {
            v.split(',')
                .map(|d| d.trim().parse::<i64>())
                .collect::<Result<Vec<_>, _>>()
                .map(|dims| (k.clone(), dims))
                .with_context(|| format!("--{what} {k}={v}: expected D,D,… ({minus_one})"))
        })
        .collect()
}

async fn push(args: PushArgs, global: &Global) -> anyhow::Result<()> {
    let metadata = tokio::fs::metadata(&args.file)
        .await
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    if !metadata.is_file() {
        bail!("{} is not a file", args.file.display());
    }
    let size = metadata.len();
    let labels = key_values(&args.labels, "label")?;
    let metrics = key_values(&args.metrics, "metric")?
        .into_iter()
        .map(|(k, v)| {
            v.parse::<f64>()
                .map(|n| (k.clone(), n))
                .with_context(|| format!("--metric {k}={v}: the value must be a number"))
        })
        .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
    let input_shapes = shapes(&args.input_shapes, "input-shape", "-1 for dynamic")?;
    let max_shapes = shapes(&args.max_shapes, "max-shape", "-1 for the default bound")?;
    let state = key_values(&args.state, "state")?;

    let bar = if global.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(size)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let file = tokio::fs::File::open(&args.file).await?;
    let progress = bar.clone();
    // 1 MiB pieces.
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(move |chunk| {
        if let Ok(c) = &chunk {
            progress.inc(c.len() as u64);
        }
        chunk
    });
    let client = client(global)?;
    let uploaded = client.upload_artifact(size, stream).await?;
    bar.finish_and_clear();
    let record = client
        .create_version(
            &args.name,
            &NewVersion {
                sha256: uploaded.sha256.clone(),
                version: args.version,
                labels,
                metrics,
                lineage: args.lineage,
                input_shapes,
                max_shapes,
                state,
                batching: args.serving.batching(),
                engine: args.serving.engine.unwrap_or_default(),
                skip_engine_check: args.skip_engine_check,
            },
        )
        .await?;
    if global.json {
        return print_json(&record);
    }
    say!("pushed {}:{}", record.model, record.version);
    say!("  sha256  {}", record.sha256);
    if args.skip_engine_check {
        say!("  checked ONNX structure (engine check skipped)");
    } else {
        say!(
            "  checked ONNX structure, {} prepare and warm-up",
            record.engine
        );
    }
    say!(
        "  size    {} bytes in {} chunks ({} new, {} bytes stored)",
        uploaded.size,
        uploaded.chunks,
        uploaded.new_chunks,
        uploaded.stored_bytes
    );
    say!(
        "deploy it with: shoal deploy {}:{}",
        record.model,
        record.version
    );
    Ok(())
}

pub(crate) async fn model(command: ModelCommand, global: &Global) -> anyhow::Result<()> {
    match command {
        ModelCommand::Push(args) => push(*args, global).await,
        ModelCommand::List => {
            let models = client(global)?.list_models().await?;
            if global.json {
                return print_json(&models);
            }
            if models.is_empty() {
                say!("no models yet: push one with `shoal model push NAME FILE`");
                return Ok(());
            }
            let mut t = table(&[
                "model",
                "versions",
                "latest",
                "production",
                "last known good",
            ]);
            for m in models {
                t.add_row(vec![
                    m.name,
                    m.versions.to_string(),
                    m.latest.unwrap_or_default(),
                    m.production.unwrap_or_else(|| "-".into()),
                    m.last_known_good.unwrap_or_else(|| "-".into()),
                ]);
            }
            say!("{t}");
            Ok(())
        }
        ModelCommand::Show { model } => {
            let c = client(global)?;
            if let Some(version) = model.version {
                let v = c
                    .get_version(model.model.as_str(), version.as_str())
                    .await?;
                if global.json {
                    return print_json(&v);
                }
                let mut t = table(&["field", "value"]);
                t.add_row(vec!["model".to_owned(), v.model.clone()]);
                t.add_row(vec!["version".to_owned(), v.version.clone()]);
                t.add_row(vec!["status".to_owned(), v.status.as_str().to_owned()]);
                t.add_row(vec!["sha256".to_owned(), v.sha256.clone()]);
                t.add_row(vec!["size".to_owned(), format!("{} bytes", v.size)]);
                t.add_row(vec!["created".to_owned(), super::when(v.created_at)]);
                t.add_row(vec![
                    "lineage".to_owned(),
                    v.lineage.clone().unwrap_or_else(|| "-".into()),
                ]);
                t.add_row(vec!["labels".to_owned(), format!("{:?}", v.labels)]);
                t.add_row(vec!["metrics".to_owned(), format!("{:?}", v.metrics)]);
                t.add_row(vec![
                    "serving".to_owned(),
                    shoal_api::registry::VersionOptions::of(&v).to_string(),
                ]);
                t.add_row(vec!["rolled back".to_owned(), v.rolled_back.to_string()]);
                say!("{t}");
                return Ok(());
            }
            let detail = c.get_model(model.model.as_str()).await?;
            if global.json {
                return print_json(&detail);
            }
            say!(
                "{}: production {}, last known good {}",
                detail.model.name,
                detail.model.production.as_deref().unwrap_or("-"),
                detail.model.last_known_good.as_deref().unwrap_or("-")
            );
            let mut t = table(&["version", "status", "sha256", "size", "created", "metrics"]);
            for v in detail.versions {
                let status = if v.rolled_back {
                    format!("{} (rolled back)", v.status.as_str())
                } else {
                    v.status.as_str().to_owned()
                };
                t.add_row(vec![
                    v.version,
                    status,
                    v.sha256[..12].to_owned(),
                    v.size.to_string(),
                    super::when(v.created_at),
                    v.metrics
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                ]);
            }
            say!("{t}");
            Ok(())
        }
    }
}

fn print_deployment(d: &Deployment, global: &Global) -> anyhow::Result<()> {
    if global.json {
        return print_json(d);
    }
    let targets: Vec<String> = d
        .targets
        .iter()
        .map(|t| format!("{}@{}%", t.version, t.weight))
        .collect();
    say!(
        "{}: {} (revision {})",
        d.model,
        targets.join(", "),
        d.revision
    );
    if let Some(r) = &d.rollout {
        print_rollout_line(r);
    }
    Ok(())
}

fn print_rollout_line(r: &RolloutView) {
    say!(
        "  rollout {} {} → {}: {}, step {}, {}/{} replicas — {}",
        r.strategy.as_str(),
        r.from.as_deref().unwrap_or("-"),
        r.to,
        r.state.as_str(),
        r.step,
        r.replicas_done,
        r.replicas_total,
        r.reason
    );
    if !r.state.is_terminal() {
        let now: Vec<String> = r.weights.iter().map(|(v, w)| format!("{v}@{w}%")).collect();
        say!("  traffic now: {}", now.join(", "));
    }
    if let Some(s) = &r.shadow {
        let agreement = s
            .agreement
            .map_or("-".to_owned(), |a| format!("{:.2}%", a * 100.0));
        let latency = s
            .latency_diff_ms
            .map_or("-".to_owned(), |l| format!("{l:+.2} ms"));
        say!(
            "  shadow: {} mirrored, {} compared, agreement {agreement} over {} rows, max |diff| {:.3e}, latency {latency}, {} candidate errors",
            s.mirrored,
            s.compared,
            s.rows,
            s.max_abs_diff,
            s.candidate_errors
        );
    }
    if !r.arms.is_empty() {
        let mut t = table(&["version", "weight", "rewards", "mean", "95% interval"]);
        for a in &r.arms {
            t.add_row(vec![
                a.version.clone(),
                format!("{}%", a.weight),
                a.count.to_string(),
                format!("{:.4}", a.mean),
                format!("{:.4} – {:.4}", a.ci95.0, a.ci95.1),
            ]);
        }
        say!("{t}");
        match r.significant {
            Some(true) => say!("  the difference is significant (95%)"),
            Some(false) => say!("  no significant difference yet"),
            None => {}
        }
    }
}

/// `--bake` and `--over` as the API takes them: one bake time for every
/// step, or one per step before 100 %.
fn bake_schedule(
    bake: Option<&[f64]>,
    over: Option<f64>,
    steps: Option<&[u32]>,
) -> (Option<f64>, Option<Vec<f64>>) {
    match (bake, over) {
        (Some([one]), _) => (Some(*one), None),
        (Some(each), _) => (None, Some(each.to_vec())),
        (None, Some(over)) => {
            // The default steps are 1, 10, 50, 100: three are judged.
            let judged = steps.map_or(3, |s| s.iter().filter(|&&p| p < 100).count());
            (Some(over / judged.max(1) as f64), None)
        }
        (None, None) => (None, None),
    }
}

pub(crate) async fn deploy(args: DeployArgs, global: &Global) -> anyhow::Result<()> {
    let Some(version) = args.target.version.clone() else {
        bail!(
            "name the version to deploy: shoal deploy {}:VERSION",
            args.target.model
        );
    };
    let strategy = match args.strategy.as_str() {
        "rolling" => shoal_api::deploy::Strategy::Rolling,
        "canary" => shoal_api::deploy::Strategy::Canary,
        "blue-green" => shoal_api::deploy::Strategy::BlueGreen,
        "shadow" => shoal_api::deploy::Strategy::Shadow,
        "ab" => shoal_api::deploy::Strategy::Ab,
        "bandit" => shoal_api::deploy::Strategy::Bandit,
        other => {
            bail!(
                "unknown strategy {other:?}; use rolling, canary, blue-green, shadow, ab or bandit"
            )
        }
    };
    let client = client(global)?;
    if args.serving.max_batch.is_some() || args.serving.engine.is_some() || args.no_batching {
        set_serving_options(&client, &args, version.as_str(), global).await?;
        // Already the deployed version: its replicas load it again with
        // the new options; there is nothing to roll out.
        let model = args.target.model.as_str();
        if let Some(d) = client
            .list_deployments()
            .await?
            .into_iter()
            .find(|d| d.model == model && d.primary() == Some(version.as_str()))
        {
            print_deployment(&d, global)?;
            if !global.json {
                say!(
                    "replicas serving {model}:{version} load it again with these options and swap it in"
                );
            }
            return Ok(());
        }
    }
    let (bake_secs, bakes_secs) =
        bake_schedule(args.bake.as_deref(), args.over, args.steps.as_deref());
    let request = DeployRequest {
        version: version.to_string(),
        strategy,
        max_surge: args.max_surge,
        max_unavailable: args.max_unavailable,
        regions: args.regions,
        reason: args.reason,
        steps: args.steps,
        bake_secs,
        bakes_secs,
        min_reward_ratio: args.min_reward_ratio,
        max_error_ratio: args.max_error_ratio,
        max_p99_ratio: args.max_p99_ratio,
        min_requests: args.min_requests,
        min_p99_increase_ms: args.min_p99_increase.map(|s| s * 1000.0),
        keep_warm_secs: args.keep_warm,
        percent: args.percent,
        against: args.against,
        floor: args.floor,
    };
    let d = client.deploy(args.target.model.as_str(), &request).await?;
    print_deployment(&d, global)?;
    if !global.json {
        say!("follow it with: shoal rollout status {}", d.model);
    }
    Ok(())
}

/// `shoal deploy --max-batch/--no-batching/--engine`: the version's
/// serving options with what the flags change, stored before the deploy.
async fn set_serving_options(
    client: &ApiClient,
    args: &DeployArgs,
    version: &str,
    global: &Global,
) -> anyhow::Result<()> {
    let model = args.target.model.as_str();
    let record = client.get_version(model, version).await?;
    let mut options = shoal_api::registry::VersionOptions::of(&record);
    if let Some(batching) = args.serving.batching() {
        options.batching = Some(batching);
    }
    if args.no_batching {
        options.batching = None;
    }
    if let Some(engine) = args.serving.engine {
        options.engine = engine;
    }
    let record = client.set_version_options(model, version, &options).await?;
    if !global.json {
        say!(
            "{model}:{version} serves with {}",
            shoal_api::registry::VersionOptions::of(&record)
        );
    }
    Ok(())
}

pub(crate) async fn traffic(args: TrafficArgs, global: &Global) -> anyhow::Result<()> {
    let targets = args
        .weights
        .iter()
        .map(|w| {
            let (v, weight) = w
                .split_once('=')
                .with_context(|| format!("--weights {w:?}: expected VERSION=WEIGHT"))?;
            let weight = weight
                .parse::<u32>()
                .with_context(|| format!("--weights {w:?}: the weight must be a whole number"))?;
            Ok(shoal_api::deploy::TrafficTarget {
                version: v.to_owned(),
                weight,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shadow =
        args.shadow
            .as_deref()
            .map(|s| {
                let (v, p) = s
                    .split_once('@')
                    .with_context(|| format!("--shadow {s:?}: expected VERSION@PERCENT"))?;
                let percent = p.trim_end_matches('%').parse::<u32>().with_context(|| {
                    format!("--shadow {s:?}: the percent must be a whole number")
                })?;
                Ok::<_, anyhow::Error>(shoal_api::deploy::Shadow {
                    version: v.to_owned(),
                    percent,
                })
            })
            .transpose()?;
    let request = shoal_api::deploy::TrafficRequest {
        targets,
        shadow,
        split_header: args.split_header.map(|h| h.to_ascii_lowercase()),
        reason: args.reason,
    };
    let d = client(global)?.set_traffic(&args.name, &request).await?;
    print_deployment(&d, global)
}

pub(crate) async fn rollback(args: RollbackArgs, global: &Global) -> anyhow::Result<()> {
    let d = client(global)?
        .rollback(&args.name, args.reason.as_deref())
        .await?;
    print_deployment(&d, global)
}

pub(crate) async fn rollout(command: RolloutCommand, global: &Global) -> anyhow::Result<()> {
    match command {
        RolloutCommand::Status { name } => {
            let r = client(global)?.rollout(&name).await?;
            if global.json {
                return print_json(&r);
            }
            print_rollout_line(&r);
            Ok(())
        }
        RolloutCommand::Promote { name } => {
            let d = client(global)?.promote(&name).await?;
            print_deployment(&d, global)
        }
        RolloutCommand::Abort { name } => {
            let d = client(global)?.abort(&name).await?;
            print_deployment(&d, global)
        }
    }
}

pub(crate) async fn token(command: TokenCommand, global: &Global) -> anyhow::Result<()> {
    let client = client(global)?;
    match command {
        TokenCommand::Create { name, role } => {
            let created = client
                .create_token(&shoal_api::auth::NewToken { name, role })
                .await?;
            if global.json {
                return print_json(&created);
            }
            say!(
                "created token {:?} with role {}:",
                created.name,
                created.role
            );
            say!("{}", created.token);
            say!(
                "It is shown only now; keep it secret. Use it with --token, SHOAL_TOKEN or --token-file."
            );
            Ok(())
        }
        TokenCommand::List => {
            let tokens = client.list_tokens().await?;
            if global.json {
                return print_json(&tokens);
            }
            let mut t = table(&["name", "role", "created", "by"]);
            for token in &tokens {
                t.add_row(vec![
                    token.name.clone(),
                    token.role.to_string(),
                    super::when(token.created_at),
                    token.created_by.clone(),
                ]);
            }
            say!("{t}");
            Ok(())
        }
        TokenCommand::Revoke { name } => {
            client.revoke_token(&name).await?;
            if global.json {
                return print_json(&serde_json::json!({"revoked": name}));
            }
            say!("revoked token {name:?}");
            Ok(())
        }
    }
}

pub(crate) async fn status(global: &Global) -> anyhow::Result<()> {
    let status = client(global)?.status().await?;
    if global.json {
        return print_json(&status);
    }
    if let Some(control) = &status.control {
        print_members(control);
    }
    if status.replicas.is_empty() {
        say!("no replicas registered (revision {})", status.revision);
        return Ok(());
    }
    let mut t = table(&[
        "replica",
        "address",
        "region",
        "role",
        "tier",
        "health",
        "serving",
        "desired",
        "skew",
        "in flight",
    ]);
    for r in &status.replicas {
        let skew = match (r.skew, r.behind) {
            (_, true) => "BEHIND".to_owned(),
            (true, false) => "converging".to_owned(),
            (false, false) => "-".to_owned(),
        };
        t.add_row(vec![
            r.id.clone(),
            r.address.clone(),
            r.region.clone(),
            if r.standby { "standby" } else { "active" }.to_owned(),
            r.tier.to_string(),
            if r.healthy {
                "healthy".into()
            } else {
                "DOWN".into()
            },
            spaced(&r.serving),
            spaced(&r.desired),
            skew,
            r.in_flight.to_string(),
        ]);
    }
    say!("{t}");
    let behind = status.replicas.iter().filter(|r| r.behind).count();
    say!(
        "{} replicas, {} healthy, {} behind (revision {})",
        status.replicas.len(),
        status.replicas.iter().filter(|r| r.healthy).count(),
        behind,
        status.revision
    );
    for r in status.replicas.iter().filter(|r| !r.failures.is_empty()) {
        for (k, f) in &r.failures {
            let retry = if f.gave_up() {
                "not retried".to_owned()
            } else {
                format!("attempt {}, retrying", f.attempts)
            };
            say!("  {}: cannot load {k} ({retry}): {}", r.id, f.reason);
        }
    }
    for (model, ids) in &status.placements {
        say!(
            "  {model} placed on {}",
            if ids.is_empty() {
                "no replica".to_owned()
            } else {
                ids.join(", ")
            }
        );
    }
    for (model, r) in &status.rollouts {
        say!(
            "  rollout of {model} ({} {} → {}): {} — {}",
            r.strategy.as_str(),
            r.from.as_deref().unwrap_or("nothing"),
            r.to,
            r.state.as_str(),
            r.reason
        );
    }
    for r in status.replicas.iter().filter(|r| !r.faults.is_empty()) {
        for (k, f) in &r.faults {
            say!(
                "  {}: FAULT INJECTED on {k}: latency {}ms, error rate {}, hang {}",
                r.id,
                f.latency_ms,
                f.error_rate,
                f.hang
            );
        }
    }
    Ok(())
}

/// The control plane's members, the leader first marked, as a table.
fn print_members(control: &shoal_api::fleet::Leadership) {
    let now = shoal_api::now_millis();
    let mut t = table(&["control plane", "address", "role", "last seen"]);
    for m in &control.members {
        let leads = control.leader.as_deref() == Some(m.id.as_str());
        t.add_row(vec![
            m.id.clone(),
            m.address.clone(),
            if leads {
                format!("LEADER (term {})", control.term)
            } else {
                "member".into()
            },
            format!("{:.1}s ago", (now - m.last_seen).max(0) as f64 / 1000.0),
        ]);
    }
    say!("{t}");
    if control.leader.is_none() {
        say!(
            "no leader: rollouts wait until a member takes the lease (term {})",
            control.term
        );
    }
}

/// Versions as the status table shows them: `digits:1 digits:2`.
fn spaced(keys: &[shoal_api::VersionKey]) -> String {
    let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
    keys.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bake_schedules() {
        assert_eq!(bake_schedule(None, None, None), (None, None));
        assert_eq!(bake_schedule(Some(&[30.0]), None, None), (Some(30.0), None));
        assert_eq!(
            bake_schedule(Some(&[600.0, 1800.0]), None, Some(&[5, 10, 100])),
            (None, Some(vec![600.0, 1800.0]))
        );
        // 4 hours over 5, 10, 25, 50 % (then 100 %): an hour each.
        assert_eq!(
            bake_schedule(None, Some(14_400.0), Some(&[5, 10, 25, 50, 100])),
            (Some(3600.0), None)
        );
        assert_eq!(bake_schedule(None, Some(90.0), None), (Some(30.0), None));
        assert_eq!(parse_duration("1h"), Ok(3600.0));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
