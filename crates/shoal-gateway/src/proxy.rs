//! Forwarding: the OIP routes of the gateway.
//!
//! An inference request is checked (key, rate, size, structure), given a
//! version (pinned in the path, or chosen by the model's weights, keeping a
//! user on one version), and sent to a replica serving that version, picked
//! by session key or by power of two choices. Connection failures, resets,
//! timeouts and 5xx eject or penalise the replica and the request is
//! retried on another one while the retry budget (a share of requests plus
//! a floor per second) allows; a request that never left (no connection)
//! is retried without budget. With hedging on, a second copy goes to
//! another replica once the model's p95 has passed; the first good answer
//! wins and the other is cancelled. The policies themselves are in
//! [`crate::policy`]. Answers name the replica that answered
//! (`x-shoal-replica`), those that failed before it (`x-shoal-retried-from`)
//! and the one a winning hedge beat (`x-shoal-hedged-from`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use shoal_api::VersionKey;
use shoal_api::replica::REPLICA_HEADER;
use shoal_balance::health::Failure;
use shoal_http::extract::Path;
use shoal_http::{Answer, ApiError, Headers, RequestBody, RequestHeaders, json_response};
use shoal_oip::ServerMetadata;
use tokio::time::Instant;
use tower::retry::budget::Budget;

use crate::Gateway;
use crate::learn::Mirrored;
use crate::policy::{self, Answered, Next, Retry, Step};
use crate::protect::Refusal;
use crate::routes::{Endpoint, NoRoute, RoutingState};
use crate::upstream;

type Shared = State<Arc<Gateway>>;

/// Header names read or written on every request, parsed once: a `&str`
/// name is parsed (checked and lowercased) on every lookup.
const BINARY: HeaderName = HeaderName::from_static(shoal_oip::BINARY_HEADER);
const REPLICA: HeaderName = HeaderName::from_static(REPLICA_HEADER);
const RETRIED_FROM: HeaderName = HeaderName::from_static("x-shoal-retried-from");
const HEDGED_FROM: HeaderName = HeaderName::from_static("x-shoal-hedged-from");

/// A placeholder in a fixed array of upstream headers.
static EMPTY: HeaderValue = HeaderValue::from_static("");

/// Most attempts for one request (the budget usually stops earlier).
const MAX_ATTEMPTS: usize = 3;

/// The gateway's routes.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let routes = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/health", get(live))
        .route("/v2/health/ready", get(oip_ready))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v2/models/{model}", get(model_get))
        .route("/v2/models/{model}/ready", get(model_get))
        .route("/v2/models/{model}/versions/{version}", get(version_get))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(version_get),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/feedback", post(feedback))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer_version),
        );
    shoal_http::with_fallbacks(routes).with_state(gateway)
}

/// The inference routes, taken before the router (see
/// [`shoal_http::Front`]): what [`infer`] and [`infer_version`] do, without
/// the router's matching, extensions and extractors on the path every
/// proxied request takes. Anything else, and paths with percent-encoded
/// names (which the router decodes), go to the router.
pub fn front(gateway: Arc<Gateway>) -> shoal_http::Front {
    Arc::new(move |inference: shoal_http::Inference| {
        Box::pin(infer_common(
            gateway.clone(),
            inference.model,
            inference.version,
            inference.peer,
            inference.headers,
            Ok(inference.body),
            None,
        ))
    })
}

async fn server_metadata() -> Response {
    json_response(StatusCode::OK, &ServerMetadata::shoal())
}

async fn live() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"live": true}))
}

pub(crate) fn any_available(gateway: &Gateway) -> bool {
    let now = gateway.now();
    gateway
        .routes
        .snapshot()
        .endpoints
        .iter()
        .any(|e| e.available(now))
}

async fn oip_ready(State(gateway): Shared) -> Response {
    let ready = any_available(&gateway);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    json_response(status, &serde_json::json!({"ready": ready}))
}

async fn ready(State(gateway): Shared) -> Response {
    let ready = any_available(&gateway);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let endpoints = gateway.routes.snapshot().endpoints.len();
    json_response(
        status,
        &serde_json::json!({"ready": ready, "endpoints": endpoints}),
    )
}

async fn metrics(State(gateway): Shared) -> Response {
    let mut response = gateway.encode_metrics().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(shoal_telemetry::CONTENT_TYPE),
    );
    response
}

