//! The replica's HTTP surface.
//!
//! - Open Inference Protocol v2: `/v2`, `/v2/health/{live,ready}`,
//!   `/v2/models/{model}[/versions/{version}][/ready|/infer]`.
//! - Probes and metrics: `/health` (liveness), `/ready` (readiness, with
//!   what is missing), `/metrics` (Prometheus).
//! - Admin (`/admin/models…`): load a version (verify, warm, switch), set
//!   the default version, unload a version, list what is loaded. The sync
//!   agent calls [`Replica::load`] directly; these routes serve standalone
//!   replicas and operators, and need one of the replica's admin tokens
//!   ([`require_admin`]). `/admin/faults` exists only with
//!   `--allow-fault-injection`.
//!
//! Every error is `{"error": "…"}` via [`shoal_http::ApiError`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use shoal_api::replica::{
    AdminListing, LoadedModel, LoadedVersion, REPLICA_HEADER, VERSION_HEADER,
};
use shoal_core::{ModelName, Version, VersionKey};
use shoal_http::extract::{Json, Path};
use shoal_http::{Answer, ApiError, Headers, RequestBody, json_response};
use shoal_oip::{ModelMetadata, ServerMetadata};
use shoal_runtime::LoadOptions;

use crate::inference::{self, Call};
use crate::store::{InstallPolicy, LookupError, ServingVersion};
use crate::{ArtifactSource, LoadFailure, LoadSpec, Replica};

type Shared = State<Arc<Replica>>;

/// The replica's routes.
pub fn router(replica: Arc<Replica>) -> Router {
    let routes = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/infer", post(infer))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(version_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(version_ready),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/health", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics));
    let mut admin = Router::new()
        .route("/admin/models", get(admin_list))
        .route(
            "/admin/models/{model}/versions/{version}",
            put(admin_load).delete(admin_unload),
        )
        .route("/admin/models/{model}/default", put(admin_set_default));
    if replica.fault_injection_allowed() {
        admin = admin.route("/admin/faults", get(admin_faults)).route(
            "/admin/faults/{model}/{version}",
            put(admin_set_fault).delete(admin_clear_fault),
        );
    }
    let admin = admin.route_layer(axum::middleware::from_fn_with_state(
        replica.clone(),
        require_admin,
    ));
    shoal_http::with_fallbacks(routes.merge(admin)).with_state(replica)
}

/// Guards the admin API (and the sync agent's peer routes, which hand out
/// model weights): the request must carry one of the replica's admin
/// tokens as `Authorization: Bearer TOKEN`. A replica given no token at all
/// (standalone, no `--admin-token-file`) keeps only the read-only model
/// listing open, which gateways health-check.
pub async fn require_admin(
    State(replica): Shared,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let token = match shoal_http::bearer(request.headers()) {
        Ok(token) => token,
        Err(why) => return unauthorized(why),
    };
    match token {
        Some(token) if replica.admits(token) => next.run(request).await,
        _ if !replica.admin_enabled()
            && request.method() == http::Method::GET
            && request.uri().path() == "/admin/models" =>
        {
            next.run(request).await
        }
        _ if !replica.admin_enabled() => ApiError::new(
            StatusCode::FORBIDDEN,
            "the admin API is off on this replica: start it with --admin-token-file FILE \
             (or with --control and a fleet token) to use it",
        )
        .into_response(),
        Some(_) => unauthorized("the token is not one this replica accepts".into()),
        None => unauthorized(
            "the replica's admin API needs a token: send `Authorization: Bearer TOKEN` with the \
             fleet token or one from its --admin-token-file"
                .into(),
        ),
    }
}

fn unauthorized(message: String) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"shoal-replica\""),
    );
    response
}

fn lookup_error(e: LookupError) -> ApiError {
    ApiError::not_found(e.to_string())
}

fn lookup(
    replica: &Replica,
    model: &str,
    version: Option<&str>,
) -> Result<Arc<ServingVersion>, ApiError> {
    replica.store().lookup(model, version).map_err(lookup_error)
}

