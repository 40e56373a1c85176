//! What state costs a stateful model's sequences: Silero VAD steps (one
//! 576-sample frame each) over HTTP to a replica keeping the state in its
//! memory against replicas writing it through to Redis (the bench starts
//! its own `redis-server`), in alternating rounds on one keep-alive
//! connection each. Reports per-step latency and steps per second of each,
//! Redis commands and bytes per step (from `INFO`), the latency of a step
//! taken over by a replica that does not hold the sequence (read from
//! Redis: what a survivor pays to resume after its owner's death), and the
//! memory a replica spends per live sequence.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use shoal_replica::session_store::RedisStore;
use shoal_replica::{ModelSpec, ReplicaConfig, ReplicaServer};
use shoal_runtime::LoadOptions;
use shoal_runtime::tract::TractBackend;

use crate::stats::{Latencies, Summary, median};

/// Samples per step.
const FRAME: usize = 576;

/// The comparison.
#[derive(Debug, Clone, Serialize)]
pub struct SequencesReport {
    /// Steps per round per store.
    pub steps: usize,
    /// Rounds per store.
    pub rounds: usize,
    /// Memory store: every step, all rounds.
    pub memory: Summary,
    /// Redis store: every step, all rounds.
    pub redis: Summary,
    /// Steps per second, median over rounds: memory, Redis.
    pub steps_per_s: (f64, f64),
    /// Redis commands per step.
    pub redis_commands_per_step: f64,
    /// Bytes to and from Redis per step.
    pub redis_bytes_per_step: f64,
    /// Steps each taken by the replica that did not take the one before
    /// (it reads the sequence from Redis first).
    pub takeover: Summary,
    /// Resident memory per live sequence in a replica (bytes).
    pub bytes_per_sequence: f64,
    /// Sequences a replica holds per GiB of memory at that rate.
    pub sequences_per_gib: f64,
}

/// A child killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `redis-server` on a free port, nothing on disk.
async fn start_redis() -> anyhow::Result<(Child, String)> {
    let port = free_port()?;
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("start redis-server (Debian's redis-server: scripts/setup)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((Child(child), format!("redis://127.0.0.1:{port}")))
}

/// Redis's `INFO` counters: commands processed, bytes in and out.
async fn redis_counters(url: &str) -> anyhow::Result<(f64, f64)> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((
        field("total_commands_processed"),
        field("total_net_input_bytes") + field("total_net_output_bytes"),
    ))
}

/// A replica serving Silero VAD as a stateful model, state in `store`.
async fn replica(store: Option<&str>) -> anyhow::Result<ReplicaServer> {
    let state = [("h", "hn"), ("c", "cn")]
        .into_iter()
        .map(|(i, o)| (i.to_owned(), o.to_owned()))
        .collect();
    let config = ReplicaConfig {
        models: vec![ModelSpec {
            name: "vad".parse()?,
            version: "1".parse()?,
            path: crate::models_dir().join("silero_vad_16k_sequence.onnx"),
        }],
        load_options: [("vad".parse()?, LoadOptions::default().with_state(&state))].into(),
        session_store: store
            .map(|url| RedisStore::new(url, Duration::from_secs(600)).map(Arc::new))
            .transpose()?,
        sequences: shoal_replica::sequences::SequenceLimits {
            max: 1_000_000,
            idle: Duration::from_secs(600),
        },
        ..ReplicaConfig::default()
    };
    let server = ReplicaServer::start(config, Arc::new(TractBackend::default())).await?;
    server.replica.wait_ready().await;
    Ok(server)
}