/// What one attempt against one replica produced.
enum Attempt {
    /// An answer that is final (2xx, 4xx), its round trip, and the model
    /// version that answered (`x-shoal-model-version`), read once.
    Answer(Answer, Duration, Option<String>),
    /// A 5xx answer: retryable.
    ServerError(Answer),
    /// A 404 from a replica the gateway believed served the model version:
    /// the gateway's view is stale (the replica just unloaded it); another
    /// replica may serve it.
    Stale(Answer),
    /// No answer: connection failure, reset or timeout.
    Failed(Failure, String),
}

impl Attempt {
    fn is_final(&self) -> bool {
        matches!(self, Attempt::Answer(..))
    }
}

/// A request body as the gateway forwards it: JSON, or JSON and binary
/// tensors with the length of the JSON part (Triton's binary extension).
#[derive(Debug, Clone, Default)]
struct Payload {
    body: Bytes,
    json_len: Option<HeaderValue>,
    /// The replica that answered the sequence's last step, when this
    /// attempt goes to another (`x-shoal-sequence-from`).
    sequence_from: Option<HeaderValue>,
}

/// The `Inference-Header-Content-Length` of a response, if it has binary
/// outputs.
fn json_len_of(answer: &Answer) -> Option<String> {
    answer
        .header(shoal_oip::BINARY_HEADER)
        .and_then(shoal_http::header_str)
        .map(str::to_owned)
}

async fn send(
    gateway: &Gateway,
    endpoint: &Arc<Endpoint>,
    method: Method,
    path: &str,
    payload: &Payload,
) -> Attempt {
    let _in_flight = endpoint.start();
    let started = Instant::now();
    let mut headers: [(&str, &HeaderValue); 2] = [("", &EMPTY); 2];
    let mut count = 0;
    let content_type = match &payload.json_len {
        None => "application/json",
        Some(len) => {
            headers[count] = (shoal_oip::BINARY_HEADER, len);
            count += 1;
            "application/octet-stream"
        }
    };
    if let Some(from) = &payload.sequence_from {
        headers[count] = (crate::homes::SEQUENCE_FROM, from);
        count += 1;
    }
    let request = upstream::Request {
        method: &method,
        path,
        content_type,
        headers: &headers[..count],
        body: &payload.body,
        started,
    };
    // Two clock readings for the whole attempt: the deadline, the pool's
    // bookkeeping, the round trip and the balancer's clock come from them.
    // A timeout past the clock's end waits 30 years, as tokio's own does.
    let deadline = started
        .checked_add(gateway.config.request_timeout)
        .unwrap_or_else(|| started + Duration::from_secs(86_400 * 365 * 30));
    let exchange = endpoint
        .upstream
        .send(&request, gateway.config.connect_timeout);
    let outcome = tokio::time::timeout_at(deadline, exchange)
        .await
        .map(|answer| {
            answer.map_err(|e| match e {
                upstream::Error::Connect(reason) => (Failure::Connect, reason),
                upstream::Error::Exchange(reason) => (Failure::Reset, reason),
            })
        });
    let ended = Instant::now();
    let rtt = ended.saturating_duration_since(started);
    let now = gateway.at(ended);
    let policy = gateway.routes.policy();
    match outcome {
        Err(_) => {
            if endpoint.failed(Failure::Timeout, rtt, now, policy) {
                gateway.metrics.ejected(&endpoint.id, "timeout");
            }
            Attempt::Failed(
                Failure::Timeout,
                format!("no answer within {:?}", gateway.config.request_timeout),
            )
        }
        Ok(Err((kind, reason))) => {
            if endpoint.failed(kind, rtt, now, policy) {
                gateway.metrics.ejected(
                    &endpoint.id,
                    if kind == Failure::Connect {
                        "connect"
                    } else {
                        "reset"
                    },
                );
            }
            Attempt::Failed(kind, reason)
        }
        Ok(Ok(answer)) => {
            let upstream::Reply {
                answer: mut response,
                version,
            } = answer;
            if let Some(v) = &endpoint.id_header {
                response.push(&REPLICA, v);
            }
            // 5xx are blamed on the model version that answered, not the
            // replica: a bad version must not eject replicas that serve
            // other versions well.
            let version = version.as_deref();
            let answered = version.zip(model_of(path));
            if response.status() == StatusCode::NOT_FOUND {
                return Attempt::Stale(response);
            }
            if response.status().is_server_error() {
                // The key is built only here, on the failure path.
                let key = answered.and_then(|(v, m)| VersionKey::parse(m, v).ok());
                let ejected = match &key {
                    Some(key) => endpoint.version_failed(key, rtt, now, policy),
                    None => endpoint.failed(Failure::ServerError, rtt, now, policy),
                };
                if ejected {
                    gateway.metrics.ejected(&endpoint.id, "server_errors");
                }
                Attempt::ServerError(response)
            } else {
                endpoint.succeeded(rtt, now, policy);
                if let Some((version, model)) = answered {
                    endpoint.version_succeeded(model, version, now, policy);
                }
                let version = version.map(str::to_owned);
                Attempt::Answer(response, rtt, version)
            }
        }
    }
}

