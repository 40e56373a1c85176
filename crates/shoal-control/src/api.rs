//! The REST API under `/api/v1/`, plus `/health`, `/ready` and `/metrics`
//! (and the dashboard's page and sign-in, from [`crate::dashboard`]).
//!
//! Errors are `{"error": "…"}` via [`shoal_http::ApiError`]: 400 for bad
//! requests, 404 for unknown things, 409 for conflicts with the current
//! state, 413 for uploads over the limit.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use shoal_api::deploy::{DeployRequest, Deployment, RolloutView};
use shoal_api::fleet::{DesiredState, FleetStatus, Heartbeat, Registered, Registration};
use shoal_api::registry::{
    AuditEntry, ModelDetail, ModelSummary, NewVersion, UploadedArtifact, VersionOptions,
    VersionRecord,
};
use shoal_artifacts::{ArtifactError, ChunkId};
use shoal_core::{ModelName, Version};
use shoal_http::extract::{Json, OptionalJson, Path, Query};
use shoal_http::{ApiError, json_response};
use shoal_registry::{Audit, RegistryError, VersionDraft};
use shoal_runtime::check::{Checks, check_model};
use shoal_runtime::engines::Engines;
use shoal_runtime::{LoadError, LoadOptions};
use tokio::io::AsyncWriteExt;

use crate::Control;
use crate::auth::{Caller, Guard};
use crate::controller::DeployError;

type Shared = State<Arc<Control>>;

/// The largest revision a replica may report having seen: revisions stay
/// exact in JSON numbers, and a report cannot push the counter to where
/// the next write would overflow it.
const MAX_REVISION: u64 = 1 << 53;

/// Body limit of every route but the artifact upload (which streams to
/// disk under `--upload-limit`): heartbeats, reports and deploys are small.
pub const BODY_LIMIT: usize = 256 << 10;

/// The control plane's routes. Each `/api/v1/` route names the permission
/// its caller's token needs (see [`shoal_api::auth`]); health, readiness,
/// metrics and the OpenAPI document are open.
pub fn router(control: Arc<Control>) -> Router {
    use shoal_api::auth::Permission::{Admin, Any, Deploy, Fleet, Read};
    let needs = |permission| {
        axum::middleware::from_fn_with_state(
            Guard {
                control: control.clone(),
                permission,
            },
            crate::auth::require,
        )
    };
    let api = Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route(
            "/api/v1/artifacts",
            put(upload_artifact)
                .route_layer(needs(Deploy))
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/api/v1/artifacts/{sha256}/manifest",
            get(get_manifest).route_layer(needs(Fleet)),
        )
        .route(
            "/api/v1/chunks/{id}",
            get(get_chunk).route_layer(needs(Fleet)),
        )
        .route("/api/v1/models", get(list_models).route_layer(needs(Read)))
        .route(
            "/api/v1/models/{model}",
            get(get_model).route_layer(needs(Read)),
        )
        .route(
            "/api/v1/models/{model}/versions",
            post(create_version).route_layer(needs(Deploy)),
        )
        .route(
            "/api/v1/models/{model}/versions/{version}",
            get(get_version).route_layer(needs(Read)),
        )
        .route(
            "/api/v1/models/{model}/versions/{version}/options",
            put(set_version_options).route_layer(needs(Deploy)),
        )
        .route(
            "/api/v1/models/{model}/rollback",
            post(rollback).route_layer(needs(Deploy)),
        )
        .route(
            "/api/v1/deployments",
            get(list_deployments).route_layer(needs(Read)),
        )
        .route(
            "/api/v1/deployments/{model}",
            get(get_deployment)
                .route_layer(needs(Read))
                .merge(post(deploy).route_layer(needs(Deploy))),
        )
        .route(
            "/api/v1/deployments/{model}/traffic",
            put(set_traffic).route_layer(needs(Deploy)),
        )
        .route(
            "/api/v1/deployments/{model}/scale",
            get(get_scale)
                .route_layer(needs(Read))
                .merge(put(set_scale).route_layer(needs(Deploy))),
        )
        .route("/api/v1/scale", get(fleet_scale).route_layer(needs(Read)))
        .route(
            "/api/v1/rollouts/{model}",
            get(get_rollout).route_layer(needs(Read)),
        )
        .route(
            "/api/v1/rollouts/{model}/promote",
            post(promote_rollout).route_layer(needs(Deploy)),
        )
        .route(
            "/api/v1/rollouts/{model}/abort",
            post(abort_rollout).route_layer(needs(Deploy)),
        )
        .route(
            "/api/v1/gateways/{id}/report",
            post(gateway_report).route_layer(needs(Fleet)),
        )
        .route("/api/v1/replicas", post(register).route_layer(needs(Fleet)))
        .route(
            "/api/v1/replicas/{id}",
            axum::routing::delete(deregister).route_layer(needs(Admin)),
        )
        .route(
            "/api/v1/replicas/{id}/heartbeat",
            post(heartbeat).route_layer(needs(Fleet)),
        )
        .route(
            "/api/v1/replicas/{id}/desired",
            get(desired).route_layer(needs(Fleet)),
        )
        .route(
            "/api/v1/replicas/{id}/watch",
            get(watch).route_layer(needs(Fleet)),
        )
        .route("/api/v1/routing", get(routing).route_layer(needs(Fleet)))
        .route(
            "/api/v1/routing/watch",
            get(watch_routing).route_layer(needs(Fleet)),
        )
        .route(
            "/api/v1/rollouts/{model}/history",
            get(crate::dashboard::history).route_layer(needs(Read)),
        )
        .route(
            "/api/v1/stream",
            get(crate::dashboard::stream).route_layer(needs(Read)),
        )
        .route("/api/v1/status", get(status).route_layer(needs(Read)))
        .route("/api/v1/leader", get(leader).route_layer(needs(Read)))
        .route("/api/v1/audit", get(audit).route_layer(needs(Read)))
        .route(
            "/api/v1/backups",
            post(crate::backups::create_backup).route_layer(needs(Admin)),
        )
        .route(
            "/api/v1/tokens",
            get(crate::tokens::list_tokens)
                .route_layer(needs(Admin))
                .merge(post(crate::tokens::create_token).route_layer(needs(Admin))),
        )
        .route(
            "/api/v1/tokens/{name}",
            axum::routing::delete(crate::tokens::revoke_token).route_layer(needs(Admin)),
        )
        .route(
            "/api/v1/auth/whoami",
            get(crate::tokens::whoami).route_layer(needs(Any)),
        )
        .route("/health", get(health))
        .route("/ready", get(health))
        .route("/metrics", get(metrics))
        .merge(crate::dashboard::routes());
    shoal_http::with_fallbacks(api)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(control)
}

