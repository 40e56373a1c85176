//! The canary controller and its judge.
//!
//! Both versions are loaded on every replica first. Then traffic moves in
//! steps (default 1, 10, 50, 100 %). Each step bakes, then the canary is
//! judged against the baseline on the same window of traffic: an error rate
//! above `max_error_ratio` × the baseline's (and above a small floor), or a
//! p99 above `max_p99_ratio` × the baseline's, rolls back; too few canary
//! requests to judge holds the step — never promote or roll back on no
//! data. Passing the step before 100 % promotes.

use serde::{Deserialize, Serialize};
use shoal_api::deploy::{RolloutState, RolloutView, Strategy};
use shoal_api::fleet::VersionStats;

use crate::plan::ReplicaFacts;

/// Thresholds and schedule of a canary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryConfig {
    /// Traffic percentages of the steps.
    pub steps: Vec<u32>,
    /// Bake time of each step, ms.
    pub bake_ms: i64,
    /// Roll back above this multiple of the baseline's error rate.
    pub max_error_ratio: f64,
    /// Roll back above this multiple of the baseline's p99.
    pub max_p99_ratio: f64,
    /// Canary requests needed in a window to judge it.
    pub min_requests: u64,
    /// Error rates at or below this are never a reason to roll back (one
    /// error in a hundred requests against a clean baseline is noise).
    pub min_error_rate: f64,
    /// p99 increases smaller than this (ms) are never a reason to roll back:
    /// scheduling noise moves a sub-millisecond p99 by more than 20 %.
    #[serde(default = "default_min_p99_increase")]
    pub min_p99_increase_ms: f64,
}

fn default_min_p99_increase() -> f64 {
    1.0
}

impl Default for CanaryConfig {
    fn default() -> Self {
        CanaryConfig {
            steps: vec![1, 10, 50, 100],
            bake_ms: 30_000,
            max_error_ratio: 1.5,
            max_p99_ratio: 1.2,
            min_requests: 100,
            min_error_rate: 0.01,
            min_p99_increase_ms: 1.0,
        }
    }
}

/// Where a canary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for every replica to load the canary.
    Loading,
    /// A step is taking traffic.
    Baking,
}

/// A canary rollout, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    /// Baseline version.
    pub from: String,
    /// Canary version.
    pub to: String,
    /// Schedule and thresholds.
    pub config: CanaryConfig,
    /// Index of the current step.
    pub step: usize,
    /// Loading or baking.
    pub phase: Phase,
    /// When the current window started (ms).
    pub window_started: i64,
    /// Baseline and canary totals when the window started.
    pub window: (VersionStats, VersionStats),
    /// Where it stands.
    pub state: RolloutState,
    /// Why the last decision was taken.
    pub reason: String,
    /// Started (ms).
    pub started_at: i64,
    /// Last decision (ms).
    pub updated_at: i64,
}

/// What a tick decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing worth persisting.
    Unchanged,
    /// Traffic or state changed: persist and publish.
    Changed,
    /// The canary passed: make it production.
    Promoted,
    /// The canary failed: back to the baseline.
    RolledBack,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn ms(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v}ms"),
        Some(_) => "above 10s".into(),
        None => "n/a".into(),
    }
}

/// The judgement of one window.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too few canary requests.
    TooFewRequests(u64),
    /// Error rate too high; the reason names it.
    ErrorRate(String),
    /// p99 too high; the reason names it.
    P99(String),
    /// Within thresholds; a summary.
    Pass(String),
}

/// Judges `canary` against `baseline` (both: counts in the same window).
pub fn judge(baseline: &VersionStats, canary: &VersionStats, config: &CanaryConfig) -> Verdict {
    if canary.requests < config.min_requests {
        return Verdict::TooFewRequests(canary.requests);
    }
    let (be, ce) = (baseline.error_rate(), canary.error_rate());
    if ce > config.min_error_rate && ce > config.max_error_ratio * be {
        return Verdict::ErrorRate(format!(
            "error rate {} > {} × baseline error rate {} ({} of {} canary requests failed)",
            pct(ce),
            config.max_error_ratio,
            pct(be),
            canary.errors,
            canary.requests
        ));
    }
    let (bp, cp) = (baseline.quantile_ms(0.99), canary.quantile_ms(0.99));
    if let (Some(b), Some(c)) = (bp, cp)
        && c > config.max_p99_ratio * b
        && c - b > config.min_p99_increase_ms
    {
        return Verdict::P99(format!(
            "p99 latency {} > {} × baseline p99 {}",
            ms(Some(c)),
            config.max_p99_ratio,
            ms(Some(b))
        ));
    }
    Verdict::Pass(format!(
        "error rate {} vs {}, p99 {} vs {}, {} canary requests",
        pct(ce),
        pct(be),
        ms(cp),
        ms(bp),
        canary.requests
    ))
}