/// The replica's inference path for `model` (and `version`), joined
/// without `format!`'s machinery: it is built for every attempt.
fn upstream_path(model: &str, version: Option<&str>) -> String {
    const MODELS: &str = "/v2/models/";
    const VERSIONS: &str = "/versions/";
    const INFER: &str = "/infer";
    let version_len = version.map_or(0, |v| VERSIONS.len() + v.len());
    let mut path = String::with_capacity(MODELS.len() + model.len() + version_len + INFER.len());
    path.push_str(MODELS);
    path.push_str(model);
    if let Some(v) = version {
        path.push_str(VERSIONS);
        path.push_str(v);
    }
    path.push_str(INFER);
    path
}

/// The model in an upstream path `/v2/models/{model}/…`.
fn model_of(path: &str) -> Option<&str> {
    path.strip_prefix("/v2/models/")?.split('/').next()
}

fn no_route(model: &str, version: Option<&str>, why: NoRoute) -> ApiError {
    let what = match version {
        Some(v) => format!("{model}:{v}"),
        None => model.to_owned(),
    };
    match why {
        NoRoute::UnknownModel => ApiError::not_found(format!("no replica serves {what}")),
        NoRoute::NoneAvailable => {
            ApiError::unavailable(format!("no healthy replica serves {what} right now"), 1)
        }
    }
}

/// A header's value as text, unless it is empty or not text.
fn nonempty_text(value: Option<&[u8]>) -> Option<&str> {
    value
        .and_then(shoal_http::header_str)
        .filter(|v| !v.is_empty())
}

/// Sends to `first`, and after the hedge delay to a second replica too,
/// picked from `others` by load at that moment (so hedges spread like
/// requests do) if the retry budget allows; see [`policy::hedge`].
async fn hedged<'s>(
    gateway: &Gateway,
    model: &str,
    first: &'s Arc<Endpoint>,
    others: &[&'s Arc<Endpoint>],
    path: &str,
    payload: &Payload,
) -> (Attempt, &'s Arc<Endpoint>) {
    let delay = gateway
        .config
        .hedge
        .then(|| gateway.latencies.p95(model))
        .flatten()
        .filter(|_| others.iter().any(|e| e.id != first.id));
    let Some(delay) = delay else {
        // Not hedged: the request's future holds one exchange, not the two
        // (and a timer) a hedge needs.
        return (
            send(gateway, first, Method::POST, path, payload).await,
            first,
        );
    };
    let mut second = None;
    let backup = || {
        let others: Vec<&Arc<Endpoint>> = others
            .iter()
            .filter(|e| e.id != first.id)
            .copied()
            .collect();
        let picked = gateway
            .routes
            .least_loaded(&others, &mut rand::rng(), gateway.now())
            .filter(|_| gateway.budget.withdraw())?;
        gateway.metrics.hedge(model);
        gateway.metrics.attempt(model);
        second = Some(picked);
        Some(async move { send(gateway, picked, Method::POST, path, payload).await })
    };
    // Boxed: two exchanges and a timer are too large to carry in every
    // request's future, hedged or not.
    let (attempt, answered) = Box::pin(policy::hedge(
        send(gateway, first, Method::POST, path, payload),
        Some(delay),
        backup,
        Attempt::is_final,
    ))
    .await;
    match (answered, second) {
        (Answered::Backup, Some(second)) => (attempt, second),
        _ => (attempt, first),
    }
}

/// The version this request is copied to, if the model has a shadow and
/// the dice say this request is among its share.
fn shadow_version(state: &RoutingState, model: &str) -> Option<String> {
    let shadow = state.policies.get(model)?.shadow.as_ref()?;
    (shadow.percent > 0 && rand::random::<f64>() * 100.0 < f64::from(shadow.percent))
        .then(|| shadow.version.clone())
}

/// The primary's answer (body, binary JSON length, time), for the shadow to
/// be compared with.
type PrimaryAnswer = tokio::sync::oneshot::Sender<(Bytes, Option<String>, Duration)>;

