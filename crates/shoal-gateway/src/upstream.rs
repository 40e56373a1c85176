//! The HTTP/1.1 client of the data path: what the gateway sends to a
//! replica for each request it forwards.
//!
//! hyper's pooled client cost about 33k of the 80k instructions a proxied
//! request took (a task per connection and channels between it and the
//! caller, a pool keyed by URI, a header map built for each request and
//! parsed for each answer). This client does only what forwarding needs:
//! each [`Upstream`] (one per replica, on its `Endpoint`) keeps its idle
//! keep-alive connections; a request's head is written with its body in
//! one write; the answer's head is parsed by `httparse` in place, the
//! header lines the client will see copied as they came into a
//! [`shoal_http::Answer`], and its body read by `Content-Length` (or
//! chunks, or to the end), all in the caller's task. Health checks and the
//! rest still go through hyper.
//!
//! A connection is pooled again only after a whole answer was read from
//! it, so a request cancelled halfway (a hedge that lost, a timeout, a
//! client that went away) closes its connection. A pooled connection is
//! checked before use (a replica that closed it while idle has said so);
//! one that still fails before the request is written is replaced, but a
//! request once written is never sent again here: the replica may have
//! run it, and the gateway's budgeted retries decide. A write that fails
//! because the replica answered early (a 503 at admission) and closed
//! still yields that answer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Method, StatusCode};
use rustls_pki_types::ServerName;
use shoal_http::{Answer, header_str};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle connections kept per replica.
const MAX_IDLE: usize = 256;
/// How long an idle connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest answer head read.
const MAX_HEAD: usize = 64 << 10;
/// The most headers an answer may have (replicas send five).
const MAX_HEADERS: usize = 64;
/// The largest answer body read (an answer is a model's outputs).
const MAX_BODY: usize = 1 << 30;
/// Bodies up to this size are copied behind the head and sent in one
/// write; larger ones are written after it.
const COALESCE: usize = 64 << 10;

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum Error {
    /// No connection could be made: nothing was sent.
    Connect(String),
    /// The connection broke, or the answer was not HTTP.
    Exchange(String),
}

/// A replica's answer.
#[derive(Debug)]
pub(crate) struct Reply {
    /// Its status, the headers passed on, and its body.
    pub answer: Answer,
    /// Its `x-shoal-model-version` (in `answer` too), found while its
    /// head was parsed.
    pub version: Option<String>,
}

/// A request to forward.
pub(crate) struct Request<'a> {
    pub method: &'a Method,
    /// Path and query.
    pub path: &'a str,
    pub content_type: &'a str,
    /// More headers, names lowercase.
    pub headers: &'a [(&'a str, &'a HeaderValue)],
    pub body: &'a Bytes,
    /// When the caller started it: the clock reading the pool's idle
    /// bookkeeping uses (a connection counts as idle from the start of
    /// its last exchange, never longer than it really was), so that a
    /// forwarded request reads the clock once, not four times.
    pub started: Instant,
}

