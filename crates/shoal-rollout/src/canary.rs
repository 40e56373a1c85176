//! The canary controller and its judge.
//!
//! Both versions are loaded on every replica first. Then traffic moves in
//! steps (default 1, 10, 50, 100 %). Each step bakes, then the canary is
//! judged against the baseline on the same window of traffic: an error rate
//! above `max_error_ratio` × the baseline's (and above a small floor), or a
//! p99 above `max_p99_ratio` × the baseline's, rolls back; too few canary
//! requests to judge holds the step — never promote or roll back on no
//! data. Passing the step before 100 % promotes.
//!
//! A gradual schedule is a canary whose steps bake for different times
//! (`bakes`, e.g. 5, 10, 25, 50 % over hours). Steps that bake for a
//! minute or more are also judged while they bake, on the window so far:
//! a bad version on a slow ramp is stopped as soon as the evidence is in,
//! not at the end of the hour. Interim checks only ever roll back; passing
//! still waits for the bake time.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_api::counters::Counters;
use shoal_api::deploy::{RolloutState, RolloutView, Strategy};
use shoal_api::fleet::VersionStats;
use shoal_api::traffic::RewardStats;

use crate::plan::{Loading, ReplicaFacts};
use crate::progress::Progress;

/// Thresholds and schedule of a canary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryConfig {
    /// Traffic percentages of the steps.
    pub steps: Vec<u32>,
    /// Bake time of each step (stored as `bake_ms`).
    #[serde(rename = "bake_ms", with = "shoal_api::duration::millis")]
    pub bake: Duration,
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
    /// Bake time of each step when they differ (a gradual schedule; stored
    /// as `bakes_ms`); steps beyond the list bake for `bake`.
    #[serde(rename = "bakes_ms", default, with = "shoal_api::duration::millis_vec")]
    pub bakes: Vec<Duration>,
    /// The business metric: roll back when the canary's mean reward
    /// (feedback) falls below this multiple of the baseline's and the
    /// difference is significant. With it set, a window needs
    /// [`MIN_REWARDS`] rewards on each side to be judged.
    #[serde(default)]
    pub min_reward_ratio: Option<f64>,
}

/// Rewards each side needs in a window when the business metric is judged.
pub const MIN_REWARDS: u64 = 30;

/// Steps that bake at least this long are also judged while baking.
pub const INTERIM_CHECKS_FROM: Duration = Duration::from_secs(60);

impl CanaryConfig {
    /// How long step `step` (0-based) bakes.
    pub fn bake_of(&self, step: usize) -> Duration {
        self.bakes.get(step).copied().unwrap_or(self.bake)
    }
}

fn default_min_p99_increase() -> f64 {
    1.0
}

