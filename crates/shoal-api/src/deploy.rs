//! Deployments (the desired traffic of each model) and rollouts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::UnixMillis;

/// How a new version replaces the serving one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Replicas move a batch at a time; each loads and warms the new version
    /// before it leaves the old, so serving capacity never drops.
    #[default]
    Rolling,
    /// Both versions loaded everywhere; traffic moves in steps, each judged
    /// against the baseline on the same window; rolled back automatically.
    Canary,
    /// The new version loaded everywhere and smoke-tested, then all traffic
    /// switches at once; the old one stays loaded for an instant switch back.
    BlueGreen,
    /// The new version loaded everywhere; a share of real traffic is
    /// mirrored to it and the answers compared; users only see the primary's.
    Shadow,
    /// A fixed split by user between versions, judged by feedback.
    Ab,
    /// Thompson sampling: traffic moves towards the version with the better
    /// feedback, keeping a floor for exploration.
    Bandit,
}

impl Strategy {
    /// The strategy name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Rolling => "rolling",
            Strategy::Canary => "canary",
            Strategy::BlueGreen => "blue-green",
            Strategy::Shadow => "shadow",
            Strategy::Ab => "ab",
            Strategy::Bandit => "bandit",
        }
    }
}

/// Body of `POST /api/v1/deployments/{model}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// The version to deploy.
    pub version: String,
    /// How to roll it out (default: rolling).
    #[serde(default)]
    pub strategy: Strategy,
    /// Replicas moved at once in a rolling deploy (default: a quarter of
    /// the fleet, at least 1).
    #[serde(default)]
    pub max_surge: Option<u32>,
    /// Rolling: most replicas that may be down for the next batch to move
    /// (default: no limit; dead replicas never block).
    #[serde(default)]
    pub max_unavailable: Option<u32>,
    /// Restrict the model to these regions (data residency); all when absent.
    #[serde(default)]
    pub regions: Option<Vec<String>>,
    /// Why, for the audit log.
    #[serde(default)]
    pub reason: Option<String>,
    /// Canary: traffic percentages of the steps (default 1, 10, 50, 100).
    #[serde(default)]
    pub steps: Option<Vec<u32>>,
    /// Canary: seconds each step bakes before it is judged (default 30).
    #[serde(default)]
    pub bake_secs: Option<f64>,
    /// Canary, gradual schedule: seconds each step bakes, one per step
    /// before 100 % (e.g. 5, 10, 25, 50 % for 600, 1800, 3600, 3600 s).
    /// Steps that bake a minute or more are also judged while they bake.
    #[serde(default)]
    pub bakes_secs: Option<Vec<f64>>,
    /// Canary, business metric: roll back when the canary's mean reward
    /// (from feedback) is significantly below this multiple of the
    /// baseline's, e.g. 0.95. Steps then wait for 30 rewards on each side.
    #[serde(default)]
    pub min_reward_ratio: Option<f64>,
    /// Canary: roll back when the canary's error rate exceeds this multiple
    /// of the baseline's (default 1.5).
    #[serde(default)]
    pub max_error_ratio: Option<f64>,
    /// Canary: roll back when the canary's p99 exceeds this multiple of the
    /// baseline's (default 1.2).
    #[serde(default)]
    pub max_p99_ratio: Option<f64>,
    /// Canary: requests the canary must have served in a step to be judged;
    /// fewer and the rollout holds (default 100).
    #[serde(default)]
    pub min_requests: Option<u64>,
    /// Canary: p99 increases smaller than this many milliseconds never roll
    /// back (default 1), however large the ratio: below it is noise.
    #[serde(default)]
    pub min_p99_increase_ms: Option<f64>,
    /// Seconds the replaced version stays loaded after a switch, so that
    /// switching back is instant (default 300).
    #[serde(default)]
    pub keep_warm_secs: Option<f64>,
    /// Shadow: percent of requests mirrored to the new version (default 100).
    #[serde(default)]
    pub percent: Option<u32>,
    /// A/B and bandit: the other versions in the experiment besides
    /// `version` (default: the version in production now).
    #[serde(default)]
    pub against: Option<Vec<String>>,
    /// Bandit: the least traffic any arm keeps, percent (default 5).
    #[serde(default)]
    pub floor: Option<u32>,
}

