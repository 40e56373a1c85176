//! The Open Inference Protocol v2 ("KServe V2", spoken by Triton, KServe and
//! Seldon) as Shoal reads and writes it over REST: the JSON shapes of server
//! and model metadata ([`types`]), and the tensor codec that turns an
//! inference request body into checked [`shoal_core::Tensor`]s and tensors
//! back into a response body ([`codec`]).
//!
//! Architecture invariant: this crate knows nothing about HTTP servers or
//! inference engines. Replicas and gateways both use it, so a request is
//! parsed and validated the same way wherever it enters.

pub mod codec;
pub mod types;

pub use codec::{
    DecodeError, DecodedRequest, DecodedResponse, Limits, decode_request, decode_response,
    encode_response, precheck_request,
};
pub use types::{ErrorBody, MetadataTensor, ModelMetadata, RequestOutput, ServerMetadata};
