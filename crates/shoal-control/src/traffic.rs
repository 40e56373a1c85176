//! What gateways report (shadow comparisons, rewards), summed over
//! gateways and kept monotonic across gateway restarts, the way replica
//! heartbeats are. Members of a control plane that share a registry pass
//! these reports to each other through it, like heartbeats.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use shoal_api::counters::accumulate;
use shoal_api::traffic::{GatewayReport, RewardStats, ShadowStats};
use tokio::time::Instant;

/// Totals over every gateway.
#[derive(Debug, Default)]
pub(crate) struct TrafficTotals {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    last: BTreeMap<String, (Instant, GatewayReport)>,
    shadow: BTreeMap<String, ShadowStats>,
    rewards: BTreeMap<shoal_core::VersionKey, RewardStats>,
    /// When each gateway's newest report was received (wall clock).
    seen: BTreeMap<String, shoal_api::UnixMillis>,
}

impl TrafficTotals {
    /// Adds what gateway `id` saw since its last report.
    pub(crate) fn report(&self, id: &str, report: GatewayReport) {
        self.merge(id, report, Duration::ZERO);
    }

    /// Adds a report another member received `age` ago, unless a newer
    /// one from that gateway is known.
    pub(crate) fn merge(&self, id: &str, report: GatewayReport, age: Duration) {
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.last.get(id).is_some_and(|(seen, _)| *seen > at) {
            return;
        }
        let previous = inner.last.remove(id).map(|(_, r)| r).unwrap_or_default();
        // A gateway restarted counts from zero again.
        for (model, now) in &report.shadow {
            let total = inner.shadow.entry(model.clone()).or_default();
            accumulate(total, previous.shadow.get(model), now);
        }
        for (key, now) in &report.rewards {
            let total = inner.rewards.entry(key.clone()).or_default();
            accumulate(total, previous.rewards.get(key), now);
        }
        inner.last.insert(id.to_owned(), (at, report));
        let age = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        inner
            .seen
            .insert(id.to_owned(), shoal_api::now_millis().saturating_sub(age));
    }

    /// Every gateway that reported, with when.
    pub(crate) fn gateways(&self) -> Vec<shoal_api::fleet::GatewayView> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .seen
            .iter()
            .map(|(id, at)| shoal_api::fleet::GatewayView {
                id: id.clone(),
                last_report: *at,
            })
            .collect()
    }

    /// Shadow comparisons per model.
    pub(crate) fn shadow(&self) -> BTreeMap<String, ShadowStats> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shadow
            .clone()
    }

    /// Rewards per `model:version`.
    pub(crate) fn rewards(&self) -> BTreeMap<shoal_core::VersionKey, RewardStats> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rewards
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reports_from_other_members_count_once_and_never_go_back() {
        let t = TrafficTotals::default();
        let report = |count: u64| GatewayReport {
            rewards: [(
                "m:1".parse().unwrap(),
                RewardStats {
                    count,
                    sum: count as f64,
                    sum_sq: count as f64,
                },
            )]
            .into(),
            ..GatewayReport::default()
        };
        tokio::time::advance(Duration::from_secs(10)).await;
        t.merge("g", report(5), Duration::from_secs(2));
        t.report("g", report(8));
        // The same report again, and an older one: nothing added (an older
        // one would otherwise look like a restarted gateway).
        t.merge("g", report(8), Duration::ZERO);
        t.merge("g", report(5), Duration::from_secs(2));
        assert_eq!(t.rewards()[&"m:1".parse().unwrap()].count, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn sums_gateways_and_survives_their_restarts() {
        let t = TrafficTotals::default();
        let report = |count: u64, sum: f64| GatewayReport {
            rewards: [(
                "m:1".parse().unwrap(),
                RewardStats {
                    count,
                    sum,
                    sum_sq: sum,
                },
            )]
            .into(),
            ..GatewayReport::default()
        };
        t.report("a", report(10, 5.0));
        t.report("b", report(4, 4.0));
        t.report("a", report(12, 6.0));
        t.report("a", report(1, 1.0)); // restarted
        let r = &t.rewards()[&"m:1".parse().unwrap()];
        assert_eq!(r.count, 12 + 4 + 1);
        assert!((r.sum - 11.0).abs() < 1e-9);
    }
}
