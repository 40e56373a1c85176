//! Capacity: how many replicas a model is placed on, what kind of
//! replicas they are, and what the autoscaler recommends.
//!
//! A model without a [`ScaleSpec`] is loaded by every eligible replica
//! (Shoal's behaviour before placement). With one, the control plane
//! picks that many replicas ([`Deployment::placement`](crate::deploy::Deployment::placement))
//! and only they load it; gateways route only to replicas serving it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::UnixMillis;

/// What kind of capacity a replica runs on.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// Ordinary machines: stay until someone stops them.
    #[default]
    OnDemand,
    /// Spot or preemptible machines: cheaper, and may vanish at any time.
    Spot,
}

impl Tier {
    /// The name users type (`on-demand`, `spot`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::OnDemand => "on-demand",
            Tier::Spot => "spot",
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on-demand" => Ok(Tier::OnDemand),
            "spot" => Ok(Tier::Spot),
            other => Err(format!("unknown tier {other:?}: use on-demand or spot")),
        }
    }
}

/// What the autoscaler measures a model's load by, with the value one
/// replica should carry.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "signal", content = "target")]
pub enum ScaleTarget {
    /// Inference requests in flight per replica.
    InFlight(f64),
    /// Inference requests per second per replica.
    Rps(f64),
    /// The model's p99 latency in milliseconds (the SLO).
    P99Ms(f64),
}

impl ScaleTarget {
    /// The default: 50 requests per second per replica.
    pub const DEFAULT: ScaleTarget = ScaleTarget::Rps(50.0);

    /// The target value.
    pub fn value(self) -> f64 {
        match self {
            ScaleTarget::InFlight(v) | ScaleTarget::Rps(v) | ScaleTarget::P99Ms(v) => v,
        }
    }

    /// The signal's name, as `shoal scale --signal` takes it.
    pub fn signal(self) -> &'static str {
        match self {
            ScaleTarget::InFlight(_) => "in-flight",
            ScaleTarget::Rps(_) => "rps",
            ScaleTarget::P99Ms(_) => "p99-ms",
        }
    }

    /// Builds a target from a signal name and a value, checking both.
    pub fn parse(signal: &str, value: f64) -> Result<ScaleTarget, String> {
        if !(value.is_finite() && value > 0.0) {
            return Err(format!("the target must be a positive number, not {value}"));
        }
        match signal {
            "in-flight" => Ok(ScaleTarget::InFlight(value)),
            "rps" => Ok(ScaleTarget::Rps(value)),
            "p99-ms" => Ok(ScaleTarget::P99Ms(value)),
            other => Err(format!(
                "unknown signal {other:?}: use in-flight, rps or p99-ms"
            )),
        }
    }
}

/// `PUT /api/v1/deployments/{model}/scale`: how many replicas serve a
/// model. Exactly one of `replicas` or (`min`, `max`) is given, or
/// neither (`everywhere`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleSpec {
    /// A fixed number of replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// The autoscaler's lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    /// The autoscaler's upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Of the placed replicas, at least this many on on-demand capacity
    /// (when the fleet has them): losing every spot replica then leaves
    /// the model served.
    #[serde(default)]
    pub min_on_demand: u32,
    /// What the autoscaler scales on (bounds only); default
    /// [`ScaleTarget::DEFAULT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ScaleTarget>,
}

impl ScaleSpec {
    /// Every eligible replica (no placement).
    pub fn everywhere() -> ScaleSpec {
        ScaleSpec {
            replicas: None,
            min: None,
            max: None,
            min_on_demand: 0,
            target: None,
        }
    }

    /// Checks the combination, with a message saying what to change.
    pub fn check(&self) -> Result<(), String> {
        match (self.replicas, self.min, self.max) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err("give either --replicas N or --min N --max M, not both".into());
            }
            (Some(0), ..) => return Err("--replicas must be at least 1".into()),
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err("give both --min N and --max M".into());
            }
            (None, Some(0), Some(_)) => return Err("--min must be at least 1".into()),
            (None, Some(min), Some(max)) if min > max => {
                return Err(format!("--min {min} is above --max {max}"));
            }
            _ => {}
        }
        if self.target.is_some() && !self.autoscaled() {
            return Err("a scaling target needs --min N --max M".into());
        }
        if let Some(most) = self.replicas.or(self.max)
            && self.min_on_demand > most
        {
            return Err(format!(
                "--min-on-demand {} is above the {most} replicas the model may have",
                self.min_on_demand
            ));
        }
        Ok(())
    }

    /// True when the autoscaler decides the count.
    pub fn autoscaled(&self) -> bool {
        self.replicas.is_none() && self.min.is_some() && self.max.is_some()
    }

    /// True when every eligible replica serves the model.
    pub fn is_everywhere(&self) -> bool {
        self.replicas.is_none() && self.min.is_none() && self.max.is_none()
    }

    /// The target the autoscaler uses.
    pub fn target_or_default(&self) -> ScaleTarget {
        self.target.unwrap_or(ScaleTarget::DEFAULT)
    }
}

