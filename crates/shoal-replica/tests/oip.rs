//! The replica's HTTP surface called in-process (router as a tower service,
//! no socket): every OIP endpoint's response shape, predictions against the
//! held-out digits, every bad-input case, metrics and the admin API.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use shoal_core::{ModelName, Version};
use shoal_replica::store::InstallPolicy;
use shoal_replica::{ArtifactSource, LoadSpec, Replica, ReplicaConfig};
use shoal_runtime::LoadOptions;
use shoal_runtime::tract::TractBackend;
use shoal_testkit::{Reply, Samples, call_router, model_path};

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Reply {
    call_router(app, method, uri, headers, body).await
}

async fn get(app: &Router, uri: &str) -> Reply {
    call(app, Method::GET, uri, &[], Body::empty()).await
}

async fn post(app: &Router, uri: &str, body: impl Into<String>) -> Reply {
    call(
        app,
        Method::POST,
        uri,
        &[("content-type", "application/json")],
        body.into(),
    )
    .await
}

fn spec(model: &str, version: &str, file: &str) -> LoadSpec {
    LoadSpec {
        model: ModelName::new(model).unwrap(),
        version: Version::new(version).unwrap(),
        source: ArtifactSource::Path(model_path(file)),
        sha256: None,
        options: LoadOptions::default(),
    }
}

async fn replica_with(
    config: ReplicaConfig,
    models: &[(&str, &str, &str)],
) -> (Arc<Replica>, Router) {
    let replica = Arc::new(Replica::new(
        "r-test".into(),
        Arc::new(TractBackend::default()),
        &config,
    ));
    for (m, v, f) in models {
        replica
            .load(spec(m, v, f), InstallPolicy::default())
            .await
            .unwrap();
    }
    let app = shoal_replica::http::router(replica.clone());
    (replica, app)
}

async fn digits_replica() -> (Arc<Replica>, Router) {
    replica_with(
        ReplicaConfig::default(),
        &[("digits", "1", "digits-v1.onnx")],
    )
    .await
}

#[tokio::test]
async fn server_endpoints() {
    let (replica, app) = digits_replica().await;
    let r = get(&app, "/v2").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["name"], "shoal");
    assert!(v["version"].is_string());
    assert!(v["extensions"].is_array());

    assert_eq!(get(&app, "/v2/health/live").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/v2/health/ready").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/ready").await.json()["ready"], true);

    // Requiring a version that is not loaded makes the replica unready,
    // and /ready says what is missing.
    replica.require(vec![(
        ModelName::new("digits").unwrap(),
        Version::new("2").unwrap(),
    )]);
    assert_eq!(
        get(&app, "/v2/health/ready").await.status,
        StatusCode::BAD_REQUEST
    );
    let r = get(&app, "/ready").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["missing"], json!(["digits:2"]));
    replica.begin_shutdown();
    replica.require(vec![]);
    assert_eq!(get(&app, "/ready").await.json()["shutting_down"], true);
    assert_eq!(
        get(&app, "/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn model_metadata_and_readiness() {
    let (_replica, app) = digits_replica().await;
    let expected = json!({
        "name": "digits",
        "versions": ["1"],
        "platform": "tract_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]}
        ]
    });
    assert_eq!(get(&app, "/v2/models/digits").await.json(), expected);
    assert_eq!(
        get(&app, "/v2/models/digits/versions/1").await.json(),
        expected
    );
    let r = get(&app, "/v2/models/digits/ready").await;
    assert_eq!(
        (r.status, r.json()),
        (StatusCode::OK, json!({"name": "digits", "ready": true}))
    );
    assert_eq!(
        get(&app, "/v2/models/digits/versions/1/ready").await.status,
        StatusCode::OK
    );

    let r = get(&app, "/v2/models/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.error(),
        "unknown model \"nope\"; this replica serves digits"
    );
    let r = get(&app, "/v2/models/digits/versions/9/ready").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.error(),
        "model \"digits\" has no version \"9\" loaded; loaded versions: 1"
    );
}

