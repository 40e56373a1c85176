//! HTTP plumbing shared by Shoal's servers (replica, gateway, control plane).
//!
//! - [`ApiError`] is the one error type handlers return. It becomes a
//!   response in one place, always `{"error": "<message>"}` with the right
//!   status, so every endpoint fails the same way; the internal cause is
//!   logged, not sent.
//! - [`read_body`] reads a request body up to a limit and answers 413 with a
//!   message that names the limit, 408 when it stops arriving ([`stall`]); [`decode_off_worker`] parses a large one
//!   on a blocking thread.
//! - [`fallback`] and [`method_not_allowed`] keep unknown routes and wrong
//!   methods in the same JSON error shape.
//! - [`serve`] runs a router on a bound listener with `TCP_NODELAY` and
//!   graceful shutdown; a [`Front`] route, when given, is served by a small
//!   HTTP/1.1 loop of Shoal's own (`server`), everything else by hyper.
//! - [`extract`] has `Path`, `Query` and `Json` extractors whose rejections
//!   are JSON errors too.
//! - [`supervise`] keeps background loops running: a panic is logged and
//!   the loop restarted, never silently lost.
//! - [`h2`] serves a service that speaks only HTTP/2 (gRPC's), with its
//!   connections in the same cap as the REST ones.
//! - [`tls`] serves any of them over TLS (rustls), optionally requiring
//!   client certificates.
//! - [`silence`] closes connections whose clients went silent; [`limit`]
//!   caps the connections a process's servers hold at once; [`delegate`]
//!   writes the pass-through reads and writes of connection wrappers.

mod answer;
pub mod delegate;
pub mod extract;
mod front;
pub mod h2;
pub mod limit;
mod server;
pub mod silence;
pub mod stall;
pub mod supervise;
pub mod tls;

pub use answer::Answer;
pub use front::{Front, Headers, Inference, RawHead, RequestBody, RequestHeaders, header_str};
pub use silence::{IDLE_TIMEOUT, READ_TIMEOUT};
pub use supervise::supervise;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use stall::Stalling;
use tokio::net::TcpListener;

/// An error on its way to becoming an HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The response status.
    pub status: StatusCode,
    /// What the caller is told.
    pub message: String,
    /// What the log is told, if more than the message (never sent).
    pub cause: Option<String>,
    /// Seconds after which a retry may succeed (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            cause: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed or does not fit.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: no such model, version or route.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// 422: the request is well-formed but cannot be carried out (e.g. a
    /// model file that fails verification).
    pub fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    /// 503: temporarily unable; another replica, or a later retry, may succeed.
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    /// 500: our fault. The client gets a generic message; `cause` is
    /// logged, never sent (it may hold database text, paths or internals).
    pub fn internal(cause: impl Into<String>) -> ApiError {
        ApiError {
            cause: Some(cause.into()),
            ..ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error; the cause is in the server's log",
            )
        }
    }
}

/// Every error response of every Shoal server: `{"error": "<message>"}`, the
/// Open Inference Protocol's error shape, used by the control plane's API too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person to read.
    pub error: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl ApiError {
    /// Logs the error as it is answered: server errors with their cause.
    fn log(&self) {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, cause = ?self.cause, "{}", self.message);
        } else {
            tracing::debug!(status = %self.status, "{}", self.message);
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let mut response = json_response(
            self.status,
            &ErrorBody {
                error: self.message,
            },
        );
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// A JSON response with `status`.
pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => json_bytes_response(status, bytes),
        Err(e) => ApiError::internal(format!("cannot encode response: {e}")).into_response(),
    }
}

