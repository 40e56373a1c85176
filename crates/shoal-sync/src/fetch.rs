//! Fetching artifacts chunk by chunk: cache, then the owning peer, then
//! the origin. Every chunk is verified before it is cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use shoal_api::fleet::Peer;
use shoal_artifacts::{ChunkCache, ChunkId, ChunkRef, Manifest};
use shoal_client::ControlClient;

use crate::owners::{fetch_order, owners};

/// Chunks fetched at once.
const PARALLEL_CHUNKS: usize = 8;

/// Memory kept for the chunks cached most recently (see [`Recent`]).
const RECENT_BYTES: usize = 16 << 20;

/// The chunks this replica cached most recently, in their stored encoding,
/// oldest first. An owner serves each chunk it fetches to every other
/// replica of its region within moments of caching it; keeping the newest
/// ones in memory spares a file open and read per peer request.
#[derive(Default)]
struct Recent {
    order: std::collections::VecDeque<ChunkId>,
    chunks: HashMap<ChunkId, Bytes>,
    bytes: usize,
}

impl Recent {
    fn insert(&mut self, id: ChunkId, stored: Bytes) {
        if self.chunks.contains_key(&id) || stored.len() > RECENT_BYTES {
            return;
        }
        self.bytes += stored.len();
        self.chunks.insert(id.clone(), stored);
        self.order.push_back(id);
        while self.bytes > RECENT_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.chunks.remove(&old) {
                self.bytes -= b.len();
            }
        }
    }

    fn get(&self, id: &ChunkId) -> Option<Bytes> {
        self.chunks.get(id).cloned()
    }
}

/// Why fetching failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum FetchError {
    /// The origin could not be reached or did not have it.
    #[error("{0}")]
    Origin(String),
    /// What arrived failed verification.
    #[error("{0}")]
    Corrupt(String),
    /// Local cache trouble.
    #[error("{0}")]
    Cache(String),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

/// Fetches into the cache; shared by reconcile and the peer endpoint.
pub(crate) struct Fetcher {
    pub(crate) cache: Arc<ChunkCache>,
    origin: ControlClient,
    self_id: String,
    inflight: Mutex<HashMap<ChunkId, Arc<tokio::sync::Mutex<()>>>>,
    peers: Mutex<HashMap<String, ControlClient>>,
    recent: Arc<Mutex<Recent>>,
    fetched: Family<SourceLabels, Counter>,
    served: Counter,
}

impl Fetcher {
    pub(crate) fn new(
        cache: Arc<ChunkCache>,
        origin: ControlClient,
        self_id: String,
        registry: &shoal_telemetry::MetricsRegistry,
    ) -> Fetcher {
        let fetched = Family::<SourceLabels, Counter>::default();
        let served = Counter::default();
        registry.register(
            "shoal_sync_fetched_bytes",
            "Artifact bytes this replica fetched, by source (origin, peer)",
            fetched.clone(),
        );
        registry.register(
            "shoal_sync_served_bytes",
            "Artifact bytes this replica served to peers",
            served.clone(),
        );
        Fetcher {
            cache,
            origin,
            self_id,
            inflight: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            recent: Arc::default(),
            fetched,
            served,
        }
    }

    fn peer_client(&self, peer: &Peer) -> ControlClient {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(peer.address.clone())
            .or_insert_with(|| {
                ControlClient::new(&format!("http://{}", peer.address), None)
                    .with_timeout(std::time::Duration::from_secs(30))
            })
            .clone()
    }

