//! Fetching artifacts chunk by chunk: cache, then the owning peer, then
//! the origin. Every chunk is verified before it is cached.
//!
//! A chunk on its way from the origin passes through a [`Relay`]: the
//! peers of the region that ask its owner for it meanwhile receive its
//! bytes as they arrive (cut-through), rather than waiting for the whole
//! chunk to land first. At the end of a fan-out that wait was most of what
//! a fleet took longer than a lone replica: the last chunks reached their
//! owners with the origin's last byte and still had to cross to every
//! peer. A peer's answer ends only once the owner has verified and cached
//! the chunk, and fails if it did not; peers verify every chunk anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use shoal_api::fleet::Peer;
use shoal_artifacts::{AsyncCache, ChunkId, ChunkRef, Manifest};
use shoal_client::ApiClient;

use crate::owners::{fetch_order, owners};

/// Chunks fetched at once. Since owners relay chunks as they arrive, each
/// chunk in flight from a peer moves at its owner's share of the origin's
/// link; 16 keep a replica's link full (8 left the eight-replica fan-out
/// 10-20 % slower than a lone replica, 16 about 5-15 %), while 32 or more
/// slow a lone replica fetching from the origin (shoal bench converge
/// --isolate, BENCHMARKS.md).
const PARALLEL_CHUNKS: usize = 16;

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

/// A chunk being fetched from the origin, readable while it arrives.
struct Relay {
    state: tokio::sync::watch::Sender<RelayState>,
}

#[derive(Default)]
struct RelayState {
    /// The body's pieces so far.
    pieces: Vec<Bytes>,
    /// Set once the chunk is verified and cached, or has failed.
    end: Option<Result<(), FetchError>>,
}

impl Relay {
    fn new() -> Relay {
        Relay {
            state: tokio::sync::watch::Sender::new(RelayState::default()),
        }
    }

    fn push(&self, piece: Bytes) {
        self.state.send_modify(|s| s.pieces.push(piece));
    }

    fn finish(&self, end: Result<(), FetchError>) {
        self.state.send_modify(|s| s.end = Some(end));
    }

    /// Waits for the end of the fetch.
    async fn finished(&self) -> Result<(), FetchError> {
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| s.end.is_some())
            .await
            .map_err(|_| FetchError::Origin("the fetch was dropped".into()))?;
        state
            .end
            .clone()
            .unwrap_or_else(|| Err(FetchError::Origin("the fetch was dropped".into())))
    }

    /// The chunk's bytes from the first, as they arrive; ends when the
    /// chunk is cached, with an error if it was not.
    fn stream(&self) -> impl futures::Stream<Item = Result<Bytes, FetchError>> + use<> {
        let rx = self.state.subscribe();
        futures::stream::unfold(Some((rx, 0usize)), |state| async move {
            let (mut rx, next) = state?;
            loop {
                let now = {
                    let s = rx.borrow_and_update();
                    match (s.pieces.get(next), &s.end) {
                        (Some(piece), _) => Some(Ok(piece.clone())),
                        (None, Some(Err(e))) => Some(Err(e.clone())),
                        (None, Some(Ok(()))) => return None,
                        (None, None) => None,
                    }
                };
                match now {
                    Some(Ok(piece)) => return Some((Ok(piece), Some((rx, next + 1)))),
                    Some(Err(e)) => return Some((Err(e), None)),
                    None => {}
                }
                if rx.changed().await.is_err() {
                    let dropped = FetchError::Origin("the fetch was dropped".into());
                    return Some((Err(dropped), None));
                }
            }
        })
    }
}

/// What a peer asking for a chunk gets.
pub(crate) enum Served {
    /// The whole chunk, from memory or the cache.
    Whole(Bytes),
    /// The chunk as it arrives from the origin.
    Arriving(std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, FetchError>> + Send>>),
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
    pub(crate) cache: AsyncCache,
    origin: ApiClient,
    self_id: String,
    inflight: Mutex<HashMap<ChunkId, Arc<tokio::sync::Mutex<()>>>>,
    relays: Mutex<HashMap<ChunkId, Arc<Relay>>>,
    peers: Mutex<HashMap<String, ApiClient>>,
    recent: Arc<Mutex<Recent>>,
    fetched: Family<SourceLabels, Counter>,
    served: Counter,
}

