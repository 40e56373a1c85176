//! The control plane's API called in-process: registry flows, bad requests
//! with clear errors, conditional polling, and the OpenAPI document
//! covering every route.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use shoal_control::{Control, ControlConfig};
use shoal_testkit::{TempDir, model_bytes};
use tower::ServiceExt;

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Value,
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = app
        .clone()
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

async fn json_call(app: &Router, method: Method, uri: &str, body: Value) -> Reply {
    call(
        app,
        method,
        uri,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

async fn setup(tmp: &TempDir, upload_limit: u64) -> (Arc<Control>, Router) {
    let config = ControlConfig {
        data_dir: tmp.0.clone(),
        upload_limit,
        ..ControlConfig::default()
    };
    let control = Control::open(config).await.unwrap();
    let app = shoal_control::api::router(control.clone());
    (control, app)
}

async fn upload(app: &Router, file: &str) -> String {
    let r = call(
        app,
        Method::PUT,
        "/api/v1/artifacts",
        &[],
        model_bytes(file),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    r.body["sha256"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn push_register_deploy_and_poll() {
    let tmp = TempDir::new("control-api");
    let (control, app) = setup(&tmp, 1 << 30).await;
    let sha = upload(&app, "digits-v1.onnx").await;
    // Uploading the same bytes again stores nothing new.
    let again = call(
        &app,
        Method::PUT,
        "/api/v1/artifacts",
        &[],
        model_bytes("digits-v1.onnx"),
    )
    .await;
    assert_eq!(
        (
            again.body["sha256"].as_str(),
            again.body["new_chunks"].as_u64()
        ),
        (Some(sha.as_str()), Some(0))
    );

    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/models/digits/versions",
        json!({"sha256": sha, "labels": {"team": "a"}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["version"], "1");
    assert_eq!(r.body["size"], 5541);
    assert_eq!(r.body["status"], "registered");

    let reg = json!({"id": "r1", "address": "127.0.0.1:1", "region": "eu"});
    assert_eq!(
        json_call(&app, Method::POST, "/api/v1/replicas", reg)
            .await
            .status,
        StatusCode::OK
    );
    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/deployments/digits",
        json!({"version": "1"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["rollout"]["state"], "progressing");

    // Desired state names the version and its digest; a second poll with
    // the revision as ETag costs a 304.
    let r = call(
        &app,
        Method::GET,
        "/api/v1/replicas/r1/desired",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.body["models"][0]["versions"][0]["sha256"], sha.as_str());
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    let r = call(
        &app,
        Method::GET,
        "/api/v1/replicas/r1/desired",
        &[("if-none-match", &etag)],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);

    // The replica reports serving it; the controller promotes.
    let hb = json!({"serving": [{"model": "digits", "version": "1", "sha256": sha}], "applied_revision": 1, "ready": true});
    assert_eq!(
        json_call(&app, Method::POST, "/api/v1/replicas/r1/heartbeat", hb)
            .await
            .status,
        StatusCode::OK
    );
    control.tick().await.unwrap();
    let r = call(
        &app,
        Method::GET,
        "/api/v1/rollouts/digits",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.body["state"], "promoted", "{}", r.body);
    let r = call(
        &app,
        Method::GET,
        "/api/v1/models/digits",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.body["model"]["production"], "1");
    let status = call(&app, Method::GET, "/api/v1/status", &[], Body::empty()).await;
    assert_eq!(status.body["replicas"][0]["skew"], false);
    assert_eq!(status.body["replicas"][0]["healthy"], true);
    let audit = call(&app, Method::GET, "/api/v1/audit", &[], Body::empty()).await;
    let actions: Vec<&str> = audit
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in [
        "version.create",
        "replica.register",
        "deploy",
        "deploy.promoted",
    ] {
        assert!(actions.contains(&a), "{actions:?}");
    }
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let tmp = TempDir::new("control-bad");
    let (_control, app) = setup(&tmp, 10_000).await;
    let sha = upload(&app, "digits-v1.onnx").await;
    let cases: Vec<(Method, &str, Value, StatusCode, &str)> = vec![
        (
            Method::POST,
            "/api/v1/models/digits/versions",
            json!({"sha256": "0".repeat(64)}),
            StatusCode::NOT_FOUND,
            "upload it first",
        ),
        (
            Method::POST,
            "/api/v1/models/digits/versions",
            json!({"sha256": "nothex"}),
            StatusCode::BAD_REQUEST,
            "is not a hex SHA-256",
        ),
        (
            Method::POST,
            "/api/v1/models/bad%20name/versions",
            json!({"sha256": sha}),
            StatusCode::BAD_REQUEST,
            "model name \"bad name\" may only contain",
        ),
        (
            Method::POST,
            "/api/v1/models/digits/versions",
            json!({"sha256": sha, "version": "../x"}),
            StatusCode::BAD_REQUEST,
            "version \"../x\"",
        ),
        (
            Method::POST,
            "/api/v1/models/digits/versions",
            json!({"sha": sha}),
            StatusCode::BAD_REQUEST,
            "unknown field `sha`",
        ),
        (
            Method::POST,
            "/api/v1/deployments/digits",
            json!({"version": "9"}),
            StatusCode::NOT_FOUND,
            "has no version \"9\"",
        ),
        (
            Method::POST,
            "/api/v1/deployments/digits",
            json!({"version": "1", "strategy": "yolo"}),
            StatusCode::BAD_REQUEST,
            "unknown variant `yolo`",
        ),
        (
            Method::POST,
            "/api/v1/models/digits/rollback",
            json!({}),
            StatusCode::NOT_FOUND,
            "not deployed",
        ),
        (
            Method::POST,
            "/api/v1/replicas/ghost/heartbeat",
            json!({"serving": [], "applied_revision": 0}),
            StatusCode::NOT_FOUND,
            "register first",
        ),
        (
            Method::POST,
            "/api/v1/replicas",
            json!({"id": "", "address": "a", "region": "r"}),
            StatusCode::BAD_REQUEST,
            "must not be empty",
        ),
    ];
    for (method, uri, body, status, message) in cases {
        let r = json_call(&app, method.clone(), uri, body).await;
        let error = r.body["error"].as_str().unwrap_or_default().to_owned();
        assert_eq!(r.status, status, "{method} {uri}: {error}");
        assert!(
            error.contains(message),
            "{method} {uri}: {error:?} lacks {message:?}"
        );
    }
    // Versions are immutable: the same name twice is a conflict.
    let ok = json_call(
        &app,
        Method::POST,
        "/api/v1/models/digits/versions",
        json!({"sha256": sha, "version": "7"}),
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED);
    let dup = json_call(
        &app,
        Method::POST,
        "/api/v1/models/digits/versions",
        json!({"sha256": sha, "version": "7"}),
    )
    .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    // Deploying it twice, and rolling back with nothing to go back to.
    assert_eq!(
        json_call(
            &app,
            Method::POST,
            "/api/v1/deployments/digits",
            json!({"version": "7"})
        )
        .await
        .status,
        StatusCode::ACCEPTED
    );
    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/deployments/digits",
        json!({"version": "7"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // Strategy settings that make no sense are refused and change nothing.
    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/models/digits/versions",
        json!({"sha256": sha, "version": "8"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/rollouts/digits/abort",
        json!(null),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let before = json_call(&app, Method::GET, "/api/v1/deployments/digits", json!(null)).await;
    for (body, message) in [
        (
            json!({"version": "8", "strategy": "canary", "steps": [5, 50, 100], "bakes_secs": [10]}),
            "give one bake time per step before 100% (2 for steps [5, 50, 100])",
        ),
        (
            json!({"version": "8", "strategy": "canary", "steps": [50, 10]}),
            "steps must be increasing",
        ),
        (
            json!({"version": "8", "strategy": "shadow", "percent": 0}),
            "percent must be between 1 and 100",
        ),
        (
            json!({"version": "8", "strategy": "bandit", "against": ["42"]}),
            "has no version \"42\"",
        ),
    ] {
        let r = json_call(
            &app,
            Method::POST,
            "/api/v1/deployments/digits",
            body.clone(),
        )
        .await;
        let error = r.body["error"].as_str().unwrap_or_default().to_owned();
        assert!(r.status.is_client_error(), "{body}: {}", r.status);
        assert!(
            error.contains(message),
            "{body}: {error:?} lacks {message:?}"
        );
    }
    let d = json_call(&app, Method::GET, "/api/v1/deployments/digits", json!(null)).await;
    assert_eq!(d.body, before.body);
    // Uploads: empty, and over the limit.
    let r = call(&app, Method::PUT, "/api/v1/artifacts", &[], Body::empty()).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("the artifact is empty"))
    );
    let r = call(
        &app,
        Method::PUT,
        "/api/v1/artifacts",
        &[],
        model_bytes("digits-v2.onnx"),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("upload limit of 10000 bytes")
    );
    let r = call(
        &app,
        Method::GET,
        "/api/v1/chunks/..%2Fetc",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Nothing harmed: the registry still answers.
    assert_eq!(
        call(&app, Method::GET, "/api/v1/models", &[], Body::empty())
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn manifests_travel_zstd_compressed_to_clients_that_accept_it() {
    let tmp = TempDir::new("control-manifest");
    let (_control, app) = setup(&tmp, 1 << 30).await;
    let sha = upload(&app, "digits-slow.onnx").await;
    let uri = format!("/api/v1/artifacts/{sha}/manifest");
    let raw = |accept: Option<&'static str>| {
        let app = app.clone();
        let uri = uri.clone();
        async move {
            let mut req = Request::builder().uri(uri);
            if let Some(a) = accept {
                req = req.header("accept-encoding", a);
            }
            let response = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let encoding = response
                .headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap().to_owned());
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (encoding, bytes)
        }
    };
    let (plain_encoding, plain) = raw(None).await;
    assert_eq!(plain_encoding, None);
    let manifest: Value = serde_json::from_slice(&plain).unwrap();
    assert_eq!(manifest["sha256"], sha.as_str());
    let (encoding, compressed) = raw(Some("gzip, zstd;q=1.0")).await;
    assert_eq!(encoding.as_deref(), Some("zstd"));
    assert!(
        compressed.len() < plain.len(),
        "{} >= {}",
        compressed.len(),
        plain.len()
    );
    assert_eq!(zstd::bulk::decompress(&compressed, 1 << 20).unwrap(), plain);
    // Only for clients that ask.
    assert_eq!(raw(Some("gzip")).await.0, None);
}

#[tokio::test]
async fn openapi_document_covers_every_route() {
    let tmp = TempDir::new("control-openapi");
    let (_control, app) = setup(&tmp, 1 << 20).await;
    let doc = call(
        &app,
        Method::GET,
        "/api/v1/openapi.json",
        &[],
        Body::empty(),
    )
    .await
    .body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let source = include_str!("../src/api.rs");
    for line in source
        .lines()
        .filter(|l| l.trim_start().starts_with(".route(\"/api/v1/"))
    {
        let route = line.split('"').nth(1).unwrap();
        if route == "/api/v1/openapi.json" {
            continue;
        }
        assert!(paths.contains_key(route), "OpenAPI lacks {route}");
    }
}
