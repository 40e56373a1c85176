//! The dashboard at `/`: one page (HTML, script and style embedded in the
//! binary, no build step) that reads the same REST API as the CLI.
//!
//! - **Sign-in.** `GET /?token=TOKEN` (the URL `shoal up` prints) or the
//!   page's form (`POST /session`) trades a valid token for a session: a
//!   random id in an HttpOnly, SameSite=Strict cookie, kept in this
//!   member's memory against the token's *hash* for at most
//!   [`SESSION_TTL`]. The redirect drops the token from the address bar.
//!   Every request with the cookie is checked like a bearer token (a
//!   revoked token ends its sessions at once); changes must also carry
//!   [`CSRF_HEADER`]. `POST /session/end` signs out.
//! - **Live data.** `GET /api/v1/stream` (server-sent events) sends the
//!   fleet status and deployments once a second and at once on a change,
//!   and ends when the control plane stops. `GET
//!   /api/v1/rollouts/{model}/history` serves the per-version time series
//!   [`crate::history::History`] keeps, sampled once a second by
//!   [`sample`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Form;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use shoal_api::auth::token_hash;
use shoal_api::deploy::Deployment;
use shoal_api::fleet::FleetStatus;
use shoal_api::history::History;
use shoal_http::extract::{Path, Query};
use shoal_http::{ApiError, json_response};
use tokio::time::Instant;

use crate::Control;
use crate::history::ModelSample;

/// The header a change made with a session cookie must carry.
pub const CSRF_HEADER: &str = "x-shoal-dashboard";

/// The session cookie's name.
const COOKIE: &str = "shoal_session";

/// How long a session lasts from sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Sessions kept at most; the oldest is dropped for a new one.
const MAX_SESSIONS: usize = 10_000;

/// Points kept per model: an hour at one a second.
pub(crate) const HISTORY_POINTS: usize = 3_600;

/// The window rates and quantiles of a point cover.
pub(crate) const HISTORY_WINDOW_MS: i64 = 5_000;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// What the page may load and talk to: itself only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Dashboard sessions of this member.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    inner: Mutex<HashMap<String, Session>>,
}

#[derive(Debug)]
struct Session {
    token_hash: String,
    expires: Instant,
}

impl Sessions {
    /// A new session for the token whose hash is `token_hash`; its id.
    fn open(&self, token_hash: String) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.retain(|_, s| s.expires > now);
        if inner.len() >= MAX_SESSIONS
            && let Some(oldest) = inner
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(id, _)| id.clone())
        {
            inner.remove(&oldest);
        }
        inner.insert(
            id.clone(),
            Session {
                token_hash,
                expires: now + SESSION_TTL,
            },
        );
        id
    }

    /// The token hash of the session the request's cookie names, if it
    /// is current.
    pub(crate) fn token_hash(&self, headers: &HeaderMap) -> Option<String> {
        let id = session_id(headers)?;
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .get(&id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.token_hash.clone())
    }

    fn end(&self, headers: &HeaderMap) {
        if let Some(id) = session_id(headers) {
            self.inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        }
    }
}

/// The session id in the request's cookies.
fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_owned())
}

/// The page's routes (all open: the page itself holds no data; what it
/// reads goes through the API's guards).
pub(crate) fn routes() -> Router<Arc<Control>> {
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route("/session", post(sign_in))
        .route("/session/end", post(sign_out))
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(headers);
    response
}

fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    // The address may hold a token for a moment: never sent on.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

#[derive(Debug, Deserialize)]
struct IndexQuery {
    token: Option<String>,
}

/// The page, or, with `?token=`, a sign-in.
async fn index(State(control): State<Arc<Control>>, Query(query): Query<IndexQuery>) -> Response {
    match query.token {
        Some(token) => start_session(&control, token.trim()).await,
        None => page("text/html; charset=utf-8", INDEX_HTML),
    }
}

async fn app_js() -> Response {
    page("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    page("text/css; charset=utf-8", APP_CSS)
}

#[derive(Debug, Deserialize)]
struct SignIn {
    token: String,
}

async fn sign_in(State(control): State<Arc<Control>>, Form(form): Form<SignIn>) -> Response {
    start_session(&control, form.token.trim()).await
}

/// A redirect to the page: with a session cookie when `token` is valid,
/// else to the sign-in form with the reason.
async fn start_session(control: &Control, token: &str) -> Response {
    let hash = token_hash(token);
    let known = if token.is_empty() || !control.config.auth {
        Ok(None)
    } else {
        control.store.token_by_hash(&hash).await
    };
    match known {
        Ok(Some(_)) => {
            let id = control.sessions.open(hash);
            let cookie = cookie::Cookie::build((COOKIE, id))
                .path("/")
                .http_only(true)
                .same_site(cookie::SameSite::Strict)
                .secure(control.config.tls.is_some())
                .max_age(cookie::time::Duration::seconds(
                    i64::try_from(SESSION_TTL.as_secs()).unwrap_or(i64::MAX),
                ))
                .build();
            redirect("/", Some(cookie))
        }
        Ok(None) if !control.config.auth => redirect("/", None),
        Ok(None) => redirect("/#signin=invalid", None),
        Err(e) => ApiError::internal(format!("token lookup: {e}")).into_response(),
    }
}

fn redirect(to: &'static str, cookie: Option<cookie::Cookie<'static>>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static(to));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(value) = cookie.and_then(|c| HeaderValue::from_str(&c.to_string()).ok()) {
        headers.insert(header::SET_COOKIE, value);
    }
    secure(headers);
    response
}

