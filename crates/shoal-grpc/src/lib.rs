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
//!
//! Architecture invariant: no server or inference here; replicas and
//! gateways serve the service and run the requests.

pub mod codec;
pub mod status;

/// The protocol's messages and service, generated from
/// `proto/grpc_predict_v2.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("inference");
}
