//! A typed client for Shoal's HTTP APIs: the control plane's (`/api/v1/…`),
//! and the endpoints replicas and gateways serve to each other (peer chunks,
//! admin listings, `/health`, `/metrics`). Each client knows which kind of
//! server it calls ([`Server`]), so an error names it.
//!
//! [`ApiClient`] wraps one pooled HTTP/1 client (hyper) and a base URL;
//! each method maps to one endpoint and returns the shared `shoal-api`
//! documents. Errors keep the server's `{"error": …}` message and say
//! whether the server could be reached at all, so callers (the CLI, the
//! sync agent) can tell "fix your request" from "try again later".
//! [`secret`] reads and writes token files; [`tls`] is what clients trust
//! over `https://`.

pub mod secret;
pub mod tls;

use std::time::Duration;

/// How long a client of the control plane waits before retry `attempt`
/// (0, 1, …): doubling from 100 ms to at most 5 s, with jitter so a fleet
/// that lost the control plane together does not return together.
pub fn reconnect_backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100) * 2u32.saturating_pow(attempt.min(6));
    base.min(Duration::from_secs(5))
        .mul_f64(rand::random_range(0.5..1.0))
}

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_api::deploy::{DeployRequest, Deployment, RolloutView};
use shoal_api::fleet::{DesiredState, FleetStatus, Heartbeat, Registered, Registration};
use shoal_api::registry::{
    AuditEntry, ModelDetail, ModelSummary, NewVersion, UploadedArtifact, VersionRecord,
};

/// Which kind of Shoal server a client calls: named in its errors, so a
/// failing peer fetch does not read as a control-plane outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// The control plane (one or several members).
    ControlPlane,
    /// A replica (its admin and inference endpoints).
    Replica,
    /// A replica serving artifact chunks to another.
    PeerReplica,
    /// A gateway.
    Gateway,
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Server::ControlPlane => "the control plane",
            Server::Replica => "replica",
            Server::PeerReplica => "peer replica",
            Server::Gateway => "gateway",
        })
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached (refused, reset, timed out).
    #[error("cannot reach {server} at {url}: {reason}")]
    Unreachable {
        /// Which kind of server.
        server: Server,
        /// The URL called.
        url: String,
        /// Transport error.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{message} (HTTP {status})")]
    Status {
        /// Status code.
        status: StatusCode,
        /// The server's message.
        message: String,
    },
    /// The answer could not be decoded.
    #[error("unexpected answer from {url}: {reason}")]
    Decode {
        /// The URL called.
        url: String,
        /// Why.
        reason: String,
    },
}

impl ClientError {
    /// True when the server could not be reached or was temporarily
    /// unable (5xx): retrying later may help.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Status { status, .. } => status.is_server_error(),
            ClientError::Decode { .. } => false,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A client for one Shoal server, which may be several members (of one
/// control plane): each call goes to the member that answered last, and to
/// the next ones in turn when it cannot be reached.
#[derive(Debug, Clone)]
pub struct ApiClient {
    server: Server,
    bases: std::sync::Arc<[String]>,
    /// Index into `bases` of the member that answered last; shared by
    /// clones, so a whole process sticks to one member.
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    token: Option<String>,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>,
    timeout: Duration,
}

/// Result of a conditional fetch of a replica's desired state.
#[derive(Debug, Clone, PartialEq)]
pub enum Conditional<T> {
    /// Unchanged since the given revision (HTTP 304).
    NotModified,
    /// The current document.
    Fresh(T),
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

impl ApiClient {
    /// A client for the control plane at `base` (e.g. `http://127.0.0.1:8081`),
    /// or at any of several comma-separated members of one control plane
    /// (`http://a:8081,http://b:8081`).
    pub fn control(base: &str, token: Option<String>) -> ApiClient {
        Self::new(Server::ControlPlane, base, token)
    }

    /// A client for the replica at `base`.
    pub fn replica(base: &str, token: Option<String>) -> ApiClient {
        Self::new(Server::Replica, base, token)
    }

    /// A client for a peer replica serving artifact chunks at `base`.
    pub fn peer(base: &str, token: Option<String>) -> ApiClient {
        Self::new(Server::PeerReplica, base, token)
    }

    /// A client for the gateway at `base`.
    pub fn gateway(base: &str, token: Option<String>) -> ApiClient {
        Self::new(Server::Gateway, base, token)
    }

    /// A client for `server` at `base` (comma-separated members allowed).
    pub fn new(server: Server, base: &str, token: Option<String>) -> ApiClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        let mut bases: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            bases.push(String::new());
        }
        ApiClient {
            server,
            bases: bases.into(),
            current: std::sync::Arc::default(),
            token,
            http: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(tls::connector(connector)),
            timeout: Duration::from_secs(30),
        }
    }

    /// The base URL of the member calls go to now.
    pub fn base(&self) -> &str {
        &self.bases[self.member()]
    }

    /// Every member's base URL, as given.
    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    fn member(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed) % self.bases.len()
    }

