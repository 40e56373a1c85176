//! Shoal's domain vocabulary, shared by every other crate: model names and
//! versions ([`names`]), tensors and their datatypes ([`tensor`]), and the
//! signature a model declares for its inputs and outputs ([`signature`]),
//! the comparison of two models' answers ([`compare`]), the state a
//! stateful model carries between the steps of a sequence ([`state`]),
//! dynamic batching's policy and tensor joins ([`batch`]), and the engine
//! a version asks for ([`engine`]).
//!
//! This crate is pure: no I/O, no async, no HTTP, no inference engine. It is
//! the innermost layer, so everything here must stay cheap to depend on.

pub mod batch;
pub mod compare;
pub mod engine;
pub mod names;
pub mod redact;
pub mod signature;
pub mod state;
pub mod tensor;

pub use engine::Engine;
pub use names::{ModelName, ModelRef, NameError, Version, VersionKey};
pub use redact::redact_url;
pub use signature::{DEFAULT_MAX_DIM, Dim, InputBounds, InputError, Signature, TensorSpec};
pub use state::StateSpec;
pub use tensor::{DataType, Tensor, TensorData, TensorError};
