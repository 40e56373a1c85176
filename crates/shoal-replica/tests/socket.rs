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

/// One model's expensive requests cannot take a replica down for the
/// others: an oversized dynamic shape is refused with a 400 naming the
/// bound, and while a model's slow (valid) requests occupy it, a request
/// to another model is answered without waiting for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_models_slow_requests_cannot_starve_another() {
    let config = ReplicaConfig {
        id: Some("bounded".into()),
        models: vec![
            ModelSpec {
                name: "digits".parse().unwrap(),
                version: "1".parse().unwrap(),
                path: model_path("digits-v1.onnx"),
            },
            // Height and width left dynamic: any image size is a valid request.
            ModelSpec {
                name: "ocr".parse().unwrap(),
                version: "1".parse().unwrap(),
                path: model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            },
        ],
        threads: Some(2),
        ..ReplicaConfig::default()
    };
    let server = ReplicaServer::start(config, Arc::new(TractBackend::default()))
        .await
        .unwrap();
    server.replica.wait_ready().await;
    let base = format!("http://{}", server.addr);
    let http = HttpClient::new();
    let image = |n: usize, h: usize, w: usize| {
        serde_json::json!({"inputs": [{"name": "x", "shape": [n, 3, h, w], "datatype": "FP32",
            "data": vec![0.5f32; n * 3 * h * w]}]})
        .to_string()
    };

    // A million pixels wide: refused before it runs, naming the bound.
    let r = http
        .post_json(
            &format!("{base}/v2/models/ocr/infer"),
            image(1, 1, 1_000_000),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let error = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("dimension 3 is 1000000, over this model's bound of 4096"),
        "{error}"
    );

    // Slow but valid: wide images, more of them than the replica has threads.
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let (http, url, body) = (
                http.clone(),
                format!("{base}/v2/models/ocr/infer"),
                image(8, 48, 2048),
            );
            let done = done.clone();
            tokio::spawn(async move {
                let status = http.post_json(&url, body).await.status;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                status
            })
        })
        .collect();
    let pool = server.replica.pool().clone();
    shoal_testkit::eventually(
        "the slow requests to occupy the replica",
        std::time::Duration::from_secs(20),
        || {
            let stats = pool.stats();
            std::future::ready((stats.running >= 1 && stats.queued >= 1).then_some(()))
        },
    )
    .await;
    // The other model is served at once on the thread the slow model may
    // not take: it overtakes the slow requests still queued. (Without the
    // cap both threads would run slow requests, and digits would wait
    // behind the queue until two of them finished.) Either no slow request
    // has finished yet, or slow work is still queued when digits answers —
    // not a race against the clock: the queue holds work for two slow
    // requests' time.
    let r = http
        .post_json(
            &format!("{base}/v2/models/digits/infer"),
            Samples::load().request(0..1),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let queued = pool.stats().queued;
    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        finished == 0 || queued >= 1,
        "digits waited for the slow requests: {finished} finished, {queued} still queued"
    );
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    server.stop().await.unwrap();
}