/// One recommendation with the reason behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Recommendation {
    /// Replicas.
    pub replicas: u32,
    /// Why, in words.
    pub reason: String,
}

/// A change the predictor expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PredictedChange {
    /// When the recommendation changes.
    pub at: UnixMillis,
    /// To how many replicas.
    pub replicas: u32,
}

/// `GET /api/v1/deployments/{model}/scale`: `shoal scale status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScaleStatus {
    /// Model.
    pub model: String,
    /// What the user asked for.
    pub spec: ScaleSpec,
    /// Replicas the model is placed on now (`None`: every eligible one).
    pub placement: Option<Vec<String>>,
    /// Placed replicas serving it now.
    pub current: u32,
    /// What the placement aims at.
    pub desired: u32,
    /// The reactive (HPA) recommendation.
    pub reactive: Option<Recommendation>,
    /// The predictive recommendation (once a day of load is learned).
    pub predicted: Option<Recommendation>,
    /// The model's load now (requests per second over the fleet).
    pub rps: f64,
    /// Peak requests per second seen in the learned profile.
    pub peak_rps: f64,
    /// Requests per second one replica carries at the target.
    pub rps_per_replica: Option<f64>,
    /// Right-sizing: peak RPS ÷ RPS per replica × safety factor.
    pub right_size: Option<u32>,
    /// The safety factor in `right_size`.
    pub safety_factor: f64,
    /// Time a replica needs to fetch, load and warm the model, as
    /// measured (what prediction scales ahead by).
    pub load_ms: Option<u64>,
    /// The next change the predictor expects, within a day.
    pub next_change: Option<PredictedChange>,
}

/// `GET /api/v1/scale`: the fleet's replica count as the autoscaler sees
/// it (what Kubernetes' scaler reads: `desired_replicas`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FleetScale {
    /// Replicas the fleet should run: the most any model needs, at least
    /// the replicas placed models already use.
    pub desired_replicas: u32,
    /// Live replicas now.
    pub current_replicas: u32,
    /// Each model with a scale spec.
    pub models: Vec<ScaleStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(replicas: Option<u32>, min: Option<u32>, max: Option<u32>) -> ScaleSpec {
        ScaleSpec {
            replicas,
            min,
            max,
            ..ScaleSpec::everywhere()
        }
    }

    #[test]
    fn specs_are_checked_with_a_message_that_says_what_to_change() {
        assert!(spec(Some(2), None, None).check().is_ok());
        assert!(spec(None, Some(1), Some(4)).check().is_ok());
        assert!(spec(None, None, None).check().is_ok());
        let err = |s: ScaleSpec| s.check().unwrap_err();
        assert!(err(spec(Some(0), None, None)).contains("at least 1"));
        assert!(err(spec(Some(2), Some(1), Some(3))).contains("not both"));
        assert!(err(spec(None, Some(3), Some(2))).contains("above --max"));
        assert!(err(spec(None, Some(1), None)).contains("both"));
        assert!(err(spec(None, Some(0), Some(2))).contains("--min must be at least 1"));
        let mut s = spec(Some(2), None, None);
        s.min_on_demand = 3;
        assert!(err(s).contains("--min-on-demand 3"));
        let mut s = spec(Some(2), None, None);
        s.target = Some(ScaleTarget::Rps(5.0));
        assert!(err(s).contains("needs --min"));
    }

    #[test]
    fn tiers_and_targets_round_trip_by_name() {
        for t in [Tier::OnDemand, Tier::Spot] {
            assert_eq!(t.as_str().parse::<Tier>().unwrap(), t);
        }
        assert!(
            "preemptible"
                .parse::<Tier>()
                .unwrap_err()
                .contains("on-demand or spot")
        );
        let t = ScaleTarget::parse("p99-ms", 20.0).unwrap();
        assert_eq!((t.signal(), t.value()), ("p99-ms", 20.0));
        assert!(ScaleTarget::parse("rps", 0.0).is_err());
        assert!(
            ScaleTarget::parse("cpu", 1.0)
                .unwrap_err()
                .contains("in-flight, rps or p99-ms")
        );
        let json = serde_json::to_string(&ScaleTarget::Rps(50.0)).unwrap();
        assert_eq!(json, r#"{"signal":"rps","target":50.0}"#);
    }
}
