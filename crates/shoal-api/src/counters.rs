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
}
