//! A replica on a real socket (port 0): the OIP endpoints over TCP, and
//! Triton's own Python client (`tritonclient[http]`) used unchanged.

use std::sync::Arc;

use shoal_replica::{ModelSpec, ReplicaConfig, ReplicaServer};
use shoal_runtime::tract::TractBackend;
use shoal_testkit::{HttpClient, Samples, model_path};

async fn start() -> ReplicaServer {
    let config = ReplicaConfig {
        id: Some("socket-test".into()),
        models: vec![ModelSpec {
            name: "digits".parse().unwrap(),
            version: "2".parse().unwrap(),
            path: model_path("digits-v2.onnx"),
        }],
        ..ReplicaConfig::default()
    };
    let server = ReplicaServer::start(config, Arc::new(TractBackend::default()))
        .await
        .unwrap();
    server.replica.wait_ready().await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_over_tcp() {
    let server = start().await;
    let base = format!("http://{}", server.addr);
    let http = HttpClient::new();
    for path in [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/health",
        "/ready",
        "/v2/models/digits",
        "/v2/models/digits/ready",
        "/v2/models/digits/versions/2",
        "/metrics",
    ] {
        let r = http.get(&format!("{base}{path}")).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let samples = Samples::load();
    let r = http
        .post_json(
            &format!("{base}/v2/models/digits/versions/2/infer"),
            samples.request(0..10),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-shoal-replica"), Some("socket-test"));
    let labels = r.json()["outputs"][1]["data"].clone();
    assert_eq!(labels.as_array().unwrap().len(), 10);
    let r = http
        .post_json(&format!("{base}/v2/models/digits/infer"), "{")
        .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid inference request")
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triton_python_client_works_unchanged() {
    let server = start().await;
    let samples = Samples::load();
    // One sample of slack for engines rounding a near tie differently.
    #[allow(clippy::cast_precision_loss)]
    let min_accuracy = samples.accuracy["digits-v2"] - 1.0 / samples.labels.len() as f64 - 1e-9;
    shoal_testkit::tritonclient_check(&server.addr.to_string(), "digits", min_accuracy).await;
    server.stop().await.unwrap();
}