/// Copies the request to the shadow `version` now, so both versions see the
/// same load at the same time; once the primary's answer arrives through
/// the returned sender, compares the two answers. Users never wait for, or
/// see, the shadow's answer.
fn mirror(gateway: &Arc<Gateway>, model: &str, version: String, payload: Payload) -> PrimaryAnswer {
    let (tx, rx) = tokio::sync::oneshot::channel::<(Bytes, Option<String>, Duration)>();
    let gateway = gateway.clone();
    let model = model.to_owned();
    tokio::spawn(async move {
        let now = gateway.now();
        let state = gateway.routes.snapshot();
        let endpoint = gateway
            .routes
            .candidates(&state, &model, Some(&version), &[], now)
            .ok()
            .and_then(|c| gateway.routes.pick(&c, None, &mut rand::rng(), now));
        let Some(endpoint) = endpoint else {
            gateway.metrics.shadowed(&model, "no_replica");
            gateway.learning.shadowed(&model, Mirrored::CandidateFailed);
            return;
        };
        let path = format!("/v2/models/{model}/versions/{version}/infer");
        let candidate = match send(&gateway, endpoint, Method::POST, &path, &payload).await {
            Attempt::Answer(r, rtt, _) if r.status().is_success() => {
                gateway.metrics.shadowed(&model, "success");
                let json_len = json_len_of(&r);
                Some((r.into_body(), json_len, rtt))
            }
            Attempt::Answer(..) => {
                gateway.metrics.shadowed(&model, "client_error");
                None
            }
            _ => {
                gateway.metrics.shadowed(&model, "error");
                None
            }
        };
        let candidate = candidate.and_then(|(bytes, json_len, rtt)| {
            shoal_oip::decode_response_parts(&bytes, json_len.as_deref())
                .ok()
                .map(|d| (d.outputs, rtt))
        });
        let Some((candidate, candidate_rtt)) = candidate else {
            gateway.learning.shadowed(&model, Mirrored::CandidateFailed);
            return;
        };
        let primary = rx.await.ok().and_then(|(bytes, json_len, rtt)| {
            shoal_oip::decode_response_parts(&bytes, json_len.as_deref())
                .ok()
                .map(|d| (d.outputs, rtt))
        });
        let outcome = match primary {
            Some((primary, primary_rtt)) => {
                let c = shoal_core::compare::compare(&primary, &candidate);
                gateway
                    .metrics
                    .compared(&model, &c, primary_rtt, candidate_rtt);
                Mirrored::Compared(
                    c,
                    (candidate_rtt.as_secs_f64() - primary_rtt.as_secs_f64()) * 1000.0,
                )
            }
            None => Mirrored::Uncompared,
        };
        gateway.learning.shadowed(&model, outcome);
    });
    tx
}

/// `POST /v2/models/{model}/feedback`: the reward for an earlier
/// prediction, credited to the version that made it (found by the
/// request's `id` or the user's split key).
async fn feedback(
    State(gateway): Shared,
    Path(model): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    gateway
        .protection
        .admit(&headers, Some(peer))
        .map_err(|refusal| refusal_error(&gateway, refusal))?;
    let body = shoal_http::read_body(body, 64 * 1024).await?;
    let feedback: shoal_api::traffic::Feedback = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid feedback: {e}; expected {{\"id\": \"<request id>\" or \"user\": \"<split key>\", \"reward\": <number>}}"
        ))
    })?;
    if !feedback.reward.is_finite() {
        return Err(ApiError::bad_request(
            "invalid feedback: reward must be a finite number",
        ));
    }
    let (id, user) = (feedback.id.as_deref(), feedback.user.as_deref());
    if id.is_none() && user.is_none() {
        return Err(ApiError::bad_request(
            "invalid feedback: give the \"id\" of the inference request or the \"user\" it was for",
        ));
    }
    let Some(version) = gateway.learning.version_of(&model, id, user) else {
        let what = match (id, user) {
            (Some(id), _) => format!("request id {id:?}"),
            (None, Some(user)) => format!("user {user:?}"),
            (None, None) => unreachable!("checked above"),
        };
        return Err(ApiError::not_found(format!(
            "this gateway has no recent {model} prediction for {what}; feedback must go to the gateway that answered, which remembers the last {} requests",
            crate::learn::REMEMBERED
        )));
    };
    gateway.learning.reward(&model, &version, feedback.reward);
    gateway.metrics.rewarded(&model, &version, feedback.reward);
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"model": model, "version": version, "reward": feedback.reward}),
    ))
}

pub(crate) fn refusal_error(gateway: &Gateway, refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::Unauthorized(m) => ApiError::new(StatusCode::UNAUTHORIZED, m),
        Refusal::RateLimited {
            key,
            label,
            retry_after,
        } => {
            gateway.metrics.limited(&label);
            ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("rate limit exceeded for {key}; retry after {retry_after}s"),
                )
            }
        }
    }
}