/// One step's body: frame `k` of a tone, of sequence `id`.
fn body(id: &str, k: usize, start: bool) -> Bytes {
    #[allow(clippy::cast_precision_loss)]
    let frame: Vec<f32> = (0..FRAME)
        .map(|i| 0.3 * (((k * FRAME + i) as f32) * 0.0863).sin())
        .collect();
    Bytes::from(
        serde_json::json!({
            "parameters": {"sequence_id": id, "sequence_start": start},
            "inputs": [{"name": "input", "shape": [1, FRAME], "datatype": "FP32", "data": frame}],
        })
        .to_string(),
    )
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Sends one step; how long it took.
async fn step(client: &HttpClient, url: &str, body: Bytes) -> anyhow::Result<Duration> {
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let started = Instant::now();
    let response = client.request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status == 200,
        "status {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(started.elapsed())
}

/// Resident memory of this process (bytes).
fn rss_bytes() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    pages * 4096.0
}

/// Runs the comparison: `rounds` alternating rounds of `steps` steps per
/// store, `takeovers` steps alternating between two Redis replicas, and
/// `held` sequences started on one memory replica.
pub async fn run(
    steps: usize,
    rounds: usize,
    takeovers: usize,
    held: usize,
) -> anyhow::Result<SequencesReport> {
    let (_redis, url) = start_redis().await?;
    let memory = replica(None).await?;
    let redis_a = replica(Some(&url)).await?;
    let redis_b = replica(Some(&url)).await?;
    let infer = |s: &ReplicaServer| format!("http://{}/v2/models/vad/infer", s.addr);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);

    let (mut all_memory, mut all_redis) = (Latencies::default(), Latencies::default());
    let (mut memory_rates, mut redis_rates) = (Vec::new(), Vec::new());
    let (mut commands, mut bytes) = (0.0, 0.0);
    for round in 0..rounds {
        for (server, all, rates) in [
            (&memory, &mut all_memory, &mut memory_rates),
            (&redis_a, &mut all_redis, &mut redis_rates),
        ] {
            let before = redis_counters(&url).await?;
            let id = format!("r{round}");
            let url_ = infer(server);
            let started = Instant::now();
            for k in 0..steps {
                all.record(step(&client, &url_, body(&id, k, k == 0)).await?);
            }
            #[allow(clippy::cast_precision_loss)]
            rates.push(steps as f64 / started.elapsed().as_secs_f64());
            if std::ptr::eq(server, &redis_a) {
                let after = redis_counters(&url).await?;
                // Less the INFO call itself.
                commands += after.0 - before.0 - 1.0;
                bytes += after.1 - before.1;
            }
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let redis_steps = (steps * rounds) as f64;

    // Takeovers: each step on the replica that did not take the last one.
    let mut takeover = Latencies::default();
    let (url_a, url_b) = (infer(&redis_a), infer(&redis_b));
    step(&client, &url_a, body("moving", 0, true)).await?;
    for k in 1..=takeovers {
        let target = if k % 2 == 1 { &url_b } else { &url_a };
        // The other replica forgets it, as if it had died: the next step
        // there reads it from Redis again.
        let other = if k % 2 == 1 { &redis_a } else { &redis_b };
        other.replica.sequences().forget(
            "vad",
            &shoal_oip::sequence::SequenceId::Text("moving".into()),
        );
        takeover.record(step(&client, target, body("moving", k, false)).await?);
    }

    // Memory per live sequence.
    let before = rss_bytes();
    let url_m = infer(&memory);
    for i in 0..held {
        step(&client, &url_m, body(&format!("held-{i}"), 0, true)).await?;
    }
    let after = rss_bytes();
    #[allow(clippy::cast_precision_loss)]
    let per = ((after - before) / held.max(1) as f64).max(1.0);

    for s in [memory, redis_a, redis_b] {
        s.stop().await?;
    }
    Ok(SequencesReport {
        steps,
        rounds,
        memory: all_memory.summary(),
        redis: all_redis.summary(),
        steps_per_s: (median(&memory_rates), median(&redis_rates)),
        redis_commands_per_step: commands / redis_steps,
        redis_bytes_per_step: bytes / redis_steps,
        takeover: takeover.summary(),
        bytes_per_sequence: per,
        sequences_per_gib: f64::from(1u32 << 30) / per,
    })
}
