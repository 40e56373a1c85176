//! What the gateway learns from traffic for rollouts: shadow comparisons
//! (the candidate's answer against the primary's) and rewards (feedback on
//! earlier predictions), reported to the control plane every second.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shoal_api::traffic::{GatewayReport, RewardStats, ShadowStats};
use shoal_core::compare::Comparison;

use crate::Gateway;

/// Requests remembered for feedback by id, and users by key.
pub(crate) const REMEMBERED: usize = 100_000;

/// A bounded map that forgets its oldest entries.
#[derive(Debug, Default)]
struct Recent {
    map: HashMap<String, String>,
    order: VecDeque<String>,
}

impl Recent {
    fn insert(&mut self, key: String, value: String) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            while self.order.len() > REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

/// What became of one mirrored request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Mirrored {
    /// The candidate failed or gave an unreadable answer.
    CandidateFailed,
    /// The candidate answered but the primary did not answer well, so
    /// there was nothing to compare with.
    Uncompared,
    /// Both answered: how they compare, and the candidate's latency minus
    /// the primary's, ms.
    Compared(Comparison, f64),
}

/// Shadow and reward bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct Learning {
    shadow: Mutex<BTreeMap<String, ShadowStats>>,
    rewards: Mutex<BTreeMap<shoal_core::VersionKey, RewardStats>>,
    by_id: Mutex<Recent>,
    by_user: Mutex<Recent>,
}

impl Learning {
    /// Remembers which version answered request `id` / user `user`.
    pub(crate) fn served(&self, model: &str, version: &str, id: Option<&str>, user: Option<&str>) {
        if let Some(id) = id {
            self.by_id
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(format!("{model}/{id}"), version.to_owned());
        }
        if let Some(user) = user {
            self.by_user
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(format!("{model}/{user}"), version.to_owned());
        }
    }

    /// The version that served request `id` or user `user` recently.
    pub(crate) fn version_of(
        &self,
        model: &str,
        id: Option<&str>,
        user: Option<&str>,
    ) -> Option<String> {
        if let Some(id) = id {
            return self
                .by_id
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .map
                .get(&format!("{model}/{id}"))
                .cloned();
        }
        let user = user?;
        self.by_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .get(&format!("{model}/{user}"))
            .cloned()
    }

    /// Records a reward for `model:version`.
    pub(crate) fn reward(&self, model: &str, version: &str, reward: f64) {
        let Ok(key) = shoal_core::VersionKey::parse(model, version) else {
            return; // the feedback handler answers bad names with 400 first
        };
        self.rewards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .record(reward);
    }

    /// Records one mirrored request's outcome.
    pub(crate) fn shadowed(&self, model: &str, outcome: Mirrored) {
        let mut shadow = self.shadow.lock().unwrap_or_else(PoisonError::into_inner);
        let s = shadow.entry(model.to_owned()).or_default();
        s.mirrored += 1;
        match outcome {
            Mirrored::CandidateFailed => s.candidate_errors += 1,
            Mirrored::Uncompared => {}
            Mirrored::Compared(c, latency_diff_ms) => {
                s.compared += 1;
                s.rows += c.rows;
                s.agreeing += c.agreeing;
                s.max_abs_diff = s.max_abs_diff.max(c.max_abs_diff.unwrap_or(0.0));
                s.latency_diff_ms_sum += latency_diff_ms;
            }
        }
    }

    /// Everything so far.
    pub(crate) fn report(&self) -> GatewayReport {
        GatewayReport {
            shadow: self
                .shadow
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            rewards: self
                .rewards
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// How often a gateway reports with nothing new: the control plane (and
/// its dashboard) see it is there.
const REPORT_AT_LEAST_EVERY: Duration = Duration::from_secs(10);

/// Reports to the control plane every second when something changed, and
/// every [`REPORT_AT_LEAST_EVERY`] regardless.
pub(crate) async fn report_loop(gateway: Arc<Gateway>) {
    let Some(control) = gateway.config.control.clone() else {
        return;
    };
    let client = shoal_client::ApiClient::control(&control, gateway.config.token.clone())
        .with_timeout(Duration::from_secs(5));
    let mut last: Option<(GatewayReport, tokio::time::Instant)> = None;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        interval.tick().await;
        let report = gateway.learning.report();
        if last
            .as_ref()
            .is_some_and(|(r, at)| *r == report && at.elapsed() < REPORT_AT_LEAST_EVERY)
        {
            continue;
        }
        match client.gateway_report(&gateway.id, &report).await {
            Ok(()) => last = Some((report, tokio::time::Instant::now())),
            Err(e) => {
                tracing::warn!(error = %e, "cannot report shadow comparisons and rewards to the control plane")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_finds_the_version_by_request_id_or_user() {
        let l = Learning::default();
        l.served("m", "2", Some("r1"), Some("alice"));
        l.served("m", "1", Some("r2"), None);
        assert_eq!(l.version_of("m", Some("r1"), None).as_deref(), Some("2"));
        assert_eq!(l.version_of("m", None, Some("alice")).as_deref(), Some("2"));
        assert_eq!(
            l.version_of("m", Some("r2"), Some("alice")).as_deref(),
            Some("1")
        );
        assert_eq!(l.version_of("other", Some("r1"), None), None);
        l.reward("m", "2", 1.0);
        l.reward("m", "2", 0.0);
        let r = &l.report().rewards[&"m:2".parse().unwrap()];
        assert_eq!((r.count, r.sum), (2, 1.0));
    }

    #[test]
    fn remembers_a_bounded_number_of_requests() {
        let mut recent = Recent::default();
        for i in 0..REMEMBERED + 10 {
            recent.insert(i.to_string(), "1".into());
        }
        assert_eq!(recent.map.len(), REMEMBERED);
        assert!(!recent.map.contains_key("0"));
        assert!(recent.map.contains_key(&(REMEMBERED + 9).to_string()));
    }

    #[test]
    fn shadow_outcomes_add_up() {
        let l = Learning::default();
        let c = Comparison {
            rows: 4,
            agreeing: 3,
            max_abs_diff: Some(0.5),
        };
        l.shadowed("m", Mirrored::Compared(c, 2.0));
        l.shadowed("m", Mirrored::Compared(c, -1.0));
        l.shadowed("m", Mirrored::CandidateFailed);
        l.shadowed("m", Mirrored::Uncompared);
        let s = &l.report().shadow["m"];
        assert_eq!((s.mirrored, s.compared, s.candidate_errors), (4, 2, 1));
        assert_eq!((s.rows, s.agreeing), (8, 6));
        assert!((s.latency_diff_ms_sum - 1.0).abs() < 1e-9);
        assert!((s.max_abs_diff - 0.5).abs() < 1e-9);
    }
}
