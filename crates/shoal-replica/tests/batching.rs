//! A batched version served over the replica's HTTP API: concurrent
//! requests of mixed row counts with bad requests mixed in each get their
//! own answer — the labels an unbatched replica gives, probabilities
//! within float rounding — bad requests a 400 of their own, and requests
//! share batches. A model without a batch dimension cannot be loaded
//! batched, and says why.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use shoal_core::batch::BatchPolicy;
use shoal_core::{ModelName, Version};
use shoal_replica::loader::{ArtifactSource, LoadSpec};
use shoal_replica::store::InstallPolicy;
use shoal_replica::{Replica, ReplicaConfig};
use shoal_runtime::LoadOptions;
use shoal_runtime::tract::TractBackend;
use shoal_testkit::{Samples, call_router, model_path};

async fn replica(name: &str, file: &str, options: LoadOptions) -> (Arc<Replica>, Router) {
    let replica = Arc::new(Replica::new(
        format!("r-{name}"),
        Arc::new(TractBackend::default()),
        &ReplicaConfig::default(),
    ));
    replica
        .load(
            LoadSpec {
                model: ModelName::new("digits").unwrap(),
                version: Version::new("1").unwrap(),
                source: ArtifactSource::Path(model_path(file)),
                sha256: None,
                options,
            },
            InstallPolicy {
                make_default: true,
                retire_others: false,
            },
        )
        .await
        .unwrap();
    let app = shoal_replica::http::router(replica.clone());
    (replica, app)
}

async fn infer(app: &Router, body: Value) -> (StatusCode, Value) {
    let json = [("content-type", "application/json")];
    let uri = "/v2/models/digits/infer";
    let reply = call_router(app, Method::POST, uri, &json, body.to_string()).await;
    (reply.status, reply.json())
}

/// Request `i`: 1–4 digits samples, every fifth malformed.
fn request(samples: &Samples, i: usize) -> (Value, bool) {
    let rows = 1 + i % 4;
    let bad = i % 5 == 2;
    let width = if bad { 60 } else { 64 };
    let data: Vec<f32> = (0..rows)
        .flat_map(|r| samples.inputs[(i * 3 + r) % samples.inputs.len()][..width].to_vec())
        .collect();
    let body = json!({
        "id": format!("req-{i}"),
        "inputs": [{"name": "input", "shape": [rows, width], "datatype": "FP32", "data": data}],
    });
    (body, bad)
}

fn output<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_version_answers_every_request_with_its_own_rows() {
    let samples = Samples::load();
    let policy = BatchPolicy::new(32, Duration::from_millis(2), vec![16]).unwrap();
    let (batched_replica, batched) = replica(
        "batched",
        "digits-v2.onnx",
        LoadOptions::default().with_batching(Some(policy)),
    )
    .await;
    let (_, alone) = replica("alone", "digits-v2.onnx", LoadOptions::default()).await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (batched, alone, samples) = (batched.clone(), alone.clone(), samples.clone());
            tokio::spawn(async move {
                let (body, bad) = request(&samples, i);
                let (status, got) = infer(&batched, body.clone()).await;
                if bad {
                    assert_eq!(status, StatusCode::BAD_REQUEST, "request {i}: {got}");
                    assert!(got["error"].as_str().unwrap().contains("input"), "{got}");
                    return;
                }
                assert_eq!(status, StatusCode::OK, "request {i}: {got}");
                let (_, want) = infer(&alone, body).await;
                assert_eq!(got["id"], want["id"]);
                assert_eq!(output(&got, "label"), output(&want, "label"), "request {i}");
                let probs = output(&got, "probabilities");
                assert_eq!(probs["shape"], output(&want, "probabilities")["shape"]);
                let (g, w) = (
                    probs["data"].as_array().unwrap(),
                    output(&want, "probabilities")["data"].as_array().unwrap(),
                );
                for (g, w) in g.iter().zip(w) {
                    let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                    assert!(
                        (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                        "request {i}: {g} vs {w}"
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let snapshot = batched_replica.store().snapshot();
    let serving = snapshot
        .models
        .values()
        .next()
        .unwrap()
        .versions
        .values()
        .next()
        .unwrap();
    let stats = serving.batcher.as_ref().expect("a batcher").stats();
    assert_eq!(
        stats.requests(),
        160,
        "every good request went through a batch"
    );
    assert!(
        stats.batches() < stats.requests(),
        "{} batches for {} requests",
        stats.batches(),
        stats.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_a_batch_dimension_is_not_loaded_batched() {
    let replica = Replica::new(
        "r-vad".into(),
        Arc::new(TractBackend::default()),
        &ReplicaConfig::default(),
    );
    let policy = BatchPolicy::new(8, Duration::from_millis(1), vec![]).unwrap();
    let err = replica
        .load(
            LoadSpec {
                model: ModelName::new("vad").unwrap(),
                version: Version::new("1").unwrap(),
                source: ArtifactSource::Path(model_path("silero_vad_16k_sequence.onnx")),
                sha256: None,
                options: LoadOptions::default().with_batching(Some(policy)),
            },
            InstallPolicy {
                make_default: true,
                retire_others: false,
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("first (batch) dimension"), "{err}");
}
