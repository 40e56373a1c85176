//! Replicas: registration, heartbeats, the desired state each one converges
//! on, and the fleet status shown by `shoal status`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use shoal_core::VersionKey;

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
    /// A standby: it loads what it should like any replica but takes
    /// traffic only while its region is short of active replicas.
    #[serde(default)]
    pub standby: bool,
    /// What kind of capacity it runs on (`--tier`): placement keeps a
    /// model's on-demand minimum off spot replicas.
    #[serde(default)]
    pub tier: crate::scale::Tier,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Added latency per inference, in milliseconds.
    #[serde(default)]
    pub latency_ms: u64,
    /// Share of inferences that get the added latency (0..1, default all):
    /// below 1, a latency tail rather than a slow replica.
    #[serde(default = "all")]
    pub latency_rate: f64,
    /// Share of inferences answered with an error (0..1).
    #[serde(default)]
    pub error_rate: f64,
    /// Never answer (the connection stays open).
    #[serde(default)]
    pub hang: bool,
}

fn all() -> f64 {
    1.0
}

impl Default for Fault {
    fn default() -> Self {
        Fault {
            latency_ms: 0,
            latency_rate: 1.0,
            error_rate: 0.0,
            hang: false,
        }
    }
}

/// Body of `POST /api/v1/replicas/{id}/heartbeat`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// What it serves now.
    pub serving: Vec<ServingVersion>,
    /// The desired-state revision it has converged on.
    pub applied_revision: u64,
    /// The newest desired-state revision it has received. A control plane
    /// restored from an older backup moves its revision past this, so the
    /// replica takes what it says next.
    #[serde(default)]
    pub seen_revision: u64,
    /// Versions it failed to load, with why and whether it will try again
    /// (`model:version` → failure).
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, LoadFailureReport>)]
    pub failures: BTreeMap<VersionKey, LoadFailureReport>,
    /// Inference requests in flight.
    #[serde(default)]
    pub in_flight: u64,
    /// True when it is ready (every desired version loaded).
    #[serde(default)]
    pub ready: bool,
    /// Faults injected, by `model:version`.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, Fault>)]
    pub faults: BTreeMap<VersionKey, Fault>,
    /// Inference counts since each version was loaded, by `model:version`.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, VersionStats>)]
    pub stats: BTreeMap<VersionKey, VersionStats>,
    /// Memory each loaded version took when it loaded (resident set
    /// growth over its load and warm-up), bytes, by `model:version`:
    /// placement balances by it.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, u64>)]
    pub memory: BTreeMap<VersionKey, u64>,
    /// How long each loaded version took from wanted to ready (fetch,
    /// load, warm-up), ms, by `model:version`: prediction scales ahead by it.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, u64>)]
    pub load_ms: BTreeMap<VersionKey, u64>,
}

/// Whether trying again could load a version that failed to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Trying again cannot help: the artifact is not a model the engine
    /// can run, its SHA-256 does not match, or its warm-up failed.
    Definite,
    /// It might load next time: the replica was busy or restarting, its
    /// disk failed a read.
    Transient,
    /// The artifact could not be fetched from anywhere: the control plane
    /// (its artifact store) and the peers did not answer or did not have
    /// it. Nothing is wrong with the version, so the replica keeps trying
    /// (with backoff) for as long as it is wanted and never gives up on
    /// it, and a rollout bringing it in waits — a deploy made while the
    /// artifact store is down resumes when the store is back (an operator
    /// may abort it meanwhile).
    Unavailable,
}

/// Transient failures of one version a replica tries before it gives up
/// on it (until its desired state changes), and the rollout treats the
/// version as failed.
pub const TRANSIENT_LOAD_ATTEMPTS: u32 = 5;

/// Why a replica could not load a version (in heartbeats and `shoal
/// status`). Older replicas sent the reason alone, read as one transient
/// failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct LoadFailureReport {
    /// What went wrong, in words.
    pub reason: String,
    /// Whether trying again could help.
    pub kind: FailureKind,
    /// Failed attempts so far.
    pub attempts: u32,
    /// SHA-256 of the artifact that failed (empty when unknown).
    #[serde(default)]
    pub sha256: String,
}

impl LoadFailureReport {
    /// True when the replica has given up: the failure is definite, or
    /// transient failures reached [`TRANSIENT_LOAD_ATTEMPTS`] (an
    /// unavailable artifact is never given up on). A rollout bringing the
    /// version in has failed.
    pub fn gave_up(&self) -> bool {
        match self.kind {
            FailureKind::Definite => true,
            FailureKind::Transient => self.attempts >= TRANSIENT_LOAD_ATTEMPTS,
            FailureKind::Unavailable => false,
        }
    }
}