/// A response whose body is already-encoded JSON.
pub fn json_bytes_response(status: StatusCode, bytes: Vec<u8>) -> Response {
    let mut response = (status, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Reads a whole request body, refusing more than `limit` bytes with 413
/// and one that stops arriving ([`READ_TIMEOUT`]) with 408.
pub async fn read_body(mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || front::too_large(limit);
    // Most bodies are whole before the handler runs, in one frame (the
    // server loop reads a front route's body first): taken as they are,
    // without the collecting buffer and its allocation. A body that is
    // not ready yet gives up nothing by this poll.
    use futures::FutureExt;
    let first = match body.frame().now_or_never() {
        None => Bytes::new(),
        Some(None) => return Ok(Bytes::new()),
        Some(Some(Err(e))) => return Err(stall::body_error(&e)),
        // Trailers before any data: nothing to keep.
        Some(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
    };
    if first.len() > limit {
        return Err(too_large());
    }
    if axum::body::HttpBody::is_end_stream(&body) {
        return Ok(first);
    }
    match Limited::new(Stalling::new(body), limit - first.len())
        .collect()
        .await
    {
        Ok(collected) if first.is_empty() => Ok(collected.to_bytes()),
        Ok(collected) => {
            let rest = collected.to_bytes();
            let mut whole = Vec::with_capacity(first.len() + rest.len());
            whole.extend_from_slice(&first);
            whole.extend_from_slice(&rest);
            Ok(whole.into())
        }
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(stall::body_error(&*e)),
    }
}

/// Request bodies up to this size are decoded on the async worker; larger
/// ones on a blocking thread, so a big request never stalls the others.
pub const DECODE_INLINE_BYTES: usize = 64 << 10;

/// Runs `decode` (the parsing of a request body of `len` bytes) where it
/// belongs: inline when the body is small, on a blocking thread when it is
/// larger than [`DECODE_INLINE_BYTES`]. `Err` only if that thread failed.
pub async fn decode_off_worker<R: Send + 'static>(
    len: usize,
    decode: impl FnOnce() -> R + Send + 'static,
) -> Result<R, String> {
    if len <= DECODE_INLINE_BYTES {
        return Ok(decode());
    }
    tokio::task::spawn_blocking(decode)
        .await
        .map_err(|e| format!("decoding failed: {e}"))
}

/// The value of header `name` as text, if present; a 400 naming the header
/// when it is not visible ASCII.
pub fn header_text<'a>(
    headers: &'a http::HeaderMap,
    name: &http::HeaderName,
) -> Result<Option<&'a str>, ApiError> {
    text_of(name, headers.first(name))
}

/// Header `name`'s `value` as text, if there is one; a 400 naming the
/// header when it is not visible ASCII.
pub fn text_of<'a>(
    name: &http::HeaderName,
    value: Option<&'a [u8]>,
) -> Result<Option<&'a str>, ApiError> {
    value
        .map(|v| {
            header_str(v).ok_or_else(|| {
                ApiError::bad_request(format!("header {name} must be plain ASCII text"))
            })
        })
        .transpose()
}

/// The bearer token of a request: `None` without an `Authorization`
/// header, an error when it is not `Bearer TOKEN`.
pub fn bearer(headers: &http::HeaderMap) -> Result<Option<&str>, String> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header must be plain ASCII".to_owned())?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err("the Authorization header must be `Bearer TOKEN`".to_owned()),
    }
}

/// Rejects a declared `Content-Length` over `limit` before reading anything.
pub fn check_content_length(headers: &http::HeaderMap, limit: usize) -> Result<(), ApiError> {
    check_length(headers.first(&header::CONTENT_LENGTH), limit)
}

/// [`check_content_length`] of a `Content-Length` value already found.
pub fn check_length(value: Option<&[u8]>, limit: usize) -> Result<(), ApiError> {
    let declared = value
        .and_then(header_str)
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body of {n} bytes is larger than the limit of {limit} bytes"),
        )),
        _ => Ok(()),
    }
}

/// Answers requests that match no route.
pub async fn fallback(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

/// Answers requests whose path exists but not with this method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Adds the JSON fallbacks to `router`.
pub fn with_fallbacks<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
}

/// Connections the kernel completes and queues for a listener before the
/// server accepts them: where they wait while the server is at its
/// connection cap ([`limit`]). The kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: u32 = 1024;

/// Binds `addr` (port 0 picks a free port) with a [`BACKLOG`]-long queue.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    listen().map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// How long requests in flight get to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Splits a shutdown signal in two: one to hand to axum's graceful
/// shutdown, and one that completes [`SHUTDOWN_GRACE`] after it, when
/// whatever is still in flight (endless streams, hung peers) is dropped.
fn grace(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (
    impl Future<Output = ()> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let (started_tx, mut started_rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = started_tx.send(true);
    };
    let deadline = async move {
        if started_rx.wait_for(|started| *started).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; closing them");
    };
    (signal, deadline)
}

/// A TCP listener as every plain server accepts on: within the process's
/// connection cap ([`limit`]), Nagle off (small request/response
/// exchanges never wait for it), accept errors retried after a pause.
pub type CappedTcp = limit::Capped<axum::serve::TapIo<TcpListener, fn(&mut tokio::net::TcpStream)>>;

/// `listener` as a [`CappedTcp`].
pub fn capped_tcp(listener: TcpListener) -> CappedTcp {
    use axum::serve::ListenerExt;
    limit::Capped {
        inner: listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        }),
        connections: limit::connections().clone(),
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until
/// `shutdown` completes, then lets requests in flight finish for up to
/// [`SHUTDOWN_GRACE`]. `front`, when given, is tried before the router for
/// every request, and its requests are read and answered by a loop of
/// Shoal's own rather than hyper's (see `server.rs`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    front: Option<Front>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    serve_as(listener, router, front, false, shutdown, tls).await
}

