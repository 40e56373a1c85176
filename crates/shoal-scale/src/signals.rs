//! A model's load signals from the fleet's cumulative counters: requests
//! per second and the p99 over a sliding window. Counters that went down
//! (a control plane that restarted) restart the window.

use std::collections::VecDeque;

use shoal_api::UnixMillis;
use shoal_api::counters::Counters;
use shoal_api::fleet::VersionStats;

/// The window signals are measured over by default.
pub const WINDOW_MS: i64 = 10_000;

/// Cumulative totals of one model, sampled.
#[derive(Debug, Clone)]
pub struct LoadWindow {
    window_ms: i64,
    samples: VecDeque<(UnixMillis, VersionStats)>,
}

impl Default for LoadWindow {
    fn default() -> Self {
        LoadWindow::new(WINDOW_MS)
    }
}

impl LoadWindow {
    /// Signals over the last `window_ms`.
    pub fn new(window_ms: i64) -> LoadWindow {
        LoadWindow {
            window_ms: window_ms.max(1),
            samples: VecDeque::new(),
        }
    }

    /// Takes the model's cumulative totals at `now`.
    pub fn push(&mut self, now: UnixMillis, totals: VersionStats) {
        if self
            .samples
            .back()
            .is_some_and(|(_, last)| totals.requests < last.requests)
        {
            self.samples.clear();
        }
        self.samples.push_back((now, totals));
        // Keep the newest sample at least a window old, to measure from.
        while self.samples.len() > 2 && self.samples[1].0 <= now - self.window_ms {
            self.samples.pop_front();
        }
    }

    fn span(&self) -> Option<(f64, VersionStats)> {
        let (first_at, first) = self.samples.front()?;
        let (last_at, last) = self.samples.back()?;
        let seconds = (last_at - first_at) as f64 / 1000.0;
        (seconds > 0.0).then(|| (seconds, last.since(first)))
    }

    /// Requests per second over the window; `None` until two samples.
    pub fn rps(&self) -> Option<f64> {
        self.span().map(|(s, d)| d.requests as f64 / s)
    }

    /// The p99 latency over the window (bucket bound), ms.
    pub fn p99_ms(&self) -> Option<f64> {
        self.span().and_then(|(_, d)| d.quantile_ms(0.99))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(requests: u64) -> VersionStats {
        VersionStats {
            requests,
            errors: 0,
            latency: vec![requests],
        }
    }

    #[test]
    fn rates_over_the_last_window() {
        let mut w = LoadWindow::default();
        w.push(0, totals(0));
        assert_eq!(w.rps(), None);
        w.push(1000, totals(50));
        assert_eq!(w.rps(), Some(50.0));
        for s in 2..=30 {
            w.push(s * 1000, totals(50 + (s as u64 - 1) * 20));
        }
        // The last 10 s carried 20/s.
        assert_eq!(w.rps(), Some(20.0));
        assert!(w.p99_ms().is_some());
        // A shorter window follows faster.
        let mut short = LoadWindow::new(2000);
        for s in 0..=10 {
            short.push(
                s * 1000,
                totals(if s < 8 {
                    s as u64 * 10
                } else {
                    70 + (s as u64 - 7) * 100
                }),
            );
        }
        assert_eq!(short.rps(), Some(100.0));
        // Counters went down: start again.
        w.push(31_000, totals(3));
        assert_eq!(w.rps(), None);
    }
}