    /// The members in the order to try them: the one that answered last
    /// first.
    fn rotation(&self) -> impl Iterator<Item = usize> + use<> {
        let (start, n) = (self.member(), self.bases.len());
        (0..n).map(move |i| (start + i) % n)
    }

    fn stick_to(&self, member: usize) {
        self.current
            .store(member, std::sync::atomic::Ordering::Relaxed);
    }

    /// The bearer token it presents, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A copy with a different per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// Sends a request and returns the status, headers and whole body. A
    /// member that cannot be reached is passed over for the next: on any
    /// method when the connection failed (nothing was sent), on GET also
    /// when the exchange broke off.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), ClientError> {
        self.on_members(&method, path, |member| {
            self.send_to(member, method.clone(), path, headers, full(body.clone()))
        })
        .await
    }

    /// Runs `attempt` on the member that answered last, then on the next
    /// ones while a member cannot be reached: always when the connection
    /// failed (nothing was sent), for GETs also when the exchange broke off.
    /// Sticks to the member whose attempt succeeded.
    async fn on_members<T, F, Fut>(
        &self,
        method: &Method,
        path: &str,
        mut attempt: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut last = None;
        for member in self.rotation() {
            match attempt(member).await {
                Err(Failure::Connect(e)) => last = Some(e),
                Err(Failure::Exchange(e)) if method == Method::GET => last = Some(e),
                Err(f) => return Err(f.into_error()),
                Ok(answer) => {
                    self.stick_to(member);
                    return Ok(answer);
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Unreachable {
            server: self.server,
            url: self.url(path),
            reason: "no address".into(),
        }))
    }

    /// One exchange with member `member`.
    async fn send_to(
        &self,
        member: usize,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Body,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), Failure> {
        let url = format!("{}{path}", self.bases[member]);
        let mut builder = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (k, v) in headers {
            builder = builder.header(*k, v);
        }
        let request = builder.body(body).map_err(|e| {
            Failure::Other(ClientError::Decode {
                url: url.clone(),
                reason: e.to_string(),
            })
        })?;
        let unreachable = |reason: String| ClientError::Unreachable {
            server: self.server,
            url: url.clone(),
            reason,
        };
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| {
                let error = unreachable(transport_error(&e));
                if e.is_connect() {
                    Failure::Connect(error)
                } else {
                    Failure::Exchange(error)
                }
            })?;
            let (parts, body) = response.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|e| Failure::Exchange(unreachable(e.to_string())))?
                .to_bytes();
            Ok((parts.status, parts.headers, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                Failure::Exchange(unreachable(format!("no answer within {:?}", self.timeout)))
            })?
    }

    fn check(status: StatusCode, body: &Bytes) -> Result<(), ClientError> {
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok(());
        }
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        Err(ClientError::Status { status, message })
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, body: &Bytes) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|e| ClientError::Decode {
            url: self.url(path),
            reason: e.to_string(),
        })
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, _, body) = self.send(Method::GET, path, &[], Bytes::new()).await?;
        Self::check(status, &body)?;
        self.decode(path, &body)
    }

    async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode {
            url: self.url(path),
            reason: e.to_string(),
        })?;
        let headers = [("content-type", "application/json".to_owned())];
        let (status, _, body) = self
            .send(method, path, &headers, Bytes::from(bytes))
            .await?;
        Self::check(status, &body)?;
        if body.is_empty() {
            return self.decode(path, &Bytes::from_static(b"null"));
        }
        self.decode(path, &body)
    }

    /// Uploads an artifact, streaming `chunks` (e.g. a file read piece by
    /// piece, with progress reporting in between).
    pub async fn upload_artifact<S>(
        &self,
        size: u64,
        chunks: S,
    ) -> Result<UploadedArtifact, ClientError>
    where
        S: futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        use futures::StreamExt;
        let body = BodyExt::boxed(StreamBody::new(chunks.map(|r| r.map(Frame::data))));
        let headers = [
            ("content-type", "application/octet-stream".to_owned()),
            ("content-length", size.to_string()),
        ];
        // Uploads of large models take longer than API calls.
        let slow = self.clone().with_timeout(Duration::from_secs(3600));
        let path = "/api/v1/artifacts";
        let member = self.member();
        let (status, _, body) = slow
            .send_to(member, Method::PUT, path, &headers, body)
            .await
            .map_err(|f| {
                // The next call tries another member.
                if matches!(f, Failure::Connect(_)) {
                    self.stick_to(member + 1);
                }
                f.into_error()
            })?;
        Self::check(status, &body)?;
        self.decode(path, &body)
    }

    /// Registers an uploaded artifact as a version of `model`.
    pub async fn create_version(
        &self,
        model: &str,
        new: &NewVersion,
    ) -> Result<VersionRecord, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/api/v1/models/{model}/versions"),
            new,
        )
        .await
    }

    /// All models.
    pub async fn list_models(&self) -> Result<Vec<ModelSummary>, ClientError> {
        self.get_json("/api/v1/models").await
    }

    /// One model with its versions.
    pub async fn get_model(&self, model: &str) -> Result<ModelDetail, ClientError> {
        self.get_json(&format!("/api/v1/models/{model}")).await
    }

    /// One version.
    pub async fn get_version(
        &self,
        model: &str,
        version: &str,
    ) -> Result<VersionRecord, ClientError> {
        self.get_json(&format!("/api/v1/models/{model}/versions/{version}"))
            .await
    }

    /// Replaces how replicas serve a version (batching, engine).
    pub async fn set_version_options(
        &self,
        model: &str,
        version: &str,
        options: &shoal_api::registry::VersionOptions,
    ) -> Result<VersionRecord, ClientError> {
        self.send_json(
            Method::PUT,
            &format!("/api/v1/models/{model}/versions/{version}/options"),
            options,
        )
        .await
    }

    /// Deploys a version.
    pub async fn deploy(
        &self,
        model: &str,
        request: &DeployRequest,
    ) -> Result<Deployment, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/api/v1/deployments/{model}"),
            request,
        )
        .await
    }

    /// Sets a model's traffic policy by hand.
    pub async fn set_traffic(
        &self,
        model: &str,
        request: &shoal_api::deploy::TrafficRequest,
    ) -> Result<Deployment, ClientError> {
        self.send_json(
            Method::PUT,
            &format!("/api/v1/deployments/{model}/traffic"),
            request,
        )
        .await
    }

    /// Every deployment.
    pub async fn list_deployments(&self) -> Result<Vec<Deployment>, ClientError> {
        self.get_json("/api/v1/deployments").await
    }

    /// Rolls a model back to its last known good version.
    pub async fn rollback(
        &self,
        model: &str,
        reason: Option<&str>,
    ) -> Result<Deployment, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/api/v1/models/{model}/rollback"),
            &serde_json::json!({ "reason": reason }),
        )
        .await
    }

    /// Sets how many replicas serve a model (`shoal scale`).
    pub async fn set_scale(
        &self,
        model: &str,
        spec: &shoal_api::scale::ScaleSpec,
    ) -> Result<Deployment, ClientError> {
        self.send_json(
            Method::PUT,
            &format!("/api/v1/deployments/{model}/scale"),
            spec,
        )
        .await
    }

    /// A model's scale: placement and the autoscaler's recommendations.
    pub async fn scale_status(
        &self,
        model: &str,
    ) -> Result<shoal_api::scale::ScaleStatus, ClientError> {
        self.get_json(&format!("/api/v1/deployments/{model}/scale"))
            .await
    }

    /// The replica count the fleet should run.
    pub async fn fleet_scale(&self) -> Result<shoal_api::scale::FleetScale, ClientError> {
        self.get_json("/api/v1/scale").await
    }

    /// A model's current or last rollout.
    pub async fn rollout(&self, model: &str) -> Result<RolloutView, ClientError> {
        self.get_json(&format!("/api/v1/rollouts/{model}")).await
    }

    /// Promotes a model's rollout now.
    pub async fn promote(&self, model: &str) -> Result<Deployment, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/api/v1/rollouts/{model}/promote"),
            &serde_json::json!({}),
        )
        .await
    }

    /// Aborts a model's rollout.
    pub async fn abort(&self, model: &str) -> Result<Deployment, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/api/v1/rollouts/{model}/abort"),
            &serde_json::json!({}),
        )
        .await
    }

    /// The fleet.
    pub async fn status(&self) -> Result<FleetStatus, ClientError> {
        self.get_json("/api/v1/status").await
    }

    /// Who leads the control plane, and its members.
    pub async fn leader(&self) -> Result<shoal_api::fleet::Leadership, ClientError> {
        self.get_json("/api/v1/leader").await
    }

    /// The audit log after `after`.
    pub async fn audit(&self, after: i64, limit: u32) -> Result<Vec<AuditEntry>, ClientError> {
        self.get_json(&format!("/api/v1/audit?after={after}&limit={limit}"))
            .await
    }

    /// Sends a gateway's traffic report.
    pub async fn gateway_report(
        &self,
        id: &str,
        report: &shoal_api::traffic::GatewayReport,
    ) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .send_json(
                Method::POST,
                &format!("/api/v1/gateways/{id}/report"),
                report,
            )
            .await?;
        Ok(())
    }

    /// Registers a replica.
    pub async fn register(&self, registration: &Registration) -> Result<Registered, ClientError> {
        self.send_json(Method::POST, "/api/v1/replicas", registration)
            .await
    }

    /// Sends a heartbeat.
    pub async fn heartbeat(&self, id: &str, heartbeat: &Heartbeat) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .send_json(
                Method::POST,
                &format!("/api/v1/replicas/{id}/heartbeat"),
                heartbeat,
            )
            .await?;
        Ok(())
    }

    /// The desired state of replica `id`, unless unchanged since `revision`.
    pub async fn desired(
        &self,
        id: &str,
        revision: Option<u64>,
    ) -> Result<Conditional<DesiredState>, ClientError> {
        let path = format!("/api/v1/replicas/{id}/desired");
        let headers: Vec<(&str, String)> = revision
            .map(|r| vec![("if-none-match", format!("\"{r}\""))])
            .unwrap_or_default();
        let (status, _, body) = self
            .send(Method::GET, &path, &headers, Bytes::new())
            .await?;
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Conditional::NotModified);
        }
        Self::check(status, &body)?;
        Ok(Conditional::Fresh(self.decode(&path, &body)?))
    }

    /// Opens the watch stream of replica `id` from `after`: each item is a
    /// new desired state. The stream ends when the connection does.
    pub async fn watch(
        &self,
        id: &str,
        after: u64,
    ) -> Result<impl futures::Stream<Item = Result<DesiredState, ClientError>> + use<>, ClientError>
    {
        self.stream(&format!("/api/v1/replicas/{id}/watch?after={after}"))
            .await
    }

    /// Opens an NDJSON stream at `path`.
    /// Sends a GET and returns the body of a successful answer unread;
    /// an error status is read and turned into its error.
    async fn open(&self, path: &str) -> Result<hyper::body::Incoming, ClientError> {
        self.open_with(Method::GET, path, None).await
    }

    /// Sends `method` (with a JSON body, if any) and returns the body of a
    /// successful answer unread.
    async fn open_with(
        &self,
        method: Method,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<hyper::body::Incoming, ClientError> {
        let json = json.map(Bytes::from);
        self.on_members(&method, path, |member| {
            self.open_on(member, method.clone(), path, json.clone())
        })
        .await
    }

    async fn open_on(
        &self,
        member: usize,
        method: Method,
        path: &str,
        json: Option<Bytes>,
    ) -> Result<hyper::body::Incoming, Failure> {
        let url = format!("{}{path}", self.bases[member]);
        let mut builder = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if json.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder.body(full(json.unwrap_or_default())).map_err(|e| {
            Failure::Other(ClientError::Decode {
                url: url.clone(),
                reason: e.to_string(),
            })
        })?;
        let response = tokio::time::timeout(self.timeout, self.http.request(request))
            .await
            .map_err(|_| {
                Failure::Exchange(ClientError::Unreachable {
                    server: self.server,
                    url: url.clone(),
                    reason: "no answer".into(),
                })
            })?
            .map_err(|e| {
                let error = ClientError::Unreachable {
                    server: self.server,
                    url: url.clone(),
                    reason: transport_error(&e),
                };
                if e.is_connect() {
                    Failure::Connect(error)
                } else {
                    Failure::Exchange(error)
                }
            })?;
        let status = response.status();
        let body = response.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            Self::check(status, &bytes).map_err(Failure::Other)?;
            return Err(Failure::Other(ClientError::Status {
                status,
                message: String::from_utf8_lossy(&bytes).into_owned(),
            }));
        }
        Ok(body)
    }

    async fn stream<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<impl futures::Stream<Item = Result<T, ClientError>> + use<T>, ClientError> {
        let body = self.open(path).await?;
        Ok(ndjson(body, self.server, self.url(path)))
    }

    /// Asks the control plane to take a backup to `to` (as it sees the
    /// path); each item is progress, then the record or the error.
    pub async fn backup(
        &self,
        to: &str,
    ) -> Result<
        impl futures::Stream<Item = Result<shoal_api::backup::BackupEvent, ClientError>> + use<>,
        ClientError,
    > {
        let path = "/api/v1/backups";
        let body = serde_json::to_vec(&shoal_api::backup::BackupRequest { to: to.to_owned() })
            .unwrap_or_default();
        let body = self.open_with(Method::POST, path, Some(body)).await?;
        Ok(ndjson(body, self.server, self.url(path)))
    }

    /// The routing table.
    pub async fn routing(&self) -> Result<shoal_api::fleet::RoutingTable, ClientError> {
        self.get_json("/api/v1/routing").await
    }

    /// Opens the routing watch stream: each item is a new routing table.
    pub async fn watch_routing(
        &self,
    ) -> Result<
        impl futures::Stream<Item = Result<shoal_api::fleet::RoutingTable, ClientError>> + use<>,
        ClientError,
    > {
        self.stream("/api/v1/routing/watch").await
    }

    /// A chunk in its stored encoding from the origin, as it arrives: the
    /// body's pieces in order, all within the client's timeout. An error
    /// ends the stream.
    pub async fn chunk_stream(
        &self,
        id: &str,
    ) -> Result<impl futures::Stream<Item = Result<Bytes, ClientError>> + use<>, ClientError> {
        let path = format!("/api/v1/chunks/{id}");
        let url = self.url(&path);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let body = self.open(&path).await?;
        let server = self.server;
        Ok(futures::stream::unfold(
            Some((body, url)),
            move |state| async move {
                let (mut body, url) = state?;
                loop {
                    let fail = |reason: String| {
                        Some((
                            Err(ClientError::Unreachable {
                                server,
                                url: url.clone(),
                                reason,
                            }),
                            None,
                        ))
                    };
                    match tokio::time::timeout_at(deadline, body.frame()).await {
                        Err(_) => return fail("the chunk did not arrive in time".into()),
                        Ok(None) => return None,
                        Ok(Some(Err(e))) => return fail(e.to_string()),
                        Ok(Some(Ok(frame))) => {
                            if let Ok(data) = frame.into_data() {
                                return Some((Ok(data), Some((body, url))));
                            }
                        }
                    }
                }
            },
        ))
    }

    /// An artifact's manifest (raw JSON; the caller verifies it), fetched
    /// zstd-compressed when the server offers it.
    pub async fn manifest(&self, sha256: &str) -> Result<Bytes, ClientError> {
        /// Far above any real manifest (≈ 100 bytes per 64 KiB chunk).
        const MAX_MANIFEST: usize = 64 << 20;
        let path = format!("/api/v1/artifacts/{sha256}/manifest");
        let accept = [("accept-encoding", "zstd".to_owned())];
        let (status, headers, body) = self.send(Method::GET, &path, &accept, Bytes::new()).await?;
        Self::check(status, &body)?;
        if headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() == b"zstd")
        {
            let json =
                zstd::bulk::decompress(&body, MAX_MANIFEST).map_err(|e| ClientError::Decode {
                    url: self.url(&path),
                    reason: format!("cannot decompress the manifest: {e}"),
                })?;
            return Ok(Bytes::from(json));
        }
        Ok(body)
    }

    /// Creates a token (admin).
    pub async fn create_token(
        &self,
        new: &shoal_api::auth::NewToken,
    ) -> Result<shoal_api::auth::CreatedToken, ClientError> {
        self.send_json(Method::POST, "/api/v1/tokens", new).await
    }

    /// Every token (admin).
    pub async fn list_tokens(&self) -> Result<Vec<shoal_api::auth::TokenInfo>, ClientError> {
        self.get_json("/api/v1/tokens").await
    }

    /// Forgets a replica (admin): one stopped for good.
    pub async fn deregister_replica(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/api/v1/replicas/{id}");
        let (status, _, body) = self.send(Method::DELETE, &path, &[], Bytes::new()).await?;
        Self::check(status, &body)
    }

    /// Revokes a token (admin).
    pub async fn revoke_token(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/api/v1/tokens/{name}");
        let (status, _, body) = self.send(Method::DELETE, &path, &[], Bytes::new()).await?;
        Self::check(status, &body)
    }

    /// Who this client's token is.
    pub async fn whoami(&self) -> Result<shoal_api::auth::Whoami, ClientError> {
        self.get_json("/api/v1/auth/whoami").await
    }

    /// GET of any path on this base, whole body (for peers' chunk endpoint).
    pub async fn get_raw(&self, path: &str) -> Result<Bytes, ClientError> {
        let (status, _, body) = self.send(Method::GET, path, &[], Bytes::new()).await?;
        Self::check(status, &body)?;
        Ok(body)
    }

    /// POST a JSON body to any path on this base; the whole answer.
    pub async fn post_json_raw(&self, path: &str, body: String) -> Result<Bytes, ClientError> {
        let headers = [("content-type", "application/json".to_owned())];
        let (status, _, body) = self
            .send(Method::POST, path, &headers, Bytes::from(body))
            .await?;
        Self::check(status, &body)?;
        Ok(body)
    }

    /// PUT a JSON body to any path on this base; the whole answer.
    pub async fn put_json_raw(&self, path: &str, body: String) -> Result<Bytes, ClientError> {
        let headers = [("content-type", "application/json".to_owned())];
        let (status, _, body) = self
            .send(Method::PUT, path, &headers, Bytes::from(body))
            .await?;
        Self::check(status, &body)?;
        Ok(body)
    }

    /// POST with an empty body to any path on this base (push nudges).
    pub async fn post_empty(&self, path: &str) -> Result<(), ClientError> {
        let (status, _, body) = self.send(Method::POST, path, &[], Bytes::new()).await?;
        Self::check(status, &body)
    }
}

