//! Backups of a control plane, and restores from them.
//!
//! A backup destination (a directory or `s3://bucket/prefix`) is an
//! artifact store — `chunks/` and `manifests/`, laid out exactly as the
//! control plane's own — plus one folder per backup:
//!
//! ```text
//! backups/ID/registry.json.zst   the registry at one revision (RegistryDump)
//! backups/ID/backup.json         BackupRecord, written last
//! ```
//!
//! [`create`] reads the registry in one transaction (so the snapshot is of
//! one revision, whatever deploys go on meanwhile), then copies the
//! manifests and the chunks the snapshot's versions need; chunks already at
//! the destination (from an earlier backup) are not copied again. Every
//! chunk is checked against its name on the way. A backup exists once its
//! `backup.json` is written; an interrupted one leaves only chunks, which
//! the next backup reuses.
//!
//! [`verify`] reads a backup back: the snapshot's checksum, every chunk,
//! every artifact's SHA-256. [`restore`] does the same while writing into
//! an empty registry and an artifact store, registry last, so a restored
//! registry never names an artifact that is not there. [`prune`] keeps the
//! newest N backups and deletes chunks no kept backup needs.
//!
//! Architecture invariant: knows stores (`RegistryStore`, `ArtifactStore`),
//! not HTTP; the control plane and the CLI drive it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{Read, Write};
use tokio::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::Digest;
use shoal_api::backup::{
    BACKUP_FORMAT, BackupCounts, BackupFile, BackupPhase, BackupProgress, BackupRecord,
};
use shoal_artifacts::{ArtifactError, ArtifactStore, ChunkId, ChunkRef, Manifest, chunk};
use shoal_registry::dump::RegistryDump;
use shoal_registry::{RegistryError, RegistryStore};

/// Chunks copied or read at once.
const PARALLEL: usize = 16;

