//! Latency recording and summaries.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies of one series, in nanoseconds.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        // 1 ns to 100 s at 3 significant digits.
        Latencies(
            Histogram::new_with_bounds(1, 100_000_000_000, 3).unwrap_or_else(|_| {
                Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid"))
            }),
        )
    }
}

impl Latencies {
    /// Records one observation.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        let _ = self.0.record(ns);
    }

    /// The `q` quantile (0..1) in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let ns = self.0.value_at_quantile(q) as f64;
        ns / 1e3
    }

    /// Adds `other`'s observations.
    pub fn merge(&mut self, other: &Latencies) {
        let _ = self.0.add(&other.0);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// p50, p95, p99 and p99.9 in microseconds.
    pub fn summary(&self) -> Summary {
        Summary {
            p50_us: self.quantile_us(0.5),
            p95_us: self.quantile_us(0.95),
            p99_us: self.quantile_us(0.99),
            p999_us: self.quantile_us(0.999),
            count: self.count(),
        }
    }
}

/// A latency summary.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Median, µs.
    pub p50_us: f64,
    /// 95th percentile, µs.
    pub p95_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Observations.
    pub count: u64,
}

/// The median of `values` (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A figure measured once per round: the median, which benchmarks report,
/// and the lowest and highest round, which say how stable it was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    /// Median over rounds.
    pub median: f64,
    /// Lowest round.
    pub min: f64,
    /// Highest round.
    pub max: f64,
}

impl Spread {
    /// The spread of per-round `values` (all 0 when empty).
    pub fn of(values: &[f64]) -> Spread {
        Spread {
            median: median(values),
            min: values.iter().copied().reduce(f64::min).unwrap_or(0.0),
            max: values.iter().copied().reduce(f64::max).unwrap_or(0.0),
        }
    }

    /// `median unit (min–max)` with `decimals`, for tables.
    pub fn show(&self, decimals: usize, unit: &str) -> String {
        format!(
            "{:.decimals$}{unit} ({:.decimals$}–{:.decimals$})",
            self.median, self.min, self.max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn spreads() {
        let s = Spread::of(&[1.2, 1.0, 1.1, 1.5]);
        assert_eq!((s.min, s.max), (1.0, 1.5));
        assert!((s.median - 1.15).abs() < 1e-9);
        assert_eq!(s.show(2, "×"), "1.15× (1.00–1.50)");
        assert_eq!(Spread::of(&[]), Spread::default());
    }

    #[test]
    fn quantiles() {
        let mut l = Latencies::default();
        for us in 1..=100 {
            l.record(Duration::from_micros(us));
        }
        let s = l.summary();
        assert!((s.p50_us - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p99_us - 99.0).abs() < 0.1, "{s:?}");
        assert_eq!(s.count, 100);
    }
}