async fn infer(
    State(gateway): Shared,
    Path(model): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (headers, body) = (RequestHeaders::Map(headers), RequestBody::Streamed(body));
    infer_common(gateway, model, None, peer, headers, Ok(body), None)
        .await
        .into_response()
}

async fn infer_version(
    State(gateway): Shared,
    Path((model, version)): Path<(String, String)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (headers, body) = (RequestHeaders::Map(headers), RequestBody::Streamed(body));
    infer_common(gateway, model, Some(version), peer, headers, Ok(body), None)
        .await
        .into_response()
}

/// Routes one inference and counts its answer. `body` is the REST body,
/// or why a request that came another way (gRPC) could not become one:
/// answered and counted like any refused request. `admitted` is the
/// caller, when its API key and rate limit were checked already (gRPC
/// checks them before decoding the message).
pub(crate) async fn infer_common(
    gateway: Arc<Gateway>,
    model: String,
    pinned: Option<String>,
    peer: SocketAddr,
    headers: RequestHeaders,
    body: Result<RequestBody, ApiError>,
    admitted: Option<String>,
) -> Answer {
    let started = Instant::now();
    let result = match body {
        Ok(body) => {
            let call = Call {
                model: &model,
                pinned: pinned.as_deref(),
                peer,
                headers: &headers,
                admitted,
                started,
            };
            route_inference(&gateway, call, body).await
        }
        Err(e) => Err(e),
    };
    let (response, version, served) = match result {
        Ok(r) => (r.response, r.version, r.served),
        Err(e) => (e.into_answer(), pinned.clone().unwrap_or_default(), false),
    };
    // Labels come from the routing state, never from the request alone:
    // a scanner asking for random model names must not mint a time series
    // per name. A replica's answer is the routing state's word already:
    // the model was routed to it, and the version is the one it served.
    let (model_label, version_label) = if served {
        (model.as_str(), version.as_str())
    } else {
        metric_labels(&gateway.routes.snapshot(), &model, &version)
    };
    gateway.metrics.answered(
        model_label,
        version_label,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Label for requests to models or versions the gateway does not route.
pub(crate) const OTHER: &str = "other";

/// The metric labels of a request for `model`/`version`: themselves when
/// the routing state knows them (a policy names them or an endpoint serves
/// them), else [`OTHER`].
pub(crate) fn metric_labels<'a>(
    state: &crate::routes::RoutingState,
    model: &'a str,
    version: &'a str,
) -> (&'a str, &'a str) {
    let policy = state.policies.get(model);
    let known_model = policy.is_some() || state.endpoints.iter().any(|e| e.serves_model(model));
    if !known_model {
        return (OTHER, OTHER);
    }
    if version.is_empty() {
        return (model, version);
    }
    let known_version = policy.is_some_and(|p| {
        p.targets.iter().any(|t| t.version == version)
            || p.shadow.as_ref().is_some_and(|s| s.version == version)
    }) || {
        state
            .endpoints
            .iter()
            .any(|e| e.serves_version(model, version))
    };
    (model, if known_version { version } else { OTHER })
}

/// What [`route_inference`] came to.
struct Routed {
    response: Answer,
    /// The model version that answered (or was asked for).
    version: String,
    /// A replica served it: a final answer, not a stale route's 404.
    served: bool,
}

/// Who asks what of [`route_inference`].
struct Call<'a> {
    model: &'a str,
    pinned: Option<&'a str>,
    peer: SocketAddr,
    headers: &'a RequestHeaders,
    /// The caller, if already admitted.
    admitted: Option<String>,
    /// When the request came: the first attempt's clock (a reading saved).
    started: Instant,
}

