//! Who fetches which chunk from the origin, and in what order every replica
//! of a region asks for them. Pure: the same manifest and peer list give
//! the same answer on every replica, so a region agrees without talking.

use std::collections::HashMap;

use shoal_api::fleet::Peer;
use shoal_artifacts::{ChunkId, ChunkRef};

/// How far above an even share of an artifact's bytes one owner may go.
const SLACK: f64 = 0.03;

/// The owner of every chunk of an artifact: the peer that alone fetches it
/// from the origin and serves it to the rest of the region.
///
/// Each chunk goes to the first peer in its rendezvous (highest-random-
/// weight) order that still has room under an even share of the stored
/// bytes plus [`SLACK`] — consistent hashing with bounded loads. Rendezvous
/// alone leaves the busiest of eight owners with about 30 % more than its
/// share of a 300-chunk artifact; every owner uploads its share to every
/// other replica, so the busiest one set the pace for the whole region.
/// Chunks are placed in manifest order (duplicates once), so the result
/// depends only on the manifest and the set of peers, not on what a
/// replica already has cached nor on the order peers are listed in. A peer
/// joining or leaving moves its own share and, through the bound, a little
/// more.
pub fn owners<'a>(chunks: &[ChunkRef], peers: &'a [Peer]) -> HashMap<ChunkId, &'a Peer> {
    let mut owners: HashMap<ChunkId, &'a Peer> = HashMap::with_capacity(chunks.len());
    if peers.is_empty() {
        return owners;
    }
    let mut unique: Vec<&ChunkRef> = Vec::with_capacity(chunks.len());
    let mut seen = std::collections::HashSet::with_capacity(chunks.len());
    for c in chunks {
        if seen.insert(&c.id) {
            unique.push(c);
        }
    }
    let total: u64 = unique.iter().map(|c| u64::from(c.stored)).sum();
    let cap = (total as f64 / peers.len() as f64 * (1.0 + SLACK)).ceil() as u64;
    let mut load: HashMap<&str, u64> = peers.iter().map(|p| (p.id.as_str(), 0)).collect();
    let mut ranked: Vec<(u64, &'a Peer)> = Vec::with_capacity(peers.len());
    for c in unique {
        ranked.clear();
        ranked.extend(peers.iter().map(|p| (rank(&p.id, &c.id), p)));
        // Highest rank first; ties (never in practice) by id, for determinism.
        ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
        let size = u64::from(c.stored);
        let chosen = ranked
            .iter()
            .map(|(_, p)| *p)
            .find(|p| load[p.id.as_str()] + size <= cap)
            // Nobody has room (a big chunk near the end): the least loaded.
            .unwrap_or_else(|| {
                ranked
                    .iter()
                    .map(|(_, p)| *p)
                    .min_by_key(|p| load[p.id.as_str()])
                    .expect("peers is not empty")
            });
        *load
            .get_mut(chosen.id.as_str())
            .expect("every peer has a load") += size;
        owners.insert(c.id.clone(), chosen);
    }
    owners
}

