//! The replica's metrics and the events that feed them.
//!
//! Each event is a small struct whose `emit()` writes the log line and
//! updates the metric together. Per-version counters and histograms are
//! resolved once when a version is loaded ([`VersionMetrics`]), so the
//! request path only touches atomics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use shoal_api::fleet::FailureKind;
use shoal_core::{ModelName, Version};
use shoal_telemetry::{MetricsRegistry, latency_buckets};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PredictionLabels {
    model: String,
    model_version: String,
    replica_id: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    model: String,
    model_version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    model: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadFailureLabels {
    model: String,
    model_version: String,
    kind: &'static str,
}

/// Every metric family a replica exports.
#[derive(Debug, Clone)]
pub struct ReplicaMetrics {
    replica_id: String,
    predictions: Family<PredictionLabels, Counter>,
    latency: Family<VersionLabels, Histogram>,
    loaded: Family<VersionLabels, Gauge>,
    loads: Family<LoadLabels, Counter>,
    load_failures: Family<LoadFailureLabels, Counter>,
    load_seconds: Family<VersionLabels, Histogram>,
    batch_rows: Family<VersionLabels, Histogram>,
    pub(crate) pool_running: Gauge,
    pub(crate) pool_queued: Gauge,
    pub(crate) sequences_live: Gauge,
    pub(crate) session_store_up: Gauge,
    pub(crate) sequence_steps_rerun: Counter,
}

impl ReplicaMetrics {
    /// Creates the families and registers them on `registry`.
    pub fn new(registry: &MetricsRegistry, replica_id: &str) -> ReplicaMetrics {
        let metrics = ReplicaMetrics {
            replica_id: replica_id.to_owned(),
            predictions: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            loaded: Family::default(),
            loads: Family::default(),
            load_failures: Family::default(),
            load_seconds: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.001, 2.0, 16,
                ))
            }),
            batch_rows: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1.0, 2.0, 13,
                ))
            }),
            pool_running: Gauge::default(),
            pool_queued: Gauge::default(),
            sequences_live: Gauge::default(),
            session_store_up: Gauge::default(),
            sequence_steps_rerun: Counter::default(),
        };
        registry.register(
            "model_predictions",
            "Inference requests answered, by model, version, replica and outcome",
            metrics.predictions.clone(),
        );
        registry.register(
            "model_prediction_latency_seconds",
            "Time from a decoded request to an encoded response, by model and version",
            metrics.latency.clone(),
        );
        registry.register(
            "model_version_loaded",
            "Copies of a model version loaded on this replica (1 while serving; briefly 2 while a reload drains)",
            metrics.loaded.clone(),
        );
        registry.register(
            "model_loads",
            "Attempts to load a model version, by outcome",
            metrics.loads.clone(),
        );
        registry.register(
            "model_load_failures",
            "Versions that could not be made ready (fetch, verification, parse, prepare or warm-up), by kind: definite failures are not retried, transient ones up to 5 times, unavailable artifacts until the store is back",
            metrics.load_failures.clone(),
        );
        registry.register(
            "model_load_duration_seconds",
            "Time to read, verify, prepare and warm a model version",
            metrics.load_seconds.clone(),
        );
        registry.register(
            "model_batch_rows",
            "Rows per batch a batched version ran (dynamic batching): the count is batches run, the sum rows",
            metrics.batch_rows.clone(),
        );
        registry.register(
            "inference_pool_running",
            "Inferences running on the blocking pool",
            metrics.pool_running.clone(),
        );
        registry.register(
            "inference_pool_queued",
            "Inferences waiting for a pool thread",
            metrics.pool_queued.clone(),
        );
        registry.register(
            "model_sequences_live",
            "Sequences of stateful models held in this replica's memory",
            metrics.sequences_live.clone(),
        );
        registry.register(
            "session_store_up",
            "1 while the shared session store (Redis) answers, 0 while steps go on from memory alone (-1: no shared store)",
            metrics.session_store_up.clone(),
        );
        registry.register(
            "model_sequence_steps_rerun",
            "Sequence steps run again because another replica had advanced the sequence in the session store",
            metrics.sequence_steps_rerun.clone(),
        );
        metrics
    }

    /// Resolves the per-version handles for `model:version`.
    pub(crate) fn version(&self, model: &ModelName, version: &Version) -> VersionMetrics {
        let outcome = |outcome| {
            self.predictions
                .get_or_create(&PredictionLabels {
                    model: model.to_string(),
                    model_version: version.to_string(),
                    replica_id: self.replica_id.clone(),
                    outcome,
                })
                .clone()
        };
        let labels = VersionLabels {
            model: model.to_string(),
            model_version: version.to_string(),
        };
        VersionMetrics {
            success: outcome(Outcome::Success.as_str()),
            invalid_input: outcome(Outcome::InvalidInput.as_str()),
            error: outcome(Outcome::Error.as_str()),
            overloaded: outcome(Outcome::Overloaded.as_str()),
            latency: self.latency.get_or_create(&labels).clone(),
            loaded: self.loaded.get_or_create(&labels).clone(),
            batch_rows: self.batch_rows.get_or_create(&labels).clone(),
            counts: std::sync::Arc::new(VersionCounts::default()),
        }
    }
}

/// How an inference request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answered.
    Success,
    /// Refused: the request did not fit the model.
    InvalidInput,
    /// The engine failed.
    Error,
    /// Shed: the inference queue was full.
    Overloaded,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::InvalidInput => "invalid_input",
            Outcome::Error => "error",
            Outcome::Overloaded => "overloaded",
        }
    }
}

