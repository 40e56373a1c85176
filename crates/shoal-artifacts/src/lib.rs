//! Content-addressed model artifacts.
//!
//! An artifact (an ONNX file) is cut into content-defined chunks with
//! FastCDC ([`chunk`]), so an edit inside one tensor changes only the
//! chunks around it. Each chunk is named by the BLAKE3 of its content and
//! stored zstd-compressed when that saves at least 5 %. A [`Manifest`] lists
//! the chunks and carries the whole artifact's SHA-256, which is the
//! artifact's id and what the registry records.
//!
//! - [`store::ArtifactStore`]: the origin, on any `object_store` backend
//!   (local filesystem by default, S3 by configuration). Chunks shared
//!   between versions are stored once.
//! - [`cache::ChunkCache`]: a replica's local cache. It accepts a chunk only
//!   after checking its BLAKE3, and assembles an artifact only when the
//!   whole file's SHA-256 matches the manifest. Chunks live in append-only
//!   pack files (`pack`), not a file each. [`cache::AsyncCache`] is its
//!   face for async code: disk work on tokio's blocking pool.
//!
//! Architecture invariant: nothing here speaks HTTP; fetching from origins
//! and peers is the sync agent's job. Every byte that leaves this crate as
//! "an artifact" has been verified against its SHA-256.

pub mod cache;
pub mod chunk;
pub mod pack;
pub mod store;

pub use cache::{Assembly, AsyncCache, ChunkCache};
pub use chunk::{ChunkId, ChunkRef, Manifest};
pub use store::ArtifactStore;

/// Why an artifact operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A chunk's content does not match its name.
    #[error("chunk {id} is corrupt: its content hashes to {actual}")]
    CorruptChunk {
        /// The chunk's name.
        id: String,
        /// BLAKE3 of what was received.
        actual: String,
    },
    /// A stored chunk cannot be decoded.
    #[error("chunk {id} cannot be decoded: {reason}")]
    BadEncoding {
        /// The chunk.
        id: String,
        /// Why.
        reason: String,
    },
    /// The assembled artifact's SHA-256 differs from the manifest's.
    #[error("artifact integrity check failed: expected sha256 {expected}, assembled {actual}")]
    Integrity {
        /// From the manifest.
        expected: String,
        /// Of the assembled bytes.
        actual: String,
    },
    /// No such artifact or chunk.
    #[error("{0} not found")]
    NotFound(String),
    /// A malformed id or manifest.
    #[error("{0}")]
    Invalid(String),
    /// The object store failed.
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
    /// Local I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl ArtifactError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ArtifactError {
        let context = context.into();
        move |source| ArtifactError::Io { context, source }
    }
}

/// True when `s` is a lowercase hex SHA-256 or BLAKE3 digest.
pub fn is_hex_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
