//! The Open Inference Protocol v2 over gRPC: KServe's
//! `inference.GRPCInferenceService` (`proto/grpc_predict_v2.proto`), the
//! protocol `tritonclient.grpc` and KServe's clients speak.
//!
//! - [`pb`]: the messages, the tonic service trait and server
//!   (`grpc_inference_service_server`) and client, generated at build time.
//! - [`codec`]: a `ModelInferRequest` into the same checked
//!   [`shoal_oip::DecodedRequest`] a REST body becomes (typed `contents` or
//!   `raw_input_contents`, within the same [`shoal_oip::Limits`]), and
//!   tensors back into a `ModelInferResponse` (`raw_output_contents`, as
//!   Triton answers); metadata both ways.
//! - [`admit`]: `ModelInfer` served from the message's bytes, so a server
//!   admits (or refuses) a request before paying for its decoding.
//! - [`status`]: the gRPC status code for each HTTP status Shoal's REST
//!   handlers answer with, so both protocols fail alike.
//! - [`Beside`]: the service on a bound listener until told to stop, as
//!   replicas and gateways run it beside their REST port; over TLS with the
//!   REST port's certificate (and client verification) when they serve
//!   https, with hyper's HTTP/2 server (`shoal_http::h2`; tonic's own
//!   transport server owns its connections, so it could not close an idle
//!   one for a new client) and, per call, what tonic's server would add
//!   (`calls`: the caller's address, the client's deadline). Its
//!   connections count against the process's connection cap
//!   (`shoal_http::limit`), make room at it when no call is in flight,
//!   carry at most [`MAX_STREAMS`] calls at once,
//!   are pinged every [`KEEPALIVE_INTERVAL`] (a
//!   client that does not answer within [`KEEPALIVE_TIMEOUT`] is dropped)
//!   and closed once nothing moves on them for `shoal_http::IDLE_TIMEOUT`
//!   (`shoal_http::silence::Silenced`).
//!
//! Architecture invariant: no server or inference here; replicas and
//! gateways serve the service and run the requests.

pub mod admit;
mod calls;
pub mod codec;
pub mod status;

use std::convert::Infallible;

use shoal_http::limit::Permitted;
use shoal_http::silence::Silenced;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// A gRPC service [`Beside`] can serve: the generated server, or one
/// wrapped (as [`admit::DecodeAfterAdmission`] wraps it).
pub trait GrpcService:
    Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The gRPC port a server runs beside its REST one, serving until its
/// [`StopBeside`] is used, then letting calls in flight finish.
#[derive(Debug)]
pub struct Beside {
    /// The address it listens on.
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// Stops a [`Beside`] from taking calls.
#[derive(Debug)]
pub struct StopBeside(tokio::sync::watch::Sender<bool>);

impl StopBeside {
    /// Stops taking calls (those in flight finish).
    pub fn stop(self) {
        let _ = self.0.send(true);
    }
}

impl Beside {
    /// Serves `service` on `listener`: over TLS with `tls`'s certificate
    /// and client verification when given (a server on https serves gRPC
    /// on TLS too), in plaintext otherwise.
    pub fn start(
        listener: tokio::net::TcpListener,
        tls: Option<&shoal_http::tls::ServerTls>,
        service: impl GrpcService,
    ) -> std::io::Result<(Beside, StopBeside)> {
        match tls {
            Some(tls) => {
                let config = tls.grpc_config().map_err(std::io::Error::other)?;
                Self::serve_tls(listener, config, service)
            }
            None => Self::serve(listener, service),
        }
    }

    /// Serves `service` on `listener` (Nagle off), within the process's
    /// connection cap.
    fn serve(
        listener: tokio::net::TcpListener,
        service: impl GrpcService,
    ) -> std::io::Result<(Beside, StopBeside)> {
        let addr = listener.local_addr()?;
        let listener = shoal_http::capped_tcp(listener);
        Ok(Self::serve_incoming(addr, listener, service))
    }

    /// Serves `service` over TLS on `listener` with `config` (its ALPN must
    /// offer `h2`: [`shoal_http::tls::ServerTls::grpc_config`]); handshakes
    /// complete before hyper sees a connection, as for REST.
    fn serve_tls(
        listener: tokio::net::TcpListener,
        config: std::sync::Arc<rustls::ServerConfig>,
        service: impl GrpcService,
    ) -> std::io::Result<(Beside, StopBeside)> {
        let addr = listener.local_addr()?;
        let connections = shoal_http::limit::connections().clone();
        let tls = shoal_http::tls::TlsListener::new(listener, config, connections)?;
        Ok(Self::serve_incoming(addr, tls, service))
    }

    fn serve_incoming<L, IO>(
        addr: std::net::SocketAddr,
        listener: L,
        service: impl GrpcService,
    ) -> (Beside, StopBeside)
    where
        L: axum::serve::Listener<Io = Permitted<IO>, Addr = std::net::SocketAddr>,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        Connection<IO>: tonic::transport::server::Connected<
                ConnectInfo = tonic::transport::server::TcpConnectInfo,
            >,
    {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let reclaim = std::sync::Arc::clone(shoal_http::limit::connections().reclaim());
        let task = tokio::spawn(shoal_http::h2::serve_http2(
            listener,
            HTTP2,
            move |io, _peer| {
                let io = Connection(Silenced::new(io));
                let info = tonic::transport::server::Connected::connect_info(&io);
                (io, calls::Served::new(service.clone(), info))
            },
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
            reclaim,
        ));
        (Beside { addr, task }, StopBeside(stop))
    }

    /// Waits until it has stopped.
    pub async fn join(self) -> std::io::Result<()> {
        self.task
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// How often a connection is pinged (HTTP/2 PING) to find dead clients
/// and keep live ones' connections moving: well within
/// [`shoal_http::IDLE_TIMEOUT`], after which a connection on which nothing
/// moved either way is closed ([`Silenced`]: a client that never finishes
/// its connection preface, which no ping reaches).
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Most calls one connection carries at once (hyper's own default, which
/// tonic's builder would lift): with the connection cap, what clients can
/// have in flight is bounded.
pub const MAX_STREAMS: u32 = 200;

/// How each connection is held.
const HTTP2: shoal_http::h2::Http2 = shoal_http::h2::Http2 {
    keep_alive_interval: KEEPALIVE_INTERVAL,
    keep_alive_timeout: KEEPALIVE_TIMEOUT,
    max_concurrent_streams: MAX_STREAMS,
};

/// How long a ping waits for its answer before the connection is closed.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A connection as tonic serves it: counted against the process's
/// connection cap and closed when silent, with the TCP peer's address for
/// handlers that ask (`Request::remote_addr`).
struct Connection<I>(Silenced<Permitted<I>>);

impl tonic::transport::server::Connected for Connection<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().get_ref().connect_info()
    }
}

impl tonic::transport::server::Connected
    for Connection<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>
{
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().get_ref().get_ref().0.connect_info()
    }
}

shoal_http::delegate_io!(Connection, 0);

/// The protocol's messages and service, generated from
/// `proto/grpc_predict_v2.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("inference");
}
