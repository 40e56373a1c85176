//! Serving a service that speaks only HTTP/2 (gRPC's) with hyper, with each
//! connection taking its part in the process's connection cap.
//!
//! [`serve_http2`] is the accept loop and the connections behind a gRPC
//! port, as `server` is behind a REST one. Each connection counts the calls
//! it carries (from the service's call until hyper drops the answer's body,
//! that is once it is sent, or the call's future, when the client resets
//! the stream). At the cap ([`crate::limit`]'s `Reclaim`), a connection with
//! no call in flight closes when asked to make room for a new client, the
//! HTTP/2 way: a graceful shutdown (GOAWAY, then a ping round trip before
//! the last stream id is fixed), so calls the client sent before it saw the
//! GOAWAY are still answered, and those the server did not take are ones a
//! gRPC client retries on a new connection by itself. A connection idle at
//! two checks (every `silence::CHECK`) with no call started between them
//! is marked quiet (`limit::Activity`), so asks pick it before connections only between two calls: a
//! gRPC channel is long-lived and shared, and closing a busy one costs its
//! client a reconnect.
//!
//! Shutdown: when the signal completes the loop stops accepting, every
//! connection shuts down gracefully (calls in flight are answered) and
//! [`serve_http2`] returns once all have closed.

use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tower::ServiceExt;

use crate::limit::{Activity, Reclaim};

/// How hyper holds each HTTP/2 connection.
#[derive(Debug, Clone, Copy)]
pub struct Http2 {
    /// How often an HTTP/2 PING goes to the client.
    pub keep_alive_interval: Duration,
    /// How long a PING waits for its answer before the connection closes.
    pub keep_alive_timeout: Duration,
    /// Most calls one connection carries at once.
    pub max_concurrent_streams: u32,
}

/// Serves HTTP/2 connections accepted on `listener` until `signal`
/// completes, then lets calls in flight finish and returns once every
/// connection has closed. `connection` makes, from each accepted
/// connection and its peer, what hyper serves: the connection (wrapped as
/// the caller likes) and its service. Connections close when `reclaim`
/// (the listener's cap's) asks and no call is in flight.
pub async fn serve_http2<L, IO, S, B>(
    listener: L,
    settings: Http2,
    mut connection: impl FnMut(L::Io, L::Addr) -> (IO, S),
    signal: impl Future<Output = ()> + Send + 'static,
    reclaim: Arc<Reclaim>,
) where
    L: axum::serve::Listener,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    crate::server::accept_until(listener, signal, reclaim, |io, peer, stop, reclaim| {
        let (io, service) = connection(io, peer);
        async move { serve_connection(io, service, settings, stop, &reclaim).await }
    })
    .await;
}

/// Serves one connection until it closes.
async fn serve_connection<IO, S, B>(
    io: IO,
    service: S,
    settings: Http2,
    stop: watch::Sender<()>,
    reclaim: &Reclaim,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let calls = Arc::new(Calls::default());
    let mut asked = reclaim.watch();
    // Quiet when a check finds no call started since the check before.
    let mut activity = Activity::new();
    let connection = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(settings.keep_alive_interval)
        .keep_alive_timeout(settings.keep_alive_timeout)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .serve_connection(
            hyper_util::rt::TokioIo::new(io),
            Counting {
                service,
                calls: Arc::clone(&calls),
            },
        );
    let mut connection = pin!(connection);
    let mut stopped = pin!(stop.closed().fuse());
    let mut closing = false;
    loop {
        // Biased: the connection first, so that calls it takes in this
        // wake-up are counted when `busy` is read.
        tokio::select! {
            biased;
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP/2 connection ended");
                }
                break;
            }
            () = &mut stopped, if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            // Quiet or not, the same graceful shutdown: calls the client
            // sent before it saw the GOAWAY are answered.
            _ = std::future::poll_fn(|cx| {
                calls.idle.register(cx.waker());
                let started = calls.started.load(Ordering::Relaxed);
                let idle = calls.busy.load(Ordering::SeqCst) == 0;
                asked.poll_activity(cx, &mut activity, started, idle)
            }), if !closing => {
                tracing::debug!("closing an idle HTTP/2 connection to make room for a new one");
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
    // No longer counted as closing before the connection's room is free
    // (when `io`, inside `connection`, drops).
    drop(asked);
}

/// A connection's calls, as its loop and its calls' answers count them.
#[derive(Debug, Default)]
struct Calls {
    /// In flight: taken and not yet answered whole.
    busy: AtomicUsize,
    /// Taken so far.
    started: AtomicU64,
    /// The connection's task, woken when the last call in flight ends.
    idle: AtomicWaker,
}

/// A call in flight, until dropped.
#[derive(Debug)]
struct Call(Arc<Calls>);

impl Call {
    fn new(calls: &Arc<Calls>) -> Call {
        calls.busy.fetch_add(1, Ordering::SeqCst);
        calls.started.fetch_add(1, Ordering::Relaxed);
        Call(Arc::clone(calls))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.wake();
        }
    }
}

/// The service as hyper calls it: each call counted until its answer's
/// body is dropped.
#[derive(Clone)]
struct Counting<S> {
    service: S,
    calls: Arc<Calls>,
}

impl<S, B> hyper::service::Service<http::Request<Incoming>> for Counting<S>
where
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone,
{
    type Response = http::Response<Answered<B>>;
    type Error = Infallible;
    type Future = Answering<tower::util::Oneshot<S, http::Request<Incoming>>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        Answering {
            call: Some(Call::new(&self.calls)),
            inner: self.service.clone().oneshot(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's answer on its way, counted in flight.
    struct Answering<F> {
        call: Option<Call>,
        #[pin]
        inner: F,
    }
}

impl<F, B> Future for Answering<F>
where
    F: Future<Output = Result<http::Response<B>, Infallible>>,
{
    type Output = Result<http::Response<Answered<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        let call = this.call.take();
        Poll::Ready(Ok(response.map(|body| Answered { body, _call: call })))
    }
}

pin_project_lite::pin_project! {
    /// An answer's body, its call counted in flight until hyper drops it.
    struct Answered<B> {
        #[pin]
        body: B,
        _call: Option<Call>,
    }
}

impl<B: Body> Body for Answered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
