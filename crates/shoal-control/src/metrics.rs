//! The control plane's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use shoal_rollout::FleetFacts;
use shoal_telemetry::MetricsRegistry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    model: String,
    model_version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub(crate) result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    replica_id: String,
}

/// Counts one open stream for as long as it lives.
#[derive(Debug)]
pub(crate) struct Open(Gauge);

impl Open {
    /// Counts one more on `gauge` until dropped.
    pub(crate) fn on(gauge: &Gauge) -> Open {
        gauge.inc();
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every metric family the control plane exports.
#[derive(Debug, Clone)]
pub(crate) struct ControlMetrics {
    pub(crate) revision: Gauge,
    active: Family<VersionLabels, Gauge>,
    replicas_alive: Gauge,
    replicas_behind: Gauge,
    skew: Family<ReplicaLabels, Gauge>,
    egress: Family<KindLabels, Counter>,
    polls: Family<ResultLabels, Counter>,
    pub(crate) watchers: Gauge,
    pub(crate) dashboard_streams: Gauge,
    pub(crate) backups: Family<ResultLabels, Counter>,
    pub(crate) last_backup: Gauge,
    pub(crate) leader: Gauge,
    pub(crate) term: Gauge,
    events: Family<ResultLabels, Counter>,
}

impl ControlMetrics {
    /// Counts one event published (or one failed attempt).
    pub(crate) fn event(&self, ok: bool) {
        self.events
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    pub(crate) fn new(registry: &MetricsRegistry) -> ControlMetrics {
        let m = ControlMetrics {
            revision: Gauge::default(),
            active: Family::default(),
            replicas_alive: Gauge::default(),
            replicas_behind: Gauge::default(),
            skew: Family::default(),
            egress: Family::default(),
            polls: Family::default(),
            watchers: Gauge::default(),
            dashboard_streams: Gauge::default(),
            backups: Family::default(),
            last_backup: Gauge::default(),
            leader: Gauge::default(),
            term: Gauge::default(),
            events: Family::default(),
        };
        registry.register(
            "shoal_events_published",
            "Desired states and routing tables published on NATS JetStream, by result (ok, failed)",
            m.events.clone(),
        );
        registry.register(
            "shoal_control_leader",
            "1 while this control plane leads (runs the rollout controller), else 0",
            m.leader.clone(),
        );
        registry.register(
            "shoal_control_leader_term",
            "The leader lease's term as this control plane last saw it",
            m.term.clone(),
        );
        registry.register(
            "shoal_backups",
            "Backups taken, by result (ok, failed)",
            m.backups.clone(),
        );
        registry.register(
            "shoal_backup_last_success_timestamp_seconds",
            "When the last successful backup was taken (Unix seconds; 0: none since start)",
            m.last_backup.clone(),
        );
        registry.register(
            "shoal_fleet_revision",
            "Current fleet revision",
            m.revision.clone(),
        );
        registry.register(
            "model_active_replicas",
            "Live replicas serving each model version",
            m.active.clone(),
        );
        registry.register(
            "shoal_replicas_alive",
            "Replicas heartbeating",
            m.replicas_alive.clone(),
        );
        registry.register(
            "shoal_replicas_behind",
            "Replicas whose serving versions have differed from desired for longer than the skew threshold",
            m.replicas_behind.clone(),
        );
        registry.register(
            "shoal_replica_version_skew",
            "1 while a replica serves something other than its desired versions",
            m.skew.clone(),
        );
        registry.register(
            "shoal_artifact_egress_bytes",
            "Bytes of artifacts served by the origin, by kind (chunk, manifest)",
            m.egress.clone(),
        );
        registry.register(
            "shoal_desired_polls",
            "Conditional desired-state polls, by result (not_modified, fresh)",
            m.polls.clone(),
        );
        registry.register(
            "shoal_watch_streams",
            "Open watch streams",
            m.watchers.clone(),
        );
        registry.register(
            "shoal_dashboard_streams",
            "Open dashboard event streams (one per open dashboard page)",
            m.dashboard_streams.clone(),
        );
        m
    }

    pub(crate) fn egress(&self, kind: &'static str, bytes: usize) {
        self.egress
            .get_or_create(&KindLabels { kind })
            .inc_by(bytes as u64);
    }

    /// Bytes the origin has served (chunks and manifests) since start.
    pub(crate) fn egress_total(&self) -> u64 {
        ["chunk", "manifest"]
            .into_iter()
            .map(|kind| self.egress.get_or_create(&KindLabels { kind }).get())
            .sum()
    }

    pub(crate) fn poll(&self, fresh: bool) {
        let result = if fresh { "fresh" } else { "not_modified" };
        self.polls.get_or_create(&ResultLabels { result }).inc();
    }

    /// Recomputes the fleet gauges at scrape time.
    pub(crate) fn update_fleet(&self, facts: &FleetFacts) {
        self.active.clear();
        let mut alive = 0;
        for r in facts.replicas.iter().filter(|r| r.alive) {
            alive += 1;
            for key in &r.serving {
                self.active
                    .get_or_create(&VersionLabels {
                        model: key.model.to_string(),
                        model_version: key.version.to_string(),
                    })
                    .inc();
            }
        }
        self.replicas_alive.set(alive);
    }

    pub(crate) fn update_skew(&self, views: &[shoal_api::fleet::ReplicaView]) {
        self.skew.clear();
        for v in views {
            self.skew
                .get_or_create(&ReplicaLabels {
                    replica_id: v.id.clone(),
                })
                .set(i64::from(v.skew));
        }
        self.replicas_behind
            .set(i64::try_from(views.iter().filter(|v| v.behind).count()).unwrap_or(0));
    }
}
