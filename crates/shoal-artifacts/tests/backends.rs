//! The artifact store on each backend it supports, through the same
//! checks: a local directory and a real S3-compatible server (moto's, on
//! loopback, over HTTP). Versions share chunks, read back verified, a chunk
//! corrupted in the backend is caught, and a misconfigured store fails with
//! an error that says so.

use std::path::Path;
use std::sync::Arc;

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use shoal_artifacts::{ArtifactError, ArtifactStore, ChunkId};
use shoal_testkit::{S3Server, TempDir};

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 33) as u8
        })
        .collect()
}

/// Pushes two versions that differ in one place, reads them back, then
/// corrupts a chunk through `raw` (the backend under the store, at the
/// store's prefix) and checks the read is refused.
async fn exercise(store: &ArtifactStore, raw: &dyn ObjectStore, dir: &Path) {
    store.check().await.expect("a fresh store is readable");
    let mut data = random_bytes(3_000_000, 99);
    let v1 = dir.join("v1.bin");
    std::fs::write(&v1, &data).unwrap();
    let first = store.put_file(&v1).await.unwrap();
    assert_eq!(first.new_chunks, first.manifest.chunks.len());
    assert!(first.manifest.chunks.len() > 10);

    for b in &mut data[1_500_000..1_501_000] {
        *b ^= 0xff;
    }
    let v2 = dir.join("v2.bin");
    std::fs::write(&v2, &data).unwrap();
    let second = store.put_file(&v2).await.unwrap();
    assert!(second.new_chunks <= 3, "{} new chunks", second.new_chunks);
    assert_ne!(first.manifest.sha256, second.manifest.sha256);
    let again = store.put_file(&v1).await.unwrap();
    assert_eq!(again.new_chunks, 0, "a re-push stores nothing new");
    assert_eq!(again.manifest, first.manifest);

    let back = store.read_artifact(&second.manifest.sha256).await.unwrap();
    assert_eq!(back.as_ref(), data.as_slice());
    let manifest = store.get_manifest(&second.manifest.sha256).await.unwrap();
    assert_eq!(manifest, second.manifest);
    assert!(matches!(
        store.get_manifest(&"0".repeat(64)).await,
        Err(ArtifactError::NotFound(_))
    ));
    assert!(matches!(
        store.get_chunk(&ChunkId::of(b"never stored")).await,
        Err(ArtifactError::NotFound(_))
    ));
    assert!(matches!(
        store.get_manifest("not-a-digest").await,
        Err(ArtifactError::Invalid(_))
    ));

    // A chunk corrupted in the backend is caught on read.
    let victim = &second.manifest.chunks[0].id;
    let path = StorePath::from(format!("chunks/{victim}"));
    let mut bytes = raw
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    raw.put(&path, PutPayload::from(bytes)).await.unwrap();
    let err = store
        .read_artifact(&second.manifest.sha256)
        .await
        .expect_err("a corrupted chunk must not read back");
    assert!(
        matches!(
            err,
            ArtifactError::CorruptChunk { .. } | ArtifactError::BadEncoding { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn local_directory() {
    let dir = TempDir::new("store-local");
    let root = dir.join("store");
    let store = ArtifactStore::from_url(root.to_str().unwrap()).unwrap();
    let raw = object_store::local::LocalFileSystem::new_with_prefix(&root).unwrap();
    exercise(&store, &raw, &dir.0).await;
}

fn s3_options(s3: &S3Server) -> Vec<(String, String)> {
    s3.env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

#[tokio::test]
async fn s3_compatible_server() {
    let s3 = S3Server::start(&["shoal-artifacts"]);
    let dir = TempDir::new("store-s3");
    let store =
        ArtifactStore::from_url_opts("s3://shoal-artifacts/models", s3_options(&s3)).unwrap();
    let (bucket, _) = object_store::parse_url_opts(
        &"s3://shoal-artifacts".parse().unwrap(),
        s3_options(&s3)
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v)),
    )
    .unwrap();
    let raw =
        object_store::prefix::PrefixStore::new(Arc::<dyn ObjectStore>::from(bucket), "models");
    exercise(&store, &raw, &dir.0).await;
}

#[tokio::test]
async fn misconfigured_stores_say_what_is_wrong() {
    let s3 = S3Server::start(&[]);
    let missing = ArtifactStore::from_url_opts("s3://no-such-bucket/x", s3_options(&s3)).unwrap();
    let err = missing
        .check()
        .await
        .expect_err("the bucket does not exist");
    assert!(
        err.to_string().contains("no-such-bucket") || err.to_string().contains("NoSuchBucket"),
        "{err}"
    );

    let err = ArtifactStore::from_url_opts("ftp://example/x", Vec::new()).unwrap_err();
    assert!(err.to_string().contains("s3://bucket/prefix"), "{err}");
}
