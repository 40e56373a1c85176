//! The accept loop and the connections behind [`crate::serve`].
//!
//! A server with a [`Front`] route serves each connection with a small
//! HTTP/1.1 loop of its own first. It parses a request head (httparse) and,
//! when the request is the front's kind — `POST` to an inference path over
//! HTTP/1.1 with a `Content-Length` body of at most [`FAST_BODY_MAX`], no
//! `Transfer-Encoding`, no upgrade — reads the body whole, calls the front
//! with an [`Inference`] (its header lines left in the head read) and
//! writes the [`Answer`], head and body, in one write. At the first request
//! it does not take, the connection is handed to hyper for good, with the
//! bytes already read (a [`Rewind`]): every other route, and everything
//! unusual (chunked bodies, HTTP/1.0, malformed heads, which hyper answers
//! with 400), is hyper's, as it is on servers without a front. Why: hyper's
//! server, its dispatcher, body channel and encoder, was the largest part of
//! what a proxied inference cost the gateway (BENCHMARKS.md, "Gateway CPU
//! per request").
//!
//! Shutdown: when the signal completes the loop stops accepting; a
//! connection waiting for its next request closes, one with a request in
//! flight answers it (with `connection: close`) and then closes, and
//! [`run`] returns once every connection has closed.
//!
//! At the process's connection cap, connections waiting for their next
//! request close when asked to make room for a new client
//! ([`crate::limit`]'s `Reclaim`): the loop's between requests, hyper's
//! with no exchange in flight (counted from the service's call until its
//! answer is written: a short body when hyper takes it, a streamed or long
//! one when hyper drops it). They close after a drain of
//! [`RECLAIM_DRAIN`], or after answering a request that comes meanwhile
//! (with `connection: close`; in hyper's part, one whose head is still
//! arriving when the drain ends too: bytes read since the last exchange);
//! connections idle since before their last silence check (`quiet`: the
//! loop's silence watch marks them, and in hyper's part `limit::Activity`:
//! idle at two checks with nothing read between them) are asked first and
//! close at once.
//!
//! Silent clients are closed (`crate::silence`): the loop after
//! [`IDLE_TIMEOUT`] waiting for a next request, after [`READ_TIMEOUT`] in
//! the middle of sending one (answered 408 first) or of not reading its
//! answer; hyper's part of a connection at [`IDLE_TIMEOUT`] without a whole
//! request head (its `header_read_timeout`) and after [`READ_TIMEOUT`] of
//! an answer not read (`Silenced::answers`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::FutureExt;
use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::front::{Inference, Line, RawHead, RequestBody, RequestHeaders};
use crate::limit::{Activity, Asked, Close, RECLAIM_DRAIN, Reclaim};
use crate::silence::{
    CHECK, Counted, IDLE_TIMEOUT, READ_TIMEOUT, Silenced, Silent, Waiting, Watch,
};
use crate::{Answer, Front};

/// Largest request body the connection loop reads itself; a larger one
/// goes to hyper, which streams it to a handler that can refuse it early.
pub(crate) const FAST_BODY_MAX: usize = 1 << 20;

/// Longest request head the loop reads before handing the connection to
/// hyper (which answers an overlong head with 431).
const MAX_HEAD: usize = 16 << 10;

/// Most header lines in a request the loop takes.
const MAX_HEADERS: usize = 64;

/// Answer bodies up to this size are copied behind their head and sent in
/// one write; larger ones go in a vectored write beside it, uncopied.
const COPY_BODY: usize = 4 << 10;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 << 10;

/// The service of one connection: the front route, else the router (with
/// the peer's address as `ConnectInfo` when `peers`).
#[derive(Clone)]
pub(crate) struct Fronted {
    pub(crate) front: Option<Front>,
    pub(crate) router: Router,
    pub(crate) peer: SocketAddr,
    /// Whether the router's requests carry `ConnectInfo`.
    pub(crate) peers: bool,
}

type Answered = Result<Response, Infallible>;

/// A front's answer as hyper's connections take it.
fn answered(answer: Answer) -> Answered {
    Ok(axum::response::IntoResponse::into_response(answer))
}

impl tower::Service<Request> for Fronted {
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::Either<
        futures::future::Map<futures::future::BoxFuture<'static, Answer>, fn(Answer) -> Answered>,
        axum::routing::future::RouteFuture<Infallible>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if let Some(front) = &self.front
            && request.method() == Method::POST
            && let Some((model, version)) = crate::infer_path(request.uri().path())
        {
            let (model, version) = (model.to_owned(), version.map(str::to_owned));
            let (parts, body) = request.into_parts();
            let inference = Inference {
                model,
                version,
                peer: self.peer,
                headers: RequestHeaders::Map(parts.headers),
                body: RequestBody::Streamed(body),
            };
            return futures::future::Either::Left(
                front(inference).map(answered as fn(Answer) -> Answered),
            );
        }
        futures::future::Either::Right(self.route(request))
    }
}

impl Fronted {
    /// The router's answer to `request`.
    fn route(&mut self, mut request: Request) -> axum::routing::future::RouteFuture<Infallible> {
        if self.peers {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(self.peer));
        }
        tower::Service::call(&mut self.router, request)
    }
}

/// Accepts connections from `listener` and serves each with `service`
/// (its `peer` set to the connection's) until `signal` completes; then
/// waits for the open connections to finish (see the module doc). Idle
/// connections close when `reclaim` (the listener's cap's) asks.
pub(crate) async fn run<L>(
    listener: L,
    service: Fronted,
    signal: impl Future<Output = ()> + Send + 'static,
    reclaim: Arc<Reclaim>,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    accept_until(listener, signal, reclaim, |io, peer, stop, reclaim| {
        let connection = Fronted {
            peer,
            ..service.clone()
        };
        async move { connection.serve(io, stop, &reclaim).await }
    })
    .await;
}

/// Accepts connections from `listener` until `signal` completes, each
/// served in a task of its own by what `serve` makes of it, its peer, the
/// stop (closed when the signal completes) and `reclaim`; then waits until
/// every connection has closed.
pub(crate) async fn accept_until<L, F>(
    mut listener: L,
    signal: impl Future<Output = ()> + Send + 'static,
    reclaim: Arc<Reclaim>,
    mut serve: impl FnMut(L::Io, L::Addr, watch::Sender<()>, Arc<Reclaim>) -> F,
) where
    L: axum::serve::Listener,
    F: Future<Output = ()> + Send + 'static,
{
    // Connections watch `stop` close; this loop watches `open` lose its
    // receivers, one held by each connection.
    let (stop, stop_rx) = watch::channel(());
    tokio::spawn(async move {
        signal.await;
        drop(stop_rx);
    });
    let (open, open_rx) = watch::channel(());
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.closed() => break,
        };
        let connection = serve(io, peer, stop.clone(), Arc::clone(&reclaim));
        let open = open_rx.clone();
        tokio::spawn(async move {
            connection.await;
            drop(open);
        });
    }
    drop(open_rx);
    drop(listener);
    open.closed().await;
}

/// What the connection loop left for hyper.
enum Handed {
    /// The connection is done.
    Closed,
    /// Bytes read and not answered: a request the loop does not take,
    /// and whatever came after it; and whether the connection was asked
    /// to make room (it closes after that request).
    Over(Bytes, bool),
}

