//! At the process's connection cap, the gRPC connection with no call for
//! longest makes room first (as nginx closes its least recently used
//! keep-alive connections first): a connection with no call started since
//! its check before is marked quiet, and asks pick quiet connections before
//! those only between two calls. On tokio's paused clock, with real
//! sockets and tonic's client. Its own test binary: the cap is set once per
//! process, and connections take their places in the order they came.

use std::time::Duration;

mod common;

use common::{LAST_PEER, Live};
use shoal_grpc::Beside;
use shoal_grpc::pb::ServerLiveRequest;
use shoal_grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use shoal_grpc::pb::grpc_inference_service_server::GrpcInferenceServiceServer;
use tonic::transport::{Channel, Endpoint};

/// A `ServerLive` call; the address the server saw it come from.
async fn live(client: &mut GrpcInferenceServiceClient<Channel>) -> std::net::SocketAddr {
    let answer = client.server_live(ServerLiveRequest {}).await.unwrap();
    assert!(answer.into_inner().live);
    LAST_PEER.lock().unwrap().expect("no caller's address")
}

#[tokio::test(start_paused = true)]
async fn the_connection_quiet_longest_makes_room_first() {
    shoal_http::limit::set_max_connections(2).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc, _stop) =
        Beside::start(listener, None, GrpcInferenceServiceServer::new(Live)).unwrap();
    let url = format!("http://{}", grpc.addr);
    let client = || {
        GrpcInferenceServiceClient::new(Endpoint::from_shared(url.clone()).unwrap().connect_lazy())
    };
    let (mut busy, mut quiet, mut new) = (client(), client(), client());

    // The busy client's connection comes first: an ask that did not look
    // at quiet connections first would pick it.
    let busy_peer = live(&mut busy).await;
    let quiet_peer = live(&mut quiet).await;
    // One calls every 5 s, the other nothing, for longer than two checks.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(live(&mut busy).await, busy_peer);
    }

    // A third client: the quiet connection closes for it, the other stays.
    let new_peer = live(&mut new).await;
    assert_ne!(new_peer, quiet_peer);
    assert_eq!(
        live(&mut busy).await,
        busy_peer,
        "the busy connection was closed"
    );
    assert_ne!(
        live(&mut quiet).await,
        quiet_peer,
        "the quiet connection was kept"
    );
}