pub(crate) fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::NotFound(m) => ApiError::not_found(m),
        RegistryError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
        RegistryError::Invalid(m) => ApiError::bad_request(m),
        RegistryError::Stale(m) | RegistryError::Fenced(m) => {
            ApiError::new(StatusCode::CONFLICT, m)
        }
        RegistryError::Database(m) => ApiError::internal(m),
    }
}

fn deploy_error(e: DeployError) -> ApiError {
    match e {
        DeployError::NotFound(m) => ApiError::not_found(m),
        DeployError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
        DeployError::Invalid(m) => ApiError::bad_request(m),
        DeployError::Stale(m) | DeployError::Deposed(m) => ApiError::new(StatusCode::CONFLICT, m),
        DeployError::Internal(m) => ApiError::internal(m),
    }
}

fn artifact_error(e: ArtifactError) -> ApiError {
    match e {
        ArtifactError::NotFound(m) => ApiError::not_found(format!("{m}; upload it first")),
        ArtifactError::Invalid(m) => ApiError::bad_request(m),
        other => ApiError::internal(other.to_string()),
    }
}

fn model_name(model: &str) -> Result<ModelName, ApiError> {
    ModelName::new(model).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn openapi() -> Response {
    json_response(StatusCode::OK, &crate::openapi::document())
}

async fn health() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"live": true}))
}

async fn metrics(State(control): Shared) -> Response {
    let mut response = control.encode_metrics().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(shoal_telemetry::CONTENT_TYPE),
    );
    response
}

/// Upload an artifact (raw bytes). It is chunked, deduplicated against
/// what the store holds, and described by a manifest named by its SHA-256.
#[utoipa::path(put, path = "/api/v1/artifacts", request_body(content = Vec<u8>, content_type = "application/octet-stream"), responses((status = 201, body = UploadedArtifact), (status = 413, description = "larger than the upload limit")))]
pub(crate) async fn upload_artifact(
    State(control): Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = control.config.upload_limit;
    shoal_http::check_content_length(&headers, usize::try_from(limit).unwrap_or(usize::MAX))?;
    // Spool to disk: models can be far larger than memory should hold.
    // A random name, so concurrent uploads never share a file; removed
    // when the upload ends, however it ends (a client that goes away
    // drops this future, and the guard with it).
    let tmp = SpoolFile(control.config.data_dir.join("tmp").join(format!(
        "upload-{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )));
    let mut file = tokio::fs::File::create(&tmp.0)
        .await
        .map_err(|e| ApiError::internal(format!("cannot spool upload: {e}")))?;
    // A client that stops sending mid-upload is answered 408 (and its
    // spool file removed) rather than waited for.
    let mut stream = Body::new(shoal_http::stall::Stalling::new(body)).into_data_stream();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| shoal_http::stall::body_error(&e))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("artifact is larger than the upload limit of {limit} bytes"),
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(format!("cannot spool upload: {e}")))?;
    }
    file.sync_all()
        .await
        .map_err(|e| ApiError::internal(format!("cannot spool upload: {e}")))?;
    drop(file);
    if size == 0 {
        return Err(ApiError::bad_request("the artifact is empty"));
    }
    let stored = control
        .artifacts
        .put_file(&tmp.0)
        .await
        .map_err(artifact_error)?;
    Ok(json_response(
        StatusCode::CREATED,
        &UploadedArtifact {
            sha256: stored.manifest.sha256.clone(),
            size: stored.manifest.size,
            chunks: stored.manifest.chunks.len(),
            new_chunks: stored.new_chunks,
            stored_bytes: stored.new_bytes,
        },
    ))
}

