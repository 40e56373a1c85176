//! `shoal up --autoscale`: the supervisor follows the control plane's
//! desired replica count (`GET /api/v1/scale`, what Kubernetes' scaler
//! reads too) by starting and stopping replica processes, between the
//! replicas `shoal up` started with and `--max-replicas`.
//!
//! [`step`] is the decision, pure: start what is missing at once (load
//! spikes do not wait); stop one surplus replica per pass, the newest one
//! that holds no placement (the control plane moved every scaled model off
//! it first, so stopping it costs no request), never one the fleet started
//! with. A replica stopped is deregistered, so `shoal status` stays clean.

use shoal_telemetry::say;
use std::sync::Arc;
use std::time::Duration;

use shoal_client::ApiClient;

use crate::Supervised;

/// A replica process the autoscaler may stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// Child name (`replica-4`).
    pub name: String,
    /// Some scaled model is placed on it.
    pub placed: bool,
}

/// What to do this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing.
    Hold,
    /// Start this many replicas.
    Start(usize),
    /// Stop this one.
    Stop(String),
}

/// The decision: `base` replicas were started with the fleet and are never
/// stopped; `extra` are those the autoscaler started, oldest first.
pub fn step(desired: u32, base: usize, max: usize, extra: &[Running]) -> Step {
    let target = (desired as usize).clamp(base, max.max(base));
    let running = base + extra.len();
    if running < target {
        return Step::Start(target - running);
    }
    if running > target
        && let Some(idle) = extra.iter().rev().find(|r| !r.placed)
    {
        return Step::Stop(idle.name.clone());
    }
    Step::Hold
}

/// Starts a replica process named `name`.
pub type Launch = Box<dyn Fn(&str) -> Arc<Supervised> + Send + Sync>;

/// The loop: one pass a second until the task is aborted.
pub(crate) async fn run(
    client: ApiClient,
    launch: Launch,
    base: usize,
    max: usize,
    spawned: Arc<std::sync::Mutex<Vec<Arc<Supervised>>>>,
    data_dir: std::path::PathBuf,
) {
    let mut extra: Vec<Arc<Supervised>> = Vec::new();
    let mut next = base;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let (scale, status) = match tokio::try_join!(client.fleet_scale(), client.status()) {
            Ok(both) => both,
            Err(e) => {
                tracing::warn!(error = %e, "autoscale: cannot read the control plane; holding");
                continue;
            }
        };
        let id_of = |name: &str| {
            std::fs::read_to_string(data_dir.join(name).join("replica-id"))
                .map(|s| s.trim().to_owned())
                .ok()
        };
        let placed_ids: std::collections::BTreeSet<&String> =
            status.placements.values().flatten().collect();
        let running: Vec<Running> = extra
            .iter()
            .map(|c| Running {
                name: c.name().to_owned(),
                // Not registered yet: treat as placed (it may be given a
                // model any moment).
                placed: id_of(c.name()).is_none_or(|id| placed_ids.contains(&id)),
            })
            .collect();
        match step(scale.desired_replicas, base, max, &running) {
            Step::Hold => {}
            Step::Start(n) => {
                for _ in 0..n {
                    let name = format!("replica-{next}");
                    next += 1;
                    say!(
                        "autoscale: starting {name} ({} wanted)",
                        scale.desired_replicas
                    );
                    let child = launch(&name);
                    spawned
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(child.clone());
                    extra.push(child);
                }
            }
            Step::Stop(name) => {
                let Some(i) = extra.iter().position(|c| c.name() == name) else {
                    continue;
                };
                let child = extra.remove(i);
                say!(
                    "autoscale: stopping {name} ({} wanted)",
                    scale.desired_replicas
                );
                spawned
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|c| !Arc::ptr_eq(c, &child));
                child.stop().await;
                if let Some(id) = id_of(&name)
                    && let Err(e) = client.deregister_replica(&id).await
                {
                    tracing::warn!(replica = %id, error = %e, "autoscale: cannot deregister");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(names: &[(&str, bool)]) -> Vec<Running> {
        names
            .iter()
            .map(|(n, placed)| Running {
                name: (*n).into(),
                placed: *placed,
            })
            .collect()
    }

    #[test]
    fn starts_what_is_missing_at_once_within_the_bounds() {
        assert_eq!(step(5, 2, 6, &[]), Step::Start(3));
        assert_eq!(
            step(9, 2, 6, &running(&[("replica-2", true)])),
            Step::Start(3)
        );
        assert_eq!(
            step(1, 2, 6, &[]),
            Step::Hold,
            "never below the fleet it started with"
        );
        assert_eq!(
            step(
                6,
                2,
                6,
                &running(&[("a", true), ("b", true), ("c", true), ("d", true)])
            ),
            Step::Hold
        );
    }

    #[test]
    fn stops_the_newest_replica_holding_no_placement_one_at_a_time() {
        let extra = running(&[
            ("replica-2", false),
            ("replica-3", true),
            ("replica-4", false),
        ]);
        assert_eq!(step(2, 2, 6, &extra), Step::Stop("replica-4".into()));
        // Every surplus replica still holds a model: wait for placement.
        let extra = running(&[("replica-2", true), ("replica-3", true)]);
        assert_eq!(step(2, 2, 6, &extra), Step::Hold);
    }
}
