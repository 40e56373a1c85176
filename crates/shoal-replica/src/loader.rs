//! Loading a model version: read the artifact, verify its SHA-256, prepare
//! it with the backend and run a warm-up inference — all off the async
//! executor. Nothing here touches the serving table; a failure at any step
//! leaves whatever is serving untouched.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};
use shoal_api::fleet::FailureKind;
use shoal_core::{ModelName, Version};
use shoal_runtime::{Backend, LoadError, LoadOptions, LoadedModel};

/// Where a version's bytes come from.
#[derive(Debug, Clone)]
pub enum ArtifactSource {
    /// A file on the replica's filesystem.
    Path(PathBuf),
    /// Bytes already in memory.
    Bytes(Bytes),
    /// Bytes whose SHA-256 the caller has already verified (an artifact
    /// assembled from checked chunks); hashing again would only cost time.
    Verified {
        /// The artifact.
        bytes: Bytes,
        /// Its SHA-256 (hex).
        sha256: String,
    },
}

/// What to load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The model.
    pub model: ModelName,
    /// The version.
    pub version: Version,
    /// The artifact.
    pub source: ArtifactSource,
    /// Expected SHA-256 (hex). When given, a mismatch refuses the load.
    pub sha256: Option<String>,
    /// Backend options (input shape overrides).
    pub options: LoadOptions,
}

/// Why a version was not loaded. The serving version, if any, is untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadFailure {
    /// The artifact file could not be read.
    #[error("cannot read model file {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        error: String,
    },
    /// The expected checksum is not a SHA-256 hex digest.
    #[error("expected sha256 {0:?} is not 64 hexadecimal characters")]
    BadChecksum(String),
    /// The artifact's SHA-256 differs from the expected one.
    #[error("integrity check failed: expected sha256 {expected}, the artifact has {actual}")]
    Integrity {
        /// Expected digest.
        expected: String,
        /// Actual digest.
        actual: String,
    },
    /// The engine refused the model.
    #[error("{0}")]
    Model(#[from] LoadError),
    /// Something went wrong on our side.
    #[error("internal error while loading: {0}")]
    Internal(String),
}

impl LoadFailure {
    /// Whether trying the same artifact again could help: a model the
    /// engine refused, or bytes that do not match their digest, fail the
    /// same way every time; reading a file or our own trouble may not.
    pub fn kind(&self) -> FailureKind {
        match self {
            LoadFailure::Read { .. } | LoadFailure::Internal(_) => FailureKind::Transient,
            LoadFailure::BadChecksum(_) | LoadFailure::Integrity { .. } | LoadFailure::Model(_) => {
                FailureKind::Definite
            }
        }
    }
}

/// What a successful load did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    /// The model.
    pub model: String,
    /// The version now loaded.
    pub version: String,
    /// SHA-256 of the artifact (hex).
    pub sha256: String,
    /// Artifact size in bytes.
    pub bytes: u64,
    /// Time to read, verify and prepare, in milliseconds.
    pub load_ms: f64,
    /// Time of the warm-up inference, in milliseconds.
    pub warm_ms: f64,
    /// Memory it took, bytes: resident set growth over load and warm-up,
    /// at least the artifact's size.
    pub memory_bytes: u64,
    /// Versions retired by this load; they drain and are freed.
    pub retired: Vec<String>,
}

/// A version ready to be installed.
pub(crate) struct Prepared {
    pub(crate) loaded: LoadedModel,
    pub(crate) sha256: String,
    pub(crate) bytes: u64,
    pub(crate) load: Duration,
    pub(crate) warm: Duration,
    /// Per-row cost alone and in a trial batch, for batched versions.
    pub(crate) batch_costs: Option<(Duration, Duration)>,
    /// What loading and warming it took in memory (see [`memory_taken`]).
    pub(crate) memory: u64,
}

/// This process's resident set, bytes (Linux; 0 elsewhere).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The memory a version takes, as placement balances by it: the resident
/// set's growth over its load and warm-up, and never less than the
/// artifact (its weights are held). Loads are serialised, but requests
/// running meanwhile also move the resident set: a measurement, not an
/// accounting.
fn memory_taken(before: u64, after: u64, artifact: u64) -> u64 {
    after.saturating_sub(before).max(artifact)
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Reads, verifies, prepares and warms `spec` on a blocking thread.
pub(crate) async fn prepare(
    backend: Arc<dyn Backend>,
    spec: &LoadSpec,
    inline_max: Duration,
) -> Result<Prepared, LoadFailure> {
    let expected = match &spec.sha256 {
        Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(s.to_ascii_lowercase())
        }
        Some(s) => return Err(LoadFailure::BadChecksum(s.clone())),
        None => None,
    };
    let source = spec.source.clone();
    let options = spec.options.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let (bytes, known) = match source {
            ArtifactSource::Path(path) => (
                Bytes::from(std::fs::read(&path).map_err(|e| LoadFailure::Read {
                    path: path.display().to_string(),
                    error: e.to_string(),
                })?),
                None,
            ),
            ArtifactSource::Bytes(bytes) => (bytes, None),
            ArtifactSource::Verified { bytes, sha256 } => (bytes, Some(sha256)),
        };
        let sha256 = known.unwrap_or_else(|| sha256_hex(&bytes));
        if let Some(expected) = expected
            && expected != sha256
        {
            return Err(LoadFailure::Integrity {
                expected,
                actual: sha256,
            });
        }
        let resident = resident_bytes();
        let mut loaded = LoadedModel::load(backend.as_ref(), &bytes, &options)?;
        let load = started.elapsed();
        let warm_started = Instant::now();
        loaded.warm_up()?;
        let warm = warm_started.elapsed();
        // Cheap models run small requests inline: measured, not assumed.
        let row_cost = loaded
            .measure_row_cost(inline_max)
            .map_err(|e| LoadFailure::Model(LoadError::WarmUp(e.to_string())))?;
        tracing::debug!(
            row_cost_us = row_cost.as_secs_f64() * 1e6,
            inline = !inline_max.is_zero() && row_cost <= inline_max,
            "measured a row's cost"
        );
        // Whether batching pays on this engine is measured, not assumed.
        let batch_costs = match loaded.batching() {
            Some(policy) if policy.max_rows > 1 => Some(
                loaded
                    .batch_costs(policy.max_rows.min(shoal_core::batch::TRIAL_ROWS))
                    .map_err(|e| LoadFailure::Model(LoadError::WarmUp(e.to_string())))?,
            ),
            _ => None,
        };
        if let Some((_, batched)) = batch_costs {
            loaded.set_batched_row_cost(batched);
        }
        let memory = memory_taken(resident, resident_bytes(), bytes.len() as u64);
        Ok(Prepared {
            memory,
            loaded,
            sha256,
            bytes: bytes.len() as u64,
            load,
            warm,
            batch_costs,
        })
    })
    .await
    .map_err(|e| LoadFailure::Internal(format!("load task failed: {e}")))?
}