/// An upload's spool file, removed when dropped.
struct SpoolFile(std::path::PathBuf);

impl Drop for SpoolFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An artifact's manifest: its chunks and whole-file SHA-256.
#[utoipa::path(get, path = "/api/v1/artifacts/{sha256}/manifest", responses((status = 200, description = "manifest JSON"), (status = 404)))]
pub(crate) async fn get_manifest(
    State(control): Shared,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let manifest = control
        .artifacts
        .get_manifest(&sha256)
        .await
        .map_err(artifact_error)?;
    let json = manifest.to_json();
    // A big model's manifest is thousands of hex chunk names: zstd halves
    // it on the wire, for clients that say they can read it (replicas do).
    let zstd_ok = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.split(';').next().is_some_and(|e| e.trim() == "zstd"));
    if zstd_ok && let Ok(compressed) = zstd::bulk::compress(&json, 3) {
        control.metrics.egress("manifest", compressed.len());
        let mut response = shoal_http::json_bytes_response(StatusCode::OK, compressed);
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        return Ok(response);
    }
    control.metrics.egress("manifest", json.len());
    Ok(shoal_http::json_bytes_response(StatusCode::OK, json))
}

/// A chunk in its stored encoding (first byte: 0 raw, 1 zstd).
#[utoipa::path(get, path = "/api/v1/chunks/{id}", responses((status = 200, content_type = "application/octet-stream"), (status = 404)))]
pub(crate) async fn get_chunk(
    State(control): Shared,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = ChunkId::parse(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let bytes: Bytes = control
        .artifacts
        .get_chunk(&id)
        .await
        .map_err(artifact_error)?;
    control.metrics.egress("chunk", bytes.len());
    let mut response = bytes.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}

/// Every model.
#[utoipa::path(get, path = "/api/v1/models", responses((status = 200, body = Vec<ModelSummary>)))]
pub(crate) async fn list_models(State(control): Shared) -> Result<Response, ApiError> {
    let models = control.store.list_models().await.map_err(registry_error)?;
    Ok(json_response(StatusCode::OK, &models))
}

/// One model and its versions.
#[utoipa::path(get, path = "/api/v1/models/{model}", responses((status = 200, body = ModelDetail), (status = 404)))]
pub(crate) async fn get_model(
    State(control): Shared,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let detail = control
        .store
        .get_model(&model)
        .await
        .map_err(registry_error)?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no model {model:?}; push one with `shoal model push`"
            ))
        })?;
    Ok(json_response(StatusCode::OK, &detail))
}

/// Register an uploaded artifact as a new version.
#[utoipa::path(post, path = "/api/v1/models/{model}/versions", request_body = NewVersion, responses((status = 201, body = VersionRecord), (status = 400, description = "not a model Shoal can serve, or an invalid request"), (status = 404, description = "artifact not uploaded"), (status = 409, description = "version exists")))]
pub(crate) async fn create_version(
    State(control): Shared,
    Path(model): Path<String>,
    Extension(caller): Extension<Caller>,
    Json(new): Json<NewVersion>,
) -> Result<Response, ApiError> {
    let model = model_name(&model)?;
    if let Some(v) = &new.version {
        Version::new(v.as_str()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    for (input, dims) in &new.input_shapes {
        if dims.iter().any(|&d| d < -1) {
            return Err(ApiError::bad_request(format!(
                "input_shapes[{input:?}]: dimensions must be -1 (dynamic) or a size"
            )));
        }
    }
    // All parse here, so a bad shape, bound or policy is a 400 before the
    // artifact is read.
    let batching = batching_policy(new.batching.as_ref())?;
    let options = LoadOptions::from_registry(
        &new.input_shapes,
        &new.max_shapes,
        &new.state,
        batching,
        new.engine,
    )
    .map_err(ApiError::bad_request)?;
    if new.skip_engine_check && new.batching.is_some() {
        return Err(ApiError::bad_request(
            "batching is checked against the model by the engine: drop --skip-engine-check, or --max-batch",
        ));
    }
    if new.skip_engine_check && !new.state.is_empty() {
        return Err(ApiError::bad_request(
            "state is checked against the model by the engine: drop --skip-engine-check, or the --state declarations",
        ));
    }
    let manifest = control
        .artifacts
        .get_manifest(&new.sha256)
        .await
        .map_err(artifact_error)?;
    let checks = if new.skip_engine_check {
        Checks::Structure
    } else {
        Checks::Engine
    };
    check_artifact(&control, &manifest.sha256, options, checks, Checked::Push).await?;
    let draft = VersionDraft {
        version: new.version,
        sha256: manifest.sha256.clone(),
        size: manifest.size,
        labels: new.labels,
        metrics: new.metrics,
        lineage: new.lineage,
        input_shapes: new.input_shapes,
        max_shapes: new.max_shapes,
        state: new.state,
        batching: new.batching,
        engine: new.engine,
    };
    let record = control
        .store
        .create_version(
            model.as_str(),
            draft,
            Audit::by(
                &caller.name,
                format!("sha256 {}; checked: {}", manifest.sha256, checks.describe()),
            ),
        )
        .await
        .map_err(registry_error)?;
    Ok(json_response(StatusCode::CREATED, &record))
}

/// A version's batching policy, checked: a 400 that says what is wrong.
fn batching_policy(
    batching: Option<&shoal_api::registry::Batching>,
) -> Result<Option<shoal_core::batch::BatchPolicy>, ApiError> {
    batching
        .map(shoal_api::registry::Batching::policy)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("batching: {e}")))
}