async fn server_metadata() -> Response {
    json_response(StatusCode::OK, &ServerMetadata::shoal())
}

async fn live() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"live": true}))
}

/// OIP server readiness: 200 when ready, 400 (the protocol's "false") when not.
async fn server_ready(State(replica): Shared) -> Response {
    let state = replica.ready_state();
    let status = if state.ready {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    json_response(status, &serde_json::json!({"ready": state.ready}))
}

/// Shoal's readiness probe: 200 when ready, 503 with reasons when not.
async fn ready(State(replica): Shared) -> Response {
    let state = replica.ready_state();
    let status = if state.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &state)
}

async fn metrics(State(replica): Shared) -> Response {
    let mut response = replica.encode_metrics().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(shoal_telemetry::CONTENT_TYPE),
    );
    response
}

/// A model's metadata as both protocols answer it: what clients send and
/// get (a stateful model's state stays on the replica).
pub(crate) fn model_metadata_of(
    replica: &Replica,
    model: &str,
    version: Option<&str>,
) -> Result<ModelMetadata, ApiError> {
    let serving = lookup(replica, model, version)?;
    let versions = match version {
        Some(v) => vec![v.to_owned()],
        None => replica
            .store()
            .snapshot()
            .models
            .get(model)
            .map(|e| e.version_names())
            .unwrap_or_default(),
    };
    let state = serving.loaded.state();
    let mut signature = serving.loaded.signature().clone();
    signature.inputs.retain(|s| !state.is_state_input(&s.name));
    signature
        .outputs
        .retain(|s| !state.is_state_output(&s.name));
    Ok(ModelMetadata::new(
        model,
        versions,
        serving.loaded.platform(),
        &signature,
    ))
}

fn metadata_for(
    replica: &Replica,
    model: &str,
    version: Option<&str>,
) -> Result<Response, ApiError> {
    Ok(json_response(
        StatusCode::OK,
        &model_metadata_of(replica, model, version)?,
    ))
}

async fn model_metadata(
    State(replica): Shared,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    metadata_for(&replica, &model, None)
}

async fn version_metadata(
    State(replica): Shared,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    metadata_for(&replica, &model, Some(&version))
}

fn ready_for(replica: &Replica, model: &str, version: Option<&str>) -> Result<Response, ApiError> {
    lookup(replica, model, version)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"name": model, "ready": true}),
    ))
}

async fn model_ready(
    State(replica): Shared,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    ready_for(&replica, &model, None)
}

async fn version_ready(
    State(replica): Shared,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    ready_for(&replica, &model, Some(&version))
}

/// The inference routes, taken before the router (see
/// [`shoal_http::Front`]): what [`infer`] and [`infer_version`] do, without
/// the router's matching, extensions and extractors on the path every
/// request takes. Paths with percent-encoded names go to the router.
pub fn front(replica: Arc<Replica>) -> shoal_http::Front {
    Arc::new(move |inference: shoal_http::Inference| {
        let replica = replica.clone();
        Box::pin(async move {
            let shoal_http::Inference {
                model,
                version,
                headers,
                body,
                ..
            } = inference;
            infer_common(&replica, &model, version.as_deref(), &headers, body).await
        })
    })
}

async fn infer(
    State(replica): Shared,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_common(
        &replica,
        &model,
        None,
        &headers,
        RequestBody::Streamed(body),
    )
    .await
    .into_response()
}

async fn infer_version(
    State(replica): Shared,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = RequestBody::Streamed(body);
    infer_common(&replica, &model, Some(&version), &headers, body)
        .await
        .into_response()
}

/// Serves one inference: its answer, or the error's.
async fn infer_common(
    replica: &Replica,
    model: &str,
    version: Option<&str>,
    headers: &impl Headers,
    body: RequestBody,
) -> Answer {
    serve_inference(replica, model, version, headers, body)
        .await
        .unwrap_or_else(ApiError::into_answer)
}

