//! The gateway's metrics.

use std::sync::{Arc, RwLock};

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
    /// Handles of the metrics every request touches.
    hot: Arc<RwLock<hashbrown::HashMap<String, ModelHandles>>>,
}

/// One model's handles into the families every request touches, looked
/// up once: a family lookup hashes the label set with std's SipHash and
/// allocates its strings, 3.5 % of a proxied request's instructions when
/// done per request (BENCHMARKS.md, callgrind). A handle shares its
/// family's value, so the exposition is the same. Label sets are bounded
/// as the families' are (`proxy::metric_labels`).
#[derive(Debug)]
struct ModelHandles {
    latency: Histogram,
    attempts: Counter,
    /// `gateway_requests` by version and status code.
    requests: RwLock<Vec<(Box<str>, u16, Counter)>>,
}

/// A lock's value even if a holder panicked (the handles stay valid).
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
            hot: Arc::default(),
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

    /// Runs `f` on `model`'s handles, looked up in the families the
    /// first time.
    fn with_model<R>(&self, model: &str, f: impl FnOnce(&ModelHandles) -> R) -> R {
        if let Some(handles) = read(&self.hot).get(model) {
            return f(handles);
        }
        let labels = ModelLabels {
            model: model.to_owned(),
        };
        let handles = ModelHandles {
            latency: self.latency.get_or_create(&labels).clone(),
            attempts: self.attempts.get_or_create(&labels).clone(),
            requests: RwLock::default(),
        };
        f(write(&self.hot).entry_ref(model).or_insert(handles))
    }

    pub(crate) fn answered(&self, model: &str, version: &str, code: u16, seconds: f64) {
        self.with_model(model, |handles| {
            handles.latency.observe(seconds);
            let same = |(v, c, _): &&(Box<str>, u16, Counter)| **v == *version && *c == code;
            if let Some((_, _, counter)) = read(&handles.requests).iter().find(same) {
                counter.inc();
                return;
            }
            let counter = self
                .requests
                .get_or_create(&RequestLabels {
                    model: model.to_owned(),
                    model_version: version.to_owned(),
                    code,
                })
                .clone();
            counter.inc();
            let mut requests = write(&handles.requests);
            if !requests.iter().any(|entry| same(&entry)) {
                requests.push((version.into(), code, counter));
            }
        });
    }

    pub(crate) fn attempt(&self, model: &str) {
        self.with_model(model, |handles| handles.attempts.inc());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line that starts with `prefix`.
    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn cached_handles_count_in_the_families() {
        let registry = MetricsRegistry::new();
        let metrics = GatewayMetrics::new(&registry);
        for _ in 0..3 {
            metrics.answered("digits", "2", 200, 0.001);
            metrics.attempt("digits");
        }
        metrics.answered("digits", "2", 503, 0.002);
        metrics.answered("digits", "1", 200, 0.003);
        metrics.answered("other", "other", 404, 0.0);
        // A clone (each gateway task holds one) shares the handles.
        metrics.clone().attempt("digits");
        let text = registry.encode();
        let requests = |model: &str, version: &str, code: u16| {
            sample(
                &text,
                &format!(
                    "gateway_requests_total{{model=\"{model}\",model_version=\"{version}\",code=\"{code}\"}}"
                ),
            )
        };
        assert_eq!(requests("digits", "2", 200), Some(3.0), "{text}");
        assert_eq!(requests("digits", "2", 503), Some(1.0), "{text}");
        assert_eq!(requests("digits", "1", 200), Some(1.0), "{text}");
        assert_eq!(requests("other", "other", 404), Some(1.0), "{text}");
        assert_eq!(
            sample(&text, "gateway_upstream_attempts_total{model=\"digits\"}"),
            Some(4.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "gateway_request_duration_seconds_count{model=\"digits\"}"
            ),
            Some(5.0),
            "{text}"
        );
    }
}
