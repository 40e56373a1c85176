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
use tokio::time::Instant;

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
use shoal_core::{ModelName, Tensor, Version};
use shoal_http::extract::{Json, Path};
use shoal_http::{ApiError, json_bytes_response, json_response};
use shoal_oip::{ModelMetadata, ServerMetadata};
use shoal_runtime::{LoadOptions, RunError};

use crate::metrics::{Outcome, PredictionServed};
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

fn metadata_for(
    replica: &Replica,
    model: &str,
    version: Option<&str>,
) -> Result<Response, ApiError> {
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
    // What clients send and get: a stateful model's state stays here.
    let state = serving.loaded.state();
    let mut signature = serving.loaded.signature().clone();
    signature.inputs.retain(|s| !state.is_state_input(&s.name));
    signature
        .outputs
        .retain(|s| !state.is_state_output(&s.name));
    Ok(json_response(
        StatusCode::OK,
        &ModelMetadata::new(model, versions, serving.loaded.platform(), &signature),
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

async fn infer(
    State(replica): Shared,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer_common(&replica, &model, None, &headers, body).await
}

async fn infer_version(
    State(replica): Shared,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer_common(&replica, &model, Some(&version), &headers, body).await
}

async fn infer_common(
    replica: &Replica,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let json_len = shoal_http::header_text(headers, shoal_oip::BINARY_HEADER)?;
    shoal_http::check_content_length(headers, replica.body_limit)?;
    let mut serving = lookup(replica, model, version)?;
    // Admitted before the body is read: an overload is shed before it is
    // paid for in reading and parsing. A batched version's batches also
    // wait for requests admitted and not yet decoded (a lone caller never
    // waits).
    let admitted = match &serving.batcher {
        Some(batcher) => batcher.admit().map(Admitted::Batch),
        None => replica.pool().admit().map(Admitted::Pool),
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(e) => {
            PredictionServed {
                model: &serving.model,
                version: &serving.version,
                outcome: Outcome::Overloaded,
                elapsed: std::time::Duration::ZERO,
                error: Some("refused before decoding: overloaded"),
            }
            .emit(&serving.metrics);
            return Err(ApiError::unavailable(e.to_string(), 1));
        }
    };
    let body = shoal_http::read_body(body, replica.body_limit).await?;
    let started = Instant::now();
    if let Some(fault) = replica.fault_for(serving.model.as_str(), serving.version.as_str()) {
        if fault.hang {
            std::future::pending::<()>().await;
        }
        if fault.latency_ms > 0 && rand::random::<f64>() < fault.latency_rate {
            tokio::time::sleep(std::time::Duration::from_millis(fault.latency_ms)).await;
        }
        if fault.error_rate > 0.0 && rand::random::<f64>() < fault.error_rate {
            PredictionServed {
                model: &serving.model,
                version: &serving.version,
                outcome: Outcome::Error,
                elapsed: started.elapsed(),
                error: Some("injected fault"),
            }
            .emit(&serving.metrics);
            return Err(ApiError::internal(
                "injected fault: this replica is configured to fail this share of requests",
            ));
        }
    }
    let result = match decode(body, json_len, replica.limits).await {
        Err(e) => Err((Outcome::InvalidInput, ApiError::bad_request(e))),
        Ok(request) if serving.loaded.state().is_empty() => {
            run_inference(replica, &serving, request, None, admitted).await
        }
        Ok(request) => match begin_step(replica, &mut serving, version, headers, &request).await {
            Ok(step) => run_inference(replica, &serving, request, Some(step), admitted).await,
            Err(e) => Err(e),
        },
    };
    let (outcome, error) = match &result {
        Ok(_) => (Outcome::Success, None),
        Err((outcome, e)) => (*outcome, Some(e.message.as_str())),
    };
    PredictionServed {
        model: &serving.model,
        version: &serving.version,
        outcome,
        elapsed: started.elapsed(),
        error,
    }
    .emit(&serving.metrics);
    let mut response = match result {
        Ok(encoded) => match encoded.json_len {
            None => json_bytes_response(StatusCode::OK, encoded.body),
            Some(len) => {
                let mut response = (StatusCode::OK, encoded.body).into_response();
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                headers.insert(shoal_oip::BINARY_HEADER, HeaderValue::from(len));
                response
            }
        },
        Err((_, e)) => e.into_response(),
    };
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(replica.id()) {
        headers.insert(REPLICA_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(serving.version.as_str()) {
        headers.insert(VERSION_HEADER, v);
    }
    Ok(response)
}

/// Bodies up to this size are decoded on the async worker; larger ones on
/// a blocking thread, so a big request never stalls the others.
const DECODE_INLINE_BYTES: usize = 64 << 10;

/// Decodes an OIP request body (JSON, or JSON plus binary tensors).
async fn decode(
    body: bytes::Bytes,
    json_len: Option<&str>,
    limits: shoal_oip::Limits,
) -> Result<shoal_oip::DecodedRequest, String> {
    if body.len() <= DECODE_INLINE_BYTES {
        return shoal_oip::decode_request_parts(&body, json_len, &limits).map_err(|e| e.0);
    }
    let json_len = json_len.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        shoal_oip::decode_request_parts(&body, json_len.as_deref(), &limits).map_err(|e| e.0)
    })
    .await
    .map_err(|e| format!("decoding failed: {e}"))?
}

/// A request's place, taken before its body was read: in the pool's
/// queue, or on its way to its version's batcher.
enum Admitted {
    Pool(
        #[expect(dead_code, reason = "held for its Drop: the admission ends with it")]
        shoal_runtime::Admission,
    ),
    Batch(shoal_runtime::batcher::Arrival),
}

/// A step of a stateful model's sequence, begun: the sequence held (later
/// steps wait), and whether it ends with this step.
struct SequenceStep<'a> {
    guard: crate::sequences::StepGuard<'a>,
    id: shoal_oip::sequence::SequenceId,
    end: bool,
}

fn sequence_error(e: crate::sequences::SequenceError) -> (Outcome, ApiError) {
    match e {
        crate::sequences::SequenceError::Unknown { .. } => {
            (Outcome::InvalidInput, ApiError::bad_request(e.to_string()))
        }
        crate::sequences::SequenceError::TooMany { .. } => (
            Outcome::Overloaded,
            ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
            },
        ),
    }
}

/// Begins the sequence step `request` names, on the version the sequence
/// started on (`serving` becomes that version: state is never fed to
/// another one).
async fn begin_step<'a>(
    replica: &'a Replica,
    serving: &mut Arc<ServingVersion>,
    asked: Option<&str>,
    headers: &HeaderMap,
    request: &shoal_oip::DecodedRequest,
) -> Result<SequenceStep<'a>, (Outcome, ApiError)> {
    let invalid = |e: String| (Outcome::InvalidInput, ApiError::bad_request(e));
    let model = serving.model.to_string();
    let step = shoal_oip::sequence::Step::from_parameters(request.parameters.as_ref())
        .map_err(invalid)?
        .ok_or_else(|| {
            invalid(format!(
                "{model} is a stateful model (state {}): name the sequence with parameters sequence_id, and sequence_start=true on its first step",
                serving.loaded.state()
            ))
        })?;
    // State inputs may come with a start (the sequence's initial state,
    // zeros otherwise), never with a later step.
    if let Some(input) = request
        .inputs
        .iter()
        .find(|t| !step.start && serving.loaded.state().is_state_input(&t.name))
    {
        return Err(invalid(format!(
            "input {:?} is state this replica keeps between steps (state {}); send only the other inputs (state inputs may come with sequence_start=true, as the initial state)",
            input.name,
            serving.loaded.state()
        )));
    }
    let initial = || {
        serving
            .loaded
            .state()
            .initial(serving.loaded.signature())
            .unwrap_or_default()
    };
    // The gateway says when the sequence's last step was answered by
    // another replica: a sequence unknown here was then lost with it.
    let moved_from = headers
        .get(shoal_api::replica::SEQUENCE_FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|from| *from != replica.id());
    let unknown = |e: crate::sequences::SequenceError| match (moved_from, &e) {
        (Some(from), crate::sequences::SequenceError::Unknown { .. }) => (
            Outcome::InvalidInput,
            ApiError::new(
                StatusCode::GONE,
                format!(
                    "sequence {} of {model}: its state was held by replica {from}, which did not take this step (gone or ejected), and is not here{}: start the sequence again with sequence_start=true",
                    step.id,
                    if replica.session_store().is_some() {
                        " nor in the session store"
                    } else {
                        " (the memory session store keeps it in one replica; --session-store redis://… lets any replica continue)"
                    }
                ),
            ),
        ),
        _ => sequence_error(e),
    };
    let sequences = replica.sequences();
    let guard = match sequences
        .begin(&model, &step, serving.version.as_str(), initial)
        .await
    {
        // Not held here: another replica may have left it in the store.
        Err(unknown_error @ crate::sequences::SequenceError::Unknown { .. })
            if replica.session_store().is_some() =>
        {
            let store = replica.session_store().unwrap_or_else(|| unreachable!());
            match store.load(&model, &step.id).await {
                Ok(Some(saved)) => {
                    let held = crate::sequences::Held {
                        state: saved.state,
                        steps: saved.steps,
                        run: saved.run,
                    };
                    if !sequences.adopt(&model, &step.id, &saved.version, held) {
                        return Err(sequence_error(crate::sequences::SequenceError::TooMany {
                            max: sequences.limits().max,
                        }));
                    }
                    sequences
                        .begin(&model, &step, serving.version.as_str(), Vec::new)
                        .await
                        .map_err(sequence_error)?
                }
                Ok(None) => return Err(unknown(unknown_error)),
                Err(e) => {
                    return Err((
                        Outcome::Overloaded,
                        ApiError::unavailable(
                            format!(
                                "sequence {} is not held by this replica and the session store cannot be read ({e}); retry",
                                step.id
                            ),
                            1,
                        ),
                    ));
                }
            }
        }
        other => other.map_err(unknown)?,
    };
    if guard.version() != serving.version.as_str() {
        let started_on = guard.version().to_owned();
        if asked.is_some() {
            return Err((
                Outcome::InvalidInput,
                ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "sequence {} began on {model}:{started_on}; its state cannot feed version {}",
                        step.id, serving.version
                    ),
                ),
            ));
        }
        match replica.store().lookup(&model, Some(&started_on)) {
            Ok(pinned) => *serving = pinned,
            Err(_) => {
                drop(guard);
                replica.sequences().forget(&model, &step.id);
                return Err((
                    Outcome::InvalidInput,
                    ApiError::new(
                        StatusCode::GONE,
                        format!(
                            "sequence {} began on {model}:{started_on}, which this replica no longer serves, and its state cannot feed another version: start the sequence again (sequence_start=true)",
                            step.id
                        ),
                    ),
                ));
            }
        }
    }
    Ok(SequenceStep {
        guard,
        id: step.id,
        end: step.end,
    })
}