async fn serve_inference(
    replica: &Replica,
    model: &str,
    version: Option<&str>,
    headers: &impl Headers,
    body: RequestBody,
) -> Result<Answer, ApiError> {
    // Names as constants: a `&str` name is parsed on every lookup.
    const BINARY: http::HeaderName = http::HeaderName::from_static(shoal_oip::BINARY_HEADER);
    const MOVED_FROM: http::HeaderName =
        http::HeaderName::from_static(shoal_api::replica::SEQUENCE_FROM_HEADER);
    const REPLICA: http::HeaderName = http::HeaderName::from_static(REPLICA_HEADER);
    const VERSION: http::HeaderName = http::HeaderName::from_static(VERSION_HEADER);
    // The two headers read, in one pass.
    let [json_len, moved_from] = headers.find([&BINARY, &MOVED_FROM]);
    let json_len = shoal_http::text_of(&BINARY, json_len)?;
    body.check_declared(headers, replica.body_limit)?;
    // The gateway says when the sequence's last step was answered by
    // another replica.
    let moved_from = moved_from.and_then(shoal_http::header_str);
    let call = Call {
        model,
        version,
        moved_from,
    };
    // Read and decoded only once admitted (see `inference::infer`).
    let served = inference::infer(replica, call, || async {
        let body = body.read(replica.body_limit).await?;
        Ok(decode(body, json_len, replica.limits).await)
    })
    .await?;
    let mut answer = match served.answer {
        Ok((request, outputs)) => {
            let encoded = shoal_oip::encode_response_parts(
                served.serving.model.as_str(),
                Some(served.serving.version.as_str()),
                request.id.as_deref(),
                &outputs,
                |name| request.binary_output(name),
            );
            // Room for its three header lines at once (each grew the list).
            let mut answer = Answer::with_capacity(StatusCode::OK, encoded.body.into(), 160);
            match encoded.json_len {
                None => answer.push(
                    &header::CONTENT_TYPE,
                    &HeaderValue::from_static("application/json"),
                ),
                Some(len) => {
                    answer.push(
                        &header::CONTENT_TYPE,
                        &HeaderValue::from_static("application/octet-stream"),
                    );
                    answer.push(&BINARY, &HeaderValue::from(len));
                }
            }
            answer
        }
        Err(e) => e.into_answer(),
    };
    if let Some(v) = replica.id_header() {
        answer.push(&REPLICA, v);
    }
    if let Ok(v) = HeaderValue::from_str(served.serving.version.as_str()) {
        answer.push(&VERSION, &v);
    }
    Ok(answer)
}

/// Decodes an OIP request body (JSON, or JSON plus binary tensors), off
/// the async workers when it is large.
async fn decode(
    body: bytes::Bytes,
    json_len: Option<&str>,
    limits: shoal_oip::Limits,
) -> Result<shoal_oip::DecodedRequest, String> {
    let json_len = json_len.map(str::to_owned);
    shoal_http::decode_off_worker(body.len(), move || {
        shoal_oip::decode_request_parts(&body, json_len.as_deref(), &limits).map_err(|e| e.0)
    })
    .await?
}

async fn admin_list(State(replica): Shared) -> Response {
    let state = replica.ready_state();
    let table = replica.store().snapshot();
    let models = table
        .models
        .iter()
        .map(|(name, entry)| LoadedModel {
            model: name.to_string(),
            default: entry.default.to_string(),
            versions: entry
                .versions
                .values()
                .map(|v| LoadedVersion {
                    version: v.version.to_string(),
                    sha256: v.sha256.clone(),
                    // Minus the table's own reference.
                    in_flight: Arc::strong_count(v).saturating_sub(1),
                })
                .collect(),
        })
        .collect();
    let draining = replica
        .store()
        .draining()
        .into_iter()
        .map(|d| LoadedVersion {
            version: format!("{}:{}", d.model, d.version),
            sha256: String::new(),
            in_flight: d.in_flight,
        })
        .collect();
    json_response(
        StatusCode::OK,
        &AdminListing {
            ready: state.ready,
            shutting_down: state.shutting_down,
            replica_id: replica.id().to_owned(),
            models,
            draining,
        },
    )
}

