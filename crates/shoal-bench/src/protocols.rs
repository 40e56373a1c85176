//! The three ways a client can call a replica, on the same replica in the
//! same run: REST with JSON numbers, REST with binary tensor data (Triton's
//! extension, what `tritonclient.http` sends by default) and gRPC
//! (`raw_input_contents`, what `tritonclient.grpc` sends), each with `C`
//! closed-loop clients for a fixed time, rounds rotating which goes
//! first; at 1 row and at many rows per request. Reports requests per
//! second and p50/p99 of each, and each one's throughput over REST JSON's
//! (median of per-round ratios).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use shoal_core::{Tensor, TensorData};
use shoal_grpc::pb::ModelInferRequest;
use shoal_grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use shoal_grpc::pb::model_infer_request::InferInputTensor;
use shoal_replica::{ModelSpec, ReplicaConfig, ReplicaServer};

use crate::stats::{Latencies, Spread, Summary, median};

/// The protocols compared, in the order reported.
pub const PROTOCOLS: [&str; 3] = ["rest-json", "rest-binary", "grpc"];

/// One protocol at one request size.
#[derive(Debug, Clone, Serialize)]
pub struct ProtocolRow {
    /// `rest-json`, `rest-binary` or `grpc`.
    pub protocol: String,
    /// Rows per request.
    pub rows: usize,
    /// Requests per second (median over rounds).
    pub rps: f64,
    /// Throughput ÷ REST JSON's over rounds.
    pub over_json: Spread,
    /// Latencies, all rounds pooled.
    pub latency: Summary,
    /// Failed requests.
    pub failed: u64,
}

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled HTTP/1.1 client with Nagle off, for closed-loop callers.
pub(crate) fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// How one caller sends its request: REST (JSON, or binary tensors with
/// the JSON part's length) or gRPC.
#[derive(Clone)]
pub(crate) enum Sender {
    Rest {
        client: HttpClient,
        url: String,
        body: Bytes,
        json_len: Option<usize>,
    },
    Grpc {
        client: GrpcInferenceServiceClient<tonic::transport::Channel>,
        request: ModelInferRequest,
    },
}

impl Sender {
    async fn send(&mut self) -> bool {
        match self {
            Sender::Rest {
                client,
                url,
                body,
                json_len,
            } => {
                let mut request = http::Request::post(url.as_str());
                request = match json_len {
                    None => request.header("content-type", "application/json"),
                    Some(len) => request
                        .header("content-type", "application/octet-stream")
                        .header(shoal_oip::BINARY_HEADER, *len),
                };
                let Ok(request) = request.body(Full::new(body.clone())) else {
                    return false;
                };
                match client.request(request).await {
                    Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
                    Err(_) => false,
                }
            }
            Sender::Grpc { client, request } => client.model_infer(request.clone()).await.is_ok(),
        }
    }
}

/// `clients` closed-loop callers with `sender` for `seconds`: requests
/// answered, failed, and every latency.
pub(crate) async fn closed_loop(
    sender: &Sender,
    clients: usize,
    seconds: f64,
) -> (u64, u64, Latencies) {
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let mut sender = sender.clone();
            let (stop, failed) = (stop.clone(), failed.clone());
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    if sender.send().await {
                        latencies.record(started.elapsed());
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Latencies::default();
    for t in tasks {
        if let Ok(l) = t.await {
            all.merge(&l);
        }
    }
    (all.count(), failed.load(Ordering::Relaxed), all)
}

/// The three senders for `rows` digits rows.
async fn senders(server: &ReplicaServer, rows: usize) -> anyhow::Result<Vec<Sender>> {
    let data: Vec<f32> = crate::digits_rows(rows)?.into_iter().flatten().collect();
    let url = format!("http://{}/v2/models/digits/infer", server.addr);
    let client = http_client();
    let tensor = Tensor::new("input", vec![rows, 64], TensorData::Fp32(data.clone()))?;
    let request = shoal_oip::DecodedRequest {
        id: None,
        parameters: None,
        inputs: vec![tensor],
        outputs: None,
    };
    let json = shoal_oip::encode_request(&request);
    let (binary, json_len) = shoal_oip::binary::encode_request(&request);
    let grpc_addr = server
        .grpc_addr
        .ok_or_else(|| anyhow::anyhow!("the replica has no gRPC address"))?;
    let grpc = GrpcInferenceServiceClient::connect(format!("http://{grpc_addr}")).await?;
    let raw: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(vec![
        Sender::Rest {
            client: client.clone(),
            url: url.clone(),
            body: Bytes::from(json),
            json_len: None,
        },
        Sender::Rest {
            client,
            url,
            body: Bytes::from(binary),
            json_len: Some(json_len),
        },
        Sender::Grpc {
            client: grpc,
            request: ModelInferRequest {
                model_name: "digits".into(),
                inputs: vec![InferInputTensor {
                    name: "input".into(),
                    datatype: "FP32".into(),
                    shape: vec![i64::try_from(rows)?, 64],
                    parameters: Default::default(),
                    contents: None,
                }],
                raw_input_contents: vec![raw],
                ..Default::default()
            },
        },
    ])
}

/// Runs the comparison on `digits-v2` for each of `sizes` (rows per
/// request), `clients` callers, `rounds` rounds of `seconds` each.
pub async fn run(
    sizes: &[usize],
    clients: usize,
    seconds: f64,
    rounds: usize,
) -> anyhow::Result<Vec<ProtocolRow>> {
    let config = ReplicaConfig {
        grpc_addr: Some(([127, 0, 0, 1], 0).into()),
        models: vec![ModelSpec {
            name: "digits".parse()?,
            version: "1".parse()?,
            path: crate::models_dir().join("digits-v2.onnx"),
        }],
        ..ReplicaConfig::default()
    };
    let server = ReplicaServer::start(
        config,
        Arc::new(shoal_runtime::tract::TractBackend::default()),
    )
    .await?;
    server.replica.wait_ready().await;
    let mut out = Vec::new();
    for &rows in sizes {
        let senders = senders(&server, rows).await?;
        for s in &senders {
            let (n, _, _) = closed_loop(s, 1, 0.1).await;
            anyhow::ensure!(n > 0, "the replica does not answer");
            closed_loop(s, clients, 0.3).await;
        }
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); senders.len()];
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); senders.len()];
        let mut latencies: Vec<Latencies> = vec![Latencies::default(); senders.len()];
        let mut failed = vec![0u64; senders.len()];
        for round in 0..rounds {
            let mut this = vec![0.0; senders.len()];
            for k in 0..senders.len() {
                let which = (k + round) % senders.len();
                let (n, f, l) = closed_loop(&senders[which], clients, seconds).await;
                #[allow(clippy::cast_precision_loss)]
                let rate = n as f64 / seconds;
                this[which] = rate;
                rates[which].push(rate);
                latencies[which].merge(&l);
                failed[which] += f;
            }
            for which in 0..senders.len() {
                ratios[which].push(this[which] / this[0].max(1e-9));
            }
        }
        for (which, name) in PROTOCOLS.iter().enumerate() {
            out.push(ProtocolRow {
                protocol: (*name).to_owned(),
                rows,
                rps: median(&rates[which]),
                over_json: Spread::of(&ratios[which]),
                latency: latencies[which].summary(),
                failed: failed[which],
            });
        }
    }
    server.stop().await?;
    Ok(out)
}