impl Fetcher {
    pub(crate) fn new(
        cache: AsyncCache,
        origin: ApiClient,
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
            relays: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            recent: Arc::default(),
            fetched,
            served,
        }
    }

    fn peer_client(&self, peer: &Peer) -> ApiClient {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(peer.address.clone())
            .or_insert_with(|| {
                ApiClient::peer(
                    &shoal_api::member_url(&peer.address, ""),
                    self.origin.token().map(str::to_owned),
                )
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
    /// it. Both happen in one cache task, so a chunk that lands in the cache
    /// is counted even if the fetch that wanted it was cancelled.
    async fn store(
        &self,
        id: &ChunkId,
        size: Option<u32>,
        bytes: Bytes,
        source: &'static str,
    ) -> Result<(), FetchError> {
        let id = id.clone();
        let fetched = self.fetched.clone();
        let recent = self.recent.clone();
        self.cache
            .run(move |cache| {
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
        self: &Arc<Self>,
        id: &ChunkId,
        size: Option<u32>,
        owner: Option<&Peer>,
    ) -> Result<(), FetchError> {
        if let Some(peer) = owner.filter(|p| p.id != self.self_id) {
            let slot = self.slot(id);
            let from_peer = async {
                let _one = slot.lock().await;
                if self.cache.has(id) {
                    return true;
                }
                match self.peer_client(peer).get_raw(&format!("/peer/chunks/{id}")).await {
                    Ok(bytes) => match self.store(id, size, bytes, "peer").await {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(peer = %peer.id, chunk = %id, error = %e, "peer sent a bad chunk; asking the origin");
                            false
                        }
                    },
                    Err(e) => {
                        tracing::debug!(peer = %peer.id, chunk = %id, error = %e, "peer could not serve a chunk; asking the origin");
                        false
                    }
                }
            }
            .await;
            drop(slot);
            self.release(id);
            if from_peer {
                return Ok(());
            }
        }
        match self.relay(id, size) {
            Some(relay) => relay.finished().await,
            None => Ok(()),
        }
    }

    /// The relay of chunk `id`'s fetch from the origin, started if it is
    /// neither cached nor on its way already; `None` when cached.
    fn relay(self: &Arc<Self>, id: &ChunkId, size: Option<u32>) -> Option<Arc<Relay>> {
        let mut relays = self.relays.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(relay) = relays.get(id) {
            return Some(relay.clone());
        }
        if self.cache.has(id) {
            return None;
        }
        let relay = Arc::new(Relay::new());
        relays.insert(id.clone(), relay.clone());
        // Its own task, so the fetch outlives whichever caller started it
        // (a peer that hung up, a reconcile step that was superseded).
        tokio::spawn(self.clone().fill(id.clone(), size, relay.clone()));
        Some(relay)
    }

    /// Fetches chunk `id` from the origin into `relay`, then verifies and
    /// caches it.
    async fn fill(self: Arc<Self>, id: ChunkId, size: Option<u32>, relay: Arc<Relay>) {
        let result = async {
            let origin =
                |e: shoal_client::ClientError| FetchError::Origin(format!("chunk {id}: {e}"));
            let mut body = std::pin::pin!(
                self.origin
                    .chunk_stream(id.as_str())
                    .await
                    .map_err(origin)?
            );
            let mut whole = bytes::BytesMut::with_capacity(size.map_or(0, |s| s as usize + 1));
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(origin)?;
                whole.extend_from_slice(&piece);
                relay.push(piece);
            }
            self.store(&id, size, whole.freeze(), "origin").await
        }
        .await;
        // Out of the map before the end is announced: whoever asks next
        // finds the chunk cached, or (after a failure) starts afresh.
        self.relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        relay.finish(result);
    }

    /// The manifest of `sha256`, from the cache or the origin.
    async fn manifest(&self, sha256: &str) -> Result<Manifest, FetchError> {
        let cache_trouble = |e: shoal_artifacts::ArtifactError| FetchError::Cache(e.to_string());
        if let Some(m) = self
            .cache
            .get_manifest(sha256)
            .await
            .map_err(cache_trouble)?
        {
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
            .put_manifest(manifest.clone())
            .await
            .map_err(cache_trouble)?;
        Ok(manifest)
    }

    /// The verified bytes of artifact `sha256`, fetching what the cache lacks.
    pub(crate) async fn artifact(
        self: &Arc<Self>,
        sha256: &str,
        peers: &[Peer],
    ) -> Result<Bytes, FetchError> {
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
        // The artifact is put together while its chunks arrive, in order,
        // on a blocking thread: copying and hashing overlap the transfer
        // instead of following it.
        let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<()>();
        let _ = arrived.send(()); // chunks the cache had before
        let fetching = async move {
            // Stop at the first failure (the origin is down, a chunk is
            // corrupt): what arrived stays cached, and the retry asks only
            // for what is still missing, rather than every remaining chunk
            // failing one by one against a dead link.
            futures::stream::iter(missing)
                .map(|c| {
                    let owner = owners.get(&c.id).copied();
                    let arrived = arrived.clone();
                    async move {
                        self.chunk(&c.id, Some(c.size), owner).await?;
                        let _ = arrived.send(());
                        Ok::<(), FetchError>(())
                    }
                })
                .buffer_unordered(PARALLEL_CHUNKS)
                .try_collect::<Vec<()>>()
                .await
        };
        // A chunk or artifact that does not hash right is corrupt; a disk
        // that fails is the cache's trouble.
        let assembly_error = |e: shoal_artifacts::ArtifactError| match e {
            shoal_artifacts::ArtifactError::Io { .. } => FetchError::Cache(e.to_string()),
            other => FetchError::Corrupt(other.to_string()),
        };
        let assembling = async {
            let mut assembly = self.cache.assembly(manifest);
            while arrivals.recv().await.is_some() {
                while arrivals.try_recv().is_ok() {}
                assembly = self.cache.advance(assembly).await.map_err(assembly_error)?;
            }
            Ok(assembly)
        };
        let ((), assembly) =
            futures::future::try_join(async { fetching.await.map(|_| ()) }, assembling).await?;
        tracing::debug!(sha256, "every chunk cached; finishing the assembly");
        self.cache.finish(assembly).await.map_err(assembly_error)
    }

    /// For a peer: chunk `id` from memory or the cache, or as it arrives
    /// from the origin (fetched through when missing: this replica owns
    /// it).
    pub(crate) async fn serve(self: &Arc<Self>, id: &ChunkId) -> Result<Served, FetchError> {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id);
        if let Some(bytes) = recent {
            self.served.inc_by(bytes.len() as u64);
            return Ok(Served::Whole(bytes));
        }
        if let Some(relay) = self.relay(id, None) {
            let served = self.served.clone();
            let counted = relay.stream().inspect(move |piece| {
                if let Ok(piece) = piece {
                    served.inc_by(piece.len() as u64);
                }
            });
            return Ok(Served::Arriving(Box::pin(counted)));
        }
        let bytes = self
            .cache
            .get_stored(id)
            .await
            .map_err(|e| FetchError::Cache(e.to_string()))?
            // Dropped since (found corrupt): the peer asks the origin.
            .ok_or_else(|| FetchError::Cache(format!("chunk {id} is no longer cached")))?;
        self.served.inc_by(bytes.len() as u64);
        Ok(Served::Whole(bytes))
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

    async fn drain(
        stream: impl futures::Stream<Item = Result<Bytes, FetchError>>,
    ) -> (Vec<u8>, Option<String>) {
        let mut got = Vec::new();
        let mut stream = std::pin::pin!(stream);
        while let Some(piece) = stream.next().await {
            match piece {
                Ok(piece) => got.extend_from_slice(&piece),
                Err(e) => return (got, Some(e.to_string())),
            }
        }
        (got, None)
    }

    #[tokio::test]
    async fn a_relay_hands_out_every_piece_to_early_and_late_readers_then_the_end() {
        let relay = Arc::new(Relay::new());
        relay.push(Bytes::from_static(b"ab"));
        let early = tokio::spawn(drain(relay.stream()));
        let waiting = tokio::spawn({
            let relay = relay.clone();
            async move { relay.finished().await }
        });
        tokio::task::yield_now().await;
        relay.push(Bytes::from_static(b"cd"));
        tokio::task::yield_now().await;
        relay.push(Bytes::from_static(b"e"));
        assert!(!waiting.is_finished(), "finished before the end");
        let late = relay.stream();
        relay.finish(Ok(()));
        assert_eq!(early.await.unwrap(), (b"abcde".to_vec(), None));
        assert_eq!(drain(late).await, (b"abcde".to_vec(), None));
        assert!(waiting.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_failed_fetch_ends_its_readers_with_the_error() {
        let relay = Relay::new();
        relay.push(Bytes::from_static(b"half a ch"));
        let reader = relay.stream();
        relay.finish(Err(FetchError::Corrupt("chunk x is corrupt".into())));
        let (got, error) = drain(reader).await;
        assert_eq!(got, b"half a ch");
        assert_eq!(error.as_deref(), Some("chunk x is corrupt"));
        assert!(relay.finished().await.is_err());
        // A reader that finds the relay dropped mid-way is told so too.
        let relay = Relay::new();
        let reader = relay.stream();
        drop(relay);
        assert!(drain(reader).await.1.is_some());
    }
}
