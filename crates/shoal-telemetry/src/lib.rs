//! Logging and metrics plumbing shared by every Shoal role.
//!
//! Each role builds one [`MetricsRegistry`], registers its metric families
//! on it, and serves [`MetricsRegistry::encode`] at `GET /metrics`. Metric
//! names follow SPEC.md (`model_predictions_total`, …); labels stay
//! low-cardinality (model, version, replica, outcome — never request ids).
//!
//! Components report what happens as small event structs whose `emit()`
//! writes the log line and updates the metric together, so the two never
//! disagree; the events live next to the component that emits them.

/// Prints a line for the person at the terminal, like `println!`, but a
/// closed stdout is ignored instead of panicking: `shoal model list | head`
/// ends quietly, and `shoal up | head` keeps its fleet running when it
/// next has something to say. clippy.toml bans `println!` for this reason.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout().lock(), $($arg)*);
    }};
}

use std::sync::{Arc, Mutex, PoisonError};

pub use prometheus_client;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// Content type of [`MetricsRegistry::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A shared Prometheus registry.
#[derive(Debug, Clone, Default)]
pub struct MetricsRegistry {
    inner: Arc<Mutex<Registry>>,
}

impl MetricsRegistry {
    /// An empty registry.
    pub fn new() -> MetricsRegistry {
        MetricsRegistry::default()
    }

    /// Registers a metric (or family) under `name`.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register(name, help, metric);
    }

    /// The registry in the OpenMetrics text format, which Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// Latency buckets from 50 µs to about 26 s, doubling: fine enough for
/// in-process inference of small models and wide enough for slow ones.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(50e-6, 2.0, 20)
}

/// Installs the global `tracing` subscriber: human-readable lines on stderr,
/// or JSON lines when `json` is set; the level comes from `RUST_LOG`
/// (default `info`, the NATS client's connection chatter at `warn`). Safe to call more than once (later calls do nothing).
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn encodes_registered_metrics() {
        let registry = MetricsRegistry::new();
        let counter: Counter = Counter::default();
        registry.register("things", "Things seen.", counter.clone());
        counter.inc();
        let text = registry.encode();
        assert!(text.contains("# TYPE things counter"), "{text}");
        assert!(text.contains("things_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
