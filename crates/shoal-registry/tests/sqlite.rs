//! The SQLite registry passes the conformance suite, and keeps what it
//! acknowledged across a reopen.

use shoal_registry::sqlite::SqliteRegistry;
use shoal_registry::{Audit, RegistryStore, VersionDraft};

fn temp_db(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-registry-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("registry.db")
}

#[tokio::test]
async fn sqlite_passes_the_conformance_suite() {
    let path = temp_db("suite");
    let store = SqliteRegistry::open(&path).await.unwrap();
    shoal_registry::suite::test_all(&store).await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn acknowledged_writes_survive_a_reopen() {
    let path = temp_db("reopen");
    {
        let store = SqliteRegistry::open(&path).await.unwrap();
        let draft = VersionDraft {
            sha256: "a".repeat(64),
            size: 1,
            ..VersionDraft::default()
        };
        store
            .create_version("m", draft, Audit::by("t", "x"))
            .await
            .unwrap();
    }
    let store = SqliteRegistry::open(&path).await.unwrap();
    assert!(store.get_version("m", "1").await.unwrap().is_some());
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
