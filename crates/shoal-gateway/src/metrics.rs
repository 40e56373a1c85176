//! The gateway's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use shoal_telemetry::{MetricsRegistry, latency_buckets};

use crate::routes::Routes;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    model_version: String,
    code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    model: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EjectionLabels {
    replica_id: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerLabels {
    caller: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShadowLabels {
    model: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgreementLabels {
    model: String,
    agreement: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    model: String,
    role: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    model: String,
    model_version: String,
}

type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Every metric family the gateway exports.
#[derive(Debug, Clone)]
pub(crate) struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<ModelLabels, Histogram>,
    attempts: Family<ModelLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    hedges: Family<ModelLabels, Counter>,
    ejections: Family<EjectionLabels, Counter>,
    limited: Family<CallerLabels, Counter>,
    endpoints: Family<StateLabels, Gauge>,
    shadow: Family<ShadowLabels, Counter>,
    shadow_rows: Family<AgreementLabels, Counter>,
    shadow_seconds: Family<RoleLabels, FloatCounter>,
    shadow_max_diff: Family<ModelLabels, FloatGauge>,
    feedback: Family<VersionLabels, Counter>,
    reward_sum: Family<VersionLabels, FloatGauge>,
}

impl GatewayMetrics {
    pub(crate) fn new(registry: &MetricsRegistry) -> GatewayMetrics {
        let m = GatewayMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            attempts: Family::default(),
            retries: Family::default(),
            hedges: Family::default(),
            ejections: Family::default(),
            limited: Family::default(),
            endpoints: Family::default(),
            shadow: Family::default(),
            shadow_rows: Family::default(),
            shadow_seconds: Family::default(),
            shadow_max_diff: Family::default(),
            feedback: Family::default(),
            reward_sum: Family::default(),
        };
        registry.register(
            "gateway_requests",
            "Inference requests answered, by model, version and status code",
            m.requests.clone(),
        );
        registry.register(
            "gateway_request_duration_seconds",
            "Time to answer an inference request, by model",
            m.latency.clone(),
        );
        registry.register(
            "gateway_upstream_attempts",
            "Requests sent to replicas, including retries and hedges",
            m.attempts.clone(),
        );
        registry.register(
            "gateway_retries",
            "Retries on another replica, by reason",
            m.retries.clone(),
        );
        registry.register(
            "gateway_hedges",
            "Hedged requests sent after the observed p95",
            m.hedges.clone(),
        );
        registry.register(
            "gateway_endpoint_ejections",
            "Replicas ejected, by reason",
            m.ejections.clone(),
        );
        registry.register(
            "gateway_rate_limited",
            "Requests refused by the rate limit, by caller",
            m.limited.clone(),
        );
        registry.register(
            "gateway_endpoints",
            "Replicas known, by state",
            m.endpoints.clone(),
        );
        registry.register(
            "gateway_shadow_requests",
            "Requests mirrored to a shadow version, by outcome",
            m.shadow.clone(),
        );
        registry.register(
            "gateway_shadow_rows",
            "Rows (batch entries) compared between primary and shadow, by whether they agreed on the class",
            m.shadow_rows.clone(),
        );
        registry.register(
            "gateway_shadow_seconds",
            "Summed latency of compared primary and shadow answers, by role",
            m.shadow_seconds.clone(),
        );
        registry.register(
            "gateway_shadow_max_abs_diff",
            "Largest absolute difference between primary and shadow float outputs",
            m.shadow_max_diff.clone(),
        );
        registry.register(
            "gateway_feedback",
            "Rewards received through feedback, by the version they credit",
            m.feedback.clone(),
        );
        registry.register(
            "gateway_feedback_reward_sum",
            "Sum of the rewards received, by the version they credit",
            m.reward_sum.clone(),
        );
        m
    }

    /// One pair of answers compared.
    pub(crate) fn compared(
        &self,
        model: &str,
        c: &shoal_core::compare::Comparison,
        primary: std::time::Duration,
        candidate: std::time::Duration,
    ) {
        let rows = |agreement: &'static str, n: u64| {
            self.shadow_rows
                .get_or_create(&AgreementLabels {
                    model: model.to_owned(),
                    agreement,
                })
                .inc_by(n);
        };
        rows("agree", c.agreeing);
        rows("disagree", c.rows - c.agreeing);
        let seconds = |role: &'static str, d: std::time::Duration| {
            self.shadow_seconds
                .get_or_create(&RoleLabels {
                    model: model.to_owned(),
                    role,
                })
                .inc_by(d.as_secs_f64());
        };
        seconds("primary", primary);
        seconds("shadow", candidate);
        if let Some(d) = c.max_abs_diff {
            let gauge = self.shadow_max_diff.get_or_create(&ModelLabels {
                model: model.to_owned(),
            });
            if d > gauge.get() {
                gauge.set(d);
            }
        }
    }

    /// One reward credited to `model:version`.
    pub(crate) fn rewarded(&self, model: &str, version: &str, reward: f64) {
        let labels = VersionLabels {
            model: model.to_owned(),
            model_version: version.to_owned(),
        };
        self.feedback.get_or_create(&labels).inc();
        self.reward_sum.get_or_create(&labels).inc_by(reward);
    }

    pub(crate) fn answered(&self, model: &str, version: &str, code: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.to_owned(),
                model_version: version.to_owned(),
                code,
            })
            .inc();
        self.latency
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
            })
            .observe(seconds);
    }

    pub(crate) fn attempt(&self, model: &str) {
        self.attempts
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
            })
            .inc();
    }

    pub(crate) fn retry(&self, model: &str, reason: &'static str) {
        self.retries
            .get_or_create(&ReasonLabels {
                model: model.to_owned(),
                reason,
            })
            .inc();
    }

    pub(crate) fn hedge(&self, model: &str) {
        self.hedges
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
            })
            .inc();
    }

    pub(crate) fn ejected(&self, replica: &str, reason: &'static str) {
        self.ejections
            .get_or_create(&EjectionLabels {
                replica_id: replica.to_owned(),
                reason,
            })
            .inc();
    }

    pub(crate) fn limited(&self, caller: &str) {
        self.limited
            .get_or_create(&CallerLabels {
                caller: caller.to_owned(),
            })
            .inc();
    }

    pub(crate) fn shadowed(&self, model: &str, outcome: &'static str) {
        self.shadow
            .get_or_create(&ShadowLabels {
                model: model.to_owned(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn update_endpoints(&self, routes: &Routes, now: std::time::Duration) {
        let state = routes.snapshot();
        let ejected = state.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let available = state.endpoints.iter().filter(|e| e.available(now)).count();
        let set = |state: &'static str, n: usize| {
            self.endpoints
                .get_or_create(&StateLabels { state })
                .set(i64::try_from(n).unwrap_or(0));
        };
        set("available", available);
        set("ejected", ejected);
        set("total", state.endpoints.len());
    }
}