async fn route_inference(
    gateway: &Arc<Gateway>,
    call: Call<'_>,
    body: RequestBody,
) -> Result<Routed, ApiError> {
    let Call {
        model,
        pinned,
        peer,
        headers,
        admitted,
        started,
    } = call;
    let who = match admitted {
        Some(who) => who,
        None => gateway
            .protection
            .admit(headers, Some(peer))
            .map_err(|refusal| refusal_error(gateway, refusal))?,
    };
    // The headers routing reads, in one pass.
    let [json_len, split, session] =
        headers.find([&BINARY, &gateway.split_header, &gateway.session_header]);
    let json_len_text = shoal_http::text_of(&BINARY, json_len)?;
    // Forwarded as it came; text, as checked just now.
    let json_len = json_len_text.and_then(|text| HeaderValue::from_str(text).ok());
    body.check_declared(headers, gateway.config.body_limit)?;
    let body = body.read(gateway.config.body_limit).await?;
    let prechecked =
        shoal_oip::precheck_request_parts(&body, json_len_text, &shoal_oip::Limits::default())
            .map_err(|e| ApiError::bad_request(e.0))?;
    let request_id = prechecked.id;
    // Every step of a sequence goes to one replica, which holds its state
    // (or, with a shared session store, whichever the hash picks).
    let sequence_end = prechecked.sequence.as_ref().is_some_and(|s| s.end);
    let sequence_key = prechecked.sequence.map(|s| s.id.key());
    let payload = Payload {
        body,
        json_len,
        sequence_from: None,
    };
    // Only the JSON part: binary tensors are not text.
    let (json_part, _) = shoal_oip::binary::split_body(&payload.body, json_len_text)
        .map_err(|e| ApiError::bad_request(e.0))?;
    gateway.protection.log_payload(model, &who, json_part);

    let state = gateway.routes.snapshot();
    let policy = state.policies.get(model);
    let split_key = match policy.and_then(|p| p.split_header.as_deref()) {
        Some(name) => nonempty_text(headers.first_named(name)),
        None => nonempty_text(split),
    };
    let session_key = sequence_key.as_deref().or_else(|| nonempty_text(session));
    let version: Option<String> = match pinned {
        Some(v) => Some(v.to_owned()),
        None => gateway
            .routes
            .choose_version(&state, model, split_key, &mut rand::rng()),
    };
    let mut primary_answer = pinned
        .is_none()
        .then(|| shadow_version(&state, model))
        .flatten()
        .map(|shadow| mirror(gateway, model, shadow, payload.clone()));

    let mut tried: Vec<String> = Vec::new();
    let mut retry = Retry::new(MAX_ATTEMPTS, Some(&gateway.budget));
    loop {
        let step: Step<Routed, ApiError> = 'attempt: {
            // The request's arrival is the first attempt's clock: routing
            // state ages in seconds, not in the microseconds since.
            let now = if tried.is_empty() {
                gateway.at(started)
            } else {
                gateway.now()
            };
            // The chosen version first; if no replica can take it and the
            // request did not pin one, any version of the model rather than
            // failing the request.
            let (candidates, target) =
                match gateway
                    .routes
                    .candidates(&state, model, version.as_deref(), &tried, now)
                {
                    Ok(c) => (c, version.clone()),
                    Err(why) if pinned.is_none() && version.is_some() => {
                        match gateway.routes.candidates(&state, model, None, &tried, now) {
                            Ok(c) => (c, None),
                            Err(_) => {
                                break 'attempt Step::Stop(no_route(
                                    model,
                                    version.as_deref(),
                                    why,
                                ));
                            }
                        }
                    }
                    Err(why) => {
                        break 'attempt Step::Stop(no_route(model, version.as_deref(), why));
                    }
                };
            let Some(endpoint) =
                gateway
                    .routes
                    .pick(&candidates, session_key, &mut rand::rng(), now)
            else {
                break 'attempt Step::Stop(no_route(
                    model,
                    target.as_deref(),
                    NoRoute::NoneAvailable,
                ));
            };
            // Sticky sessions are not hedged: the session lives on one replica.
            let hedge_to: &[&Arc<Endpoint>] = if session_key.is_none() {
                &candidates
            } else {
                &[]
            };
            let path = upstream_path(model, target.as_deref());
            gateway.metrics.attempt(model);
            // A sequence whose last step another replica answered: say which,
            // so that a replica without its state can say the state was lost.
            let moved = sequence_key.as_deref().and_then(|key| {
                gateway
                    .homes
                    .home(key, now)
                    .filter(|home| *home != endpoint.id)
                    .and_then(|home| HeaderValue::from_str(&home).ok())
            });
            let moved_payload;
            let attempt_payload = match moved {
                None => &payload,
                Some(from) => {
                    moved_payload = Payload {
                        sequence_from: Some(from),
                        ..payload.clone()
                    };
                    &moved_payload
                }
            };
            let (outcome, answered_by) =
                hedged(gateway, model, endpoint, hedge_to, &path, attempt_payload).await;
            let step = match outcome {
                Attempt::Answer(mut response, rtt, answered_version) => {
                    if gateway.config.hedge {
                        // Only hedging reads the latency windows.
                        gateway.latencies.record(model, rtt);
                    }
                    if !tried.is_empty() {
                        // Which replicas failed this request before the one that
                        // answered: retries are visible to whoever looks.
                        if let Ok(v) = HeaderValue::from_str(&tried.join(",")) {
                            response.push(&RETRIED_FROM, &v);
                        }
                    }
                    if answered_by.id != endpoint.id {
                        // A hedge answered: which replica it beat.
                        if let Ok(v) = HeaderValue::from_str(&endpoint.id) {
                            response.push(&HEDGED_FROM, &v);
                        }
                    }
                    let version = answered_version.or(target).unwrap_or_default();
                    if let Some(tx) = primary_answer.take()
                        && response.status().is_success()
                    {
                        let json_len = json_len_of(&response);
                        let _ = tx.send((response.body().clone(), json_len, rtt));
                    }
                    // Remembered for feedback to find the version it rewards.
                    gateway
                        .learning
                        .served(model, &version, request_id.as_deref(), split_key);
                    if let Some(key) = &sequence_key
                        && response.status().is_success()
                    {
                        gateway
                            .homes
                            .answered(key, &answered_by.id, sequence_end, gateway.now());
                    }
                    break 'attempt Step::Done(Routed {
                        response,
                        version,
                        served: true,
                    });
                }
                Attempt::Stale(response) => {
                    // Not the replica's fault: forget that it serves this
                    // version and try another.
                    if let Some(v) = &target {
                        answered_by.forget(model, v);
                    }
                    gateway.metrics.retry(model, "stale_route");
                    Step::Stale(Routed {
                        response,
                        version: version.clone().unwrap_or_default(),
                        served: false,
                    })
                }
                Attempt::ServerError(response) => {
                    Step::Failed("server_error", server_error(&answered_by.id, &response))
                }
                Attempt::Failed(kind, detail) => {
                    let status = if kind == Failure::Timeout {
                        StatusCode::GATEWAY_TIMEOUT
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    let error = ApiError::new(
                        status,
                        format!("replica {} failed: {detail}", answered_by.id),
                    );
                    match kind {
                        Failure::Timeout => Step::Failed("timeout", error),
                        Failure::Connect => Step::Unsent("connect", error),
                        _ => Step::Failed("reset", error),
                    }
                }
            };
            if let Step::Failed(reason, _) | Step::Unsent(reason, _) = &step {
                tracing::debug!(model, replica = %answered_by.id, reason, "attempt failed");
            }
            tried.push(answered_by.id.clone());
            step
        };
        match retry.next(step) {
            Next::Again(Some(reason)) => gateway.metrics.retry(model, reason),
            Next::Again(None) => {}
            Next::Finish(result) => return result,
        }
    }
}