/// Body of `PUT /admin/models/{model}/versions/{version}`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LoadBody {
    /// ONNX file on the replica's filesystem.
    pub path: PathBuf,
    /// Expected SHA-256 (hex), required; the load is refused on mismatch.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Make it the default version (default true).
    #[serde(default)]
    pub default: Option<bool>,
    /// Retire the model's other versions (default true).
    #[serde(default)]
    pub retire_others: Option<bool>,
    /// Input shape overrides: input name to dimensions, -1 for dynamic.
    #[serde(default)]
    pub input_shapes: BTreeMap<String, Vec<i64>>,
    /// A stateful model's state: input name to the output feeding it.
    #[serde(default)]
    pub state: BTreeMap<String, String>,
}

fn names(model: &str, version: &str) -> Result<(ModelName, Version), ApiError> {
    let model = ModelName::new(model).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let version = Version::new(version).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok((model, version))
}

async fn admin_load(
    State(replica): Shared,
    Path((model, version)): Path<(String, String)>,
    Json(body): Json<LoadBody>,
) -> Result<Response, ApiError> {
    let (model, version) = names(&model, &version)?;
    if body.sha256.is_none() {
        return Err(ApiError::bad_request(format!(
            "loading {} needs its sha256: the replica serves only bytes whose digest it was \
             told (sha256sum FILE gives it)",
            body.path.display()
        )));
    }
    let options = LoadOptions::from_dims(&body.input_shapes)
        .map_err(ApiError::bad_request)?
        .with_state(&body.state);
    let spec = LoadSpec {
        model,
        version,
        source: ArtifactSource::Path(body.path),
        sha256: body.sha256,
        options,
    };
    let policy = InstallPolicy {
        make_default: body.default.unwrap_or(true),
        retire_others: body.retire_others.unwrap_or(true),
    };
    match replica.load(spec, policy).await {
        Ok(report) => Ok(json_response(StatusCode::OK, &report)),
        Err(LoadFailure::Internal(cause)) => Err(ApiError::internal(cause)),
        Err(LoadFailure::BadChecksum(s)) => Err(ApiError::bad_request(
            LoadFailure::BadChecksum(s).to_string(),
        )),
        Err(failure) => Err(ApiError::unprocessable(format!(
            "{failure}; the serving version is unchanged"
        ))),
    }
}

async fn admin_unload(
    State(replica): Shared,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    replica
        .store()
        .remove(&model, &version)
        .map_err(lookup_error)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"model": model, "version": version, "unloaded": true}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultBody {
    version: String,
}

async fn admin_set_default(
    State(replica): Shared,
    Path(model): Path<String>,
    Json(body): Json<DefaultBody>,
) -> Result<Response, ApiError> {
    replica
        .store()
        .set_default(&model, &body.version)
        .map_err(lookup_error)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"model": model, "default": body.version}),
    ))
}

async fn admin_faults(State(replica): Shared) -> Response {
    json_response(StatusCode::OK, &replica.faults())
}

async fn admin_set_fault(
    State(replica): Shared,
    Path((model, version)): Path<(String, String)>,
    Json(body): Json<shoal_api::fleet::Fault>,
) -> Result<Response, ApiError> {
    let (model, version) = names(&model, &version)?;
    let fault = body;
    if !(0.0..=1.0).contains(&fault.error_rate) || !(0.0..=1.0).contains(&fault.latency_rate) {
        return Err(ApiError::bad_request(
            "error_rate and latency_rate must be between 0 and 1",
        ));
    }
    replica.set_fault(&VersionKey::new(model, version), Some(fault.clone()));
    Ok(json_response(StatusCode::OK, &fault))
}

async fn admin_clear_fault(
    State(replica): Shared,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (model, version) = names(&model, &version)?;
    let key = VersionKey::new(model, version);
    replica.set_fault(&key, None);
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "cleared": key }),
    ))
}