/// Handles for one loaded version, resolved at load time.
#[derive(Debug, Clone)]
pub(crate) struct VersionMetrics {
    success: Counter,
    invalid_input: Counter,
    error: Counter,
    overloaded: Counter,
    latency: Histogram,
    loaded: Gauge,
    pub(crate) batch_rows: Histogram,
    pub(crate) counts: std::sync::Arc<VersionCounts>,
}

/// Counts since this copy of the version was loaded, in the buckets the
/// control plane's canary analysis reads from heartbeats.
#[derive(Debug, Default)]
pub(crate) struct VersionCounts {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; shoal_api::fleet::LATENCY_BOUNDS_MS.len() + 1],
}

impl VersionCounts {
    fn record(&self, ok: bool, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ms = elapsed.as_secs_f64() * 1e3;
        let i = shoal_api::fleet::LATENCY_BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(shoal_api::fleet::LATENCY_BOUNDS_MS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot.
    pub(crate) fn snapshot(&self) -> shoal_api::fleet::VersionStats {
        shoal_api::fleet::VersionStats {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// An inference request finished.
pub(crate) struct PredictionServed<'a> {
    pub(crate) model: &'a ModelName,
    pub(crate) version: &'a Version,
    pub(crate) outcome: Outcome,
    pub(crate) elapsed: Duration,
    pub(crate) error: Option<&'a str>,
}

impl PredictionServed<'_> {
    pub(crate) fn emit(self, metrics: &VersionMetrics) {
        match self.outcome {
            Outcome::Success => {
                metrics.success.inc();
                metrics.latency.observe(self.elapsed.as_secs_f64());
                metrics.counts.record(true, self.elapsed);
            }
            Outcome::InvalidInput => {
                metrics.invalid_input.inc();
            }
            Outcome::Error => {
                metrics.error.inc();
                metrics.counts.record(false, self.elapsed);
                tracing::warn!(model = %self.model, version = %self.version, error = self.error, "inference failed");
            }
            Outcome::Overloaded => {
                metrics.overloaded.inc();
                tracing::debug!(model = %self.model, version = %self.version, "inference shed: queue full");
            }
        }
    }
}

/// A version was loaded, verified and warmed.
pub(crate) struct VersionLoaded<'a> {
    pub(crate) model: &'a ModelName,
    pub(crate) version: &'a Version,
    pub(crate) sha256: &'a str,
    pub(crate) load: Duration,
    pub(crate) warm: Duration,
}

impl VersionLoaded<'_> {
    pub(crate) fn emit(self, metrics: &ReplicaMetrics, version_metrics: &VersionMetrics) {
        tracing::info!(
            model = %self.model,
            version = %self.version,
            sha256 = self.sha256,
            load_ms = self.load.as_millis() as u64,
            warm_ms = self.warm.as_millis() as u64,
            "model version loaded"
        );
        metrics
            .loads
            .get_or_create(&LoadLabels {
                model: self.model.to_string(),
                outcome: "success",
            })
            .inc();
        metrics
            .load_seconds
            .get_or_create(&VersionLabels {
                model: self.model.to_string(),
                model_version: self.version.to_string(),
            })
            .observe((self.load + self.warm).as_secs_f64());
        version_metrics.loaded.inc();
    }
}

/// A version failed to load; whatever served before keeps serving.
pub(crate) struct VersionLoadFailed<'a> {
    pub(crate) model: &'a str,
    pub(crate) version: &'a str,
    pub(crate) reason: &'a str,
    pub(crate) kind: FailureKind,
    pub(crate) attempts: u32,
}

impl VersionLoadFailed<'_> {
    pub(crate) fn emit(self, metrics: &ReplicaMetrics) {
        let kind = match self.kind {
            FailureKind::Definite => "definite",
            FailureKind::Transient => "transient",
            FailureKind::Unavailable => "unavailable",
        };
        tracing::warn!(
            model = %self.model,
            version = %self.version,
            reason = self.reason,
            kind,
            attempts = self.attempts,
            "model version could not be made ready; the serving version is untouched"
        );
        metrics
            .loads
            .get_or_create(&LoadLabels {
                model: self.model.to_owned(),
                outcome: "failure",
            })
            .inc();
        metrics
            .load_failures
            .get_or_create(&LoadFailureLabels {
                model: self.model.to_owned(),
                model_version: self.version.to_owned(),
                kind,
            })
            .inc();
    }
}

/// Traffic moved to a new version; the retired ones drain.
pub(crate) struct VersionSwitched<'a> {
    pub(crate) model: &'a ModelName,
    pub(crate) version: &'a Version,
    pub(crate) retired: &'a [Version],
}

impl VersionSwitched<'_> {
    pub(crate) fn emit(self) {
        let retired: Vec<&str> = self.retired.iter().map(Version::as_str).collect();
        tracing::info!(model = %self.model, version = %self.version, retired = ?retired, "serving version switched");
    }
}

/// The last request on a retired version finished and it was freed.
pub(crate) struct VersionUnloaded<'a> {
    pub(crate) model: &'a ModelName,
    pub(crate) version: &'a Version,
}

impl VersionUnloaded<'_> {
    pub(crate) fn emit(self, metrics: &VersionMetrics) {
        tracing::info!(model = %self.model, version = %self.version, "model version drained and unloaded");
        metrics.loaded.dec();
    }
}