/// One replica's address and its idle connections.
pub(crate) struct Upstream {
    /// The address's authority as given, for the `Host` header.
    authority: String,
    /// `host:port` to connect to (the scheme's port when none is given).
    target: String,
    /// A path the address carries (`http://lb/replica-3`), put before
    /// every request's path; empty for most.
    prefix: String,
    /// For https, the name to verify the certificate against (or why the
    /// address has none).
    tls: Option<Result<ServerName<'static>, String>>,
    idle: Mutex<VecDeque<Idle>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("target", &self.target)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A connection and its read buffer.
struct Conn {
    stream: Stream,
    buf: BytesMut,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Upstream {
    /// The upstream at `address`: `host:port`, or a URL as
    /// [`shoal_api::member_url`] reads it (`http://host:port`,
    /// `https://host`, `http://host:port/prefix`).
    pub(crate) fn new(address: &str) -> Upstream {
        let (tls, rest) = match address.split_once("://") {
            Some((scheme, rest)) => (scheme.eq_ignore_ascii_case("https"), rest),
            None => (false, address),
        };
        let (authority, prefix) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let has_port = match authority.rfind(']') {
            // [v6] or [v6]:port
            Some(end) => authority[end..].contains(':'),
            None => authority.contains(':'),
        };
        let target = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:{}", if tls { 443 } else { 80 })
        };
        Upstream {
            tls: tls.then(|| server_name(authority)),
            authority: authority.to_owned(),
            target,
            prefix: prefix.to_owned(),
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// Sends `request` and reads the whole answer.
    pub(crate) async fn send(
        &self,
        request: &Request<'_>,
        connect_timeout: Duration,
    ) -> Result<Reply, Error> {
        let head = self.head(request);
        let body = (request.body.len() > COALESCE).then_some(request.body);
        let head_request = request.method == Method::HEAD;
        if let Some(mut conn) = self.checkout(request.started) {
            match conn.exchange(&head, body, head_request).await {
                Ok((response, reusable)) => {
                    if reusable {
                        self.checkin(conn, request.started);
                    }
                    return Ok(response);
                }
                // Closed by the replica while idle, just as it was taken:
                // the request could not even be written, so the replica
                // cannot have acted on it; a new connection. A request
                // that was written and then met a closed connection is
                // not sent again here (the replica may have run it): the
                // caller's budgeted retries decide.
                Err(Broken { sent: false, .. }) => {}
                Err(Broken { reason, .. }) => return Err(Error::Exchange(reason)),
            }
        }
        // Boxed: a TLS handshake's state is a kilobyte and more, and would
        // otherwise be part of every forwarded request's future, copied
        // each time that future moves.
        let mut conn = Box::pin(self.connect(connect_timeout)).await?;
        match conn.exchange(&head, body, head_request).await {
            Ok((response, reusable)) => {
                if reusable {
                    self.checkin(conn, request.started);
                }
                Ok(response)
            }
            Err(Broken { reason, .. }) => Err(Error::Exchange(reason)),
        }
    }

    /// The request's head, with its body behind it when that is small.
    fn head(&self, request: &Request<'_>) -> Vec<u8> {
        let body = request.body;
        let extra: usize = request
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum();
        let inline = if body.len() <= COALESCE {
            body.len()
        } else {
            0
        };
        let mut head = Vec::with_capacity(
            self.prefix.len()
                + request.path.len()
                + self.authority.len()
                + request.content_type.len()
                + extra
                + 96
                + inline,
        );
        head.extend_from_slice(request.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(self.prefix.as_bytes());
        head.extend_from_slice(request.path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(self.authority.as_bytes());
        if !body.is_empty() || request.method == Method::POST || request.method == Method::PUT {
            head.extend_from_slice(b"\r\ncontent-type: ");
            head.extend_from_slice(request.content_type.as_bytes());
            head.extend_from_slice(b"\r\ncontent-length: ");
            push_decimal(&mut head, body.len());
        }
        for (name, value) in request.headers {
            head.extend_from_slice(b"\r\n");
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
        }
        head.extend_from_slice(b"\r\n\r\n");
        if inline > 0 {
            head.extend_from_slice(body);
        }
        head
    }

    /// The most recently used idle connection still open at `now`, if any.
    fn checkout(&self, now: Instant) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(Idle { mut conn, since }) = idle.pop_back() {
            if now.saturating_duration_since(since) < IDLE_TIMEOUT && conn.still_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn`, idle since `since`, for the next request; drops
    /// connections idle too long.
    fn checkin(&self, conn: Conn, since: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while idle
            .front()
            .is_some_and(|i| since.saturating_duration_since(i.since) >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { conn, since });
        }
    }

    /// Idle connections now (tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    async fn connect(&self, timeout: Duration) -> Result<Conn, Error> {
        let connect = async {
            let tcp = TcpStream::connect(&self.target)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", self.target))?;
            tcp.set_nodelay(true)
                .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
            let stream = match &self.tls {
                None => Stream::Plain(tcp),
                Some(name) => {
                    let name = name.clone()?;
                    let tls = tokio_rustls::TlsConnector::from(tls_config())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS handshake with {} failed: {e}", self.target))?;
                    Stream::Tls(Box::new(tls))
                }
            };
            Ok::<_, String>(Conn {
                stream,
                buf: BytesMut::new(),
            })
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(Error::Connect(e)),
            Err(_) => Err(Error::Connect(format!(
                "cannot connect to {} within {timeout:?}",
                self.target
            ))),
        }
    }
}

/// The name a certificate is checked against: the host of `authority`.
fn server_name(authority: &str) -> Result<ServerName<'static>, String> {
    let host = match authority.strip_prefix('[') {
        // [v6]:port
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    ServerName::try_from(host.to_owned()).map_err(|_| {
        format!("{host:?} is not a host name or address to check a certificate against")
    })
}

/// The client TLS configuration (the fleet's, see `shoal_client::tls`),
/// offering HTTP/1.1 only.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut config = (*shoal_client::tls::client_config()).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        })
        .clone()
}

/// Appends `n` in decimal, without the formatting machinery.
fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// What [`Conn::parse_head`] does with an answer's header.
enum Role {
    /// Passed on to the client.
    Kept,
    /// `x-shoal-model-version`: read, and passed on.
    Version,
    /// `content-length`: read, and said again by the gateway's server.
    Length,
    /// `transfer-encoding`: read.
    Coding,
    /// `connection`: read.
    Connection,
    /// Hop-by-hop headers, the replica's name (the gateway names the replica
    /// that answered by its own id for it, `proxy::send`) and its `date`
    /// (the gateway's server dates its own answer, as nginx does a proxied
    /// one): not passed on.
    Dropped,
}

/// The role of header `name`, told by its length first: most names are
/// then compared with one other, or none.
fn role(name: &str) -> Role {
    // Replicas write names in lowercase: compared as they are first.
    let is = |known: &str| name == known || name.eq_ignore_ascii_case(known);
    match name.len() {
        4 if is("date") => Role::Dropped,
        7 if is("upgrade") || is("trailer") => Role::Dropped,
        10 if is("connection") => Role::Connection,
        10 if is("keep-alive") => Role::Dropped,
        14 if is("content-length") => Role::Length,
        15 if is(shoal_api::replica::REPLICA_HEADER) => Role::Dropped,
        16 if is("proxy-connection") => Role::Dropped,
        17 if is("transfer-encoding") => Role::Coding,
        21 if is(shoal_api::replica::VERSION_HEADER) => Role::Version,
        _ => Role::Kept,
    }
}

/// An exchange that broke off; `sent` once the whole request was written.
struct Broken {
    sent: bool,
    reason: String,
}

fn broken(reason: impl Into<String>) -> Broken {
    Broken {
        sent: true,
        reason: reason.into(),
    }
}

/// How an answer's body is delimited.
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

impl Conn {
    /// True unless the replica closed the connection (or sent something
    /// unasked) while it was idle. Polls once without waiting.
    fn still_open(&mut self) -> bool {
        let waker = futures::task::noop_waker_ref();
        let mut cx = Context::from_waker(waker);
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        matches!(
            Pin::new(&mut self.stream).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// Writes the request and reads its answer; the flag says whether the
    /// connection may carry another request.
    async fn exchange(
        &mut self,
        head: &[u8],
        body: Option<&Bytes>,
        head_request: bool,
    ) -> Result<(Reply, bool), Broken> {
        let written = async {
            self.stream.write_all(head).await?;
            if let Some(body) = body {
                self.stream.write_all(body).await?;
            }
            self.stream.flush().await
        };
        self.buf.clear();
        if let Err(e) = written.await {
            // A replica may answer before it has read the whole body (a
            // 503 from admission, a 413) and close: a large body's write
            // then fails, and the answer is waiting to be read.
            return match self.read_answer(head_request).await {
                Ok((response, _)) => Ok((response, false)),
                Err(_) => Err(Broken {
                    sent: false,
                    reason: format!("sending the request: {e}"),
                }),
            };
        }
        self.read_answer(head_request).await
    }

    /// Reads an answer; the flag says whether the connection may carry
    /// another request.
    async fn read_answer(&mut self, head_request: bool) -> Result<(Reply, bool), Broken> {
        let (mut answer, version, framing, mut reusable) = loop {
            if let Some(parsed) = self.parse_head(head_request)? {
                break parsed;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(broken("the answer's head is larger than 64 KiB"));
            }
            self.read_more().await?;
        };
        let body = match framing {
            Framing::None => Bytes::new(),
            Framing::Length(len) => {
                if len > MAX_BODY {
                    return Err(broken("the answer is larger than 1 GiB"));
                }
                if self.buf.len() >= len {
                    self.buf.split_to(len).freeze()
                } else {
                    // Read straight into a buffer of the body's size: growing
                    // the connection's buffer as the body comes would copy
                    // it each time it doubled.
                    let mut body = BytesMut::with_capacity(len);
                    body.extend_from_slice(&self.buf);
                    self.buf.clear();
                    while body.len() < len {
                        match self.stream.read_buf(&mut body).await {
                            Ok(0) => {
                                return Err(broken(
                                    "the replica closed the connection before its answer ended",
                                ));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                return Err(broken(format!("reading the answer: {e}")));
                            }
                        }
                    }
                    body.freeze()
                }
            }
            Framing::Chunked => self.read_chunked().await?,
            Framing::UntilClose => {
                reusable = false;
                loop {
                    if self.buf.len() > MAX_BODY {
                        return Err(broken("the answer is larger than 1 GiB"));
                    }
                    self.buf.reserve(8 << 10);
                    match self.stream.read_buf(&mut self.buf).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => return Err(broken(format!("reading the answer: {e}"))),
                    }
                }
                self.buf.split().freeze()
            }
        };
        // Bytes past the answer were never asked for.
        reusable &= self.buf.is_empty();
        answer.set_body(body);
        Ok((Reply { answer, version }, reusable))
    }

    /// Reads at least one more byte into the buffer.
    async fn read_more(&mut self) -> Result<(), Broken> {
        self.buf.reserve(8 << 10);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(broken(
                "the replica closed the connection before its answer ended",
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(broken(format!("reading the answer: {e}"))),
        }
    }

    /// Parses the answer's head from the buffer and removes it; `None` when
    /// it has not all come yet. Informational (1xx) heads are skipped.
    #[allow(clippy::type_complexity)]
    fn parse_head(
        &mut self,
        head_request: bool,
    ) -> Result<Option<(Answer, Option<String>, Framing, bool)>, Broken> {
        let mut skipped = 0;
        loop {
            if self.buf.is_empty() {
                return Ok(None);
            }
            // Not initialised first: httparse writes the slots it uses.
            let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let config = httparse::ParserConfig::default();
            let len =
                match config.parse_response_with_uninit_headers(&mut parsed, &self.buf, &mut slots)
                {
                    Ok(httparse::Status::Complete(len)) => len,
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(e) => return Err(broken(format!("the answer is not HTTP: {e}"))),
                };
            let code = parsed.code.unwrap_or(0);
            let status = StatusCode::from_u16(code)
                .map_err(|_| broken(format!("the answer's status {code} is not valid")))?;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(broken("the replica switched protocols (101)"));
            }
            if status.is_informational() {
                skipped += len;
                if skipped > MAX_HEAD {
                    return Err(broken("the answer's 1xx heads are larger than 64 KiB"));
                }
                self.buf.advance(len);
                continue;
            }
            let mut keep_alive = parsed.version == Some(1);
            let mut length: Option<usize> = None;
            let mut chunked = false;
            let mut other_coding = false;
            // The kept lines copied as they came (httparse checked them),
            // with room for the replica's name, which the gateway adds.
            let mut answer = Answer::with_capacity(status, Bytes::new(), len + 32);
            let mut version = None;
            for h in parsed.headers.iter() {
                let name = h.name;
                match role(name) {
                    Role::Kept => {}
                    Role::Version => {
                        version = version.or_else(|| header_str(h.value).map(str::to_owned));
                    }
                    Role::Length => {
                        let digits = h.value.trim_ascii();
                        let n = (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
                            .then(|| std::str::from_utf8(digits).ok()?.parse::<usize>().ok())
                            .flatten()
                            .ok_or_else(|| broken("the answer's content-length is not a number"))?;
                        if length.is_some_and(|l| l != n) {
                            return Err(broken("the answer has two content-lengths"));
                        }
                        length = Some(n);
                        // Not passed on: the body read is the length, and the
                        // server writing the answer says it from the body.
                        continue;
                    }
                    Role::Coding => {
                        // The last coding decides; only chunked is read here.
                        let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(h.value);
                        chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
                        other_coding = !chunked;
                        continue;
                    }
                    Role::Connection => {
                        if h.value
                            .split(|&b| b == b',')
                            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
                        {
                            keep_alive = false;
                        }
                        continue;
                    }
                    Role::Dropped => continue,
                }
                answer.push_parsed(h);
            }
            self.buf.advance(len);
            let framing = if head_request
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED
            {
                Framing::None
            } else if chunked {
                // A length beside chunked is ignored (RFC 9112 §6.3).
                Framing::Chunked
            } else if other_coding {
                Framing::UntilClose
            } else {
                match length {
                    Some(0) => Framing::None,
                    Some(n) => Framing::Length(n),
                    None => Framing::UntilClose,
                }
            };
            return Ok(Some((answer, version, framing, keep_alive)));
        }
    }

    /// Reads a chunked body (trailers are read and dropped).
    async fn read_chunked(&mut self) -> Result<Bytes, Broken> {
        let mut body = BytesMut::new();
        loop {
            let (skip, size) = loop {
                match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete(found)) => break found,
                    Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                        return Err(broken("the answer's chunk size line is too long"));
                    }
                    Ok(httparse::Status::Partial) => self.read_more().await?,
                    Err(_) => return Err(broken("the answer's chunk size is not valid")),
                }
            };
            self.buf.advance(skip);
            let Ok(size) = usize::try_from(size) else {
                return Err(broken("the answer's chunk is too large"));
            };
            if size == 0 {
                // Trailers, if any, then the blank line.
                loop {
                    if self.buf.starts_with(b"\r\n") {
                        self.buf.advance(2);
                        return Ok(body.freeze());
                    }
                    if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        self.buf.advance(end + 4);
                        return Ok(body.freeze());
                    }
                    if self.buf.len() > MAX_HEAD {
                        return Err(broken("the answer's trailers are larger than 64 KiB"));
                    }
                    self.read_more().await?;
                }
            }
            if body.len().saturating_add(size) > MAX_BODY {
                return Err(broken("the answer is larger than 1 GiB"));
            }
            while self.buf.len() < size + 2 {
                self.read_more().await?;
            }
            body.extend_from_slice(&self.buf[..size]);
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(broken("the answer's chunk does not end with CRLF"));
            }
            self.buf.advance(size + 2);
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A replica stand-in on a real socket that answers each request with
    /// the next of `answers` (the last one repeats; an empty one closes
    /// the connection without answering) and closes the connection after
    /// each answer when `close` says so. Counts the connections it
    /// accepted.
    pub(crate) async fn scripted(
        answers: Vec<&'static [u8]>,
        close: bool,
    ) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let answers = answers.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: its head, then content-length bytes.
                        let head_end = loop {
                            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < head_end + length {
                            let mut chunk = [0u8; 4096];
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..head_end + length);
                        let i = next.fetch_add(1, Ordering::SeqCst).min(answers.len() - 1);
                        if answers[i].is_empty() {
                            return;
                        }
                        if socket.write_all(answers[i]).await.is_err() {
                            return;
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (address, accepted)
    }

    fn post<'a>(body: &'a Bytes) -> Request<'a> {
        Request {
            method: &Method::POST,
            path: "/v2/models/m/infer",
            content_type: "application/json",
            headers: &[],
            body,
            started: Instant::now(),
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn keeps_one_connection_for_requests_in_turn() {
        let (address, accepted) = scripted(
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-shoal-model-version: 3\r\nContent-Type: text/plain\r\nX-Other: a\r\n\r\nok"],
            false,
        )
        .await;
        let upstream = Upstream::new(&format!("http://{address}"));
        let body = Bytes::from_static(b"{\"inputs\": []}");
        for _ in 0..5 {
            let answer = upstream.send(&post(&body), TIMEOUT).await.unwrap();
            // The version found as the head was read, and kept in it.
            assert_eq!(answer.version.unwrap(), "3");
            let answer = answer.answer;
            assert_eq!(answer.status(), StatusCode::OK);
            assert_eq!(answer.body().as_ref(), b"ok");
            assert_eq!(answer.header("x-shoal-model-version").unwrap(), b"3");
            assert_eq!(answer.header("content-type").unwrap(), b"text/plain");
            assert_eq!(answer.header("x-other").unwrap(), b"a");
            // Said again by whoever writes the answer on, from the body.
            assert!(answer.header("content-length").is_none());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(upstream.idle_count(), 1);
    }

    #[tokio::test]
    async fn sends_large_bodies_after_the_head() {
        // An echo through hyper: a real HTTP/1.1 server reads what was sent.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(
                |request: http::Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt;
                    let seen = format!(
                        "{} {} {}",
                        request.method(),
                        request.uri(),
                        request.headers()["x-extra"].to_str().unwrap()
                    );
                    let body = request.into_body().collect().await?.to_bytes();
                    let mut answer = http::Response::new(http_body_util::Full::new(body));
                    answer
                        .headers_mut()
                        .insert("x-seen", HeaderValue::from_str(&seen).unwrap());
                    Ok::<_, hyper::Error>(answer)
                },
            );
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                .await
                .unwrap();
        });
        let upstream = Upstream::new(&address);
        for size in [0, 10, COALESCE, COALESCE + 1, 3 << 20] {
            let body = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<_>>());
            let extra = HeaderValue::from_static("yes");
            let request = Request {
                headers: &[("x-extra", &extra)],
                ..post(&body)
            };
            let answer = upstream.send(&request, TIMEOUT).await.unwrap().answer;
            assert_eq!(
                answer.header("x-seen").unwrap(),
                b"POST /v2/models/m/infer yes"
            );
            assert_eq!(answer.body(), &body, "a body of {size} bytes");
        }
        assert_eq!(upstream.idle_count(), 1);
    }

    #[tokio::test]
    async fn reads_chunked_answers_with_trailers() {
        let (address, accepted) = scripted(
            vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nf\r\n0\r\nx-trailer: t\r\n\r\n",
            ],
            false,
        )
        .await;
        let upstream = Upstream::new(&address);
        let body = Bytes::new();
        let first = upstream.send(&post(&body), TIMEOUT).await.unwrap().answer;
        assert_eq!(first.body().as_ref(), b"abcde");
        assert!(first.header("transfer-encoding").is_none());
        let second = upstream.send(&post(&body), TIMEOUT).await.unwrap().answer;
        assert_eq!(second.body().as_ref(), b"f");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn skips_informational_answers() {
        let (address, _) = scripted(
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\nx",
            ],
            false,
        )
        .await;
        let answer = Upstream::new(&address)
            .send(&post(&Bytes::new()), TIMEOUT)
            .await
            .unwrap()
            .answer;
        assert_eq!(answer.status(), StatusCode::CREATED);
        assert_eq!(answer.body().as_ref(), b"x");
    }

    #[tokio::test]
    async fn a_connection_the_replica_closed_while_idle_is_replaced() {
        // `connection: close` is not said: the replica just closes.
        let (address, accepted) = scripted(
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
            true,
        )
        .await;
        let upstream = Upstream::new(&address);
        let body = Bytes::from_static(b"{}");
        for _ in 0..3 {
            let answer = upstream.send(&post(&body), TIMEOUT).await.unwrap().answer;
            assert_eq!(answer.body().as_ref(), b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_written_request_is_never_sent_twice() {
        // The pooled connection looks open when taken, and the replica
        // closes it on reading the request: it may have run it, so the
        // request is not sent again on a new connection (the gateway's
        // budgeted retries decide what happens next).
        let (address, accepted) = scripted(
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst",
                b"",
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nthird",
            ],
            false,
        )
        .await;
        let upstream = Upstream::new(&address);
        let body = Bytes::from_static(b"{}");
        let first = upstream.send(&post(&body), TIMEOUT).await.unwrap().answer;
        assert_eq!(first.body().as_ref(), b"first");
        match upstream.send(&post(&body), TIMEOUT).await {
            Err(Error::Exchange(reason)) => assert!(reason.contains("closed"), "{reason}"),
            other => panic!("expected an exchange error, got {other:?}"),
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let third = upstream.send(&post(&body), TIMEOUT).await.unwrap().answer;
        assert_eq!(third.body().as_ref(), b"third");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_body_was_read_is_kept() {
        // A replica refusing at admission answers 503 after the head and
        // closes without reading a body far larger than the socket
        // buffers: the write fails, and the answer is what counts.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
            }
            socket
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 4\r\n\r\nbusy")
                .await
                .unwrap();
            // Closed with the body unread: a reset.
        });
        let body = Bytes::from(vec![b' '; 64 << 20]);
        let answer = Upstream::new(&address)
            .send(&post(&body), TIMEOUT)
            .await
            .unwrap()
            .answer;
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.header("retry-after").unwrap(), b"1");
        assert_eq!(answer.body().as_ref(), b"busy");
    }

    #[tokio::test(start_paused = true)]
    async fn connections_idle_too_long_are_not_used() {
        let (address, accepted) = scripted(
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
            false,
        )
        .await;
        let upstream = Upstream::new(&address);
        let body = Bytes::from_static(b"{}");
        upstream.send(&post(&body), TIMEOUT).await.unwrap();
        tokio::time::advance(IDLE_TIMEOUT - Duration::from_secs(1)).await;
        upstream.send(&post(&body), TIMEOUT).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        tokio::time::advance(IDLE_TIMEOUT).await;
        upstream.send(&post(&body), TIMEOUT).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(upstream.idle_count(), 1);
    }

    #[tokio::test]
    async fn answers_read_to_the_end_or_saying_close_are_not_pooled() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\n\r\nuntil the end"[..],
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 13\r\n\r\nuntil the end",
            b"HTTP/1.1 200 OK\r\nConnection: foo, Close\r\ncontent-length: 13\r\n\r\nuntil the end",
            b"HTTP/1.0 200 OK\r\ncontent-length: 13\r\n\r\nuntil the end",
        ] {
            let (address, _) = scripted(vec![answer], true).await;
            let upstream = Upstream::new(&address);
            let got = upstream
                .send(&post(&Bytes::new()), TIMEOUT)
                .await
                .unwrap()
                .answer;
            assert_eq!(got.body().as_ref(), b"until the end");
            assert!(got.header("connection").is_none());
            assert_eq!(upstream.idle_count(), 0);
        }
    }

    #[tokio::test]
    async fn broken_answers_are_exchange_errors() {
        for (answer, says) in [
            (&b"SMTP ready\r\n\r\n"[..], "not HTTP"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n",
                "content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                "closed the connection",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
        ] {
            let (address, _) = scripted(vec![answer], true).await;
            let upstream = Upstream::new(&address);
            match upstream.send(&post(&Bytes::new()), TIMEOUT).await {
                Err(Error::Exchange(reason)) => assert!(reason.contains(says), "{reason}"),
                other => panic!("expected an exchange error saying {says}, got {other:?}"),
            }
            assert_eq!(upstream.idle_count(), 0);
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        match Upstream::new(&address)
            .send(&post(&Bytes::new()), TIMEOUT)
            .await
        {
            Err(Error::Connect(reason)) => assert!(reason.contains(&address), "{reason}"),
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_given_up_on_closes_its_connection() {
        // A replica that reads and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let _ = held_tx.send(socket);
        });
        let upstream = Upstream::new(&address);
        let body = Bytes::from_static(b"{}");
        let gave_up =
            tokio::time::timeout(Duration::from_secs(1), upstream.send(&post(&body), TIMEOUT))
                .await;
        assert!(gave_up.is_err());
        assert_eq!(upstream.idle_count(), 0);
        // The replica sees the connection closed.
        let mut socket = held_rx.await.unwrap();
        let mut rest = Vec::new();
        socket.read_to_end(&mut rest).await.unwrap();
        assert!(rest.starts_with(b"POST /v2/models/m/infer HTTP/1.1\r\n"));
    }

    #[test]
    fn addresses_and_names() {
        let plain = Upstream::new("http://10.0.0.1:8080");
        assert_eq!(
            (plain.target.as_str(), plain.prefix.as_str()),
            ("10.0.0.1:8080", "")
        );
        assert!(plain.tls.is_none());
        let bare = Upstream::new("10.0.0.1:8080");
        assert_eq!(bare.target, "10.0.0.1:8080");
        let prefixed = Upstream::new("http://lb.example/replica-3/");
        assert_eq!(
            (
                prefixed.target.as_str(),
                prefixed.authority.as_str(),
                prefixed.prefix.as_str()
            ),
            ("lb.example:80", "lb.example", "/replica-3")
        );
        let tls = Upstream::new("https://replica.example");
        assert_eq!(tls.target, "replica.example:443");
        assert_eq!(
            tls.tls,
            Some(Ok(ServerName::try_from("replica.example").unwrap()))
        );
        let v6 = Upstream::new("https://[::1]:8443");
        assert_eq!(v6.target, "[::1]:8443");
        assert_eq!(v6.tls, Some(Ok(ServerName::try_from("::1").unwrap())));
        assert_eq!(Upstream::new("https://[::1]").target, "[::1]:443");
        let bad = Upstream::new("https://bad_name!:1");
        assert!(matches!(bad.tls, Some(Err(ref e)) if e.contains("bad_name!")));
        let mut digits = Vec::new();
        for n in [0, 7, 10, 1234567, usize::MAX] {
            digits.clear();
            push_decimal(&mut digits, n);
            assert_eq!(digits, n.to_string().as_bytes());
        }
    }

    #[tokio::test]
    async fn a_path_in_the_address_comes_before_every_request_path() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = socket.read(&mut buf).await.unwrap();
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            let _ = seen_tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
        });
        let upstream = Upstream::new(&format!("http://{address}/replica-3"));
        upstream.send(&post(&Bytes::new()), TIMEOUT).await.unwrap();
        let seen = seen_rx.await.unwrap();
        assert!(
            seen.starts_with("POST /replica-3/v2/models/m/infer HTTP/1.1\r\n"),
            "{seen}"
        );
        assert!(seen.contains(&format!("host: {address}\r\n")), "{seen}");
    }
}