#[tokio::test]
async fn predictions_match_held_out_labels() {
    let (_replica, app) = digits_replica().await;
    let samples = Samples::load();
    let n = samples.labels.len();
    let r = post(&app, "/v2/models/digits/infer", samples.request(0..n)).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.headers["x-shoal-replica"], "r-test");
    assert_eq!(r.headers["x-shoal-model-version"], "1");
    assert_eq!(r.headers["content-type"], "application/json");
    let v = r.json();
    assert_eq!(v["model_name"], "digits");
    assert_eq!(v["model_version"], "1");
    assert!(v.get("id").is_none(), "no id was sent, none is echoed");
    let outputs = v["outputs"].as_array().unwrap();
    assert_eq!(outputs[0]["name"], "probabilities");
    assert_eq!(outputs[0]["datatype"], "FP32");
    assert_eq!(outputs[0]["shape"], json!([n, 10]));
    assert_eq!(outputs[1]["name"], "label");
    assert_eq!(outputs[1]["datatype"], "INT64");
    let labels: Vec<i64> = outputs[1]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let correct = labels
        .iter()
        .zip(&samples.labels)
        .filter(|(a, b)| a == b)
        .count();
    #[allow(clippy::cast_precision_loss)]
    let accuracy = correct as f64 / n as f64;
    #[allow(clippy::cast_precision_loss)]
    let tolerance = 1.0 / n as f64 + 1e-9;
    assert!(
        (accuracy - samples.accuracy["digits-v1"]).abs() <= tolerance,
        "accuracy {accuracy}"
    );
}

#[tokio::test]
async fn request_options_are_honoured() {
    let (_replica, app) = digits_replica().await;
    let samples = Samples::load();
    // Nested data, an id to echo, and one selected output, on the versioned path.
    let body = json!({
        "id": "req-42",
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [samples.inputs[0], samples.inputs[1]]}],
        "outputs": [{"name": "label"}]
    });
    let r = post(&app, "/v2/models/digits/versions/1/infer", body.to_string()).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["id"], "req-42");
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(v["outputs"][0]["name"], "label");
    assert_eq!(v["outputs"][0]["shape"], json!([2]));
    // Triton's client asks for outputs with parameters; they are accepted.
    let body = json!({
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": samples.inputs[0], "parameters": {}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": false}}, {"name": "label"}],
        "parameters": {}
    });
    let v = post(&app, "/v2/models/digits/infer", body.to_string())
        .await
        .json();
    let names: Vec<&str> = v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["probabilities", "label"]);
}

#[tokio::test]
async fn multiple_inputs_and_outputs() {
    let (_replica, app) = replica_with(
        ReplicaConfig::default(),
        &[("vad", "1", "silero_vad_16k_sequence.onnx")],
    )
    .await;
    let meta = get(&app, "/v2/models/vad").await.json();
    assert_eq!(meta["inputs"].as_array().unwrap().len(), 3);
    let frames = 3;
    #[allow(clippy::cast_precision_loss)]
    let audio: Vec<f32> = (0..frames * 576)
        .map(|i| ((i as f32) * 0.05).sin() * 0.3)
        .collect();
    let body = json!({
        "inputs": [
            {"name": "c", "shape": [1, 1, 128], "datatype": "FP32", "data": vec![0.0; 128]},
            {"name": "input", "shape": [frames, 576], "datatype": "FP32", "data": audio},
            {"name": "h", "shape": [1, 1, 128], "datatype": "FP32", "data": vec![0.0; 128]}
        ]
    });
    let r = post(&app, "/v2/models/vad/infer", body.to_string()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    let outputs: Vec<(String, Value)> = v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["name"].as_str().unwrap().to_owned(), o["shape"].clone()))
        .collect();
    assert_eq!(
        outputs,
        vec![
            ("speech_probs".into(), json!([3])),
            ("hn".into(), json!([1, 1, 128])),
            ("cn".into(), json!([1, 1, 128]))
        ]
    );
}

