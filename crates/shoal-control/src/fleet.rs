//! What replicas report, kept in memory: heartbeats, liveness and version
//! skew. Heartbeats change every few seconds and mean nothing after a
//! restart; members of a control plane that share a registry pass them to
//! each other through it (`leader::share_heartbeats` merges them here).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use shoal_api::counters::accumulate;
use shoal_api::fleet::{Heartbeat, ReplicaView};
use shoal_api::{UnixMillis, now_millis};
use shoal_core::VersionKey;
use shoal_registry::ReplicaRecord;
use shoal_rollout::{FleetFacts, ReplicaFacts};
use tokio::time::Instant;

#[derive(Debug, Clone)]
struct Live {
    at: Instant,
    at_millis: UnixMillis,
    report: Heartbeat,
    skew_since: Option<(Instant, UnixMillis)>,
    /// Requests per second between this heartbeat and the one before.
    rps: f64,
}

/// A live replica's figures that capacity decisions read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapacityReport {
    /// Requests in flight.
    pub in_flight: u64,
    /// Memory per loaded `model:version`, bytes.
    pub memory: BTreeMap<VersionKey, u64>,
    /// Time from wanted to ready per loaded `model:version`, ms.
    pub load_ms: BTreeMap<VersionKey, u64>,
}

/// Heartbeats and liveness of every replica.
#[derive(Debug)]
pub struct LiveFleet {
    dead_after: Duration,
    skew_threshold: Duration,
    live: Mutex<BTreeMap<String, Live>>,
    /// Inference counts per `model:version`, summed over replicas and kept
    /// monotonic across replica restarts (a counter that went down restarted).
    totals: Mutex<BTreeMap<VersionKey, shoal_api::fleet::VersionStats>>,
}

/// Requests a replica answered per second between two of its heartbeats
/// (0 across a restart, when its counters went down).
fn requests_per_second(old: &Live, new: &Heartbeat, at: Instant) -> f64 {
    let seconds = at.saturating_duration_since(old.at).as_secs_f64();
    if seconds <= 0.0 {
        return old.rps;
    }
    let sum = |h: &Heartbeat| h.stats.values().map(|s| s.requests).sum::<u64>();
    sum(new).saturating_sub(sum(&old.report)) as f64 / seconds
}

impl LiveFleet {
    /// A fleet where silence for `dead_after` means down and skew for
    /// `skew_threshold` means behind.
    pub fn new(dead_after: Duration, skew_threshold: Duration) -> LiveFleet {
        LiveFleet {
            dead_after,
            skew_threshold,
            live: Mutex::new(BTreeMap::new()),
            totals: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records a heartbeat; returns true when what the replica serves changed.
    pub fn heartbeat(&self, id: &str, report: Heartbeat) -> bool {
        self.record(id, report, Duration::ZERO)
    }

    /// Records a heartbeat another member received `age` ago, unless a
    /// newer one is known; true when what the replica serves changed.
    pub fn merge(&self, id: &str, report: Heartbeat, age: Duration) -> bool {
        self.record(id, report, age)
    }

    fn record(&self, id: &str, report: Heartbeat, age: Duration) -> bool {
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live.get(id).is_some_and(|old| old.at > at) {
            return false;
        }
        // A new load failure matters to the rollout controller at once.
        let changed = live.get(id).is_none_or(|old| {
            old.report.serving_keys() != report.serving_keys()
                || old.report.ready != report.ready
                || old.report.failures != report.failures
        });
        let skew_since = live.get(id).and_then(|l| l.skew_since);
        let rps = live
            .get(id)
            .map_or(0.0, |old| requests_per_second(old, &report, at));
        {
            let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
            for (key, now) in &report.stats {
                // Counters go down when the version was reloaded or the
                // replica restarted.
                let before = live.get(id).and_then(|l| l.report.stats.get(key));
                accumulate(totals.entry(key.clone()).or_default(), before, now);
            }
        }
        live.insert(
            id.to_owned(),
            Live {
                at,
                at_millis: now_millis() - i64::try_from(age.as_millis()).unwrap_or(0),
                report,
                skew_since,
                rps,
            },
        );
        changed
    }

    /// Inference counts per `model:version` over the fleet since the
    /// control plane started.
    pub fn totals(&self) -> BTreeMap<VersionKey, shoal_api::fleet::VersionStats> {
        self.totals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What placement and the autoscaler read of each live replica's last
    /// heartbeat, by id.
    pub fn capacity_reports(&self) -> BTreeMap<String, CapacityReport> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, l)| l.at.elapsed() < self.dead_after)
            .map(|(id, l)| {
                (
                    id.clone(),
                    CapacityReport {
                        in_flight: l.report.in_flight,
                        memory: l.report.memory.clone(),
                        load_ms: l.report.load_ms.clone(),
                    },
                )
            })
            .collect()
    }