/// The error a replica's 5xx becomes: its status (503 asks the client to
/// come back in a second) and its message, naming the replica.
fn server_error(replica: &str, answer: &Answer) -> ApiError {
    let (status, message) = error_of(answer);
    ApiError {
        retry_after: (status == StatusCode::SERVICE_UNAVAILABLE).then_some(1),
        ..ApiError::new(
            status,
            format!("replica {replica} answered {status}: {message}"),
        )
    }
}

/// A failed answer's status and the message of its `{"error": …}` body
/// (the status's own text when the body has none).
pub(crate) fn error_of(answer: &Answer) -> (StatusCode, String) {
    let status = answer.status();
    let message = serde_json::from_slice::<serde_json::Value>(answer.body())
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| status.to_string());
    (status, message)
}

/// Metadata and readiness: any replica serving the model answers (retried
/// on others without budget: reads are cheap).
pub(crate) async fn forward_get(
    gateway: &Gateway,
    model: &str,
    version: Option<&str>,
    path: &str,
) -> Answer {
    let state = gateway.routes.snapshot();
    let mut tried = Vec::new();
    let mut retry = Retry::new(MAX_ATTEMPTS, None);
    loop {
        let step: Step<Answer, Answer> = 'attempt: {
            let now = gateway.now();
            let candidates = match gateway
                .routes
                .candidates(&state, model, version, &tried, now)
            {
                Ok(c) => c,
                Err(why) => {
                    break 'attempt Step::Stop(no_route(model, version, why).into_answer());
                }
            };
            let Some(endpoint) = gateway
                .routes
                .pick(&candidates, None, &mut rand::rng(), now)
            else {
                break 'attempt Step::Stop(
                    no_route(model, version, NoRoute::NoneAvailable).into_answer(),
                );
            };
            tried.push(endpoint.id.clone());
            match send(gateway, endpoint, Method::GET, path, &Payload::default()).await {
                Attempt::Answer(answer, ..) | Attempt::Stale(answer) => Step::Done(answer),
                Attempt::ServerError(answer) => Step::Failed("server_error", answer),
                Attempt::Failed(kind, detail) => {
                    let error = ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        format!("replica {} failed: {detail}", endpoint.id),
                    )
                    .into_answer();
                    if kind == Failure::Connect {
                        Step::Unsent("connect", error)
                    } else {
                        Step::Failed("reset", error)
                    }
                }
            }
        };
        if let Next::Finish(result) = retry.next(step) {
            return result.unwrap_or_else(|response| response);
        }
    }
}

