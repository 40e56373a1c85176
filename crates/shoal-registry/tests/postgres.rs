//! The PostgreSQL registry against a real PostgreSQL server the test
//! starts itself (`shoal_testkit::PostgresServer`): the conformance suite,
//! concurrent writers, and an upgrade from the previous schema.

use shoal_registry::postgres::{MIGRATOR, PostgresRegistry};
use shoal_registry::{Audit, RegistryStore, VersionDraft};
use shoal_testkit::PostgresServer;

fn draft(c: char) -> VersionDraft {
    VersionDraft {
        sha256: c.to_string().repeat(64),
        size: 1,
        ..VersionDraft::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_conformance_suite_and_keeps_concurrent_writers_apart() {
    let server = PostgresServer::start();
    let store = PostgresRegistry::open(&server.database("suite"))
        .await
        .unwrap();
    shoal_registry::suite::test_all(&store).await;
    // A dump loads into another database, and moves between engines.
    let copy = PostgresRegistry::open(&server.database("copy"))
        .await
        .unwrap();
    shoal_registry::suite::dump_and_load(&store, &copy).await;
    let dir = std::env::temp_dir().join(format!("shoal-pg-dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sqlite = shoal_registry::sqlite::SqliteRegistry::open(&dir.join("registry.db"))
        .await
        .unwrap();
    shoal_registry::suite::dump_and_load(&store, &sqlite).await;
    let back = PostgresRegistry::open(&server.database("back"))
        .await
        .unwrap();
    shoal_registry::suite::dump_and_load(&sqlite, &back).await;
    let _ = std::fs::remove_dir_all(&dir);

    // Sixteen pushes of one new model at once: sixteen distinct numbers,
    // and an audit log whose positions are gapless and in commit order.
    let concurrent = PostgresRegistry::open(&server.database("concurrent"))
        .await
        .unwrap();
    let pushes: Vec<_> = (0..16)
        .map(|i| {
            let store = concurrent.clone();
            tokio::spawn(async move {
                store
                    .create_version("m", draft(char::from(b'a' + i)), Audit::by("t", "x"))
                    .await
                    .unwrap()
                    .version
            })
        })
        .collect();
    let mut numbers = Vec::new();
    for p in pushes {
        numbers.push(p.await.unwrap().parse::<u32>().unwrap());
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=16).collect::<Vec<_>>());
    let log = concurrent.audit_log(0, 100).await.unwrap();
    let seqs: Vec<i64> = log.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=16).collect::<Vec<_>>());
}

/// A newer control plane upgrades a database an older one left: the
/// migrations it has not seen are applied, and the data stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_the_previous_schema_is_upgraded() {
    let server = PostgresServer::start();
    let url = server.database("old");
    {
        // The schema as the first PostgreSQL store left it, with data.
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        MIGRATOR.run_to(1, &pool).await.unwrap();
        pool.close().await;
    }
    server.psql(
        "old",
        "INSERT INTO models VALUES ('m', 1, 2);
         INSERT INTO versions (model, version, seq, sha256, size, created_at, labels, metrics, lineage, input_shapes, status)
           VALUES ('m', '1', 1, 'aa', 5, 1, '{}', '{}', NULL, '{}', 'production');",
    );
    let store = PostgresRegistry::open(&url).await.unwrap();
    let old = store.get_version("m", "1").await.unwrap().unwrap();
    assert!(old.max_shapes.is_empty());
    let mut bounded = draft('b');
    bounded.max_shapes.insert("x".into(), vec![-1, 64]);
    let new = store
        .create_version("m", bounded, Audit::by("t", "x"))
        .await
        .unwrap();
    assert_eq!(
        (new.version.as_str(), new.max_shapes["x"].clone()),
        ("2", vec![-1, 64])
    );
    // A second control plane opening the same database finds it current.
    let second = PostgresRegistry::open(&url).await.unwrap();
    assert_eq!(second.get_version("m", "2").await.unwrap().unwrap(), new);
}

/// Every member learns of a revision another member committed, by
/// `LISTEN/NOTIFY`, in commit order and only once it is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_hear_of_each_others_revisions() {
    use futures::StreamExt;
    let server = PostgresServer::start();
    let url = server.database("notify");
    let listener = PostgresRegistry::open(&url).await.unwrap();
    let writer = PostgresRegistry::open(&url).await.unwrap();
    assert!(listener.shared());
    let mut changes = listener
        .changes()
        .await
        .unwrap()
        .expect("PostgreSQL announces");
    for c in ['a', 'b', 'c'] {
        // Versions are not desired state: no revision, no announcement.
        writer
            .create_version("m", draft(c), Audit::by("t", "x"))
            .await
            .unwrap();
    }
    assert_eq!(
        writer
            .advance_revision(40, Audit::by("t", "x"))
            .await
            .unwrap(),
        40
    );
    let registration = shoal_api::fleet::Registration {
        tier: Default::default(),
        id: "r1".into(),
        address: "127.0.0.1:1".into(),
        region: "local".into(),
        labels: Default::default(),
        pid: None,
        standby: false,
    };
    let second = writer.register_replica(&registration).await.unwrap();
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), changes.next())
            .await
            .expect("a notification")
            .unwrap()
            .unwrap();
        heard.push(next);
    }
    assert_eq!(heard, [40, second]);
    assert_eq!(listener.revision().await.unwrap(), second);
}
