//! One type for every rollout controller, as the registry persists it.

use serde::{Deserialize, Serialize};
use shoal_api::deploy::{RolloutState, RolloutView};

use crate::bluegreen::BlueGreen;
use crate::canary::Canary;
use crate::plan::ReplicaFacts;
use crate::rolling::Rolling;

/// The controller of a model's rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Controller {
    /// Rolling update.
    Rolling(Rolling),
    /// Canary with analysis.
    Canary(Canary),
    /// Blue-green switch.
    BlueGreen(BlueGreen),
}

impl Controller {
    /// Where it stands.
    pub fn state(&self) -> RolloutState {
        match self {
            Controller::Rolling(r) => r.state,
            Controller::Canary(c) => c.state,
            Controller::BlueGreen(b) => b.state,
        }
    }

    /// True until it has ended.
    pub fn is_active(&self) -> bool {
        !self.state().is_terminal()
    }

    /// The version being replaced.
    pub fn from(&self) -> Option<&str> {
        match self {
            Controller::Rolling(r) => r.from.as_deref(),
            Controller::Canary(c) => Some(&c.from),
            Controller::BlueGreen(b) => b.from.as_deref(),
        }
    }

    /// The version rolled out.
    pub fn to(&self) -> &str {
        match self {
            Controller::Rolling(r) => &r.to,
            Controller::Canary(c) => &c.to,
            Controller::BlueGreen(b) => &b.to,
        }
    }

    /// Versions replica `r` should have loaded while the rollout is
    /// active, the default first.
    pub fn versions_for(&self, r: &ReplicaFacts) -> Vec<String> {
        match self {
            Controller::Rolling(rolling) => vec![rolling.assignment(&r.id).to_owned()],
            Controller::Canary(c) => vec![c.from.clone(), c.to.clone()],
            Controller::BlueGreen(b) => b.from.iter().cloned().chain([b.to.clone()]).collect(),
        }
    }

    /// The rollout as users see it.
    pub fn view(&self, model: &str, replicas: &[&ReplicaFacts]) -> RolloutView {
        match self {
            Controller::Rolling(r) => r.view(model, replicas),
            Controller::Canary(c) => c.view(model, replicas),
            Controller::BlueGreen(b) => b.view(model, replicas),
        }
    }

    /// Stops it; traffic goes back to the old version.
    pub fn abort(&mut self, reason: String, now: i64) {
        match self {
            Controller::Rolling(r) => r.abort(reason, now),
            Controller::Canary(c) => c.abort(reason, now),
            Controller::BlueGreen(b) => b.abort(reason, now),
        }
    }

    /// Parses a persisted snapshot; snapshots written before controllers
    /// had a kind are rolling updates.
    pub fn from_json(value: &serde_json::Value) -> Option<Controller> {
        serde_json::from_value::<Controller>(value.clone())
            .ok()
            .or_else(|| {
                serde_json::from_value::<Rolling>(value.clone())
                    .ok()
                    .map(Controller::Rolling)
            })
    }
}
