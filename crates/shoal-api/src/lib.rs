//! The documents the control plane's API exchanges (`/api/v1/…`), shared
//! by the control plane (server), replicas and gateways (watchers) and the
//! CLI (client), so all of them agree on one definition.
//!
//! - [`auth`]: token roles, the permission each endpoint needs, tokens.
//! - [`backup`]: what a backup records about itself, and its progress.
//! - [`registry`]: models, versions, statuses, the audit log.
//! - [`deploy`]: deployments and the rollout state users see.
//! - [`fleet`]: replica registration, heartbeats, desired state, status.
//! - [`history`]: the per-version time series the dashboard charts.
//! - [`traffic`]: what gateways report: shadow comparisons, rewards.
//! - [`replica`]: what replicas tell gateways directly: the admin listing,
//!   the headers naming who answered.
//! - [`scale`]: placement specs, tiers, autoscaler recommendations.
//! - [`counters`]: summing cumulative counters over reporters that restart.
//!
//! Architecture invariant: pure serde types and tiny pure helpers (token
//! hashing and generation among them). No I/O.

pub mod auth;
pub mod backup;
pub mod counters;
pub mod deploy;
pub mod duration;
pub mod fleet;
pub mod history;
pub mod registry;
pub mod replica;
pub mod scale;
pub mod traffic;

/// The key of one version of one model (`digits:2`), as every document
/// here writes it.
pub use shoal_core::VersionKey;

/// The URL of `path` on a fleet member reached at `address`: an address
/// is `host:port` (plain HTTP) or carries its scheme (`https://host:port`,
/// what members serving TLS advertise).
pub fn member_url(address: &str, path: &str) -> String {
    if address.contains("://") {
        format!("{address}{path}")
    } else {
        format!("http://{address}{path}")
    }
}

/// Milliseconds since the Unix epoch, the timestamp unit of every document.
pub type UnixMillis = i64;

/// Now, in [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
