//! The replica's sync agent: converge on the desired state, whatever the
//! trigger.
//!
//! - One reconcile path ([`reconcile::plan`] decides, [`Agent::reconcile`]
//!   acts): fetch, verify, load, warm, switch, report. Start-up from the
//!   local cache, a watch event, a poll that found a change and a push from
//!   the control plane all end there.
//! - Three triggers: the watch stream (resumes from the last revision
//!   seen), polling with jitter ([`poll::next_delay`], conditional, 304 when
//!   nothing changed), and push (`POST /sync/nudge`).
//! - Artifacts come chunk by chunk: from the local cache, else from the
//!   regional peer that owns the chunk ([`owners`]: rendezvous hashing
//!   with bounded loads, so each chunk leaves the origin once per region
//!   and every owner uploads an even share), else from the origin. Every chunk
//!   is checked against its BLAKE3 and the artifact against its SHA-256
//!   before it is loaded.
//! - The last desired state is kept in the data directory, so a replica
//!   restarted without the control plane serves again from its cache.

mod agent;
mod fetch;
pub mod owners;
pub mod poll;
pub mod reconcile;

pub use agent::{Agent, Outcome, SyncConfig};

use std::sync::Arc;

use shoal_replica::{ReplicaConfig, ReplicaServer};
use shoal_runtime::Backend;

/// Starts a replica with its sync agent on the same port. The agent
/// advertises `sync.advertise`, or the bound address when that is empty.
pub async fn start_replica(
    mut config: ReplicaConfig,
    mut sync: SyncConfig,
    backend: Arc<dyn Backend>,
) -> std::io::Result<ReplicaServer> {
    // Peers and gateways present the fleet token the replica holds itself.
    config.admin_tokens.extend(sync.token.clone());
    let tls = config.tls.is_some();
    let cache = Agent::open_cache(&sync)
        .await
        .map_err(|e| std::io::Error::other(format!("cannot start the sync agent: {e}")))?;
    ReplicaServer::start_with(config, backend, |replica, addr| {
        if sync.advertise.is_empty() {
            // Members serving TLS say so in the address they advertise.
            sync.advertise = if tls {
                format!("https://{addr}")
            } else {
                addr.to_string()
            };
        }
        let agent = Agent::new(sync, replica, cache);
        agent.spawn();
        agent.routes()
    })
    .await
}
