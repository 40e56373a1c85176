//! The origin artifact store on `object_store`: local filesystem by
//! default, S3-compatible storage by URL.
//!
//! Layout: `chunks/<blake3>` (stored encoding) and `manifests/<sha256>.json`.
//! A chunk already present is not written again, so versions that share
//! tensors share storage.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::chunk::{self, ChunkId, ChunkRef, Manifest};
use crate::{ArtifactError, is_hex_digest};

/// Result of storing an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The manifest written.
    pub manifest: Manifest,
    /// Chunks that were new to the store.
    pub new_chunks: usize,
    /// Bytes written for new chunks.
    pub new_bytes: u64,
}

/// Content-addressed artifacts on an object store.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
}

fn chunk_path(id: &ChunkId) -> StorePath {
    StorePath::from(format!("chunks/{id}"))
}

fn manifest_path(sha256: &str) -> StorePath {
    StorePath::from(format!("manifests/{sha256}.json"))
}

impl ArtifactStore {
    /// A store on `store`.
    pub fn new(store: Arc<dyn ObjectStore>) -> ArtifactStore {
        ArtifactStore { store }
    }

    /// A store in a local directory (created if missing).
    pub fn local(dir: &Path) -> Result<ArtifactStore, ArtifactError> {
        std::fs::create_dir_all(dir).map_err(ArtifactError::io(format!(
            "cannot create artifact directory {}",
            dir.display()
        )))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
        Ok(ArtifactStore::new(Arc::new(fs)))
    }

    /// A store at `url`: a plain path, `file:///path`, or
    /// `s3://bucket/prefix`, configured for S3 from the usual `AWS_*`
    /// environment variables (`AWS_ENDPOINT` for S3-compatible servers such
    /// as MinIO, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint).
    pub fn from_url(url: &str) -> Result<ArtifactStore, ArtifactError> {
        ArtifactStore::from_url_opts(url, std::env::vars().filter(|(k, _)| k.starts_with("AWS_")))
    }

