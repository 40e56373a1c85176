//! Thundering herd: replicas restarted at the same instant poll the control
//! plane with the agent's own schedule ([`shoal_sync::poll`]); this counts
//! polls per second over a window and reports peak ÷ mean.

use std::time::Duration;

use rand::SeedableRng;
use serde::Serialize;

/// The outcome of a simulation.
#[derive(Debug, Clone, Serialize)]
pub struct Herd {
    /// Polling replicas.
    pub replicas: usize,
    /// Poll interval.
    pub interval_s: f64,
    /// Simulated time.
    pub duration_s: f64,
    /// Mean polls per second.
    pub mean_rps: f64,
    /// Busiest second.
    pub peak_rps: u64,
    /// Peak ÷ mean.
    pub peak_over_mean: f64,
}

/// Simulates `replicas` replicas that all start at t = 0.
pub fn simulate(replicas: usize, interval: Duration, duration: Duration, seed: u64) -> Herd {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let seconds = usize::try_from(duration.as_secs()).unwrap_or(0).max(1);
    let mut buckets = vec![0u64; seconds];
    for _ in 0..replicas {
        let mut t = shoal_sync::poll::first_delay(&mut rng, interval);
        while t < duration {
            let b = usize::try_from(t.as_secs()).unwrap_or(0);
            buckets[b.min(seconds - 1)] += 1;
            t += shoal_sync::poll::next_delay(&mut rng, interval);
        }
    }
    let total: u64 = buckets.iter().sum();
    #[allow(clippy::cast_precision_loss)]
    let mean = total as f64 / seconds as f64;
    let peak = buckets.iter().copied().max().unwrap_or(0);
    #[allow(clippy::cast_precision_loss)]
    let ratio = if mean > 0.0 { peak as f64 / mean } else { 0.0 };
    Herd {
        replicas,
        interval_s: interval.as_secs_f64(),
        duration_s: duration.as_secs_f64(),
        mean_rps: mean,
        peak_rps: peak,
        peak_over_mean: ratio,
    }
}
