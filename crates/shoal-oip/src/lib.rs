//! The Open Inference Protocol v2 ("KServe V2", spoken by Triton, KServe and
//! Seldon) as Shoal reads and writes it over REST: the JSON shapes of server
//! and model metadata ([`types`]), and the tensor codec that turns an
//! inference request body into checked [`shoal_core::Tensor`]s and tensors
//! back into a response body ([`codec`]), with Triton's binary tensor data
//! extension ([`binary`]) for clients that send or want raw bytes, a
//! request's place in a sequence as Triton's clients name it
//! ([`sequence`]), and a structural scan that lets a precheck skip the
//! tensor data without reading it ([`skim`]) and a replica read each data
//! array with a fast path for plain numbers (`numbers`); responses and
//! requests are written without serde's generic serializer (`out`).
//!
//! Architecture invariant: this crate knows nothing about HTTP servers or
//! inference engines. Replicas and gateways both use it, so a request is
//! parsed and validated the same way wherever it enters.

pub mod binary;
pub mod codec;
mod lite;
mod numbers;
mod out;
pub mod sequence;
pub mod skim;
pub mod types;

pub use binary::HEADER_LENGTH as BINARY_HEADER;
pub use codec::{
    DecodeError, DecodedRequest, DecodedResponse, EncodedResponse, Limits, Prechecked,
    decode_request, decode_request_by_serde, decode_request_parts, decode_response,
    decode_response_parts, encode_request, encode_response, encode_response_parts,
    precheck_request, precheck_request_by_serde, precheck_request_parts,
};
pub use types::{MetadataTensor, ModelMetadata, RequestOutput, ServerMetadata};
