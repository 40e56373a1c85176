//! The blue-green controller: the new version is loaded on every replica
//! beside the old one and smoke-tested with real requests; then all traffic
//! switches at once. The old version stays loaded for a while (see
//! `Deployment::warm`), so switching back is instant.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_api::deploy::{RolloutState, RolloutView, Strategy};

use crate::plan::{Loading, ReplicaFacts};
use crate::progress::Progress;

/// Where a blue-green rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for every replica to load the new version.
    Loading,
    /// Every replica has it: smoke tests run.
    Smoke,
}

/// A blue-green rollout, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlueGreen {
    /// The version serving now.
    pub from: Option<String>,
    /// The version switched to.
    pub to: String,
    /// How long the old version stays loaded after the switch (stored as
    /// `keep_warm_ms`).
    #[serde(rename = "keep_warm_ms", with = "shoal_api::duration::millis")]
    pub keep_warm: Duration,
    /// Loading or smoke-testing.
    pub phase: Phase,
    /// State, reason, when.
    #[serde(flatten)]
    pub progress: Progress,
}

/// What a tick decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do.
    Unchanged,
    /// Every replica has the new version: run the smoke tests.
    SmokeTest,
    /// Smoke tests passed: switch all traffic.
    Switched,
    /// Smoke tests failed: stay on the old version.
    Failed,
}

impl BlueGreen {
    /// A blue-green rollout from `from` to `to`.
    pub fn start(from: Option<String>, to: String, keep_warm: Duration, now: i64) -> BlueGreen {
        let reason = format!("loading {to} on every replica");
        BlueGreen {
            from,
            to,
            keep_warm,
            phase: Phase::Loading,
            progress: Progress::start(reason, now),
        }
    }

    /// Advances the rollout.
    pub fn tick(&mut self, model: &str, replicas: &[&ReplicaFacts], now: i64) -> Decision {
        if self.progress.state.is_terminal() {
            return Decision::Unchanged;
        }
        let loading = Loading::of(model, replicas, &self.to);
        if !loading.complete() {
            self.phase = Phase::Loading;
            self.progress.reason = loading.holding_reason("the new version", &self.to);
            return Decision::Unchanged;
        }
        self.phase = Phase::Smoke;
        self.progress.reason = format!("smoke-testing {} on {} replicas", self.to, loading.live);
        self.progress.updated_at = now;
        Decision::SmokeTest
    }

    /// Feeds the smoke tests' outcome.
    pub fn smoke_result(&mut self, result: Result<usize, String>, now: i64) -> Decision {
        self.progress.updated_at = now;
        match result {
            Ok(n) => {
                self.progress.state = RolloutState::Promoted;
                self.progress.reason = format!(
                    "smoke tests passed on {n} replicas; all traffic switched to {}",
                    self.to
                );
                Decision::Switched
            }
            Err(why) => {
                self.progress.state = RolloutState::RolledBack;
                self.progress.reason = format!(
                    "smoke test failed: {why}; traffic stays on {}",
                    self.from.as_deref().unwrap_or("nothing")
                );
                Decision::Failed
            }
        }
    }

    /// Traffic weights by version now: all on one side of the switch.
    pub fn weights(&self) -> std::collections::BTreeMap<String, u32> {
        match (&self.from, self.progress.state) {
            (_, RolloutState::Promoted) | (None, _) => [(self.to.clone(), 100)].into(),
            (Some(from), _) => [(from.clone(), 100)].into(),
        }
    }

    /// The rollout as users see it.
    pub fn view(&self, model: &str, replicas: &[&ReplicaFacts]) -> RolloutView {
        let loading = Loading::of(model, replicas, &self.to);
        let weights = self.weights();
        RolloutView {
            step: u32::from(self.phase == Phase::Smoke)
                + u32::from(self.progress.state == RolloutState::Promoted),
            replicas_done: loading.done(),
            replicas_total: loading.live,
            ..self.progress.view(
                Strategy::BlueGreen,
                self.from.clone(),
                self.to.clone(),
                weights,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, serving: &[&str]) -> ReplicaFacts {
        ReplicaFacts {
            failures: Default::default(),
            standby: false,
            id: id.into(),
            address: String::new(),
            region: "x".into(),
            alive: true,
            serving: serving
                .iter()
                .map(|v| shoal_api::VersionKey::parse("m", v).unwrap())
                .collect(),
        }
    }

    #[test]
    fn loads_everywhere_then_smoke_tests_then_switches() {
        let mut b = BlueGreen::start(Some("1".into()), "2".into(), Duration::from_secs(60), 0);
        let (a, c) = (replica("a", &["1", "2"]), replica("c", &["1"]));
        assert_eq!(b.tick("m", &[&a, &c], 1), Decision::Unchanged);
        assert!(b.progress.reason.contains("waiting for c"));
        assert_eq!(
            b.view("m", &[&a, &c]).weights,
            [("1".to_owned(), 100)].into()
        );
        let c = replica("c", &["1", "2"]);
        assert_eq!(b.tick("m", &[&a, &c], 2), Decision::SmokeTest);
        assert_eq!(b.smoke_result(Ok(2), 3), Decision::Switched);
        assert_eq!(
            b.view("m", &[&a, &c]).weights,
            [("2".to_owned(), 100)].into()
        );
        assert_eq!(b.tick("m", &[&a, &c], 4), Decision::Unchanged);
    }

    #[test]
    fn a_failed_smoke_test_keeps_the_old_version() {
        let mut b = BlueGreen::start(Some("1".into()), "2".into(), Duration::from_secs(60), 0);
        let a = replica("a", &["1", "2"]);
        assert_eq!(b.tick("m", &[&a], 1), Decision::SmokeTest);
        assert_eq!(
            b.smoke_result(Err("replica a answered 500".into()), 2),
            Decision::Failed
        );
        assert_eq!(b.progress.state, RolloutState::RolledBack);
        assert_eq!(b.view("m", &[&a]).weights, [("1".to_owned(), 100)].into());
    }
}