    fn slot(&self, id: &ChunkId) -> Arc<tokio::sync::Mutex<()>> {
        self.inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.clone())
            .or_default()
            .clone()
    }

    fn release(&self, id: &ChunkId) {
        let mut map = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(id).is_some_and(|slot| Arc::strong_count(slot) == 1) {
            map.remove(id);
        }
    }

    /// Verifies and caches a chunk that arrived from `source`, and counts
    /// it. Both happen on the blocking thread, so a chunk that lands in the
    /// cache is counted even if the fetch that wanted it was cancelled.
    async fn store(
        &self,
        id: &ChunkId,
        size: Option<u32>,
        bytes: Bytes,
        source: &'static str,
    ) -> Result<(), FetchError> {
        let cache = self.cache.clone();
        let id = id.clone();
        let fetched = self.fetched.clone();
        let recent = self.recent.clone();
        tokio::task::spawn_blocking(move || {
            cache.put_verified(&id, size, &bytes)?;
            fetched
                .get_or_create(&SourceLabels { source })
                .inc_by(bytes.len() as u64);
            recent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, bytes);
            Ok(())
        })
        .await
        .map_err(|e| FetchError::Cache(e.to_string()))?
        .map_err(|e| match e {
            shoal_artifacts::ArtifactError::CorruptChunk { .. }
            | shoal_artifacts::ArtifactError::BadEncoding { .. } => {
                FetchError::Corrupt(e.to_string())
            }
            other => FetchError::Cache(other.to_string()),
        })
    }

    /// Ensures chunk `id` is cached: from its owning peer when that is not
    /// us, else (or when the peer fails) from the origin. One fetch per
    /// chunk at a time, however many callers want it.
    pub(crate) async fn chunk(
        &self,
        id: &ChunkId,
        size: Option<u32>,
        owner: Option<&Peer>,
    ) -> Result<(), FetchError> {
        let slot = self.slot(id);
        let result = async {
            let _one = slot.lock().await;
            if self.cache.has(id) {
                return Ok(());
            }
            if let Some(peer) = owner.filter(|p| p.id != self.self_id) {
                match self.peer_client(peer).get_raw(&format!("/peer/chunks/{id}")).await {
                    Ok(bytes) => {
                        match self.store(id, size, bytes, "peer").await {
                            Ok(()) => return Ok(()),
                            Err(e) => tracing::warn!(peer = %peer.id, chunk = %id, error = %e, "peer sent a bad chunk; asking the origin"),
                        }
                    }
                    Err(e) => tracing::debug!(peer = %peer.id, chunk = %id, error = %e, "peer could not serve a chunk; asking the origin"),
                }
            }
            let bytes = self
                .origin
                .chunk(id.as_str())
                .await
                .map_err(|e| FetchError::Origin(format!("chunk {id}: {e}")))?;
            self.store(id, size, bytes, "origin").await
        }
        .await;
        drop(slot);
        self.release(id);
        result
    }

    /// The manifest of `sha256`, from the cache or the origin.
    async fn manifest(&self, sha256: &str) -> Result<Manifest, FetchError> {
        if let Some(m) = self.cache.get_manifest(sha256) {
            return Ok(m);
        }
        let bytes = self
            .origin
            .manifest(sha256)
            .await
            .map_err(|e| FetchError::Origin(format!("manifest of {sha256}: {e}")))?;
        let manifest =
            Manifest::from_json(&bytes).map_err(|e| FetchError::Corrupt(e.to_string()))?;
        if manifest.sha256 != sha256 {
            return Err(FetchError::Corrupt(format!(
                "the origin sent the manifest of {} when asked for {sha256}",
                manifest.sha256
            )));
        }
        self.cache
            .put_manifest(&manifest)
            .map_err(|e| FetchError::Cache(e.to_string()))?;
        Ok(manifest)
    }

    /// The verified bytes of artifact `sha256`, fetching what the cache lacks.
    pub(crate) async fn artifact(&self, sha256: &str, peers: &[Peer]) -> Result<Bytes, FetchError> {
        let manifest = self.manifest(sha256).await?;
        let owners = owners(&manifest.chunks, peers);
        let mut missing: Vec<ChunkRef> = self.cache.missing(&manifest);
        tracing::debug!(
            sha256,
            missing = missing.len(),
            chunks = manifest.chunks.len(),
            "fetching the chunks the cache lacks"
        );
        fetch_order(&mut missing, &owners);
        // Stop at the first failure (the origin is down, a chunk is
        // corrupt): what arrived stays cached, and the retry asks only for
        // what is still missing, rather than every remaining chunk failing
        // one by one against a dead link.
        futures::stream::iter(missing)
            .map(|c| {
                let owner = owners.get(&c.id).copied();
                async move { self.chunk(&c.id, Some(c.size), owner).await }
            })
            .buffer_unordered(PARALLEL_CHUNKS)
            .try_collect::<Vec<()>>()
            .await?;
        tracing::debug!(sha256, "every chunk cached; assembling");
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || cache.assemble(&manifest))
            .await
            .map_err(|e| FetchError::Cache(e.to_string()))?
            .map_err(|e| FetchError::Corrupt(e.to_string()))
    }

    /// For a peer: chunk `id` from the cache, fetched through from the
    /// origin when missing (this replica owns it).
    pub(crate) async fn serve(&self, id: &ChunkId) -> Result<Bytes, FetchError> {
        let recent = || {
            self.recent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(id)
        };
        let bytes = match recent() {
            Some(bytes) => bytes,
            None => {
                if !self.cache.has(id) {
                    self.chunk(id, None, None).await?;
                }
                match recent() {
                    Some(bytes) => bytes,
                    None => self.cache.get_stored(id).ok_or_else(|| {
                        FetchError::Cache(format!("chunk {id} vanished from the cache"))
                    })?,
                }
            }
        };
        self.served.inc_by(bytes.len() as u64);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_chunks_stay_within_their_memory_budget_newest_kept() {
        let mut recent = Recent::default();
        let chunk = Bytes::from(vec![7u8; RECENT_BYTES / 4]);
        let ids: Vec<ChunkId> = (0..6u8).map(|i| ChunkId::of(&[i])).collect();
        for id in &ids {
            recent.insert(id.clone(), chunk.clone());
            recent.insert(id.clone(), chunk.clone());
        }
        assert!(recent.bytes <= RECENT_BYTES);
        assert_eq!(recent.chunks.len(), 4);
        assert!(recent.get(&ids[0]).is_none() && recent.get(&ids[1]).is_none());
        assert_eq!(recent.get(&ids[5]), Some(chunk));
        recent.insert(ChunkId::of(b"huge"), Bytes::from(vec![0; RECENT_BYTES + 1]));
        assert_eq!(recent.chunks.len(), 4);
    }
}