impl Fronted {
    /// Serves one connection until it closes.
    async fn serve<I>(self, mut io: I, stop: watch::Sender<()>, reclaim: &Reclaim)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut asked = reclaim.watch();
        let (read, mut draining) = match &self.front {
            Some(front) => match self.fast(front, &mut io, &stop, &mut asked).await {
                Ok(Handed::Over(read, draining)) => {
                    // Asked to make room while this request came: hyper
                    // answers it, saying the connection closes.
                    let drain = draining.then(|| Box::pin(tokio::time::sleep(RECLAIM_DRAIN)));
                    (read, drain)
                }
                Ok(Handed::Closed) | Err(_) => return,
            },
            None => (Bytes::new(), None),
        };
        let exchanges = Arc::new(Exchanges {
            closing: AtomicBool::new(draining.is_some()),
            ..Exchanges::default()
        });
        let io = hyper_util::rt::TokioIo::new(Silenced::answers(Rewind {
            read,
            io,
            exchanges: Arc::clone(&exchanges),
        }));
        let service = Hyper {
            service: self,
            exchanges: Arc::clone(&exchanges),
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(IDLE_TIMEOUT)
            .serve_connection(io, service);
        let mut connection = pin!(connection);
        let mut stopped = pin!(stop.closed().fuse());
        // Asked to make room: answers say `connection: close` (hyper then
        // closes after writing one) and the connection closes when the
        // drain ends, or at once when it was quiet.
        let mut closing = false;
        // Quiet when a check finds nothing read and no exchange since the
        // check before.
        let mut activity = Activity::new();
        loop {
            // Biased: the connection first, so that an exchange that ends
            // in this wake-up is seen by the look at `busy`.
            tokio::select! {
                biased;
                _ = connection.as_mut() => break,
                () = &mut stopped => connection.as_mut().graceful_shutdown(),
                close = std::future::poll_fn(|cx| {
                    let read = exchanges.read.load(Ordering::Relaxed);
                    let idle = exchanges.busy.load(Ordering::Relaxed) == 0;
                    asked.poll_activity(cx, &mut activity, read, idle)
                }), if draining.is_none() && !closing => match close {
                    Close::AtOnce => {
                        tracing::debug!("closing a quiet connection to make room for a new one");
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    Close::AfterDrain => {
                        tracing::debug!("closing an idle connection to make room for a new one");
                        exchanges.closing.store(true, Ordering::Relaxed);
                        draining = Some(Box::pin(tokio::time::sleep(RECLAIM_DRAIN)));
                    }
                },
                // hyper closes an idle connection at once, and a busy one
                // after its answer.
                () = std::future::poll_fn(|cx| match &mut draining {
                    Some(drain) => drain.as_mut().poll(cx),
                    None => Poll::Pending,
                }), if !closing => {
                    closing = true;
                    // A request whose head is still arriving is answered,
                    // saying the connection closes, rather than cut.
                    if !exchanges.arriving() {
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        // No longer counted as closing before the connection's room is
        // free (it is when `connection` drops): a client asking meanwhile
        // must not count on it.
        drop(asked);
    }

    /// Answers the front's requests on `io` until the connection closes or
    /// a request comes that is not the front's.
    async fn fast<I>(
        &self,
        front: &Front,
        io: &mut I,
        stop: &watch::Sender<()>,
        asked: &mut Asked<'_>,
    ) -> std::io::Result<Handed>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let moved = AtomicU64::new(0);
        let mut io = Counted { io, moved: &moved };
        let timer = pin!(tokio::time::sleep(CHECK));
        let mut watch = Watch::new(timer, &moved).marking(asked.quiet());
        let mut buf = BytesMut::new();
        let mut out: Vec<u8> = Vec::new();
        let mut stopping = Stopping {
            wait: pin!(stop.closed()),
            stop,
            registered: false,
        };
        // Asked to make room: the connection closes after its next answer,
        // or when the drain ends with none asked.
        let mut draining: Option<Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            // A whole request head, or a reason to stop.
            let head = loop {
                if !buf.is_empty() {
                    match parse(&buf) {
                        Parsed::Partial if buf.len() <= MAX_HEAD => {}
                        Parsed::Partial | Parsed::Other => {
                            return Ok(Handed::Over(buf.freeze(), draining.is_some()));
                        }
                        Parsed::Fast(head) => break head,
                    }
                }
                buf.reserve(READ_CHUNK);
                let read = if buf.is_empty() {
                    // Between requests: the only moment a stop closes the
                    // connection at once, and a want of room once its
                    // drain ends.
                    tokio::select! {
                        biased;
                        () = std::future::poll_fn(|cx| stopping.poll(cx)) => return Ok(Handed::Closed),
                        read = watch.bound(io.read_buf(&mut buf), Waiting::Idle) => match read {
                            Ok(read) => read?,
                            Err(Silent) => return Ok(Handed::Closed),
                        },
                        () = std::future::poll_fn(|cx| match &mut draining {
                            Some(drain) => drain.as_mut().poll(cx),
                            None => match asked.poll(cx, true) {
                                Poll::Ready(Close::AtOnce) => {
                                    tracing::debug!("closing a quiet connection to make room for a new one");
                                    Poll::Ready(())
                                }
                                Poll::Ready(Close::AfterDrain) => {
                                    tracing::debug!("closing an idle connection to make room for a new one");
                                    let mut drain = Box::pin(tokio::time::sleep(RECLAIM_DRAIN));
                                    let drained = drain.as_mut().poll(cx);
                                    draining = Some(drain);
                                    drained
                                }
                                Poll::Pending => Poll::Pending,
                            },
                        }) => return Ok(Handed::Closed),
                    }
                } else {
                    match watch.bound(io.read_buf(&mut buf), Waiting::Request).await {
                        Ok(read) => read?,
                        Err(Silent) => return timed_out(&mut io, &mut watch, &mut out).await,
                    }
                };
                if read == 0 {
                    return Ok(Handed::Closed);
                }
                // A request is coming: asks pick idle connections.
                asked.busy();
            };
            let read = buf.split().freeze();
            let rest = read.slice(head.len..);
            let body = if rest.len() >= head.content_length {
                if rest.len() > head.content_length {
                    // Pipelined: the next request's first bytes.
                    buf.extend_from_slice(&rest[head.content_length..]);
                }
                rest.slice(..head.content_length)
            } else {
                if head.expect_continue {
                    let sent = watch.bound(
                        async {
                            io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                            io.flush().await
                        },
                        Waiting::Reader,
                    );
                    match sent.await {
                        Ok(sent) => sent?,
                        Err(Silent) => return Ok(Handed::Closed),
                    }
                }
                // Read into a buffer of the body's size, never zeroed
                // first, and never past the body (a pipelined request's
                // bytes stay in the socket).
                let mut body = BytesMut::with_capacity(head.content_length);
                body.extend_from_slice(&rest);
                while body.len() < head.content_length {
                    let left = head.content_length - body.len();
                    let mut room = BufMut::limit(&mut body, left);
                    match watch.bound(io.read_buf(&mut room), Waiting::Request).await {
                        Ok(read) => {
                            if read? == 0 {
                                return Ok(Handed::Closed);
                            }
                        }
                        Err(Silent) => return timed_out(&mut io, &mut watch, &mut out).await,
                    }
                }
                body.freeze()
            };
            let close = head.close;
            let response = front(head.inference(read, body, self.peer)).await;
            // A stop while the request ran, or a want of room: answer it,
            // then close.
            let close = close || stop.is_closed() || draining.is_some();
            let written = write_answer(&mut io, &response, close, &mut out);
            match watch.bound(written, Waiting::Reader).await {
                Ok(written) => written?,
                Err(Silent) => return Ok(Handed::Closed),
            }
            if close {
                io.shutdown().await?;
                return Ok(Handed::Closed);
            }
        }
    }
}

/// The server's stop as a connection between requests sees it. Its wait
/// is polled once, registering the connection task's waker with the
/// channel (a connection's task keeps its waker, so the registration
/// stays good); after that a stop wakes the task, and each look is a read
/// of the channel's state. Polling the wait itself at every request would
/// take the channel's lock each time (tokio's `Notified` updates its waker
/// under the lock on every poll), one lock shared by every connection of
/// the server. One wait per connection, not one per request, for the same
/// reason: each new wait registers and unregisters under that lock.
struct Stopping<'a, F> {
    wait: Pin<&'a mut F>,
    stop: &'a watch::Sender<()>,
    /// Whether the wait was polled.
    registered: bool,
}

impl<F: Future<Output = ()>> Stopping<'_, F> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.registered {
            self.registered = true;
            return self.wait.as_mut().poll(cx);
        }
        if self.stop.is_closed() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Answers 408 to a client that went silent in the middle of its request,
/// and closes the connection.
async fn timed_out<I>(
    io: &mut I,
    watch: &mut Watch<'_>,
    out: &mut Vec<u8>,
) -> std::io::Result<Handed>
where
    I: AsyncWrite + Unpin,
{
    let answer = crate::ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "the request stopped arriving: nothing came for {} s; send each request whole",
            READ_TIMEOUT.as_secs()
        ),
    )
    .into_answer();
    let written = async {
        write_answer(io, &answer, true, out).await?;
        io.shutdown().await
    };
    // A client that reads nothing either is not waited for.
    if let Ok(written) = watch.bound(written, Waiting::Reader).await {
        written?;
    }
    Ok(Handed::Closed)
}

