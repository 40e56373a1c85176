//! The control plane's API called in-process: registry flows, bad requests
//! with clear errors, conditional polling, the OpenAPI document covering
//! every route, and the dashboard's sign-in, stream and series.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use shoal_control::{Control, ControlConfig};
use shoal_testkit::{TempDir, call_router, model_bytes};
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
    let reply = call_router(app, method, uri, headers, body).await;
    Reply {
        body: serde_json::from_slice(&reply.body).unwrap_or(Value::Null),
        status: reply.status,
        headers: reply.headers,
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

/// A control plane in `tmp`, and its router as the first admin calls it:
/// every request without an `authorization` header gets the admin token
/// the control plane wrote at its first start.
async fn setup(tmp: &TempDir, upload_limit: u64) -> (Arc<Control>, Router) {
    let (control, app) = bare(tmp, upload_limit).await;
    let bearer = format!("Bearer {}", admin_token(tmp));
    let app = app.layer(axum::middleware::map_request(
        move |mut req: Request<Body>| {
            let bearer = bearer.clone();
            async move {
                if !req.headers().contains_key("authorization") {
                    req.headers_mut()
                        .insert("authorization", bearer.parse().unwrap());
                }
                req
            }
        },
    ));
    (control, app)
}

/// A control plane in `tmp` and its router as is.
async fn bare(tmp: &TempDir, upload_limit: u64) -> (Arc<Control>, Router) {
    let config = ControlConfig {
        data_dir: tmp.0.clone(),
        upload_limit,
        ..ControlConfig::default()
    };
    let control = Control::open(config).await.unwrap();
    let app = shoal_control::api::router(control.clone());
    (control, app)
}

fn admin_token(tmp: &TempDir) -> String {
    std::fs::read_to_string(tmp.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned()
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
    assert!(control.campaign().await, "the only member leads");
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

    // A replica that has seen a newer revision than the registry holds (a
    // control plane restored from an older backup) moves it past that;
    // an absurd one is refused and moves nothing.
    let revision = status.body["revision"].as_u64().unwrap();
    let ahead = |seen: u64| json!({"serving": [{"model": "digits", "version": "1", "sha256": sha}], "applied_revision": 1, "seen_revision": seen, "ready": true});
    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/replicas/r1/heartbeat",
        ahead(1 << 60),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/replicas/r1/heartbeat",
        ahead(revision + 5),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(control.revision(), revision + 6);
    let audit = call(
        &app,
        Method::GET,
        "/api/v1/audit?limit=1000",
        &[],
        Body::empty(),
    )
    .await;
    assert!(
        audit
            .body
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "revision.advance"),
        "{}",
        audit.body
    );
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
            "/api/v1/models/digits/versions",
            json!({"sha256": sha, "max_shapes": {"pixels": [1, 64]}}),
            StatusCode::BAD_REQUEST,
            "bounds name input \"pixels\", which the model does not have",
        ),
        (
            Method::POST,
            "/api/v1/models/digits/versions",
            json!({"sha256": sha, "max_shapes": {"input": [0, 64]}}),
            StatusCode::BAD_REQUEST,
            "must be -1 (the default bound) or at least 1",
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
    // Bounds that fit the model are kept with the version.
    let bounded = json_call(
        &app,
        Method::POST,
        "/api/v1/models/digits/versions",
        json!({"sha256": sha, "version": "b", "max_shapes": {"input": [16, -1]}}),
    )
    .await;
    assert_eq!(bounded.status, StatusCode::CREATED, "{}", bounded.body);
    assert_eq!(bounded.body["max_shapes"]["input"], json!([16, -1]));
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
            json!({"version": "8", "strategy": "canary", "steps": [5, 100], "bakes_secs": [-3]}),
            "each a non-negative number of seconds",
        ),
        (
            json!({"version": "8", "strategy": "canary", "bake_secs": -1}),
            "bake_secs must be a non-negative number of seconds",
        ),
        (
            json!({"version": "8", "strategy": "blue-green", "keep_warm_secs": 1e300}),
            "keep_warm_secs must be a non-negative number of seconds",
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

/// Every `/api/v1/` operation and the permission it needs (`None`: open).
/// The OpenAPI document must list exactly these, so a new route cannot
/// land without saying who may call it.
const ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("put", "/api/v1/artifacts", Some("deploy")),
    ("get", "/api/v1/artifacts/{sha256}/manifest", Some("fleet")),
    ("get", "/api/v1/chunks/{id}", Some("fleet")),
    ("get", "/api/v1/models", Some("read")),
    ("get", "/api/v1/models/{model}", Some("read")),
    ("post", "/api/v1/models/{model}/versions", Some("deploy")),
    (
        "get",
        "/api/v1/models/{model}/versions/{version}",
        Some("read"),
    ),
    (
        "put",
        "/api/v1/models/{model}/versions/{version}/options",
        Some("deploy"),
    ),
    ("post", "/api/v1/models/{model}/rollback", Some("deploy")),
    ("get", "/api/v1/deployments", Some("read")),
    ("get", "/api/v1/deployments/{model}", Some("read")),
    ("post", "/api/v1/deployments/{model}", Some("deploy")),
    ("put", "/api/v1/deployments/{model}/traffic", Some("deploy")),
    ("get", "/api/v1/deployments/{model}/scale", Some("read")),
    ("put", "/api/v1/deployments/{model}/scale", Some("deploy")),
    ("get", "/api/v1/scale", Some("read")),
    ("get", "/api/v1/rollouts/{model}", Some("read")),
    ("post", "/api/v1/rollouts/{model}/promote", Some("deploy")),
    ("post", "/api/v1/rollouts/{model}/abort", Some("deploy")),
    ("post", "/api/v1/gateways/{id}/report", Some("fleet")),
    ("post", "/api/v1/replicas", Some("fleet")),
    ("delete", "/api/v1/replicas/{id}", Some("admin")),
    ("post", "/api/v1/backups", Some("admin")),
    ("post", "/api/v1/replicas/{id}/heartbeat", Some("fleet")),
    ("get", "/api/v1/replicas/{id}/desired", Some("fleet")),
    ("get", "/api/v1/replicas/{id}/watch", Some("fleet")),
    ("get", "/api/v1/routing", Some("fleet")),
    ("get", "/api/v1/routing/watch", Some("fleet")),
    ("get", "/api/v1/rollouts/{model}/history", Some("read")),
    ("get", "/api/v1/stream", Some("read")),
    ("get", "/api/v1/status", Some("read")),
    ("get", "/api/v1/leader", Some("read")),
    ("get", "/api/v1/audit", Some("read")),
    ("post", "/api/v1/tokens", Some("admin")),
    ("get", "/api/v1/tokens", Some("admin")),
    ("delete", "/api/v1/tokens/{name}", Some("admin")),
    ("get", "/api/v1/auth/whoami", Some("any")),
];

/// A token `t-ROLE` for each role, created by the admin: (role, token).
async fn role_tokens<'a>(admin: &Router, roles: &[&'a str]) -> Vec<(&'a str, String)> {
    let mut tokens = Vec::new();
    for role in roles {
        let r = json_call(
            admin,
            Method::POST,
            "/api/v1/tokens",
            json!({"name": format!("t-{role}"), "role": role}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(r.body["role"], *role);
        tokens.push((*role, r.body["token"].as_str().unwrap().to_owned()));
    }
    tokens
}

/// The roles that may call an operation needing `permission`.
fn granted(permission: &str, role: &str) -> bool {
    matches!(
        (permission, role),
        ("any", _)
            | (_, "admin")
            | ("read", "viewer" | "deployer")
            | ("deploy", "deployer")
            | ("fleet", "fleet")
    )
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
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            documented.push((method.clone(), path.clone()));
            // Every path parameter is declared (generated clients and
            // fuzzers refuse operations that do not), every operation says
            // it needs the bearer token and lists 401 and 403.
            let declared: Vec<&str> = operation["parameters"]
                .as_array()
                .map(|p| {
                    p.iter()
                        .filter(|p| p["in"] == "path")
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            for name in path
                .split('/')
                .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
            {
                assert!(
                    declared.contains(&name),
                    "{method} {path} lacks parameter {name}"
                );
            }
            assert!(
                operation["security"].is_array(),
                "{method} {path}: {operation}"
            );
            for code in ["400", "401", "403"] {
                assert!(
                    operation["responses"].get(code).is_some(),
                    "{method} {path} does not list {code}"
                );
            }
        }
    }
    documented.sort();
    let mut table: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p, _)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    table.sort();
    assert_eq!(
        documented, table,
        "OpenAPI operations vs. the permission table"
    );
    // And the router serves no /api/v1/ path the document lacks.
    let source = include_str!("../src/api.rs");
    let router = &source[source.find("pub fn router(").unwrap()..];
    let router = &router[..router.find("\n}\n").unwrap()];
    for literal in router.split('"').filter(|s| s.starts_with("/api/v1/")) {
        if literal == "/api/v1/openapi.json" {
            continue;
        }
        assert!(
            table.iter().any(|(_, p)| p == literal),
            "the router serves {literal}, which the OpenAPI document lacks"
        );
    }
}

/// Every operation refuses no token (401) and a role without its
/// permission (403), in JSON, and lets the right roles through.
#[tokio::test]
async fn every_route_needs_a_token_with_the_right_role() {
    let tmp = TempDir::new("control-auth");
    let (_control, admin) = setup(&tmp, 1 << 20).await;
    let (_, app) = bare(&tmp, 1 << 20).await;
    let tokens = role_tokens(&admin, &["viewer", "deployer", "fleet", "admin"]).await;
    for (method, path, permission) in ROUTES {
        let permission = permission.unwrap();
        let uri = path
            .replace("{sha256}", &"0".repeat(64))
            .replace("{id}", "r1")
            .replace("{model}", "digits")
            .replace("{version}", "1")
            .replace("{name}", "nobody");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        // Watch streams never end: read the status, and a body only when
        // the request was refused.
        let send = |auth: Option<String>| {
            let (app, method, uri) = (app.clone(), method.clone(), uri.clone());
            async move {
                let mut req = Request::builder()
                    .method(method)
                    .uri(uri)
                    .header("content-type", "application/json");
                if let Some(a) = auth {
                    req = req.header("authorization", a);
                }
                let response = app
                    .oneshot(req.body(Body::from("{}")).unwrap())
                    .await
                    .unwrap();
                let status = response.status();
                let headers = response.headers().clone();
                let body = if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
                {
                    let bytes = response.into_body().collect().await.unwrap().to_bytes();
                    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
                } else {
                    Value::Null
                };
                Reply {
                    status,
                    headers,
                    body,
                }
            }
        };
        for auth in [
            None,
            Some("Bearer shoal_unknown".to_owned()),
            Some("Token x".to_owned()),
        ] {
            let r = send(auth.clone()).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {uri} with {auth:?}"
            );
            assert!(
                r.body["error"].as_str().is_some(),
                "{method} {uri}: {}",
                r.body
            );
            assert!(r.headers.contains_key("www-authenticate"));
        }
        for (role, token) in &tokens {
            let r = send(Some(format!("Bearer {token}"))).await;
            if granted(permission, role) {
                assert!(
                    r.status != StatusCode::UNAUTHORIZED && r.status != StatusCode::FORBIDDEN,
                    "{method} {uri} refused {role}: {} {}",
                    r.status,
                    r.body
                );
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::FORBIDDEN,
                    "{method} {uri} let {role} in"
                );
                let error = r.body["error"].as_str().unwrap();
                assert!(
                    error.contains(&format!("has role {role}")) && error.contains("this needs"),
                    "{error}"
                );
            }
        }
    }
    // Health, readiness, metrics and the API document stay open.
    for uri in ["/health", "/ready", "/metrics", "/api/v1/openapi.json"] {
        let r = call(&app, Method::GET, uri, &[], Body::empty()).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
    }
}

