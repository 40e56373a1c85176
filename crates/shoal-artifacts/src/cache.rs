//! A replica's local artifact cache: verified chunks and manifests on disk.
//!
//! Chunks are kept in their stored encoding, so a replica can hand them to
//! peers as it received them, appended to pack files ([`crate::pack`]) and
//! found through an index held in memory, rebuilt from the packs' record
//! headers when the cache is opened. A chunk is written only after its
//! BLAKE3 is checked; a crash mid-append leaves a torn record at the end
//! of a pack, which the next open cuts off. An artifact is assembled only
//! when every chunk is present, and returned only when its SHA-256
//! matches. Whatever is in the cache survives restarts: a replica can come
//! back serving without the control plane.
//!
//! One process at a time: the cache holds an exclusive lock on its
//! directory while open.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bytes::Bytes;
use sha2::Digest;

use crate::chunk::{self, ChunkId, ChunkRef, Manifest};
use crate::pack::{self, Kind};
use crate::{ArtifactError, is_hex_digest};

/// A pack grows to about this size before the next one is started.
const PACK_BYTES: u64 = 1 << 30;

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

/// Where a chunk's stored bytes are.
#[derive(Debug, Clone, Copy)]
struct Location {
    pack: usize,
    offset: u64,
    len: u32,
}

/// The chunks in the packs, and their total stored size.
#[derive(Debug, Default)]
struct Index {
    chunks: HashMap<ChunkId, Location>,
    bytes: u64,
}

impl Index {
    fn apply(&mut self, header: pack::Header, location: Location) {
        let old = match header.kind {
            Kind::Chunk => {
                self.bytes += u64::from(location.len);
                self.chunks.insert(header.id, location)
            }
            Kind::Tombstone => self.chunks.remove(&header.id),
        };
        if let Some(old) = old {
            self.bytes -= u64::from(old.len);
        }
    }
}

/// The pack being appended to.
#[derive(Debug)]
struct Writer {
    /// Its place in [`ChunkCache::packs`].
    pack: usize,
    /// The number in its file name.
    number: usize,
    len: u64,
}

/// An artifact being put together from cached chunks, in order, with its
/// SHA-256 computed along the way.
#[derive(Debug)]
pub struct Assembly {
    manifest: Manifest,
    out: Vec<u8>,
    /// The first chunk not yet appended.
    next: usize,
    sha256: sha2::Sha256,
    /// Read buffer for one stored chunk.
    stored: Vec<u8>,
}

/// Verified chunks and manifests in a directory.
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    tmp_seq: AtomicU64,
    index: RwLock<Index>,
    /// Every pack, by number; the last is the one appended to.
    packs: RwLock<Vec<Arc<File>>>,
    writer: Mutex<Writer>,
    /// When to start the next pack.
    pack_bytes: u64,
    /// Held (locked) while the cache is open.
    _lock: File,
}

fn pack_name(n: usize) -> String {
    format!("{n:08}.pack")
}

impl ChunkCache {
    /// Opens (creating) the cache in `dir`: reads the record headers of
    /// every pack, and moves chunks a cache of an earlier Shoal kept one
    /// per file into a pack.
    pub fn open(dir: &Path) -> Result<ChunkCache, ArtifactError> {
        Self::open_with(dir, PACK_BYTES)
    }

