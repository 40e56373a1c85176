//! Backups against real stores (SQLite and a local artifact directory):
//! restore gives back the same registry and the same bytes, backups are
//! incremental by chunk, a damaged backup is refused with what is wrong,
//! and a snapshot taken while deploys go on is of one revision.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shoal_api::backup::BackupProgress;
use shoal_api::deploy::Deployment;
use shoal_artifacts::ArtifactStore;
use shoal_backup::{BackupError, Destination};
use shoal_registry::sqlite::SqliteRegistry;
use shoal_registry::{Audit, RegistryStore, StoredDeployment, TokenRecord, VersionDraft};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-backup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic pseudo-random bytes (incompressible, like weights).
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Plane {
    registry: Arc<SqliteRegistry>,
    artifacts: ArtifactStore,
    dir: PathBuf,
}

async fn plane(dir: &Path) -> Plane {
    Plane {
        registry: Arc::new(
            SqliteRegistry::open(&dir.join("registry.db"))
                .await
                .unwrap(),
        ),
        artifacts: ArtifactStore::local(&dir.join("artifacts")).unwrap(),
        dir: dir.to_owned(),
    }
}

impl Plane {
    /// Pushes `content` as the next version of `model`.
    async fn push(&self, model: &str, content: &[u8]) -> String {
        let file = self.dir.join("upload");
        std::fs::write(&file, content).unwrap();
        let stored = self.artifacts.put_file(&file).await.unwrap();
        self.registry
            .create_version(
                model,
                VersionDraft {
                    sha256: stored.manifest.sha256.clone(),
                    size: stored.manifest.size,
                    ..VersionDraft::default()
                },
                Audit::by("test", "push"),
            )
            .await
            .unwrap();
        stored.manifest.sha256
    }

    async fn deploy(&self, model: &str, version: &str) -> u64 {
        let deployment: Deployment = serde_json::from_value(serde_json::json!({
            "model": model,
            "revision": 0,
            "updated_at": 0,
            "targets": [{"version": version, "weight": 100}],
            "regions": null,
            "rollout": null,
        }))
        .unwrap();
        self.registry
            .put_deployment(
                StoredDeployment {
                    deployment,
                    controller: serde_json::Value::Null,
                },
                "deploy",
                Audit::by("test", "deploy"),
            )
            .await
            .unwrap()
    }
}

