//! Dynamic batching against none: two replicas in this process serve the
//! same model, one with its requests batched, one running each alone; `C`
//! clients each send one request after another (closed loop: the
//! throughput a replica sustains at that concurrency) for a fixed time, in
//! rounds that alternate which replica goes first. Reports requests per
//! second and p50/p99 of each per concurrency, and the median of the
//! per-round throughput ratios.
//!
//! Closed loop on purpose: the question is how many requests a replica
//! answers with `C` callers waiting on it; the latency figures say what
//! each caller paid for that.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use shoal_core::batch::BatchPolicy;
use shoal_replica::{ModelSpec, ReplicaConfig, ReplicaServer};
use shoal_runtime::LoadOptions;
use shoal_runtime::engines::Engines;

use crate::protocols::{Sender, closed_loop};
use crate::stats::{Latencies, Spread, Summary, median};

/// What to compare.
#[derive(Debug, Clone)]
pub struct BatchingSpec {
    /// Bundled model file (e.g. `digits-v2.onnx`).
    pub model: String,
    /// Its input's name and row shape (every dimension but the first).
    pub input: (String, Vec<usize>),
    /// How both replicas load it (input shapes the file leaves open, the
    /// engine).
    pub options: LoadOptions,
    /// Rows per request.
    pub rows: usize,
    /// Concurrencies to measure.
    pub clients: Vec<usize>,
    /// Seconds per replica per round.
    pub seconds: f64,
    /// Rounds.
    pub rounds: usize,
    /// The batched replica's policy.
    pub policy: BatchPolicy,
    /// Send tensors as binary data (Triton's binary tensor extension, what
    /// its clients send by default) instead of JSON numbers.
    pub binary: bool,
    /// Both replicas' `inline_max`: inferences this cheap run on the
    /// request's task instead of an inference thread.
    pub inline_max: std::time::Duration,
}

/// One concurrency's figures.
#[derive(Debug, Clone, Serialize)]
pub struct BatchingRow {
    /// Concurrent clients.
    pub clients: usize,
    /// Each request alone: requests per second (median over rounds).
    pub alone_rps: f64,
    /// Batched: requests per second (median over rounds).
    pub batched_rps: f64,
    /// Throughput batched ÷ alone over rounds.
    pub ratio: Spread,
    /// Latencies of every request, each alone.
    pub alone: Summary,
    /// Latencies of every request, batched.
    pub batched: Summary,
    /// Mean rows per batch the batched replica ran (`None`: it batched
    /// nothing; batching does not pay on the engine for this model).
    pub rows_per_batch: Option<f64>,
    /// Failed requests (both replicas).
    pub failed: u64,
}

async fn replica(
    model: &str,
    options: LoadOptions,
    inline_max: std::time::Duration,
) -> anyhow::Result<ReplicaServer> {
    let config = ReplicaConfig {
        models: vec![ModelSpec {
            name: "m".parse()?,
            version: "1".parse()?,
            path: crate::models_dir().join(model),
        }],
        load_options: [("m".parse()?, options)].into(),
        inline_max,
        ..ReplicaConfig::default()
    };
    let server = ReplicaServer::start(config, Arc::new(Engines::default())).await?;
    server.replica.wait_ready().await;
    Ok(server)
}

/// A request body: `rows` rows of a fixed pattern, as JSON or as binary
/// tensor data (then with the JSON part's length for its header).
fn body(
    input: &str,
    row: &[usize],
    rows: usize,
    binary: bool,
) -> anyhow::Result<(Bytes, Option<usize>)> {
    let width: usize = row.iter().product();
    #[allow(clippy::cast_precision_loss)]
    let data: Vec<f32> = (0..rows * width).map(|i| (i % 17) as f32 / 17.0).collect();
    let mut shape = vec![rows];
    shape.extend_from_slice(row);
    let tensor = shoal_core::Tensor::new(input, shape, shoal_core::TensorData::Fp32(data))?;
    let request = shoal_oip::DecodedRequest {
        id: None,
        parameters: None,
        inputs: vec![tensor],
        outputs: None,
    };
    if binary {
        let (bytes, json_len) = shoal_oip::binary::encode_request(&request);
        return Ok((Bytes::from(bytes), Some(json_len)));
    }
    Ok((Bytes::from(shoal_oip::encode_request(&request)), None))
}

/// Runs the comparison.
pub async fn run(spec: &BatchingSpec) -> anyhow::Result<Vec<BatchingRow>> {
    let alone = replica(&spec.model, spec.options.clone(), spec.inline_max).await?;
    let batched = replica(
        &spec.model,
        spec.options
            .clone()
            .with_batching(Some(spec.policy.clone())),
        spec.inline_max,
    )
    .await?;
    let client = crate::protocols::http_client();
    let (body, json_len) = body(&spec.input.0, &spec.input.1, spec.rows, spec.binary)?;
    let sender = |s: &ReplicaServer| Sender::Rest {
        client: client.clone(),
        url: format!("http://{}/v2/models/m/infer", s.addr),
        body: body.clone(),
        json_len,
    };
    // A replica that cannot serve the model is a setup error, not a figure.
    let (n, _, _) = closed_loop(&sender(&alone), 1, 0.1).await;
    anyhow::ensure!(n > 0, "the replicas do not answer {}", spec.model);
    let batch_stats = || {
        let snapshot = batched.replica.store().snapshot();
        snapshot
            .models
            .values()
            .flat_map(|m| m.versions.values())
            .filter_map(|v| v.batcher.as_ref())
            .map(|b| (b.stats().batches(), b.stats().rows()))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let mut rows = Vec::new();
    for &clients in &spec.clients {
        // Warm both (connections, threads, caches) before measuring.
        for s in [&alone, &batched] {
            closed_loop(&sender(s), clients, 0.3).await;
        }
        let (mut all_alone, mut all_batched) = (Latencies::default(), Latencies::default());
        let (mut rps_alone, mut rps_batched, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut failed = 0;
        let before = batch_stats();
        for round in 0..spec.rounds {
            let mut rates = [0.0; 2];
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let server = if which == 0 { &alone } else { &batched };
                let (n, f, l) = closed_loop(&sender(server), clients, spec.seconds).await;
                failed += f;
                #[allow(clippy::cast_precision_loss)]
                let rate = n as f64 / spec.seconds;
                rates[which] = rate;
                if which == 0 {
                    all_alone.merge(&l);
                    rps_alone.push(rate);
                } else {
                    all_batched.merge(&l);
                    rps_batched.push(rate);
                }
            }
            ratios.push(rates[1] / rates[0].max(1e-9));
        }
        let after = batch_stats();
        #[allow(clippy::cast_precision_loss)]
        let rows_per_batch =
            (after.0 > before.0).then(|| (after.1 - before.1) as f64 / (after.0 - before.0) as f64);
        rows.push(BatchingRow {
            clients,
            alone_rps: median(&rps_alone),
            batched_rps: median(&rps_batched),
            ratio: Spread::of(&ratios),
            alone: all_alone.summary(),
            batched: all_batched.summary(),
            rows_per_batch,
            failed,
        });
    }
    alone.stop().await?;
    batched.stop().await?;
    Ok(rows)
}
