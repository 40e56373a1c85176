//! Errors of loading and running models, with enough structure for callers
//! to tell the client's fault (bad input) from the server's.

use shoal_core::InputError;

/// Why a model could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a model the engine can read.
    #[error("cannot parse the model: {0}")]
    Parse(String),
    /// The engine read the model but cannot prepare it (unsupported operator,
    /// inconsistent shapes, …).
    #[error("cannot prepare the model: {0}")]
    Prepare(String),
    /// An input or output has a type the protocol cannot carry.
    #[error("unsupported tensor type: {0}")]
    Unsupported(String),
    /// The warm-up inference failed.
    #[error("warm-up inference failed: {0}")]
    WarmUp(String),
    /// The engine the version asks for is not available on this machine
    /// (ONNX Runtime's library not found); the message says how to get it.
    #[error("{0}")]
    EngineUnavailable(String),
}

/// Why an inference failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The inputs do not fit the model's signature: the caller's fault.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The engine failed on inputs that fit the signature.
    #[error("inference failed: {0}")]
    Engine(String),
    /// The inference pool's queue is full; retrying elsewhere may help.
    #[error("replica overloaded: {queued} inferences already queued")]
    Overloaded {
        /// Requests already waiting.
        queued: usize,
    },
    /// The request waited its whole deadline for a thread without
    /// starting; retrying elsewhere may help.
    #[error("replica busy: no inference thread for this model within {waited_ms} ms")]
    Busy {
        /// How long it waited.
        waited_ms: u64,
    },
    /// The inference started but did not finish within the deadline; the
    /// answer is abandoned (the thread finishes it and is then free).
    #[error("inference did not finish within its deadline of {deadline_ms} ms")]
    DeadlineExceeded {
        /// The deadline.
        deadline_ms: u64,
    },
}

impl RunError {
    /// True when the caller sent something wrong (the HTTP layer answers 4xx).
    pub fn is_client_error(&self) -> bool {
        matches!(self, RunError::Input(_))
    }
}