    /// A store at `url` with explicit backend options (object_store's
    /// configuration keys, e.g. `aws_endpoint`, `aws_access_key_id`;
    /// upper-case environment-style names work too). Unknown keys are
    /// ignored.
    pub fn from_url_opts(
        url: &str,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ArtifactStore, ArtifactError> {
        if !url.contains("://") {
            return ArtifactStore::local(Path::new(url));
        }
        let parsed = url
            .parse()
            .map_err(|e| ArtifactError::Invalid(format!("bad artifact store URL {url:?}: {e}")))?;
        let options = options
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v));
        let (store, prefix) = object_store::parse_url_opts(&parsed, options).map_err(|e| {
            ArtifactError::Invalid(format!(
                "cannot use artifact store {url:?}: {e} (supported: a directory, file:///dir, s3://bucket/prefix)"
            ))
        })?;
        let store: Arc<dyn ObjectStore> = Arc::from(store);
        if prefix.as_ref().is_empty() {
            Ok(ArtifactStore::new(store))
        } else {
            Ok(ArtifactStore::new(Arc::new(
                object_store::prefix::PrefixStore::new(store, prefix),
            )))
        }
    }

    /// Checks that the store can be read (the bucket exists, credentials
    /// work), so a misconfigured store fails at start-up rather than at the
    /// first push.
    pub async fn check(&self) -> Result<(), ArtifactError> {
        self.store
            .list_with_delimiter(Some(&StorePath::from("manifests")))
            .await?;
        Ok(())
    }

    /// Chunks the file at `path` and stores what the store lacks, then the
    /// manifest. Runs the CPU-bound chunking on a blocking thread.
    pub async fn put_file(&self, path: &Path) -> Result<Stored, ArtifactError> {
        let file = std::fs::File::open(path)
            .map_err(ArtifactError::io(format!("cannot open {}", path.display())))?;
        // Chunk and encode on a blocking thread; hand chunks to this task
        // through a bounded channel so memory stays flat for big files.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(ChunkId, u32, Bytes)>(16);
        let chunker = tokio::task::spawn_blocking(move || {
            chunk::chunk_stream(
                std::io::BufReader::with_capacity(1 << 20, file),
                |content| {
                    let id = ChunkId::of(content);
                    let stored = chunk::encode(content);
                    let size = u32::try_from(content.len()).unwrap_or(u32::MAX);
                    tx.blocking_send((id, size, stored))
                        .map_err(|_| ArtifactError::Invalid("artifact upload cancelled".into()))
                },
            )
        });
        let mut chunks = Vec::new();
        let (mut new_chunks, mut new_bytes) = (0usize, 0u64);
        while let Some((id, size, stored)) = rx.recv().await {
            let stored_len = u32::try_from(stored.len()).unwrap_or(u32::MAX);
            if !self.has_chunk(&id).await? {
                new_chunks += 1;
                new_bytes += stored.len() as u64;
                self.store
                    .put(&chunk_path(&id), PutPayload::from(stored))
                    .await?;
            }
            chunks.push(ChunkRef {
                id,
                size,
                stored: stored_len,
            });
        }
        let (sha256, size) = chunker
            .await
            .map_err(|e| ArtifactError::Invalid(format!("chunking failed: {e}")))??;
        let manifest = Manifest {
            sha256,
            size,
            chunks,
        };
        self.store
            .put(
                &manifest_path(&manifest.sha256),
                PutPayload::from(manifest.to_json()),
            )
            .await?;
        Ok(Stored {
            manifest,
            new_chunks,
            new_bytes,
        })
    }

    /// True when the store has chunk `id`.
    pub async fn has_chunk(&self, id: &ChunkId) -> Result<bool, ArtifactError> {
        match self.store.head(&chunk_path(id)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// A chunk in its stored encoding (not verified here; the receiver
    /// verifies, because that is where corruption matters).
    pub async fn get_chunk(&self, id: &ChunkId) -> Result<Bytes, ArtifactError> {
        match self.store.get(&chunk_path(id)).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => {
                Err(ArtifactError::NotFound(format!("chunk {id}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The manifest of artifact `sha256`.
    pub async fn get_manifest(&self, sha256: &str) -> Result<Manifest, ArtifactError> {
        if !is_hex_digest(sha256) {
            return Err(ArtifactError::Invalid(format!(
                "artifact id {sha256:?} is not a hex SHA-256"
            )));
        }
        match self.store.get(&manifest_path(sha256)).await {
            Ok(r) => Manifest::from_json(&r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => {
                Err(ArtifactError::NotFound(format!("artifact {sha256}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads and verifies a whole artifact from the store.
    pub async fn read_artifact(&self, sha256: &str) -> Result<Bytes, ArtifactError> {
        let manifest = self.get_manifest(sha256).await?;
        let mut out = Vec::with_capacity(usize::try_from(manifest.size).unwrap_or(0));
        for c in &manifest.chunks {
            let stored = self.get_chunk(&c.id).await?;
            chunk::decode_into(&c.id, &stored, Some(c.size), &mut out)?;
        }
        crate::cache::verify_sha256(&manifest.sha256, &out)?;
        Ok(Bytes::from(out))
    }

    /// Stores a chunk in its stored encoding after checking it is the
    /// content `chunk` names. Content-addressed: writing one the store has
    /// is harmless, so callers that know it is missing ask nothing first.
    pub async fn put_chunk(&self, chunk: &ChunkRef, stored: Bytes) -> Result<(), ArtifactError> {
        chunk::verify(&chunk.id, &stored, Some(chunk.size))?;
        self.store
            .put(&chunk_path(&chunk.id), PutPayload::from(stored))
            .await?;
        Ok(())
    }

    /// Like [`ArtifactStore::put_chunk`], but leaves a chunk the store has
    /// alone; `false` when it had it (so a caller undoing its writes never
    /// deletes what was there before).
    pub async fn put_new_chunk(
        &self,
        chunk: &ChunkRef,
        stored: Bytes,
    ) -> Result<bool, ArtifactError> {
        if self.has_chunk(&chunk.id).await? {
            return Ok(false);
        }
        self.put_chunk(chunk, stored).await?;
        Ok(true)
    }

    /// Stores a manifest (content-addressed: writing it twice is harmless).
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<(), ArtifactError> {
        self.store
            .put(
                &manifest_path(&manifest.sha256),
                PutPayload::from(manifest.to_json()),
            )
            .await?;
        Ok(())
    }

    /// The names of every chunk in the store (one listing).
    pub async fn chunk_ids(&self) -> Result<std::collections::HashSet<ChunkId>, ArtifactError> {
        use futures::TryStreamExt;
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&StorePath::from("chunks")))
            .try_collect()
            .await?;
        Ok(listed
            .iter()
            .filter_map(|meta| meta.location.filename())
            .filter_map(|name| ChunkId::parse(name).ok())
            .collect())
    }

    /// The artifacts (SHA-256) whose manifests are in the store.
    pub async fn manifest_ids(&self) -> Result<Vec<String>, ArtifactError> {
        use futures::TryStreamExt;
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&StorePath::from("manifests")))
            .try_collect()
            .await?;
        let mut ids: Vec<String> = listed
            .iter()
            .filter_map(|meta| meta.location.filename())
            .filter_map(|name| name.strip_suffix(".json"))
            .filter(|id| is_hex_digest(id))
            .map(str::to_owned)
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Deletes a chunk (absent is fine).
    pub async fn delete_chunk(&self, id: &ChunkId) -> Result<(), ArtifactError> {
        ignore_absent(self.store.delete(&chunk_path(id)).await)
    }

    /// Deletes a manifest (absent is fine).
    pub async fn delete_manifest(&self, sha256: &str) -> Result<(), ArtifactError> {
        ignore_absent(self.store.delete(&manifest_path(sha256)).await)
    }

    /// The object store underneath, for neighbours that keep their own
    /// objects beside the artifacts (backups keep `backups/…`).
    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
}

fn ignore_absent(result: object_store::Result<()>) -> Result<(), ArtifactError> {
    match result {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
