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
//! - [`status`]: the gRPC status code for each HTTP status Shoal's REST
//!   handlers answer with, so both protocols fail alike.
//! - [`Beside`]: the service on a bound listener until told to stop, as
//!   replicas and gateways run it beside their REST port.
//!
//! Architecture invariant: no server or inference here; replicas and
//! gateways serve the service and run the requests.

pub mod codec;
pub mod status;

/// The gRPC port a server runs beside its REST one, serving until its
/// [`StopBeside`] is used, then letting calls in flight finish.
#[derive(Debug)]
pub struct Beside {
    /// The address it listens on.
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
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
    /// Serves `service` on `listener` (Nagle off).
    pub fn serve<T: pb::grpc_inference_service_server::GrpcInferenceService>(
        listener: tokio::net::TcpListener,
        service: pb::grpc_inference_service_server::GrpcInferenceServiceServer<T>,
    ) -> std::io::Result<(Beside, StopBeside)> {
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    },
                ),
        );
        Ok((Beside { addr, task }, StopBeside(stop)))
    }

    /// Waits until it has stopped.
    pub async fn join(self) -> std::io::Result<()> {
        self.task
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .map_err(std::io::Error::other)
    }
}

/// The protocol's messages and service, generated from
/// `proto/grpc_predict_v2.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("inference");
}
