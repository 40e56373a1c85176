//! Peak-EWMA latency estimation.

use std::time::Duration;

/// A latency estimate that takes a slow response at face value at once and
/// forgets it exponentially: one slow replica is avoided immediately, and
/// tried again once it has had time to recover.
#[derive(Debug, Clone, PartialEq)]
pub struct PeakEwma {
    /// Estimate, in nanoseconds.
    estimate_ns: f64,
    /// When it was last updated.
    updated: Duration,
    /// Decay time constant.
    decay_ns: f64,
}

impl PeakEwma {
    /// A new estimate starting at `initial` (used until the first response).
    pub fn new(initial: Duration, decay: Duration, now: Duration) -> PeakEwma {
        PeakEwma {
            estimate_ns: initial.as_nanos() as f64,
            updated: now,
            decay_ns: decay.as_nanos().max(1) as f64,
        }
    }

    fn decayed(&self, now: Duration) -> f64 {
        let elapsed = now.saturating_sub(self.updated).as_nanos() as f64;
        self.estimate_ns * (-elapsed / self.decay_ns).exp()
    }

    /// Records a response that took `rtt`.
    pub fn observe(&mut self, rtt: Duration, now: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let current = self.decayed(now);
        self.estimate_ns = if rtt > current {
            rtt
        } else {
            let elapsed = now.saturating_sub(self.updated).as_nanos() as f64;
            let w = (-elapsed / self.decay_ns).exp();
            self.estimate_ns * w + rtt * (1.0 - w)
        };
        self.updated = now;
    }

    /// The estimate now, in nanoseconds, decayed since the last response
    /// but never below 1 ns (so costs keep ordering by outstanding requests).
    pub fn estimate_ns(&self, now: Duration) -> f64 {
        self.decayed(now).max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn jumps_to_peaks_and_decays_back() {
        let mut e = PeakEwma::new(MS, Duration::from_secs(10), Duration::ZERO);
        e.observe(100 * MS, MS);
        assert!(
            (e.estimate_ns(MS) - 100e6).abs() < 1.0,
            "a peak is taken at once"
        );
        // Fast responses pull it down only gradually.
        e.observe(MS, MS * 2);
        assert!(e.estimate_ns(MS * 2) > 99e6);
        // With time it decays towards zero without any response.
        assert!(e.estimate_ns(Duration::from_secs(30)) < 100e6 * 0.06);
    }
}
