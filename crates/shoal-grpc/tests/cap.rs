//! The process's connection cap (`shoal_http::limit`) counts gRPC and REST
//! connections together, on real sockets: a gRPC client waiting at the cap
//! makes an idle REST connection close for it, and a REST client an idle
//! gRPC one. Its own test binary: the cap is set once per process.

use std::time::Duration;

mod common;

use common::{Live, PREFACE};
use shoal_grpc::Beside;
use shoal_grpc::pb::ServerLiveRequest;
use shoal_grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use shoal_grpc::pb::grpc_inference_service_server::GrpcInferenceServiceServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Endpoint;

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nhost: test\r\n\r\n";

/// The first `n` bytes the server sends on `stream`, within `wait`.
async fn first_bytes(stream: &mut TcpStream, n: usize, wait: Duration) -> Option<Vec<u8>> {
    let mut read = vec![0u8; n];
    tokio::time::timeout(wait, stream.read_exact(&mut read))
        .await
        .ok()
        .map(|done| {
            done.unwrap();
            read
        })
}

/// Whether the server closed `stream` (within a generous bound).
async fn closed(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest)).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_rest_connections_share_the_cap() {
    shoal_http::limit::set_max_connections(2).unwrap();
    let connections = shoal_http::limit::connections();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc, _stop) =
        Beside::start(listener, None, GrpcInferenceServiceServer::new(Live)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rest = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
    tokio::spawn(shoal_http::serve(
        listener,
        router,
        None,
        std::future::pending(),
        None,
    ));
    let settle = Duration::from_secs(30);
    // Below the cap each listener takes its next client's room before the
    // client comes. Wait until both have: a listener that has not started
    // yet when the other accepts and takes its second room would find the
    // cap full, and its first client would close the idle REST connection
    // this test means to keep for the second (a flake seen in CI).
    let started = tokio::time::Instant::now();
    while connections.open() < 2 {
        assert!(
            started.elapsed() < settle,
            "the listeners never took their rooms"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // One of each, idle.
    let mut rest_idle = TcpStream::connect(rest).await.unwrap();
    rest_idle.write_all(HEALTH).await.unwrap();
    let answer = first_bytes(&mut rest_idle, 12, settle).await;
    assert_eq!(answer.as_deref(), Some(&b"HTTP/1.1 200"[..]));
    let mut first_grpc = TcpStream::connect(grpc.addr).await.unwrap();
    first_grpc.write_all(PREFACE).await.unwrap();
    // The server's SETTINGS frame: its type is the fourth byte.
    let settings = first_bytes(&mut first_grpc, 9, settle)
        .await
        .expect("no SETTINGS");
    assert_eq!(settings[3], 4);
    assert_eq!(connections.open(), 2);

    // A second gRPC client: the idle REST connection closes for it.
    let mut second_grpc = TcpStream::connect(grpc.addr).await.unwrap();
    second_grpc.write_all(PREFACE).await.unwrap();
    let settings = first_bytes(&mut second_grpc, 9, settle).await;
    assert!(
        settings.is_some(),
        "a gRPC client waited while a REST connection sat idle"
    );
    assert!(
        closed(&mut rest_idle).await,
        "the idle REST connection was kept"
    );

    // Two gRPC connections held idle by tonic's client (which answers the
    // pings a graceful shutdown waits on): a REST client makes one of them
    // shut down for it.
    drop((first_grpc, second_grpc));
    let url = format!("http://{}", grpc.addr);
    let mut clients = Vec::new();
    for _ in 0..2 {
        let channel = Endpoint::from_shared(url.clone()).unwrap().connect_lazy();
        let mut client = GrpcInferenceServiceClient::new(channel);
        let live = tokio::time::timeout(settle, client.server_live(ServerLiveRequest {})).await;
        assert!(live.unwrap().unwrap().into_inner().live);
        clients.push(client);
    }
    assert_eq!(connections.open(), 2);
    let mut waiting = TcpStream::connect(rest).await.unwrap();
    waiting.write_all(HEALTH).await.unwrap();
    let answer = first_bytes(&mut waiting, 12, settle).await;
    assert_eq!(answer.as_deref(), Some(&b"HTTP/1.1 200"[..]));
}
