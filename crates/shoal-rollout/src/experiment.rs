//! Experiments on live traffic judged by feedback: A/B tests (a fixed split
//! by user, with each arm's mean reward, its confidence interval and whether
//! the difference is significant) and multi-armed bandits (Thompson
//! sampling: traffic moves towards the better arm as evidence arrives,
//! every arm keeping a floor for exploration).

use std::collections::BTreeMap;

use rand::Rng;
use serde::{Deserialize, Serialize};
use shoal_api::counters::Counters;
use shoal_api::deploy::{RolloutState, RolloutView, Strategy};
use shoal_api::traffic::{ArmSummary, RewardStats};

use crate::plan::ReplicaFacts;
use crate::progress::Progress;

/// A/B test or bandit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Fixed split.
    Ab,
    /// Thompson sampling.
    Bandit,
}

/// An experiment, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    /// A/B or bandit.
    #[serde(rename = "experiment")]
    pub kind: Kind,
    /// The versions compared; the first is the one in production.
    pub arms: Vec<String>,
    /// Current weights by version (percent).
    pub weights: BTreeMap<String, u32>,
    /// Least weight of any arm (bandit).
    pub floor: u32,
    /// Each arm's reward totals when the experiment started.
    pub baseline: BTreeMap<String, RewardStats>,
    /// The arm promoted, once promoted.
    pub winner: Option<String>,
    /// State, reason, when.
    #[serde(flatten)]
    pub progress: Progress,
}

/// The 95 % normal interval of a mean.
fn ci95(r: &RewardStats) -> (f64, f64) {
    if r.count == 0 {
        return (0.0, 0.0);
    }
    let half = 1.96 * (r.variance() / r.count as f64).sqrt();
    (r.mean() - half, r.mean() + half)
}

