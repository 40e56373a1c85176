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
    let copy = SqliteRegistry::open(&temp_db("suite-copy")).await.unwrap();
    shoal_registry::suite::dump_and_load(&store, &copy).await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    let _ = std::fs::remove_dir_all(temp_db("suite-copy").parent().unwrap());
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

/// A registry written before request bounds existed (no `max_shapes`
/// column) opens, keeps its versions, and takes new ones with bounds.
#[tokio::test]
async fn a_registry_from_before_input_bounds_is_upgraded() {
    use sqlx::sqlite::SqliteConnectOptions;
    use std::str::FromStr;
    let path = temp_db("upgrade");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .unwrap()
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        for statement in [
            "CREATE TABLE models (name TEXT PRIMARY KEY, created_at INTEGER NOT NULL, next_number INTEGER NOT NULL)",
            "CREATE TABLE versions (model TEXT NOT NULL REFERENCES models(name), version TEXT NOT NULL, seq INTEGER NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL, created_at INTEGER NOT NULL, labels TEXT NOT NULL, metrics TEXT NOT NULL, lineage TEXT, input_shapes TEXT NOT NULL, status TEXT NOT NULL, reached_production INTEGER NOT NULL DEFAULT 0, rolled_back INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (model, version))",
            "INSERT INTO models VALUES ('m', 1, 2)",
            "INSERT INTO versions (model, version, seq, sha256, size, created_at, labels, metrics, lineage, input_shapes, status) VALUES ('m', '1', 1, 'aa', 5, 1, '{}', '{}', NULL, '{}', 'production')",
        ] {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
    let store = SqliteRegistry::open(&path).await.unwrap();
    let old = store.get_version("m", "1").await.unwrap().unwrap();
    assert!(old.max_shapes.is_empty());
    let mut draft = VersionDraft {
        sha256: "b".repeat(64),
        size: 1,
        ..VersionDraft::default()
    };
    draft.max_shapes.insert("x".into(), vec![-1, 64]);
    let new = store
        .create_version("m", draft, Audit::by("t", "x"))
        .await
        .unwrap();
    assert_eq!(new.version, "2");
    assert_eq!(new.max_shapes["x"], vec![-1, 64]);
    // Opening again changes nothing.
    drop(store);
    let store = SqliteRegistry::open(&path).await.unwrap();
    assert_eq!(store.get_version("m", "2").await.unwrap().unwrap(), new);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