impl Canary {
    /// A canary from `from` to `to`.
    pub fn start(from: String, to: String, config: CanaryConfig, now: i64) -> Canary {
        Canary {
            reason: format!("loading {to} beside {from} on every replica"),
            from,
            to,
            config,
            step: 0,
            phase: Phase::Loading,
            window_started: now,
            window: (VersionStats::default(), VersionStats::default()),
            state: RolloutState::Progressing,
            started_at: now,
            updated_at: now,
        }
    }

    /// Traffic share of the canary now, percent.
    pub fn canary_weight(&self) -> u32 {
        match (self.state, self.phase) {
            (RolloutState::Promoted, _) => 100,
            (s, _) if s.is_terminal() => 0,
            (_, Phase::Loading) => 0,
            _ => self
                .config
                .steps
                .get(self.step)
                .copied()
                .unwrap_or(100)
                .min(100),
        }
    }

    fn begin_window(&mut self, totals: (&VersionStats, &VersionStats), now: i64) {
        self.window = (totals.0.clone(), totals.1.clone());
        self.window_started = now;
    }

    /// Advances the canary: `replicas` are those eligible to serve the
    /// model, `totals` the fleet's cumulative counts of baseline and canary.
    pub fn tick(
        &mut self,
        model: &str,
        replicas: &[&ReplicaFacts],
        totals: (&VersionStats, &VersionStats),
        now: i64,
    ) -> Decision {
        if self.state.is_terminal() || self.state == RolloutState::Paused {
            return Decision::Unchanged;
        }
        if self.phase == Phase::Loading {
            let live: Vec<&&ReplicaFacts> = replicas.iter().filter(|r| r.alive).collect();
            let waiting: Vec<&str> = live
                .iter()
                .filter(|r| !r.serves(model, &self.to))
                .map(|r| r.id.as_str())
                .collect();
            if live.is_empty() || !waiting.is_empty() {
                self.reason = if live.is_empty() {
                    "holding: no live replica to load the canary".into()
                } else {
                    format!("waiting for {} to load {}", waiting.join(", "), self.to)
                };
                return Decision::Unchanged;
            }
            self.phase = Phase::Baking;
            self.step = 0;
            self.begin_window(totals, now);
            self.state = RolloutState::Progressing;
            self.reason = format!(
                "step 1: {}% of traffic to {}",
                self.canary_weight(),
                self.to
            );
            self.updated_at = now;
            return Decision::Changed;
        }
        // Totals restart with the control plane: restart the window.
        if totals.0.requests < self.window.0.requests || totals.1.requests < self.window.1.requests
        {
            self.begin_window(totals, now);
            return Decision::Changed;
        }
        if now - self.window_started < self.config.bake_ms {
            return Decision::Unchanged;
        }
        let (baseline, canary) = (
            totals.0.since(&self.window.0),
            totals.1.since(&self.window.1),
        );
        let step_name = format!("step {} ({}%)", self.step + 1, self.canary_weight());
        match judge(&baseline, &canary, &self.config) {
            Verdict::TooFewRequests(n) => {
                let entering = self.state != RolloutState::Holding;
                self.state = RolloutState::Holding;
                self.reason = format!(
                    "holding at {step_name}: {n} canary requests in the window, {} needed to judge",
                    self.config.min_requests
                );
                if entering {
                    self.updated_at = now;
                    Decision::Changed
                } else {
                    Decision::Unchanged
                }
            }
            Verdict::ErrorRate(why) | Verdict::P99(why) => {
                self.state = RolloutState::RolledBack;
                self.reason = format!("rolled back at {step_name}: {why}");
                self.updated_at = now;
                Decision::RolledBack
            }
            Verdict::Pass(summary) => {
                self.step += 1;
                self.updated_at = now;
                if self.step >= self.config.steps.len() || self.config.steps[self.step] >= 100 {
                    self.step = self.config.steps.len().saturating_sub(1);
                    self.state = RolloutState::Promoted;
                    self.reason = format!("promoted: {step_name} passed ({summary})");
                    return Decision::Promoted;
                }
                self.state = RolloutState::Progressing;
                self.begin_window(totals, now);
                self.reason = format!(
                    "step {}: {}% of traffic to {} ({step_name} passed: {summary})",
                    self.step + 1,
                    self.canary_weight(),
                    self.to
                );
                Decision::Changed
            }
        }
    }

