//! Shoal's benchmarks. Every benchmark measures Shoal and its reference
//! side by side in the same run, alternating rounds (A B A B …), and reports
//! the median of the per-round figures, as PERF.md asks: the machines are
//! shared and noisy, so only ratios taken together mean anything.
//!
//! - [`runtime`]: tract against ONNX Runtime on the same inputs.
//! - [`drill`] (`shoal-drill`, re-exported): disaster drills against a
//!   running fleet (RTO, RPO), and leader failovers of several control
//!   planes, trial after trial.
//! - [`registry`]: registry write throughput and latency, SQLite against
//!   PostgreSQL.
//! - [`sequences`]: a stateful model's steps with the state in a
//!   replica's memory against Redis, takeovers, memory per sequence.
//! - [`watchers`]: a control plane keeping many replicas up to date by
//!   watch streams against NATS JetStream.
//! - [`backup`]: backup and restore of many versions against tar + zstd of
//!   the same data directory.
//! - [`codec`]: reading a JSON inference request in process: the
//!   gateway's precheck against a plain serde walk, the replica's decode
//!   against the same decode by serde alone.
//! - [`overhead`]: a replica's serving overhead, HTTP end-to-end p50 minus
//!   raw in-process inference p50.
//! - [`fleet`]: convergence of many replicas against one, delta-update wire
//!   bytes against rsync, and origin egress with regional fan-out.
//! - [`load`] (`shoal-load`, re-exported): an open-loop load generator
//!   (latency from the intended send time), used against Shoal's gateway,
//!   nginx and HAProxy alike, and its latency [`stats`].
//!
//! The `shoal` binary links this crate only with its `bench` feature (on
//! by default; the container image is built without it), so a production
//! build carries no network-namespace or traffic-control code.
//! - [`herd`]: the control plane's request rate under 1,000 polling
//!   replicas (a simulation driven by the agent's own jitter code).
//! - [`topology`]: the DR study's three fleet shapes ramped to failure, with
//!   and without a replica killed, on emulated hosts.
//! - [`batching`]: dynamic batching against each request alone, closed
//!   loop at several concurrencies.
//! - [`protocols`]: REST with JSON, REST with binary tensors and gRPC on
//!   the same replica.
//! - [`lab`]: emulated hosts (network namespaces with rate-limited links
//!   and CPU quotas) for fleet benchmarks that need separate machines.

// Benchmarks measure real time on purpose (clippy.toml steers other code
// to tokio's clock, which paused-time tests control).
#![allow(clippy::disallowed_types)]

pub mod autoscale;
pub mod backup;
pub mod batching;
pub mod codec;
pub mod fleet;
pub mod herd;
pub mod lab;
pub mod overhead;
pub mod protocols;
pub mod registry;
pub mod runtime;
pub mod sequences;
pub mod topology;
pub mod watchers;

pub use shoal_drill as drill;
pub use shoal_load as load;
pub use shoal_load::{digits_request, stats};

use std::path::PathBuf;

/// The repository's `models/` directory, found from the working directory
/// or the source tree.
pub fn models_dir() -> PathBuf {
    let cwd = PathBuf::from("models");
    if cwd.join("digits-v1.onnx").is_file() {
        return cwd;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// `n` digits samples from `models/digits-samples.json` (cycled), as rows
/// of 64.
pub fn digits_rows(n: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    #[derive(serde::Deserialize)]
    struct Samples {
        inputs: Vec<Vec<f32>>,
    }
    let text = std::fs::read_to_string(models_dir().join("digits-samples.json"))?;
    let samples: Samples = serde_json::from_str(&text)?;
    Ok(samples.inputs.into_iter().cycle().take(n).collect())
}