/// True when the two best arms differ significantly (Welch's t, large
/// samples: |t| > 1.96, p < 0.05 two-sided).
pub fn significant(a: &RewardStats, b: &RewardStats) -> bool {
    if a.count < 2 || b.count < 2 {
        return false;
    }
    let se = (a.variance() / a.count as f64 + b.variance() / b.count as f64).sqrt();
    if se == 0.0 {
        return a.mean() != b.mean();
    }
    ((a.mean() - b.mean()) / se).abs() > 1.96
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Thompson sampling: each arm's share is the probability it is the best,
/// estimated by drawing each arm's mean from its posterior (normal around
/// the observed mean; a wide prior while data is scarce) `draws` times;
/// then every arm gets at least `floor` percent.
pub fn thompson(
    arms: &[String],
    rewards: &BTreeMap<String, RewardStats>,
    floor: u32,
    draws: u32,
    rng: &mut impl Rng,
) -> BTreeMap<String, u32> {
    let n = arms.len().max(1) as u32;
    let floor = floor.min(100 / n);
    let mut wins = vec![0u32; arms.len()];
    for _ in 0..draws.max(1) {
        let mut best = (0, f64::NEG_INFINITY);
        for (i, arm) in arms.iter().enumerate() {
            let r = rewards.get(arm).cloned().unwrap_or_default();
            // Prior: mean 0.5, variance 0.25 worth of one observation.
            let count = r.count as f64 + 1.0;
            let mean = (r.sum + 0.5) / count;
            let var = if r.count >= 2 {
                r.variance().max(1e-4)
            } else {
                0.25
            };
            let draw = mean + normal(rng) * (var / count).sqrt();
            if draw > best.1 {
                best = (i, draw);
            }
        }
        wins[best.0] += 1;
    }
    let spare = 100 - floor * n;
    let mut weights: BTreeMap<String, u32> = arms
        .iter()
        .zip(&wins)
        .map(|(arm, w)| {
            (
                arm.clone(),
                floor + (f64::from(*w) / f64::from(draws.max(1)) * f64::from(spare)).round() as u32,
            )
        })
        .collect();
    // Rounding may leave the sum a point off 100; give it to the leader.
    let total: u32 = weights.values().sum();
    if let Some((_, w)) = weights.iter_mut().max_by_key(|(_, w)| **w) {
        *w = (*w + 100).saturating_sub(total);
    }
    weights
}

impl Experiment {
    /// Starts an experiment over `arms` (production first).
    pub fn start(
        kind: Kind,
        arms: Vec<String>,
        floor: u32,
        baseline: BTreeMap<String, RewardStats>,
        now: i64,
    ) -> Experiment {
        let n = u32::try_from(arms.len().max(1)).unwrap_or(1);
        let mut weights: BTreeMap<String, u32> =
            arms.iter().map(|a| (a.clone(), 100 / n)).collect();
        if let Some(first) = arms.first() {
            let total: u32 = weights.values().sum();
            *weights.entry(first.clone()).or_default() += 100 - total;
        }
        let reason = format!(
            "{} over {}: equal split until feedback arrives",
            if kind == Kind::Ab {
                "A/B test"
            } else {
                "bandit"
            },
            arms.join(", ")
        );
        Experiment {
            kind,
            arms,
            weights,
            floor,
            baseline,
            winner: None,
            progress: Progress::start(reason, now),
        }
    }

    /// Rewards of each arm since the start.
    pub fn rewards(&self, totals: &BTreeMap<String, RewardStats>) -> BTreeMap<String, RewardStats> {
        self.arms
            .iter()
            .map(|a| {
                let now = totals.get(a).cloned().unwrap_or_default();
                let base = self.baseline.get(a).cloned().unwrap_or_default();
                (
                    a.clone(),
                    if now.count >= base.count {
                        now.since(&base)
                    } else {
                        now
                    },
                )
            })
            .collect()
    }

    /// A bandit re-weights on the evidence so far; returns true when the
    /// weights moved. A/B splits stay fixed.
    pub fn tick(
        &mut self,
        totals: &BTreeMap<String, RewardStats>,
        rng: &mut impl Rng,
        now: i64,
    ) -> bool {
        if self.kind != Kind::Bandit || self.progress.state.is_terminal() {
            return false;
        }
        let rewards = self.rewards(totals);
        let weights = thompson(&self.arms, &rewards, self.floor, 2000, rng);
        let moved = weights
            .iter()
            .any(|(a, w)| self.weights.get(a).is_none_or(|old| old.abs_diff(*w) >= 2));
        if !moved {
            return false;
        }
        self.weights = weights;
        let leader = self
            .weights
            .iter()
            .max_by_key(|(_, w)| **w)
            .map(|(a, _)| a.clone())
            .unwrap_or_default();
        self.progress.reason = format!(
            "traffic follows the evidence: {leader} leads with {}%",
            self.weights[&leader]
        );
        self.progress.updated_at = now;
        true
    }

    /// Ends the experiment with the arm of the best mean reward.
    pub fn promote(&mut self, totals: &BTreeMap<String, RewardStats>, now: i64) {
        let rewards = self.rewards(totals);
        let best = self
            .arms
            .iter()
            .max_by(|a, b| rewards[*a].mean().total_cmp(&rewards[*b].mean()))
            .cloned()
            .unwrap_or_default();
        self.progress.reason = format!(
            "promoted {best}, the arm with the best mean reward ({:.3})",
            rewards.get(&best).map_or(0.0, RewardStats::mean)
        );
        self.winner = Some(best);
        self.progress.state = RolloutState::Promoted;
        self.progress.updated_at = now;
    }

    /// Traffic weights by version now: the arms' split while running, the
    /// winner once promoted, production alone once ended otherwise.
    pub fn weights(&self) -> BTreeMap<String, u32> {
        match (&self.winner, self.progress.state) {
            (Some(w), RolloutState::Promoted) => [(w.clone(), 100)].into(),
            (_, s) if s.is_terminal() => [(self.arms[0].clone(), 100)].into(),
            _ => self.weights.clone(),
        }
    }

    /// The rollout as users see it.
    pub fn view(
        &self,
        model: &str,
        replicas: &[&ReplicaFacts],
        totals: &BTreeMap<String, RewardStats>,
    ) -> RolloutView {
        let live: Vec<&&ReplicaFacts> = replicas.iter().filter(|r| r.alive).collect();
        let rewards = self.rewards(totals);
        let arms: Vec<ArmSummary> = self
            .arms
            .iter()
            .map(|a| {
                let r = rewards.get(a).cloned().unwrap_or_default();
                ArmSummary {
                    version: a.clone(),
                    count: r.count,
                    mean: r.mean(),
                    ci95: ci95(&r),
                    weight: self.weights.get(a).copied().unwrap_or(0),
                }
            })
            .collect();
        let mut by_mean: Vec<&RewardStats> = rewards.values().collect();
        by_mean.sort_by(|a, b| b.mean().total_cmp(&a.mean()));
        let significant = (by_mean.len() >= 2).then(|| significant(by_mean[0], by_mean[1]));
        let weights = self.weights();
        RolloutView {
            replicas_done: live
                .iter()
                .filter(|r| self.arms.iter().all(|a| r.serves(model, a)))
                .count(),
            replicas_total: live.len(),
            arms,
            significant,
            ..self.progress.view(
                if self.kind == Kind::Ab {
                    Strategy::Ab
                } else {
                    Strategy::Bandit
                },
                self.arms.first().cloned(),
                self.winner
                    .clone()
                    .unwrap_or_else(|| self.arms.last().cloned().unwrap_or_default()),
                weights,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn bernoulli(successes: u64, n: u64) -> RewardStats {
        let mut r = RewardStats::default();
        for i in 0..n {
            r.record(if i < successes { 1.0 } else { 0.0 });
        }
        r
    }

    #[test]
    fn thompson_favours_the_better_arm_and_keeps_a_floor() {
        let arms = vec!["1".to_owned(), "2".to_owned()];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let none = BTreeMap::new();
        let even = thompson(&arms, &none, 5, 2000, &mut rng);
        assert!((35..=65).contains(&even["1"]), "{even:?}");
        let rewards: BTreeMap<String, RewardStats> = [
            ("1".to_owned(), bernoulli(30, 100)),
            ("2".to_owned(), bernoulli(80, 100)),
        ]
        .into();
        let w = thompson(&arms, &rewards, 5, 2000, &mut rng);
        assert_eq!(w.values().sum::<u32>(), 100);
        assert!(w["2"] >= 90, "{w:?}");
        assert!(w["1"] >= 5, "the floor keeps exploring: {w:?}");
    }

    #[test]
    fn ab_reports_means_intervals_and_significance() {
        let arms = vec!["1".to_owned(), "2".to_owned()];
        let mut e = Experiment::start(Kind::Ab, arms, 0, BTreeMap::new(), 0);
        assert_eq!(
            e.weights,
            [("1".to_owned(), 50), ("2".to_owned(), 50)].into()
        );
        let close: BTreeMap<String, RewardStats> = [
            ("1".to_owned(), bernoulli(50, 100)),
            ("2".to_owned(), bernoulli(53, 100)),
        ]
        .into();
        let v = e.view("m", &[], &close);
        assert_eq!(v.significant, Some(false));
        assert!(v.arms[1].ci95.0 < 0.53 && v.arms[1].ci95.1 > 0.53);
        let far: BTreeMap<String, RewardStats> = [
            ("1".to_owned(), bernoulli(30, 200)),
            ("2".to_owned(), bernoulli(80, 200)),
        ]
        .into();
        assert_eq!(e.view("m", &[], &far).significant, Some(true));
        // A/B never moves its split by itself.
        assert!(!e.tick(&far, &mut rand::rngs::StdRng::seed_from_u64(1), 1));
        e.promote(&far, 2);
        assert_eq!(e.winner.as_deref(), Some("2"));
        assert_eq!(
            e.view("m", &[], &far).weights,
            [("2".to_owned(), 100)].into()
        );
    }

    #[test]
    fn bandits_count_only_rewards_since_they_started() {
        let arms = vec!["1".to_owned(), "2".to_owned()];
        let before: BTreeMap<String, RewardStats> = [("1".to_owned(), bernoulli(100, 100))].into();
        let mut e = Experiment::start(Kind::Bandit, arms, 5, before.clone(), 0);
        let mut totals = before;
        totals.get_mut("1").unwrap().add(&bernoulli(10, 100));
        totals.insert("2".into(), bernoulli(90, 100));
        assert!(e.tick(&totals, &mut rand::rngs::StdRng::seed_from_u64(3), 1));
        assert!(e.weights["2"] > 80, "{:?}", e.weights);
    }
}