    /// An operator's promote: skip the remaining steps.
    pub fn promote(&mut self, now: i64) {
        self.state = RolloutState::Promoted;
        self.reason = "promoted by an operator".into();
        self.updated_at = now;
    }

    /// An operator's abort: traffic back to the baseline.
    pub fn abort(&mut self, reason: String, now: i64) {
        self.state = RolloutState::Aborted;
        self.reason = reason;
        self.updated_at = now;
    }

    /// The rollout as users see it.
    pub fn view(&self, model: &str, replicas: &[&ReplicaFacts]) -> RolloutView {
        let live: Vec<&&ReplicaFacts> = replicas.iter().filter(|r| r.alive).collect();
        let w = self.canary_weight();
        let mut weights = std::collections::BTreeMap::new();
        weights.insert(self.to.clone(), w);
        if w < 100 {
            weights.insert(self.from.clone(), 100 - w);
        }
        RolloutView {
            strategy: Strategy::Canary,
            state: self.state,
            from: Some(self.from.clone()),
            to: self.to.clone(),
            step: u32::try_from(self.step + 1).unwrap_or(u32::MAX),
            weights,
            reason: self.reason.clone(),
            replicas_done: live.iter().filter(|r| r.serves(model, &self.to)).count(),
            replicas_total: live.len(),
            started_at: self.started_at,
            updated_at: self.updated_at,
            shadow: None,
            arms: Vec::new(),
            significant: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stats with `requests` requests, `errors` errors, all in bucket `b`.
    fn stats(requests: u64, errors: u64, b: usize) -> VersionStats {
        let mut latency = vec![0; shoal_api::fleet::LATENCY_BOUNDS_MS.len() + 1];
        latency[b] = requests;
        VersionStats {
            requests,
            errors,
            latency,
        }
    }

    fn replica(serving: &[&str]) -> ReplicaFacts {
        ReplicaFacts {
            id: "r".into(),
            address: String::new(),
            region: "x".into(),
            alive: true,
            serving: serving
                .iter()
                .map(|v| ("m".to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn config() -> CanaryConfig {
        CanaryConfig {
            steps: vec![10, 50, 100],
            bake_ms: 1000,
            min_requests: 50,
            ..CanaryConfig::default()
        }
    }

    fn check(baseline: VersionStats, canary: VersionStats, expected: &str) {
        let got = match judge(&baseline, &canary, &config()) {
            Verdict::TooFewRequests(n) => format!("too few: {n}"),
            Verdict::ErrorRate(r) | Verdict::P99(r) | Verdict::Pass(r) => r,
        };
        assert!(got.contains(expected), "{got:?} lacks {expected:?}");
    }

    #[test]
    fn the_judge() {
        check(stats(1000, 0, 1), stats(49, 0, 1), "too few: 49");
        check(
            stats(1000, 1, 1),
            stats(100, 50, 1),
            "error rate 50.0% > 1.5 × baseline error rate 0.1%",
        );
        // One error in a hundred against a clean baseline is not enough.
        check(
            stats(1000, 0, 1),
            stats(100, 1, 1),
            "error rate 1.0% vs 0.0%",
        );
        check(
            stats(1000, 0, 3),
            stats(100, 0, 16),
            "p99 latency 20ms > 1.2 × baseline p99 0.15ms",
        );
        check(
            stats(1000, 0, 6),
            stats(100, 0, 6),
            "p99 0.5ms vs 0.5ms, 100 canary requests",
        );
        // 0.3 ms against 0.15 ms is twice as slow but within the noise floor.
        check(stats(1000, 0, 3), stats(100, 0, 5), "p99 0.3ms vs 0.15ms");
    }

    #[test]
    fn a_good_canary_walks_every_step_and_is_promoted() {
        let mut c = Canary::start("1".into(), "2".into(), config(), 0);
        let loading = replica(&["1"]);
        let zero = VersionStats::default();
        assert_eq!(
            c.tick("m", &[&loading], (&zero, &zero), 0),
            Decision::Unchanged
        );
        assert_eq!(
            c.canary_weight(),
            0,
            "no traffic before every replica has it"
        );
        let both = replica(&["1", "2"]);
        assert_eq!(c.tick("m", &[&both], (&zero, &zero), 10), Decision::Changed);
        assert_eq!(c.canary_weight(), 10);
        // Baking: nothing happens before the bake time.
        let (b, k) = (stats(900, 0, 1), stats(100, 0, 1));
        assert_eq!(c.tick("m", &[&both], (&b, &k), 500), Decision::Unchanged);
        assert_eq!(c.tick("m", &[&both], (&b, &k), 1010), Decision::Changed);
        assert_eq!(c.canary_weight(), 50);
        assert!(
            c.reason
                .starts_with("step 2: 50% of traffic to 2 (step 1 (10%) passed"),
            "{}",
            c.reason
        );
        let (b2, k2) = (stats(1400, 0, 1), stats(600, 0, 1));
        assert_eq!(c.tick("m", &[&both], (&b2, &k2), 2020), Decision::Promoted);
        assert_eq!(c.state, RolloutState::Promoted);
        assert_eq!(c.canary_weight(), 100);
        assert_eq!(
            c.view("m", &[&both]).weights,
            [("2".to_owned(), 100)].into()
        );
    }

    #[test]
    fn a_slow_canary_is_rolled_back_naming_p99() {
        let mut c = Canary::start("1".into(), "2".into(), config(), 0);
        let both = replica(&["1", "2"]);
        let zero = VersionStats::default();
        c.tick("m", &[&both], (&zero, &zero), 0);
        let d = c.tick("m", &[&both], (&stats(900, 0, 1), &stats(100, 0, 16)), 1000);
        assert_eq!(d, Decision::RolledBack);
        assert!(c.reason.contains("p99"), "{}", c.reason);
        assert_eq!(c.canary_weight(), 0);
    }

    #[test]
    fn no_data_holds_and_never_decides() {
        let mut c = Canary::start("1".into(), "2".into(), config(), 0);
        let both = replica(&["1", "2"]);
        let zero = VersionStats::default();
        c.tick("m", &[&both], (&zero, &zero), 0);
        assert_eq!(
            c.tick("m", &[&both], (&stats(10, 0, 1), &stats(3, 3, 9)), 5000),
            Decision::Changed
        );
        assert_eq!(c.state, RolloutState::Holding);
        assert!(
            c.reason
                .contains("3 canary requests in the window, 50 needed"),
            "{}",
            c.reason
        );
        assert_eq!(
            c.tick("m", &[&both], (&stats(10, 0, 1), &stats(4, 4, 9)), 6000),
            Decision::Unchanged
        );
        assert_eq!(c.canary_weight(), 10, "traffic stays where it was");
        // Enough data arrives: now it is judged (and fails on errors).
        let d = c.tick("m", &[&both], (&stats(500, 0, 1), &stats(60, 30, 1)), 7000);
        assert_eq!(d, Decision::RolledBack);
        assert!(c.reason.contains("error rate"), "{}", c.reason);
    }

    #[test]
    fn survives_a_control_plane_restart() {
        let mut c = Canary::start("1".into(), "2".into(), config(), 0);
        let both = replica(&["1", "2"]);
        let zero = VersionStats::default();
        c.tick("m", &[&both], (&zero, &zero), 0);
        c.tick("m", &[&both], (&stats(900, 0, 1), &stats(100, 0, 1)), 1000);
        assert_eq!(c.canary_weight(), 50);
        let json = serde_json::to_value(&c).unwrap();
        let mut back: Canary = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
        // After a restart the fleet totals start again from zero: the step
        // resumes with a fresh window instead of judging garbage.
        assert_eq!(
            back.tick("m", &[&both], (&stats(5, 0, 1), &stats(5, 0, 1)), 1100),
            Decision::Changed
        );
        assert_eq!(back.canary_weight(), 50);
        assert_eq!(back.window_started, 1100);
        assert_eq!(
            back.tick("m", &[&both], (&stats(6, 0, 1), &stats(6, 0, 1)), 1500),
            Decision::Unchanged
        );
    }

    #[test]
    fn operators_can_promote_and_abort() {
        let mut c = Canary::start("1".into(), "2".into(), config(), 0);
        c.promote(1);
        assert_eq!((c.state, c.canary_weight()), (RolloutState::Promoted, 100));
        let mut c = Canary::start("1".into(), "2".into(), config(), 0);
        c.abort("operator".into(), 1);
        assert_eq!((c.state, c.canary_weight()), (RolloutState::Aborted, 0));
        let both = replica(&["1", "2"]);
        let zero = VersionStats::default();
        assert_eq!(
            c.tick("m", &[&both], (&zero, &zero), 2),
            Decision::Unchanged
        );
    }
}