impl Default for CanaryConfig {
    fn default() -> Self {
        CanaryConfig {
            steps: vec![1, 10, 50, 100],
            bake: Duration::from_secs(30),
            max_error_ratio: 1.5,
            max_p99_ratio: 1.2,
            min_requests: 100,
            min_error_rate: 0.01,
            min_p99_increase_ms: 1.0,
            bakes: Vec::new(),
            min_reward_ratio: None,
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
    /// Baseline and canary rewards when the window started.
    #[serde(default)]
    pub reward_window: (RewardStats, RewardStats),
    /// State, reason, when.
    #[serde(flatten)]
    pub progress: Progress,
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
    /// Too few rewards to judge the business metric.
    TooFewRewards(u64),
    /// Mean reward too low; the reason names it.
    Reward(String),
    /// Within thresholds; a summary.
    Pass(String),
}

/// Judges the business metric: `None` when it passes or is not set.
pub fn judge_rewards(
    baseline: &RewardStats,
    canary: &RewardStats,
    config: &CanaryConfig,
) -> Option<Verdict> {
    let ratio = config.min_reward_ratio?;
    let fewest = baseline.count.min(canary.count);
    if fewest < MIN_REWARDS {
        return Some(Verdict::TooFewRewards(fewest));
    }
    let (b, c) = (baseline.mean(), canary.mean());
    (c < ratio * b && crate::experiment::significant(baseline, canary)).then(|| {
        Verdict::Reward(format!(
            "mean reward {c:.3} < {ratio} × baseline mean reward {b:.3} ({} and {} rewards, significant at 95%)",
            canary.count, baseline.count
        ))
    })
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
        let reason = format!("loading {to} beside {from} on every replica");
        Canary {
            from,
            to,
            config,
            step: 0,
            phase: Phase::Loading,
            window_started: now,
            window: (VersionStats::default(), VersionStats::default()),
            reward_window: (RewardStats::default(), RewardStats::default()),
            progress: Progress::start(reason, now),
        }
    }

    /// Traffic share of the canary now, percent.
    pub fn canary_weight(&self) -> u32 {
        match (self.progress.state, self.phase) {
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

    fn begin_window(
        &mut self,
        totals: (&VersionStats, &VersionStats),
        rewards: (&RewardStats, &RewardStats),
        now: i64,
    ) {
        self.window = (totals.0.clone(), totals.1.clone());
        self.reward_window = (rewards.0.clone(), rewards.1.clone());
        self.window_started = now;
    }

    /// Advances the canary without feedback (see [`Canary::tick_with`]).
    pub fn tick(
        &mut self,
        model: &str,
        replicas: &[&ReplicaFacts],
        totals: (&VersionStats, &VersionStats),
        now: i64,
    ) -> Decision {
        let none = RewardStats::default();
        self.tick_with(model, replicas, totals, (&none, &none), now)
    }

    /// Advances the canary: `replicas` are those eligible to serve the
    /// model, `totals` the fleet's cumulative counts of baseline and
    /// canary, `rewards` their cumulative feedback.
    pub fn tick_with(
        &mut self,
        model: &str,
        replicas: &[&ReplicaFacts],
        totals: (&VersionStats, &VersionStats),
        rewards: (&RewardStats, &RewardStats),
        now: i64,
    ) -> Decision {
        if self.progress.state.is_terminal() || self.progress.state == RolloutState::Paused {
            return Decision::Unchanged;
        }
        if self.phase == Phase::Loading {
            let loading = Loading::of(model, replicas, &self.to);
            if !loading.complete() {
                self.progress.reason = loading.holding_reason("the canary", &self.to);
                return Decision::Unchanged;
            }
            self.phase = Phase::Baking;
            self.step = 0;
            self.begin_window(totals, rewards, now);
            self.progress.decide(
                RolloutState::Progressing,
                format!(
                    "step 1: {}% of traffic to {} for {}",
                    self.canary_weight(),
                    self.to,
                    shoal_api::duration::human(self.config.bake_of(0))
                ),
                now,
            );
            return Decision::Changed;
        }
        // Totals restart with the control plane: restart the window.
        if totals.0.requests < self.window.0.requests || totals.1.requests < self.window.1.requests
        {
            self.begin_window(totals, rewards, now);
            return Decision::Changed;
        }
        // Reward totals restart with the control plane too.
        if rewards.0.count < self.reward_window.0.count
            || rewards.1.count < self.reward_window.1.count
        {
            self.reward_window = (rewards.0.clone(), rewards.1.clone());
        }
        let (baseline, canary) = (
            totals.0.since(&self.window.0),
            totals.1.since(&self.window.1),
        );
        let (baseline_rewards, canary_rewards) = (
            rewards.0.since(&self.reward_window.0),
            rewards.1.since(&self.reward_window.1),
        );
        let verdict = match judge(&baseline, &canary, &self.config) {
            Verdict::Pass(summary) => {
                match judge_rewards(&baseline_rewards, &canary_rewards, &self.config) {
                    None => Verdict::Pass(summary),
                    Some(v) => v,
                }
            }
            other => other,
        };
        let step_name = format!("step {} ({}%)", self.step + 1, self.canary_weight());
        let bake = self.config.bake_of(self.step);
        let baked = shoal_api::duration::between(self.window_started, now);
        if baked < bake {
            if bake >= INTERIM_CHECKS_FROM
                && let Verdict::ErrorRate(why) | Verdict::P99(why) | Verdict::Reward(why) = &verdict
            {
                self.progress.decide(
                    RolloutState::RolledBack,
                    format!(
                        "rolled back at {step_name}, {}s into its {}s bake: {why}",
                        baked.as_secs(),
                        bake.as_secs()
                    ),
                    now,
                );
                return Decision::RolledBack;
            }
            return Decision::Unchanged;
        }
        match verdict {
            Verdict::TooFewRequests(_) | Verdict::TooFewRewards(_) => {
                let entering = self.progress.state != RolloutState::Holding;
                self.progress.state = RolloutState::Holding;
                self.progress.reason = match verdict {
                    Verdict::TooFewRewards(n) => format!(
                        "holding at {step_name}: {n} rewards in the window on the side with fewer, {MIN_REWARDS} needed to judge the mean reward"
                    ),
                    _ => format!(
                        "holding at {step_name}: {} canary requests in the window, {} needed to judge",
                        canary.requests, self.config.min_requests
                    ),
                };
                if entering {
                    self.progress.updated_at = now;
                    Decision::Changed
                } else {
                    Decision::Unchanged
                }
            }
            Verdict::ErrorRate(why) | Verdict::P99(why) | Verdict::Reward(why) => {
                self.progress.decide(
                    RolloutState::RolledBack,
                    format!("rolled back at {step_name}: {why}"),
                    now,
                );
                Decision::RolledBack
            }
            Verdict::Pass(summary) => {
                self.step += 1;
                self.progress.updated_at = now;
                if self.step >= self.config.steps.len() || self.config.steps[self.step] >= 100 {
                    self.step = self.config.steps.len().saturating_sub(1);
                    self.progress.state = RolloutState::Promoted;
                    self.progress.reason = format!("promoted: {step_name} passed ({summary})");
                    return Decision::Promoted;
                }
                self.progress.state = RolloutState::Progressing;
                self.begin_window(totals, rewards, now);
                self.progress.reason = format!(
                    "step {}: {}% of traffic to {} for {} ({step_name} passed: {summary})",
                    self.step + 1,
                    self.canary_weight(),
                    self.to,
                    shoal_api::duration::human(self.config.bake_of(self.step))
                );
                Decision::Changed
            }
        }
    }

    /// An operator's promote: skip the remaining steps.
    pub fn promote(&mut self, now: i64) {
        self.progress.decide(
            RolloutState::Promoted,
            "promoted by an operator".into(),
            now,
        );
    }

    /// Traffic weights by version now: the canary's step, the rest on the
    /// baseline.
    pub fn weights(&self) -> std::collections::BTreeMap<String, u32> {
        let w = self.canary_weight();
        let mut weights = std::collections::BTreeMap::new();
        weights.insert(self.to.clone(), w);
        if w < 100 {
            weights.insert(self.from.clone(), 100 - w);
        }
        weights
    }

    /// The rollout as users see it.
    pub fn view(&self, model: &str, replicas: &[&ReplicaFacts]) -> RolloutView {
        let loading = Loading::of(model, replicas, &self.to);
        let weights = self.weights();
        RolloutView {
            step: u32::try_from(self.step + 1).unwrap_or(u32::MAX),
            replicas_done: loading.done(),
            replicas_total: loading.live,
            ..self.progress.view(
                Strategy::Canary,
                Some(self.from.clone()),
                self.to.clone(),
                weights,
            )
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
            failures: Default::default(),
            standby: false,
            id: "r".into(),
            address: String::new(),
            region: "x".into(),
            alive: true,
            serving: serving
                .iter()
                .map(|v| shoal_api::VersionKey::parse("m", v).unwrap())
                .collect(),
        }
    }

    fn config() -> CanaryConfig {
        CanaryConfig {
            steps: vec![10, 50, 100],
            bake: Duration::from_secs(1),
            min_requests: 50,
            ..CanaryConfig::default()
        }
    }

    fn check(baseline: VersionStats, canary: VersionStats, expected: &str) {
        let got = match judge(&baseline, &canary, &config()) {
            Verdict::TooFewRequests(n) => format!("too few: {n}"),
            Verdict::TooFewRewards(n) => format!("too few rewards: {n}"),
            Verdict::ErrorRate(r) | Verdict::P99(r) | Verdict::Reward(r) | Verdict::Pass(r) => r,
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
            c.progress
                .reason
                .starts_with("step 2: 50% of traffic to 2 for 1s (step 1 (10%) passed"),
            "{}",
            c.progress.reason
        );
        let (b2, k2) = (stats(1400, 0, 1), stats(600, 0, 1));
        assert_eq!(c.tick("m", &[&both], (&b2, &k2), 2020), Decision::Promoted);
        assert_eq!(c.progress.state, RolloutState::Promoted);
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
        assert!(c.progress.reason.contains("p99"), "{}", c.progress.reason);
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
        assert_eq!(c.progress.state, RolloutState::Holding);
        assert!(
            c.progress
                .reason
                .contains("3 canary requests in the window, 50 needed"),
            "{}",
            c.progress.reason
        );
        assert_eq!(
            c.tick("m", &[&both], (&stats(10, 0, 1), &stats(4, 4, 9)), 6000),
            Decision::Unchanged
        );
        assert_eq!(c.canary_weight(), 10, "traffic stays where it was");
        // Enough data arrives: now it is judged (and fails on errors).
        let d = c.tick("m", &[&both], (&stats(500, 0, 1), &stats(60, 30, 1)), 7000);
        assert_eq!(d, Decision::RolledBack);
        assert!(
            c.progress.reason.contains("error rate"),
            "{}",
            c.progress.reason
        );
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
    fn a_gradual_schedule_bakes_each_step_for_its_own_time() {
        let config = CanaryConfig {
            steps: vec![5, 25, 100],
            bakes: vec![Duration::from_secs(3600), Duration::from_secs(7200)],
            ..config()
        };
        let mut c = Canary::start("1".into(), "2".into(), config, 0);
        let both = replica(&["1", "2"]);
        let zero = VersionStats::default();
        c.tick("m", &[&both], (&zero, &zero), 0);
        assert_eq!(c.canary_weight(), 5);
        let (b, k) = (stats(9500, 0, 1), stats(500, 0, 1));
        // Healthy interim checks never advance a step early.
        assert_eq!(
            c.tick("m", &[&both], (&b, &k), 3_599_999),
            Decision::Unchanged
        );
        assert_eq!(
            c.tick("m", &[&both], (&b, &k), 3_600_000),
            Decision::Changed
        );
        assert_eq!(c.canary_weight(), 25);
        let (b2, k2) = (stats(19_000, 0, 1), stats(3_500, 0, 1));
        assert_eq!(
            c.tick("m", &[&both], (&b2, &k2), 3_600_000 + 7_199_999),
            Decision::Unchanged
        );
        assert_eq!(
            c.tick("m", &[&both], (&b2, &k2), 3_600_000 + 7_200_000),
            Decision::Promoted
        );
    }

    #[test]
    fn a_long_step_is_stopped_as_soon_as_the_evidence_is_in() {
        let config = CanaryConfig {
            steps: vec![5, 100],
            bakes: vec![Duration::from_secs(3600)],
            ..config()
        };
        let mut c = Canary::start("1".into(), "2".into(), config, 0);
        let both = replica(&["1", "2"]);
        let zero = VersionStats::default();
        c.tick("m", &[&both], (&zero, &zero), 0);
        // Too little evidence yet: keep baking, even though it looks bad.
        assert_eq!(
            c.tick(
                "m",
                &[&both],
                (&stats(900, 0, 1), &stats(40, 40, 1)),
                60_000
            ),
            Decision::Unchanged
        );
        assert_eq!(c.progress.state, RolloutState::Progressing);
        let d = c.tick(
            "m",
            &[&both],
            (&stats(1800, 0, 1), &stats(100, 60, 1)),
            120_000,
        );
        assert_eq!(d, Decision::RolledBack);
        assert!(
            c.progress
                .reason
                .contains("120s into its 3600s bake: error rate"),
            "{}",
            c.progress.reason
        );
        // Short steps wait for their bake time (the judge sees the whole window).
        let mut short = Canary::start(
            "1".into(),
            "2".into(),
            CanaryConfig {
                bake: Duration::from_secs(30),
                ..CanaryConfig::default()
            },
            0,
        );
        short.tick("m", &[&both], (&zero, &zero), 0);
        assert_eq!(
            short.tick(
                "m",
                &[&both],
                (&stats(1800, 0, 1), &stats(100, 60, 1)),
                10_000
            ),
            Decision::Unchanged
        );
    }

    fn rewards(n: u64, successes: u64) -> RewardStats {
        let mut r = RewardStats::default();
        for i in 0..n {
            r.record(if i < successes { 1.0 } else { 0.0 });
        }
        r
    }

    #[test]
    fn the_business_metric_holds_without_feedback_and_rolls_back_on_worse_rewards() {
        let judged = CanaryConfig {
            min_reward_ratio: Some(0.9),
            ..config()
        };
        let mut c = Canary::start("1".into(), "2".into(), judged.clone(), 0);
        let both = replica(&["1", "2"]);
        let zero = VersionStats::default();
        let none = RewardStats::default();
        c.tick_with("m", &[&both], (&zero, &zero), (&none, &none), 0);
        let (b, k) = (stats(900, 0, 1), stats(100, 0, 1));
        // Fast and error-free, but too little feedback to judge: hold.
        let d = c.tick_with(
            "m",
            &[&both],
            (&b, &k),
            (&rewards(100, 80), &rewards(10, 1)),
            1000,
        );
        assert_eq!(d, Decision::Changed);
        assert_eq!(c.progress.state, RolloutState::Holding);
        assert!(
            c.progress.reason.contains("10 rewards in the window"),
            "{}",
            c.progress.reason
        );
        // Enough feedback: 30 % against 80 % is worse and significant.
        let d = c.tick_with(
            "m",
            &[&both],
            (&b, &k),
            (&rewards(200, 160), &rewards(100, 30)),
            2000,
        );
        assert_eq!(d, Decision::RolledBack);
        assert!(
            c.progress
                .reason
                .contains("mean reward 0.300 < 0.9 × baseline mean reward 0.800"),
            "{}",
            c.progress.reason
        );
        // As good as the baseline: passes.
        let mut c = Canary::start("1".into(), "2".into(), judged, 0);
        c.tick_with("m", &[&both], (&zero, &zero), (&none, &none), 0);
        let d = c.tick_with(
            "m",
            &[&both],
            (&b, &k),
            (&rewards(100, 80), &rewards(50, 41)),
            1000,
        );
        assert_eq!(d, Decision::Changed);
        assert_eq!(c.canary_weight(), 50);
    }

    #[test]
    fn operators_can_promote_and_abort() {
        let mut c = Canary::start("1".into(), "2".into(), config(), 0);
        c.promote(1);
        assert_eq!(
            (c.progress.state, c.canary_weight()),
            (RolloutState::Promoted, 100)
        );
        let mut c = Canary::start("1".into(), "2".into(), config(), 0);
        c.progress.abort("operator".into(), 1);
        assert_eq!(
            (c.progress.state, c.canary_weight()),
            (RolloutState::Aborted, 0)
        );
        let both = replica(&["1", "2"]);
        let zero = VersionStats::default();
        assert_eq!(
            c.tick("m", &[&both], (&zero, &zero), 2),
            Decision::Unchanged
        );
    }
}