/// What a model check guards, for the message when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checked {
    /// A new version: refused, none is created.
    Push,
    /// New options for a version: refused, the old ones stay.
    Options,
}

/// Refuses an artifact that is not a model the fleet can load (see
/// [`shoal_runtime::check`]) with `options`: a 400 that names the problem.
async fn check_artifact(
    control: &Control,
    sha256: &str,
    options: LoadOptions,
    checks: Checks,
    checked: Checked,
) -> Result<(), ApiError> {
    let bytes = control
        .artifacts
        .read_artifact(sha256)
        .await
        .map_err(artifact_error)?;
    tokio::task::spawn_blocking(move || {
        check_model(&bytes, &options, checks, &Engines::default())
    })
    .await
    .map_err(|e| ApiError::internal(format!("model check task failed: {e}")))?
    .map_err(|e| {
        let (unavailable_hint, hint) = match checked {
            Checked::Push => (
                "No version was created; push with --skip-engine-check to register it unchecked",
                if checks == Checks::Engine {
                    "; no version was created. If the model is meant for another engine, push it with --skip-engine-check"
                } else {
                    "; no version was created"
                },
            ),
            Checked::Options => (
                "The version keeps its options",
                "; the version keeps its options",
            ),
        };
        if let LoadError::EngineUnavailable(why) = &e {
            return ApiError::bad_request(format!(
                "the control plane checks a version with the engine it asks for, and cannot \
                 here: {why}. {unavailable_hint}"
            ));
        }
        ApiError::bad_request(format!(
            "the artifact is not a model Shoal can serve {}: {e}{hint}",
            match checked {
                Checked::Push => "",
                Checked::Options => "with these options",
            }
        ))
    })?;
    Ok(())
}

/// Set how replicas serve a version: its batching and engine. Replicas
/// serving it load it again with them and swap it in, failing no request.
#[utoipa::path(put, path = "/api/v1/models/{model}/versions/{version}/options", request_body = VersionOptions, responses((status = 200, body = VersionRecord), (status = 400, description = "options the model cannot be served with"), (status = 404, description = "no such version")))]
pub(crate) async fn set_version_options(
    State(control): Shared,
    Path((model, version)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    Json(options): Json<VersionOptions>,
) -> Result<Response, ApiError> {
    let record = control
        .store
        .get_version(&model, &version)
        .await
        .map_err(registry_error)?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no version {model}:{version}; `shoal model show {model}` lists its versions"
            ))
        })?;
    if VersionOptions::of(&record) == options {
        return Ok(json_response(StatusCode::OK, &record));
    }
    let batching = batching_policy(options.batching.as_ref())?;
    let load = LoadOptions::from_registry(
        &record.input_shapes,
        &record.max_shapes,
        &record.state,
        batching,
        options.engine,
    )
    .map_err(ApiError::internal)?;
    check_artifact(
        &control,
        &record.sha256,
        load,
        Checks::Engine,
        Checked::Options,
    )
    .await?;
    let (record, _) = control
        .store
        .set_options(
            &model,
            &version,
            &options,
            Audit::by(&caller.name, options.to_string()),
        )
        .await
        .map_err(registry_error)?;
    control
        .refresh()
        .await
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    control.kick();
    Ok(json_response(StatusCode::OK, &record))
}