impl<'de> Deserialize<'de> for LoadFailureReport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Full {
            reason: String,
            kind: FailureKind,
            attempts: u32,
            #[serde(default)]
            sha256: String,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Full(Full),
            Reason(String),
        }
        Ok(match Either::deserialize(d)? {
            Either::Full(f) => LoadFailureReport {
                reason: f.reason,
                kind: f.kind,
                attempts: f.attempts,
                sha256: f.sha256,
            },
            Either::Reason(reason) => LoadFailureReport {
                reason,
                kind: FailureKind::Transient,
                attempts: 1,
                sha256: String::new(),
            },
        })
    }
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
    /// Bounds on request shapes.
    #[serde(default)]
    pub max_shapes: BTreeMap<String, Vec<i64>>,
    /// State inputs and the outputs feeding them (stateful models).
    #[serde(default)]
    pub state: BTreeMap<String, String>,
    /// Dynamic batching of its requests.
    #[serde(default)]
    pub batching: Option<crate::registry::Batching>,
    /// The engine to run it on.
    #[serde(default)]
    #[schema(value_type = String, example = "tract")]
    pub engine: shoal_core::Engine,
    /// Keep it if it is loaded, but do not load it (and do not wait for it
    /// to be ready): versions kept warm or draining after traffic left them.
    #[serde(default)]
    pub optional: bool,
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

impl Heartbeat {
    /// What it serves, as keys. Versions whose names are not valid (no
    /// replica reports those) are left out.
    pub fn serving_keys(&self) -> BTreeSet<VersionKey> {
        self.serving
            .iter()
            .filter_map(|s| VersionKey::parse(&s.model, &s.version).ok())
            .collect()
    }
}

impl DesiredState {
    /// `(model, version)` of everything that must be served: versions only
    /// kept if loaded (`optional`) are left out.
    pub fn required(&self) -> impl Iterator<Item = (&str, &str)> {
        self.models.iter().flat_map(|m| {
            m.versions
                .iter()
                .filter(|v| !v.optional)
                .map(move |v| (m.model.as_str(), v.version.as_str()))
        })
    }

    /// Everything that must be served, sorted. Versions whose names are not
    /// valid (no control plane sends those) are left out.
    pub fn version_keys(&self) -> Vec<VersionKey> {
        let mut keys: Vec<VersionKey> = self
            .required()
            .filter_map(|(model, version)| VersionKey::parse(model, version).ok())
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
    /// What it serves.
    #[schema(value_type = Vec<String>)]
    pub serving: Vec<VersionKey>,
    /// What it should serve.
    #[schema(value_type = Vec<String>)]
    pub desired: Vec<VersionKey>,
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
    /// Inference requests per second between its last two heartbeats.
    #[serde(default)]
    pub rps: f64,
    /// Load failures reported, by `model:version`.
    #[schema(value_type = BTreeMap<String, LoadFailureReport>)]
    pub failures: BTreeMap<VersionKey, LoadFailureReport>,
    /// Faults injected, by `model:version`.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, Fault>)]
    pub faults: BTreeMap<VersionKey, Fault>,
    /// Process id (local fleets).
    pub pid: Option<u32>,
    /// A standby (see [`Registration::standby`]).
    #[serde(default)]
    pub standby: bool,
    /// Its capacity kind (see [`Registration::tier`]).
    #[serde(default)]
    pub tier: crate::scale::Tier,
    /// Memory its loaded versions took, bytes (see [`Heartbeat::memory`]).
    #[serde(default)]
    pub memory_bytes: u64,
}

/// `GET /api/v1/status`: the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FleetStatus {
    /// Current fleet revision.
    pub revision: u64,
    /// Every known replica.
    pub replicas: Vec<ReplicaView>,
    /// Rollouts in progress, and those that ended in the last
    /// [`RECENT_ROLLOUT_MS`], by model.
    #[serde(default)]
    pub rollouts: BTreeMap<String, crate::deploy::RolloutView>,
    /// The control plane's members and its leader.
    #[serde(default)]
    pub control: Option<Leadership>,
    /// Gateways that reported to this control plane.
    #[serde(default)]
    pub gateways: Vec<GatewayView>,
    /// Models placed on some replicas (`shoal scale`), with those
    /// replicas' ids; models absent here are served by every replica.
    #[serde(default)]
    pub placements: BTreeMap<String, Vec<String>>,
}