/// A version kept loaded without traffic until a time, for warm rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WarmVersion {
    /// Version.
    pub version: String,
    /// Kept until (ms since the epoch).
    pub until: UnixMillis,
}

/// A share of a model's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TrafficTarget {
    /// Version.
    pub version: String,
    /// Relative weight (percent when they sum to 100).
    pub weight: u32,
}

/// A share of traffic mirrored to a version whose answers users never see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Shadow {
    /// The version that receives the copies.
    pub version: String,
    /// Percent of requests mirrored (0–100).
    pub percent: u32,
}

/// Body of `PUT /api/v1/deployments/{model}/traffic`: set the traffic
/// policy by hand (no rollout).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrafficRequest {
    /// Versions and weights.
    pub targets: Vec<TrafficTarget>,
    /// Mirror a share of traffic to a version.
    #[serde(default)]
    pub shadow: Option<Shadow>,
    /// Header whose value keeps a user on one version (default `x-user-id`).
    #[serde(default)]
    pub split_header: Option<String>,
    /// Why, for the audit log.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Moving forward.
    Progressing,
    /// Waiting for something (replicas to report, enough data).
    Holding,
    /// Stopped by an operator; resumes on promote.
    Paused,
    /// Finished: the new version serves all traffic.
    Promoted,
    /// Undone automatically or by rollback.
    RolledBack,
    /// Stopped by an operator; the old version serves.
    Aborted,
}

impl RolloutState {
    /// The state's name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Progressing => "progressing",
            RolloutState::Holding => "holding",
            RolloutState::Paused => "paused",
            RolloutState::Promoted => "promoted",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        }
    }

    /// True when the rollout has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RolloutState::Promoted | RolloutState::RolledBack | RolloutState::Aborted
        )
    }
}

/// A rollout as users see it (`shoal rollout status --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutView {
    /// Strategy.
    pub strategy: Strategy,
    /// State.
    pub state: RolloutState,
    /// The version being replaced, if any.
    pub from: Option<String>,
    /// The version being rolled out.
    pub to: String,
    /// Step number (rolling: batches started).
    pub step: u32,
    /// Traffic weights by version now.
    pub weights: BTreeMap<String, u32>,
    /// Why the last decision was taken.
    pub reason: String,
    /// Replicas serving the new version.
    pub replicas_done: usize,
    /// Replicas that will serve it.
    pub replicas_total: usize,
    /// Started.
    pub started_at: UnixMillis,
    /// Last decision.
    pub updated_at: UnixMillis,
    /// Shadow comparison so far (shadow rollouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::traffic::ShadowSummary>,
    /// Arms with their rewards (A/B tests and bandits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arms: Vec<crate::traffic::ArmSummary>,
    /// Whether the arms' difference is statistically significant (A/B).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub significant: Option<bool>,
}

/// The desired state of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    /// Model.
    pub model: String,
    /// Traffic by version once the rollout (if any) is done.
    pub targets: Vec<TrafficTarget>,
    /// Regions the model may be served in; all when absent.
    pub regions: Option<Vec<String>>,
    /// Traffic mirrored to a shadow version.
    #[serde(default)]
    pub shadow: Option<Shadow>,
    /// Header that keeps a user on one version (default `x-user-id`).
    #[serde(default)]
    pub split_header: Option<String>,
    /// Versions kept loaded without traffic, for an instant switch back.
    #[serde(default)]
    pub warm: Vec<WarmVersion>,
    /// The rollout in progress or the last one.
    pub rollout: Option<RolloutView>,
    /// How many replicas serve the model (`shoal scale`); every eligible
    /// one when absent.
    #[serde(default)]
    pub scale: Option<crate::scale::ScaleSpec>,
    /// The replicas the model is placed on (by the control plane, from
    /// `scale`); every eligible one when absent.
    #[serde(default)]
    pub placement: Option<Vec<String>>,
    /// Fleet revision when this last changed.
    pub revision: u64,
    /// When this last changed.
    pub updated_at: UnixMillis,
}

impl Deployment {
    /// The version most traffic goes to, if any.
    pub fn primary(&self) -> Option<&str> {
        self.targets
            .iter()
            .filter(|t| t.weight > 0)
            .max_by_key(|t| t.weight)
            .map(|t| t.version.as_str())
    }
}
