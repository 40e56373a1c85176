//! Replicas: registration, heartbeats, the desired state each one converges
//! on, and the fleet status shown by `shoal status`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::UnixMillis;

/// Body of `POST /api/v1/replicas`: a replica announces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Stable id (kept in the replica's data directory).
    pub id: String,
    /// Where it serves (`host:port`).
    pub address: String,
    /// Region.
    pub region: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Process id, for local fleets.
    #[serde(default)]
    pub pid: Option<u32>,
}

/// What the control plane answers to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    /// The replica id.
    pub id: String,
    /// How often to heartbeat.
    pub heartbeat_interval_ms: u64,
}

/// A version a replica serves.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub struct ServingVersion {
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// Artifact SHA-256.
    pub sha256: String,
}

/// A fault injected into a replica for one model version (drills, tests,
/// benchmarks). Off unless configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Added latency per inference, in milliseconds.
    #[serde(default)]
    pub latency_ms: u64,
    /// Share of inferences answered with an error (0..1).
    #[serde(default)]
    pub error_rate: f64,
    /// Never answer (the connection stays open).
    #[serde(default)]
    pub hang: bool,
}

/// Body of `POST /api/v1/replicas/{id}/heartbeat`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// What it serves now.
    pub serving: Vec<ServingVersion>,
    /// The desired-state revision it has converged on.
    pub applied_revision: u64,
    /// Versions it failed to load, with why (`model:version` → reason).
    #[serde(default)]
    pub failures: BTreeMap<String, String>,
    /// Inference requests in flight.
    #[serde(default)]
    pub in_flight: u64,
    /// True when it is ready (every desired version loaded).
    #[serde(default)]
    pub ready: bool,
    /// Faults injected, by `model:version`.
    #[serde(default)]
    pub faults: BTreeMap<String, Fault>,
}

/// One version a replica should serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DesiredVersion {
    /// Version.
    pub version: String,
    /// Artifact SHA-256: the replica loads only bytes with this digest.
    pub sha256: String,
    /// Artifact size.
    pub size: u64,
    /// Input shape overrides.
    #[serde(default)]
    pub input_shapes: BTreeMap<String, Vec<i64>>,
}

/// One model a replica should serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DesiredModel {
    /// Model.
    pub model: String,
    /// The version for requests naming none.
    pub default: String,
    /// Versions to have loaded.
    pub versions: Vec<DesiredVersion>,
}

/// Another replica to fetch artifact chunks from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Peer {
    /// Replica id.
    pub id: String,
    /// `host:port`.
    pub address: String,
}

/// What one replica should serve (`GET /api/v1/replicas/{id}/desired`, and
/// each line of the watch stream).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DesiredState {
    /// Fleet revision this was computed at; only ever increases.
    pub revision: u64,
    /// Models to serve.
    pub models: Vec<DesiredModel>,
    /// Replicas in the same region, for artifact fan-out (self included).
    pub peers: Vec<Peer>,
}

impl DesiredState {
    /// `model:version` of everything desired, sorted.
    pub fn version_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .models
            .iter()
            .flat_map(|m| {
                m.versions
                    .iter()
                    .map(move |v| format!("{}:{}", m.model, v.version))
            })
            .collect();
        keys.sort();
        keys
    }
}

/// One replica in `shoal status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaView {
    /// Id.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// Region.
    pub region: String,
    /// Heartbeating and ready.
    pub healthy: bool,
    /// `model:version` it serves.
    pub serving: Vec<String>,
    /// `model:version` it should serve.
    pub desired: Vec<String>,
    /// Serving differs from desired.
    pub skew: bool,
    /// Skewed for longer than the threshold: flagged.
    pub behind: bool,
    /// Since when serving has differed from desired.
    pub skew_since: Option<UnixMillis>,
    /// Last heartbeat.
    pub last_heartbeat: Option<UnixMillis>,
    /// Requests in flight at the last heartbeat.
    pub in_flight: u64,
    /// Load failures reported.
    pub failures: BTreeMap<String, String>,
    /// Faults injected, by `model:version`.
    #[serde(default)]
    pub faults: BTreeMap<String, Fault>,
    /// Process id (local fleets).
    pub pid: Option<u32>,
}

/// `GET /api/v1/status`: the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FleetStatus {
    /// Current fleet revision.
    pub revision: u64,
    /// Every known replica.
    pub replicas: Vec<ReplicaView>,
}

/// A replica as gateways see it in the routing table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RouteEndpoint {
    /// Replica id.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// Region.
    pub region: String,
    /// Heartbeating and ready, as the control plane last saw it.
    pub alive: bool,
    /// `model:version` it reports serving.
    pub serving: Vec<String>,
}

/// How a gateway splits one model's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelPolicy {
    /// Model.
    pub model: String,
    /// Versions and weights for requests that name no version.
    pub targets: Vec<crate::deploy::TrafficTarget>,
    /// Regions the model may be served in (data residency); all when absent.
    pub regions: Option<Vec<String>>,
    /// Traffic mirrored to a shadow version.
    #[serde(default)]
    pub shadow: Option<crate::deploy::Shadow>,
    /// Header that keeps a user on one version.
    #[serde(default)]
    pub split_header: Option<String>,
}

/// Everything a gateway needs to route (`GET /api/v1/routing`, and each
/// line of `/api/v1/routing/watch`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoutingTable {
    /// Fleet revision it was computed at.
    pub revision: u64,
    /// Every registered replica.
    pub endpoints: Vec<RouteEndpoint>,
    /// Every deployed model's policy.
    pub models: Vec<ModelPolicy>,
}
