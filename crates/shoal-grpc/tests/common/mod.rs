//! What the gRPC connection tests share: a service that answers
//! `ServerLive` (noting the caller's address: [`LAST_PEER`]), and
//! `ServerReady` once a test lets it ([`READY`]: a call held in flight),
//! and nothing else (what they test is how `Beside` holds connections, not
//! the calls).

use std::net::SocketAddr;
use std::sync::Mutex;

use shoal_grpc::pb::grpc_inference_service_server::GrpcInferenceService;
use shoal_grpc::pb::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

/// Each permit added answers one `ServerReady` call, held until then.
pub(crate) static READY: Semaphore = Semaphore::const_new(0);

/// A permit for each `ServerReady` call the service has begun.
pub(crate) static HELD: Semaphore = Semaphore::const_new(0);

/// The address of the last `ServerLive` call's client, as the server saw
/// it (`Request::remote_addr`).
pub(crate) static LAST_PEER: Mutex<Option<SocketAddr>> = Mutex::new(None);

/// The client's connection preface and an empty SETTINGS frame.
#[allow(dead_code, reason = "not every test binary speaks raw HTTP/2")]
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// Live, ready when a test says so, and nothing else.
pub(crate) struct Live;

#[tonic::async_trait]
impl GrpcInferenceService for Live {
    async fn server_live(
        &self,
        request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        *LAST_PEER.lock().unwrap() = request.remote_addr();
        Ok(Response::new(ServerLiveResponse { live: true }))
    }
    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        HELD.add_permits(1);
        READY.acquire().await.unwrap().forget();
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }
    async fn model_ready(
        &self,
        _: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn model_metadata(
        &self,
        _: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn model_infer(
        &self,
        _: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}
