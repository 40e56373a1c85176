//! Cumulative counters that replicas and gateways report again and again,
//! and the control plane sums over reporters: only the difference since a
//! reporter's last report is added, and a counter that went down means the
//! reporter (or the version it counts for) started again from zero.

/// A set of counters reported cumulatively.
pub trait Counters: Clone + Default {
    /// `self − earlier`.
    fn since(&self, earlier: &Self) -> Self;
    /// Adds `other` into `self`.
    fn add(&mut self, other: &Self);
    /// The counter that only grows while the reporter lives; seen going
    /// down, the reporter restarted.
    fn progress(&self) -> u64;
}

/// Adds to `total` what `now` counted since `before` (the same reporter's
/// previous report, if any): all of `now` when there is none or when the
/// counters went down.
pub fn accumulate<C: Counters>(total: &mut C, before: Option<&C>, now: &C) {
    match before {
        Some(b) if b.progress() <= now.progress() => total.add(&now.since(b)),
        _ => total.add(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::RewardStats;

    fn r(count: u64, sum: f64) -> RewardStats {
        RewardStats {
            count,
            sum,
            sum_sq: sum,
        }
    }

    #[test]
    fn adds_differences_and_starts_over_after_a_restart() {
        let mut total = RewardStats::default();
        accumulate(&mut total, None, &r(3, 3.0));
        accumulate(&mut total, Some(&r(3, 3.0)), &r(5, 4.0));
        assert_eq!(total.count, 5);
        // Went down: the reporter restarted, all of it is new.
        accumulate(&mut total, Some(&r(5, 4.0)), &r(2, 1.0));
        assert_eq!(total.count, 7);
        assert!((total.sum - 5.0).abs() < 1e-9);
        // Nothing new: nothing added.
        accumulate(&mut total, Some(&r(2, 1.0)), &r(2, 1.0));
        assert_eq!(total.count, 7);
    }

    #[test]
    fn reports_at_the_limit_saturate_rather_than_overflow() {
        use crate::fleet::VersionStats;
        use crate::traffic::ShadowStats;
        let mut rewards = r(u64::MAX - 1, 1.0);
        accumulate(&mut rewards, None, &r(u64::MAX, 1.0));
        assert_eq!(rewards.count, u64::MAX);
        let mut shadow = ShadowStats::default();
        let huge = ShadowStats {
            mirrored: u64::MAX,
            rows: u64::MAX,
            ..ShadowStats::default()
        };
        accumulate(&mut shadow, None, &huge);
        accumulate(&mut shadow, None, &huge);
        assert_eq!(shadow.mirrored, u64::MAX);
        let mut stats = VersionStats::default();
        let flood = VersionStats {
            requests: u64::MAX,
            errors: 1,
            latency: vec![u64::MAX; 100_000],
        };
        accumulate(&mut stats, None, &flood);
        accumulate(&mut stats, None, &flood);
        assert_eq!(stats.requests, u64::MAX);
        assert_eq!(
            stats.latency.len(),
            crate::fleet::LATENCY_BOUNDS_MS.len() + 1
        );
    }
}
