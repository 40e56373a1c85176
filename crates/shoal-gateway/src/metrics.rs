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
        m
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