/// One version.
#[utoipa::path(get, path = "/api/v1/models/{model}/versions/{version}", responses((status = 200, body = VersionRecord), (status = 404)))]
pub(crate) async fn get_version(
    State(control): Shared,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let record = control
        .store
        .get_version(&model, &version)
        .await
        .map_err(registry_error)?
        .ok_or_else(|| ApiError::not_found(format!("no version {model}:{version}")))?;
    Ok(json_response(StatusCode::OK, &record))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RollbackBody {
    #[serde(default)]
    reason: Option<String>,
}

/// Roll a model back to its last known good version.
#[utoipa::path(post, path = "/api/v1/models/{model}/rollback", request_body = RollbackBody, responses((status = 200, body = Deployment), (status = 409, description = "nothing to roll back to")))]
pub(crate) async fn rollback(
    State(control): Shared,
    Path(model): Path<String>,
    Extension(caller): Extension<Caller>,
    OptionalJson(body): OptionalJson<RollbackBody>,
) -> Result<Response, ApiError> {
    let deployment = control
        .rollback(&model, body.reason, &caller.name)
        .await
        .map_err(deploy_error)?;
    Ok(json_response(StatusCode::OK, &deployment))
}

/// Every deployment.
#[utoipa::path(get, path = "/api/v1/deployments", responses((status = 200, body = Vec<Deployment>)))]
pub(crate) async fn list_deployments(State(control): Shared) -> Result<Response, ApiError> {
    let deployments: Vec<Deployment> = control
        .store
        .list_deployments()
        .await
        .map_err(registry_error)?
        .into_iter()
        .map(|d| d.deployment)
        .collect();
    Ok(json_response(StatusCode::OK, &deployments))
}

/// One model's deployment.
#[utoipa::path(get, path = "/api/v1/deployments/{model}", responses((status = 200, body = Deployment), (status = 404)))]
pub(crate) async fn get_deployment(
    State(control): Shared,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let stored = control
        .store
        .get_deployment(&model)
        .await
        .map_err(registry_error)?
        .ok_or_else(|| ApiError::not_found(format!("model {model:?} is not deployed")))?;
    Ok(json_response(StatusCode::OK, &stored.deployment))
}

/// Deploy a version (rolling by default).
#[utoipa::path(post, path = "/api/v1/deployments/{model}", request_body = DeployRequest, responses((status = 202, body = Deployment), (status = 404), (status = 409, description = "a rollout is in progress, or the version is already deployed")))]
pub(crate) async fn deploy(
    State(control): Shared,
    Path(model): Path<String>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<DeployRequest>,
) -> Result<Response, ApiError> {
    let model = model_name(&model)?;
    let deployment = control
        .deploy(model.as_str(), request, &caller.name)
        .await
        .map_err(deploy_error)?;
    Ok(json_response(StatusCode::ACCEPTED, &deployment))
}

/// Set a model's traffic policy by hand: weights, shadow share, split header.
#[utoipa::path(put, path = "/api/v1/deployments/{model}/traffic", request_body = shoal_api::deploy::TrafficRequest, responses((status = 200, body = Deployment), (status = 409, description = "a rollout is in progress")))]
pub(crate) async fn set_traffic(
    State(control): Shared,
    Extension(caller): Extension<Caller>,
    Path(model): Path<String>,
    Json(request): Json<shoal_api::deploy::TrafficRequest>,
) -> Result<Response, ApiError> {
    let deployment = control
        .set_traffic(&model, request, &caller.name)
        .await
        .map_err(deploy_error)?;
    Ok(json_response(StatusCode::OK, &deployment))
}

/// Set how many replicas serve a model: a fixed count, autoscaling
/// bounds with a target, or every replica (an empty spec).
#[utoipa::path(put, path = "/api/v1/deployments/{model}/scale", request_body = shoal_api::scale::ScaleSpec, responses((status = 200, body = Deployment)))]
pub(crate) async fn set_scale(
    State(control): Shared,
    Extension(caller): Extension<Caller>,
    Path(model): Path<String>,
    Json(spec): Json<shoal_api::scale::ScaleSpec>,
) -> Result<Response, ApiError> {
    let model = model_name(&model)?;
    let deployment = control
        .set_scale(model.as_str(), spec, &caller.name)
        .await
        .map_err(deploy_error)?;
    Ok(json_response(StatusCode::OK, &deployment))
}

/// A model's scale: spec, placement, the autoscaler's reactive and
/// predicted recommendations, right-sizing and the next predicted change.
#[utoipa::path(get, path = "/api/v1/deployments/{model}/scale", responses((status = 200, body = shoal_api::scale::ScaleStatus)))]
pub(crate) async fn get_scale(
    State(control): Shared,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let model = model_name(&model)?;
    let status = control
        .scale_status(model.as_str())
        .await
        .map_err(deploy_error)?;
    Ok(json_response(StatusCode::OK, &status))
}

/// The replica count the fleet should run (`desired_replicas`: the most
/// any scaled model wants), for Kubernetes' scaler and `shoal up
/// --autoscale`, with every scaled model's status.
#[utoipa::path(get, path = "/api/v1/scale", responses((status = 200, body = shoal_api::scale::FleetScale)))]
pub(crate) async fn fleet_scale(State(control): Shared) -> Result<Response, ApiError> {
    Ok(json_response(StatusCode::OK, &control.fleet_scale()))
}

/// A model's current or last rollout.
#[utoipa::path(get, path = "/api/v1/rollouts/{model}", responses((status = 200, body = RolloutView), (status = 404), (status = 409, description = "the stored rollout state cannot be read")))]
pub(crate) async fn get_rollout(
    State(control): Shared,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let stored = control
        .store
        .get_deployment(&model)
        .await
        .map_err(registry_error)?
        .ok_or_else(|| ApiError::not_found(format!("model {model:?} is not deployed")))?;
    // Recompute the view so progress counts are current.
    let facts = control.facts();
    let controller = shoal_rollout::Controller::from_json(&stored.controller)
        .map_err(|why| ApiError::new(StatusCode::CONFLICT, format!("{model}: {why}")))?;
    let view = match controller {
        Some(mut c) => {
            let replicas: Vec<_> = facts
                .replicas
                .iter()
                .filter(|rep| shoal_rollout::plan::eligible(&stored.deployment, rep))
                .collect();
            // A dry tick refreshes the reason ("waiting for …", or why
            // replicas cannot load the version) without deciding anything:
            // the controller persists real decisions, and a rollout shows
            // as ended only once one has (a deploy is refused until then).
            if matches!(c, shoal_rollout::Controller::Rolling(_)) {
                let mut dry = c.clone();
                dry.tick(
                    &model,
                    &replicas,
                    &facts,
                    &mut rand::rng(),
                    shoal_api::now_millis(),
                );
                if !dry.state().is_terminal() {
                    c = dry;
                }
            }
            c.view(&model, &replicas, &facts)
        }
        None => stored
            .deployment
            .rollout
            .ok_or_else(|| ApiError::not_found(format!("model {model:?} has no rollout")))?,
    };
    Ok(json_response(StatusCode::OK, &view))
}

/// Promote a rollout now (a canary skips its remaining steps).
#[utoipa::path(post, path = "/api/v1/rollouts/{model}/promote", responses((status = 200, body = Deployment), (status = 409, description = "no rollout in progress")))]
pub(crate) async fn promote_rollout(
    State(control): Shared,
    Extension(caller): Extension<Caller>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let d = control
        .promote(&model, &caller.name)
        .await
        .map_err(deploy_error)?;
    Ok(json_response(StatusCode::OK, &d))
}

/// Abort a rollout: traffic goes back to the version it was replacing.
#[utoipa::path(post, path = "/api/v1/rollouts/{model}/abort", responses((status = 200, body = Deployment), (status = 409, description = "no rollout in progress")))]
pub(crate) async fn abort_rollout(
    State(control): Shared,
    Extension(caller): Extension<Caller>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let d = control
        .abort(&model, &caller.name)
        .await
        .map_err(deploy_error)?;
    Ok(json_response(StatusCode::OK, &d))
}

/// A gateway's cumulative shadow comparisons and rewards.
#[utoipa::path(post, path = "/api/v1/gateways/{id}/report", request_body = shoal_api::traffic::GatewayReport, responses((status = 200)))]
pub(crate) async fn gateway_report(
    State(control): Shared,
    Path(id): Path<String>,
    Json(report): Json<shoal_api::traffic::GatewayReport>,
) -> Result<Response, ApiError> {
    crate::leader::publish_gateway_report(&control, &id, &report).await;
    control.traffic.report(&id, report);
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"ok": true}),
    ))
}