async fn model_get(State(gateway): Shared, Path(model): Path<String>, uri: http::Uri) -> Response {
    forward_get(&gateway, &model, None, uri.path())
        .await
        .into_response()
}

async fn version_get(
    State(gateway): Shared,
    Path((model, version)): Path<(String, String)>,
    uri: http::Uri,
) -> Response {
    forward_get(&gateway, &model, Some(&version), uri.path())
        .await
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::{model_of, upstream_path};
    use crate::{Gateway, GatewayConfig};

    /// A request a replica that is gone was picked for is answered by
    /// another; the answer names both, carries the replica's own headers
    /// (not its name, date or length, which the gateway says itself).
    #[tokio::test]
    async fn a_retried_answer_names_both_replicas_and_keeps_the_replicas_headers() {
        use shoal_api::fleet::{RouteEndpoint, RoutingTable};
        use shoal_http::{RequestBody, RequestHeaders};
        let (live, _) = crate::upstream::tests::scripted(
            vec![b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nx-shoal-model-version: 1\r\nx-shoal-replica: its-own-name\r\ndate: yesterday\r\n\r\n{}"],
            false,
        )
        .await;
        // Bound and dropped: connections to it are refused.
        let gone = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let gateway = Gateway::new(GatewayConfig::default()).unwrap();
        let endpoint = |id: &str, address: String| RouteEndpoint {
            id: id.into(),
            address,
            region: "local".into(),
            alive: true,
            serving: vec!["digits:1".parse().unwrap()],
            standby: false,
        };
        let table = RoutingTable {
            revision: 1,
            endpoints: vec![endpoint("gone", gone.to_string()), endpoint("live", live)],
            models: Vec::new(),
        };
        gateway.routes.apply(&table, gateway.now());
        // A session the gone replica owns: it is tried first.
        let (state, now) = (gateway.routes.snapshot(), gateway.now());
        let candidates = gateway
            .routes
            .candidates(&state, "digits", None, &[], now)
            .unwrap();
        let key = (0..)
            .map(|i| format!("user-{i}"))
            .find(|key| {
                let picked = gateway
                    .routes
                    .pick(&candidates, Some(key), &mut rand::rng(), now)
                    .unwrap();
                picked.id == "gone"
            })
            .unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert("x-session-id", key.parse().unwrap());
        let body = br#"{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        let answer = super::infer_common(
            gateway.clone(),
            "digits".into(),
            None,
            "127.0.0.1:9".parse().unwrap(),
            RequestHeaders::Map(headers),
            Ok(RequestBody::Whole(bytes::Bytes::from_static(body))),
            None,
        )
        .await;
        assert_eq!(answer.status(), http::StatusCode::OK);
        assert_eq!(answer.body().as_ref(), b"{}");
        let lines: Vec<(String, String)> = answer
            .headers()
            .map(|(n, v)| {
                let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
                (text(n), text(v))
            })
            .collect();
        let lines: Vec<(&str, &str)> = lines
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                ("content-type", "application/json"),
                ("x-shoal-model-version", "1"),
                ("x-shoal-replica", "live"),
                ("x-shoal-retried-from", "gone"),
            ]
        );
        // Read through the answer's own lookup too.
        assert_eq!(answer.header("X-Shoal-Replica"), Some(&b"live"[..]));
    }

    #[test]
    fn upstream_paths_name_the_model_and_the_version() {
        assert_eq!(upstream_path("digits", None), "/v2/models/digits/infer");
        assert_eq!(
            upstream_path("digits", Some("2")),
            "/v2/models/digits/versions/2/infer"
        );
        assert_eq!(model_of(&upstream_path("a-b", Some("7"))), Some("a-b"));
    }

    #[test]
    fn header_names_from_flags_are_checked_at_start() {
        let config = GatewayConfig {
            session_header: "X-Session".into(),
            ..GatewayConfig::default()
        };
        let gateway = Gateway::new(config).unwrap();
        assert_eq!(gateway.session_header, "x-session");
        let config = GatewayConfig {
            split_header: "user id".into(),
            ..GatewayConfig::default()
        };
        let error = Gateway::new(config).unwrap_err();
        assert!(error.contains("the split header \"user id\""), "{error}");
    }
}
