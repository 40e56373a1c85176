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

/// Chunks fetched at once.
const PARALLEL_CHUNKS: usize = 8;

/// The peer responsible for fetching `chunk` from the origin: rendezvous
/// (highest-random-weight) hashing over the region's replicas, so every
/// replica agrees without talking, and a replica joining or leaving moves
/// only its own share of chunks.
pub fn owner<'a>(chunk: &ChunkId, peers: &'a [Peer]) -> Option<&'a Peer> {
    peers.iter().max_by_key(|p| rank(&p.id, chunk))
}

/// Orders the chunks a replica still needs so that consecutive chunks have
/// different owners: the first chunk of each owner, then the second of
/// each, and so on. Every replica computes the same order, so a region
/// moves through the artifact together (each chunk leaves the origin once,
/// to its owner, just as its peers ask for it), and any window of chunks in
/// flight spreads over every owner's link instead of queueing on whichever
/// owner happens to hold a run of neighbouring chunks.
pub(crate) fn fetch_order(chunks: &mut [ChunkRef], peers: &[Peer]) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let keys: HashMap<ChunkId, (usize, String)> = chunks
        .iter()
        .map(|c| {
            let owner = owner(&c.id, peers).map_or("", |p| p.id.as_str());
            let nth = seen.entry(owner).or_default();
            *nth += 1;
            (c.id.clone(), (*nth, owner.to_owned()))
        })
        .collect();
    chunks.sort_by(|a, b| keys[&a.id].cmp(&keys[&b.id]));
}

/// A pseudo-random rank of `chunk` seen from `id` (rendezvous weight).
fn rank(id: &str, chunk: &ChunkId) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(id.as_bytes());
    h.update(b"/");
    h.update(chunk.as_str().as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first)
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
        tokio::task::spawn_blocking(move || {
            cache.put_verified(&id, size, &bytes)?;
            fetched
                .get_or_create(&SourceLabels { source })
                .inc_by(bytes.len() as u64);
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
        peers: &[Peer],
    ) -> Result<(), FetchError> {
        let slot = self.slot(id);
        let result = async {
            let _one = slot.lock().await;
            if self.cache.has(id) {
                return Ok(());
            }
            if let Some(peer) = owner(id, peers).filter(|p| p.id != self.self_id) {
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
        let mut missing: Vec<ChunkRef> = self.cache.missing(&manifest);
        fetch_order(&mut missing, peers);
        // Stop at the first failure (the origin is down, a chunk is
        // corrupt): what arrived stays cached, and the retry asks only for
        // what is still missing, rather than every remaining chunk failing
        // one by one against a dead link.
        futures::stream::iter(missing)
            .map(|c| async move { self.chunk(&c.id, Some(c.size), peers).await })
            .buffer_unordered(PARALLEL_CHUNKS)
            .try_collect::<Vec<()>>()
            .await?;
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || cache.assemble(&manifest))
            .await
            .map_err(|e| FetchError::Cache(e.to_string()))?
            .map_err(|e| FetchError::Corrupt(e.to_string()))
    }

    /// For a peer: chunk `id` from the cache, fetched through from the
    /// origin when missing (this replica owns it).
    pub(crate) async fn serve(&self, id: &ChunkId) -> Result<Bytes, FetchError> {
        if !self.cache.has(id) {
            self.chunk(id, None, &[]).await?;
        }
        let bytes = self
            .cache
            .get_stored(id)
            .ok_or_else(|| FetchError::Cache(format!("chunk {id} vanished from the cache")))?;
        self.served.inc_by(bytes.len() as u64);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<Peer> {
        (0..n)
            .map(|i| Peer {
                id: format!("r{i}"),
                address: format!("127.0.0.1:{}", 9000 + i),
            })
            .collect()
    }

    #[test]
    fn chunks_spread_over_peers_and_move_minimally() {
        let ids: Vec<ChunkId> = (0..4000u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        let eight = peers(8);
        let mut counts = HashMap::new();
        for id in &ids {
            *counts
                .entry(owner(id, &eight).unwrap().id.clone())
                .or_insert(0) += 1;
        }
        // Roughly even: every peer owns 500 ± 20 %.
        assert_eq!(counts.len(), 8);
        assert!(
            counts.values().all(|&c| (400..=600).contains(&c)),
            "{counts:?}"
        );
        // Losing one peer moves only the chunks it owned.
        let seven: Vec<Peer> = eight.iter().filter(|p| p.id != "r3").cloned().collect();
        let moved = ids
            .iter()
            .filter(|id| owner(id, &eight).unwrap().id != owner(id, &seven).unwrap().id)
            .count();
        assert_eq!(moved, counts["r3"]);
        assert!(owner(&ids[0], &[]).is_none());
    }

    #[test]
    fn consecutive_chunks_have_different_owners_in_an_order_all_agree_on() {
        let eight = peers(8);
        let chunks: Vec<ChunkRef> = (0..800u32)
            .map(|i| ChunkRef {
                id: ChunkId::of(&i.to_le_bytes()),
                size: 1,
                stored: 1,
            })
            .collect();
        let mut order = chunks.clone();
        fetch_order(&mut order, &eight);
        // Any window of 8 spans at least 6 owners (exactly 8 until the
        // owners with fewer chunks run out).
        for window in order[..300].windows(8) {
            let owners: std::collections::HashSet<_> = window
                .iter()
                .map(|c| owner(&c.id, &eight).unwrap().id.clone())
                .collect();
            assert!(owners.len() >= 6, "{owners:?}");
        }
        // The same order whatever order the peers are listed in.
        let mut reversed: Vec<Peer> = eight.clone();
        reversed.reverse();
        let mut again = chunks.clone();
        fetch_order(&mut again, &reversed);
        assert_eq!(again, order);
        // Nothing lost; alone, the manifest order stands.
        let mut sorted = order.clone();
        sorted.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        let mut expected = chunks.clone();
        expected.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        assert_eq!(sorted, expected);
        let mut alone = chunks.clone();
        fetch_order(&mut alone, &[]);
        assert_eq!(alone, chunks);
    }
}
