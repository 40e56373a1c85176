//! At the process's connection cap, gRPC connections with no call in
//! flight make room for new clients as kept-alive REST ones do, on real
//! sockets with tonic's client: the idle connection is shut down the
//! HTTP/2 way (GOAWAY) and its client reconnects for its next call, while
//! a connection with a call in flight keeps it until it is answered and
//! only then closes for the waiting client. Its own test binary: the cap
//! is set once per process.

use std::net::SocketAddr;
use std::time::Duration;

mod common;

use common::{HELD, LAST_PEER, Live, READY};
use shoal_grpc::Beside;
use shoal_grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use shoal_grpc::pb::grpc_inference_service_server::GrpcInferenceServiceServer;
use shoal_grpc::pb::{ServerLiveRequest, ServerReadyRequest};
use tonic::transport::{Channel, Endpoint};

/// Long enough for any wait a correct server ends (a failing one hangs).
const SETTLE: Duration = Duration::from_secs(30);

/// `ServerLive`'s answer, or the status it failed with.
async fn live(client: &mut GrpcInferenceServiceClient<Channel>) -> Result<bool, String> {
    let call = client.server_live(ServerLiveRequest {});
    match tokio::time::timeout(SETTLE, call).await {
        Ok(Ok(answer)) => Ok(answer.into_inner().live),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => panic!("the call waited at the cap for good"),
    }
}

/// Starts a `ServerReady` call on `client` and waits until the service
/// holds it (answered once the test adds a permit to `READY`).
async fn hold(
    client: &GrpcInferenceServiceClient<Channel>,
) -> tokio::task::JoinHandle<Result<bool, String>> {
    let mut client = client.clone();
    let call = tokio::spawn(async move {
        match client.server_ready(ServerReadyRequest {}).await {
            Ok(answer) => Ok(answer.into_inner().ready),
            Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
        }
    });
    HELD.acquire().await.unwrap().forget();
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_with_no_call_in_flight_make_room() {
    shoal_http::limit::set_max_connections(2).unwrap();
    let connections = shoal_http::limit::connections();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc, _stop) =
        Beside::start(listener, None, GrpcInferenceServiceServer::new(Live)).unwrap();
    let url = format!("http://{}", grpc.addr);
    // Each connects at its first call (lazily), so that no connection is
    // closed under a call on its way: tonic's client, unlike grpc-core's,
    // does not retry a call it had queued on a connection that then got a
    // GOAWAY.
    let mut clients: Vec<_> = (0..3)
        .map(|_| {
            let channel = Endpoint::from_shared(url.clone()).unwrap().connect_lazy();
            GrpcInferenceServiceClient::new(channel)
        })
        .collect();

    // Two clients hold both rooms, idle after a call.
    assert_eq!(live(&mut clients[0]).await, Ok(true));
    assert_eq!(live(&mut clients[1]).await, Ok(true));
    assert_eq!(connections.open(), 2);

    // A third: an idle connection closes for it; and those clients'
    // next calls reconnect (closing another idle one in turn): no call
    // fails.
    for i in [2, 0, 1, 2, 0] {
        assert_eq!(live(&mut clients[i]).await, Ok(true), "client {i}");
    }
    let [mut a, mut b, mut c] = <[_; 3]>::try_from(clients).unwrap();

    // A call in flight keeps its connection: with one connection busy and
    // one idle, the idle one makes room, and the busy one is still there
    // once its call is answered (its next call comes from the same
    // address).
    assert_eq!(live(&mut a).await, Ok(true));
    let a_peer = last_peer();
    let a_ready = hold(&a).await;
    assert_eq!(live(&mut b).await, Ok(true));
    assert_eq!(live(&mut c).await, Ok(true));
    assert!(!a_ready.is_finished(), "the held call ended: {a_ready:?}");
    READY.add_permits(1);
    assert_eq!(a_ready.await.unwrap(), Ok(true));
    assert_eq!(live(&mut a).await, Ok(true));
    assert_eq!(last_peer(), a_peer, "the busy connection was closed");

    // Both connections busy: a new client waits until a call is answered,
    // whole, and then gets the room. A new one, not `c`: `c`'s connection
    // was just closed to make room for `b`'s, and a call `c` sent before
    // its client saw that would fail at once (tonic does not retry it; a
    // flake seen in CI) rather than wait.
    drop(c);
    let a_ready = hold(&a).await;
    let b_ready = hold(&b).await;
    let mut d = GrpcInferenceServiceClient::new(Endpoint::from_shared(url).unwrap().connect_lazy());
    let waiting = tokio::spawn(async move { live(&mut d).await });
    // (A bounded look for an answer that must not come: a correct server
    // never answers it.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    if waiting.is_finished() {
        panic!(
            "answered while every connection was busy: {:?}",
            waiting.await
        );
    }
    READY.add_permits(1);
    assert_eq!(waiting.await.unwrap(), Ok(true));
    READY.add_permits(1);
    assert_eq!(a_ready.await.unwrap(), Ok(true));
    assert_eq!(b_ready.await.unwrap(), Ok(true));
}

/// The address the server saw the last `ServerLive` call come from.
fn last_peer() -> SocketAddr {
    LAST_PEER
        .lock()
        .unwrap()
        .expect("the server did not know the caller's address")
}
