//! The gRPC port's connections on a real socket, on tokio's paused clock
//! (the runtime's clock jumps to the next timer whenever everything
//! waits): a client that never sends its HTTP/2 preface is dropped after
//! the idle timeout, one that does not answer pings after the keep-alive
//! timeout, and one that answers them keeps its connection however long
//! it stays idle; the server's settings cap the calls a connection
//! carries at once; a call still running at its `grpc-timeout` is answered
//! `DEADLINE_EXCEEDED`. The service behind the port answers `ServerLive`
//! and holds `ServerReady`:
//! what is tested is how `Beside` holds connections.

use std::time::Duration;

mod common;

use common::{Live, PREFACE};
use shoal_grpc::pb::ServerLiveRequest;
use shoal_grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use shoal_grpc::pb::grpc_inference_service_server::GrpcInferenceServiceServer;
use shoal_grpc::{Beside, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_STREAMS};
use shoal_http::IDLE_TIMEOUT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start() -> (Beside, shoal_grpc::StopBeside) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Beside::start(listener, None, GrpcInferenceServiceServer::new(Live)).unwrap()
}

/// SETTINGS with the ACK flag.
const SETTINGS_ACK: &[u8] = b"\0\0\0\x04\x01\0\0\0\0";
const SETTINGS: u8 = 4;
const MAX_CONCURRENT_STREAMS: [u8; 2] = [0, 3];
const PING: u8 = 6;
const ACK: u8 = 1;

/// The next frame's type, flags and payload; `None` at end of file.
async fn frame(stream: &mut TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    match stream.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            return None;
        }
        Err(e) => panic!("{e}"),
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], payload))
}

/// Reads frames until the server closes, answering its SETTINGS and, when
/// `answer_pings`, its pings; the types of the frames it sent.
async fn read_until_closed(stream: &mut TcpStream, answer_pings: bool) -> Vec<u8> {
    let mut types = Vec::new();
    while let Some((kind, flags, payload)) = frame(stream).await {
        types.push(kind);
        if kind == SETTINGS && flags & ACK == 0 {
            // Six bytes a setting: its id, then its value.
            let streams = payload.chunks(6).find_map(|setting| {
                (setting[..2] == MAX_CONCURRENT_STREAMS)
                    .then(|| u32::from_be_bytes(setting[2..].try_into().unwrap()))
            });
            assert_eq!(streams, Some(MAX_STREAMS));
            stream.write_all(SETTINGS_ACK).await.unwrap();
        }
        if kind == PING && flags & ACK == 0 && answer_pings {
            let mut ack = vec![0, 0, 8, PING, ACK, 0, 0, 0, 0];
            ack.extend_from_slice(&payload);
            stream.write_all(&ack).await.unwrap();
        }
    }
    types
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_sends_its_preface_is_dropped_after_the_idle_timeout() {
    let (grpc, _stop) = start().await;
    let mut stream = TcpStream::connect(grpc.addr).await.unwrap();
    let start = tokio::time::Instant::now();
    let mut sent = Vec::new();
    let closed = tokio::time::timeout(IDLE_TIMEOUT * 2, stream.read_to_end(&mut sent)).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the server kept a silent connection: {closed:?}"
    );
    let open = start.elapsed();
    assert!(
        IDLE_TIMEOUT <= open && open <= IDLE_TIMEOUT + Duration::from_secs(15),
        "{open:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_does_not_answer_pings_is_dropped() {
    let (grpc, _stop) = start().await;
    let mut stream = TcpStream::connect(grpc.addr).await.unwrap();
    stream.write_all(PREFACE).await.unwrap();
    let start = tokio::time::Instant::now();
    let types = tokio::time::timeout(IDLE_TIMEOUT * 2, read_until_closed(&mut stream, false))
        .await
        .expect("the server kept a client that answers no pings");
    let open = start.elapsed();
    assert!(types.contains(&PING), "{types:?}");
    assert!(
        KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT <= open && open < IDLE_TIMEOUT,
        "{open:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_answers_pings_keeps_its_idle_connection() {
    let (grpc, _stop) = start().await;
    let mut stream = TcpStream::connect(grpc.addr).await.unwrap();
    stream.write_all(PREFACE).await.unwrap();
    // Ten minutes with nothing but pings and their answers.
    let kept = tokio::time::timeout(
        Duration::from_secs(600),
        read_until_closed(&mut stream, true),
    )
    .await;
    assert!(kept.is_err(), "closed: {kept:?}");

    // And tonic's own client: a call, ten idle minutes, a call.
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", grpc.addr))
        .await
        .unwrap();
    for _ in 0..2 {
        let live = client.server_live(ServerLiveRequest {}).await.unwrap();
        assert!(live.into_inner().live);
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}

/// A `ServerReady` call with `grpc-timeout: timeout`, sent by hyper's own
/// HTTP/2 client (tonic's would also time the call out on its side); its
/// `grpc-status` and `grpc-message`.
async fn server_ready_within(addr: std::net::SocketAddr, timeout: &str) -> (String, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!(
        "http://{addr}/inference.GRPCInferenceService/ServerReady"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", timeout)
    // One empty message: not compressed, zero bytes long.
    .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
        0, 0, 0, 0, 0,
    ])))
    .unwrap();
    let response = sender.send_request(request).await.unwrap();
    // An error status comes alone, in the headers.
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    (header("grpc-status"), header("grpc-message"))
}

#[tokio::test(start_paused = true)]
async fn a_call_still_running_at_its_deadline_is_answered_deadline_exceeded() {
    let (grpc, _stop) = start().await;
    let start = tokio::time::Instant::now();
    // `ServerReady` is held until the test lets it go: never, here.
    let (status, message) = server_ready_within(grpc.addr, "250m").await;
    assert_eq!(
        status,
        (tonic::Code::DeadlineExceeded as i32).to_string(),
        "{message}"
    );
    assert!(message.contains("250ms"), "{message}");
    let waited = start.elapsed();
    assert!(
        Duration::from_millis(250) <= waited && waited < Duration::from_secs(1),
        "{waited:?}"
    );

    // A header that is not a timeout is ignored, as tonic's server ignores
    // it: the call runs (here, until the client gives up on it; within
    // 30 s, since on the paused clock this bare client's connection is
    // dropped at the server's first keep-alive ping, unanswered, where
    // tonic's client answers them: see above).
    let call = server_ready_within(grpc.addr, "soon");
    let waited = tokio::time::timeout(Duration::from_secs(20), call).await;
    assert!(waited.is_err(), "answered: {waited:?}");
}