/// Each bad request gets the right status and a message naming the problem,
/// and a good request afterwards still works.
#[tokio::test]
async fn bad_input_gets_a_clear_error_and_harms_nothing() {
    let config = ReplicaConfig {
        body_limit: 64 * 1024,
        limits: shoal_oip::Limits {
            max_elements: 64 * 100,
        },
        ..ReplicaConfig::default()
    };
    let (replica, app) = replica_with(config, &[("digits", "1", "digits-v1.onnx")]).await;
    let samples = Samples::load();
    let good = samples.request(0..1);
    let input = |name: &str, shape: Value, dt: &str, data: Value| {
        json!({"inputs": [{"name": name, "shape": shape, "datatype": dt, "data": data}]})
            .to_string()
    };
    let zeros = |n: usize| json!(vec![0.0; n]);
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        ("/v2/models/digits/infer", "{not json".into(), StatusCode::BAD_REQUEST, "invalid inference request: key must be a string"),
        ("/v2/models/digits/infer", "".into(), StatusCode::BAD_REQUEST, "invalid inference request: EOF while parsing"),
        ("/v2/models/digits/infer", "[1,2]".into(), StatusCode::BAD_REQUEST, "the body must be a JSON object"),
        ("/v2/models/digits/infer", r#"{"inputs": 5}"#.into(), StatusCode::BAD_REQUEST, "invalid type: integer `5`, expected a sequence"),
        ("/v2/models/unknown/infer", good.clone(), StatusCode::NOT_FOUND, "unknown model \"unknown\"; this replica serves digits"),
        ("/v2/models/digits/versions/7/infer", good.clone(), StatusCode::NOT_FOUND, "model \"digits\" has no version \"7\" loaded"),
        ("/v2/models/digits/infer", input("pixels", json!([1, 64]), "FP32", zeros(64)), StatusCode::BAD_REQUEST, "unknown input \"pixels\"; the model's inputs are \"input\""),
        ("/v2/models/digits/infer", input("input", json!([1, 64]), "INT64", json!(vec![0; 64])), StatusCode::BAD_REQUEST, "input \"input\" has datatype INT64 but the model expects FP32"),
        ("/v2/models/digits/infer", input("input", json!([1, 32]), "FP32", zeros(32)), StatusCode::BAD_REQUEST, "dimension 1 must be 64, not 32"),
        ("/v2/models/digits/infer", input("input", json!([64]), "FP32", zeros(64)), StatusCode::BAD_REQUEST, "it must have 2 dimensions, not 1"),
        ("/v2/models/digits/infer", input("input", json!([1, 64]), "FP32", zeros(63)), StatusCode::BAD_REQUEST, "\"data\" has 63 elements but the shape holds 64"),
        ("/v2/models/digits/infer", input("input", json!([1, 64]), "FP32", json!(vec!["x"; 64])), StatusCode::BAD_REQUEST, "element 0: expected a number, found a string"),
        ("/v2/models/digits/infer", input("input", json!([-1, 64]), "FP32", zeros(64)), StatusCode::BAD_REQUEST, "has a negative dimension"),
        ("/v2/models/digits/infer", input("input", json!([1, 64]), "FLOAT32", zeros(64)), StatusCode::BAD_REQUEST, "unknown datatype \"FLOAT32\""),
        ("/v2/models/digits/infer", input("input", json!([101, 64]), "FP32", zeros(101 * 64)), StatusCode::BAD_REQUEST, "holds more elements than the server accepts in one request (6400)"),
        ("/v2/models/digits/infer", input("input", json!([1_000_000_000_000u64, 64]), "FP32", zeros(1)), StatusCode::BAD_REQUEST, "holds more elements than the server accepts"),
        ("/v2/models/digits/infer", json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": samples.inputs[0]}], "outputs": [{"name": "logits"}]}).to_string(), StatusCode::BAD_REQUEST, "unknown output \"logits\"; the model's outputs are \"probabilities\", \"label\""),
        ("/v2/models/digits/infer", format!("{{\"inputs\": [], \"pad\": \"{}\"}}", "x".repeat(70 * 1024)), StatusCode::PAYLOAD_TOO_LARGE, "larger than the limit of 65536 bytes"),
        ("/v2/models/a%20b/infer", good.clone(), StatusCode::NOT_FOUND, "unknown model \"a b\""),
        ("/v2/models/%ff/infer", good.clone(), StatusCode::BAD_REQUEST, "bad path"),
        ("/v2/models/digits/infer", input("input", json!([1, 64]), "FP32", json!(vec![1e39; 64])), StatusCode::BAD_REQUEST, "input \"input\" element 0 is inf: FP32 inputs must be finite numbers"),
    ];
    for (uri, body, status, message) in cases {
        let r = post(&app, uri, body.clone()).await;
        let error = r.error();
        assert_eq!(
            r.status,
            status,
            "{uri} {}: {error}",
            &body[..body.len().min(80)]
        );
        assert!(
            error.contains(message),
            "{uri}: {error:?} should contain {message:?}"
        );
    }
    // Triton's binary extension: a JSON part longer than the body, or a
    // length that is not a number, is refused with the reason.
    for (length, message) in [
        ("100000", "the body has only"),
        ("ten", "length of the JSON part"),
    ] {
        let r = call(
            &app,
            Method::POST,
            "/v2/models/digits/infer",
            &[("inference-header-content-length", length)],
            good.clone(),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.error().contains(message), "{}", r.error());
    }
    // Wrong method and unknown route are JSON errors too.
    let r = get(&app, "/v2/models/digits/infer").await;
    assert_eq!(
        (r.status, r.error()),
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "GET is not allowed on /v2/models/digits/infer".to_owned()
        )
    );
    let r = get(&app, "/v3").await;
    assert_eq!(
        (r.status, r.error()),
        (StatusCode::NOT_FOUND, "no route for GET /v3".to_owned())
    );

    // Nothing was harmed: the model still answers.
    let r = post(&app, "/v2/models/digits/infer", good).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(get(&app, "/ready").await.json()["ready"].as_bool().unwrap());
    let metrics = replica.encode_metrics();
    assert!(metrics.contains(r#"model_predictions_total{model="digits",model_version="1",replica_id="r-test",outcome="success"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"outcome="invalid_input"} 18"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let (_replica, app) = digits_replica().await;
    post(
        &app,
        "/v2/models/digits/infer",
        Samples::load().request(0..3),
    )
    .await;
    let r = get(&app, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = r.text();
    for needle in [
        "# TYPE model_predictions counter",
        r#"model_predictions_total{model="digits",model_version="1",replica_id="r-test",outcome="success"} 1"#,
        "# TYPE model_prediction_latency_seconds histogram",
        r#"model_prediction_latency_seconds_count{model="digits",model_version="1"} 1"#,
        r#"model_version_loaded{model="digits",model_version="1"} 1"#,
        r#"model_loads_total{model="digits",outcome="success"} 1"#,
        "inference_pool_running 0",
        "# EOF",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

const ADMIN: &str = "shoal_test_admin_token";

#[tokio::test]
async fn admin_loads_verifies_and_switches() {
    let config = ReplicaConfig {
        admin_tokens: vec![ADMIN.into()],
        ..ReplicaConfig::default()
    };
    let (replica, app) = replica_with(config, &[("digits", "1", "digits-v1.onnx")]).await;
    let bearer = format!("Bearer {ADMIN}");
    let put = |uri: &'static str, body: Value| {
        let (app, bearer) = (app.clone(), bearer.clone());
        async move {
            call(
                &app,
                Method::PUT,
                uri,
                &[
                    ("content-type", "application/json"),
                    ("authorization", &bearer),
                ],
                body.to_string(),
            )
            .await
        }
    };
    let v2_path = model_path("digits-v2.onnx");
    let v2_sha = shoal_replica::sha256_hex(&std::fs::read(&v2_path).unwrap());

    // A wrong checksum is refused; v1 keeps serving.
    let r = put(
        "/admin/models/digits/versions/2",
        json!({"path": v2_path, "sha256": "0".repeat(64)}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.error().contains(&format!(
            "integrity check failed: expected sha256 {}, the artifact has {v2_sha}",
            "0".repeat(64)
        )),
        "{}",
        r.error()
    );
    assert!(r.error().ends_with("the serving version is unchanged"));
    assert_eq!(
        post(
            &app,
            "/v2/models/digits/infer",
            Samples::load().request(0..1)
        )
        .await
        .headers["x-shoal-model-version"],
        "1"
    );

    // Not a model, a missing file, a malformed checksum, a bad body.
    let garbage = std::env::temp_dir().join(format!("shoal-garbage-{}.onnx", std::process::id()));
    std::fs::write(&garbage, b"this is not an onnx file").unwrap();
    let garbage_sha = shoal_replica::sha256_hex(b"this is not an onnx file");
    let r = put(
        "/admin/models/digits/versions/2",
        json!({"path": garbage, "sha256": garbage_sha}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.error().starts_with("cannot parse the model"),
        "{}",
        r.error()
    );
    std::fs::remove_file(&garbage).unwrap();
    let r = put(
        "/admin/models/digits/versions/2",
        json!({"path": "/nonexistent/m.onnx", "sha256": v2_sha}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.error()
            .starts_with("cannot read model file /nonexistent/m.onnx"),
        "{}",
        r.error()
    );
    let r = put(
        "/admin/models/digits/versions/2",
        json!({"path": v2_path, "sha256": "abc"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = put("/admin/models/digits/versions/2", json!({"pth": v2_path})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("unknown field `pth`"), "{}", r.error());
    let r = put(
        "/admin/models/digits/versions/..%2F2",
        json!({"path": v2_path, "sha256": v2_sha}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Loading by path without the digest is refused before the file is read.
    let r = put("/admin/models/digits/versions/2", json!({"path": v2_path})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("needs its sha256"), "{}", r.error());
    assert_eq!(
        post(
            &app,
            "/v2/models/digits/infer",
            Samples::load().request(0..1)
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        replica
            .encode_metrics()
            .matches(r#"model_loads_total{model="digits",outcome="failure"} 4"#)
            .count(),
        1
    );

    // The right checksum loads, warms and switches; v1 is retired.
    let r = put(
        "/admin/models/digits/versions/2",
        json!({"path": v2_path, "sha256": v2_sha}),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    assert_eq!(
        (v["version"].as_str(), v["sha256"].as_str()),
        (Some("2"), Some(v2_sha.as_str()))
    );
    assert_eq!(v["retired"], json!(["1"]));
    assert_eq!(
        post(
            &app,
            "/v2/models/digits/infer",
            Samples::load().request(0..1)
        )
        .await
        .headers["x-shoal-model-version"],
        "2"
    );
    assert!(
        replica.store().draining().is_empty(),
        "nothing held v1, so it is freed at once"
    );

    // Load v1 beside v2 without switching; pin by version; switch default.
    let v1_path = model_path("digits-v1.onnx");
    let v1_sha = shoal_replica::sha256_hex(&std::fs::read(&v1_path).unwrap());
    let r = put(
        "/admin/models/digits/versions/1",
        json!({"path": v1_path, "sha256": v1_sha, "default": false, "retire_others": false}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        get(&app, "/v2/models/digits").await.json()["versions"],
        json!(["1", "2"])
    );
    assert_eq!(
        post(
            &app,
            "/v2/models/digits/infer",
            Samples::load().request(0..1)
        )
        .await
        .headers["x-shoal-model-version"],
        "2"
    );
    assert_eq!(
        post(
            &app,
            "/v2/models/digits/versions/1/infer",
            Samples::load().request(0..1)
        )
        .await
        .headers["x-shoal-model-version"],
        "1"
    );
    let r = put("/admin/models/digits/default", json!({"version": "1"})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        post(
            &app,
            "/v2/models/digits/infer",
            Samples::load().request(0..1)
        )
        .await
        .headers["x-shoal-model-version"],
        "1"
    );
    let listing = call(
        &app,
        Method::GET,
        "/admin/models",
        &[("authorization", &bearer)],
        Body::empty(),
    )
    .await
    .json();
    assert_eq!(listing["models"][0]["default"], "1");
    assert_eq!(
        listing["models"][0]["versions"].as_array().unwrap().len(),
        2
    );

    // Unload the default: the other version takes over.
    let r = call(
        &app,
        Method::DELETE,
        "/admin/models/digits/versions/1",
        &[("authorization", &bearer)],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        post(
            &app,
            "/v2/models/digits/infer",
            Samples::load().request(0..1)
        )
        .await
        .headers["x-shoal-model-version"],
        "2"
    );
    let r = call(
        &app,
        Method::DELETE,
        "/admin/models/digits/versions/1",
        &[("authorization", &bearer)],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_admin_api_needs_a_token_and_faults_need_the_flag() {
    let with_token = ReplicaConfig {
        admin_tokens: vec![ADMIN.into()],
        ..ReplicaConfig::default()
    };
    let (_, app) = replica_with(with_token, &[("digits", "1", "digits-v1.onnx")]).await;
    let v2 = model_path("digits-v2.onnx");
    let body = json!({"path": v2, "sha256": "0".repeat(64)}).to_string();
    let json_ct = ("content-type", "application/json");
    let uri = "/admin/models/digits/versions/2";
    // No token, a wrong one, a malformed header: 401, in JSON, and nothing loads.
    for auth in [None, Some("Bearer nope"), Some("Basic abc")] {
        let headers: Vec<(&str, &str)> = [json_ct]
            .into_iter()
            .chain(auth.map(|a| ("authorization", a)))
            .collect();
        let r = call(&app, Method::PUT, uri, &headers, body.clone()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert!(!r.error().is_empty());
        assert!(r.headers.contains_key("www-authenticate"));
        let r = call(
            &app,
            Method::GET,
            "/admin/models",
            &headers[1..],
            Body::empty(),
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
    }
    // Inference, health and metrics stay open.
    for uri in ["/health", "/ready", "/metrics", "/v2/models/digits"] {
        assert_eq!(get(&app, uri).await.status, StatusCode::OK, "{uri}");
    }
    // Faults are not even a route without --allow-fault-injection.
    let bearer = format!("Bearer {ADMIN}");
    let r = call(
        &app,
        Method::PUT,
        "/admin/faults/digits/1",
        &[json_ct, ("authorization", &bearer)],
        json!({"hang": true}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let allowed = ReplicaConfig {
        admin_tokens: vec![ADMIN.into()],
        allow_fault_injection: true,
        ..ReplicaConfig::default()
    };
    let (replica, app) = replica_with(allowed, &[("digits", "1", "digits-v1.onnx")]).await;
    let fault = json!({"error_rate": 1.0}).to_string();
    let r = call(
        &app,
        Method::PUT,
        "/admin/faults/digits/1",
        &[json_ct],
        fault.clone(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "faults need the token too"
    );
    let r = call(
        &app,
        Method::PUT,
        "/admin/faults/digits/1",
        &[json_ct, ("authorization", &bearer)],
        fault,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(replica.faults().contains_key(&"digits:1".parse().unwrap()));
    // A standalone replica with no token: the listing gateways read is
    // open, everything else is off.
    let (_, app) = digits_replica().await;
    assert_eq!(get(&app, "/admin/models").await.status, StatusCode::OK);
    let r = call(&app, Method::PUT, uri, &[json_ct], body).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.error().contains("--admin-token-file"), "{}", r.error());
}

#[tokio::test]
async fn text_orientation_model_over_http() {
    let mut options = LoadOptions::default();
    options
        .input_shapes
        .insert("x".into(), vec![None, Some(3), Some(48), Some(192)]);
    let replica = Arc::new(Replica::new(
        "r".into(),
        Arc::new(TractBackend::default()),
        &ReplicaConfig::default(),
    ));
    let mut s = spec("ocr", "1", "ch_ppocr_mobile_v2.0_cls_infer.onnx");
    s.options = options;
    replica.load(s, InstallPolicy::default()).await.unwrap();
    let app = shoal_replica::http::router(replica);
    let meta = get(&app, "/v2/models/ocr").await.json();
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 3, 48, 192]));
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 2]));
    let body = json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32", "data": vec![0.5; 3 * 48 * 192]}]});
    let r = post(&app, "/v2/models/ocr/infer", body.to_string()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["outputs"][0]["shape"], json!([1, 2]));
}