/// Like [`serve`], with each connection's peer address available to the
/// router's handlers as `ConnectInfo<SocketAddr>` (rate limits per client).
pub async fn serve_with_peers(
    listener: TcpListener,
    router: Router,
    front: Option<Front>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    serve_as(listener, router, front, true, shutdown, tls).await
}

async fn serve_as(
    listener: TcpListener,
    router: Router,
    front: Option<Front>,
    peers: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let service = server::Fronted {
        front,
        router,
        // Each connection's own, set when it is accepted.
        peer: SocketAddr::from(([0, 0, 0, 0], 0)),
        peers,
    };
    let (signal, deadline) = grace(shutdown);
    match tls {
        Some(config) => {
            let connections = limit::connections().clone();
            let reclaim = Arc::clone(connections.reclaim());
            let listener = tls::TlsListener::new(listener, config, connections)?;
            tokio::select! {
                () = server::run(listener, service, signal, reclaim) => {},
                () = deadline => {},
            }
        }
        None => {
            let listener = capped_tcp(listener);
            let reclaim = Arc::clone(listener.connections().reclaim());
            tokio::select! {
                () = server::run(listener, service, signal, reclaim) => {},
                () = deadline => {},
            }
        }
    }
    Ok(())
}

/// The model and version of `/v2/models/{model}/infer` or
/// `/v2/models/{model}/versions/{version}/infer`; `None` for any other path
/// and for names with `%` in them.
pub fn infer_path(path: &str) -> Option<(&str, Option<&str>)> {
    let rest = path.strip_prefix("/v2/models/")?.strip_suffix("/infer")?;
    if rest.contains('%') {
        return None;
    }
    let mut segments = rest.split('/');
    match (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (Some(model), None, _, _) if !model.is_empty() => Some((model, None)),
        (Some(model), Some("versions"), Some(version), None)
            if !model.is_empty() && !version.is_empty() =>
        {
            Some((model, Some(version)))
        }
        _ => None,
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    /// A listener's queue holds many more connections than the 128 of a
    /// default `listen`: at the connection cap they wait there, not in the
    /// client's SYN retries. (Loopback connects complete at once while the
    /// queue has room; past it they hang, and the bound fails the test.)
    #[tokio::test]
    async fn a_listener_queues_a_thousand_connections_it_has_not_accepted() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The kernel's own cap, 4096 since Linux 5.4.
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .map_or(4096, |text| text.trim().parse().unwrap());
        let mut queued = Vec::new();
        for _ in 0..somaxconn.min(1000) {
            let connect = tokio::net::TcpStream::connect(addr);
            let stream = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
                .await
                .expect("a connection found the listen queue full")
                .unwrap();
            queued.push(stream);
        }
        let taken = bind(addr).await.unwrap_err();
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
        assert!(
            taken
                .to_string()
                .starts_with(&format!("cannot listen on {addr}: ")),
            "{taken}"
        );
        drop(listener);
    }

    #[test]
    fn headers_found_in_one_pass_are_those_a_lookup_finds() {
        use http::HeaderValue;
        let mut headers = http::HeaderMap::new();
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        headers.append("x-session", HeaderValue::from_static("first"));
        headers.append("x-session", HeaderValue::from_static("second"));
        headers.append("x-bin", HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        let session = http::HeaderName::from_static("x-session");
        let bin = http::HeaderName::from_static("x-bin");
        let absent = http::HeaderName::from_static("x-absent");
        let names = [&session, &header::CONTENT_LENGTH, &absent, &session, &bin];
        let found = headers.find(names);
        for (name, value) in names.iter().zip(found) {
            // A repeated header reads as its first value, as `get` gives;
            // a name asked twice is found twice.
            assert_eq!(
                value,
                headers.get(*name).map(HeaderValue::as_bytes),
                "{name}"
            );
        }
        assert_eq!(text_of(&session, found[0]).unwrap(), Some("first"));
        assert_eq!(text_of(&absent, found[2]).unwrap(), None);
        let error = text_of(&bin, found[4]).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(error.message.contains("x-bin"), "{}", error.message);
        assert!(check_length(found[1], 12).is_ok());
        assert_eq!(
            check_length(found[1], 11).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert!(check_length(None, 0).is_ok());
    }

    #[test]
    fn inference_paths_taken_before_the_router() {
        assert_eq!(
            infer_path("/v2/models/digits/infer"),
            Some(("digits", None))
        );
        assert_eq!(
            infer_path("/v2/models/digits/versions/3/infer"),
            Some(("digits", Some("3")))
        );
        for other in [
            "/v2/models/digits",
            "/v2/models/digits/infer/",
            "/v2/models//infer",
            "/v2/models/digits/versions//infer",
            "/v2/models/digits/versions/3/ready",
            "/v2/models/digits/feedback",
            "/v2/models/a/b/infer",
            "/v2/models/digits/versions/3/x/infer",
            "/v2/models/dig%20its/infer",
            "/v1/models/digits/infer",
        ] {
            assert_eq!(infer_path(other), None, "{other}");
        }
    }

    async fn body_text(response: Response) -> (StatusCode, String) {
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn errors_are_json() {
        let (status, text) =
            body_text(ApiError::bad_request("bad \"thing\"").into_response()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(text, r#"{"error":"bad \"thing\""}"#);
        let response = ApiError::unavailable("busy", 1).into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        // Internal causes stay in the log.
        let (status, text) =
            body_text(ApiError::internal("database is locked at /var/x").into_response()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!text.contains("database"), "{text}");
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_are_json() {
        let app = with_fallbacks(Router::new().route("/x", get(|| async { "x" })));
        let req = http::Request::get("/nope").body(Body::empty()).unwrap();
        let (status, text) = body_text(app.clone().oneshot(req).await.unwrap()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(text, r#"{"error":"no route for GET /nope"}"#);
        let req = http::Request::post("/x").body(Body::empty()).unwrap();
        let (status, text) = body_text(app.oneshot(req).await.unwrap()).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(text, r#"{"error":"POST is not allowed on /x"}"#);
    }

    #[test]
    fn bearer_tokens_are_read_strictly() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), Ok(None));
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Ok(Some("abc")));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Ok(Some("abc")));
        for bad in ["Basic abc", "Bearer", "abc", "Bearer  "] {
            h.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert!(bearer(&h).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn bodies_are_read_whole_in_one_frame_or_many() {
        use futures::StreamExt;
        let chunks = |parts: &'static [&'static str]| {
            Body::from_stream(
                futures::stream::iter(parts.iter().copied())
                    .map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p.as_bytes()))),
            )
        };
        assert_eq!(read_body(Body::empty(), 5).await.unwrap(), "");
        assert_eq!(read_body(Body::from("hello"), 5).await.unwrap(), "hello");
        assert_eq!(
            read_body(chunks(&["he", "ll", "o"]), 5).await.unwrap(),
            "hello"
        );
        assert_eq!(read_body(chunks(&["", "hello"]), 5).await.unwrap(), "hello");
        for over in [
            chunks(&["hello!"]),
            chunks(&["hel", "lo!"]),
            chunks(&["hello", "!"]),
        ] {
            let err = read_body(over, 5).await.unwrap_err();
            assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        }
        // A body that is not ready at first is waited for, not cut short.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
        let late = Body::from_stream(tokio_stream_of(rx));
        let mut reader = std::pin::pin!(read_body(late, 5));
        assert!(futures::poll!(reader.as_mut()).is_pending());
        tx.send(Ok(Bytes::from_static(b"hi"))).await.unwrap();
        tx.send(Ok(Bytes::from_static(b"!"))).await.unwrap();
        drop(tx);
        assert_eq!(reader.await.unwrap(), "hi!");
        let failing = Body::from_stream(futures::stream::iter([Err::<Bytes, _>(
            std::io::Error::other("reset"),
        )]));
        let err = read_body(failing, 5).await.unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("reset"), "{}", err.message);
    }

    /// The receiving end of a channel as a stream.
    fn tokio_stream_of<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Send + 'static {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn bodies_are_limited() {
        let ok = read_body(Body::from("hello"), 5).await.unwrap();
        assert_eq!(ok, "hello");
        let err = read_body(Body::from("hello!"), 5).await.unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            err.message,
            "request body is larger than the limit of 5 bytes"
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, "6".parse().unwrap());
        assert!(check_content_length(&headers, 5).is_err());
        assert!(check_content_length(&headers, 6).is_ok());
    }
}
