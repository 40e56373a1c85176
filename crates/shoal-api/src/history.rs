//! `GET /api/v1/rollouts/{model}/history`: what the dashboard charts — per
//! version request rate, error rate and latency quantiles over a short
//! sliding window, with the traffic weights and rewards, sampled once a
//! second by the control plane that answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::UnixMillis;

/// One version at one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VersionPoint {
    /// Requests per second over the window.
    pub rps: f64,
    /// Failed ÷ answered over the window; none without requests.
    pub error_rate: Option<f64>,
    /// Median latency over the window, ms (upper bound of its bucket).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency over the window, ms (upper bound of its
    /// bucket).
    pub p99_ms: Option<f64>,
    /// Mean reward so far (A/B tests and bandits with feedback).
    pub reward: Option<f64>,
}

/// One sample of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HistoryPoint {
    /// When.
    pub at: UnixMillis,
    /// Traffic weight per version.
    pub weights: BTreeMap<String, u32>,
    /// Per version with traffic or weight.
    pub versions: BTreeMap<String, VersionPoint>,
}

/// The answer: the samples after the asked time, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct History {
    /// Model.
    pub model: String,
    /// The sliding window each point's rates and quantiles cover, ms.
    pub window_ms: i64,
    /// Samples.
    pub points: Vec<HistoryPoint>,
}