/// A gateway as the control plane knows it: by its reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GatewayView {
    /// Id.
    pub id: String,
    /// When its last report arrived.
    pub last_report: UnixMillis,
}

/// `GET /api/v1/leader`: who leads the control plane, and its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Leadership {
    /// The member holding the lease, if any holds a live one.
    pub leader: Option<String>,
    /// Its advertised address.
    pub address: Option<String>,
    /// The lease's fencing term: it grows by one each time the lease
    /// changes hands.
    pub term: u64,
    /// Members seen recently.
    pub members: Vec<Member>,
}

/// A control-plane member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Member {
    /// Its `--id`.
    pub id: String,
    /// Its `--advertise` address.
    pub address: String,
    /// When it last renewed its membership (Unix ms).
    pub last_seen: UnixMillis,
}

/// How long `shoal status` keeps showing a rollout after it ended.
pub const RECENT_ROLLOUT_MS: i64 = 15 * 60 * 1000;

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
    /// What it reports serving (`model:version`).
    #[schema(value_type = Vec<String>)]
    pub serving: Vec<VersionKey>,
    /// A standby (see [`Registration::standby`]).
    #[serde(default)]
    pub standby: bool,
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

/// Upper bounds (milliseconds) of the latency buckets replicas report; the
/// last bucket is everything above the last bound.
pub const LATENCY_BOUNDS_MS: [f64; 30] = [
    0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0,
    30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Cumulative counts of one version's inference on one replica (or summed
/// over the fleet), reported in heartbeats: what canary analysis judges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VersionStats {
    /// Requests answered or failed by the engine (not refused as bad input).
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Latency counts per bucket of [`LATENCY_BOUNDS_MS`], plus one overflow.
    pub latency: Vec<u64>,
}

impl crate::counters::Counters for VersionStats {
    /// `self - earlier`, clamped at zero (counters restart with replicas).
    fn since(&self, earlier: &VersionStats) -> VersionStats {
        VersionStats {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: self
                .latency
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(earlier.latency.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Adds `other` into `self`.
    fn add(&mut self, other: &VersionStats) {
        // Saturating: heartbeats are input, and a counter that cannot grow
        // must not take the control plane down.
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        // At most one count per latency bucket, however long the report.
        let buckets = other.latency.len().min(LATENCY_BOUNDS_MS.len() + 1);
        if self.latency.len() < buckets {
            self.latency.resize(buckets, 0);
        }
        for (i, c) in other.latency.iter().take(buckets).enumerate() {
            self.latency[i] = self.latency[i].saturating_add(*c);
        }
    }

    fn progress(&self) -> u64 {
        self.requests
    }
}

impl VersionStats {
    /// Error rate, 0 when there were no requests.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The `q` quantile of latency in milliseconds: the upper bound of the
    /// bucket it falls in (coarse, but the same for both sides of a
    /// comparison). `None` without observations.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let target = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.latency.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Some(LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_gives_up_on_definite_failures_at_once_and_transient_ones_at_the_bound() {
        let report = |kind, attempts| LoadFailureReport {
            reason: "x".into(),
            kind,
            attempts,
            sha256: String::new(),
        };
        assert!(report(FailureKind::Definite, 1).gave_up());
        assert!(!report(FailureKind::Transient, TRANSIENT_LOAD_ATTEMPTS - 1).gave_up());
        assert!(report(FailureKind::Transient, TRANSIENT_LOAD_ATTEMPTS).gave_up());
        assert!(
            !report(FailureKind::Unavailable, 10 * TRANSIENT_LOAD_ATTEMPTS).gave_up(),
            "an artifact store that is down is waited for"
        );
    }

    #[test]
    fn heartbeats_from_older_replicas_still_parse() {
        let old: Heartbeat = serde_json::from_value(serde_json::json!({
            "serving": [], "applied_revision": 3,
            "failures": {"m:2": "cannot parse the model"},
        }))
        .unwrap();
        assert_eq!(
            old.failures[&"m:2".parse().unwrap()],
            LoadFailureReport {
                reason: "cannot parse the model".into(),
                kind: FailureKind::Transient,
                attempts: 1,
                sha256: String::new(),
            }
        );
        let new = Heartbeat {
            failures: [(
                "m:2".parse().unwrap(),
                LoadFailureReport {
                    reason: "bad".into(),
                    kind: FailureKind::Definite,
                    attempts: 2,
                    sha256: "ab".into(),
                },
            )]
            .into(),
            ..Heartbeat::default()
        };
        let json = serde_json::to_value(&new).unwrap();
        assert_eq!(serde_json::from_value::<Heartbeat>(json).unwrap(), new);
    }
}