/// A replica announces itself (idempotent).
#[utoipa::path(post, path = "/api/v1/replicas", request_body = Registration, responses((status = 200, body = Registered)))]
pub(crate) async fn register(
    State(control): Shared,
    Json(registration): Json<Registration>,
) -> Result<Response, ApiError> {
    if registration.id.is_empty()
        || registration.address.is_empty()
        || registration.region.is_empty()
    {
        return Err(ApiError::bad_request(
            "id, address and region must not be empty",
        ));
    }
    let before = control.revision();
    // A replica restarted on the same address (new pid, say) changes no
    // revision but must not show its old registration in status.
    let known = control
        .snapshot()
        .registrations
        .iter()
        .any(|r| r.registration == registration);
    let revision = control
        .store
        .register_replica(&registration)
        .await
        .map_err(registry_error)?;
    if revision != before || !known {
        control
            .refresh()
            .await
            .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    }
    control.kick();
    Ok(json_response(
        StatusCode::OK,
        &Registered {
            id: registration.id,
            heartbeat_interval_ms: u64::try_from(control.config.heartbeat_interval.as_millis())
                .unwrap_or(2000),
        },
    ))
}

/// Forget a replica.
#[utoipa::path(delete, path = "/api/v1/replicas/{id}", responses((status = 200), (status = 404)))]
pub(crate) async fn deregister(
    State(control): Shared,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let removed = control
        .store
        .remove_replica(&id, Audit::by(&caller.name, "deregistered"))
        .await
        .map_err(registry_error)?;
    if !removed {
        return Err(ApiError::not_found(format!("no replica {id:?}")));
    }
    control.live.forget(&id);
    control
        .refresh()
        .await
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"removed": id}),
    ))
}