    fn open_with(dir: &Path, pack_bytes: u64) -> Result<ChunkCache, ArtifactError> {
        for sub in ["packs", "manifests", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(ArtifactError::io(format!(
                "cannot create cache directory {}",
                dir.join(sub).display()
            )))?;
        }
        let lock_path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(ArtifactError::io(format!(
                "cannot open {}",
                lock_path.display()
            )))?;
        lock.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => ArtifactError::Io {
                context: format!(
                    "the artifact cache in {} is in use by another process \
                     (do two replicas share a --data-dir? give each its own)",
                    dir.display()
                ),
                source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
            },
            std::fs::TryLockError::Error(source) => ArtifactError::Io {
                context: format!("cannot lock {}", lock_path.display()),
                source,
            },
        })?;

        let mut numbers: Vec<usize> = std::fs::read_dir(dir.join("packs"))
            .map_err(ArtifactError::io(format!(
                "cannot list {}",
                dir.join("packs").display()
            )))?
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".pack")?
                    .parse()
                    .ok()
            })
            .collect();
        numbers.sort_unstable();
        let mut index = Index::default();
        let mut packs = Vec::with_capacity(numbers.len() + 1);
        let mut whole = 0;
        for (i, n) in numbers.iter().enumerate() {
            let path = dir.join("packs").join(pack_name(*n));
            let file = File::options()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(ArtifactError::io(format!("cannot open {}", path.display())))?;
            let file_len = file
                .metadata()
                .map_err(ArtifactError::io(format!("cannot stat {}", path.display())))?
                .len();
            whole = pack::scan(&file, file_len, |header, offset| {
                let len = header.len;
                index.apply(
                    header,
                    Location {
                        pack: i,
                        offset,
                        len,
                    },
                );
            })
            .map_err(ArtifactError::io(format!("cannot read {}", path.display())))?;
            if whole < file_len {
                tracing::warn!(
                    pack = %path.display(),
                    whole,
                    file_len,
                    "a pack ends in a torn record (a crash while appending); reading stops there"
                );
            }
            packs.push(Arc::new(file));
        }
        // Append to the last pack, cut back to its whole records, unless
        // it is full or there is none.
        let writer = if packs.is_empty() || whole >= pack_bytes {
            let next = numbers.last().map_or(0, |n| n + 1);
            packs.push(Arc::new(Self::create_pack(dir, next)?));
            Writer {
                pack: packs.len() - 1,
                number: next,
                len: 0,
            }
        } else {
            let last = packs.len() - 1;
            packs[last]
                .set_len(whole)
                .map_err(ArtifactError::io("cannot cut a torn record off a pack"))?;
            Writer {
                pack: last,
                number: numbers[last],
                len: whole,
            }
        };
        let cache = ChunkCache {
            dir: dir.to_owned(),
            tmp_seq: AtomicU64::new(0),
            index: RwLock::new(index),
            packs: RwLock::new(packs),
            writer: Mutex::new(writer),
            pack_bytes,
            _lock: lock,
        };
        cache.import_chunk_files()?;
        Ok(cache)
    }

    fn create_pack(dir: &Path, n: usize) -> Result<File, ArtifactError> {
        let path = dir.join("packs").join(pack_name(n));
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(ArtifactError::io(format!(
                "cannot create {}",
                path.display()
            )))
    }

    /// Caches of earlier versions kept a file per chunk under `chunks/`:
    /// append them to a pack, then remove the directory. They were
    /// verified when written, and are verified again at assembly.
    fn import_chunk_files(&self) -> Result<(), ArtifactError> {
        let old = self.dir.join("chunks");
        let Ok(entries) = std::fs::read_dir(&old) else {
            return Ok(());
        };
        let mut moved = 0usize;
        for entry in entries.filter_map(Result::ok) {
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| ChunkId::parse(n).ok())
            else {
                continue;
            };
            if let Ok(stored) = std::fs::read(entry.path())
                && !self.has(&id)
            {
                self.append(Kind::Chunk, &id, &stored)?;
                moved += 1;
            }
        }
        std::fs::remove_dir_all(&old).map_err(ArtifactError::io(format!(
            "cannot remove {} after moving its chunks into a pack",
            old.display()
        )))?;
        tracing::info!(
            chunks = moved,
            "moved cached chunks from one file each into a pack"
        );
        Ok(())
    }

    /// Appends a record to the current pack, starting a new pack when it
    /// is full, and indexes it once it is written.
    fn append(&self, kind: Kind, id: &ChunkId, data: &[u8]) -> Result<(), ArtifactError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ArtifactError::Invalid(format!("chunk {id} is over 4 GiB")))?;
        let header = pack::encode_header(kind, id, len);
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let file = self.packs.read().unwrap_or_else(PoisonError::into_inner)[writer.pack].clone();
        let offset = writer.len + pack::HEADER as u64;
        // The writer's length moves only once both writes are done, so a
        // failed write (a full disk) is overwritten by the next record.
        file.write_all_at(&header, writer.len)
            .and_then(|()| file.write_all_at(data, offset))
            .map_err(ArtifactError::io(format!(
                "cannot write to the artifact cache in {}",
                self.dir.display()
            )))?;
        writer.len = offset + u64::from(len);
        let location = Location {
            pack: writer.pack,
            offset,
            len,
        };
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(
                pack::Header {
                    kind,
                    id: id.clone(),
                    len,
                },
                location,
            );
        if writer.len >= self.pack_bytes {
            let number = writer.number + 1;
            let file = Arc::new(Self::create_pack(&self.dir, number)?);
            let mut packs = self.packs.write().unwrap_or_else(PoisonError::into_inner);
            packs.push(file);
            *writer = Writer {
                pack: packs.len() - 1,
                number,
                len: 0,
            };
        }
        Ok(())
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

    fn location(&self, id: &ChunkId) -> Option<Location> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .chunks
            .get(id)
            .copied()
    }

    /// Reads the stored bytes at `at` into `buf`.
    fn read_into(&self, at: Location, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let file = self.packs.read().unwrap_or_else(PoisonError::into_inner)[at.pack].clone();
        buf.resize(at.len as usize, 0);
        file.read_exact_at(buf, at.offset)
    }

    /// True when chunk `id` is cached.
    pub fn has(&self, id: &ChunkId) -> bool {
        self.location(id).is_some()
    }

    /// A cached chunk in its stored encoding; `None` when it is not
    /// cached. A failed read is an error, not a missing chunk.
    pub fn get_stored(&self, id: &ChunkId) -> Result<Option<Bytes>, ArtifactError> {
        let Some(at) = self.location(id) else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        self.read_into(at, &mut buf)
            .map_err(ArtifactError::io(format!("cannot read cached chunk {id}")))?;
        Ok(Some(Bytes::from(buf)))
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
        if self.has(id) {
            return Ok(());
        }
        self.append(Kind::Chunk, id, stored)
    }

    /// Drops a chunk (found corrupt on disk).
    pub fn remove(&self, id: &ChunkId) {
        if self.has(id)
            && let Err(e) = self.append(Kind::Tombstone, id, &[])
        {
            tracing::warn!(chunk = %id, error = %e, "cannot record that a cached chunk is corrupt");
        }
    }

    /// Caches a manifest.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<(), ArtifactError> {
        self.write_atomically(&self.manifest_path(&manifest.sha256), &manifest.to_json())
    }

    /// A cached manifest; `None` when it is not cached (or its file is
    /// damaged: fetched and written again). A failed read is an error.
    pub fn get_manifest(&self, sha256: &str) -> Result<Option<Manifest>, ArtifactError> {
        if !is_hex_digest(sha256) {
            return Ok(None);
        }
        let path = self.manifest_path(sha256);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ArtifactError::io(format!("cannot read {}", path.display()))(e)),
        };
        match Manifest::from_json(&bytes) {
            Ok(manifest) => Ok(Some(manifest)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "a cached manifest is damaged; fetching it again");
                Ok(None)
            }
        }
    }

    /// Chunks of `manifest` not in the cache, without duplicates.
    pub fn missing(&self, manifest: &Manifest) -> Vec<ChunkRef> {
        let mut seen = std::collections::HashSet::new();
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        manifest
            .chunks
            .iter()
            .filter(|c| seen.insert(&c.id) && !index.chunks.contains_key(&c.id))
            .cloned()
            .collect()
    }

    /// Starts putting together the artifact of `manifest`; see
    /// [`ChunkCache::advance`].
    pub fn assembly(&self, manifest: Manifest) -> Assembly {
        Assembly {
            out: Vec::with_capacity(usize::try_from(manifest.size).unwrap_or(0)),
            manifest,
            next: 0,
            sha256: sha2::Sha256::new(),
            stored: Vec::new(),
        }
    }

    /// Appends to `assembly` every chunk from where it stands that is
    /// cached, in order, hashing as it goes: called while chunks arrive,
    /// it leaves little to do once the last one is in. A chunk found
    /// corrupt on disk is removed so the next attempt fetches it again.
    pub fn advance(&self, assembly: &mut Assembly) -> Result<(), ArtifactError> {
        while let Some(c) = assembly.manifest.chunks.get(assembly.next) {
            let Some(at) = self.location(&c.id) else {
                return Ok(());
            };
            self.read_into(at, &mut assembly.stored)
                .map_err(ArtifactError::io(format!(
                    "cannot read cached chunk {}",
                    c.id
                )))?;
            let start = assembly.out.len();
            if let Err(e) =
                chunk::decode_into(&c.id, &assembly.stored, Some(c.size), &mut assembly.out)
            {
                self.remove(&c.id);
                return Err(e);
            }
            assembly.sha256.update(&assembly.out[start..]);
            assembly.next += 1;
        }
        Ok(())
    }

    /// Completes `assembly` and returns the artifact if its SHA-256 is the
    /// manifest's.
    pub fn finish(&self, mut assembly: Assembly) -> Result<Bytes, ArtifactError> {
        self.advance(&mut assembly)?;
        if let Some(c) = assembly.manifest.chunks.get(assembly.next) {
            return Err(ArtifactError::NotFound(format!("cached chunk {}", c.id)));
        }
        let actual = hex::encode(assembly.sha256.finalize());
        if actual != assembly.manifest.sha256 {
            return Err(ArtifactError::Integrity {
                expected: assembly.manifest.sha256,
                actual,
            });
        }
        Ok(Bytes::from(assembly.out))
    }

    /// Assembles and verifies an artifact from cached chunks, all at once.
    pub fn assemble(&self, manifest: &Manifest) -> Result<Bytes, ArtifactError> {
        self.finish(self.assembly(manifest.clone()))
    }

    /// Bytes used by cached chunks (as stored).
    pub fn chunk_bytes(&self) -> u64 {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes
    }
}

