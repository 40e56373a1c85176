//! Outlier ejection with backoff and slow start.

use std::time::Duration;

/// What went wrong with a request to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connection refused or could not be made.
    Connect,
    /// Connection reset or closed mid-request.
    Reset,
    /// No answer within the request timeout.
    Timeout,
    /// A 5xx answer.
    ServerError,
    /// The active health check failed.
    HealthCheck,
}

/// Settings of ejection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthPolicy {
    /// Consecutive 5xx that eject.
    pub max_server_errors: u32,
    /// First ejection's length; doubles with each ejection in a row.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Ramp after re-admission, during which the endpoint gets a growing
    /// share of traffic.
    pub slow_start: Duration,
    /// Healthy this long after re-admission: the ejection count resets.
    pub forgive_after: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            max_server_errors: 3,
            base_ejection: Duration::from_millis(500),
            max_ejection: Duration::from_secs(30),
            slow_start: Duration::from_secs(5),
            forgive_after: Duration::from_secs(60),
        }
    }
}

/// The health of one endpoint as the gateway sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    server_errors: u32,
    ejections: u32,
    ejected_until: Option<Duration>,
    admitted_at: Option<Duration>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// A healthy endpoint (no slow start: it was never ejected).
    pub fn new() -> Health {
        Health {
            server_errors: 0,
            ejections: 0,
            ejected_until: None,
            admitted_at: None,
        }
    }

    /// True while ejected.
    pub fn is_ejected(&self, now: Duration) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Records a success.
    pub fn on_success(&mut self, now: Duration, policy: &HealthPolicy) {
        self.server_errors = 0;
        if let Some(admitted) = self.admitted_at
            && now.saturating_sub(admitted) >= policy.forgive_after
        {
            self.ejections = 0;
            self.admitted_at = None;
        }
    }

    /// Records a failure; returns true when it ejected the endpoint now.
    pub fn on_failure(&mut self, failure: Failure, now: Duration, policy: &HealthPolicy) -> bool {
        if self.is_ejected(now) {
            return false;
        }
        let eject = match failure {
            Failure::Connect | Failure::Reset | Failure::Timeout | Failure::HealthCheck => true,
            Failure::ServerError => {
                self.server_errors += 1;
                self.server_errors >= policy.max_server_errors
            }
        };
        if eject {
            self.ejections = self.ejections.saturating_add(1);
            let factor = 2u32.saturating_pow(self.ejections.saturating_sub(1).min(16));
            let length = policy
                .base_ejection
                .saturating_mul(factor)
                .min(policy.max_ejection);
            self.ejected_until = Some(now + length);
            self.admitted_at = Some(now + length);
            self.server_errors = 0;
        }
        eject
    }

    /// Share of its normal traffic the endpoint should get now: 0 while
    /// ejected, ramping from 10 % to 100 % over the slow start after
    /// re-admission, 100 % otherwise.
    pub fn weight(&self, now: Duration, policy: &HealthPolicy) -> f64 {
        if self.is_ejected(now) {
            return 0.0;
        }
        match self.admitted_at {
            Some(admitted) if !policy.slow_start.is_zero() => {
                let ramp =
                    now.saturating_sub(admitted).as_secs_f64() / policy.slow_start.as_secs_f64();
                ramp.clamp(0.1, 1.0)
            }
            _ => 1.0,
        }
    }

    /// Ejections in a row so far.
    pub fn ejections(&self) -> u32 {
        self.ejections
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    #[test]
    fn connection_failures_eject_at_once_and_back_off() {
        let p = HealthPolicy::default();
        let mut h = Health::new();
        assert!(h.on_failure(Failure::Connect, s(0.0), &p));
        assert!(h.is_ejected(s(0.4)));
        assert!(!h.is_ejected(s(0.5)));
        // Failing again right after re-admission: twice as long.
        assert!(h.on_failure(Failure::Reset, s(0.6), &p));
        assert!(h.is_ejected(s(1.5)));
        assert!(!h.is_ejected(s(1.6)));
        assert_eq!(h.ejections(), 2);
        // Failures while ejected do not extend it.
        let mut g = Health::new();
        g.on_failure(Failure::Timeout, s(0.0), &p);
        assert!(!g.on_failure(Failure::Timeout, s(0.1), &p));
        assert_eq!(g.ejections(), 1);
    }

    #[test]
    fn repeated_server_errors_eject_and_successes_reset_the_count() {
        let p = HealthPolicy::default();
        let mut h = Health::new();
        assert!(!h.on_failure(Failure::ServerError, s(0.0), &p));
        assert!(!h.on_failure(Failure::ServerError, s(0.0), &p));
        h.on_success(s(0.0), &p);
        assert!(!h.on_failure(Failure::ServerError, s(0.0), &p));
        assert!(!h.on_failure(Failure::ServerError, s(0.0), &p));
        assert!(h.on_failure(Failure::ServerError, s(0.0), &p));
    }

    #[test]
    fn slow_start_ramps_after_readmission() {
        let p = HealthPolicy::default();
        let mut h = Health::new();
        assert_eq!(h.weight(s(0.0), &p), 1.0);
        h.on_failure(Failure::Connect, s(0.0), &p);
        assert_eq!(h.weight(s(0.2), &p), 0.0);
        assert!((h.weight(s(0.5), &p) - 0.1).abs() < 1e-9);
        assert!((h.weight(s(3.0), &p) - 0.5).abs() < 1e-9);
        assert_eq!(h.weight(s(6.0), &p), 1.0);
        // A minute healthy after re-admission forgives the ejections.
        h.on_success(s(61.0), &p);
        assert_eq!(h.ejections(), 0);
    }
}
