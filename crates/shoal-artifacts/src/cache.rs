//! A replica's local artifact cache: verified chunks and manifests on disk.
//!
//! Chunks are kept in their stored encoding, so a replica can hand them to
//! peers as it received them. A chunk is written only after its BLAKE3 is
//! checked (written to a temporary file, then renamed, so a crash never
//! leaves half a chunk under a valid name). An artifact is assembled only
//! when every chunk is present, and returned only when its SHA-256 matches.
//! Whatever is in the cache survives restarts: a replica can come back
//! serving without the control plane.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use sha2::Digest;

use crate::chunk::{self, ChunkId, ChunkRef, Manifest};
use crate::{ArtifactError, is_hex_digest};

/// Checks that `bytes` hash to `expected` (hex SHA-256).
pub fn verify_sha256(expected: &str, bytes: &[u8]) -> Result<(), ArtifactError> {
    let actual = hex::encode(sha2::Sha256::digest(bytes));
    if actual == expected {
        Ok(())
    } else {
        Err(ArtifactError::Integrity {
            expected: expected.to_owned(),
            actual,
        })
    }
}

/// Verified chunks and manifests in a directory.
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    tmp_seq: AtomicU64,
}

impl ChunkCache {
    /// Opens (creating) the cache in `dir`.
    pub fn open(dir: &Path) -> Result<ChunkCache, ArtifactError> {
        for sub in ["chunks", "manifests", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(ArtifactError::io(format!(
                "cannot create cache directory {}",
                dir.join(sub).display()
            )))?;
        }
        Ok(ChunkCache {
            dir: dir.to_owned(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.dir.join("chunks").join(id.as_str())
    }

    fn manifest_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("manifests").join(format!("{sha256}.json"))
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<(), ArtifactError> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{}-{seq}", std::process::id()));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(ArtifactError::io(format!(
                "cannot write {}",
                path.display()
            )))
    }

    /// True when chunk `id` is cached.
    pub fn has(&self, id: &ChunkId) -> bool {
        self.chunk_path(id).is_file()
    }

    /// A cached chunk in its stored encoding.
    pub fn get_stored(&self, id: &ChunkId) -> Option<Bytes> {
        std::fs::read(self.chunk_path(id)).ok().map(Bytes::from)
    }

    /// Verifies and caches a chunk received in its stored encoding.
    pub fn put_stored(&self, chunk: &ChunkRef, stored: &[u8]) -> Result<(), ArtifactError> {
        self.put_verified(&chunk.id, Some(chunk.size), stored)
    }

    /// Verifies and caches a chunk known only by id (`size` if known).
    pub fn put_verified(
        &self,
        id: &ChunkId,
        size: Option<u32>,
        stored: &[u8],
    ) -> Result<(), ArtifactError> {
        chunk::verify(id, stored, size)?;
        self.write_atomically(&self.chunk_path(id), stored)
    }

    /// Drops a chunk (found corrupt on disk).
    pub fn remove(&self, id: &ChunkId) {
        let _ = std::fs::remove_file(self.chunk_path(id));
    }

    /// Caches a manifest.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<(), ArtifactError> {
        self.write_atomically(&self.manifest_path(&manifest.sha256), &manifest.to_json())
    }

    /// A cached manifest.
    pub fn get_manifest(&self, sha256: &str) -> Option<Manifest> {
        if !is_hex_digest(sha256) {
            return None;
        }
        std::fs::read(self.manifest_path(sha256))
            .ok()
            .and_then(|b| Manifest::from_json(&b).ok())
    }

    /// Chunks of `manifest` not in the cache, without duplicates.
    pub fn missing(&self, manifest: &Manifest) -> Vec<ChunkRef> {
        let mut seen = std::collections::HashSet::new();
        manifest
            .chunks
            .iter()
            .filter(|c| seen.insert(c.id.clone()) && !self.has(&c.id))
            .cloned()
            .collect()
    }

    /// Assembles and verifies an artifact from cached chunks. A chunk found
    /// corrupt on disk is removed so the next attempt fetches it again.
    pub fn assemble(&self, manifest: &Manifest) -> Result<Bytes, ArtifactError> {
        let mut out = Vec::with_capacity(usize::try_from(manifest.size).unwrap_or(0));
        let mut stored = Vec::new();
        for c in &manifest.chunks {
            stored.clear();
            std::fs::File::open(self.chunk_path(&c.id))
                .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut stored))
                .map_err(|_| ArtifactError::NotFound(format!("cached chunk {}", c.id)))?;
            if let Err(e) = chunk::decode_into(&c.id, &stored, Some(c.size), &mut out) {
                self.remove(&c.id);
                return Err(e);
            }
        }
        verify_sha256(&manifest.sha256, &out)?;
        Ok(Bytes::from(out))
    }

    /// Bytes used by cached chunks.
    pub fn chunk_bytes(&self) -> u64 {
        std::fs::read_dir(self.dir.join("chunks"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_only_verified_chunks_and_assembles_verified_artifacts() {
        let dir = std::env::temp_dir().join(format!("shoal-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = ChunkCache::open(&dir).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut chunks = Vec::new();
        let mut stored = Vec::new();
        let (sha256, size) = chunk::chunk_stream(&data[..], |c| {
            let s = chunk::encode(c);
            chunks.push(ChunkRef {
                id: ChunkId::of(c),
                size: u32::try_from(c.len()).unwrap(),
                stored: u32::try_from(s.len()).unwrap(),
            });
            stored.push(s);
            Ok(())
        })
        .unwrap();
        let manifest = Manifest {
            sha256,
            size,
            chunks,
        };
        assert_eq!(cache.missing(&manifest).len(), manifest.chunks.len());
        assert!(cache.assemble(&manifest).is_err());

        // A tampered chunk is refused and not cached.
        let mut bad = stored[0].to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0x55;
        assert!(cache.put_stored(&manifest.chunks[0], &bad).is_err());
        assert!(!cache.has(&manifest.chunks[0].id));

        for (c, s) in manifest.chunks.iter().zip(&stored) {
            cache.put_stored(c, s).unwrap();
        }
        assert!(cache.missing(&manifest).is_empty());
        assert_eq!(cache.assemble(&manifest).unwrap().as_ref(), data.as_slice());
        cache.put_manifest(&manifest).unwrap();
        assert_eq!(cache.get_manifest(&manifest.sha256), Some(manifest.clone()));

        // A manifest lying about the whole-file hash is caught.
        let mut lying = manifest.clone();
        lying.sha256 = "0".repeat(64);
        assert!(matches!(
            cache.assemble(&lying),
            Err(ArtifactError::Integrity { .. })
        ));

        // Corruption on disk is caught at assembly, and the chunk dropped.
        let path = dir.join("chunks").join(manifest.chunks[1].id.as_str());
        let mut on_disk = std::fs::read(&path).unwrap();
        on_disk[1] ^= 1;
        std::fs::write(&path, on_disk).unwrap();
        assert!(cache.assemble(&manifest).is_err());
        assert_eq!(cache.missing(&manifest), vec![manifest.chunks[1].clone()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
