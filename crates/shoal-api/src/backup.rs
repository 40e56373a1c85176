//! Backups: what a backup records about itself, and what
//! `POST /api/v1/backups` streams while it takes one.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::UnixMillis;

/// The backup format this build writes and reads.
pub const BACKUP_FORMAT: u32 = 1;

/// A backup, as `backups/ID/backup.json` at its destination records it
/// (written last: a backup without it is incomplete and ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupRecord {
    /// [`BACKUP_FORMAT`] of the writer.
    pub format: u32,
    /// Sortable id: creation time in Unix milliseconds and the revision.
    pub id: String,
    /// When it was taken.
    pub created_at: UnixMillis,
    /// The fleet revision the registry snapshot is of.
    pub revision: u64,
    /// The Shoal version that took it.
    pub shoal_version: String,
    /// The registry snapshot file (zstd-compressed JSON), beside this one.
    pub registry: BackupFile,
    /// Rows in the snapshot.
    pub counts: BackupCounts,
    /// The artifacts (SHA-256) the snapshot's versions need; their
    /// manifests and chunks are at the destination.
    pub artifacts: Vec<String>,
    /// Sum of those artifacts' sizes.
    pub artifact_bytes: u64,
    /// Distinct chunks those artifacts use, and their stored size.
    pub chunks: u64,
    /// Stored bytes of those chunks.
    pub chunk_bytes: u64,
    /// Chunks this backup copied (the rest were at the destination from
    /// an earlier backup).
    pub copied_chunks: u64,
    /// Bytes this backup copied.
    pub copied_bytes: u64,
    /// How long it took.
    pub duration_ms: u64,
}

/// A file of a backup with its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackupFile {
    /// Path at the destination.
    pub path: String,
    /// SHA-256 of its bytes.
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
}

/// How many rows of each table a registry snapshot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackupCounts {
    /// Models.
    pub models: u64,
    /// Versions.
    pub versions: u64,
    /// Deployments (with rollouts in progress).
    pub deployments: u64,
    /// Registered replicas.
    pub replicas: u64,
    /// Tokens (hashes).
    pub tokens: u64,
    /// Audit log entries.
    pub audit: u64,
}

/// Body of `POST /api/v1/backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// Where to write, as the control plane sees it: a directory or
    /// `s3://bucket/prefix`.
    pub to: String,
}

/// Where a long backup, verification or restore is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackupProgress {
    /// What is being done: `copying`, `verifying` or `restoring`.
    pub phase: BackupPhase,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

/// The phases of [`BackupProgress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackupPhase {
    /// Copying chunks to the destination.
    Copying,
    /// Reading a backup back and checking every hash.
    Verifying,
    /// Writing a backup's artifacts into an artifact store.
    Restoring,
}

/// One line of the newline-delimited JSON `POST /api/v1/backups` answers:
/// progress lines, then the record or the error that ended it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackupEvent {
    /// Progress.
    Progress(BackupProgress),
    /// The backup is complete.
    Done(Box<BackupRecord>),
    /// The backup failed; nothing at the destination names it.
    Error(String),
}