/// The cache as async code uses it: what only consults the in-memory index
/// (`has`, `missing`) answers at once, and everything that touches the disk
/// runs on tokio's blocking pool, so no caller decides that for itself and
/// no runtime thread waits on a disk. Clones share one cache.
#[derive(Debug, Clone)]
pub struct AsyncCache(Arc<ChunkCache>);

impl AsyncCache {
    /// Opens (creating) the cache in `dir`, off the runtime.
    pub async fn open(dir: &Path) -> Result<AsyncCache, ArtifactError> {
        let dir = dir.to_owned();
        Self::blocking_task(move || ChunkCache::open(&dir))
            .await
            .map(|cache| AsyncCache(Arc::new(cache)))
    }

    async fn blocking_task<R: Send + 'static>(
        f: impl FnOnce() -> Result<R, ArtifactError> + Send + 'static,
    ) -> Result<R, ArtifactError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ArtifactError::io("a cache task failed")(std::io::Error::other(e)))?
    }

    /// Runs `f` with the cache on the blocking pool. It runs to the end even
    /// if the caller stops waiting, so work done together with a write
    /// (counting what was stored) happens exactly when the write does.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&ChunkCache) -> Result<R, ArtifactError> + Send + 'static,
    ) -> Result<R, ArtifactError> {
        let cache = self.0.clone();
        Self::blocking_task(move || f(&cache)).await
    }

    /// True when chunk `id` is cached.
    pub fn has(&self, id: &ChunkId) -> bool {
        self.0.has(id)
    }

    /// Chunks of `manifest` not in the cache, without duplicates.
    pub fn missing(&self, manifest: &Manifest) -> Vec<ChunkRef> {
        self.0.missing(manifest)
    }

    /// Bytes used by cached chunks (as stored).
    pub fn chunk_bytes(&self) -> u64 {
        self.0.chunk_bytes()
    }

    /// Starts putting an artifact together; see [`AsyncCache::advance`].
    pub fn assembly(&self, manifest: Manifest) -> Assembly {
        self.0.assembly(manifest)
    }

    /// A cached chunk in its stored encoding ([`ChunkCache::get_stored`]).
    pub async fn get_stored(&self, id: &ChunkId) -> Result<Option<Bytes>, ArtifactError> {
        let id = id.clone();
        self.run(move |c| c.get_stored(&id)).await
    }

    /// Verifies and caches a chunk ([`ChunkCache::put_verified`]).
    pub async fn put_verified(
        &self,
        id: &ChunkId,
        size: Option<u32>,
        stored: Bytes,
    ) -> Result<(), ArtifactError> {
        let id = id.clone();
        self.run(move |c| c.put_verified(&id, size, &stored)).await
    }

    /// A cached manifest ([`ChunkCache::get_manifest`]).
    pub async fn get_manifest(&self, sha256: &str) -> Result<Option<Manifest>, ArtifactError> {
        let sha256 = sha256.to_owned();
        self.run(move |c| c.get_manifest(&sha256)).await
    }

    /// Caches a manifest.
    pub async fn put_manifest(&self, manifest: Manifest) -> Result<(), ArtifactError> {
        self.run(move |c| c.put_manifest(&manifest)).await
    }

    /// Appends every cached chunk from where `assembly` stands
    /// ([`ChunkCache::advance`]) and hands it back.
    pub async fn advance(&self, mut assembly: Assembly) -> Result<Assembly, ArtifactError> {
        self.run(move |c| c.advance(&mut assembly).map(|()| assembly))
            .await
    }

    /// Completes `assembly` ([`ChunkCache::finish`]).
    pub async fn finish(&self, assembly: Assembly) -> Result<Bytes, ArtifactError> {
        self.run(move |c| c.finish(assembly)).await
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
        assert_eq!(
            cache.get_manifest(&manifest.sha256).unwrap(),
            Some(manifest.clone())
        );

        // A manifest lying about the whole-file hash is caught.
        let mut lying = manifest.clone();
        lying.sha256 = "0".repeat(64);
        assert!(matches!(
            cache.assemble(&lying),
            Err(ArtifactError::Integrity { .. })
        ));

        // Corruption on disk is caught at assembly, and the chunk dropped.
        corrupt_on_disk(&cache, &dir, &manifest.chunks[1].id);
        assert!(cache.assemble(&manifest).is_err());
        assert_eq!(cache.missing(&manifest), vec![manifest.chunks[1].clone()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_async_face_keeps_disk_errors_as_errors() {
        let dir = temp_dir("async");
        let cache = AsyncCache::open(&dir).await.unwrap();
        let (c, stored) = some_chunks(1, 4096).pop().unwrap();
        assert_eq!(cache.get_stored(&c.id).await.unwrap(), None);
        cache
            .put_verified(&c.id, Some(c.size), Bytes::from(stored.clone()))
            .await
            .unwrap();
        assert!(cache.has(&c.id));
        assert_eq!(cache.get_stored(&c.id).await.unwrap().unwrap(), stored);
        // The pack cut short under the cache: a read error, not "vanished".
        let at = cache.0.location(&c.id).unwrap();
        let pack = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("packs").join(pack_name(at.pack)))
            .unwrap();
        pack.set_len(at.offset).unwrap();
        let err = cache.get_stored(&c.id).await.unwrap_err();
        assert!(
            err.to_string().starts_with("cannot read cached chunk"),
            "{err}"
        );
        // A manifest that cannot be read is an error; one never cached or
        // damaged is not there.
        let sha = "ab".repeat(32);
        assert_eq!(cache.get_manifest(&sha).await.unwrap(), None);
        std::fs::write(
            dir.join("manifests").join(format!("{sha}.json")),
            b"{not json",
        )
        .unwrap();
        assert_eq!(cache.get_manifest(&sha).await.unwrap(), None);
        std::fs::remove_file(dir.join("manifests").join(format!("{sha}.json"))).unwrap();
        std::fs::create_dir(dir.join("manifests").join(format!("{sha}.json"))).unwrap();
        let err = cache.get_manifest(&sha).await.unwrap_err();
        assert!(err.to_string().starts_with("cannot read"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Flips a byte of chunk `id`'s stored bytes in its pack.
    fn corrupt_on_disk(cache: &ChunkCache, dir: &Path, id: &ChunkId) {
        let at = cache.location(id).unwrap();
        let path = dir.join("packs").join(pack_name(at.pack));
        let mut on_disk = std::fs::read(&path).unwrap();
        on_disk[usize::try_from(at.offset).unwrap() + 1] ^= 1;
        std::fs::write(&path, on_disk).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// `n` distinct stored chunks of about `len` bytes.
    fn some_chunks(n: usize, len: usize) -> Vec<(ChunkRef, Vec<u8>)> {
        (0..n)
            .map(|i| {
                // Random-looking, so zstd leaves it as it is.
                let mut content = vec![0u8; len];
                blake3::Hasher::new()
                    .update(&i.to_le_bytes())
                    .finalize_xof()
                    .fill(&mut content);
                let stored = chunk::encode(&content);
                let r = ChunkRef {
                    id: ChunkId::of(&content),
                    size: u32::try_from(content.len()).unwrap(),
                    stored: u32::try_from(stored.len()).unwrap(),
                };
                (r, stored.to_vec())
            })
            .collect()
    }

    #[test]
    fn chunks_and_removals_survive_reopening_and_a_torn_tail_is_cut_off() {
        let dir = temp_dir("reopen");
        let chunks = some_chunks(5, 20_000);
        {
            let cache = ChunkCache::open(&dir).unwrap();
            for (c, s) in &chunks[..4] {
                cache.put_stored(c, s).unwrap();
            }
            cache.remove(&chunks[1].0.id);
        }
        // A crash mid-append: half of a fifth record at the end.
        let pack = dir.join("packs").join(pack_name(0));
        let whole = std::fs::metadata(&pack).unwrap().len();
        let mut torn =
            pack::encode_header(Kind::Chunk, &chunks[4].0.id, chunks[4].0.stored).to_vec();
        torn.extend_from_slice(&chunks[4].1[..100]);
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes.extend_from_slice(&torn);
        std::fs::write(&pack, bytes).unwrap();

        let cache = ChunkCache::open(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&pack).unwrap().len(),
            whole,
            "torn tail cut off"
        );
        for (i, (c, s)) in chunks.iter().enumerate() {
            assert_eq!(cache.has(&c.id), i == 0 || i == 2 || i == 3, "chunk {i}");
            if cache.has(&c.id) {
                assert_eq!(cache.get_stored(&c.id).unwrap().unwrap(), s.as_slice());
            }
        }
        let live: u64 = [0, 2, 3]
            .iter()
            .map(|&i| u64::from(chunks[i].0.stored))
            .sum();
        assert_eq!(cache.chunk_bytes(), live);
        // Appending goes on after the last whole record, and is found
        // again on the next open.
        cache.put_stored(&chunks[4].0, &chunks[4].1).unwrap();
        cache.put_stored(&chunks[1].0, &chunks[1].1).unwrap();
        drop(cache);
        let cache = ChunkCache::open(&dir).unwrap();
        for (c, s) in &chunks {
            assert_eq!(cache.get_stored(&c.id).unwrap().unwrap(), s.as_slice());
        }
        drop(cache);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_assembly_advances_as_chunks_arrive_in_any_order() {
        let dir = temp_dir("assembly");
        let cache = ChunkCache::open(&dir).unwrap();
        let chunks = some_chunks(4, 3_000);
        let mut content = Vec::new();
        for (c, s) in &chunks {
            chunk::decode_into(&c.id, s, Some(c.size), &mut content).unwrap();
        }
        let manifest = Manifest {
            sha256: hex::encode(sha2::Sha256::digest(&content)),
            size: content.len() as u64,
            chunks: chunks.iter().map(|(c, _)| c.clone()).collect(),
        };
        let mut assembly = cache.assembly(manifest.clone());
        for i in [2, 0, 3] {
            cache.put_stored(&chunks[i].0, &chunks[i].1).unwrap();
            cache.advance(&mut assembly).unwrap();
        }
        // Chunk 1 is missing: only chunk 0 could be appended so far.
        assert_eq!(assembly.next, 1);
        let missing = cache.finish(cache.assembly(manifest.clone())).unwrap_err();
        assert!(matches!(missing, ArtifactError::NotFound(_)), "{missing}");
        cache.put_stored(&chunks[1].0, &chunks[1].1).unwrap();
        cache.advance(&mut assembly).unwrap();
        assert_eq!(assembly.next, 4);
        assert_eq!(cache.finish(assembly).unwrap(), content);
        drop(cache);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn full_packs_give_way_to_new_ones() {
        let dir = temp_dir("rotate");
        let chunks = some_chunks(6, 10_000);
        {
            let cache = ChunkCache::open_with(&dir, 25_000).unwrap();
            for (c, s) in &chunks {
                cache.put_stored(c, s).unwrap();
            }
        }
        let packs = std::fs::read_dir(dir.join("packs")).unwrap().count();
        assert!(packs >= 3, "{packs} packs");
        let cache = ChunkCache::open_with(&dir, 25_000).unwrap();
        for (c, s) in &chunks {
            assert_eq!(cache.get_stored(&c.id).unwrap().unwrap(), s.as_slice());
        }
        drop(cache);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_process_at_a_time() {
        let dir = temp_dir("lock");
        let cache = ChunkCache::open(&dir).unwrap();
        let err = ChunkCache::open(&dir).unwrap_err().to_string();
        assert!(err.contains("in use by another process"), "{err}");
        drop(cache);
        ChunkCache::open(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chunks_cached_one_file_each_move_into_a_pack() {
        let dir = temp_dir("import");
        let chunks = some_chunks(3, 5_000);
        std::fs::create_dir_all(dir.join("chunks")).unwrap();
        for (c, s) in &chunks {
            std::fs::write(dir.join("chunks").join(c.id.as_str()), s).unwrap();
        }
        std::fs::write(dir.join("chunks").join("not-a-chunk"), b"x").unwrap();
        let cache = ChunkCache::open(&dir).unwrap();
        assert!(!dir.join("chunks").exists());
        for (c, s) in &chunks {
            assert_eq!(cache.get_stored(&c.id).unwrap().unwrap(), s.as_slice());
        }
        drop(cache);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