async fn sign_out(State(control): State<Arc<Control>>, headers: HeaderMap) -> Response {
    control.sessions.end(&headers);
    let gone = cookie::Cookie::build((COOKIE, ""))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .max_age(cookie::time::Duration::ZERO)
        .build();
    redirect("/", Some(gone))
}

#[derive(Debug, Deserialize)]
pub(crate) struct HistoryQuery {
    #[serde(default = "before_everything")]
    after: i64,
}

fn before_everything() -> i64 {
    i64::MIN
}

/// A model's per-version request rate, error rate, p50/p99 latency,
/// rewards and traffic weights, one point a second for the last hour, as
/// this member sampled them.
#[utoipa::path(get, path = "/api/v1/rollouts/{model}/history", params(("model" = String, Path, description = "model name"), ("after" = Option<i64>, Query, description = "only points after this time (ms since the epoch)")), responses((status = 200, body = History)))]
pub(crate) async fn history(
    State(control): State<Arc<Control>>,
    Path(model): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    shoal_core::ModelName::new(&model).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let history = control
        .history
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let body = History {
        model: model.clone(),
        window_ms: history.window_ms(),
        points: history.points(&model, query.after),
    };
    Ok(json_response(StatusCode::OK, &body))
}

/// One event of the live stream.
#[derive(Debug, Serialize)]
struct Snapshot {
    status: FleetStatus,
    deployments: Vec<Deployment>,
}

/// Server-sent events: `snapshot` (the fleet status, with members and
/// gateways, and every deployment) at once, then once a second and on
/// every registry change. Ends when the control plane stops.
#[utoipa::path(get, path = "/api/v1/stream", responses((status = 200, description = "text/event-stream of `snapshot` events: {\"status\": FleetStatus, \"deployments\": [Deployment]}")))]
pub(crate) async fn stream(State(control): State<Arc<Control>>) -> Response {
    let state = (
        control.clone(),
        control.revision.subscribe(),
        control.stopping.subscribe(),
        tokio::time::interval(Duration::from_secs(1)),
        crate::metrics::Open::on(&control.metrics.dashboard_streams),
    );
    let events = futures::stream::unfold(
        state,
        |(control, mut rev, mut stop, mut tick, open)| async move {
            if *stop.borrow() {
                return None;
            }
            tokio::select! {
                _ = tick.tick() => {}
                changed = rev.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = stop.changed() => return None,
            }
            let event = snapshot(&control).await;
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (control, rev, stop, tick, open),
            ))
        },
    );
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn snapshot(control: &Control) -> Event {
    // The page still shows the fleet when the registry cannot say who leads.
    let status = control.status().await.unwrap_or_else(|e| {
        tracing::debug!(error = %format!("{e:#}"), "dashboard stream: leadership");
        control.fleet_status()
    });
    let deployments = control
        .snapshot()
        .facts
        .deployments
        .iter()
        .map(|(d, _)| d.clone())
        .collect();
    let body = Snapshot {
        status,
        deployments,
    };
    Event::default()
        .event("snapshot")
        .json_data(&body)
        .unwrap_or_else(|_| Event::default().event("snapshot").data("{}"))
}

/// Samples the fleet's counters into the history once a second, forever.
pub(crate) async fn sample(control: Arc<Control>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let facts = control.facts();
        // What gateways route by: a rollout's weights while it runs.
        let routing = control.routing_table();
        let models: BTreeMap<String, ModelSample> = routing
            .models
            .iter()
            .map(|policy| {
                let weights = policy
                    .targets
                    .iter()
                    .map(|t| (t.version.clone(), t.weight))
                    .collect();
                let rewards = facts
                    .rewards_of(&policy.model)
                    .into_iter()
                    .filter(|(_, r)| r.count > 0)
                    .map(|(v, r)| (v, r.mean()))
                    .collect();
                (policy.model.clone(), ModelSample { weights, rewards })
            })
            .collect();
        control
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(facts.now, &facts.stats, &models);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(value).unwrap());
        h
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_stands_for_its_token_until_it_expires_or_ends() {
        let sessions = Sessions::default();
        let id = sessions.open("hash-a".into());
        let headers = with_cookie(&format!("theme=dark; {COOKIE}={id}"));
        assert_eq!(sessions.token_hash(&headers).as_deref(), Some("hash-a"));
        assert_eq!(
            sessions.token_hash(&with_cookie(&format!("{COOKIE}=nope"))),
            None
        );
        assert_eq!(sessions.token_hash(&HeaderMap::new()), None);
        tokio::time::advance(SESSION_TTL).await;
        assert_eq!(sessions.token_hash(&headers), None, "expired");
        let id = sessions.open("hash-b".into());
        let headers = with_cookie(&format!("{COOKIE}={id}"));
        sessions.end(&headers);
        assert_eq!(sessions.token_hash(&headers), None, "signed out");
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_are_bounded() {
        let sessions = Sessions::default();
        let first = sessions.open("first".into());
        for i in 0..MAX_SESSIONS {
            tokio::time::advance(Duration::from_millis(1)).await;
            sessions.open(format!("h{i}"));
        }
        assert_eq!(sessions.inner.lock().unwrap().len(), MAX_SESSIONS);
        let headers = with_cookie(&format!("{COOKIE}={first}"));
        assert_eq!(sessions.token_hash(&headers), None, "the oldest went");
    }
}
