//! Models, versions and the audit log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::UnixMillis;

/// Where a version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VersionStatus {
    /// Pushed, not yet taking traffic.
    Registered,
    /// Taking a share of traffic in a rollout.
    Canary,
    /// The version serving the model.
    Production,
    /// Replaced or rolled back; kept for history and rollback.
    Deprecated,
}

impl VersionStatus {
    /// The status name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Registered => "registered",
            VersionStatus::Canary => "canary",
            VersionStatus::Production => "production",
            VersionStatus::Deprecated => "deprecated",
        }
    }

    /// Parses a status name.
    pub fn parse(s: &str) -> Option<VersionStatus> {
        [
            VersionStatus::Registered,
            VersionStatus::Canary,
            VersionStatus::Production,
            VersionStatus::Deprecated,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// One version of a model in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VersionRecord {
    /// Model name.
    pub model: String,
    /// Version (`1`, `2`, … unless given).
    pub version: String,
    /// SHA-256 of the artifact (hex); also its artifact id.
    pub sha256: String,
    /// Artifact size in bytes.
    pub size: u64,
    /// When it was registered.
    pub created_at: UnixMillis,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Offline metrics (e.g. accuracy).
    pub metrics: BTreeMap<String, f64>,
    /// The version it was derived from, if any.
    pub lineage: Option<String>,
    /// Life-cycle status.
    pub status: VersionStatus,
    /// True once it reached production.
    pub reached_production: bool,
    /// True if it was rolled back (never "last known good" again).
    pub rolled_back: bool,
    /// Input shape overrides replicas apply when loading it (input name to
    /// dimensions, -1 = dynamic), like a Triton model configuration.
    #[serde(default)]
    pub input_shapes: BTreeMap<String, Vec<i64>>,
    /// The largest size of each input dimension a request may use (input
    /// name to dimensions, -1 = the default bound of 4096).
    #[serde(default)]
    pub max_shapes: BTreeMap<String, Vec<i64>>,
    /// A stateful model's state: each state input and the output that
    /// feeds it at the next step of a sequence (`h` ← `hn`). Empty for a
    /// stateless model.
    #[serde(default)]
    pub state: BTreeMap<String, String>,
    /// How replicas batch its requests (none: each runs alone).
    #[serde(default)]
    pub batching: Option<Batching>,
    /// The engine replicas run it on: `tract`, `ort` (ONNX Runtime) or
    /// `auto` (both timed at load, the faster kept).
    #[serde(default)]
    #[schema(value_type = String, example = "tract")]
    pub engine: shoal_core::Engine,
}

/// Body of `POST /api/v1/models/{model}/versions`: register an uploaded
/// artifact as a new version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVersion {
    /// The artifact's SHA-256, as returned by the upload.
    pub sha256: String,
    /// Version name; the next number when absent.
    #[serde(default)]
    pub version: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Metrics.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Parent version.
    #[serde(default)]
    pub lineage: Option<String>,
    /// Input shape overrides (input name to dimensions, -1 = dynamic).
    #[serde(default)]
    pub input_shapes: BTreeMap<String, Vec<i64>>,
    /// Bounds on request shapes (input name to the largest size of each
    /// dimension, -1 = the default bound).
    #[serde(default)]
    pub max_shapes: BTreeMap<String, Vec<i64>>,
    /// State inputs and the outputs that feed them at the next step of a
    /// sequence (`{"h": "hn", "c": "cn"}`), for stateful models.
    #[serde(default)]
    pub state: BTreeMap<String, String>,
    /// Dynamic batching on replicas (checked against the model: every
    /// input and output needs a batch dimension first).
    #[serde(default)]
    pub batching: Option<Batching>,
    /// The engine replicas run it on: `tract` (default), `ort` (ONNX
    /// Runtime) or `auto` (both timed at load, the faster kept). The
    /// control plane prepares and warms it with that engine.
    #[serde(default)]
    #[schema(value_type = String, example = "tract")]
    pub engine: shoal_core::Engine,
    /// Check only that the artifact is an ONNX model, not that the
    /// engine can prepare and warm it up (for artifacts meant for an
    /// engine the control plane does not have).
    #[serde(default)]
    pub skip_engine_check: bool,
}

