//! Chunking, chunk encoding and manifests.

use std::cell::RefCell;
use std::io::Read;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{ArtifactError, is_hex_digest};

/// Smallest chunk FastCDC cuts (except at the end of a file).
pub const MIN_CHUNK: usize = 16 * 1024;
/// Average chunk size: small enough that editing one tensor re-ships little,
/// large enough that a 100 MB model's manifest stays around 1,600 entries.
pub const AVG_CHUNK: usize = 64 * 1024;
/// Largest chunk.
pub const MAX_CHUNK: usize = 256 * 1024;

/// Stored encodings, in the first byte of a stored chunk.
const RAW: u8 = 0;
const ZSTD: u8 = 1;

/// A chunk's name: the BLAKE3 of its (uncompressed) content, hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChunkId(String);

impl ChunkId {
    /// The id of `content`.
    pub fn of(content: &[u8]) -> ChunkId {
        ChunkId(blake3::hash(content).to_hex().to_string())
    }

    /// Validates a hex id.
    pub fn parse(s: &str) -> Result<ChunkId, ArtifactError> {
        if is_hex_digest(s) {
            Ok(ChunkId(s.to_owned()))
        } else {
            Err(ArtifactError::Invalid(format!(
                "chunk id {s:?} is not 64 lowercase hex characters"
            )))
        }
    }

    /// The hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One chunk in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Its name.
    pub id: ChunkId,
    /// Content size.
    pub size: u32,
    /// Size as stored (after compression and the encoding byte).
    pub stored: u32,
}

/// The recipe of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// SHA-256 of the whole artifact, hex; the artifact's id.
    pub sha256: String,
    /// Size of the artifact.
    pub size: u64,
    /// Chunks in order.
    pub chunks: Vec<ChunkRef>,
}

impl Manifest {
    /// Parses and sanity-checks a manifest.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ArtifactError> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| ArtifactError::Invalid(format!("bad manifest: {e}")))?;
        if !is_hex_digest(&m.sha256) {
            return Err(ArtifactError::Invalid(
                "bad manifest: sha256 is not hex".into(),
            ));
        }
        let total: u64 = m.chunks.iter().map(|c| u64::from(c.size)).sum();
        if total != m.size {
            return Err(ArtifactError::Invalid(format!(
                "bad manifest: chunks add up to {total} bytes, not {}",
                m.size
            )));
        }
        Ok(m)
    }

    /// The manifest as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Total stored bytes of all chunks.
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.stored)).sum()
    }
}

thread_local! {
    /// zstd contexts reused across chunks on this thread: creating one per
    /// chunk (~100 KiB of tables) cost more than decoding a 64 KiB chunk.
    static ZSTD_CONTEXTS: RefCell<Option<(zstd::bulk::Compressor<'static>, zstd::bulk::Decompressor<'static>)>> =
        const { RefCell::new(None) };
}

fn with_zstd<T>(
    f: impl FnOnce(
        &mut zstd::bulk::Compressor<'static>,
        &mut zstd::bulk::Decompressor<'static>,
    ) -> std::io::Result<T>,
) -> std::io::Result<T> {
    ZSTD_CONTEXTS.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some((
                zstd::bulk::Compressor::new(3)?,
                zstd::bulk::Decompressor::new()?,
            ));
        }
        let (c, d) = slot.as_mut().expect("just set");
        f(c, d)
    })
}

/// Encodes a chunk for storage: zstd (level 3) when it saves at least 5 %,
/// raw otherwise. Model weights are mostly incompressible floats; the
/// graph structure and zero-filled tensors are not.
pub fn encode(content: &[u8]) -> Bytes {
    if let Ok(compressed) = with_zstd(|c, _| c.compress(content))
        && compressed.len() * 100 <= content.len() * 95
    {
        let mut out = Vec::with_capacity(compressed.len() + 1);
        out.push(ZSTD);
        out.extend_from_slice(&compressed);
        return Bytes::from(out);
    }
    let mut out = Vec::with_capacity(content.len() + 1);
    out.push(RAW);
    out.extend_from_slice(content);
    Bytes::from(out)
}

/// Decodes a stored chunk and checks it is the content named `id`.
/// `size` is the content size when known (from a manifest); a peer serving
/// a chunk by id alone passes `None`.
pub fn decode(id: &ChunkId, stored: &[u8], size: Option<u32>) -> Result<Bytes, ArtifactError> {
    let mut out = Vec::new();
    decode_into(id, stored, size, &mut out)?;
    Ok(Bytes::from(out))
}

/// Checks that a stored chunk decodes to the content named `id`, without
/// keeping the content (a raw chunk is hashed where it lies).
pub fn verify(id: &ChunkId, stored: &[u8], size: Option<u32>) -> Result<(), ArtifactError> {
    match stored.split_first() {
        Some((&RAW, rest)) => check(id, rest, size),
        _ => decode_into(id, stored, size, &mut Vec::new()),
    }
}

/// Appends the content of a stored chunk to `out` and checks it is the
/// content named `id`; on error `out` is left as it was. Decompresses
/// straight into `out`, so assembling an artifact copies each byte once.
pub fn decode_into(
    id: &ChunkId,
    stored: &[u8],
    size: Option<u32>,
    out: &mut Vec<u8>,
) -> Result<(), ArtifactError> {
    let bad = |reason: String| ArtifactError::BadEncoding {
        id: id.to_string(),
        reason,
    };
    let start = out.len();
    match stored.split_first() {
        Some((&RAW, rest)) => out.extend_from_slice(rest),
        Some((&ZSTD, rest)) => {
            let room = size.map_or(MAX_CHUNK, |s| s as usize);
            out.resize(start + room, 0);
            match with_zstd(|_, d| d.decompress_to_buffer(rest, &mut out[start..])) {
                Ok(n) => out.truncate(start + n),
                Err(e) => {
                    out.truncate(start);
                    return Err(bad(e.to_string()));
                }
            }
        }
        Some((other, _)) => return Err(bad(format!("unknown encoding {other}"))),
        None => return Err(bad("empty".into())),
    }
    check(id, &out[start..], size).inspect_err(|_| out.truncate(start))
}

