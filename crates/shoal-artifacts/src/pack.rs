//! The record format of the chunk cache's pack files: append-only logs of
//! verified chunks, each behind a small self-checking header.
//!
//! A replica used to keep one file per chunk (a temporary file renamed into
//! place). Profiling a replica fetching a 20 MiB artifact showed two thirds
//! of its CPU time in the kernel creating and renaming those ~300 files:
//! inode allocation and the directory locks, which eight replicas on one
//! file system then contend for. A pack turns each chunk into one
//! positioned write to a file that is already open.
//!
//! Layout of a record (integers little-endian):
//!
//! ```text
//! magic "SHC1" | kind u8 | 3 zero bytes | chunk id: 32 raw BLAKE3 bytes
//! | stored length u32 | check: the first 4 bytes of BLAKE3(kind..length)
//! | the chunk in its stored encoding (nothing for a tombstone)
//! ```
//!
//! A *tombstone* (kind 1) withdraws an earlier record of the same chunk
//! (found corrupt). Records are read back in order, so a later record wins.
//! The header check lets a reader tell a torn or garbled tail (a crash
//! mid-append) from a record: reading stops there, and the writer cuts the
//! pack back to its last whole record. Chunk contents are not checked
//! here: the cache verifies each chunk's BLAKE3 when it assembles an
//! artifact, as it always did.
//!
//! Public so the fuzz targets (`shoal-fuzz`) can drive [`scan`] over
//! garbled packs; the cache is its only user in Shoal.

use std::io::{Read, Seek};

use crate::chunk::ChunkId;

/// Bytes before a record's data.
pub const HEADER: usize = 48;

const MAGIC: &[u8; 4] = b"SHC1";

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A chunk follows.
    Chunk,
    /// The chunk is withdrawn.
    Tombstone,
}

/// A decoded record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// A chunk or a tombstone.
    pub kind: Kind,
    /// The chunk it is about.
    pub id: ChunkId,
    /// Length of the data after the header.
    pub len: u32,
}

fn check(fields: &[u8]) -> [u8; 4] {
    let digest = blake3::hash(fields);
    let mut c = [0u8; 4];
    c.copy_from_slice(&digest.as_bytes()[..4]);
    c
}

/// The header of a record for `id` with `len` bytes of data.
pub fn encode_header(kind: Kind, id: &ChunkId, len: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(MAGIC);
    h[4] = match kind {
        Kind::Chunk => 0,
        Kind::Tombstone => 1,
    };
    // A ChunkId is always 64 lowercase hex characters (checked where made).
    let raw = hex::decode(id.as_str()).unwrap_or_default();
    h[8..8 + raw.len().min(32)].copy_from_slice(&raw[..raw.len().min(32)]);
    h[40..44].copy_from_slice(&len.to_le_bytes());
    let c = check(&h[4..44]);
    h[44..].copy_from_slice(&c);
    h
}

/// Decodes a header; `None` when it is not one (a torn or garbled tail).
pub fn decode_header(h: &[u8; HEADER]) -> Option<Header> {
    if &h[..4] != MAGIC || h[44..] != check(&h[4..44]) {
        return None;
    }
    let kind = match h[4] {
        0 => Kind::Chunk,
        1 => Kind::Tombstone,
        _ => return None,
    };
    let id = ChunkId::parse(&hex::encode(&h[8..40])).ok()?;
    let len = u32::from_le_bytes(h[40..44].try_into().ok()?);
    Some(Header { kind, id, len })
}

/// Reads the records of a pack of `file_len` bytes in order, calling
/// `record(header, offset of its data)`, and returns the length of its
/// whole records: where a torn or garbled tail, if any, begins. Data is
/// skipped by seeking, not read, so opening a large cache reads only its
/// headers.
pub fn scan(
    pack: impl Read + Seek,
    file_len: u64,
    mut record: impl FnMut(Header, u64),
) -> std::io::Result<u64> {
    let mut reader = std::io::BufReader::with_capacity(HEADER * 64, pack);
    let mut at = 0u64;
    let mut h = [0u8; HEADER];
    loop {
        if at + HEADER as u64 > file_len {
            return Ok(at);
        }
        reader.read_exact(&mut h)?;
        let Some(header) = decode_header(&h) else {
            return Ok(at);
        };
        let data_at = at + HEADER as u64;
        let end = data_at + u64::from(header.len);
        if end > file_len {
            return Ok(at);
        }
        // Within the buffer when the data is short, else a seek.
        reader.seek_relative(i64::from(header.len))?;
        record(header, data_at);
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: Kind, id: &ChunkId, data: &[u8]) -> Vec<u8> {
        let mut r = encode_header(kind, id, u32::try_from(data.len()).unwrap()).to_vec();
        r.extend_from_slice(data);
        r
    }

    fn check(pack: &[u8], expected: &[(Kind, &ChunkId, u64)], whole: usize) {
        let mut seen = Vec::new();
        let end = scan(std::io::Cursor::new(pack), pack.len() as u64, |h, at| {
            seen.push((h.kind, h.id, at));
        })
        .unwrap();
        let expected: Vec<(Kind, ChunkId, u64)> = expected
            .iter()
            .map(|(k, id, at)| (*k, (*id).clone(), *at))
            .collect();
        assert_eq!(seen, expected);
        assert_eq!(end, whole as u64);
    }

    #[test]
    fn headers_round_trip_and_garbage_is_not_a_header() {
        let id = ChunkId::of(b"a chunk");
        let h = encode_header(Kind::Chunk, &id, 70_000);
        assert_eq!(
            decode_header(&h),
            Some(Header {
                kind: Kind::Chunk,
                id: id.clone(),
                len: 70_000
            })
        );
        for i in 0..HEADER {
            let mut bad = h;
            bad[i] ^= 0x10;
            assert_eq!(decode_header(&bad), None, "byte {i} flipped");
        }
        assert_eq!(decode_header(&[0; HEADER]), None);
    }

    #[test]
    fn scanning_finds_records_in_order_and_stops_at_a_torn_tail() {
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        let mut pack = record(Kind::Chunk, &a, &[1; 100]);
        pack.extend(record(Kind::Chunk, &b, &[2; 70_000]));
        pack.extend(record(Kind::Tombstone, &a, &[]));
        let whole = pack.len();
        let all = [
            (Kind::Chunk, &a, HEADER as u64),
            (Kind::Chunk, &b, (2 * HEADER + 100) as u64),
            (Kind::Tombstone, &a, (3 * HEADER + 70_100) as u64),
        ];
        check(&pack, &all, whole);

        // A crash mid-append: half a header, or a header whose data never
        // arrived, or zeros where the file system extended the file.
        let mut torn = pack.clone();
        torn.extend_from_slice(&record(Kind::Chunk, &a, &[3; 10])[..20]);
        check(&torn, &all, whole);
        let mut short = pack.clone();
        short.extend_from_slice(&record(Kind::Chunk, &a, &[3; 1000])[..HEADER + 999]);
        check(&short, &all, whole);
        let mut zeros = pack.clone();
        zeros.extend_from_slice(&[0; 4096]);
        check(&zeros, &all, whole);
        check(&[], &[], 0);
    }
}