fn chunk_files(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir.join("chunks")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test]
async fn a_backup_restores_to_the_same_registry_and_bytes_and_the_next_one_copies_only_new_chunks()
{
    let root = temp("roundtrip");
    let source = plane(&root.join("source")).await;
    let v1 = bytes(1, 3 << 20);
    let sha1 = source.push("digits", &v1).await;
    let mut v2 = v1.clone();
    v2[1 << 20..(1 << 20) + 4096].copy_from_slice(&bytes(2, 4096));
    let sha2 = source.push("digits", &v2).await;
    source.deploy("digits", "2").await;
    source
        .registry
        .create_token(
            TokenRecord::new(
                "ops",
                shoal_api::auth::Role::Deployer,
                "c".repeat(64),
                "test",
            ),
            Audit::by("test", "token"),
        )
        .await
        .unwrap();

    let dest = Destination::open(root.join("backups").to_str().unwrap()).unwrap();
    let seen = std::sync::Mutex::new(Vec::<BackupProgress>::new());
    let first = shoal_backup::create(source.registry.as_ref(), &source.artifacts, &dest, &|p| {
        seen.lock().unwrap().push(p)
    })
    .await
    .unwrap();
    assert_eq!(first.counts.versions, 2);
    assert_eq!(first.artifacts.len(), 2);
    assert_eq!(
        first.copied_chunks, first.chunks,
        "a first backup copies everything"
    );
    let last = *seen.lock().unwrap().last().unwrap();
    assert_eq!(
        (last.done, last.total),
        (first.copied_bytes, first.copied_bytes)
    );

    let checked = shoal_backup::verify(&dest, None, &shoal_backup::quiet)
        .await
        .unwrap();
    assert_eq!(
        (checked.id.as_str(), checked.artifacts),
        (first.id.as_str(), 2)
    );

    // Restore into an empty data directory: the same rows, the same bytes.
    let target = plane(&root.join("target")).await;
    shoal_backup::restore(
        &dest,
        Some(&first.id),
        target.registry.as_ref(),
        &target.artifacts,
        &shoal_backup::quiet,
    )
    .await
    .unwrap();
    assert_eq!(
        target.registry.dump().await.unwrap(),
        source.registry.dump().await.unwrap()
    );
    for (sha, content) in [(&sha1, &v1), (&sha2, &v2)] {
        assert_eq!(
            &target.artifacts.read_artifact(sha).await.unwrap()[..],
            &content[..]
        );
        assert_eq!(
            target.artifacts.get_manifest(sha).await.unwrap(),
            source.artifacts.get_manifest(sha).await.unwrap()
        );
    }
    // A second restore into it is refused: it is not empty any more.
    let again = shoal_backup::restore(
        &dest,
        None,
        target.registry.as_ref(),
        &target.artifacts,
        &shoal_backup::quiet,
    )
    .await;
    assert!(
        matches!(&again, Err(BackupError::Invalid(m)) if m.contains("not empty")),
        "{again:?}"
    );

    // One more version, another backup: only its new chunks travel.
    let mut v3 = v2.clone();
    v3[2 << 20..(2 << 20) + 4096].copy_from_slice(&bytes(3, 4096));
    let sha3 = source.push("digits", &v3).await;
    let before: std::collections::HashSet<_> = [&sha1, &sha2]
        .iter()
        .flat_map(|s| {
            futures::executor::block_on(source.artifacts.get_manifest(s))
                .unwrap()
                .chunks
        })
        .map(|c| c.id)
        .collect();
    let new_chunks = source
        .artifacts
        .get_manifest(&sha3)
        .await
        .unwrap()
        .chunks
        .into_iter()
        .filter(|c| !before.contains(&c.id))
        .map(|c| c.id)
        .collect::<std::collections::HashSet<_>>();
    let second = shoal_backup::create(
        source.registry.as_ref(),
        &source.artifacts,
        &dest,
        &shoal_backup::quiet,
    )
    .await
    .unwrap();
    assert_eq!(second.copied_chunks, new_chunks.len() as u64);
    assert!(second.copied_chunks > 0 && second.copied_chunks < second.chunks / 4);
    assert_eq!(
        shoal_backup::list(&dest)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id.clone())
            .collect::<Vec<_>>(),
        [first.id.clone(), second.id.clone()]
    );

    // Pruning to the newest keeps every chunk it needs, so it verifies.
    let chunks_before = chunk_files(&root.join("backups")).len();
    let pruned = shoal_backup::prune(&dest, 1).await.unwrap();
    assert_eq!(pruned.backups, std::slice::from_ref(&first.id));
    assert_eq!(
        pruned.chunks, 0,
        "the newest backup needs every older chunk"
    );
    assert_eq!(chunk_files(&root.join("backups")).len(), chunks_before);
    shoal_backup::verify(&dest, None, &shoal_backup::quiet)
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn a_damaged_backup_is_refused_with_what_is_wrong_and_restores_nothing() {
    let root = temp("damaged");
    let source = plane(&root.join("source")).await;
    let sha = source.push("m", &bytes(7, 1 << 20)).await;
    let dest = Destination::open(root.join("backups").to_str().unwrap()).unwrap();
    let record = shoal_backup::create(
        source.registry.as_ref(),
        &source.artifacts,
        &dest,
        &shoal_backup::quiet,
    )
    .await
    .unwrap();

    // One flipped byte in one chunk.
    let chunk = source.artifacts.get_manifest(&sha).await.unwrap().chunks[1]
        .id
        .clone();
    let path = root.join("backups").join("chunks").join(chunk.as_str());
    let mut stored = std::fs::read(&path).unwrap();
    let last = stored.len() - 1;
    stored[last] ^= 0xff;
    std::fs::write(&path, &stored).unwrap();

    let refused = shoal_backup::verify(&dest, None, &shoal_backup::quiet).await;
    match refused {
        Err(BackupError::Damaged { id, what }) => {
            assert_eq!(id, record.id);
            assert!(what.contains(chunk.as_str()), "{what}");
        }
        other => panic!("expected a damaged backup, got {other:?}"),
    }
    let target = plane(&root.join("target")).await;
    let refused = shoal_backup::restore(
        &dest,
        None,
        target.registry.as_ref(),
        &target.artifacts,
        &shoal_backup::quiet,
    )
    .await;
    assert!(
        matches!(refused, Err(BackupError::Damaged { .. })),
        "{refused:?}"
    );
    assert_eq!(target.registry.revision().await.unwrap(), 0);
    assert!(target.registry.list_models().await.unwrap().is_empty());
    assert!(chunk_files(&root.join("target").join("artifacts")).is_empty());

    // A registry snapshot that is not what its record says.
    std::fs::write(&path, {
        stored[last] ^= 0xff;
        &stored
    })
    .unwrap();
    let snapshot = root.join("backups").join(&record.registry.path);
    let mut bytes = std::fs::read(&snapshot).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&snapshot, bytes).unwrap();
    let refused = shoal_backup::verify(&dest, Some(&record.id), &shoal_backup::quiet).await;
    assert!(
        matches!(&refused, Err(BackupError::Damaged { what, .. }) if what.contains("SHA-256")),
        "{refused:?}"
    );
    // An id that is not there says where to look.
    let missing = shoal_backup::verify(&dest, Some("nope"), &shoal_backup::quiet).await;
    assert!(matches!(&missing, Err(BackupError::NotFound(m)) if m.contains("backup list")));
    let _ = std::fs::remove_dir_all(&root);
}