/// Checks decoded content against its size (when known) and its name.
fn check(id: &ChunkId, content: &[u8], size: Option<u32>) -> Result<(), ArtifactError> {
    if let Some(size) = size
        && content.len() != size as usize
    {
        return Err(ArtifactError::BadEncoding {
            id: id.to_string(),
            reason: format!("{} bytes, the manifest says {size}", content.len()),
        });
    }
    let actual = ChunkId::of(content);
    if &actual != id {
        return Err(ArtifactError::CorruptChunk {
            id: id.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// Cuts `reader` into content-defined chunks, calling `each` with every
/// chunk's content in order. Returns the SHA-256 and size of the whole.
pub fn chunk_stream<R: Read>(
    reader: R,
    mut each: impl FnMut(&[u8]) -> Result<(), ArtifactError>,
) -> Result<(String, u64), ArtifactError> {
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    let mut size = 0u64;
    for chunk in fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let chunk = chunk.map_err(|e| ArtifactError::Io {
            context: "reading the artifact".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        sha.update(&chunk.data);
        size += chunk.data.len() as u64;
        each(&chunk.data)?;
    }
    Ok((hex::encode(sha.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_verifies() {
        let zeros = vec![0u8; 100_000];
        let stored = encode(&zeros);
        assert_eq!(stored[0], ZSTD, "zeros compress");
        assert!(stored.len() < 1000);
        let id = ChunkId::of(&zeros);
        assert_eq!(decode(&id, &stored, Some(100_000)).unwrap(), zeros);

        // Pseudo-random bytes do not compress by 5 %: stored raw.
        let mut x = 0x1234_5678u32;
        let noise: Vec<u8> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect();
        let stored = encode(&noise);
        assert_eq!(stored[0], RAW);
        assert_eq!(
            decode(&ChunkId::of(&noise), &stored, Some(50_000)).unwrap(),
            noise
        );

        // One flipped byte is caught.
        let mut tampered = stored.to_vec();
        tampered[100] ^= 1;
        assert!(matches!(
            decode(&ChunkId::of(&noise), &tampered, None),
            Err(ArtifactError::CorruptChunk { .. })
        ));
        assert!(decode(&ChunkId::of(&noise), &[9, 1, 2], None).is_err());
        assert!(decode(&ChunkId::of(&noise), &[], None).is_err());
    }

    #[test]
    fn decoding_appends_in_place_and_leaves_nothing_behind_on_error() {
        let zeros = vec![0u8; 70_000];
        let noise: Vec<u8> = (0..30_000u32)
            .map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0])
            .collect();
        let (z, n) = (ChunkId::of(&zeros), ChunkId::of(&noise));
        let (sz, sn) = (encode(&zeros), encode(&noise));
        assert_eq!((sz[0], sn[0]), (ZSTD, RAW));

        let mut out = b"head".to_vec();
        decode_into(&z, &sz, Some(70_000), &mut out).unwrap();
        decode_into(&n, &sn, None, &mut out).unwrap();
        assert_eq!(out.len(), 4 + 70_000 + 30_000);
        assert_eq!(&out[4..70_004], &zeros[..]);
        assert_eq!(&out[70_004..], &noise[..]);

        // Wrong name, wrong size, truncated frame: `out` is untouched.
        let before = out.clone();
        assert!(matches!(
            decode_into(&n, &sz, None, &mut out),
            Err(ArtifactError::CorruptChunk { .. })
        ));
        assert!(decode_into(&z, &sz, Some(1_000), &mut out).is_err());
        assert!(decode_into(&z, &sz[..sz.len() / 2], Some(70_000), &mut out).is_err());
        assert!(decode_into(&n, &sn, Some(29_999), &mut out).is_err());
        assert_eq!(out, before);

        // Verifying keeps nothing and agrees with decoding.
        verify(&z, &sz, Some(70_000)).unwrap();
        verify(&n, &sn, Some(30_000)).unwrap();
        assert!(verify(&z, &sn, None).is_err());
        assert!(verify(&n, &sn, Some(1)).is_err());
    }

    #[test]
    fn an_edit_in_the_middle_changes_few_chunks() {
        let mut x = 7u64;
        let mut data: Vec<u8> = (0..4_000_000)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (x >> 33) as u8
            })
            .collect();
        let ids = |data: &[u8]| {
            let mut ids = Vec::new();
            chunk_stream(data, |c| {
                ids.push(ChunkId::of(c));
                Ok(())
            })
            .unwrap();
            ids
        };
        let before = ids(&data);
        for b in &mut data[2_000_000..2_010_000] {
            *b = b.wrapping_add(1);
        }
        let after = ids(&data);
        let old: std::collections::HashSet<_> = before.iter().collect();
        let changed = after.iter().filter(|id| !old.contains(id)).count();
        assert!(before.len() > 30, "{} chunks", before.len());
        assert!(changed <= 3, "{changed} of {} chunks changed", after.len());
    }

    #[test]
    fn manifests_are_checked() {
        let m = Manifest {
            sha256: "a".repeat(64),
            size: 3,
            chunks: vec![ChunkRef {
                id: ChunkId::of(b"abc"),
                size: 3,
                stored: 4,
            }],
        };
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        let mut bad = m.clone();
        bad.size = 4;
        assert!(Manifest::from_json(&bad.to_json()).is_err());
        assert!(ChunkId::parse("../x").is_err());
    }
}
