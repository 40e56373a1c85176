//! The shadow controller: the candidate is loaded everywhere beside the
//! primary, and gateways mirror a share of real requests to it, compare the
//! answers and report. Users only ever see the primary's answer. Nothing is
//! decided automatically: the operator promotes or aborts on the evidence
//! (`rollout status` shows agreement, differences, latency, errors).

use serde::{Deserialize, Serialize};
use shoal_api::counters::Counters;
use shoal_api::deploy::{RolloutState, RolloutView, Strategy};
use shoal_api::traffic::{ShadowStats, ShadowSummary};

use crate::plan::{Loading, ReplicaFacts};
use crate::progress::Progress;

/// A shadow deployment, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    /// The version users see.
    pub primary: String,
    /// The version receiving copies.
    pub candidate: String,
    /// Percent of requests mirrored.
    pub percent: u32,
    /// The fleet's shadow totals when it started (comparisons count from here).
    pub baseline: ShadowStats,
    /// True once every replica has the candidate and mirroring began.
    pub mirroring: bool,
    /// State, reason, when.
    #[serde(flatten)]
    pub progress: Progress,
}

/// The summary of `stats` (counts since the start).
pub fn summarize(stats: &ShadowStats) -> ShadowSummary {
    ShadowSummary {
        mirrored: stats.mirrored,
        compared: stats.compared,
        agreement: (stats.rows > 0).then(|| stats.agreeing as f64 / stats.rows as f64),
        rows: stats.rows,
        max_abs_diff: stats.max_abs_diff,
        latency_diff_ms: (stats.compared > 0)
            .then(|| stats.latency_diff_ms_sum / stats.compared as f64),
        candidate_errors: stats.candidate_errors,
    }
}

impl Shadow {
    /// Starts shadowing `candidate` beside `primary`.
    pub fn start(
        primary: String,
        candidate: String,
        percent: u32,
        baseline: ShadowStats,
        now: i64,
    ) -> Shadow {
        let reason = format!("loading {candidate} beside {primary} on every replica");
        Shadow {
            primary,
            candidate,
            percent: percent.min(100),
            baseline,
            mirroring: false,
            progress: Progress::start(reason, now),
        }
    }

    /// Mirroring begins once every live replica has the candidate. Returns
    /// true when that changed now.
    pub fn tick(&mut self, model: &str, replicas: &[&ReplicaFacts], now: i64) -> bool {
        if self.mirroring || self.progress.state.is_terminal() {
            return false;
        }
        if !Loading::of(model, replicas, &self.candidate).complete() {
            return false;
        }
        self.mirroring = true;
        self.progress.reason = format!(
            "mirroring {}% of requests to {}; users see {}",
            self.percent, self.candidate, self.primary
        );
        self.progress.updated_at = now;
        true
    }

    /// True while mirroring may happen.
    pub fn is_running(&self) -> bool {
        !self.progress.state.is_terminal()
    }

    /// The candidate takes all traffic.
    pub fn promote(&mut self, now: i64) {
        self.progress.decide(
            RolloutState::Promoted,
            "promoted by an operator on the shadow evidence".into(),
            now,
        );
    }

    /// Traffic weights by version now: all on the primary until promoted
    /// (the candidate only sees mirrored copies).
    pub fn weights(&self) -> std::collections::BTreeMap<String, u32> {
        let serving = if self.progress.state == RolloutState::Promoted {
            &self.candidate
        } else {
            &self.primary
        };
        [(serving.clone(), 100)].into()
    }

    /// The rollout as users see it, with the comparison so far.
    pub fn view(
        &self,
        model: &str,
        replicas: &[&ReplicaFacts],
        totals: &ShadowStats,
    ) -> RolloutView {
        let loading = Loading::of(model, replicas, &self.candidate);
        let weights = self.weights();
        RolloutView {
            step: u32::from(self.mirroring),
            replicas_done: loading.done(),
            replicas_total: loading.live,
            shadow: Some(summarize(&totals.since(&self.baseline))),
            ..self.progress.view(
                Strategy::Shadow,
                Some(self.primary.clone()),
                self.candidate.clone(),
                weights,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_once_loaded_and_summarizes_since_its_start() {
        let earlier = ShadowStats {
            rows: 100,
            agreeing: 50,
            compared: 100,
            mirrored: 100,
            ..ShadowStats::default()
        };
        let mut s = Shadow::start("1".into(), "2".into(), 20, earlier.clone(), 0);
        let loading = ReplicaFacts {
            failures: Default::default(),
            standby: false,
            id: "a".into(),
            address: String::new(),
            region: "r".into(),
            alive: true,
            serving: [shoal_api::VersionKey::parse("m", "1").unwrap()].into(),
        };
        assert!(!s.tick("m", &[&loading], 1));
        let both = ReplicaFacts {
            failures: Default::default(),
            standby: false,
            serving: [
                shoal_api::VersionKey::parse("m", "1").unwrap(),
                shoal_api::VersionKey::parse("m", "2").unwrap(),
            ]
            .into(),
            ..loading
        };
        assert!(s.tick("m", &[&both], 2));
        let mut now = earlier.clone();
        now.add(&ShadowStats {
            mirrored: 10,
            compared: 10,
            rows: 40,
            agreeing: 38,
            max_abs_diff: 0.2,
            latency_diff_ms_sum: 5.0,
            candidate_errors: 0,
        });
        let v = s.view("m", &[&both], &now);
        let summary = v.shadow.unwrap();
        assert_eq!((summary.rows, summary.compared), (40, 10));
        assert!((summary.agreement.unwrap() - 0.95).abs() < 1e-9);
        assert!((summary.latency_diff_ms.unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(v.weights, [("1".to_owned(), 100)].into());
        s.promote(3);
        assert_eq!(
            s.view("m", &[&both], &now).weights,
            [("2".to_owned(), 100)].into()
        );
    }
}
