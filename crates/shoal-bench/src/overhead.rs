//! A replica's serving overhead: the same digits request, timed as a raw
//! in-process inference and end to end over HTTP (one keep-alive
//! connection, sequential requests), in alternating rounds. Overhead per
//! round is HTTP p50 minus raw p50; the report gives the median over rounds.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use shoal_core::{Tensor, TensorData};
use shoal_replica::{ModelSpec, ReplicaConfig, ReplicaServer};
use shoal_runtime::tract::TractBackend;

use crate::stats::{Latencies, Spread, Summary};

/// The overhead measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    /// Model file.
    pub model: String,
    /// Raw `infer` on the caller's thread, all rounds.
    pub raw: Summary,
    /// HTTP end to end, all rounds.
    pub http: Summary,
    /// `GET /health` end to end, all rounds: the HTTP floor on this
    /// machine, with no inference work at all.
    pub floor: Summary,
    /// HTTP p50 − raw p50 over rounds, µs.
    pub overhead_p50_us: Spread,
}

/// Measures `rounds` rounds of `iterations` requests each.
pub async fn measure(file: &str, rounds: usize, iterations: usize) -> anyhow::Result<Overhead> {
    let path = crate::models_dir().join(file);
    let config = ReplicaConfig {
        models: vec![ModelSpec {
            name: "m".parse()?,
            version: "1".parse()?,
            path,
        }],
        ..ReplicaConfig::default()
    };
    let server = ReplicaServer::start(config, Arc::new(TractBackend::default())).await?;
    server.replica.wait_ready().await;
    let serving = server.replica.store().lookup("m", None)?;
    let row = crate::digits_rows(1)?.remove(0);
    let inputs = vec![Tensor::new("input", vec![1, 64], TensorData::Fp32(row))?];
    let body = Bytes::from(shoal_oip::encode_request(&shoal_oip::DecodedRequest {
        id: None,
        parameters: None,
        inputs: inputs.clone(),
        outputs: None,
    }));
    let url = format!("http://{}/v2/models/m/infer", server.addr);

    let health = format!("http://{}/health", server.addr);
    // The client runs on its own thread and single-threaded runtime, as a
    // separate client process would, so it never competes with the
    // server's workers for a scheduler slot.
    let raw_model = serving.loaded.clone();
    let client_thread = std::thread::spawn(
        move || -> anyhow::Result<(Latencies, Latencies, Latencies, Vec<f64>)> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                let client: Client<_, Full<Bytes>> =
                    Client::builder(TokioExecutor::new()).build(connector);
                let (mut all_raw, mut all_http, mut overheads) =
                    (Latencies::default(), Latencies::default(), Vec::new());
                let mut all_floor = Latencies::default();
                for _ in 0..rounds {
                    let mut raw = Latencies::default();
                    for _ in 0..iterations {
                        let started = Instant::now();
                        let out = raw_model.infer_blocking(inputs.clone())?;
                        let elapsed = started.elapsed();
                        std::hint::black_box(out);
                        raw.record(elapsed);
                        all_raw.record(elapsed);
                    }
                    let mut http = Latencies::default();
                    for _ in 0..iterations {
                        let request = http::Request::post(&url)
                            .header("content-type", "application/json")
                            .body(Full::new(body.clone()))?;
                        let started = Instant::now();
                        let response = client.request(request).await?;
                        anyhow::ensure!(response.status() == 200, "status {}", response.status());
                        let bytes = response.into_body().collect().await?.to_bytes();
                        let elapsed = started.elapsed();
                        std::hint::black_box(bytes);
                        http.record(elapsed);
                        all_http.record(elapsed);
                    }
                    for _ in 0..iterations {
                        let request = http::Request::get(&health).body(Full::new(Bytes::new()))?;
                        let started = Instant::now();
                        let response = client.request(request).await?;
                        let bytes = response.into_body().collect().await?.to_bytes();
                        std::hint::black_box(bytes);
                        all_floor.record(started.elapsed());
                    }
                    overheads.push(http.quantile_us(0.5) - raw.quantile_us(0.5));
                }
                Ok((all_raw, all_http, all_floor, overheads))
            })
        },
    );
    let (all_raw, all_http, all_floor, overheads) =
        tokio::task::spawn_blocking(move || client_thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("benchmark client thread panicked"))??;
    drop(serving);
    server.stop().await?;
    Ok(Overhead {
        model: file.to_owned(),
        raw: all_raw.summary(),
        http: all_http.summary(),
        floor: all_floor.summary(),
        overhead_p50_us: Spread::of(&overheads),
    })
}