/// A request head the loop takes.
struct Head {
    /// Its length, blank line included.
    len: usize,
    /// Where the model and version its path names are in it.
    model: std::ops::Range<usize>,
    version: Option<std::ops::Range<usize>>,
    /// Where its header lines are in it.
    lines: smallvec::SmallVec<[Line; 8]>,
    content_length: usize,
    /// The client asked to close after the answer.
    close: bool,
    /// The client waits for `100 Continue` before sending the body.
    expect_continue: bool,
}

enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// Not the front's kind of request, or not a valid one: hyper's.
    Other,
    Fast(Head),
}

/// Reads the request head at the start of `buf`.
fn parse(buf: &[u8]) -> Parsed {
    // Not initialised first: httparse writes the slots it uses.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, &mut headers) {
        // Longer heads are hyper's: where a line is fits in a `u16`.
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) | Err(_) => return Parsed::Other,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
    };
    let (Some("POST"), Some(1), Some(path)) = (request.method, request.version, request.path)
    else {
        return Parsed::Other;
    };
    let Some((model, version)) = crate::infer_path(path) else {
        return Parsed::Other;
    };
    let at = |part: &[u8]| {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + part.len()
    };
    let mut head = Head {
        len,
        model: at(model.as_bytes()),
        version: version.map(|v| at(v.as_bytes())),
        lines: smallvec::SmallVec::new(),
        content_length: 0,
        close: false,
        expect_continue: false,
    };
    let mut content_length = None;
    for h in request.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            if content_length.is_some() {
                return Parsed::Other;
            }
            match digits(h.value) {
                Some(n) if n <= FAST_BODY_MAX => content_length = Some(n),
                _ => return Parsed::Other,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Parsed::Other;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    head.close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::Other;
                }
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            if !h.value.eq_ignore_ascii_case(b"100-continue") {
                return Parsed::Other;
            }
            head.expect_continue = true;
        }
        let (name, value) = (at(name), at(h.value));
        // Within the head, at most `MAX_HEAD` long: each fits.
        let fit = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        head.lines.push([
            fit(name.start),
            fit(name.end),
            fit(value.start),
            fit(value.end),
        ]);
    }
    head.content_length = content_length.unwrap_or(0);
    Parsed::Fast(head)
}