/// Why one exchange with one member failed, which decides whether the
/// next member is tried.
enum Failure {
    /// No connection: nothing was sent, any request may go elsewhere.
    Connect(ClientError),
    /// The exchange broke off or timed out: the request may have been
    /// applied.
    Exchange(ClientError),
    /// Not the member's fault.
    Other(ClientError),
}

impl Failure {
    fn into_error(self) -> ClientError {
        match self {
            Failure::Connect(e) | Failure::Exchange(e) | Failure::Other(e) => e,
        }
    }
}

/// A transport error in words, with its causes (hyper's own message is
/// only "client error (Connect)"), and what to do about a certificate the
/// client does not trust.
fn transport_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if text.contains("certificate") {
        text.push_str(
            " (pass --ca, or set SHOAL_CA, with the CA certificate that signed the server's)",
        );
    }
    text
}

/// Splits a streamed body into newline-delimited JSON documents; blank
/// lines are keep-alives.
fn ndjson<T: DeserializeOwned>(
    body: hyper::body::Incoming,
    server: Server,
    url: String,
) -> impl futures::Stream<Item = Result<T, ClientError>> {
    futures::stream::unfold(
        (body, Vec::<u8>::new(), url, false),
        move |(mut body, mut buf, url, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let line = &line[..line.len() - 1];
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let item = serde_json::from_slice(line).map_err(|e| ClientError::Decode {
                        url: url.clone(),
                        reason: e.to_string(),
                    });
                    return Some((item, (body, buf, url, false)));
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buf.extend_from_slice(&data);
                        }
                    }
                    Some(Err(e)) => {
                        let err = ClientError::Unreachable {
                            server,
                            url: url.clone(),
                            reason: e.to_string(),
                        };
                        return Some((Err(err), (body, buf, url, true)));
                    }
                    None => return None,
                }
            }
        },
    )
}