    /// Forgets a replica.
    pub fn forget(&self, id: &str) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// True when `id` heartbeated within `dead_after`.
    pub fn is_alive(&self, id: &str) -> bool {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .is_some_and(|l| l.at.elapsed() < self.dead_after)
    }

    /// Planning facts for the registered replicas.
    pub fn facts(&self, registrations: &[ReplicaRecord]) -> Vec<ReplicaFacts> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        registrations
            .iter()
            .map(|r| {
                let l = live.get(&r.registration.id);
                ReplicaFacts {
                    failures: l.map(|l| l.report.failures.clone()).unwrap_or_default(),
                    id: r.registration.id.clone(),
                    address: r.registration.address.clone(),
                    region: r.registration.region.clone(),
                    alive: l.is_some_and(|l| l.at.elapsed() < self.dead_after),
                    serving: l.map(|l| l.report.serving_keys()).unwrap_or_default(),
                    standby: r.registration.standby,
                }
            })
            .collect()
    }

    /// The fleet as `shoal status` shows it. Updates skew tracking: a
    /// replica whose serving set differs from its desired set is skewed
    /// from the first time that is seen, and behind once it has been
    /// skewed for longer than the threshold.
    pub fn views(&self, registrations: &[ReplicaRecord], facts: &FleetFacts) -> Vec<ReplicaView> {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        registrations
            .iter()
            .map(|r| {
                let id = &r.registration.id;
                let state = shoal_rollout::plan::desired_state(facts, id);
                let desired = state.version_keys();
                // Versions kept warm or draining may be served or not.
                let allowed: BTreeSet<VersionKey> = state
                    .models
                    .iter()
                    .flat_map(|m| {
                        m.versions
                            .iter()
                            .filter_map(move |v| VersionKey::parse(&m.model, &v.version).ok())
                    })
                    .collect();
                let entry = live.get_mut(id);
                let alive = entry
                    .as_ref()
                    .is_some_and(|l| l.at.elapsed() < self.dead_after);
                let faults = entry
                    .as_ref()
                    .map(|l| l.report.faults.clone())
                    .unwrap_or_default();
                let entry_rps = entry.as_ref().filter(|_| alive).map_or(0.0, |l| l.rps);
                let memory_bytes = entry
                    .as_ref()
                    .map_or(0, |l| l.report.memory.values().sum::<u64>());
                let (serving, ready, last, in_flight, failures) = match &entry {
                    Some(l) => (
                        l.report.serving_keys().into_iter().collect(),
                        l.report.ready,
                        Some(l.at_millis),
                        l.report.in_flight,
                        l.report.failures.clone(),
                    ),
                    None => (Vec::new(), false, None, 0, BTreeMap::new()),
                };
                let skew = !desired.iter().all(|d| serving.contains(d))
                    || !serving.iter().all(|s| allowed.contains(s));
                let mut skew_since = None;
                let mut behind = false;
                if let Some(l) = entry {
                    if skew {
                        let since = *l.skew_since.get_or_insert((Instant::now(), now_millis()));
                        behind = since.0.elapsed() >= self.skew_threshold;
                        skew_since = Some(since.1);
                    } else {
                        l.skew_since = None;
                    }
                }
                ReplicaView {
                    memory_bytes,
                    tier: r.registration.tier,
                    id: id.clone(),
                    address: r.registration.address.clone(),
                    region: r.registration.region.clone(),
                    healthy: alive && ready,
                    serving,
                    desired,
                    skew,
                    behind: behind || (!alive && skew),
                    skew_since,
                    last_heartbeat: last,
                    in_flight,
                    rps: entry_rps,
                    failures,
                    faults,
                    pid: r.registration.pid,
                    standby: r.registration.standby,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use shoal_api::fleet::{Registration, ServingVersion};

    use super::*;

    fn record(id: &str) -> ReplicaRecord {
        ReplicaRecord {
            registration: Registration {
                tier: Default::default(),
                id: id.into(),
                address: "a:1".into(),
                region: "r".into(),
                labels: Default::default(),
                pid: None,
                standby: false,
            },
            registered_at: 0,
        }
    }

    fn serving(v: &str) -> Heartbeat {
        Heartbeat {
            serving: vec![ServingVersion {
                model: "m".into(),
                version: v.into(),
                sha256: String::new(),
            }],
            ready: true,
            ..Heartbeat::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_means_down() {
        let fleet = LiveFleet::new(Duration::from_secs(6), Duration::from_secs(60));
        assert!(!fleet.is_alive("a"));
        assert!(fleet.heartbeat("a", serving("1")));
        assert!(
            !fleet.heartbeat("a", serving("1")),
            "same serving set: no change"
        );
        assert!(fleet.heartbeat("a", serving("2")));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(fleet.is_alive("a"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!fleet.is_alive("a"));
        assert!(!fleet.facts(&[record("a")])[0].alive);
    }

    #[tokio::test(start_paused = true)]
    async fn merged_heartbeats_keep_their_age_and_never_replace_newer_ones() {
        let fleet = LiveFleet::new(Duration::from_secs(6), Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(100)).await;
        // Another member received it 5 s ago: alive for one more second.
        assert!(fleet.merge("a", serving("1"), Duration::from_secs(5)));
        assert!(fleet.is_alive("a"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!fleet.is_alive("a"));
        fleet.heartbeat("a", serving("2"));
        // An older report (stored before the one received here) is ignored.
        assert!(!fleet.merge("a", serving("1"), Duration::from_secs(1)));
        assert_eq!(fleet.facts(&[record("a")])[0].serving.len(), 1);
        assert!(
            fleet.facts(&[record("a")])[0]
                .serving
                .contains(&"m:2".parse().unwrap())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn totals_survive_replica_restarts() {
        use shoal_api::fleet::VersionStats;
        let fleet = LiveFleet::new(Duration::from_secs(6), Duration::from_secs(60));
        let hb = |requests: u64, errors: u64| Heartbeat {
            stats: [(
                "m:1".parse().unwrap(),
                VersionStats {
                    requests,
                    errors,
                    latency: vec![requests],
                },
            )]
            .into(),
            ..serving("1")
        };
        fleet.heartbeat("a", hb(10, 1));
        fleet.heartbeat("b", hb(5, 0));
        fleet.heartbeat("a", hb(15, 1));
        // a restarts: its counter starts again from 0.
        fleet.heartbeat("a", hb(3, 0));
        let t = &fleet.totals()[&"m:1".parse().unwrap()];
        assert_eq!((t.requests, t.errors), (10 + 5 + 5 + 3, 1));
        assert_eq!(t.latency, vec![23]);
    }

    #[tokio::test(start_paused = true)]
    async fn skew_turns_into_behind_after_the_threshold() {
        let fleet = LiveFleet::new(Duration::from_secs(600), Duration::from_secs(60));
        fleet.heartbeat("a", serving("1"));
        // Nothing deployed: desired is empty, serving is not: skewed.
        let facts = FleetFacts::default();
        let v = &fleet.views(&[record("a")], &facts)[0];
        assert!(v.skew && !v.behind);
        tokio::time::advance(Duration::from_secs(61)).await;
        fleet.heartbeat("a", serving("1"));
        let v = &fleet.views(&[record("a")], &facts)[0];
        assert!(v.skew && v.behind, "{v:?}");
        fleet.heartbeat(
            "a",
            Heartbeat {
                ready: true,
                ..Heartbeat::default()
            },
        );
        let v = &fleet.views(&[record("a")], &facts)[0];
        assert!(!v.skew && !v.behind);
        assert!(v.healthy);
    }
}