/// Deploys bump the revision while backups are taken: every snapshot is
/// of one revision — its newest deployment carries exactly the revision
/// it records — and restores as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_deploys_is_of_one_revision() {
    let root = temp("during");
    let source = Arc::new(plane(&root.join("source")).await);
    source.push("a", &bytes(11, 300_000)).await;
    source.push("b", &bytes(12, 300_000)).await;
    source.deploy("a", "1").await;
    let dest = Destination::open(root.join("backups").to_str().unwrap()).unwrap();
    let writer = {
        let source = source.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                source.deploy(if i % 2 == 0 { "a" } else { "b" }, "1").await;
            }
        })
    };
    let mut records = Vec::new();
    while !writer.is_finished() {
        records.push(
            shoal_backup::create(
                source.registry.as_ref(),
                &source.artifacts,
                &dest,
                &shoal_backup::quiet,
            )
            .await
            .unwrap(),
        );
    }
    writer.await.unwrap();
    assert!(!records.is_empty());
    for record in &records {
        let (_, dump) = shoal_backup::open(&dest, Some(&record.id)).await.unwrap();
        let newest = dump
            .deployments
            .iter()
            .map(|d| {
                serde_json::from_str::<Deployment>(&d.deployment)
                    .unwrap()
                    .revision
            })
            .max()
            .unwrap();
        assert_eq!(
            newest, dump.revision,
            "backup {} mixes revisions",
            record.id
        );
    }
    let restored = plane(&root.join("target")).await;
    let last = records.last().unwrap();
    shoal_backup::restore(
        &dest,
        Some(&last.id),
        restored.registry.as_ref(),
        &restored.artifacts,
        &shoal_backup::quiet,
    )
    .await
    .unwrap();
    assert_eq!(restored.registry.revision().await.unwrap(), last.revision);
    let _ = std::fs::remove_dir_all(&root);
}