/// Orders the chunks a replica still needs so that consecutive chunks have
/// different owners: the first chunk of each owner, then the second of
/// each, and so on. Every replica computes the same order, so a region
/// moves through the artifact together (each chunk leaves the origin once,
/// to its owner, just as its peers ask for it), and any window of chunks in
/// flight spreads over every owner's link instead of queueing on whichever
/// owner happens to hold a run of neighbouring chunks.
pub fn fetch_order(chunks: &mut [ChunkRef], owners: &HashMap<ChunkId, &Peer>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let keys: HashMap<ChunkId, (usize, &str)> = chunks
        .iter()
        .map(|c| {
            let owner = owners.get(&c.id).map_or("", |p| p.id.as_str());
            let nth = seen.entry(owner).or_default();
            *nth += 1;
            (c.id.clone(), (*nth, owner))
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

    /// `n` chunks of 16–256 KiB stored, like FastCDC's output.
    fn chunks(n: u32) -> Vec<ChunkRef> {
        (0..n)
            .map(|i| {
                let id = ChunkId::of(&i.to_le_bytes());
                let stored = 16_384 + (rank("size", &id) % (240 * 1024)) as u32;
                ChunkRef {
                    id,
                    size: stored,
                    stored,
                }
            })
            .collect()
    }

    fn loads(chunks: &[ChunkRef], owners: &HashMap<ChunkId, &Peer>) -> HashMap<String, u64> {
        let mut loads = HashMap::new();
        for c in chunks {
            *loads.entry(owners[&c.id].id.clone()).or_insert(0) += u64::from(c.stored);
        }
        loads
    }

    #[test]
    fn every_owner_gets_an_even_share_of_the_bytes() {
        let eight = peers(8);
        for n in [16, 320, 1600] {
            let chunks = chunks(n);
            let owners = owners(&chunks, &eight);
            let loads = loads(&chunks, &owners);
            let total: u64 = chunks.iter().map(|c| u64::from(c.stored)).sum();
            let largest = chunks.iter().map(|c| u64::from(c.stored)).max().unwrap();
            let even = total / 8;
            // Within the slack, or one chunk over it when chunks are few.
            let bound = (even as f64 * (1.0 + SLACK)) as u64 + if n < 100 { largest } else { 0 };
            assert!(
                loads.values().all(|&l| l <= bound),
                "{n} chunks: {loads:?}, bound {bound}"
            );
            if n >= 320 {
                assert_eq!(loads.len(), 8);
            }
        }
        // Rendezvous alone would not be: its busiest owner is far above.
        let chunks = chunks(320);
        let mut plain: HashMap<&str, u64> = HashMap::new();
        for c in &chunks {
            let p = eight.iter().max_by_key(|p| rank(&p.id, &c.id)).unwrap();
            *plain.entry(p.id.as_str()).or_default() += u64::from(c.stored);
        }
        let total: u64 = plain.values().sum();
        assert!(
            *plain.values().max().unwrap() > total / 8 * 11 / 10,
            "{plain:?}"
        );
    }

    #[test]
    fn owners_agree_whatever_the_peer_order_or_the_cache_holds() {
        let eight = peers(8);
        let mut reversed = eight.clone();
        reversed.reverse();
        let chunks = chunks(400);
        let a = owners(&chunks, &eight);
        let b = owners(&chunks, &reversed);
        assert!(chunks.iter().all(|c| a[&c.id].id == b[&c.id].id));
        // Duplicated chunks count once and keep their owner.
        let mut doubled = chunks.clone();
        doubled.extend(chunks[..50].iter().cloned());
        let d = owners(&doubled, &eight);
        assert!(chunks.iter().all(|c| a[&c.id].id == d[&c.id].id));
        assert!(owners(&chunks, &[]).is_empty());
    }

    #[test]
    fn a_peer_leaving_moves_little_more_than_its_share() {
        let eight = peers(8);
        let seven: Vec<Peer> = eight.iter().filter(|p| p.id != "r3").cloned().collect();
        let chunks = chunks(1600);
        let (before, after) = (owners(&chunks, &eight), owners(&chunks, &seven));
        let own = chunks.iter().filter(|c| before[&c.id].id == "r3").count();
        let moved = chunks
            .iter()
            .filter(|c| before[&c.id].id != after[&c.id].id)
            .count();
        assert!(
            moved >= own && moved <= own * 2,
            "moved {moved}, r3 owned {own}"
        );
    }

    #[test]
    fn consecutive_chunks_have_different_owners_in_an_order_all_agree_on() {
        let eight = peers(8);
        let chunks = chunks(800);
        let owners = owners(&chunks, &eight);
        let mut order = chunks.clone();
        fetch_order(&mut order, &owners);
        // Any window of 8 spans at least 6 owners (exactly 8 until the
        // owners with fewer chunks run out).
        for window in order[..300].windows(8) {
            let distinct: std::collections::HashSet<_> =
                window.iter().map(|c| owners[&c.id].id.clone()).collect();
            assert!(distinct.len() >= 6, "{distinct:?}");
        }
        // The same order with the peers listed otherwise; nothing lost.
        let mut reversed = eight.clone();
        reversed.reverse();
        let mut again = chunks.clone();
        fetch_order(&mut again, &super::owners(&chunks, &reversed));
        assert_eq!(again, order);
        let key = |v: &[ChunkRef]| {
            let mut ids: Vec<String> = v.iter().map(|c| c.id.to_string()).collect();
            ids.sort();
            ids
        };
        assert_eq!(key(&order), key(&chunks));
        // Alone, the manifest order stands.
        let mut alone = chunks.clone();
        fetch_order(&mut alone, &HashMap::new());
        assert_eq!(alone, chunks);
    }
}