#[tokio::test]
async fn tokens_are_named_in_the_audit_log_and_stop_working_when_revoked() {
    let tmp = TempDir::new("control-tokens");
    let (_control, admin) = setup(&tmp, 1 << 20).await;
    let (_, app) = bare(&tmp, 1 << 20).await;
    let created = json_call(
        &admin,
        Method::POST,
        "/api/v1/tokens",
        json!({"name": "ci-bot", "role": "deployer"}),
    )
    .await;
    let bearer = format!("Bearer {}", created.body["token"].as_str().unwrap());
    // Only the hash is stored: the secret appears nowhere in the data directory.
    let secret = created.body["token"].as_str().unwrap().to_owned();
    for entry in std::fs::read_dir(&tmp.0).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds the secret",
                path.display()
            );
        }
    }
    let r = call(
        &app,
        Method::PUT,
        "/api/v1/artifacts",
        &[("authorization", &bearer)],
        model_bytes("digits-v1.onnx"),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let sha = r.body["sha256"].as_str().unwrap().to_owned();
    let r = call(
        &app,
        Method::POST,
        "/api/v1/models/digits/versions",
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        json!({"sha256": sha}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let whoami = call(
        &app,
        Method::GET,
        "/api/v1/auth/whoami",
        &[("authorization", &bearer)],
        Body::empty(),
    )
    .await;
    assert_eq!(whoami.body, json!({"name": "ci-bot", "role": "deployer"}));
    let audit = call(&admin, Method::GET, "/api/v1/audit", &[], Body::empty()).await;
    let created_version = audit
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "version.create")
        .unwrap()
        .clone();
    assert_eq!(created_version["actor"], "ci-bot");
    assert!(audit.body.as_array().unwrap().iter().any(|e| {
        e["action"] == "token.create" && e["target"] == "ci-bot" && e["actor"] == "admin"
    }));
    // Listed by name and role, never the secret.
    let list = call(&admin, Method::GET, "/api/v1/tokens", &[], Body::empty()).await;
    assert!(!list.body.to_string().contains(&secret));
    assert!(
        list.body
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "ci-bot" && t["role"] == "deployer")
    );
    // Revoked: refused on the very next request.
    let r = call(
        &admin,
        Method::DELETE,
        "/api/v1/tokens/ci-bot",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = call(
        &app,
        Method::GET,
        "/api/v1/models",
        &[("authorization", &bearer)],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("unknown or revoked")
    );
    // Bad requests about tokens.
    let r = json_call(
        &admin,
        Method::POST,
        "/api/v1/tokens",
        json!({"name": "a b", "role": "viewer"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = json_call(
        &admin,
        Method::POST,
        "/api/v1/tokens",
        json!({"name": "x", "role": "root"}),
    )
    .await;
    assert!(r.status.is_client_error());
    assert!(
        r.body["error"].as_str().unwrap().contains("role"),
        "{}",
        r.body
    );
    let r = json_call(
        &admin,
        Method::POST,
        "/api/v1/tokens",
        json!({"name": "admin", "role": "viewer"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = call(
        &admin,
        Method::DELETE,
        "/api/v1/tokens/nobody",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The last admin token cannot be revoked: nobody could manage tokens.
    let r = call(
        &admin,
        Method::DELETE,
        "/api/v1/tokens/admin",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
}

/// A rollout state the control plane cannot read (written by another
/// Shoal, or damaged) never vanishes: every action on the model is refused
/// with the reason, and the model keeps serving its targets.
#[tokio::test]
async fn an_unreadable_rollout_stops_actions_on_its_model_and_says_why() {
    let tmp = TempDir::new("control-unreadable");
    let (control, app) = setup(&tmp, 1 << 30).await;
    let sha = upload(&app, "digits-v1.onnx").await;
    for v in ["1", "2"] {
        let r = json_call(
            &app,
            Method::POST,
            "/api/v1/models/digits/versions",
            json!({"sha256": sha, "version": v}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/deployments/digits",
        json!({"version": "1"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // The stored controller becomes something this Shoal cannot read.
    let mut stored = control
        .store()
        .get_deployment("digits")
        .await
        .unwrap()
        .unwrap();
    stored.controller = json!({"kind": "teleport", "state": "progressing"});
    control
        .store()
        .put_deployment(stored, "test", shoal_registry::Audit::by("test", "garble"))
        .await
        .unwrap();
    control.refresh().await.unwrap();
    for (method, uri, body) in [
        (
            Method::POST,
            "/api/v1/deployments/digits",
            json!({"version": "2"}),
        ),
        (Method::POST, "/api/v1/rollouts/digits/abort", json!(null)),
        (Method::POST, "/api/v1/rollouts/digits/promote", json!(null)),
        (Method::POST, "/api/v1/models/digits/rollback", json!({})),
        (
            Method::PUT,
            "/api/v1/deployments/digits/traffic",
            json!({"targets": [{"version": "2", "weight": 100}]}),
        ),
        (Method::GET, "/api/v1/rollouts/digits", json!(null)),
    ] {
        let r = json_call(&app, method.clone(), uri, body).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{method} {uri}: {}", r.body);
        let error = r.body["error"].as_str().unwrap();
        assert!(
            error.contains("cannot be read") && error.contains("teleport"),
            "{error}"
        );
    }
    // The controller's pass skips it without failing, and the deployment's
    // own targets still plan.
    assert!(control.campaign().await, "the only member leads");
    control.tick().await.unwrap();
    let plan = control.routing_table();
    assert_eq!(plan.models[0].targets[0].version, "1");
}

/// The session cookie a sign-in set, as a `Cookie` header value.
fn session_cookie(r: &Reply) -> String {
    let set = r
        .headers
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set} lacks {attribute}");
    }
    set.split(';').next().unwrap().to_owned()
}

#[tokio::test]
async fn the_dashboard_signs_in_with_tokens_and_reads_through_the_api() {
    let tmp = TempDir::new("control-dashboard");
    let (_control, admin) = setup(&tmp, 1 << 20).await;
    let (_, app) = bare(&tmp, 1 << 20).await;
    let tokens: std::collections::BTreeMap<_, _> = role_tokens(&admin, &["viewer", "deployer"])
        .await
        .into_iter()
        .collect();

    // The page and its assets are open, under a strict content policy.
    for (uri, kind) in [
        ("/", "text/html"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
    ] {
        let r = call(&app, Method::GET, uri, &[], Body::empty()).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind)
        );
        let csp = r.headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert_eq!(r.headers["referrer-policy"], "no-referrer");
    }

    // A wrong token: back to the form with the reason, no cookie.
    let r = call(&app, Method::GET, "/?token=shoal_nope", &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.headers["location"], "/#signin=invalid");
    assert!(!r.headers.contains_key("set-cookie"));

    // The viewer's link: a session cookie, and the token out of the URL.
    let uri = format!("/?token={}", tokens["viewer"]);
    let r = call(&app, Method::GET, &uri, &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.headers["location"], "/");
    let viewer = session_cookie(&r);
    let send = |method: Method, uri: &'static str, cookie: &str, csrf: bool| {
        let app = app.clone();
        let cookie = cookie.to_owned();
        async move {
            let mut headers = vec![("cookie", cookie.as_str())];
            if csrf {
                headers.push(("x-shoal-dashboard", "1"));
            }
            call(&app, method, uri, &headers, Body::from("{}")).await
        }
    };
    let r = send(Method::GET, "/api/v1/auth/whoami", &viewer, false).await;
    assert_eq!(
        (r.status, r.body["name"].as_str()),
        (StatusCode::OK, Some("t-viewer"))
    );
    let r = send(Method::GET, "/api/v1/status", &viewer, false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // The role still decides.
    let r = send(Method::POST, "/api/v1/rollouts/digits/abort", &viewer, true).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);

    // A deployer signed in with the form: a change needs the dashboard's
    // header (no other site can send it with the cookie).
    let r = call(
        &app,
        Method::POST,
        "/session",
        &[("content-type", "application/x-www-form-urlencoded")],
        format!("token={}", tokens["deployer"]),
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let deployer = session_cookie(&r);
    let r = send(
        Method::POST,
        "/api/v1/rollouts/digits/abort",
        &deployer,
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("x-shoal-dashboard"),
        "{}",
        r.body
    );
    let r = send(
        Method::POST,
        "/api/v1/rollouts/digits/abort",
        &deployer,
        true,
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "past the guard: {}",
        r.body
    );

    // Signing out ends the session; revoking the token ends the other.
    let r = send(Method::POST, "/session/end", &deployer, false).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(
        r.headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let r = send(Method::GET, "/api/v1/status", &deployer, false).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(
        &admin,
        Method::DELETE,
        "/api/v1/tokens/t-viewer",
        &[],
        Body::empty(),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = send(Method::GET, "/api/v1/status", &viewer, false).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // The newest audit entries, oldest first, as the dashboard reads them.
    let all = call(
        &admin,
        Method::GET,
        "/api/v1/audit?limit=1000",
        &[],
        Body::empty(),
    )
    .await;
    let all = all.body.as_array().unwrap().clone();
    let r = call(
        &admin,
        Method::GET,
        "/api/v1/audit?last=2",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.body.as_array().unwrap()[..], all[all.len() - 2..]);

    // The series of a model nobody deployed is empty; a bad name is a 400.
    let r = call(
        &admin,
        Method::GET,
        "/api/v1/rollouts/digits/history?after=0",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["points"], json!([]));
    assert_eq!(r.body["model"], "digits");
    let r = call(
        &admin,
        Method::GET,
        "/api/v1/rollouts/bad%20name/history",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);

    // The live stream opens with a snapshot of the fleet.
    let response = admin
        .clone()
        .oneshot(Request::get("/api/v1/stream").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = response.into_body();
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let text = String::from_utf8(frame.to_vec()).unwrap();
    assert!(text.starts_with("event: snapshot\ndata: {"), "{text}");
    let data: Value =
        serde_json::from_str(text.lines().nth(1).unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert!(
        data["status"]["replicas"].is_array() && data["deployments"].is_array(),
        "{data}"
    );
}

#[tokio::test]
async fn batching_is_checked_at_push_recorded_and_sent_to_replicas() {
    let tmp = TempDir::new("control-batching");
    let (_control, app) = setup(&tmp, 1 << 30).await;
    let digits = upload(&app, "digits-v1.onnx").await;
    let vad = upload(&app, "silero_vad_16k_sequence.onnx").await;
    let push = |sha: &str, extra: Value| {
        let mut body = json!({"sha256": sha});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let app = app.clone();
        async move { json_call(&app, Method::POST, "/api/v1/models/digits/versions", body).await }
    };
    for (sha, extra, says) in [
        (
            &digits,
            json!({"batching": {"max_batch": 0, "delay_us": 500}}),
            "max batch 0",
        ),
        (
            &digits,
            json!({"batching": {"max_batch": 8, "delay_us": 5_000_000}}),
            "at most",
        ),
        (
            &digits,
            json!({"batching": {"max_batch": 8, "delay_us": 500, "preferred": [16]}}),
            "preferred",
        ),
        (
            &digits,
            json!({"batching": {"max_batch": 8, "delay": 500}}),
            "delay",
        ),
        (
            &digits,
            json!({"batching": {"max_batch": 8, "delay_us": 500}, "skip_engine_check": true}),
            "skip-engine-check",
        ),
        (
            &vad,
            json!({"batching": {"max_batch": 8, "delay_us": 500}}),
            "first (batch) dimension",
        ),
        (
            &vad,
            json!({"batching": {"max_batch": 8, "delay_us": 500}, "state": {"h": "hn", "c": "cn"}}),
            "batch",
        ),
    ] {
        let r = push(sha, extra.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{extra}: {}", r.body);
        let error = r.body["error"].as_str().unwrap();
        assert!(error.contains(says), "{extra}: {error}");
    }
    let batching = json!({"max_batch": 16, "delay_us": 500, "preferred": [8]});
    let r = push(&digits, json!({"batching": batching})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["batching"], batching);
    let r = call(
        &app,
        Method::GET,
        "/api/v1/models/digits/versions/1",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(
        r.body["batching"], batching,
        "nothing refused before was stored"
    );

    // A replica told to serve it is told how to batch it.
    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/replicas",
        json!({"id": "r1", "address": "127.0.0.1:1", "region": "local"}),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/deployments/digits",
        json!({"version": "1"}),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = call(
        &app,
        Method::GET,
        "/api/v1/replicas/r1/desired",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(
        r.body["models"][0]["versions"][0]["batching"], batching,
        "{}",
        r.body
    );
}

#[tokio::test]
async fn the_engine_is_checked_at_push_recorded_and_sent_to_replicas() {
    let tmp = TempDir::new("control-engine");
    let (_control, app) = setup(&tmp, 1 << 30).await;
    let digits = upload(&app, "digits-v1.onnx").await;
    let push = |version: &str, extra: Value| {
        let mut body = json!({"sha256": digits, "version": version});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let app = app.clone();
        async move { json_call(&app, Method::POST, "/api/v1/models/digits/versions", body).await }
    };
    let r = push("9", json!({"engine": "onnx"})).await;
    assert!(r.status.is_client_error(), "{}", r.body);
    assert!(
        r.body["error"].as_str().unwrap().contains("engine"),
        "{}",
        r.body
    );
    // Without a word the version runs on tract, and says so.
    let r = push("1", json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["engine"], "tract");
    // ONNX Runtime (installed by scripts/setup) prepares and warms it here.
    for (version, engine) in [("2", "ort"), ("3", "auto")] {
        let r = push(version, json!({"engine": engine})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(r.body["engine"], engine);
    }
    let r = call(
        &app,
        Method::GET,
        "/api/v1/models/digits/versions/2",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.body["engine"], "ort", "{}", r.body);

    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/replicas",
        json!({"id": "r1", "address": "127.0.0.1:1", "region": "local"}),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = json_call(
        &app,
        Method::POST,
        "/api/v1/deployments/digits",
        json!({"version": "2"}),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = call(
        &app,
        Method::GET,
        "/api/v1/replicas/r1/desired",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(
        r.body["models"][0]["versions"][0]["engine"], "ort",
        "{}",
        r.body
    );
}
