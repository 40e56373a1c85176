//! One type for every rollout controller, as the registry persists it.

use serde::{Deserialize, Serialize};
use shoal_api::deploy::{RolloutState, RolloutView};

use crate::bluegreen::BlueGreen;
use crate::canary::Canary;
use crate::experiment::Experiment;
use crate::plan::{FleetFacts, ReplicaFacts};
use crate::rolling::Rolling;
use crate::shadow::Shadow;

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
    /// Shadow comparison.
    Shadow(Shadow),
    /// A/B test or bandit.
    Experiment(Experiment),
}

impl Controller {
    /// Where it stands.
    pub fn state(&self) -> RolloutState {
        match self {
            Controller::Rolling(r) => r.state,
            Controller::Canary(c) => c.state,
            Controller::BlueGreen(b) => b.state,
            Controller::Shadow(s) => s.state,
            Controller::Experiment(e) => e.state,
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
            Controller::Shadow(s) => Some(&s.primary),
            Controller::Experiment(e) => e.arms.first().map(String::as_str),
        }
    }

    /// The version rolled out.
    pub fn to(&self) -> &str {
        match self {
            Controller::Rolling(r) => &r.to,
            Controller::Canary(c) => &c.to,
            Controller::BlueGreen(b) => &b.to,
            Controller::Shadow(s) => &s.candidate,
            Controller::Experiment(e) => e
                .winner
                .as_deref()
                .or_else(|| e.arms.last().map(String::as_str))
                .unwrap_or_default(),
        }
    }

    /// Versions replica `r` should have loaded while the rollout is
    /// active, the default first.
    pub fn versions_for(&self, r: &ReplicaFacts) -> Vec<String> {
        match self {
            Controller::Rolling(rolling) => vec![rolling.assignment(&r.id).to_owned()],
            Controller::Canary(c) => vec![c.from.clone(), c.to.clone()],
            Controller::BlueGreen(b) => b.from.iter().cloned().chain([b.to.clone()]).collect(),
            Controller::Shadow(s) => vec![s.primary.clone(), s.candidate.clone()],
            Controller::Experiment(e) => e.arms.clone(),
        }
    }

    /// Traffic weights while active (given the replicas eligible to
    /// serve), and the shadow share (version, percent) if any. Asked on
    /// every routing-table request, so it computes only the weights, not
    /// the whole view (intervals, significance).
    pub fn traffic(
        &self,
        replicas: &[&ReplicaFacts],
    ) -> (
        std::collections::BTreeMap<String, u32>,
        Option<(String, u32)>,
    ) {
        let weights = match self {
            Controller::Rolling(r) => r.weights(replicas),
            Controller::Canary(c) => c.weights(),
            Controller::BlueGreen(b) => b.weights(),
            Controller::Shadow(s) => s.weights(),
            Controller::Experiment(e) => e.weights(),
        };
        let shadow = match self {
            Controller::Shadow(s) if s.mirroring && s.is_running() => {
                Some((s.candidate.clone(), s.percent))
            }
            _ => None,
        };
        (weights, shadow)
    }

    /// The rollout as users see it (shadow and experiments read what
    /// gateways reported, in `facts`).
    pub fn view(&self, model: &str, replicas: &[&ReplicaFacts], facts: &FleetFacts) -> RolloutView {
        match self {
            Controller::Rolling(r) => r.view(model, replicas),
            Controller::Canary(c) => c.view(model, replicas),
            Controller::BlueGreen(b) => b.view(model, replicas),
            Controller::Shadow(s) => s.view(
                model,
                replicas,
                facts.shadow.get(model).unwrap_or(&Default::default()),
            ),
            Controller::Experiment(e) => {
                let totals = facts.rewards_of(model);
                e.view(model, replicas, &totals)
            }
        }
    }

    /// Stops it; traffic goes back to the old version.
    pub fn abort(&mut self, reason: String, now: i64) {
        match self {
            Controller::Rolling(r) => r.abort(reason, now),
            Controller::Canary(c) => c.abort(reason, now),
            Controller::BlueGreen(b) => b.abort(reason, now),
            Controller::Shadow(s) => s.abort(reason, now),
            Controller::Experiment(e) => e.abort(reason, now),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::Kind;

    #[test]
    fn every_controller_survives_the_registry() {
        let controllers = [
            Controller::Rolling(Rolling::start(Some("1".into()), "2".into(), 1, 0)),
            Controller::Shadow(Shadow::start(
                "1".into(),
                "2".into(),
                20,
                Default::default(),
                0,
            )),
            Controller::Experiment(Experiment::start(
                Kind::Bandit,
                vec!["1".into(), "2".into()],
                5,
                Default::default(),
                0,
            )),
            Controller::Experiment(Experiment::start(
                Kind::Ab,
                vec!["1".into(), "2".into()],
                5,
                Default::default(),
                0,
            )),
        ];
        for c in controllers {
            let json = serde_json::to_value(&c).unwrap();
            assert_eq!(Controller::from_json(&json), Some(c), "{json}");
        }
    }

    #[test]
    fn routing_weights_are_the_weights_users_see() {
        let replicas: Vec<ReplicaFacts> = (0..4)
            .map(|i| ReplicaFacts {
                id: format!("r{i}"),
                address: String::new(),
                region: "x".into(),
                alive: i != 3,
                serving: [("m".to_owned(), "1".to_owned())]
                    .into_iter()
                    .chain((i < 2).then(|| ("m".to_owned(), "2".to_owned())))
                    .collect(),
            })
            .collect();
        let refs: Vec<&ReplicaFacts> = replicas.iter().collect();
        let running = [
            Controller::Rolling(Rolling::start(Some("1".into()), "2".into(), 2, 0)),
            Controller::Canary(crate::canary::Canary::start(
                "1".into(),
                "2".into(),
                Default::default(),
                0,
            )),
            Controller::BlueGreen(crate::bluegreen::BlueGreen::start(
                Some("1".into()),
                "2".into(),
                1_000,
                0,
            )),
            Controller::Shadow(Shadow::start(
                "1".into(),
                "2".into(),
                20,
                Default::default(),
                0,
            )),
            Controller::Experiment(Experiment::start(
                Kind::Ab,
                vec!["1".into(), "2".into()],
                5,
                Default::default(),
                0,
            )),
        ];
        for c in running {
            let mut aborted = c.clone();
            aborted.abort("stop".into(), 1);
            for c in [c, aborted] {
                let view = c.view("m", &refs, &FleetFacts::default());
                let (weights, _) = c.traffic(&refs);
                assert_eq!(weights, view.weights, "{view:?}");
                assert_eq!(weights.values().sum::<u32>(), 100, "{view:?}");
            }
        }
    }
}