/// Body of `PUT /api/v1/models/{model}/versions/{version}/options`: how
/// replicas serve a version, set after its push (what `shoal deploy
/// --max-batch/--batch-delay/--engine` changes). Replaces both options:
/// no `batching` turns batching off. Replicas serving the version load it
/// again with the new options and swap it in without failing a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionOptions {
    /// Dynamic batching on replicas (checked against the model); none:
    /// each request runs alone.
    #[serde(default)]
    pub batching: Option<Batching>,
    /// The engine replicas run it on: `tract`, `ort` or `auto`.
    #[serde(default)]
    #[schema(value_type = String, example = "tract")]
    pub engine: shoal_core::Engine,
}

impl std::fmt::Display for VersionOptions {
    /// `engine ort, batches of up to 16 rows within 1000 µs`: for messages,
    /// tables and the audit log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "engine {}, ", self.engine)?;
        match &self.batching {
            Some(b) => write!(
                f,
                "batches of up to {} rows within {} µs",
                b.max_batch, b.delay_us
            ),
            None => f.write_str("no batching"),
        }
    }
}

impl VersionOptions {
    /// The options a version record carries now.
    pub fn of(record: &VersionRecord) -> VersionOptions {
        VersionOptions {
            batching: record.batching.clone(),
            engine: record.engine,
        }
    }
}

/// How replicas batch a version's requests, as Triton's dynamic batcher
/// does: requests arriving within `delay_us` of the oldest waiting one run
/// as one inference of up to `max_batch` rows, at once when the rows reach
/// `max_batch` or a `preferred` size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    /// Rows per batch at most (1–4096).
    pub max_batch: u32,
    /// Longest a request waits for others, µs (at most 1 s).
    pub delay_us: u64,
    /// Batch sizes that run at once when reached.
    #[serde(default)]
    pub preferred: Vec<u32>,
}

impl Batching {
    /// The checked policy.
    pub fn policy(&self) -> Result<shoal_core::batch::BatchPolicy, String> {
        shoal_core::batch::BatchPolicy::new(
            self.max_batch as usize,
            std::time::Duration::from_micros(self.delay_us),
            self.preferred.iter().map(|p| *p as usize).collect(),
        )
    }
}

/// A model and where its versions stand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelSummary {
    /// Model name.
    pub name: String,
    /// When the first version was registered.
    pub created_at: UnixMillis,
    /// Number of versions.
    pub versions: u64,
    /// Newest version.
    pub latest: Option<String>,
    /// The version in production, if any.
    pub production: Option<String>,
    /// Newest version that reached production and was not rolled back.
    pub last_known_good: Option<String>,
}

/// `GET /api/v1/models/{model}`: the model and all its versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelDetail {
    /// Summary.
    pub model: ModelSummary,
    /// Versions, oldest first.
    pub versions: Vec<VersionRecord>,
}

/// One entry of the append-only audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Position in the log.
    pub seq: i64,
    /// When.
    pub at: UnixMillis,
    /// Who (token subject, or `anonymous` when auth is off).
    pub actor: String,
    /// What, e.g. `version.create`, `deploy`, `rollback`.
    pub action: String,
    /// On what, e.g. `digits:2`.
    pub target: String,
    /// Why or how, free text.
    pub detail: String,
}

/// Response of an artifact upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UploadedArtifact {
    /// SHA-256 of the whole artifact (its id).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunks in the manifest.
    pub chunks: usize,
    /// Chunks that were new to the store (the rest were shared).
    pub new_chunks: usize,
    /// Bytes written to the store (after compression).
    pub stored_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_options_read_as_a_sentence() {
        let batched = VersionOptions {
            batching: Some(Batching {
                max_batch: 16,
                delay_us: 1000,
                preferred: vec![],
            }),
            engine: shoal_core::Engine::Ort,
        };
        assert_eq!(
            batched.to_string(),
            "engine ort, batches of up to 16 rows within 1000 µs"
        );
        assert_eq!(
            VersionOptions::default().to_string(),
            "engine tract, no batching"
        );
    }
}
