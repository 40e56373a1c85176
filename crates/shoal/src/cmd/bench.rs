//! `shoal bench`: benchmarks side by side with reference systems.

use shoal_telemetry::say;
use std::path::PathBuf;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Open-loop load against one URL (latency from intended send time).
    Load {
        /// URL to POST to; repeat to spread requests over several in turn.
        #[arg(long = "url", required = true)]
        urls: Vec<String>,
        /// Requests per second.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Concurrent connections.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Per-request timeout in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Body file [default: one digits sample].
        #[arg(long)]
        body: Option<PathBuf>,
        /// Response header naming the upstream(s) of each answer.
        #[arg(long)]
        upstream_header: Option<String>,
        /// SIGKILL this pid partway through.
        #[arg(long)]
        kill_pid: Option<i32>,
        /// When to kill, in seconds from the start.
        #[arg(long, default_value_t = 3.0)]
        kill_at: f64,
        /// Substring of the upstream header naming the killed upstream.
        #[arg(long)]
        dead_upstream: Option<String>,
    },
    /// N replicas converging on a new version against one replica doing the same.
    Converge {
        /// Replicas in the fleet.
        #[arg(long, default_value_t = 8)]
        replicas: usize,
        /// Artifact size in MiB (layers of 512x512 floats).
        #[arg(long, default_value_t = 20)]
        size_mb: usize,
        /// Alternating rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Run every member as a process on its own emulated host (network
        /// namespace, rate-limited link, CPU quota), as if on separate
        /// machines. Needs root and iproute2.
        #[arg(long)]
        isolate: bool,
        /// With --isolate: each host's link, Mbit/s each way.
        #[arg(long, default_value_t = 100, requires = "isolate")]
        link_mbit: u32,
        /// With --isolate: each host's CPU quota, in cores.
        #[arg(long, default_value_t = 0.2, requires = "isolate")]
        cpu: f64,
    },
    /// Wire bytes for a new version that changes one tensor, against rsync.
    Delta {
        /// Model size in MiB.
        #[arg(long, default_value_t = 100)]
        size_mb: usize,
    },
    /// The DR study's topologies (single, active-standby, active-active) on emulated hosts,
    /// ramped to failure with and without a replica killed (needs root).
    Topology {
        /// Each host's CPU quota, in cores.
        #[arg(long, default_value_t = 0.25)]
        cpu: f64,
        /// Seconds per ramp step.
        #[arg(long, default_value_t = 5.0)]
        step_seconds: f64,
        /// A step fails above this p95, in milliseconds.
        #[arg(long, default_value_t = 500.0)]
        max_p95_ms: f64,
        /// A step fails above this share of failed requests, in percent.
        #[arg(long, default_value_t = 1.0)]
        max_error_percent: f64,
    },
    /// A control plane keeping many simulated replicas up to date: watch
    /// streams against NATS JetStream (starts its own nats-server).
    Watchers {
        /// Simulated replicas following their desired state.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=20_000))]
        replicas: u64,
        /// Fleet changes per round, each reaching every replica.
        #[arg(long, default_value_t = 10)]
        changes: usize,
        /// Alternating rounds.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// A stateful model's sequence steps with the state in a replica's
    /// memory against Redis (starts its own redis-server): latency,
    /// throughput, Redis traffic per step, takeovers, memory per sequence.
    Sequences {
        /// Steps per round per store.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        steps: u64,
        /// Alternating rounds.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// Steps each taken over by the replica that did not take the last.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        takeovers: u64,
        /// Sequences started on one replica to measure memory per sequence.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        held: u64,
    },
    /// Dynamic batching against each request alone: two replicas serving
    /// one bundled model, closed-loop clients at each concurrency,
    /// alternating rounds.
    Batching {
        /// Bundled model: digits (the MLP) or cls (the text-orientation convnet).
        #[arg(long, default_value = "digits")]
        model: String,
        /// Concurrent clients, one figure each.
        #[arg(long, value_delimiter = ',', default_value = "1,32,64")]
        clients: Vec<usize>,
        /// Rows per request.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
        rows: u64,
        /// Seconds per replica per round.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Alternating rounds.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// The batched replica's largest batch, in rows.
        #[arg(long, default_value_t = 64)]
        max_batch: usize,
        /// How long its requests may wait for others.
        #[arg(long, value_parser = super::client::parse_duration, default_value = "1ms")]
        batch_delay: f64,
        /// The engine both replicas run the model on.
        #[arg(long, default_value = "tract", value_name = "tract|ort|auto")]
        engine: shoal_core::Engine,
        /// Send tensors as binary data (as tritonclient does by default)
        /// instead of JSON numbers.
        #[arg(long)]
        binary: bool,
        /// Both replicas run an inference costing up to this many µs on
        /// the request's task (`shoal replica --inline-max-us`; 0: every
        /// request handed to an inference thread).
        #[arg(long, default_value_t = 25)]
        inline_max_us: u64,
    },
    /// REST with JSON numbers, REST with binary tensor data and gRPC
    /// against one replica serving digits, at each request size; closed
    /// loop, rounds rotating the order.
    Protocols {
        /// Rows per request, one figure each.
        #[arg(long, value_delimiter = ',', default_value = "1,256")]
        rows: Vec<usize>,
        /// Concurrent clients.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
        clients: u64,
        /// Seconds per protocol per round.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Rounds.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
    },
    /// Autoscaling over a compressed day (night, a sharp morning ramp, a
    /// plateau, an evening, one unannounced spike) through `shoal up`:
    /// fixed at the peak, reactive only, reactive + predictive; reports
    /// SLO-violation seconds and replica-seconds of the measured day.
    Autoscale {
        /// One compressed day.
        #[arg(long, value_parser = super::client::parse_duration, default_value = "120s")]
        day: f64,
        /// Days replayed (without the spike) before the measured one, for
        /// the predictor to learn.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=20))]
        learn: u32,
        /// The daily peak, requests per second.
        #[arg(long, default_value_t = 200.0)]
        peak_rps: f64,
        /// Requests per second a replica should carry (the target).
        #[arg(long, default_value_t = 20.0)]
        per_replica_rps: f64,
        /// Emulated service time per request.
        #[arg(long, default_value_t = 200)]
        latency_ms: u64,
        /// Requests a replica holds at once (capacity = slots ÷ service time).
        #[arg(long, default_value_t = 8)]
        slots: usize,
        /// The p99 to stay under, ms.
        #[arg(long, default_value_t = 500.0)]
        slo_ms: f64,
        /// The most replicas the autoscaler may run.
        #[arg(long, default_value_t = 16)]
        max_replicas: usize,
        /// Modes: fixed, reactive, predictive.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "fixed,reactive,predictive"
        )]
        modes: Vec<String>,
    },
    /// Leader failover of a `shoal up --control-planes N` fleet: SIGKILL of
    /// the leader to another member's first act as leader, trial after trial.
    Failover {
        /// The data directory of the running fleet.
        #[arg(long, default_value = ".shoal")]
        data_dir: PathBuf,
        /// Leaders to kill, one after another.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
        trials: u64,
    },
    /// Registry writes (deployments: revision, audit, one durable
    /// transaction each), SQLite against PostgreSQL, alternating rounds.
    Registry {
        /// The PostgreSQL registry to write to (a scratch database: the
        /// benchmark leaves its deployments there).
        #[arg(long, env = "SHOAL_REGISTRY")]
        registry: String,
        /// Concurrent writers.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// Writes per writer per round.
        #[arg(long, default_value_t = 200)]
        writes: usize,
        /// Alternating rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Backup and restore of many versions against tar + zstd of the same data directory.
    Backup {
        /// Versions in the registry (each trained anew: no shared chunks).
        #[arg(long, default_value_t = 50)]
        versions: usize,
        /// Model size in MiB.
        #[arg(long, default_value_t = 20)]
        size_mb: usize,
        /// Alternating rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Simulated control-plane request rate under many polling replicas.
    Herd {
        /// Polling replicas.
        #[arg(long, default_value_t = 1000)]
        replicas: usize,
        /// Poll interval in seconds.
        #[arg(long, default_value_t = 10.0)]
        interval: f64,
        /// Simulated seconds.
        #[arg(long, default_value_t = 600.0)]
        duration: f64,
    },
    /// tract against ONNX Runtime on the bundled models.
    Runtime {
        /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, else the
        /// onnxruntime Python package).
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        /// Alternating rounds per model.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
    },
    /// Reading a JSON inference request, in process: the gateway's precheck
    /// against a serde walk of the same body, the replica's decode against
    /// the same decode by serde alone.
    Codec {
        /// Digits rows per request, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,32,256")]
        rows: Vec<usize>,
        /// Alternating rounds.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
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
    },
}

pub(crate) async fn run(command: BenchCommand, json: bool) -> anyhow::Result<()> {
    let scratch = || std::env::temp_dir().join(format!("shoal-bench-{}", std::process::id()));
    match command {
        BenchCommand::Load {
            urls,
            rate,
            duration,
            connections,
            timeout_ms,
            body,
            upstream_header,
            kill_pid,
            kill_at,
            dead_upstream,
        } => {
            let body = match body {
                Some(p) => bytes::Bytes::from(std::fs::read(&p)?),
                None => shoal_bench::digits_request()?,
            };
            let r = shoal_bench::load::run(shoal_bench::load::LoadSpec {
                schedule: Vec::new(),
                urls,
                body,
                rate,
                duration: std::time::Duration::from_secs_f64(duration),
                connections,
                timeout: std::time::Duration::from_millis(timeout_ms),
                upstream_header,
                kill: kill_pid.map(|p| (p, std::time::Duration::from_secs_f64(kill_at))),
                dead_upstream,
                failover: false,
            })
            .await?;
            if json {
                say!("{}", serde_json::to_string(&r)?);
            } else {
                say!(
                    "sent {} ok {} failed {} | p50 {:.0}µs p99 {:.0}µs p99.9 {:.0}µs | {:.0} ok/s",
                    r.sent,
                    r.ok,
                    r.failed,
                    r.latency.p50_us,
                    r.latency.p99_us,
                    r.latency.p999_us,
                    r.ok_per_sec
                );
                if !r.errors.is_empty() {
                    say!("errors: {:?}", r.errors);
                }
            }
        }
        BenchCommand::Converge {
            replicas,
            size_mb,
            rounds,
            isolate,
            link_mbit,
            cpu,
        } => {
            let isolation = if isolate {
                Some(shoal_bench::fleet::Isolation {
                    host: shoal_bench::lab::HostSpec { link_mbit, cpu },
                    exe: std::env::current_exe()?,
                })
            } else {
                None
            };
            let r = shoal_bench::fleet::convergence(
                replicas,
                size_mb,
                rounds,
                &scratch(),
                isolation.as_ref(),
            )
            .await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                say!(
                    "artifact {} bytes; {} rounds, alternating 1 replica / {} replicas",
                    r.artifact_bytes,
                    rounds,
                    r.replicas
                );
                if let Some(host) = r.isolation {
                    say!(
                        "every member on its own emulated host: {} Mbit/s link, {} cores",
                        host.link_mbit,
                        host.cpu
                    );
                }
                for (i, (a, b)) in r.single_s.iter().zip(&r.fleet_s).enumerate() {
                    let machine = r.fleet_load[i].map_or(String::new(), |l| {
                        format!(
                            "   machine {:.0} % busy{}",
                            l.busy_pct,
                            if l.saturated() {
                                " (saturated: left out)"
                            } else {
                                ""
                            }
                        )
                    });
                    say!(
                        "  round {}: 1 replica {:.3}s   {} replicas {:.3}s   ratio {:.2}   goal ≤ {:.3}s {}   origin egress {:.2}x artifact{machine}",
                        i + 1,
                        a,
                        r.replicas,
                        b,
                        b / a,
                        r.goal_s[i],
                        if *b <= r.goal_s[i] { "met" } else { "missed" },
                        r.egress_ratio[i]
                    );
                }
                let judged: Vec<usize> = (0..r.fleet_s.len())
                    .filter(|i| !r.verdict || !r.saturated_rounds.contains(i))
                    .collect();
                let met = judged
                    .iter()
                    .filter(|&&i| r.fleet_s[i] <= r.goal_s[i])
                    .count();
                say!(
                    "median ratio {:.2}; goal (1.2 × one replica + 100 ms, PERF.md) met in {met} of {} rounds, median {:+.3}s against it",
                    r.ratio,
                    judged.len(),
                    r.median_over_goal_s
                );
                if !r.verdict {
                    say!(
                        "no verdict: the machine was at least {:.0} % busy in {} of {} rounds, so the emulated hosts \
                         did not all get their quotas; close other work or give each host less (--cpu, with --link-mbit scaled to match)",
                        shoal_bench::lab::SATURATED_BUSY_PCT,
                        r.saturated_rounds.len(),
                        r.fleet_s.len()
                    );
                }
            }
        }
        BenchCommand::Delta { size_mb } => {
            let r = shoal_bench::fleet::delta(size_mb, &scratch()).await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                say!(
                    "artifact {} bytes, changed tensor {} bytes",
                    r.artifact_bytes,
                    r.changed_bytes
                );
                say!("  shoal: {} bytes from the origin", r.shoal_wire_bytes);
                say!("  rsync: {} bytes sent + received", r.rsync_wire_bytes);
                say!("  shoal ÷ rsync = {:.3} (goal ≤ 1.1)", r.ratio);
            }
        }
        BenchCommand::Topology {
            cpu,
            step_seconds,
            max_p95_ms,
            max_error_percent,
        } => {
            let results = shoal_bench::topology::run(
                &std::env::current_exe()?,
                &scratch(),
                shoal_bench::lab::HostSpec {
                    link_mbit: 1000,
                    cpu,
                },
                shoal_bench::topology::Bounds {
                    max_error_ratio: max_error_percent / 100.0,
                    max_p95_ms,
                },
                step_seconds,
            )
            .await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                say!(
                    "every member on its own host with {cpu} cores; a step fails above {max_error_percent} % errors or p95 {max_p95_ms} ms"
                );
                for r in &results {
                    say!(
                        "  {:<15} max {:>6.0} rps, p95 at half {:>5.1} ms | kill at {:>5.0} rps: {} failed, then max {:>6.0} rps",
                        r.topology.name(),
                        r.max_rate,
                        r.p95_at_half_ms,
                        r.kill_rate,
                        r.failed_at_kill,
                        r.max_rate_after_kill
                    );
                }
            }
        }
        BenchCommand::Registry {
            registry,
            writers,
            writes,
            rounds,
        } => {
            anyhow::ensure!(
                registry.starts_with("postgres://") || registry.starts_with("postgresql://"),
                "--registry must be a postgres:// URL (SQLite is measured beside it in a scratch directory)"
            );
            anyhow::ensure!(
                (1..=256).contains(&writers) && writes >= 1 && rounds >= 1,
                "--writers must be 1 to 256, --writes and --rounds at least 1"
            );
            let r = shoal_bench::registry::run(
                &scratch().join("registry"),
                &registry,
                writers,
                writes,
                rounds,
            )
            .await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                say!(
                    "{} writers × {} deployment writes per round, {} rounds",
                    r.writers,
                    r.writes,
                    r.stores[0].writes_per_s.len()
                );
                for s in &r.stores {
                    say!(
                        "  {:<9} {:>7.0} writes/s (median of rounds)   p50 {:>6.2} ms   p99 {:>6.2} ms",
                        s.store,
                        shoal_bench::stats::median(&s.writes_per_s),
                        s.latency.p50_us / 1000.0,
                        s.latency.p99_us / 1000.0
                    );
                }
            }
        }
        BenchCommand::Watchers {
            replicas,
            changes,
            rounds,
        } => {
            anyhow::ensure!(
                changes >= 1 && rounds >= 1,
                "--changes and --rounds must be at least 1"
            );
            let r = shoal_bench::watchers::run(
                &std::env::current_exe()?,
                &scratch().join("watchers"),
                usize::try_from(replicas).unwrap_or(1000),
                changes,
                rounds,
            )
            .await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let med = shoal_bench::stats::median;
                say!(
                    "{} simulated replicas, {} changes per round, each reaching every replica",
                    r.replicas,
                    r.changes
                );
                for m in &r.modes {
                    let max = m.fanout_ms.iter().copied().fold(0.0, f64::max);
                    say!(
                        "  {:<6} control plane {:>6.2} CPU s per round (median), {:>5} sockets; NATS {:>6.2} CPU s; change reaches all in {:>6.0} ms median, {:>6.0} ms max",
                        format!("{:?}", m.mode).to_lowercase(),
                        med(&m.control_cpu_s),
                        m.control_sockets,
                        med(&m.nats_cpu_s),
                        med(&m.fanout_ms),
                        max
                    );
                }
            }
        }
        BenchCommand::Sequences {
            steps,
            rounds,
            takeovers,
            held,
        } => {
            let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
            let r = shoal_bench::sequences::run(n(steps), n(rounds), n(takeovers), n(held)).await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let ms = |us: f64| us / 1000.0;
                say!(
                    "Silero VAD sequence steps, {} per round × {} rounds per store",
                    r.steps,
                    r.rounds
                );
                say!(
                    "  memory  p50 {:.2} ms  p99 {:.2} ms  {:.0} steps/s",
                    ms(r.memory.p50_us),
                    ms(r.memory.p99_us),
                    r.steps_per_s.0
                );
                say!(
                    "  redis   p50 {:.2} ms  p99 {:.2} ms  {:.0} steps/s  ({:.1} commands, {:.0} bytes per step)",
                    ms(r.redis.p50_us),
                    ms(r.redis.p99_us),
                    r.steps_per_s.1,
                    r.redis_commands_per_step,
                    r.redis_bytes_per_step
                );
                say!(
                    "  takeover (a replica resumes a sequence it does not hold) p50 {:.2} ms  p99 {:.2} ms",
                    ms(r.takeover.p50_us),
                    ms(r.takeover.p99_us)
                );
                say!(
                    "  memory per live sequence {:.0} bytes: {:.0} sequences per GiB",
                    r.bytes_per_sequence,
                    r.sequences_per_gib
                );
            }
        }
        BenchCommand::Protocols {
            rows,
            clients,
            seconds,
            rounds,
        } => {
            anyhow::ensure!(
                seconds > 0.0 && seconds <= 600.0,
                "--seconds {seconds}: between 0 and 600"
            );
            anyhow::ensure!(
                !rows.is_empty() && rows.iter().all(|r| (1..=4096).contains(r)),
                "--rows: each between 1 and 4096"
            );
            let r = shoal_bench::protocols::run(
                &rows,
                usize::try_from(clients).unwrap_or(1),
                seconds,
                usize::try_from(rounds).unwrap_or(1),
            )
            .await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                say!(
                    "{:<12} {:>5} {:>10} {:>20} {:>10} {:>10} {:>7}",
                    "protocol",
                    "rows",
                    "req/s",
                    "vs JSON",
                    "p50",
                    "p99",
                    "failed"
                );
                for row in r {
                    say!(
                        "{:<12} {:>5} {:>10.0} {:>20} {:>8.0}µs {:>8.0}µs {:>7}",
                        row.protocol,
                        row.rows,
                        row.rps,
                        row.over_json.show(2, "×"),
                        row.latency.p50_us,
                        row.latency.p99_us,
                        row.failed
                    );
                }
            }
        }
        BenchCommand::Batching {
            model,
            clients,
            rows,
            seconds,
            rounds,
            max_batch,
            batch_delay,
            engine,
            binary,
            inline_max_us,
        } => {
            let (file, input, options) = match model.as_str() {
                "digits" => (
                    "digits-v2.onnx",
                    ("input".to_owned(), vec![64]),
                    shoal_runtime::LoadOptions::default(),
                ),
                "cls" => (
                    "ch_ppocr_mobile_v2.0_cls_infer.onnx",
                    ("x".to_owned(), vec![3, 48, 192]),
                    shoal_runtime::LoadOptions::from_dims(
                        &[("x".to_owned(), vec![-1, 3, 48, 192])].into(),
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                ),
                other => anyhow::bail!("--model {other:?}: use digits or cls"),
            };
            let options = options.with_engine(engine);
            anyhow::ensure!(
                seconds > 0.0 && seconds <= 600.0,
                "--seconds {seconds}: between 0 and 600"
            );
            anyhow::ensure!(
                !clients.is_empty() && clients.iter().all(|c| (1..=1024).contains(c)),
                "--clients: each between 1 and 1024"
            );
            let policy = shoal_core::batch::BatchPolicy::new(
                max_batch,
                std::time::Duration::from_secs_f64(batch_delay),
                Vec::new(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let spec = shoal_bench::batching::BatchingSpec {
                model: file.to_owned(),
                input,
                options,
                rows: usize::try_from(rows).unwrap_or(1),
                clients,
                seconds,
                rounds: usize::try_from(rounds).unwrap_or(1),
                policy,
                binary,
                inline_max: std::time::Duration::from_micros(inline_max_us),
            };
            let r = shoal_bench::batching::run(&spec).await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let ms = |us: f64| us / 1000.0;
                say!(
                    "{model}, {rows} row(s) a request, batches of up to {max_batch} rows within {:.2} ms; {} rounds of {seconds} s",
                    batch_delay * 1000.0,
                    spec.rounds
                );
                say!(
                    "  {:>7}  {:>10} {:>8} {:>8}   {:>10} {:>8} {:>8} {:>6}   {:>19}",
                    "clients",
                    "alone r/s",
                    "p50 ms",
                    "p99 ms",
                    "batch r/s",
                    "p50 ms",
                    "p99 ms",
                    "rows",
                    "ratio"
                );
                for row in &r {
                    say!(
                        "  {:>7}  {:>10.0} {:>8.2} {:>8.2}   {:>10.0} {:>8.2} {:>8.2} {:>6}   {:>19}{}",
                        row.clients,
                        row.alone_rps,
                        ms(row.alone.p50_us),
                        ms(row.alone.p99_us),
                        row.batched_rps,
                        ms(row.batched.p50_us),
                        ms(row.batched.p99_us),
                        row.rows_per_batch
                            .map_or_else(|| "off".to_owned(), |r| format!("{r:.1}")),
                        row.ratio.show(2, "×"),
                        if row.failed > 0 {
                            format!("  ({} failed)", row.failed)
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        BenchCommand::Autoscale {
            day,
            learn,
            peak_rps,
            per_replica_rps,
            latency_ms,
            slots,
            slo_ms,
            max_replicas,
            modes,
        } => {
            use shoal_bench::autoscale::{AutoscaleBench, Mode};
            anyhow::ensure!(
                (10.0..=86_400.0).contains(&day),
                "--day: between 10 s and 24 h"
            );
            anyhow::ensure!(
                peak_rps > 0.0 && per_replica_rps > 0.0,
                "--peak-rps and --per-replica-rps must be positive"
            );
            let modes = modes
                .iter()
                .map(|m| match m.as_str() {
                    "fixed" => Ok(Mode::Fixed),
                    "reactive" => Ok(Mode::Reactive),
                    "predictive" => Ok(Mode::Predictive),
                    other => Err(anyhow::anyhow!(
                        "--modes {other:?}: use fixed, reactive or predictive"
                    )),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let bench = AutoscaleBench {
                exe: std::env::current_exe()?,
                day: std::time::Duration::from_secs_f64(day),
                learn,
                peak_rps,
                per_replica_rps,
                latency_ms,
                slots: slots.max(1),
                slo_ms,
                max_replicas,
                modes,
            };
            let scratch =
                std::env::temp_dir().join(format!("shoal-bench-autoscale-{}", std::process::id()));
            std::fs::create_dir_all(&scratch)?;
            let results = bench.run(&scratch).await;
            let _ = std::fs::remove_dir_all(&scratch);
            let results = results?;
            if json {
                say!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                say!(
                    "a {day:.0} s day at up to {peak_rps} req/s, {per_replica_rps} req/s per replica, SLO p99 ≤ {slo_ms} ms"
                );
                say!("{}", shoal_bench::autoscale::markdown(&results).trim_end());
                for r in &results {
                    say!(
                        "  {}: violations at seconds {:?}",
                        r.mode.as_str(),
                        r.violation_at
                    );
                }
            }
        }
        BenchCommand::Failover { data_dir, trials } => {
            let r = shoal_bench::drill::failover(
                &data_dir,
                usize::try_from(trials).unwrap_or(usize::MAX),
            )
            .await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                say!(
                    "{} leader failovers among {} control planes (SIGKILL to the next leader's first act)",
                    r.trials_ms.len(),
                    r.members
                );
                for (i, (ms, who)) in r.trials_ms.iter().zip(&r.new_leaders).enumerate() {
                    say!("  trial {:>2}: {ms:>6.0} ms  → {who}", i + 1);
                }
                say!(
                    "  median {:.0} ms, max {:.0} ms (goal: median ≤ 2000 ms, max ≤ 5000 ms)",
                    r.median_ms,
                    r.max_ms
                );
            }
        }
        BenchCommand::Backup {
            versions,
            size_mb,
            rounds,
        } => {
            let r = shoal_bench::backup::run(versions, size_mb, rounds, &scratch()).await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let mib = |b: u64| b as f64 / f64::from(1 << 20);
                let med = shoal_bench::stats::median;
                say!(
                    "{} versions, {:.0} MiB of artifacts, data directory {:.0} MiB",
                    r.versions,
                    mib(r.artifact_bytes),
                    mib(r.data_dir_bytes)
                );
                say!(
                    "  backup   {:.2} s ({:.0} MiB/s, {:.0} MiB written)   tar+zstd {:.2} s ({:.0} MiB/s, {:.0} MiB)",
                    med(&r.backup_s),
                    r.backup_mib_s,
                    mib(r.backup_bytes),
                    med(&r.tar_s),
                    r.tar_mib_s,
                    mib(r.tar_bytes)
                );
                say!(
                    "  restore  {:.2} s (every chunk and SHA-256 checked)   untar {:.2} s",
                    med(&r.restore_s),
                    med(&r.untar_s)
                );
                say!("  verify   {:.2} s", r.verify_s);
                say!(
                    "  one more version: backup {:.2} s copying {:.1} MiB; tar starts again",
                    r.incremental_s,
                    mib(r.incremental_bytes)
                );
            }
        }
        BenchCommand::Herd {
            replicas,
            interval,
            duration,
        } => {
            let r = shoal_bench::herd::simulate(
                replicas,
                std::time::Duration::from_secs_f64(interval),
                std::time::Duration::from_secs_f64(duration),
                42,
            );
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                say!(
                    "{} replicas polling every {}s (all started at once), {}s simulated: mean {:.1} req/s, peak {} req/s, peak/mean {:.2} (goal ≤ 1.5)",
                    r.replicas,
                    r.interval_s,
                    r.duration_s,
                    r.mean_rps,
                    r.peak_rps,
                    r.peak_over_mean
                );
            }
        }
        BenchCommand::Runtime { ort_lib, rounds } => {
            let ort = shoal_bench::runtime::ort_backend(ort_lib.as_deref())?;
            let results = tokio::task::spawn_blocking(move || {
                shoal_bench::runtime::compare(ort.as_ref(), rounds)
            })
            .await??;
            if json {
                say!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                say!(
                    "{:<38} {:>14} {:>12} {:>12} {:>12} {:>12} {:>19} {:>12} {:>9} {:>19}",
                    "model",
                    "shape",
                    "tract p50",
                    "tract p99",
                    "ORT p50",
                    "ORT p99",
                    "p50 ratio",
                    "auto p50",
                    "auto kept",
                    "auto/ORT"
                );
                for r in results {
                    say!(
                        "{:<38} {:>14} {:>10.1}µs {:>10.1}µs {:>10.1}µs {:>10.1}µs {:>19} {:>10.1}µs {:>9} {:>19}",
                        r.model,
                        format!("{:?}", r.shape),
                        r.tract.p50_us,
                        r.tract.p99_us,
                        r.onnxruntime.p50_us,
                        r.onnxruntime.p99_us,
                        r.p50_ratio.show(2, "×"),
                        r.auto.p50_us,
                        r.auto_kept,
                        r.auto_over_ort.show(2, "×")
                    );
                }
            }
        }
        BenchCommand::Codec { rows, rounds } => {
            anyhow::ensure!(
                !rows.is_empty() && !rows.contains(&0) && rounds > 0,
                "give --rows as positive row counts (e.g. 1,32,256) and --rounds of at least 1"
            );
            let r = shoal_bench::codec::measure(&rows, rounds)?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                say!(
                    "{:>5} {:>8} {:>11} {:>10} {:>22} {:>10} {:>10} {:>22}",
                    "rows",
                    "bytes",
                    "serde walk",
                    "precheck",
                    "walk ÷ precheck",
                    "decode",
                    "by serde",
                    "serde ÷ decode"
                );
                for row in &r {
                    say!(
                        "{:>5} {:>8} {:>9.2}µs {:>8.2}µs {:>22} {:>8.2}µs {:>8.2}µs {:>22}",
                        row.rows,
                        row.bytes,
                        row.serde_walk_us,
                        row.precheck_us,
                        row.precheck_speedup.show(2, "×"),
                        row.decode_us,
                        row.decode_serde_us,
                        row.decode_speedup.show(2, "×")
                    );
                }
            }
        }
        BenchCommand::Overhead {
            model,
            rounds,
            iterations,
        } => {
            let r = shoal_bench::overhead::measure(&model, rounds, iterations).await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                say!(
                    "model {}: {} rounds x {} requests",
                    r.model,
                    rounds,
                    iterations
                );
                say!(
                    "  raw inference  p50 {:>8.1}µs  p99 {:>8.1}µs",
                    r.raw.p50_us,
                    r.raw.p99_us
                );
                say!(
                    "  HTTP end-to-end p50 {:>8.1}µs  p99 {:>8.1}µs",
                    r.http.p50_us,
                    r.http.p99_us
                );
                say!(
                    "  GET /health     p50 {:>8.1}µs  p99 {:>8.1}µs  (HTTP floor, no work)",
                    r.floor.p50_us,
                    r.floor.p99_us
                );
                say!(
                    "  serving overhead (per-round p50 differences, median (lowest–highest)): {}",
                    r.overhead_p50_us.show(1, "µs")
                );
            }
        }
    }
    Ok(())
}
