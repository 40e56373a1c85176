//! What gateways learn from traffic and report to the control plane:
//! shadow comparisons and rewards (feedback) per version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Cumulative shadow comparison of one model: primary against candidate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ShadowStats {
    /// Requests mirrored.
    pub mirrored: u64,
    /// Mirrored requests the candidate failed (error or no answer).
    pub candidate_errors: u64,
    /// Pairs of answers compared.
    pub compared: u64,
    /// Rows (batch entries) compared for agreement.
    pub rows: u64,
    /// Rows on which both gave the same class.
    pub agreeing: u64,
    /// Largest absolute difference between their float outputs.
    pub max_abs_diff: f64,
    /// Sum of (candidate − primary) latency over compared pairs, ms.
    pub latency_diff_ms_sum: f64,
}

impl crate::counters::Counters for ShadowStats {
    /// Adds `other`.
    fn add(&mut self, other: &ShadowStats) {
        // Saturating: reports are input, and a counter that cannot grow
        // must not take the control plane down.
        self.mirrored = self.mirrored.saturating_add(other.mirrored);
        self.candidate_errors = self.candidate_errors.saturating_add(other.candidate_errors);
        self.compared = self.compared.saturating_add(other.compared);
        self.rows = self.rows.saturating_add(other.rows);
        self.agreeing = self.agreeing.saturating_add(other.agreeing);
        self.max_abs_diff = self.max_abs_diff.max(other.max_abs_diff);
        self.latency_diff_ms_sum += other.latency_diff_ms_sum;
    }

    fn progress(&self) -> u64 {
        self.mirrored
    }

    /// `self − earlier` (counters; the maximum is kept as is).
    fn since(&self, earlier: &ShadowStats) -> ShadowStats {
        ShadowStats {
            mirrored: self.mirrored.saturating_sub(earlier.mirrored),
            candidate_errors: self
                .candidate_errors
                .saturating_sub(earlier.candidate_errors),
            compared: self.compared.saturating_sub(earlier.compared),
            rows: self.rows.saturating_sub(earlier.rows),
            agreeing: self.agreeing.saturating_sub(earlier.agreeing),
            max_abs_diff: self.max_abs_diff,
            latency_diff_ms_sum: self.latency_diff_ms_sum - earlier.latency_diff_ms_sum,
        }
    }
}

impl crate::counters::Counters for RewardStats {
    fn add(&mut self, other: &RewardStats) {
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
    }

    fn since(&self, earlier: &RewardStats) -> RewardStats {
        RewardStats {
            count: self.count.saturating_sub(earlier.count),
            sum: self.sum - earlier.sum,
            sum_sq: self.sum_sq - earlier.sum_sq,
        }
    }

    fn progress(&self) -> u64 {
        self.count
    }
}

/// Cumulative rewards of one version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RewardStats {
    /// Rewards received.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// Sum of their squares.
    pub sum_sq: f64,
}

impl RewardStats {
    /// Records one reward.
    pub fn record(&mut self, reward: f64) {
        self.count = self.count.saturating_add(1);
        self.sum += reward;
        self.sum_sq += reward * reward;
    }

    /// Mean reward (0 without rewards).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    /// Sample variance (0 with fewer than two rewards).
    pub fn variance(&self) -> f64 {
        if self.count < 2 {
            return 0.0;
        }
        let n = self.count as f64;
        ((self.sum_sq - self.sum * self.sum / n) / (n - 1.0)).max(0.0)
    }
}

/// Body of `POST /api/v1/gateways/{id}/report`: what a gateway has seen
/// since it started (cumulative; the control plane takes differences).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GatewayReport {
    /// Shadow comparisons by model.
    #[serde(default)]
    pub shadow: BTreeMap<String, ShadowStats>,
    /// Rewards by `model:version`.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, RewardStats>)]
    pub rewards: BTreeMap<shoal_core::VersionKey, RewardStats>,
}

/// Body of `POST /v2/models/{model}/feedback` at a gateway: the outcome of
/// an earlier prediction, for A/B tests and bandits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    /// The `id` of the inference request it is about.
    #[serde(default)]
    pub id: Option<String>,
    /// Or the user key (split header value) whose version it is about.
    #[serde(default)]
    pub user: Option<String>,
    /// The reward (e.g. 1 for a click, 0 for none).
    pub reward: f64,
}

/// A shadow comparison as `rollout status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ShadowSummary {
    /// Requests mirrored.
    pub mirrored: u64,
    /// Pairs compared.
    pub compared: u64,
    /// Share of compared rows on which the versions agreed.
    pub agreement: Option<f64>,
    /// Rows compared.
    pub rows: u64,
    /// Largest absolute difference between float outputs.
    pub max_abs_diff: f64,
    /// Mean latency difference, candidate − primary, ms.
    pub latency_diff_ms: Option<f64>,
    /// Candidate errors.
    pub candidate_errors: u64,
}

/// One arm of an A/B test or bandit as `rollout status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ArmSummary {
    /// Version.
    pub version: String,
    /// Rewards received.
    pub count: u64,
    /// Mean reward.
    pub mean: f64,
    /// 95 % confidence interval of the mean.
    pub ci95: (f64, f64),
    /// Traffic weight now.
    pub weight: u32,
}