/// Why a backup, verification or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The registry failed (or refused: a restore into a registry that has
    /// data).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// An artifact store failed.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The destination failed.
    #[error("backup destination: {0}")]
    Store(#[from] object_store::Error),
    /// No such backup, or none at all.
    #[error("{0}")]
    NotFound(String),
    /// A backup's content is not what it records.
    #[error("backup {id} is damaged: {what}")]
    Damaged {
        /// The backup.
        id: String,
        /// What is wrong.
        what: String,
    },
    /// A request that cannot be carried out.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, BackupError>;

/// Where a caller hears how far a long operation is.
pub type Progress<'a> = &'a (dyn Fn(BackupProgress) + Send + Sync);

/// A progress sink that drops everything.
pub fn quiet(_: BackupProgress) {}

/// A backup destination.
#[derive(Debug, Clone)]
pub struct Destination {
    url: String,
    store: ArtifactStore,
}

impl Destination {
    /// The destination at `url`: a directory (created if missing),
    /// `file:///dir`, or `s3://bucket/prefix` (configured from `AWS_*`).
    pub fn open(url: &str) -> Result<Destination> {
        if url.trim().is_empty() {
            return Err(BackupError::Invalid(
                "no backup destination: give a directory or s3://bucket/prefix".into(),
            ));
        }
        if !url.contains("://") {
            refuse_foreign_directory(std::path::Path::new(url))?;
        }
        Ok(Destination {
            url: url.to_owned(),
            store: ArtifactStore::from_url(url)?,
        })
    }

    /// Its URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn objects(&self) -> &std::sync::Arc<dyn ObjectStore> {
        self.store.objects()
    }

    async fn get(&self, path: &str) -> Result<Option<Bytes>> {
        match self.objects().get(&StorePath::from(path)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn put(&self, path: &str, bytes: Vec<u8>) -> Result<()> {
        self.objects()
            .put(&StorePath::from(path), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    async fn delete(&self, path: &str) -> Result<()> {
        match self.objects().delete(&StorePath::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// A backup never writes into a directory that holds something else: an
/// existing directory must be empty or already hold Shoal backups.
fn refuse_foreign_directory(dir: &std::path::Path) -> Result<()> {
    let Ok(mut entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    if entries.next().is_none() || dir.join("backups").is_dir() || dir.join("chunks").is_dir() {
        return Ok(());
    }
    Err(BackupError::Invalid(format!(
        "{} is not empty and holds no Shoal backup; give a new or empty directory",
        dir.display()
    )))
}

fn record_path(id: &str) -> String {
    format!("backups/{id}/backup.json")
}

fn registry_path(id: &str) -> String {
    format!("backups/{id}/registry.json.zst")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Takes a backup of `registry` and the artifacts its versions need from
/// `artifacts` into `dest`.
pub async fn create(
    registry: &dyn RegistryStore,
    artifacts: &ArtifactStore,
    dest: &Destination,
    progress: Progress<'_>,
) -> Result<BackupRecord> {
    let started = Instant::now();
    let created_at = shoal_api::now_millis();
    let dump = registry.dump().await?;
    let id = format!("{created_at:013}-r{}", dump.revision);

    // Manifests of every artifact the snapshot names, then the distinct
    // chunks they use.
    let wanted = dump.artifacts();
    let mut manifests = Vec::with_capacity(wanted.len());
    for sha256 in &wanted {
        let manifest = artifacts.get_manifest(sha256).await.map_err(|e| {
            BackupError::Invalid(format!(
                "the artifact store has no usable manifest for artifact {sha256}, which the \
                 registry names: {e}"
            ))
        })?;
        manifests.push(manifest);
    }
    let chunks = distinct_chunks(&manifests);
    let present = dest.store.chunk_ids().await?;
    let missing: Vec<ChunkRef> = chunks
        .values()
        .filter(|c| !present.contains(&c.id))
        .cloned()
        .collect();
    let total: u64 = missing.iter().map(|c| u64::from(c.stored)).sum();
    let done = std::sync::atomic::AtomicU64::new(0);
    progress(BackupProgress {
        phase: BackupPhase::Copying,
        done: 0,
        total,
    });
    let done = &done;
    let copied_chunks = missing.len() as u64;
    futures::stream::iter(missing)
        .map(|c| async move {
            let stored = artifacts.get_chunk(&c.id).await?;
            // Checked against its name before it is written: a chunk that
            // rotted in the origin fails the backup rather than hiding in it.
            dest.store.put_chunk(&c, stored).await?;
            let now = done.fetch_add(u64::from(c.stored), std::sync::atomic::Ordering::Relaxed)
                + u64::from(c.stored);
            progress(BackupProgress {
                phase: BackupPhase::Copying,
                done: now,
                total,
            });
            Ok::<_, BackupError>(())
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<()>()
        .await?;
    for manifest in &manifests {
        dest.store.put_manifest(manifest).await?;
    }

    let registry_bytes = compress(&serde_json::to_vec(&dump).map_err(|e| {
        BackupError::Invalid(format!("cannot serialise the registry snapshot: {e}"))
    })?)?;
    let registry_file = BackupFile {
        path: registry_path(&id),
        sha256: sha256_hex(&registry_bytes),
        bytes: registry_bytes.len() as u64,
    };
    dest.put(&registry_file.path, registry_bytes).await?;
    let record = BackupRecord {
        format: BACKUP_FORMAT,
        id: id.clone(),
        created_at,
        revision: dump.revision,
        shoal_version: env!("CARGO_PKG_VERSION").to_owned(),
        registry: registry_file,
        counts: counts(&dump),
        artifact_bytes: manifests.iter().map(|m| m.size).sum(),
        artifacts: wanted.into_iter().collect(),
        chunks: chunks.len() as u64,
        chunk_bytes: chunks.values().map(|c| u64::from(c.stored)).sum(),
        copied_chunks,
        copied_bytes: total,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    let json = serde_json::to_vec_pretty(&record)
        .map_err(|e| BackupError::Invalid(format!("cannot serialise the backup record: {e}")))?;
    dest.put(&record_path(&id), json).await?;
    tracing::info!(
        backup = %id,
        revision = record.revision,
        copied_chunks = record.copied_chunks,
        copied_bytes = record.copied_bytes,
        "backup complete"
    );
    Ok(record)
}

fn distinct_chunks(manifests: &[Manifest]) -> BTreeMap<String, ChunkRef> {
    manifests
        .iter()
        .flat_map(|m| m.chunks.iter())
        .map(|c| (c.id.to_string(), c.clone()))
        .collect()
}

fn counts(dump: &RegistryDump) -> BackupCounts {
    let n = |len: usize| len as u64;
    BackupCounts {
        models: n(dump.models.len()),
        versions: n(dump.versions.len()),
        deployments: n(dump.deployments.len()),
        replicas: n(dump.replicas.len()),
        tokens: n(dump.tokens.len()),
        audit: n(dump.audit.len()),
    }
}

fn compress(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = zstd::Encoder::new(Vec::new(), 3)
        .map_err(|e| BackupError::Invalid(format!("zstd: {e}")))?;
    encoder
        .write_all(bytes)
        .map_err(|e| BackupError::Invalid(format!("zstd: {e}")))?;
    encoder
        .finish()
        .map_err(|e| BackupError::Invalid(format!("zstd: {e}")))
}

/// Every complete backup at `dest`, oldest first.
pub async fn list(dest: &Destination) -> Result<Vec<BackupRecord>> {
    let listed: Vec<object_store::ObjectMeta> = dest
        .objects()
        .list(Some(&StorePath::from("backups")))
        .try_collect()
        .await?;
    let mut records = Vec::new();
    for meta in listed {
        if meta.location.filename() != Some("backup.json") {
            continue;
        }
        let Some(bytes) = dest.get(meta.location.as_ref()).await? else {
            continue;
        };
        match serde_json::from_slice::<BackupRecord>(&bytes) {
            Ok(record) => records.push(record),
            Err(e) => {
                tracing::warn!(file = %meta.location, error = %e, "unreadable backup record skipped")
            }
        }
    }
    records.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(records)
}

/// The backup `id`, or the newest when `None`, with its registry snapshot,
/// whose checksum and content are checked.
pub async fn open(dest: &Destination, id: Option<&str>) -> Result<(BackupRecord, RegistryDump)> {
    let record = match id {
        Some(id) => {
            let bytes = dest.get(&record_path(id)).await?.ok_or_else(|| {
                BackupError::NotFound(format!(
                    "no backup {id} at {}; `shoal backup list --at {}` shows what is there",
                    dest.url(),
                    dest.url()
                ))
            })?;
            serde_json::from_slice::<BackupRecord>(&bytes).map_err(|e| BackupError::Damaged {
                id: id.to_owned(),
                what: format!("backup.json is unreadable: {e}"),
            })?
        }
        None => list(dest)
            .await?
            .pop()
            .ok_or_else(|| BackupError::NotFound(format!("no backup at {}", dest.url())))?,
    };
    let damaged = |what: String| BackupError::Damaged {
        id: record.id.clone(),
        what,
    };
    if record.format != BACKUP_FORMAT {
        return Err(BackupError::Invalid(format!(
            "backup {} has format {}, this Shoal reads {BACKUP_FORMAT}",
            record.id, record.format
        )));
    }
    let bytes = dest
        .get(&record.registry.path)
        .await?
        .ok_or_else(|| damaged(format!("{} is missing", record.registry.path)))?;
    let actual = sha256_hex(&bytes);
    if actual != record.registry.sha256 {
        return Err(damaged(format!(
            "{} has SHA-256 {actual}, the record says {}",
            record.registry.path, record.registry.sha256
        )));
    }
    let mut json = Vec::new();
    zstd::Decoder::new(&bytes[..])
        .and_then(|mut d| d.read_to_end(&mut json))
        .map_err(|e| {
            damaged(format!(
                "{} cannot be decompressed: {e}",
                record.registry.path
            ))
        })?;
    let dump: RegistryDump = serde_json::from_slice(&json)
        .map_err(|e| damaged(format!("the registry snapshot is unreadable: {e}")))?;
    dump.validate()
        .map_err(|e| damaged(format!("the registry snapshot is invalid: {e}")))?;
    if dump.revision != record.revision
        || dump.artifacts() != record.artifacts.iter().cloned().collect::<BTreeSet<_>>()
    {
        return Err(damaged(
            "the registry snapshot does not match its record (revision or artifacts)".into(),
        ));
    }
    Ok((record, dump))
}

/// What [`verify`] and [`restore`] checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checked {
    /// The backup.
    pub id: String,
    /// Its revision.
    pub revision: u64,
    /// Artifacts whose SHA-256 was recomputed.
    pub artifacts: u64,
    /// Distinct chunks read and checked.
    pub chunks: u64,
    /// Bytes of artifacts hashed.
    pub bytes: u64,
    /// How long it took.
    pub duration_ms: u64,
}

/// Reads backup `id` (the newest when `None`) back and checks everything:
/// the snapshot's checksum and content, every manifest, every chunk
/// against its name, every artifact against its SHA-256 and size.
pub async fn verify(
    dest: &Destination,
    id: Option<&str>,
    progress: Progress<'_>,
) -> Result<Checked> {
    let (record, dump) = open(dest, id).await?;
    check_artifacts(&record, &dump, dest, None, BackupPhase::Verifying, progress).await
}

/// Walks every artifact of a backup in order, checking each chunk and the
/// artifact's SHA-256; with `into`, writes manifests and chunks there.
async fn check_artifacts(
    record: &BackupRecord,
    dump: &RegistryDump,
    dest: &Destination,
    into: Option<(&ArtifactStore, &std::sync::Mutex<Written>)>,
    phase: BackupPhase,
    progress: Progress<'_>,
) -> Result<Checked> {
    let started = Instant::now();
    let damaged = |what: String| BackupError::Damaged {
        id: record.id.clone(),
        what,
    };
    let mut manifests = Vec::new();
    for sha256 in &record.artifacts {
        let manifest = dest.store.get_manifest(sha256).await.map_err(|e| {
            damaged(format!(
                "the manifest of artifact {sha256} is missing or unreadable: {e}"
            ))
        })?;
        if &manifest.sha256 != sha256 {
            return Err(damaged(format!(
                "manifests/{sha256}.json describes {}",
                manifest.sha256
            )));
        }
        manifests.push(manifest);
    }
    let sizes: BTreeMap<&str, i64> = dump
        .versions
        .iter()
        .map(|v| (v.sha256.as_str(), v.size))
        .collect();
    let total: u64 = manifests.iter().map(|m| m.size).sum();
    let mut done = 0u64;
    let mut seen = HashSet::new();
    progress(BackupProgress { phase, done, total });
    for manifest in &manifests {
        if sizes.get(manifest.sha256.as_str()).copied() != i64::try_from(manifest.size).ok() {
            return Err(damaged(format!(
                "artifact {} is {} bytes, the registry says otherwise",
                manifest.sha256, manifest.size
            )));
        }
        let mut hasher = sha2::Sha256::new();
        let mut fetched = futures::stream::iter(manifest.chunks.clone())
            .map(|c| async move {
                let stored = dest.store.get_chunk(&c.id).await;
                (c, stored)
            })
            .buffered(PARALLEL);
        // Writes run beside the hashing, up to PARALLEL at a time.
        let mut writes = futures::stream::FuturesUnordered::new();
        let write = |c: ChunkRef, stored: Bytes| async move {
            let wrote = match into {
                Some((store, _)) => store.put_new_chunk(&c, stored).await?,
                None => false,
            };
            Ok::<_, BackupError>((c.id, wrote))
        };
        let record_write = |done: Option<Result<(ChunkId, bool)>>| -> Result<()> {
            if let Some(done) = done {
                let (id, wrote) = done?;
                if wrote && let Some((_, written)) = into {
                    lock(written).chunks.push(id);
                }
            }
            Ok(())
        };
        while let Some((c, stored)) = fetched.next().await {
            let c = &c;
            let stored = stored.map_err(|e| {
                damaged(format!(
                    "chunk {} of artifact {}: {e}",
                    c.id, manifest.sha256
                ))
            })?;
            let content = chunk::decode(&c.id, &stored, Some(c.size))
                .map_err(|e| damaged(format!("artifact {}: {e}", manifest.sha256)))?;
            hasher.update(&content);
            let first = seen.insert(c.id.clone());
            if first && into.is_some() {
                while writes.len() >= PARALLEL {
                    record_write(writes.next().await)?;
                }
                writes.push(write(c.clone(), stored));
            }
            done += u64::from(c.size);
            progress(BackupProgress { phase, done, total });
        }
        drop(fetched);
        while !writes.is_empty() {
            record_write(writes.next().await)?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != manifest.sha256 {
            return Err(damaged(format!(
                "artifact {} reassembles to SHA-256 {actual}",
                manifest.sha256
            )));
        }
        if let Some((store, written)) = into {
            store.put_manifest(manifest).await?;
            lock(written).manifests.push(manifest.sha256.clone());
        }
    }
    Ok(Checked {
        id: record.id.clone(),
        revision: record.revision,
        artifacts: manifests.len() as u64,
        chunks: seen.len() as u64,
        bytes: total,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// What a restore wrote into the artifact store, removed again if it fails.
#[derive(Debug, Default)]
struct Written {
    chunks: Vec<ChunkId>,
    manifests: Vec<String>,
}

fn lock(w: &std::sync::Mutex<Written>) -> std::sync::MutexGuard<'_, Written> {
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Rebuilds a control plane's stores from backup `id` (the newest when
/// `None`): every artifact into `artifacts`, checked chunk by chunk and by
/// SHA-256, then the registry snapshot into `registry`, which must be
/// empty. On failure what was written into `artifacts` is removed and the
/// registry is untouched.
pub async fn restore(
    dest: &Destination,
    id: Option<&str>,
    registry: &dyn RegistryStore,
    artifacts: &ArtifactStore,
    progress: Progress<'_>,
) -> Result<Checked> {
    let (record, dump) = open(dest, id).await?;
    let here = registry.dump().await?;
    if !(here.models.is_empty()
        && here.tokens.is_empty()
        && here.audit.is_empty()
        && here.revision == 0)
    {
        return Err(BackupError::Invalid(format!(
            "the registry to restore into is not empty ({} models, {} tokens, revision {}); \
             restore into an empty data directory or a new database",
            here.models.len(),
            here.tokens.len(),
            here.revision
        )));
    }
    let written = std::sync::Mutex::new(Written::default());
    let outcome = async {
        let checked = check_artifacts(
            &record,
            &dump,
            dest,
            Some((artifacts, &written)),
            BackupPhase::Restoring,
            progress,
        )
        .await?;
        registry.load_dump(&dump).await?;
        Ok::<_, BackupError>(checked)
    }
    .await;
    if outcome.is_err() {
        let written = std::mem::take(&mut *lock(&written));
        for sha256 in &written.manifests {
            let _ = artifacts.delete_manifest(sha256).await;
        }
        for id in &written.chunks {
            let _ = artifacts.delete_chunk(id).await;
        }
    }
    outcome
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    /// Backups deleted.
    pub backups: Vec<String>,
    /// Chunks no kept backup needed.
    pub chunks: u64,
    /// Manifests no kept backup needed.
    pub manifests: u64,
}

/// Keeps the newest `keep` backups at `dest` and deletes the others, then
/// every chunk and manifest no kept backup needs. Run it where no other
/// backup is being written to `dest`: a backup in progress may be relying
/// on a chunk an older backup brought.
pub async fn prune(dest: &Destination, keep: usize) -> Result<Pruned> {
    if keep == 0 {
        return Err(BackupError::Invalid(
            "keeping no backup would delete them all; keep at least 1".into(),
        ));
    }
    let mut records = list(dest).await?;
    let cut = records.len().saturating_sub(keep);
    let old: Vec<BackupRecord> = records.drain(..cut).collect();
    let mut pruned = Pruned::default();
    for record in &old {
        // The record first: from then on the backup does not exist.
        dest.delete(&record_path(&record.id)).await?;
        dest.delete(&record.registry.path).await?;
        pruned.backups.push(record.id.clone());
    }
    if old.is_empty() {
        return Ok(pruned);
    }
    let needed: BTreeSet<&String> = records.iter().flat_map(|r| r.artifacts.iter()).collect();
    let mut keep_chunks = HashSet::new();
    for sha256 in &needed {
        let manifest = dest.store.get_manifest(sha256).await?;
        keep_chunks.extend(manifest.chunks.into_iter().map(|c| c.id));
    }
    for sha256 in dest.store.manifest_ids().await? {
        if !needed.contains(&sha256) {
            dest.store.delete_manifest(&sha256).await?;
            pruned.manifests += 1;
        }
    }
    for id in dest.store.chunk_ids().await? {
        if !keep_chunks.contains(&id) {
            dest.store.delete_chunk(&id).await?;
            pruned.chunks += 1;
        }
    }
    Ok(pruned)
}