fn is_registered(control: &Control, id: &str) -> bool {
    control
        .snapshot()
        .registrations
        .iter()
        .any(|r| r.registration.id == id)
}

/// What a replica serves now.
#[utoipa::path(post, path = "/api/v1/replicas/{id}/heartbeat", request_body = Heartbeat, responses((status = 200), (status = 404, description = "unknown replica: register again")))]
pub(crate) async fn heartbeat(
    State(control): Shared,
    Path(id): Path<String>,
    Json(report): Json<Heartbeat>,
) -> Result<Response, ApiError> {
    if !is_registered(&control, &id) {
        return Err(ApiError::not_found(format!(
            "unknown replica {id:?}; register first"
        )));
    }
    // A replica that has seen a newer revision than this control plane
    // holds (restored from an older backup) would ignore what it says
    // next: move the revision past what the replica saw.
    let seen = report.seen_revision.max(report.applied_revision);
    if seen > MAX_REVISION {
        return Err(ApiError::bad_request(format!(
            "revision {seen} is beyond any this control plane issues (at most 2^53)"
        )));
    }
    if seen > control.revision() {
        control
            .store
            .advance_revision(
                seen.saturating_add(1),
                Audit::by(
                    "control plane",
                    format!("replica {id} had seen revision {seen}; revisions continue past it"),
                ),
            )
            .await
            .map_err(registry_error)?;
        control
            .fast_forwards
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        control
            .refresh()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        control.kick();
    }
    crate::leader::publish_heartbeat(&control, &id, &report).await;
    if control.live.heartbeat(&id, report) {
        control.kick();
        control.fleet_changed();
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"revision": control.revision()}),
    ))
}

/// The desired state of a replica. With `If-None-Match: "<revision>"`,
/// answers 304 when the fleet revision has not moved: polling is cheap.
#[utoipa::path(get, path = "/api/v1/replicas/{id}/desired", responses((status = 200, body = DesiredState), (status = 304)))]
pub(crate) async fn desired(
    State(control): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let etag = format!("\"{}\"", control.revision());
    let unchanged = etag_matches(&headers, &etag);
    control.metrics.poll(!unchanged);
    let response = if unchanged {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        json_response(StatusCode::OK, &control.desired_for(&id))
    };
    Ok(with_etag(response, &etag))
}

/// True when the request's `If-None-Match` is `etag`.
fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == etag)
}

