//! Registry write throughput and latency, SQLite against PostgreSQL on the
//! same machine in the same run: concurrent writers each storing
//! deployments of their own model (the write every deploy, rollout step
//! and abort makes: revision bumped, audit appended, one transaction, on
//! disk before it returns), rounds alternating between the stores.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use shoal_api::deploy::{Deployment, TrafficTarget};
use shoal_registry::{Audit, RegistryStore, StoredDeployment};
use tokio::time::Instant;

use crate::stats::{Latencies, Summary};

/// One store's figures.
#[derive(Debug, Clone, Serialize)]
pub struct StoreFigures {
    /// `sqlite` or `postgres`.
    pub store: String,
    /// Writes per second, per round.
    pub writes_per_s: Vec<f64>,
    /// Latency of every write of every round.
    pub latency: Summary,
}

/// The comparison.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryReport {
    /// Concurrent writers.
    pub writers: usize,
    /// Writes per writer per round.
    pub writes: usize,
    /// SQLite (embedded, WAL, synchronous=FULL), then PostgreSQL.
    pub stores: Vec<StoreFigures>,
}

fn deployment(model: &str, n: usize) -> StoredDeployment {
    StoredDeployment {
        deployment: Deployment {
            placement: None,
            scale: None,
            model: model.to_owned(),
            targets: vec![TrafficTarget {
                version: (n % 7 + 1).to_string(),
                weight: 100,
            }],
            regions: None,
            shadow: None,
            split_header: None,
            warm: Vec::new(),
            rollout: None,
            revision: 0,
            updated_at: 0,
        },
        controller: serde_json::json!({"bench": n}),
    }
}

/// One round: `writers` tasks, `writes` each; (elapsed, latencies).
async fn round(
    store: Arc<dyn RegistryStore>,
    writers: usize,
    writes: usize,
    tag: usize,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let model = format!("bench-{tag}-{w}");
                let mut latencies = Vec::with_capacity(writes);
                for n in 0..writes {
                    let t = Instant::now();
                    store
                        .put_deployment(deployment(&model, n), "deploy", Audit::by("bench", "x"))
                        .await?;
                    latencies.push(t.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(writers * writes);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((started.elapsed(), all))
}

/// `rounds` alternating rounds on a fresh SQLite registry under `dir` and
/// on the PostgreSQL registry at `postgres`.
pub async fn run(
    dir: &std::path::Path,
    postgres: &str,
    writers: usize,
    writes: usize,
    rounds: usize,
) -> anyhow::Result<RegistryReport> {
    std::fs::create_dir_all(dir)?;
    let sqlite: Arc<dyn RegistryStore> =
        Arc::new(shoal_registry::sqlite::SqliteRegistry::open(&dir.join("registry.db")).await?);
    let pg: Arc<dyn RegistryStore> =
        Arc::new(shoal_registry::postgres::PostgresRegistry::open(postgres).await?);
    let mut figures = vec![
        ("sqlite", sqlite, Vec::new(), Latencies::default()),
        ("postgres", pg, Vec::new(), Latencies::default()),
    ];
    // A warm-up round each, not counted.
    for (_, store, _, _) in &figures {
        round(store.clone(), writers, writes.min(20), usize::MAX).await?;
    }
    for r in 0..rounds {
        for (_, store, rates, latencies) in &mut figures {
            let (elapsed, each) = round(store.clone(), writers, writes, r).await?;
            rates.push((writers * writes) as f64 / elapsed.as_secs_f64());
            for d in each {
                latencies.record(d);
            }
        }
    }
    Ok(RegistryReport {
        writers,
        writes,
        stores: figures
            .into_iter()
            .map(|(name, _, rates, latencies)| StoreFigures {
                store: name.to_owned(),
                writes_per_s: rates,
                latency: latencies.summary(),
            })
            .collect(),
    })
}
