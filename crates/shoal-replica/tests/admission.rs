//! Admission before decode: when the inference pool's threads and queue
//! are full, a request is refused with 503 and `Retry-After` before its
//! body is read or parsed — a malformed body then gets 503, not 400 — and
//! once the pool drains the same body gets the 400 that says what is
//! wrong.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use http::{Method, StatusCode};
use serde_json::json;
use shoal_core::{ModelName, Version};
use shoal_replica::loader::{ArtifactSource, LoadSpec};
use shoal_replica::store::InstallPolicy;
use shoal_replica::{Replica, ReplicaConfig};
use shoal_runtime::LoadOptions;
use shoal_runtime::tract::TractBackend;
use shoal_testkit::{call_router, eventually, model_path};

async fn post(app: &Router, body: String) -> (StatusCode, http::HeaderMap, String) {
    let json = [("content-type", "application/json")];
    let reply = call_router(app, Method::POST, "/v2/models/slow/infer", &json, body).await;
    (reply.status, reply.headers.clone(), reply.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_is_refused_before_the_body_is_parsed() {
    let config = ReplicaConfig {
        threads: Some(1),
        max_queue: Some(1),
        ..ReplicaConfig::default()
    };
    let replica = Arc::new(Replica::new(
        "r-admission".into(),
        Arc::new(TractBackend::default()),
        &config,
    ));
    replica
        .load(
            LoadSpec {
                model: ModelName::new("slow").unwrap(),
                version: Version::new("1").unwrap(),
                source: ArtifactSource::Path(model_path("digits-slow.onnx")),
                sha256: None,
                options: LoadOptions::default(),
            },
            InstallPolicy::default(),
        )
        .await
        .unwrap();
    let app = shoal_replica::http::router(replica.clone());
    // 128 rows of the slow model: about a second each.
    let heavy = json!({
        "inputs": [{"name": "input", "shape": [128, 64], "datatype": "FP32", "data": vec![0.5f32; 128 * 64]}],
    })
    .to_string();
    let running = {
        let (app, body) = (app.clone(), heavy.clone());
        tokio::spawn(async move { post(&app, body).await })
    };
    let pool = replica.pool().clone();
    eventually("one inference running", Duration::from_secs(30), || {
        let stats = pool.stats();
        async move { (stats.running == 1).then_some(()) }
    })
    .await;
    let waiting = {
        let (app, body) = (app.clone(), heavy.clone());
        tokio::spawn(async move { post(&app, body).await })
    };
    eventually("one inference queued", Duration::from_secs(30), || {
        let stats = pool.stats();
        async move { (stats.queued == 1).then_some(()) }
    })
    .await;

    // Full: refused unread, whatever the body.
    let (status, headers, body) = post(&app, "this is not JSON".into()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert!(body.contains("overloaded"), "{body}");

    // The two admitted before it are answered.
    for task in [running, waiting] {
        let (status, _, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Room again: the body is read, and what is wrong with it is said.
    let (status, _, body) = post(&app, "this is not JSON".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let metrics = replica.encode_metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("model_predictions_total")
                && l.contains("overloaded")
                && l.ends_with(" 1")),
        "{metrics}"
    );
}