async fn run_inference(
    replica: &Replica,
    serving: &ServingVersion,
    mut request: shoal_oip::DecodedRequest,
    step: Option<SequenceStep<'_>>,
    admitted: Admitted,
) -> Result<shoal_oip::EncodedResponse, (Outcome, ApiError)> {
    let invalid = |e: String| (Outcome::InvalidInput, ApiError::bad_request(e));
    let signature = serving.loaded.signature();
    // Resolve requested outputs before running, so a typo costs no inference.
    let selected: Option<Vec<String>> = match &request.outputs {
        None => None,
        Some(wanted) => Some(
            wanted
                .iter()
                .map(|o| {
                    signature
                        .outputs
                        .iter()
                        .find(|s| s.name == o.name)
                        .map(|s| s.name.clone())
                        .ok_or_else(|| {
                            let names: Vec<String> = signature
                                .outputs
                                .iter()
                                .map(|s| format!("{:?}", s.name))
                                .collect();
                            invalid(format!(
                                "unknown output {:?}; the model's outputs are {}",
                                o.name,
                                names.join(", ")
                            ))
                        })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    // One model's requests may not take every thread from the others, and
    // none may wait or run past the replica's deadline.
    let share = shoal_runtime::Share {
        key: serving.model.as_str(),
        cap: replica
            .pool()
            .cap_for(replica.store().snapshot().models.len()),
        deadline: replica.inference_timeout(),
    };
    let inputs = std::mem::take(&mut request.inputs);
    // The admission ends when the request reaches the pool or the batcher
    // (a sequence step may run again: only its first run holds it).
    let admitted = std::sync::Mutex::new(Some(admitted));
    let run = |inputs: Vec<Tensor>| async {
        let admitted = admitted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let ran = match (&serving.batcher, admitted) {
            (Some(batcher), Some(Admitted::Batch(arrival))) => {
                batcher.run(inputs, Some(arrival)).await
            }
            (Some(batcher), _) => batcher.run(inputs, None).await,
            (None, admitted) => {
                drop(admitted);
                replica
                    .pool()
                    .run_shared(&serving.loaded, inputs, share)
                    .await
            }
        };
        ran.map_err(|e| match e {
            RunError::Input(e) => invalid(e.to_string()),
            RunError::Overloaded { .. } | RunError::Busy { .. } => {
                (Outcome::Overloaded, ApiError::unavailable(e.to_string(), 1))
            }
            RunError::DeadlineExceeded { .. } => (
                Outcome::Error,
                ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string())
                },
            ),
            RunError::Engine(cause) => (Outcome::Error, ApiError::internal(cause)),
        })
    };
    let outputs = match step {
        None => run(inputs).await?,
        Some(step) => {
            let return_state = request
                .parameters
                .as_ref()
                .and_then(|p| p.get("shoal_return_state"))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            sequence_step(replica, serving, step, inputs, return_state, run).await?
        }
    };
    let outputs: Vec<Tensor> = match selected {
        None => outputs,
        Some(names) => names
            .iter()
            .filter_map(|n| outputs.iter().find(|t| &t.name == n).cloned())
            .collect(),
    };
    Ok(shoal_oip::encode_response_parts(
        serving.model.as_str(),
        Some(serving.version.as_str()),
        request.id.as_deref(),
        &outputs,
        |name| request.binary_output(name),
    ))
}

/// Runs one step of a sequence: the client's inputs with the sequence's
/// state; the new state kept for the next step (and, with a shared store,
/// written through: if another replica advanced the sequence meanwhile,
/// the step runs again on the state it left, so the answer is the one the
/// sequence's history gives). What the client gets: the outputs without
/// the state, unless `return_state`.
async fn sequence_step<F, Fut>(
    replica: &Replica,
    serving: &ServingVersion,
    step: SequenceStep<'_>,
    inputs: Vec<Tensor>,
    return_state: bool,
    run: F,
) -> Result<Vec<Tensor>, (Outcome, ApiError)>
where
    F: Fn(Vec<Tensor>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Tensor>, (Outcome, ApiError)>>,
{
    use crate::session_store::{Saved, Written};
    let SequenceStep { mut guard, id, end } = step;
    let model = serving.model.as_str();
    let state = serving.loaded.state();
    let mut reruns = 0;
    loop {
        let mut all = inputs.clone();
        // Given state (with a start) replaces the initial zeros.
        all.extend(
            guard
                .state()
                .iter()
                .filter(|t| !inputs.iter().any(|i| i.name == t.name))
                .cloned(),
        );
        let outputs = run(all).await?;
        let everything = return_state.then(|| outputs.clone());
        let (answer, next) = state
            .split(outputs)
            .map_err(|e| (Outcome::Error, ApiError::internal(e)))?;
        if let Some(store) = replica.session_store() {
            // A start replaces whatever the store holds under this id.
            let saved = Saved {
                version: guard.version().to_owned(),
                run: guard.run(),
                steps: guard.steps() + 1,
                state: next.clone(),
            };
            let written = store
                .save(model, &id, guard.steps(), guard.starts(), &saved)
                .await;
            if let Ok(Written::Ended) = written {
                drop(guard);
                replica.sequences().forget(model, &id);
                return Err(sequence_error(crate::sequences::SequenceError::Unknown {
                    model: model.to_owned(),
                    id,
                    idle_secs: replica.sequences().limits().idle.as_secs(),
                }));
            }
            if let Ok(Written::Behind) = written {
                let newer = store.load(model, &id).await.ok().flatten();
                match newer {
                    Some(newer) if reruns < 3 && newer.version == guard.version() => {
                        tracing::info!(%model, sequence = %id, here = guard.steps(), store = newer.steps, "sequence advanced on another replica; running the step on its state");
                        guard.catch_up(crate::sequences::Held {
                            state: newer.state,
                            steps: newer.steps,
                            run: newer.run,
                        });
                        replica.metrics.sequence_steps_rerun.inc();
                        reruns += 1;
                        continue;
                    }
                    _ => {
                        return Err((
                            Outcome::Error,
                            ApiError::new(
                                StatusCode::CONFLICT,
                                format!(
                                    "sequence {id} moved on elsewhere while this step ran, and its newer state cannot be read back; retry the step"
                                ),
                            ),
                        ));
                    }
                }
            }
            if end {
                let _ = store.end(model, &id).await;
            }
        }
        guard.finish(next, end);
        return Ok(everything.unwrap_or(answer));
    }
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
    replica.set_fault(&format!("{model}:{version}"), Some(fault.clone()));
    Ok(json_response(StatusCode::OK, &fault))
}

async fn admin_clear_fault(
    State(replica): Shared,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    replica.set_fault(&format!("{model}:{version}"), None);
    json_response(
        StatusCode::OK,
        &serde_json::json!({"cleared": format!("{model}:{version}")}),
    )
}