fn with_etag(mut response: Response, etag: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

#[derive(Debug, Deserialize)]
pub(crate) struct WatchQuery {
    #[serde(default)]
    after: u64,
}

/// Keep-alive interval of watch streams: lets both ends notice a dead peer.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// A stream of the replica's desired state, one JSON document per line,
/// sent at once when the revision is past `after`, then on every change.
/// Blank lines are keep-alives.
#[utoipa::path(get, path = "/api/v1/replicas/{id}/watch", params(("after" = u64, Query, description = "last revision seen")), responses((status = 200, content_type = "application/x-ndjson", body = DesiredState)))]
pub(crate) async fn watch(
    State(control): Shared,
    Path(id): Path<String>,
    Query(query): Query<WatchQuery>,
) -> Response {
    let guard = crate::metrics::Open::on(&control.metrics.watchers);
    let mut last: Option<DesiredState> = None;
    let mut after = query.after;
    let mut fast_forwards = control
        .fast_forwards
        .load(std::sync::atomic::Ordering::SeqCst);
    ndjson_watch(control, move |control| {
        let _ = &guard;
        let desired = control.desired_for(&id);
        // After a fast-forward the same content goes out again at the new
        // revision: the replica may have ignored it at the old one.
        let forwarded = control
            .fast_forwards
            .load(std::sync::atomic::Ordering::SeqCst);
        let changed = forwarded != fast_forwards
            || last
                .as_ref()
                .is_none_or(|l| l.models != desired.models || l.peers != desired.peers);
        fast_forwards = forwarded;
        if desired.revision <= after || !changed {
            return None;
        }
        after = desired.revision;
        let line = serde_json::to_vec(&desired).ok();
        last = Some(desired);
        line
    })
}

/// Streams newline-delimited JSON: `next` is asked for a line at once and
/// after every change (fleet revision, what replicas serve), and what it
/// returns is sent; blank keep-alive lines go out in between. The stream
/// ends when the client leaves or the control plane shuts down.
fn ndjson_watch<F>(control: Arc<Control>, next: F) -> Response
where
    F: FnMut(&Control) -> Option<Vec<u8>> + Send + 'static,
{
    /// The stream's state: it owns `next` (and whatever that captures), so
    /// both are dropped as soon as the client goes away.
    struct Watch<F> {
        control: Arc<Control>,
        next: F,
        revisions: tokio::sync::watch::Receiver<u64>,
        fleet: tokio::sync::watch::Receiver<u64>,
        stopping: tokio::sync::watch::Receiver<bool>,
        /// Whether `next` is asked before waiting (not right after a line).
        ask: bool,
    }
    let watch = Watch {
        ask: true,
        revisions: control.revision.subscribe(),
        fleet: control.fleet_changes.subscribe(),
        stopping: control.stopping.subscribe(),
        control,
        next,
    };
    let stream = futures::stream::unfold(watch, |mut w| async move {
        loop {
            if std::mem::replace(&mut w.ask, true)
                && let Some(mut line) = (w.next)(&w.control)
            {
                line.push(b'\n');
                w.ask = false;
                return Some((Ok::<_, std::io::Error>(Bytes::from(line)), w));
            }
            let keep_alive = tokio::select! {
                changed = w.revisions.changed() => if changed.is_err() { return None } else { false },
                changed = w.fleet.changed() => if changed.is_err() { return None } else { false },
                _ = w.stopping.changed() => return None,
                () = tokio::time::sleep(KEEPALIVE) => true,
            };
            if keep_alive {
                return Some((Ok(Bytes::from_static(b"\n")), w));
            }
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// A digest of a response body, as an ETag.
fn content_etag(bytes: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}

/// The routing table gateways follow: replicas with what they serve, and
/// each model's traffic split. ETag is a digest of the content.
#[utoipa::path(get, path = "/api/v1/routing", responses((status = 200, body = shoal_api::fleet::RoutingTable), (status = 304)))]
pub(crate) async fn routing(State(control): Shared, headers: HeaderMap) -> Response {
    // Serialized once: the bytes are both the body and what the ETag digests.
    let body = serde_json::to_vec(&control.routing_table()).unwrap_or_default();
    let etag = content_etag(&body);
    if etag_matches(&headers, &etag) {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    with_etag(shoal_http::json_bytes_response(StatusCode::OK, body), &etag)
}

/// The routing table as a stream: one JSON document per line, at once and
/// on every change. Blank lines are keep-alives.
#[utoipa::path(get, path = "/api/v1/routing/watch", responses((status = 200, content_type = "application/x-ndjson", body = shoal_api::fleet::RoutingTable)))]
pub(crate) async fn watch_routing(State(control): Shared) -> Response {
    let mut last: Option<shoal_api::fleet::RoutingTable> = None;
    ndjson_watch(control, move |control| {
        let table = control.routing_table();
        let same = last
            .as_ref()
            .is_some_and(|l| l.endpoints == table.endpoints && l.models == table.models);
        if same {
            return None;
        }
        let line = serde_json::to_vec(&table).ok();
        last = Some(table);
        line
    })
}

/// The fleet: every replica with region, health, serving and desired
/// versions, skew.
#[utoipa::path(get, path = "/api/v1/status", responses((status = 200, body = FleetStatus)))]
pub(crate) async fn status(State(control): Shared) -> Result<Response, ApiError> {
    let status = control
        .status()
        .await
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok(json_response(StatusCode::OK, &status))
}

/// Who leads the control plane (runs the rollout controller), its term,
/// and the members seen recently. Every member answers the same.
#[utoipa::path(get, path = "/api/v1/leader", responses((status = 200, body = shoal_api::fleet::Leadership)))]
pub(crate) async fn leader(State(control): Shared) -> Result<Response, ApiError> {
    let leadership = control
        .leadership()
        .await
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok(json_response(StatusCode::OK, &leadership))
}

#[derive(Debug, Deserialize)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: u32,
    /// The newest this many instead (the dashboard's view).
    last: Option<u32>,
}

fn default_limit() -> u32 {
    100
}

/// The audit log, oldest first.
#[utoipa::path(get, path = "/api/v1/audit", params(("after" = Option<i64>, Query, description = "entries after this position (default 0)"), ("limit" = Option<u32>, Query, description = "at most this many, up to 1000 (default 100)"), ("last" = Option<u32>, Query, description = "instead: the newest this many, up to 1000, oldest first")), responses((status = 200, body = Vec<AuditEntry>)))]
pub(crate) async fn audit(
    State(control): Shared,
    Query(query): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let entries = match query.last {
        Some(last) => control.store.audit_tail(last.min(1000)).await,
        None => {
            control
                .store
                .audit_log(query.after, query.limit.min(1000))
                .await
        }
    }
    .map_err(registry_error)?;
    Ok(json_response(StatusCode::OK, &entries))
}