/// A `Content-Length` value: ASCII digits only, at most 19 of them.
fn digits(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0usize, |n, d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

impl Head {
    /// The inference this head asks for, `read` the bytes it was parsed
    /// from: its header lines kept there, not copied into a map.
    fn inference(self, read: Bytes, body: Bytes, peer: std::net::SocketAddr) -> Inference {
        let text = |range: std::ops::Range<usize>| {
            // `httparse` gave the path as text; the names are slices of it.
            String::from_utf8_lossy(&read[range]).into_owned()
        };
        Inference {
            model: text(self.model),
            version: self.version.map(text),
            peer,
            headers: RequestHeaders::Head(RawHead {
                head: read.slice(..self.len),
                lines: self.lines,
            }),
            body: RequestBody::Whole(body),
        }
    }
}

/// Writes `answer` to `io` (with `connection: close` when `close`), using
/// `out` as the buffer.
async fn write_answer<I>(
    io: &mut I,
    answer: &Answer,
    close: bool,
    out: &mut Vec<u8>,
) -> std::io::Result<()>
where
    I: AsyncWrite + Unpin,
{
    let status = answer.status();
    let body = answer.body();
    // No body, and no length, for 1xx, 204 and 304.
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(answer.lines());
    if !answer.dated() {
        out.extend_from_slice(b"date: ");
        date::write(out);
        out.extend_from_slice(b"\r\n");
    }
    if !bodiless {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        io.write_all(out).await?;
    } else if body.len() <= COPY_BODY {
        out.extend_from_slice(body);
        io.write_all(out).await?;
    } else {
        // Head and body in one vectored write, the body not copied.
        io.write_all_buf(&mut Buf::chain(out.as_slice(), &body[..]))
            .await?;
    }
    // A TLS stream may keep records it could not send yet until flushed.
    io.flush().await
}

/// The `date` header's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static NOW: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    /// Appends the current date, as HTTP writes it, to `out`.
    pub(super) fn write(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        NOW.with_borrow_mut(|(at, text)| {
            if *at != second {
                *at = second;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

/// A connection handed to hyper: the bytes read already, then the socket;
/// what hyper reads is counted in its exchanges' `read`.
struct Rewind<I> {
    read: Bytes,
    io: I,
    exchanges: Arc<Exchanges>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        if self.read.is_empty() {
            std::task::ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        } else {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
        }
        let n = (buf.filled().len() - before) as u64;
        self.exchanges.read.fetch_add(n, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

crate::delegate_write!(Rewind, io);

/// A connection's service as hyper calls it, counting its exchanges.
struct Hyper {
    service: Fronted,
    exchanges: Arc<Exchanges>,
}

/// A hyper connection's exchanges, as its serving loop sees them.
#[derive(Default)]
struct Exchanges {
    /// In flight.
    busy: AtomicUsize,
    /// Whether answers say `connection: close` (the connection was asked
    /// to make room).
    closing: AtomicBool,
    /// Bytes read from the client.
    read: AtomicU64,
    /// `read` when the last exchange ended.
    heard: AtomicU64,
}

impl Exchanges {
    /// Whether a request is on its way with no exchange for it yet: bytes
    /// came since the last exchange ended (a head hyper has not parsed
    /// whole; hyper counts its connection idle meanwhile).
    fn arriving(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0
            && self.read.load(Ordering::Relaxed) != self.heard.load(Ordering::Relaxed)
    }
}

/// An exchange in flight on a hyper connection: from the service's call
/// until its answer is written (see [`held`]) or the exchange is dropped.
struct Exchange(Arc<Exchanges>);

impl Exchange {
    fn new(exchanges: &Arc<Exchanges>) -> Exchange {
        exchanges.busy.fetch_add(1, Ordering::Relaxed);
        Exchange(Arc::clone(exchanges))
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            let read = self.0.read.load(Ordering::Relaxed);
            self.0.heard.store(read, Ordering::Relaxed);
        }
    }
}

/// Answer bodies of at most this many bytes, of a known length, are taken
/// as written when they are handed to hyper (it writes them whole at once);
/// longer or streamed ones hold their exchange until they are done.
const WRITTEN_WHOLE: u64 = 64 << 10;

pin_project_lite::pin_project! {
    /// A service's answer as hyper awaits it, with its exchange.
    struct Exchanging<F> {
        #[pin]
        answer: F,
        exchange: Option<Exchange>,
    }
}

impl<F: Future<Output = Answered>> Future for Exchanging<F> {
    type Output = Answered;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answered> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.answer.poll(cx));
        Poll::Ready(Ok(held(response, this.exchange.take())))
    }
}

/// `response`, holding `exchange` in its body when the body is streamed or
/// long (an artifact download, a watch stream): a connection is idle only
/// once hyper has written it and dropped it. A short body of known length
/// ends the exchange here, without wrapping (and boxing) it.
fn held(mut response: Response, exchange: Option<Exchange>) -> Response {
    if exchange
        .as_ref()
        .is_some_and(|exchange| exchange.0.closing.load(Ordering::Relaxed))
    {
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    match (
        http_body::Body::size_hint(response.body()).exact(),
        exchange,
    ) {
        (Some(len), _) if len <= WRITTEN_WHOLE => response,
        (_, None) => response,
        (_, Some(exchange)) => response.map(|body| {
            Body::new(Answering {
                body,
                _exchange: exchange,
            })
        }),
    }
}

/// An answer's body, holding its [`Exchange`] until hyper drops it.
struct Answering {
    body: Body,
    _exchange: Exchange,
}

impl http_body::Body for Answering {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Hyper {
    type Response = Response;
    type Error = Infallible;
    type Future = Exchanging<<Fronted as tower::Service<Request>>::Future>;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let exchange = Some(Exchange::new(&self.exchanges));
        let answer = tower::Service::call(&mut self.service.clone(), request.map(Body::new));
        Exchanging { answer, exchange }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{Semaphore, mpsc, oneshot};

    use super::*;
    use crate::Headers;

    /// Answers `{model}:{body}` to every inference request, with
    /// `/{version}` after the model when the path names one and `[{tag}]`
    /// when the request has an `x-tag` header; the model `held` first
    /// says it started and waits for a permit of `gate`.
    fn echo_front(started: mpsc::UnboundedSender<()>, gate: Arc<Semaphore>) -> Front {
        Arc::new(move |inference: Inference| {
            let (started, gate) = (started.clone(), gate.clone());
            Box::pin(async move {
                let Inference {
                    model,
                    version,
                    headers,
                    body,
                    ..
                } = inference;
                if model == "held" {
                    let _ = started.send(());
                    gate.acquire().await.unwrap().forget();
                }
                let body = body.read(4 << 20).await.unwrap();
                let mut text = model.into_bytes();
                if let Some(version) = version {
                    text.push(b'/');
                    text.extend_from_slice(version.as_bytes());
                }
                if let Some(tag) = headers.first_named("x-tag") {
                    text.push(b'[');
                    text.extend_from_slice(tag);
                    text.push(b']');
                }
                text.push(b':');
                text.extend_from_slice(&body);
                Answer::new(StatusCode::OK, text.into())
            })
        })
    }

    struct Server {
        addr: SocketAddr,
        /// Dropped, it stops the server.
        _stop: oneshot::Sender<()>,
        started: mpsc::UnboundedReceiver<()>,
        gate: Arc<Semaphore>,
    }

    async fn server() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (started_tx, started) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let router = health_router();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(crate::serve(
            listener,
            router,
            Some(echo_front(started_tx, gate.clone())),
            async move {
                let _ = stopped.await;
            },
            None,
        ));
        Server {
            addr,
            _stop: stop,
            started,
            gate,
        }
    }

    /// One answer from `stream`: status, headers (names lowercased), body.
    /// `pending` keeps bytes read past it.
    async fn answer(
        stream: &mut (impl AsyncRead + Unpin),
        pending: &mut Vec<u8>,
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        loop {
            let mut lines = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut lines);
            if let httparse::Status::Complete(len) = response.parse(pending).unwrap() {
                let code = response.code.unwrap();
                let headers: Vec<(String, String)> = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect();
                let length: usize = headers
                    .iter()
                    .find(|(name, _)| name == "content-length")
                    .map_or(0, |(_, v)| v.parse().unwrap());
                if pending.len() >= len + length {
                    let body = pending[len..len + length].to_vec();
                    pending.drain(..len + length);
                    return (code, headers, body);
                }
            }
            let mut chunk = [0; 16 << 10];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a whole answer: {pending:?}");
            pending.extend_from_slice(&chunk[..n]);
        }
    }

    /// A connection to the server and its buffer of bytes read ahead.
    async fn connect(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
        (TcpStream::connect(addr).await.unwrap(), Vec::new())
    }

    /// Sends `raw` on `stream` and reads one answer.
    async fn ask(
        stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
        pending: &mut Vec<u8>,
        raw: &[u8],
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        stream.write_all(raw).await.unwrap();
        answer(stream, pending).await
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn infer(model: &str, body: &str) -> String {
        format!(
            "POST /v2/models/{model}/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// The connection is closed by the server: reading gives end of file.
    async fn closed(stream: &mut (impl AsyncRead + Unpin), pending: &[u8]) {
        assert!(pending.is_empty(), "{pending:?}");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }

    /// Which heads the loop takes itself, and which it hands to hyper.
    #[test]
    fn heads_the_loop_takes() {
        let fast = |text: &str| match parse(text.as_bytes()) {
            Parsed::Fast(head) => Some(head),
            Parsed::Partial => panic!("partial: {text}"),
            Parsed::Other => None,
        };
        let text = "POST /v2/models/a/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nConnection: Keep-Alive, Close\r\n\r\n{\"inputs\":1}";
        let head = fast(text).unwrap();
        assert_eq!(head.content_length, 12);
        assert!(head.close && !head.expect_continue);
        assert_eq!(head.len, 96);
        assert_eq!(
            (&text[head.model.clone()], head.version.clone()),
            ("a", None)
        );
        let lines: Vec<(&str, &str)> = head
            .lines
            .iter()
            .map(|&[ns, ne, vs, ve]| {
                let at = |from: u16, to: u16| &text[usize::from(from)..usize::from(to)];
                (at(ns, ne), at(vs, ve))
            })
            .collect();
        assert_eq!(
            lines,
            [
                ("Host", "x"),
                ("Content-Length", "12"),
                ("Connection", "Keep-Alive, Close")
            ]
        );
        let text = "POST /v2/models/a/versions/2/infer HTTP/1.1\r\nexpect: 100-Continue\r\n\r\n";
        let head = fast(text).unwrap();
        assert_eq!(
            (head.content_length, head.close, head.expect_continue),
            (0, false, true)
        );
        assert_eq!(&text[head.version.unwrap()], "2");
        assert!(matches!(
            parse(b"POST /v2/models/a/infer HTTP/1.1\r\nhost: x\r\n"),
            Parsed::Partial
        ));
        let too_big = format!(
            "POST /v2/models/a/infer HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            FAST_BODY_MAX + 1
        );
        // Whole, but longer than the loop takes (where its lines are must
        // fit in a `u16`).
        let long_head = format!(
            "POST /v2/models/a/infer HTTP/1.1\r\nx-long: {}\r\n\r\n",
            "l".repeat(MAX_HEAD)
        );
        for other in [
            "GET /v2/models/a/infer HTTP/1.1\r\n\r\n",
            "POST /v2/models/a/ready HTTP/1.1\r\n\r\n",
            "POST /v2/models/a/infer?x=1 HTTP/1.1\r\n\r\n",
            "POST /v2/models/a/infer HTTP/1.0\r\n\r\n",
            "POST /v2/models/a/infer HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST /v2/models/a/infer HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            "POST /v2/models/a/infer HTTP/1.1\r\ncontent-length: +1\r\n\r\n",
            "POST /v2/models/a/infer HTTP/1.1\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
            "POST /v2/models/a/infer HTTP/1.1\r\nexpect: something\r\n\r\n",
            "POST /v2/models/a/infer HTTP/1.1\r\nbad header\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            &too_big,
            &long_head,
        ] {
            assert!(fast(other).is_none(), "{other}");
        }
        assert_eq!(digits(b"18446744073709551615"), None);
        assert_eq!(digits(b"0012"), Some(12));
    }

    #[tokio::test]
    async fn front_requests_are_answered_in_order_on_one_connection() {
        let server = server().await;
        let (mut stream, mut pending) = connect(server.addr).await;
        // Two pipelined in one write.
        let both = format!("{}{}", infer("a", "[1]"), infer("b", "{\"x\":2}"));
        stream.write_all(both.as_bytes()).await.unwrap();
        let (code, headers, body) = answer(&mut stream, &mut pending).await;
        assert_eq!((code, body.as_slice()), (200, &b"a:[1]"[..]));
        assert_eq!(header(&headers, "content-length"), Some("5"));
        assert!(header(&headers, "date").is_some_and(|d| d.ends_with(" GMT")));
        assert_eq!(header(&headers, "connection"), None);
        let (code, _, body) = answer(&mut stream, &mut pending).await;
        assert_eq!((code, body.as_slice()), (200, &b"b:{\"x\":2}"[..]));
        // One sent a byte at a time: head and body in many reads.
        for byte in infer("c", "[3,4]").bytes() {
            stream.write_all(&[byte]).await.unwrap();
        }
        let (code, _, body) = answer(&mut stream, &mut pending).await;
        assert_eq!((code, body.as_slice()), (200, &b"c:[3,4]"[..]));
        // Pinned versions too; and an empty body.
        let (code, _, body) = ask(
            &mut stream,
            &mut pending,
            b"POST /v2/models/d/versions/2/infer HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await;
        assert_eq!((code, body.as_slice()), (200, &b"d/2:"[..]));
    }

    #[tokio::test]
    async fn large_bodies_are_read_to_their_length_and_answered_whole() {
        let server = server().await;
        let (mut stream, mut pending) = connect(server.addr).await;
        // A 300 KB body (the answer echoes it: far over one copied write)
        // whose head comes first, then the body with the next request's
        // whole bytes right behind it in the same write: the body read
        // must stop at its length.
        let data: String = (0..300_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let first = infer("big", &data);
        let split = first.find("\r\n\r\n").unwrap() + 4;
        stream.write_all(&first.as_bytes()[..split]).await.unwrap();
        let rest = format!("{}{}", &first[split..], infer("next", "[5]"));
        stream.write_all(rest.as_bytes()).await.unwrap();
        let (code, headers, body) = answer(&mut stream, &mut pending).await;
        assert_eq!(code, 200);
        assert_eq!(body.len(), "big:".len() + data.len());
        assert_eq!(&body[..4], b"big:");
        assert!(body[4..] == *data.as_bytes(), "the body came back altered");
        assert_eq!(
            header(&headers, "content-length"),
            Some(body.len().to_string().as_str())
        );
        let (code, _, body) = answer(&mut stream, &mut pending).await;
        assert_eq!((code, body.as_slice()), (200, &b"next:[5]"[..]));
        // A body that never comes whole: the connection closes, nothing
        // is answered for it.
        let cut = infer("cut", "[1,2,3,4,5,6]");
        stream
            .write_all(&cut.as_bytes()[..cut.len() - 3])
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        let mut tail = Vec::new();
        stream.read_to_end(&mut tail).await.unwrap();
        assert!(tail.is_empty(), "{tail:?}");
    }

    /// The front reads the path's version and the headers alike from a
    /// request the loop read and from one hyper read (chunked).
    #[tokio::test]
    async fn the_front_sees_the_same_request_either_way() {
        let server = server().await;
        let (mut stream, mut pending) = connect(server.addr).await;
        let looped = b"POST /v2/models/a/versions/7/infer HTTP/1.1\r\nhost: x\r\nX-Tag: blue\r\nx-tag: red\r\ncontent-length: 3\r\n\r\n[1]";
        let (code, _, body) = ask(&mut stream, &mut pending, looped).await;
        assert_eq!((code, body.as_slice()), (200, &b"a/7[blue]:[1]"[..]));
        let chunked = b"POST /v2/models/a/versions/7/infer HTTP/1.1\r\nhost: x\r\nX-Tag: blue\r\nx-tag: red\r\ntransfer-encoding: chunked\r\n\r\n3\r\n[1]\r\n0\r\n\r\n";
        let (code, _, body) = ask(&mut stream, &mut pending, chunked).await;
        assert_eq!((code, body.as_slice()), (200, &b"a/7[blue]:[1]"[..]));
    }

    #[tokio::test]
    async fn other_requests_go_to_hyper_with_the_bytes_read() {
        let server = server().await;
        let (mut stream, mut pending) = connect(server.addr).await;
        // The loop's, then the router's, then one the loop would take,
        // now hyper's (through the same front): all in one write.
        let three = format!(
            "{}GET /health HTTP/1.1\r\nhost: x\r\n\r\n{}",
            infer("a", "1"),
            infer("b", "2")
        );
        stream.write_all(three.as_bytes()).await.unwrap();
        for expected in [&b"a:1"[..], b"router", b"b:2"] {
            let (code, _, body) = answer(&mut stream, &mut pending).await;
            assert_eq!((code, body.as_slice()), (200, expected));
        }
        // Unknown routes keep the JSON error shape.
        let (code, _, body) = ask(
            &mut stream,
            &mut pending,
            b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await;
        assert_eq!(code, 404);
        assert_eq!(body, br#"{"error":"no route for GET /nope"}"#);
    }

    #[tokio::test]
    async fn unusual_requests_are_answered_by_hyper() {
        let server = server().await;
        // A chunked body.
        let (mut stream, mut pending) = connect(server.addr).await;
        let (code, _, body) = ask(&mut stream, &mut pending, b"POST /v2/models/a/infer HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n").await;
        assert_eq!((code, body.as_slice()), (200, &b"a:[1,2]"[..]));
        // A body larger than the loop reads itself.
        let big = "7".repeat(FAST_BODY_MAX + 1);
        stream
            .write_all(infer("big", &big).as_bytes())
            .await
            .unwrap();
        let (code, _, body) = answer(&mut stream, &mut pending).await;
        assert_eq!(code, 200);
        assert_eq!(body.len(), "big:".len() + big.len());
        // Malformed heads get hyper's 400, each on a fresh connection; two
        // lengths are not the loop's to pick one of.
        for malformed in [
            &b"POST /v2/models/a/infer HTTP/1.1\r\ncontent-length: 1x\r\n\r\n"[..],
            b"POST /v2/models/a/infer HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        ] {
            let (mut stream, mut pending) = connect(server.addr).await;
            let (code, _, _) = ask(&mut stream, &mut pending, malformed).await;
            assert_eq!(code, 400, "{}", String::from_utf8_lossy(malformed));
        }
        // HTTP/1.0 is hyper's, and closes after the answer.
        let (mut stream, mut pending) = connect(server.addr).await;
        let (code, _, body) = ask(
            &mut stream,
            &mut pending,
            b"POST /v2/models/a/infer HTTP/1.0\r\ncontent-length: 1\r\n\r\n5",
        )
        .await;
        assert_eq!((code, body.as_slice()), (200, &b"a:5"[..]));
        closed(&mut stream, &pending).await;
    }

    #[tokio::test]
    async fn expect_continue_and_connection_close() {
        let server = server().await;
        let (mut stream, mut pending) = connect(server.addr).await;
        let (code, _, _) = ask(&mut stream, &mut pending, b"POST /v2/models/a/infer HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n").await;
        assert_eq!(code, 100);
        stream.write_all(b"[1]").await.unwrap();
        let (code, _, body) = answer(&mut stream, &mut pending).await;
        assert_eq!((code, body.as_slice()), (200, &b"a:[1]"[..]));
        // The client asks to close: the answer says so, then the server closes.
        let (code, headers, body) = ask(&mut stream, &mut pending, b"POST /v2/models/a/infer HTTP/1.1\r\nconnection: keep-alive, close\r\ncontent-length: 1\r\n\r\n2").await;
        assert_eq!((code, body.as_slice()), (200, &b"a:2"[..]));
        assert_eq!(header(&headers, "connection"), Some("close"));
        closed(&mut stream, &pending).await;
    }

    /// How long `stream` stays open (paused time: the runtime's clock
    /// jumps to the server's next check whenever everything waits).
    async fn open_for(stream: &mut TcpStream, pending: &[u8]) -> Duration {
        let start = tokio::time::Instant::now();
        tokio::time::timeout(IDLE_TIMEOUT * 2, closed(stream, pending))
            .await
            .expect("the server kept a silent connection open");
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_after_the_idle_timeout() {
        let server = server().await;
        let by_loop = infer("a", "1");
        // Kept alive after an answer by the loop; never a request at all;
        // kept alive after an answer by hyper.
        for first in [
            Some(by_loop.as_bytes()),
            None,
            Some(&b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"[..]),
        ] {
            let (mut stream, mut pending) = connect(server.addr).await;
            if let Some(request) = first {
                let (code, _, _) = ask(&mut stream, &mut pending, request).await;
                assert_eq!(code, 200);
            }
            let open = open_for(&mut stream, &pending).await;
            assert!(
                IDLE_TIMEOUT <= open && open <= IDLE_TIMEOUT + CHECK,
                "{open:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_stops_arriving_is_answered_408_and_closed() {
        let server = server().await;
        let whole = infer("a", "[1,2,3]");
        let in_body = whole.len() - 3;
        let in_head = whole.find("content-type").unwrap();
        for cut in [in_head, in_body] {
            let (mut stream, mut pending) = connect(server.addr).await;
            stream.write_all(&whole.as_bytes()[..cut]).await.unwrap();
            let start = tokio::time::Instant::now();
            let (code, headers, body) =
                tokio::time::timeout(READ_TIMEOUT * 2, answer(&mut stream, &mut pending))
                    .await
                    .expect("the server waited for the rest of the request");
            let waited = start.elapsed();
            assert_eq!(code, 408, "{}", String::from_utf8_lossy(&body));
            assert!(
                READ_TIMEOUT <= waited && waited <= READ_TIMEOUT + CHECK,
                "{waited:?}"
            );
            assert_eq!(
                body,
                br#"{"error":"the request stopped arriving: nothing came for 60 s; send each request whole"}"#
            );
            assert_eq!(header(&headers, "connection"), Some("close"));
            closed(&mut stream, &pending).await;
        }
    }

    /// Slow is not silent: a client that keeps sending, and a request the
    /// server takes long to answer, keep their connection.
    #[tokio::test(start_paused = true)]
    async fn slow_clients_and_slow_answers_are_not_silence() {
        let mut server = server().await;
        let (mut stream, mut pending) = connect(server.addr).await;
        // Ten bytes every 20 s: well past every timeout in all.
        let whole = infer("a", "[1,2,3]");
        let start = tokio::time::Instant::now();
        for piece in whole.as_bytes().chunks(10) {
            stream.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        assert!(start.elapsed() > IDLE_TIMEOUT * 2);
        let (code, _, body) = answer(&mut stream, &mut pending).await;
        assert_eq!((code, body.as_slice()), (200, &b"a:[1,2,3]"[..]));
        // An answer that takes 200 s, then the next request just inside
        // the idle timeout: both answered on the same connection.
        stream
            .write_all(infer("held", "2").as_bytes())
            .await
            .unwrap();
        server.started.recv().await.unwrap();
        tokio::time::sleep(Duration::from_secs(200)).await;
        server.gate.add_permits(1);
        let (code, _, body) = answer(&mut stream, &mut pending).await;
        assert_eq!((code, body.as_slice()), (200, &b"held:2"[..]));
        tokio::time::sleep(IDLE_TIMEOUT - Duration::from_secs(5)).await;
        let (code, _, body) = ask(&mut stream, &mut pending, infer("b", "3").as_bytes()).await;
        assert_eq!((code, body.as_slice()), (200, &b"b:3"[..]));
    }

    /// A stop closes an idle connection at once — with no time passing,
    /// not at its idle timeout (in-memory connections on paused time, so
    /// "at once" can be checked) — while a request in flight is answered,
    /// saying the connection closes, and then closed; the server ends.
    #[tokio::test(start_paused = true)]
    async fn a_stop_answers_requests_in_flight_and_closes_idle_connections() {
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let front = echo_front(started_tx, gate.clone());
        let router = crate::with_fallbacks(Router::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let (connect, _, served) = serve_pipes_until(service(Some(front), router), 8, async {
            let _ = stopped.await;
        });
        let (mut idle, mut pending) = (connect(), Vec::new());
        assert_eq!(
            ask(&mut idle, &mut pending, infer("a", "1").as_bytes())
                .await
                .0,
            200
        );
        let mut busy = connect();
        busy.write_all(infer("held", "2").as_bytes()).await.unwrap();
        started.recv().await.unwrap();
        stop.send(()).unwrap();
        let start = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(1), closed(&mut idle, &pending))
            .await
            .expect("a stop left an idle connection open");
        assert_eq!(start.elapsed(), Duration::ZERO);
        gate.add_permits(1);
        let mut pending = Vec::new();
        let (code, headers, body) = answer(&mut busy, &mut pending).await;
        assert_eq!((code, body.as_slice()), (200, &b"held:2"[..]));
        assert_eq!(header(&headers, "connection"), Some("close"));
        closed(&mut busy, &pending).await;
        served.await.unwrap();
    }

    /// Connections in memory, handed to the server as a listener hands
    /// over accepted sockets: every wake-up happens inside the runtime, so
    /// paused time jumps only when nothing can happen.
    struct Pipes(mpsc::UnboundedReceiver<tokio::io::DuplexStream>);

    impl axum::serve::Listener for Pipes {
        type Io = tokio::io::DuplexStream;
        type Addr = SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            match self.0.recv().await {
                Some(pipe) => (pipe, SocketAddr::from(([127, 0, 0, 1], 1))),
                None => std::future::pending().await,
            }
        }

        fn local_addr(&self) -> std::io::Result<SocketAddr> {
            Ok(SocketAddr::from(([127, 0, 0, 1], 1)))
        }
    }

    /// Serves `service` on in-memory connections, at most `cap` at once;
    /// the sender makes a new connection, the cap counts them.
    fn serve_pipes(
        service: Fronted,
        cap: usize,
    ) -> (
        impl Fn() -> tokio::io::DuplexStream,
        crate::limit::Connections,
    ) {
        let (connect, connections, _) = serve_pipes_until(service, cap, std::future::pending());
        (connect, connections)
    }

    /// [`serve_pipes`] until `signal`; the server's task ends once every
    /// connection has closed.
    fn serve_pipes_until(
        service: Fronted,
        cap: usize,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> (
        impl Fn() -> tokio::io::DuplexStream,
        crate::limit::Connections,
        tokio::task::JoinHandle<()>,
    ) {
        let (connect, pipes) = mpsc::unbounded_channel();
        let connections = crate::limit::Connections::new(cap);
        let capped = crate::limit::Capped {
            inner: Pipes(pipes),
            connections: connections.clone(),
        };
        let reclaim = Arc::clone(connections.reclaim());
        let served = tokio::spawn(run(capped, service, signal, reclaim));
        let connect = move || {
            let (ours, theirs) = tokio::io::duplex(64 << 10);
            connect.send(theirs).unwrap();
            ours
        };
        (connect, connections, served)
    }

    /// A router with only `GET /health` (answering "router") and the
    /// JSON fallbacks: what hyper's part serves in these tests.
    fn health_router() -> Router {
        crate::with_fallbacks(Router::new().route("/health", get(|| async { "router" })))
    }

    fn service(front: Option<Front>, router: Router) -> Fronted {
        Fronted {
            front,
            router,
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            peers: false,
        }
    }

    /// At its cap a server accepts no more connections while they are all
    /// busy: the next one waits unanswered (in a real listener, accepted
    /// or in its backlog) until one closes or goes idle, and an idle one —
    /// in the loop or in hyper — closes as soon as a new client waits, and
    /// only then. All on paused time: nothing here waits for a timeout.
    #[tokio::test(start_paused = true)]
    async fn at_the_cap_idle_connections_make_room_and_busy_ones_do_not() {
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let front = echo_front(started_tx, gate.clone());
        let hyper_gate = Arc::new(Semaphore::new(0));
        let held = {
            let gate = hyper_gate.clone();
            get(move || async move {
                gate.acquire().await.unwrap().forget();
                "held"
            })
        };
        let router = crate::with_fallbacks(
            Router::new()
                .route("/health", get(|| async { "router" }))
                .route("/held", held),
        );
        let (connect, connections) = serve_pipes(service(Some(front), router), 2);
        let by_loop = infer("a", "1");
        let by_hyper = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
        let start = tokio::time::Instant::now();

        // Alone at the cap, an idle connection stays.
        let (mut first, mut first_read) = (connect(), Vec::new());
        assert_eq!(
            ask(&mut first, &mut first_read, by_loop.as_bytes()).await.0,
            200
        );
        let (mut second, mut second_read) = (connect(), Vec::new());
        assert_eq!(ask(&mut second, &mut second_read, by_hyper).await.0, 200);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            ask(&mut first, &mut first_read, by_loop.as_bytes()).await.0,
            200
        );
        assert_eq!(ask(&mut second, &mut second_read, by_hyper).await.0, 200);

        // Both busy: the loop's with an inference, hyper's with a route.
        first
            .write_all(infer("held", "2").as_bytes())
            .await
            .unwrap();
        started.recv().await.unwrap();
        second
            .write_all(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (mut third, mut third_read) = (connect(), Vec::new());
        third.write_all(by_loop.as_bytes()).await.unwrap();
        let waited =
            tokio::time::timeout(Duration::from_secs(30), answer(&mut third, &mut third_read))
                .await;
        assert!(waited.is_err(), "answered past the cap: {waited:?}");
        assert_eq!(connections.open(), 2);

        // The loop's inference is answered; idle, its connection makes room
        // once its drain ends with no request.
        let at = tokio::time::Instant::now();
        gate.add_permits(1);
        let (code, _, body) = answer(&mut first, &mut first_read).await;
        assert_eq!((code, body.as_slice()), (200, &b"held:2"[..]));
        closed(&mut first, &first_read).await;
        let (code, _, body) = answer(&mut third, &mut third_read).await;
        assert_eq!((code, body.as_slice()), (200, &b"a:1"[..]));
        assert_eq!(at.elapsed(), RECLAIM_DRAIN);

        // The third, idle in the loop, makes room for a fourth, while
        // hyper's connection stays busy.
        let at = tokio::time::Instant::now();
        let (mut fourth, mut fourth_read) = (connect(), Vec::new());
        assert_eq!(ask(&mut fourth, &mut fourth_read, by_hyper).await.0, 200);
        closed(&mut third, &third_read).await;
        assert_eq!(at.elapsed(), RECLAIM_DRAIN);

        // hyper's exchange ends; idle, it makes room for a fifth (the
        // fourth, idle in hyper too, would do as well: one closes).
        let at = tokio::time::Instant::now();
        hyper_gate.add_permits(1);
        let (code, _, body) = answer(&mut second, &mut second_read).await;
        assert_eq!((code, body.as_slice()), (200, &b"held"[..]));
        let (mut fifth, mut fifth_read) = (connect(), Vec::new());
        assert_eq!(
            ask(&mut fifth, &mut fifth_read, by_loop.as_bytes()).await.0,
            200
        );
        assert_eq!(at.elapsed(), RECLAIM_DRAIN);
        assert_eq!(connections.open(), 2);
        let mut open = 0;
        for stream in [&mut second, &mut fourth] {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await {
                Err(_) => open += 1,
                Ok(read) => assert_eq!(read.unwrap(), 0, "an idle connection was sent something"),
            }
        }
        assert_eq!(
            open, 1,
            "one of two idle connections makes room for one client"
        );
        assert!(start.elapsed() < IDLE_TIMEOUT);
    }

    /// A client waiting at the cap is given an idle connection's room,
    /// not that of one busy with a request in the loop (asks pick among the
    /// connections that wait for their next request, the first one here).
    #[tokio::test(start_paused = true)]
    async fn at_the_cap_an_idle_connection_makes_room_not_the_busy_one_beside_it() {
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let front = echo_front(started_tx, gate.clone());
        let router = health_router();
        let (connect, connections) = serve_pipes(service(Some(front), router), 2);
        let by_loop = infer("a", "1");
        // The first connection (the first the asks look at) is idle a
        // while, then busy; the second idle.
        let (mut first, mut first_read) = (connect(), Vec::new());
        assert_eq!(
            ask(&mut first, &mut first_read, by_loop.as_bytes()).await.0,
            200
        );
        let (mut second, mut second_read) = (connect(), Vec::new());
        assert_eq!(
            ask(&mut second, &mut second_read, by_loop.as_bytes())
                .await
                .0,
            200
        );
        first
            .write_all(infer("held", "2").as_bytes())
            .await
            .unwrap();
        started.recv().await.unwrap();
        let at = tokio::time::Instant::now();
        let (mut third, mut third_read) = (connect(), Vec::new());
        assert_eq!(
            ask(&mut third, &mut third_read, by_loop.as_bytes()).await.0,
            200
        );
        assert_eq!(at.elapsed(), RECLAIM_DRAIN);
        closed(&mut second, &second_read).await;
        assert_eq!(connections.open(), 2);
        gate.add_permits(1);
        let (code, _, body) = answer(&mut first, &mut first_read).await;
        assert_eq!((code, body.as_slice()), (200, &b"held:2"[..]));
    }

    /// At the cap, a connection idle a while (since before its last
    /// silence check) makes room before one whose client is only between
    /// two requests, as nginx closes its least recently used first, and
    /// closes at once (no drain: its client is not about to send).
    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_connection_idle_longest_makes_room() {
        let (started, _) = mpsc::unbounded_channel();
        let front = echo_front(started, Arc::new(Semaphore::new(0)));
        let router = health_router();
        let (connect, connections) = serve_pipes(service(Some(front), router), 2);
        let by_loop = infer("a", "1");
        // The active one first: the first the asks would look at.
        let (mut active, mut active_read) = (connect(), Vec::new());
        assert_eq!(
            ask(&mut active, &mut active_read, by_loop.as_bytes())
                .await
                .0,
            200
        );
        let (mut quiet, mut quiet_read) = (connect(), Vec::new());
        assert_eq!(
            ask(&mut quiet, &mut quiet_read, by_loop.as_bytes()).await.0,
            200
        );
        // Both idle past two checks; then the active one's client asks
        // again, and waits between two requests.
        tokio::time::sleep(CHECK * 2 + Duration::from_secs(1)).await;
        let (_, headers, _) = ask(&mut active, &mut active_read, by_loop.as_bytes()).await;
        assert_eq!(header(&headers, "connection"), None);
        let at = tokio::time::Instant::now();
        let (mut new, mut new_read) = (connect(), Vec::new());
        assert_eq!(
            ask(&mut new, &mut new_read, by_loop.as_bytes()).await.0,
            200
        );
        assert_eq!(at.elapsed(), Duration::ZERO);
        closed(&mut quiet, &quiet_read).await;
        let (code, headers, _) = ask(&mut active, &mut active_read, by_loop.as_bytes()).await;
        assert_eq!((code, header(&headers, "connection")), (200, None));
        assert_eq!(connections.open(), 2);
    }

    /// hyper's connections take part in the order too: one with nothing
    /// read and no exchange since its check before is quiet, makes room
    /// first and closes at once; a request on it makes it busy again (a
    /// later ask drains it).
    #[tokio::test(start_paused = true)]
    async fn at_the_cap_a_quiet_hyper_connection_makes_room_at_once() {
        let (connect, connections) = serve_pipes(service(None, health_router()), 2);
        let health = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
        // The one used again first: the first the asks would look at.
        let (mut used, mut used_read) = (connect(), Vec::new());
        assert_eq!(ask(&mut used, &mut used_read, health).await.0, 200);
        let (mut quiet, mut quiet_read) = (connect(), Vec::new());
        assert_eq!(ask(&mut quiet, &mut quiet_read, health).await.0, 200);
        // Both idle past two checks; then one is used again.
        tokio::time::sleep(CHECK * 2 + Duration::from_secs(1)).await;
        assert_eq!(ask(&mut used, &mut used_read, health).await.0, 200);
        let at = tokio::time::Instant::now();
        let (mut new, mut new_read) = (connect(), Vec::new());
        assert_eq!(ask(&mut new, &mut new_read, health).await.0, 200);
        assert_eq!(at.elapsed(), Duration::ZERO);
        closed(&mut quiet, &quiet_read).await;
        // No connection is quiet now: the next one asked drains.
        let at = tokio::time::Instant::now();
        let (mut newer, mut newer_read) = (connect(), Vec::new());
        assert_eq!(ask(&mut newer, &mut newer_read, health).await.0, 200);
        assert_eq!(at.elapsed(), RECLAIM_DRAIN);
        assert_eq!(connections.open(), 2);
    }

    /// A connection asked to make room while its client is only between
    /// two requests answers the next one, saying it closes, and then
    /// closes: nothing sent on it is lost. In the loop, in hyper, and in
    /// the loop handing a request to hyper during its drain.
    #[tokio::test(start_paused = true)]
    async fn a_request_during_the_drain_is_answered_and_the_connection_closes() {
        let (started, _) = mpsc::unbounded_channel();
        let front = echo_front(started, Arc::new(Semaphore::new(0)));
        let router = health_router();
        let (connect, connections) = serve_pipes(service(Some(front), router), 1);
        let by_loop = infer("a", "1");
        let by_hyper = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
        // What the held connection was asked first (which decides whether
        // the loop or hyper holds it), then within its drain.
        let cases: [(&[u8], &[u8]); 3] = [
            (by_loop.as_bytes(), by_loop.as_bytes()),
            (by_hyper, by_hyper),
            (by_loop.as_bytes(), by_hyper),
        ];
        let (mut held, mut held_read) = (connect(), Vec::new());
        assert_eq!(ask(&mut held, &mut held_read, cases[0].0).await.0, 200);
        for (case, (_, next)) in cases.iter().enumerate() {
            // A new client, asking what the next case asks first: the held
            // connection, idle, is asked to close.
            let (mut new, mut new_read) = (connect(), Vec::new());
            let first = cases
                .get(case + 1)
                .map_or(&by_hyper[..], |(first, _)| first);
            new.write_all(first).await.unwrap();
            // Paused time: everything that can run does before the clock
            // moves, the ask included; half the drain passes.
            tokio::time::sleep(RECLAIM_DRAIN / 2).await;
            assert_eq!(connections.open(), 1);
            // Its client sends its next request within the drain.
            let (code, headers, _) = ask(&mut held, &mut held_read, next).await;
            assert_eq!(code, 200);
            assert_eq!(header(&headers, "connection"), Some("close"), "case {case}");
            closed(&mut held, &held_read).await;
            assert_eq!(answer(&mut new, &mut new_read).await.0, 200);
            (held, held_read) = (new, new_read);
        }
    }

    /// A connection asked to make room whose client is sending a request
    /// head when its drain ends (hyper counts it idle until the head is
    /// whole) answers that request, saying it closes, instead of being cut.
    #[tokio::test(start_paused = true)]
    async fn a_head_arriving_when_the_drain_ends_is_answered() {
        let router = health_router();
        let (connect, connections) = serve_pipes(service(None, router), 1);
        let by_hyper = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
        let (mut held, mut held_read) = (connect(), Vec::new());
        assert_eq!(ask(&mut held, &mut held_read, by_hyper).await.0, 200);
        // A new client: the held connection, idle, is asked to close.
        let (mut new, mut new_read) = (connect(), Vec::new());
        new.write_all(by_hyper).await.unwrap();
        tokio::time::sleep(RECLAIM_DRAIN / 2).await;
        // Half a head within the drain, the rest after it.
        held.write_all(&by_hyper[..10]).await.unwrap();
        tokio::time::sleep(RECLAIM_DRAIN).await;
        assert_eq!(connections.open(), 1);
        held.write_all(&by_hyper[10..]).await.unwrap();
        let (code, headers, _) = answer(&mut held, &mut held_read).await;
        assert_eq!(code, 200);
        assert_eq!(header(&headers, "connection"), Some("close"));
        closed(&mut held, &held_read).await;
        assert_eq!(answer(&mut new, &mut new_read).await.0, 200);
    }

    /// An exchange ends with its answer when the body is short and whole,
    /// and only once its body is dropped when it is streamed or long.
    #[test]
    fn an_exchange_lasts_until_its_answer_is_written() {
        let exchanges = Arc::new(Exchanges::default());
        let busy = &exchanges.busy;
        let short = held(
            Response::new(Body::from("ok")),
            Some(Exchange::new(&exchanges)),
        );
        assert_eq!(busy.load(Ordering::Relaxed), 0);
        drop(short);
        let long = vec![b'x'; WRITTEN_WHOLE as usize + 1];
        let long = held(
            Response::new(Body::from(long)),
            Some(Exchange::new(&exchanges)),
        );
        assert_eq!(busy.load(Ordering::Relaxed), 1);
        drop(long);
        assert_eq!(busy.load(Ordering::Relaxed), 0);
        let chunks = futures::stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"x"))]);
        let streamed = held(
            Response::new(Body::from_stream(chunks)),
            Some(Exchange::new(&exchanges)),
        );
        assert_eq!(busy.load(Ordering::Relaxed), 1);
        drop(streamed);
        assert_eq!(busy.load(Ordering::Relaxed), 0);
    }

    /// A streamed answer is not cut for a new client at the cap: the client
    /// waits for its end.
    #[tokio::test(start_paused = true)]
    async fn a_streamed_answer_keeps_its_connection_until_its_end() {
        let gate = Arc::new(Semaphore::new(0));
        let stream = {
            let gate = gate.clone();
            get(move || async move {
                let rest = async move {
                    gate.acquire().await.unwrap().forget();
                    Ok::<_, Infallible>(Bytes::from_static(b"end"))
                };
                let chunks = futures::StreamExt::chain(
                    futures::stream::once(async { Ok(Bytes::from_static(b"start")) }),
                    futures::stream::once(rest),
                );
                Body::from_stream(chunks)
            })
        };
        let router = crate::with_fallbacks(
            Router::new()
                .route("/health", get(|| async { "router" }))
                .route("/stream", stream),
        );
        let (connect, _) = serve_pipes(service(None, router), 1);
        let mut streaming = connect();
        streaming
            .write_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut read = Vec::new();
        while !String::from_utf8_lossy(&read).contains("start") {
            let mut chunk = [0u8; 1024];
            let n = streaming.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            read.extend_from_slice(&chunk[..n]);
        }
        let (mut waiting, mut waiting_read) = (connect(), Vec::new());
        waiting
            .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let early = tokio::time::timeout(
            Duration::from_secs(30),
            answer(&mut waiting, &mut waiting_read),
        )
        .await;
        assert!(
            early.is_err(),
            "a streaming connection closed for a new one: {early:?}"
        );
        let at = tokio::time::Instant::now();
        gate.add_permits(1);
        let rest = tokio::time::timeout(Duration::from_secs(1), async {
            streaming.read_to_end(&mut read).await.unwrap();
        })
        .await;
        assert!(rest.is_ok(), "the streamed connection was kept once idle");
        assert!(
            String::from_utf8_lossy(&read).contains("end"),
            "the answer was cut"
        );
        let (code, _, _) = answer(&mut waiting, &mut waiting_read).await;
        assert_eq!(code, 200);
        assert_eq!(at.elapsed(), RECLAIM_DRAIN);
    }

    /// hyper's part of a connection drops a client that stopped reading a
    /// streamed answer once nothing could be written for the read timeout;
    /// a client that reads slowly keeps it.
    #[tokio::test(start_paused = true)]
    async fn an_answer_its_client_stops_reading_is_dropped() {
        const BIG: usize = 64 << 20;
        const CHUNK: usize = 1 << 16;
        let router = Router::new().route(
            "/big",
            get(|| async {
                let chunk = Bytes::from(vec![b'x'; CHUNK]);
                let chunks = std::iter::repeat_n(chunk, BIG / CHUNK).map(Ok::<_, Infallible>);
                Body::from_stream(futures::stream::iter(chunks))
            }),
        );
        let (connect, _) = serve_pipes(service(None, router), 16);
        let request = b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n";
        let mut buf = vec![0u8; 1 << 20];

        // 1 MiB every 50 s for 400 s: slow, never silent.
        let mut slow = connect();
        slow.write_all(request).await.unwrap();
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            let mut got = 0;
            while got < buf.len() {
                let n = slow.read(&mut buf[got..]).await.unwrap();
                assert!(n > 0, "a slow reader's answer was cut");
                got += n;
            }
        }

        // Reads nothing: dropped after the read timeout and one check.
        let mut stopped = connect();
        stopped.write_all(request).await.unwrap();
        tokio::time::sleep(READ_TIMEOUT + CHECK * 2).await;
        let mut total = 0;
        loop {
            match stopped.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            total < BIG,
            "the whole answer was kept for a client reading nothing"
        );
    }
}
